//! A quick measurement of call latency and throughput (the full benchmark is `daffi bench`).
//!
//! ```text
//! cargo run --release --example roundtrip            # TCP
//! cargo run --release --example roundtrip -- unix    # Unix socket
//! ```
//!
//! Three processes, as in production: a standalone controller, a callee serving `add`,
//! and this caller. It reports the round trip of one small FG call at a time
//! (p50/p99/mean over 10,000 calls) and calls per second with 256 in flight.

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
        other => run_caller(other == Some("unix")),
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

fn run_caller(unix: bool) -> Result<(), Error> {
    let (mut controller, endpoint) = if unix {
        let path =
            std::env::temp_dir().join(format!("daffi-roundtrip-{}.sock", std::process::id()));
        let endpoint = format!("unix:{}", path.display());
        let mut c = spawn(&["--controller", &endpoint])?;
        read_line(&mut c)?;
        (c, endpoint)
    } else {
        let mut c = spawn(&["--controller", "tcp:0"])?;
        let port = read_line(&mut c)?;
        (c, format!("tcp:{port}"))
    };
    let mut callee = spawn(&["--callee", &endpoint])?;

    let g = builder(&endpoint)?.process_name("caller").start()?;
    g.wait_process_timeout("callee", Duration::from_secs(20))?;
    println!("transport: {}", if unix { "unix socket" } else { "tcp" });

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
    drop(controller.stdin.take());
    callee.wait()?;
    controller.wait()?;
    Ok(())
}

fn read_line(child: &mut Child) -> Result<String, Error> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok(line.trim().to_string())
}
