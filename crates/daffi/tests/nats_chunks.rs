//! Payloads larger than NATS's `max_payload`, split and joined, over real nats-server
//! processes: workers are child processes (this binary in a role), the caller is this
//! process.
//!
//! Run with `cargo test -p daffi --features nats --test nats_chunks`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::nats::{json_strings, NatsCluster, NatsServer, ENV_NAMESPACE, ENV_NATS};
use common::{run_role, spawn_role_child, unique, Worker, ENV_NAME, WAIT};
use daffi::{callback, Error, Global};

/// The name of the ignored test that runs the roles below.
const ENTRY: &str = "nats_chunks_role";
/// The size of the large payloads: 64 times NATS's default `max_payload`.
const LARGE: usize = 64 << 20;

/// `len` bytes that differ with `seed` and along the payload.
fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 16) as u8 ^ seed)
        .collect()
}

/// The argument, reversed: a large argument and a large result of a different value.
#[callback]
fn reverse(data: Bytes) -> Bytes {
    data.iter().rev().copied().collect()
}

/// A `len`-byte result.
#[callback]
fn large_result(len: usize) -> Bytes {
    pattern(len, 1)
}

/// A worker: serves the callbacks above until killed.
fn worker_role() {
    let g = Global::builder()
        .nats(std::env::var(ENV_NATS).expect("servers"))
        .namespace(std::env::var(ENV_NAMESPACE).expect("namespace"))
        .process_name(std::env::var(ENV_NAME).expect("name"))
        .connect_timeout(WAIT)
        .start()
        .expect("worker starts");
    g.join().expect("join");
}

#[test]
#[ignore = "a child role started by the other tests"]
fn nats_chunks_role() {
    run_role(&[("worker", worker_role)]);
}

/// A caller on `caller_urls` and a worker `w1` on `worker_urls`, in a new namespace.
fn caller_and_worker(caller_urls: &str, worker_urls: &str) -> (Global, Worker) {
    let namespace = unique("ns").replace('-', "_");
    let caller = Global::builder()
        .nats(caller_urls)
        .namespace(&namespace)
        .process_name(unique("caller"))
        .connect_timeout(WAIT)
        .start()
        .expect("caller starts");
    let worker = spawn_role_child(
        ENTRY,
        "worker",
        "w1",
        &[(ENV_NATS, worker_urls), (ENV_NAMESPACE, &namespace)],
    );
    caller
        .wait_process_timeout("w1", WAIT)
        .expect("worker joins");
    (caller, worker)
}

/// Calls `reverse` on a 64 MiB argument; checks the 64 MiB result byte for byte.
fn reverse_large(caller: &Global) {
    let data = pattern(LARGE, 7);
    let started = Instant::now();
    let reversed: Bytes = caller
        .call("reverse")
        .args((data.clone(),))
        .timeout(WAIT)
        .fg()
        .expect("64 MiB there and back");
    eprintln!("64 MiB argument and result: {:?}", started.elapsed());
    assert_eq!(reversed.len(), LARGE);
    assert!(
        reversed.iter().eq(data.iter().rev()),
        "the result is the argument reversed"
    );
}

/// The subjects the clients of `server` subscribe to now.
fn subscriptions(server: &NatsServer) -> Vec<String> {
    let connections = server.connections();
    json_strings(&connections, "subscriptions_list")
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// How many messages `server` delivered to the client that subscribes to `subject`.
fn delivered_to(server: &NatsServer, subject: &str) -> u64 {
    let connections = server.connections();
    let quoted = format!("\"{subject}\"");
    let connection = connections
        .split("\"cid\":")
        .find(|c| c.contains(&quoted))
        .unwrap_or_else(|| panic!("no client subscribes to {subject}"));
    let field = "\"out_msgs\":";
    let count = &connection[connection.find(field).expect("out_msgs") + field.len()..];
    count
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count")
}

/// Waits until `server` delivered `count` messages to the client that subscribes to
/// `subject`.
fn wait_delivered(server: &NatsServer, subject: &str, count: u64) {
    let started = Instant::now();
    while delivered_to(server, subject) < count {
        assert!(
            started.elapsed() < WAIT,
            "{subject} never got {count} messages"
        );
    }
}

/// A nats-server whose messages carry at most 32 KiB, so that a 64 MiB payload takes
/// thousands of chunks (and a transfer is long enough to kill a peer in the middle).
fn small_payload_server() -> (NatsServer, std::path::PathBuf) {
    let config = std::env::temp_dir().join(format!("{}.conf", unique("nats-small-payload")));
    std::fs::write(&config, "max_payload: 32768\n").expect("write the server config");
    let server = NatsServer::start_with(&["-c", config.to_str().expect("utf-8 path")]);
    (server, config)
}

/// Waits for `call` to fail after the callee `w1` was killed, within the bound.
fn assert_failed_at_once<T: std::fmt::Debug>(
    outcome: Result<T, Error>,
    callback: &str,
    killed: Instant,
) {
    eprintln!(
        "the call to {callback} failed {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        matches!(&outcome, Err(Error::PeerDisconnected { process, callback: c }) if process == "w1" && c == callback),
        "{outcome:?}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "the call failed at once, not at its timeout or when the membership entry expired"
    );
}

#[test]
fn a_64_mib_argument_and_result_over_one_server() {
    let server = NatsServer::start();
    let (caller, mut worker) = caller_and_worker(&server.url(), &server.url());
    reverse_large(&caller);
    caller.stop();
    worker.kill();
}

#[test]
fn a_64_mib_argument_and_result_across_a_cluster() {
    let cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    // The caller and the worker on different servers: every chunk crosses a route.
    let (caller, mut worker) = caller_and_worker(&urls[2], &urls[0]);
    reverse_large(&caller);
    caller.stop();
    worker.kill();
}

#[test]
fn a_callee_killed_while_serving_its_result_fails_the_call_at_once() {
    let (server, config) = small_payload_server();
    let (caller, mut worker) = caller_and_worker(&server.url(), &server.url());

    // Whole, first: thousands of chunks.
    let started = Instant::now();
    let whole: Bytes = caller
        .call("large_result")
        .args((LARGE,))
        .timeout(WAIT)
        .fg()
        .expect("64 MiB in 32 KiB messages");
    eprintln!("64 MiB result in 32 KiB messages: {:?}", started.elapsed());
    assert_eq!(whole, pattern(LARGE, 1));

    // Then the callee is killed once it served 64 chunks of its result (the caller
    // asks for them on a new subject the callee subscribes to).
    let before = subscriptions(&server);
    let call = caller
        .call("large_result")
        .args((LARGE,))
        .timeout(WAIT)
        .bg::<Bytes>()
        .expect("sent");
    let serving = Instant::now();
    let offered = loop {
        let new = subscriptions(&server)
            .into_iter()
            .find(|s| s.starts_with("_INBOX.") && !s.ends_with('*') && !before.contains(s));
        if let Some(subject) = new {
            break subject;
        }
        assert!(serving.elapsed() < WAIT, "the result was never offered");
    };
    let delivered = delivered_to(&server, &offered);
    wait_delivered(&server, &offered, delivered + 64);
    worker.kill();
    let killed = Instant::now();
    eprintln!("killed once {offered} was served");
    assert_failed_at_once(call.get(), "large_result", killed);
    caller.stop();
    let _ = std::fs::remove_file(config);
}

#[test]
fn a_callee_killed_while_taking_the_arguments_fails_the_call_at_once() {
    let (server, config) = small_payload_server();
    let (caller, mut worker) = caller_and_worker(&server.url(), &server.url());
    let data = pattern(LARGE, 3);
    let node_subject = subscriptions(&server)
        .into_iter()
        .find(|s| s.ends_with(".node.w1.*"))
        .expect("w1 subscribes to its subject");
    let delivered = delivered_to(&server, &node_subject);
    let call = std::thread::spawn({
        let caller = caller.clone();
        move || {
            caller
                .call("reverse")
                .args((data,))
                .timeout(WAIT)
                .fg::<Bytes>()
        }
    });
    // Killed once it took 64 of the 2 000-odd chunks.
    wait_delivered(&server, &node_subject, delivered + 64);
    worker.kill();
    let killed = Instant::now();
    assert_failed_at_once(call.join().expect("the call returns"), "reverse", killed);
    caller.stop();
    let _ = std::fs::remove_file(config);
}
