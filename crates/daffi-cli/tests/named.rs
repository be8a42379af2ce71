//! `daffi call --named`: arguments by parameter name, which `#[callback]` functions accept.
//! (A separate test binary, so that this callback is not served by the nodes of `cli.rs`.)

mod common;

use common::{daffi, stderr, stdout, tcp_controller, WAIT};
use daffi::callback;

/// Served by every node of this test binary.
#[callback]
fn introduce(name: String, age: u32) -> String {
    format!("{name} is {age}")
}

#[test]
fn named_arguments_reach_a_callback_by_parameter_name() {
    let (_controller, endpoint) = tcp_controller();
    let server = endpoint.node("server");
    let observer = endpoint.node("observer");
    observer
        .wait_process_timeout(server.process_name(), WAIT)
        .expect("server joins");

    let call = |args: &[&str]| {
        let mut full = vec!["call", "introduce", "--on", "server"];
        full.extend_from_slice(args);
        daffi(&endpoint, &full)
    };
    let out = call(&["--named", r#"{"age": 3, "name": "Ann"}"#]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), r#""Ann is 3""#);

    let out = call(&["\"Bob\"", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), r#""Bob is 4""#);

    for bad in [&["--named", "[1, 2]"][..], &["--named", "{}", "{}"][..]] {
        let out = call(bad);
        assert_eq!(out.status.code(), Some(7), "{bad:?}: {}", stderr(&out));
    }
    let out = call(&["--named", r#"{"name": "Ann"}"#]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(stderr(&out).contains("age"), "{}", stderr(&out));
}
