//! `daffi-bench --quick` runs every scenario and prints a line for each. The figures
//! themselves are never checked here: speed is measured by the benchmark, not asserted
//! in tests.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A quick run takes seconds; this only keeps a broken run from hanging the suite.
const LIMIT: Duration = Duration::from_secs(240);

fn run_quick(extra: &[&str]) -> (bool, String, String) {
    run_quick_with(extra, &[])
}

/// `run_quick`, with `env` set for the bench and the processes it starts.
fn run_quick_with(extra: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_daffi-bench"))
        .envs(env.iter().copied())
        .arg("--quick")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start daffi-bench");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let out = match rx.recv_timeout(LIMIT) {
        Ok(out) => out,
        Err(_) => {
            let _ = child.kill();
            panic!("daffi-bench --quick did not finish within {LIMIT:?}");
        }
    };
    let status = child.wait().expect("wait for daffi-bench");
    let err = err_reader.join().unwrap_or_default();
    (status.success(), out, err)
}

#[test]
fn quick_bench_prints_every_scenario() {
    let (ok, out, err) = run_quick(&[]);
    assert!(
        ok,
        "daffi-bench --quick failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    let lines: Vec<&str> = out.lines().collect();
    let has = |scenario: &str, words: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(scenario) && l.contains(words))
    };
    for (scenario, words) in [
        ("A ", "unix FG round trip p50"),
        ("A ", "unix FG round trip p99 "),
        ("A ", "unix FG round trip p99.9"),
        ("A ", "tcp FG round trip p50"),
        ("A ", "tcp FG round trip p99 "),
        ("A ", "unix fg_async round trip p50"),
        ("A ", "unix bg + .await round trip p99 "),
        ("A ", "tcp fg_async round trip p50"),
        ("A ", "floor tokio batched: unix round trip p50"),
        ("A ", "floor tokio direct: tcp round trip p50"),
        ("A ", "floor threads batched: unix round trip p50"),
        ("A ", "floor threads direct: tcp round trip p50"),
        ("B ", "BG + get() 256 in flight"),
        ("B ", "fg_async tasks, 256 in flight"),
        ("B ", "bg + .await, 256 in flight"),
        ("B ", "NO_RETURN, counted at callee"),
        ("B ", "floor tokio batched: unix one-way"),
        ("B ", "floor threads batched: unix 256 in flight"),
        ("B ", "floor threads direct: unix one-way"),
        ("C ", "MiB argument"),
        ("C ", "peak RSS of the caller"),
        ("C ", "peak RSS of the controller"),
        ("C ", "peak RSS of the callee"),
        ("C ", "MiB Blob echo"),
        ("C ", "MiB Vec<u8> echo"),
        ("C ", "MiB ByteBuf echo"),
        ("C ", "MiB Bytes echo"),
        ("C ", "MiB Blob result"),
        ("C ", "MiB Vec<u8> result"),
        ("C ", "MiB ByteBuf result"),
        ("C ", "MiB Bytes result"),
        ("C ", "MiB &'static [u8] result"),
        ("D ", "broadcast to 4, p50"),
        ("D ", "broadcast to 4, p99"),
        ("E ", "connect 30 nodes"),
        ("E ", "controller peak RSS"),
        ("E ", "idle node RSS"),
        ("E ", "FG round trip p50, 30 nodes"),
    ] {
        assert!(
            has(scenario, words),
            "no `{scenario}... {words}` line in:\n{out}"
        );
    }
    assert!(out.contains("targets met:"), "{out}");
}

#[test]
fn quick_bench_speaks_json() {
    let (ok, out, err) = run_quick(&["--json", "--only", "a", "--reps", "1"]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    for key in [
        "\"rows\"",
        "\"scenario\": \"A\"",
        "\"reference\"",
        "\"met\"",
    ] {
        assert!(out.contains(key), "no {key} in:\n{out}");
    }
}

/// The threads floor's client with its replies read by a second thread (a profiling
/// aid, see BENCHMARKS.md): A's round trips all come back, over both sockets.
#[test]
fn the_floor_client_with_a_reader_thread_makes_its_round_trips() {
    let (ok, out, err) = run_quick_with(
        &["--only", "a", "--reps", "1"],
        &[("DAFFI_FLOOR_READER_THREAD", "1")],
    );
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    for row in [
        "floor threads direct: unix round trip p50",
        "floor threads spin: unix round trip p50",
        "floor threads direct: tcp round trip p50",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("A ") && l.contains(row)),
            "no `A ... {row}` line in:\n{out}"
        );
    }
}
