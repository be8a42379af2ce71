//! The Python daffi's two processes in one command, with shorter sleeps:
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! The parent is process 1 (sync, runs the controller on a free TCP port, serves
//! `func3`). It starts itself again as process 2 (async, serves `func1` and `func2`).
//! Each calls the other; both exit 0 when done.

use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use daffi::{callback, Global};

const ROUNDS: usize = 3;
const WAIT: Duration = Duration::from_secs(20);

/// Adds 2 numbers after a (short) long-running job. Served by process 1.
#[callback]
fn func3(a: i64, b: i64) -> i64 {
    thread::sleep(Duration::from_millis(300));
    a + b
}

/// Subtracts 2 numbers. Served by process 2.
#[callback]
async fn func1(a: i64, b: i64) -> i64 {
    a - b
}

/// Prints a line. Served by process 2.
#[callback]
fn func2() {
    println!("[proc2] func2 has been triggered!");
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match (args.next().as_deref(), args.next()) {
        (Some("--proc2"), Some(port)) => proc2(&port),
        _ => proc1(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Process 1: controller + node, sync.
fn proc1() -> Result<(), Box<dyn std::error::Error>> {
    let g = Global::builder()
        .process_name("proc1")
        .init_controller(true)
        .host("127.0.0.1") // no port: the controller picks a free one
        .start()?;
    let port = g.port().ok_or("the controller has no TCP port")?;
    println!("[proc1] controller and node up on port {port}; starting proc2");

    let mut child = Command::new(std::env::current_exe()?)
        .args(["--proc2", &port.to_string()])
        .spawn()?;

    g.wait_process_timeout("proc2", WAIT)?;
    for _ in 0..ROUNDS {
        let delta: i64 = g.call("func1").args((10, 3)).fg()?;
        println!("[proc1] calculated delta = {delta}");
        g.call("func2").no_return()?;
        thread::sleep(Duration::from_millis(200));
    }

    // proc2 announces `proc2_done` once its own calls are through; then we let it go.
    g.wait_function_timeout("proc2_done", WAIT)?;
    g.call("proc2_exit").on("proc2").no_return()?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(child.wait()));
    let status = rx.recv_timeout(WAIT)??;
    g.stop();
    if !status.success() {
        return Err(format!("proc2 exited with {status}").into());
    }
    println!("[proc1] done");
    Ok(())
}

/// Process 2: node only, async.
fn proc2(port: &str) -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = port.parse()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let g = Global::builder()
            .process_name("proc2")
            .host("127.0.0.1")
            .port(port)
            .start_async()
            .await?;
        for _ in 0..ROUNDS {
            let future = g.call("func3").args((4, 6)).bg::<i64>()?;
            // Do something else while process 1 computes.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let sum = future.await?;
            println!("[proc2] calculated sum = {sum}");
        }
        let stopper = g.clone();
        g.register("proc2_exit", move || stopper.stop())?;
        g.register("proc2_done", || ())?;
        g.join_async().await;
        println!("[proc2] done");
        Ok(())
    })
}
