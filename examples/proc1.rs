//! Process 1 of the Python daffi's "Getting started": sync, runs the controller, serves
//! `func3` and calls `func1` (FG) and `func2` (NO_RETURN) on process 2.
//!
//! Run it beside `proc2` in two terminals. Start `proc1` first, or start it within
//! `connect_timeout` (10 s by default) of `proc2`: that is how long `proc2` keeps
//! trying to reach the controller `proc1` runs before it gives up.
//!
//! ```text
//! cargo run --example proc1
//! cargo run --example proc2
//! ```

use std::thread;
use std::time::Duration;

use daffi::{callback, Global};

/// Adds 2 numbers and returns the sum.
#[callback]
fn func3(a: i64, b: i64) -> i64 {
    // Simulate a long-running job.
    thread::sleep(Duration::from_secs(3));
    a + b
}

/// Executes remote callbacks.
fn remote_process_executor(g: &Global) -> daffi::Result<()> {
    for _ in 0..10 {
        let delta: i64 = g.call("func1").args((10, 3)).fg()?;
        println!("Calculated delta = {delta}");

        g.call("func2").no_return()?;

        thread::sleep(Duration::from_secs(5));
    }
    Ok(())
}

fn main() -> daffi::Result<()> {
    let process_name = "proc1";

    let g = Global::builder()
        .process_name(process_name)
        .init_controller(true)
        .host("localhost")
        .port(8888)
        .start()?;

    g.wait_process("proc2")?;

    let worker = g.clone();
    let re = thread::spawn(move || remote_process_executor(&worker));
    re.join().expect("the executor thread panicked")?;

    g.stop();
    Ok(())
}
