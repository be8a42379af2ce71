//! `daffi controller` as a separate process, with nodes in the test process.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Instant;

use common::{
    daffi, daffi_command, start_controller_logging, stderr, tcp_controller, tcp_endpoint, Endpoint,
    WAIT,
};
use daffi::Global;

/// Two nodes at `endpoint` call each other; `n` names them apart.
fn nodes_call_each_other(endpoint: &Endpoint, n: i64) {
    let server = endpoint.node(&format!("server-{n}"));
    server
        .register("times", move |x: i64| x * n)
        .expect("register");
    let client = endpoint.node(&format!("client-{n}"));
    client
        .wait_function_timeout("times", WAIT)
        .expect("times is announced");
    let product: i64 = client.call("times").args((21,)).fg().expect("call");
    assert_eq!(product, 21 * n);
}

#[test]
fn nodes_call_each_other_through_a_standalone_controller() {
    let (_controller, endpoint) = tcp_controller();
    nodes_call_each_other(&endpoint, 2);
}

#[test]
fn controller_refuses_a_busy_unix_socket_and_the_first_keeps_serving() {
    let dir = std::env::temp_dir().join(format!("daffi-cli-test-{}", std::process::id()));
    let sock = dir.join("busy.sock");
    let first = Global::builder()
        .unix_sock_path(&sock)
        .init_controller(true)
        .init_node(false)
        .start()
        .expect("first controller");
    let out = daffi_command()
        .args(["controller", "--unix-socket"])
        .arg(&sock)
        .output()
        .expect("run daffi controller");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already listens"), "{stderr}");

    // The first controller still serves, on the same socket file.
    nodes_call_each_other(&Endpoint::Unix(sock), 3);
    first.stop();
}

/// The next line from `lines` that has every one of `words`, within [`WAIT`].
fn next_line_with(lines: &mpsc::Receiver<String>, words: &[&str]) -> String {
    let end = Instant::now() + WAIT;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if words.iter().all(|w| line.contains(w)) => return line,
            Ok(_) => {}
            Err(e) => panic!("no controller log line with {words:?} ({e})"),
        }
    }
}

#[test]
fn command_nodes_join_and_leave_at_debug_and_other_nodes_at_info() {
    let listen = ["--host", "127.0.0.1", "--port", "0"];
    let (mut controller, listening) = start_controller_logging(&listen, "debug", Stdio::piped());
    let endpoint = tcp_endpoint(&listening);
    let log = controller.0.stderr.take().expect("piped stderr");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let out = daffi(&endpoint, &["ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let joined = next_line_with(&lines, &["node joined", "process=daffi-cli-"]);
    assert!(joined.contains("DEBUG"), "{joined}");
    let left = next_line_with(&lines, &["node left", "process=daffi-cli-"]);
    assert!(left.contains("DEBUG"), "{left}");

    let worker = endpoint.node("daffi-cli-worker");
    let joined = next_line_with(&lines, &["node joined", "process=daffi-cli-worker"]);
    assert!(joined.contains("INFO"), "{joined}");
    worker.stop();
    worker.join().expect("join");
    let left = next_line_with(&lines, &["node left", "process=daffi-cli-worker"]);
    assert!(left.contains("INFO"), "{left}");
}
