//! A quick measurement of call latency and throughput (the full benchmark is `cargo run --release -p daffi-bench`).
//!
//! ```text
//! cargo run --release --example roundtrip            # TCP
//! cargo run --release --example roundtrip -- unix    # Unix socket
//! cargo run --release --example roundtrip -- unix --controller-in-caller
//! ```
//!
//! Three processes, as in production: a standalone controller, a callee serving `add`,
//! and this caller. It reports the round trip of one small FG call at a time
//! (p50/p99/mean over 10,000 calls) and calls per second with 256 in flight.
//!
//! With `--controller-in-caller`, the caller runs the controller itself (as the
//! README's first example does) and the callee connects to it: two processes, and the
//! caller's node reaches its own controller in-process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daffi::{callback, Global, GlobalBuilder};

const SEQUENTIAL: usize = 10_000;
const CONCURRENT_TOTAL: usize = 200_000;
const IN_FLIGHT: usize = 256;

#[callback]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--controller") => run_controller(&args[1]),
        Some("--callee") => run_callee(&args[1]),
        _ => run_caller(
            args.iter().any(|a| a == "unix"),
            args.iter().any(|a| a == "--controller-in-caller"),
        ),
    }
}

/// `tcp:PORT` or `unix:PATH` -> a builder aimed at it.
fn builder(endpoint: &str) -> Result<GlobalBuilder, Error> {
    let b = Global::builder();
    Ok(match endpoint.split_once(':') {
        Some(("tcp", port)) => b.host("127.0.0.1").port(port.parse()?),
        Some(("unix", path)) => b.unix_sock_path(path),
        _ => return Err(format!("bad endpoint {endpoint}").into()),
    })
}

fn run_controller(endpoint: &str) -> Result<(), Error> {
    let g = builder(endpoint)?
        .init_controller(true)
        .init_node(false)
        .start()?;
    println!("{}", g.port().unwrap_or(0));
    // Stay up until the parent closes our stdin.
    let _ = std::io::stdin().lines().count();
    Ok(())
}

fn run_callee(endpoint: &str) -> Result<(), Error> {
    let _g = builder(endpoint)?.process_name("callee").start()?;
    let _ = std::io::stdin().lines().count();
    Ok(())
}

fn spawn(args: &[&str]) -> Result<Child, Error> {
    Ok(Command::new(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?)
}

fn run_caller(unix: bool, controller_in_caller: bool) -> Result<(), Error> {
    let (g, endpoint, controller) = if controller_in_caller {
        start_with_controller(unix)?
    } else {
        start_beside_controller(unix)?
    };
    let mut callee = spawn(&["--callee", &endpoint])?;
    g.wait_process_timeout("callee", Duration::from_secs(20))?;
    println!(
        "transport: {}{}",
        if unix { "unix socket" } else { "tcp" },
        if controller_in_caller {
            ", controller in the caller"
        } else {
            ""
        }
    );

    // One call at a time.
    for i in 0..1_000 {
        let _: i64 = g.call("add").args((i, 1)).fg()?;
    }
    let mut samples = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL as i64 {
        let t = Instant::now();
        let r: i64 = g.call("add").args((i, 1)).fg()?;
        samples.push(t.elapsed());
        assert_eq!(r, i + 1);
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "FG round trip, one at a time ({SEQUENTIAL} calls): p50 {:?}  p99 {:?}  mean {:?}",
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        mean
    );

    // Many in flight, from async code.
    let runtime = tokio::runtime::Runtime::new()?;
    let rate = runtime.block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT {
            let g = g.clone();
            let next = next.clone();
            tasks.spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < CONCURRENT_TOTAL {
                    let _: i64 = g.call("add").args((1, 2)).fg_async().await?;
                }
                Ok::<(), daffi::Error>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| e.to_string())??;
        }
        Ok::<f64, Error>(CONCURRENT_TOTAL as f64 / started.elapsed().as_secs_f64())
    })?;
    println!("{CONCURRENT_TOTAL} calls with {IN_FLIGHT} in flight: {rate:.0} calls/s");

    g.stop();
    drop(callee.stdin.take());
    callee.wait()?;
    if let Some(mut controller) = controller {
        drop(controller.stdin.take());
        controller.wait()?;
    }
    Ok(())
}

/// A standalone controller in a child process, and this caller connected to it.
fn start_beside_controller(unix: bool) -> Result<(Global, String, Option<Child>), Error> {
    let (mut controller, endpoint) = if unix {
        let mut c = spawn(&["--controller", &unix_endpoint()])?;
        read_line(&mut c)?;
        (c, unix_endpoint())
    } else {
        let mut c = spawn(&["--controller", "tcp:0"])?;
        let port = read_line(&mut c)?;
        (c, format!("tcp:{port}"))
    };
    match builder(&endpoint)?.process_name("caller").start() {
        Ok(g) => Ok((g, endpoint, Some(controller))),
        Err(e) => {
            let _ = controller.kill();
            Err(e.into())
        }
    }
}

/// This caller running the controller, which the callee connects to.
fn start_with_controller(unix: bool) -> Result<(Global, String, Option<Child>), Error> {
    let endpoint = if unix {
        unix_endpoint()
    } else {
        "tcp:0".to_string()
    };
    let g = builder(&endpoint)?
        .process_name("caller")
        .init_controller(true)
        .start()?;
    let endpoint = match g.port() {
        Some(port) => format!("tcp:{port}"),
        None => endpoint,
    };
    Ok((g, endpoint, None))
}

fn unix_endpoint() -> String {
    let path = std::env::temp_dir().join(format!("daffi-roundtrip-{}.sock", std::process::id()));
    format!("unix:{}", path.display())
}

fn read_line(child: &mut Child) -> Result<String, Error> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok(line.trim().to_string())
}
