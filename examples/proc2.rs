//! Process 2 of the Python daffi's "Getting started": async, serves `func1` and `func2`,
//! and calls `func3` on process 1 in the background (BG). It exits when `proc1` has gone
//! (`proc1` runs the controller, so nothing is left to talk to).
//!
//! Start it after `proc1`, or at most `connect_timeout` (10 s by default) before it.
//!
//! ```text
//! cargo run --example proc1
//! cargo run --example proc2
//! ```

use std::time::Duration;

use daffi::{callback, Global};

/// Subtracts 2 numbers and returns the delta.
#[callback]
async fn func1(a: i64, b: i64) -> i64 {
    a - b
}

/// Just prints text to the console.
#[callback]
fn func2() {
    println!("Func2 has been triggered!");
}

/// Executes remote callbacks.
async fn remote_process_executor(g: Global) -> daffi::Result<()> {
    for _ in 0..5 {
        let future = g.call("func3").args((4, 6)).bg::<i64>()?;

        // Do something while the result is being computed.
        tokio::time::sleep(Duration::from_secs(2)).await;

        // Get the result.
        let result = future.get_async().await?;
        println!("Calculated sum is {result}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> daffi::Result<()> {
    let process_name = "proc2";

    let g = Global::builder()
        .process_name(process_name)
        .host("localhost")
        .port(8888)
        .on_member_removed(|g, name| {
            if name == "proc1" {
                g.stop();
            }
        })
        .start_async()
        .await?;
    let executor = g.clone();
    tokio::spawn(async move {
        if let Err(e) = remote_process_executor(executor).await {
            eprintln!("proc2: {e}");
        }
    });

    // Wait until proc1 has gone (the hook above stops this node) or Ctrl-C.
    g.join_async().await;
    Ok(())
}
