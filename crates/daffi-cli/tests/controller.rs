//! `daffi controller` as a separate process, with nodes in the test process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use daffi::Global;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `daffi controller` on a free TCP port and returns it with the port.
fn start_controller() -> (KillOnDrop, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_daffi"))
        .args([
            "controller",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn daffi controller");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    (KillOnDrop(child), port)
}

#[test]
fn nodes_call_each_other_through_a_standalone_controller() {
    let (_controller, port) = start_controller();
    let node = |name: &str| {
        Global::builder()
            .process_name(name)
            .host("127.0.0.1")
            .port(port)
            .start()
            .expect("node connects")
    };
    let server = node("server");
    server.register("double", |x: i64| x * 2).expect("register");
    let client = node("client");
    client
        .wait_function_timeout("double", Duration::from_secs(20))
        .expect("double is announced");
    let doubled: i64 = client.call("double").args((21,)).fg().expect("call");
    assert_eq!(doubled, 42);
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
    let out = Command::new(env!("CARGO_BIN_EXE_daffi"))
        .args(["controller", "--unix-socket"])
        .arg(&sock)
        .output()
        .expect("run daffi controller");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already listens"), "{stderr}");

    // The first controller still serves, on the same socket file.
    let node = |name: &str| {
        Global::builder()
            .process_name(name)
            .unix_sock_path(&sock)
            .connect_timeout(Duration::from_secs(20))
            .start()
            .expect("node connects to the first controller")
    };
    let server = node("busy-server");
    server.register("triple", |x: i64| x * 3).expect("register");
    let client = node("busy-client");
    client
        .wait_function_timeout("triple", Duration::from_secs(20))
        .expect("triple is announced");
    let tripled: i64 = client.call("triple").args((14,)).fg().expect("call");
    assert_eq!(tripled, 42);
    first.stop();
}
