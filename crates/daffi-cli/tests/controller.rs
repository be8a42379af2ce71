//! `daffi controller` as a separate process, with nodes in the test process.

mod common;

use common::{daffi_command, tcp_controller, Endpoint, WAIT};
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
