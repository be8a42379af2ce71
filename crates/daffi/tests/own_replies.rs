//! A thread that spins for the reply to its lone call reads the reply from the socket
//! itself, and the runtime is not woken for the socket meanwhile. Whatever else comes
//! on the connection then must still reach the node at once: a request for it, a reply
//! too large to take that way, the end of the connection. Each test spins for far
//! longer than the calls' timeouts, so a socket left muted would fail the call (it
//! would time out) instead of only slowing it. Real processes over real sockets.

mod common;

use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::Duration;

use common::{Cluster, StandaloneController, Transport, WAIT};
use daffi::{Error, Global};

const ENTRY: &str = "own_replies_process";

/// Longer than any call here may take: a spin that never ended would outlast them.
const LONG_SPIN: Duration = Duration::from_secs(60);

/// One test at a time: a process lets one thread per two processors spin, and the
/// tests of this binary share one process. Each must spin to test anything.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
#[ignore = "helper: tests start it as a child process"]
fn own_replies_process() {
    common::run_role(&[
        ("worker", worker),
        ("controller", common::run_controller_role),
    ]);
}

/// Serves `bounce(caller, n)`, which calls `echo(n)` back on `caller` before it
/// answers `n + 1`; `bytes(n)`, which answers `n` bytes; and `hold(told, ms)`, which
/// tells the node `told` it started (`started()`, no reply) and answers after `ms`.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    let back = g.clone();
    g.register("bounce", move |caller: String, n: u64| {
        let echoed: u64 = back
            .call("echo")
            .on(&caller)
            .args((n,))
            .timeout(WAIT)
            .fg()
            .expect("the caller answers while it waits");
        echoed + 1
    })
    .expect("register bounce");
    g.register("bytes", |n: usize| vec![7u8; n])
        .expect("register bytes");
    let back = g.clone();
    g.register("hold", move |told: String, ms: u64| {
        back.call("started")
            .on(&told)
            .no_return()
            .expect("tell the caller");
        std::thread::sleep(Duration::from_millis(ms));
        ms
    })
    .expect("register hold");
    g.join().expect("join");
}

/// A node on `address` whose lone calls spin for [`LONG_SPIN`], serving `echo`.
fn spinning_node(address: &daffi::Address) -> Global {
    let g = common::builder_for(address)
        .process_name(common::unique("spinner"))
        .sync_spin(LONG_SPIN)
        .start()
        .expect("the spinning node connects");
    g.register("echo", |n: u64| n).expect("register echo");
    g
}

fn a_request_reaches_a_node_whose_thread_spins(transport: Transport) {
    let _alone = alone();
    let mut cluster = Cluster::start(transport, ENTRY);
    let worker = common::unique("bouncer");
    cluster.spawn_worker(&worker);
    let g = spinning_node(&cluster.address);
    g.wait_process_timeout(&worker, WAIT).expect("worker known");
    for n in 0..50u64 {
        // While this thread spins, the worker's request for `echo` arrives: the
        // node's runtime must serve it, or the call times out. A BG result collected
        // with `get` spins the same way.
        let call = g
            .call("bounce")
            .on(&worker)
            .args((g.process_name().to_string(), n))
            .timeout(WAIT);
        let got: u64 = if n % 2 == 0 {
            call.fg().expect("bounce answers")
        } else {
            call.bg()
                .and_then(|result| result.get())
                .expect("bounce answers")
        };
        assert_eq!(got, n + 1);
    }
    g.stop();
}

#[test]
fn a_request_reaches_a_node_whose_thread_spins_unix() {
    a_request_reaches_a_node_whose_thread_spins(Transport::Unix);
}

#[test]
fn a_request_reaches_a_node_whose_thread_spins_tcp() {
    a_request_reaches_a_node_whose_thread_spins(Transport::Tcp);
}

/// Replies of every size: small ones the spinning thread takes, larger ones the
/// runtime reads (the thread hands the socket back when it sees one), in turn.
#[test]
fn replies_too_large_to_take_still_reach_a_spinning_thread() {
    let _alone = alone();
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("sizes");
    cluster.spawn_worker(&worker);
    let g = spinning_node(&cluster.address);
    g.wait_process_timeout(&worker, WAIT).expect("worker known");
    for round in 0..10 {
        for n in [0usize, 100, 400, 600, 4096, 300_000] {
            let got: Vec<u8> = g
                .call("bytes")
                .on(&worker)
                .args((n,))
                .timeout(WAIT)
                .fg()
                .expect("bytes answers");
            assert!(
                got.len() == n && got.iter().all(|&b| b == 7),
                "round {round}: {n} bytes asked, {} came",
                got.len()
            );
        }
    }
    g.stop();
}

/// The controller killed while a thread spins for a reply: the call fails at once with
/// the lost connection, not after the spin (60 s) nor at its timeout.
#[test]
fn a_spinning_thread_sees_its_controller_go() {
    let _alone = alone();
    let mut controller = StandaloneController::start(ENTRY);
    let mut cluster = Cluster::with_standalone(&controller);
    let worker = common::unique("holder");
    cluster.spawn_worker(&worker);
    let g = spinning_node(&cluster.address);
    // The worker says it holds the call to another node: the spinning one must get
    // nothing but the end of its connection.
    let (started, holding) = mpsc::channel();
    cluster
        .caller
        .register("started", move || {
            let _ = started.send(());
        })
        .expect("register started");
    g.wait_process_timeout(&worker, WAIT).expect("worker known");

    let caller = g.clone();
    let target = worker.clone();
    let told = cluster.caller.process_name().to_string();
    let call = std::thread::spawn(move || {
        caller
            .call("hold")
            .on(&target)
            .args((told, 30_000u64))
            .timeout(WAIT)
            .fg::<u64>()
    });
    holding
        .recv_timeout(WAIT)
        .expect("the worker holds the call");
    controller.kill();
    let outcome = call.join().expect("the calling thread");
    assert!(
        matches!(
            outcome,
            Err(Error::ControllerUnreachable { .. } | Error::PeerDisconnected { .. })
        ),
        "a call in flight when the controller died: {outcome:?}"
    );
    g.stop();
}
