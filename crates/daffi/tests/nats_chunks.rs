//! Payloads larger than NATS's `max_payload`, split and joined, over real nats-server
//! processes: workers are child processes (this binary in a role), the caller is this
//! process.
//!
//! Run with `cargo test -p daffi --features nats --test nats_chunks`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::nats::{NatsCluster, NatsServer};
use common::{run_role, spawn_role_child, unique, Worker, ENV_NAME, WAIT};
use daffi::{callback, Error, Global};

/// The name of the ignored test that runs the roles below.
const ENTRY: &str = "nats_chunks_role";
/// Environment of a child: the servers, and the namespace of its mesh.
const ENV_NATS: &str = "DAFFI_TEST_NATS";
const ENV_NAMESPACE: &str = "DAFFI_TEST_NAMESPACE";
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
fn a_callee_killed_mid_transfer_fails_the_call_with_its_named_error() {
    // Small messages (32 KiB), so that the 64 MiB result takes thousands of chunks:
    // the transfer is still going when the callee is killed.
    let config = std::env::temp_dir().join(format!("{}.conf", unique("nats-small-payload")));
    std::fs::write(&config, "max_payload: 32768\n").expect("write the server config");
    let server = NatsServer::start_with(&["-c", config.to_str().expect("utf-8 path")]);
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

    // Then the callee is killed once it serves the chunks of its result: once a new
    // subject (where the caller fetches them) is subscribed to.
    let before = server.subscriptions();
    let call = caller
        .call("large_result")
        .args((LARGE,))
        .timeout(WAIT)
        .bg::<Bytes>()
        .expect("sent");
    let serving = Instant::now();
    let offered = loop {
        let new = server
            .subscriptions()
            .into_iter()
            .find(|s| s.starts_with("_INBOX.") && !s.ends_with('*') && !before.contains(s));
        if let Some(subject) = new {
            break subject;
        }
        assert!(serving.elapsed() < WAIT, "the result was never offered");
    };
    worker.kill();
    let killed = Instant::now();
    let outcome = call.get();
    eprintln!(
        "killed once {offered} was served; the call failed {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        matches!(&outcome, Err(Error::PeerDisconnected { process, callback }) if process == "w1" && callback == "large_result"),
        "{outcome:?}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "the call failed at once, not at its timeout or when the membership entry expired"
    );
    caller.stop();
    let _ = std::fs::remove_file(config);
}
