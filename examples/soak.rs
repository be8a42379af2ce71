//! Soak test: many calls of every mode while nodes and the controller are killed and
//! restarted at random. At the end it prints how every call ended and checks that no
//! call is unaccounted for.
//!
//! ```text
//! cargo run --release --example soak -- --nodes 4 --calls 200000
//! ```
//!
//! Processes: a standalone controller and `--nodes` workers (this same program, started
//! in another role), and the caller (this process) running FG, BG, NO_RETURN and
//! BROADCAST calls from several threads. A chaos thread kills a random worker, or the
//! controller, every few hundred milliseconds and starts it again. Every call has a
//! timeout, so none can hang. Exits non-zero if the outcomes do not add up to the
//! calls made, or if any call ended in an error that a fault does not explain.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daffi::{callback, Error, Global};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CALLER_THREADS: usize = 4;

#[callback]
fn soak_echo(x: u64) -> u64 {
    x
}

#[callback]
async fn soak_async(x: u64) -> u64 {
    x + 1
}

#[callback]
fn soak_sink(_x: u64) {}

struct Options {
    nodes: usize,
    calls: usize,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--role") {
        return run_role(&args[1], &args[2], args.get(3).map(String::as_str));
    }
    let mut options = Options {
        nodes: 4,
        calls: 50_000,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse().ok());
        match (flag.as_str(), value) {
            ("--nodes", Some(v)) => options.nodes = v,
            ("--calls", Some(v)) => options.calls = v,
            _ => {
                eprintln!("usage: soak [--nodes N] [--calls M]");
                return ExitCode::from(2);
            }
        }
    }
    match run(options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A child process: `controller` or `worker NAME`, until its stdin closes.
fn run_role(role: &str, socket: &str, name: Option<&str>) -> ExitCode {
    let b = Global::builder()
        .unix_sock_path(socket)
        .connect_timeout(Duration::from_secs(30));
    let started = match (role, name) {
        ("controller", _) => b.init_controller(true).init_node(false).start(),
        ("worker", Some(name)) => b.process_name(name).start(),
        _ => return ExitCode::from(2),
    };
    let Ok(_g) = started else {
        return ExitCode::FAILURE;
    };
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    ExitCode::SUCCESS
}

/// A child process that is killed on drop.
struct Proc {
    args: Vec<String>,
    child: Option<Child>,
}

impl Proc {
    fn start(args: Vec<String>) -> std::io::Result<Proc> {
        let mut p = Proc { args, child: None };
        p.restart()?;
        Ok(p)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.child = Some(
            Command::new(std::env::current_exe()?)
                .args(&self.args)
                .stdin(Stdio::piped())
                .spawn()?,
        );
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Outcomes by mode and by how each call ended.
type Tally = BTreeMap<(&'static str, String), usize>;

fn outcome_name<T>(r: &daffi::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => {
            let debug = format!("{e:?}");
            debug
                .split([' ', '(', '{'])
                .next()
                .unwrap_or("?")
                .to_string()
        }
    }
}

/// Errors a killed node or controller explains. Anything else is a bug.
fn explained(outcome: &str) -> bool {
    matches!(
        outcome,
        "ok" | "ControllerUnreachable"
            | "PeerDisconnected"
            | "PeerStopped"
            | "NoProvider"
            | "UnknownProcess"
            | "Broadcast"
            | "Timeout"
            | "Overloaded"
    )
}

fn run(options: Options) -> Result<bool, Box<dyn std::error::Error>> {
    let socket: PathBuf =
        std::env::temp_dir().join(format!("daffi-soak-{}.sock", std::process::id()));
    let socket_arg = socket.display().to_string();
    let role = |r: &str, name: Option<&str>| {
        let mut a = vec!["--role".to_string(), r.to_string(), socket_arg.clone()];
        a.extend(name.map(str::to_string));
        a
    };
    let controller = Arc::new(Mutex::new(Proc::start(role("controller", None))?));
    let workers: Arc<Vec<Mutex<Proc>>> = Arc::new(
        (0..options.nodes)
            .map(|i| Proc::start(role("worker", Some(&format!("worker{i}")))).map(Mutex::new))
            .collect::<std::io::Result<_>>()?,
    );

    let g = Global::builder()
        .process_name("soak-caller")
        .unix_sock_path(&socket)
        .connect_timeout(Duration::from_secs(30))
        .start()?;
    for i in 0..options.nodes {
        g.wait_process_timeout(&format!("worker{i}"), Duration::from_secs(30))?;
    }
    println!(
        "soak: {} calls over {} workers, {CALLER_THREADS} caller threads; killing and restarting nodes and the controller at random",
        options.calls, options.nodes
    );

    let done = Arc::new(AtomicBool::new(false));
    let chaos_events = Arc::new(Mutex::new(BTreeMap::<&'static str, usize>::new()));
    let chaos = {
        let (done, controller, workers, events) = (
            done.clone(),
            controller.clone(),
            workers.clone(),
            chaos_events.clone(),
        );
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(fastrand::u64(200..800)));
                let which = fastrand::usize(..=workers.len());
                let (label, result) = if which == workers.len() {
                    (
                        "controller restarts",
                        controller.lock().map(|mut c| c.restart()),
                    )
                } else {
                    (
                        "worker restarts",
                        workers[which].lock().map(|mut w| w.restart()),
                    )
                };
                if matches!(result, Ok(Ok(()))) {
                    *events.lock().expect("lock").entry(label).or_default() += 1;
                }
            }
        })
    };

    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::new()));
    let started = Instant::now();
    let callers: Vec<_> = (0..CALLER_THREADS)
        .map(|_| {
            let (g, next, tally, total) = (g.clone(), next.clone(), tally.clone(), options.calls);
            std::thread::spawn(move || {
                let mut local = Tally::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    let x = n as u64;
                    let (mode, outcome) = match n % 4 {
                        0 => (
                            "fg",
                            outcome_name(
                                &g.call("soak_echo")
                                    .args((x,))
                                    .timeout(CALL_TIMEOUT)
                                    .fg::<u64>()
                                    .and_then(|v| {
                                        if v == x {
                                            Ok(v)
                                        } else {
                                            Err(Error::Config(format!("wrong result {v}")))
                                        }
                                    }),
                            ),
                        ),
                        1 => (
                            "bg",
                            outcome_name(
                                &g.call("soak_async")
                                    .args((x,))
                                    .timeout(CALL_TIMEOUT)
                                    .bg::<u64>()
                                    .and_then(|r| r.get())
                                    .and_then(|v| {
                                        if v == x + 1 {
                                            Ok(v)
                                        } else {
                                            Err(Error::Config(format!("wrong result {v}")))
                                        }
                                    }),
                            ),
                        ),
                        2 => (
                            "no_return",
                            outcome_name(&g.call("soak_sink").args((x,)).no_return()),
                        ),
                        _ => (
                            "broadcast",
                            outcome_name(
                                &g.call("soak_echo")
                                    .args((x,))
                                    .timeout(CALL_TIMEOUT)
                                    .broadcast::<u64>(),
                            ),
                        ),
                    };
                    if outcome != "ok" {
                        // A failure during an outage comes back at once; do not spin.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    *local.entry((mode, outcome)).or_default() += 1;
                }
                let mut all = tally.lock().expect("lock");
                for (k, v) in local {
                    *all.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    // Progress, so that a long run shows it is alive.
    let progress = {
        let (next, done, total) = (next.clone(), done.clone(), options.calls);
        std::thread::spawn(move || {
            let mut last = Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= Duration::from_secs(10) {
                    last = Instant::now();
                    let made = next.load(Ordering::Relaxed).min(total);
                    println!("soak: {made} of {total} calls made");
                }
            }
        })
    };
    for c in callers {
        c.join().map_err(|_| "a caller thread panicked")?;
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    chaos.join().map_err(|_| "the chaos thread panicked")?;
    progress
        .join()
        .map_err(|_| "the progress thread panicked")?;
    g.stop();

    let tally = tally.lock().expect("lock");
    let accounted: usize = tally.values().sum();
    let mut by_outcome = BTreeMap::<&str, usize>::new();
    println!("\n{:<10} {:<24} {:>10}", "mode", "outcome", "calls");
    for ((mode, outcome), n) in tally.iter() {
        println!("{mode:<10} {outcome:<24} {n:>10}");
        *by_outcome.entry(outcome.as_str()).or_default() += n;
    }
    println!("\nby outcome:");
    for (outcome, n) in &by_outcome {
        println!("  {outcome:<24} {n:>10}");
    }
    println!("faults injected: {:?}", chaos_events.lock().expect("lock"));
    println!(
        "calls made {}, accounted for {accounted} ({} ok), in {:.1} s",
        options.calls,
        by_outcome.get("ok").copied().unwrap_or(0),
        elapsed.as_secs_f64()
    );
    let unexplained: Vec<_> = by_outcome.keys().filter(|o| !explained(o)).collect();
    let balanced = accounted == options.calls;
    if !balanced {
        println!(
            "FAIL: {} calls are unaccounted for",
            options.calls as i64 - accounted as i64
        );
    }
    if !unexplained.is_empty() {
        println!("FAIL: outcomes no fault explains: {unexplained:?}");
    }
    if balanced && unexplained.is_empty() {
        println!("PASS: every call ended in a result or a named error");
    }
    Ok(balanced && unexplained.is_empty())
}
