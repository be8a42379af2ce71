//! A thread that collects BG results with many calls in flight holds the requests it
//! makes meanwhile and writes them together when it next waits. These tests show that
//! a held request never depends on that thread coming back: when it goes off to wait
//! on something of its own, the request leaves anyway, from the user's own thread and
//! from the main future of the user's `#[tokio::main]` runtime, while every other call
//! in flight is stuck at a callee paused with SIGSTOP. Real processes over real sockets.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::{Cluster, Transport, WAIT};
use daffi::{callback, AsyncResult, Global};

const ENTRY: &str = "held_requests_process";

/// Calls left in flight to the paused callee: more than a connection needs for its new
/// requests to be held (16).
const STUCK: usize = 24;

/// How long a held request may take to arrive here without its thread: far past the
/// hold's bound (a millisecond or two), short of anything else that could send it.
const WITHOUT_ITS_THREAD: Duration = Duration::from_secs(5);

#[test]
#[ignore = "helper: tests start it as a child process"]
fn held_requests_process() {
    common::run_role(&[("worker", common::run_worker_role)]);
}

/// Served by every worker from its start: known with the worker itself.
#[callback]
fn twice(n: u64) -> u64 {
    n * 2
}

/// A string of `len` bytes: a reply larger than a small frame limit.
#[callback]
fn long(len: u64) -> String {
    "x".repeat(len as usize)
}

/// A controller, two workers serving `twice` (one to pause, one that answers), and a
/// caller node of this process connected over a Unix socket.
fn mesh() -> (Cluster, String, String, Global) {
    mesh_with(|b| b)
}

/// [`mesh`], its caller built with `tune`.
fn mesh_with(
    tune: impl FnOnce(daffi::GlobalBuilder) -> daffi::GlobalBuilder,
) -> (Cluster, String, String, Global) {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let (stuck, live) = (common::unique("stuck"), common::unique("live"));
    cluster.spawn_worker(&stuck);
    cluster.spawn_worker(&live);
    let g = tune(common::builder_for(&cluster.address).process_name(common::unique("caller")))
        .start()
        .expect("the caller connects");
    g.wait_process_timeout(&stuck, WAIT).expect("stuck known");
    g.wait_process_timeout(&live, WAIT).expect("live known");
    (cluster, stuck, live, g)
}

/// `twice(n)` on `on`, as BG.
fn twice_on(g: &Global, on: &str, n: u64) -> AsyncResult<u64> {
    g.call("twice")
        .on(on)
        .args((n,))
        .timeout(WAIT)
        .bg::<u64>()
        .expect("sent")
}

#[test]
fn a_held_request_leaves_while_its_thread_waits_on_something_else() {
    let (mut cluster, stuck, live, g) = mesh();
    let pid = cluster.worker(&stuck).pid().expect("stuck pid");
    let first = twice_on(&g, &live, 1);
    common::pause(pid);
    let in_flight: Vec<_> = (0..STUCK as u64).map(|n| twice_on(&g, &stuck, n)).collect();
    // A result collected with many calls in flight: the next request is held...
    assert_eq!(first.get().expect("live answers"), 2);
    let held = twice_on(&g, &live, 21);
    // ...and this thread now waits on a channel, not on daffi.
    let (tx, rx) = mpsc::channel();
    let collector = std::thread::spawn(move || tx.send(held.get()));
    let answer = rx
        .recv_timeout(WITHOUT_ITS_THREAD)
        .expect("the held request left without its thread");
    assert_eq!(answer.expect("live answers"), 42);
    collector
        .join()
        .expect("collector")
        .expect("its answer was taken");

    // The paused callee, resumed, answers every call that waited for it.
    common::resume(pid);
    for (n, call) in in_flight.into_iter().enumerate() {
        assert_eq!(
            call.get().expect("stuck answers once resumed"),
            2 * n as u64
        );
    }
    g.stop();
}

#[test]
fn a_held_request_leaves_while_the_main_future_awaits_something_else() {
    let (mut cluster, stuck, live, g) = mesh();
    let pid = cluster.worker(&stuck).pid().expect("stuck pid");
    // The user's `#[tokio::main]`: a multi-thread runtime, calls made in its main future.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let first = twice_on(&g, &live, 1);
        common::pause(pid);
        let in_flight: Vec<_> = (0..STUCK as u64).map(|n| twice_on(&g, &stuck, n)).collect();
        assert_eq!(first.await.expect("live answers"), 2);
        let held = twice_on(&g, &live, 21);
        // The main future awaits a task's message, not the held call.
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { tx.send(held.await) });
        let answer = tokio::time::timeout(WITHOUT_ITS_THREAD, rx)
            .await
            .expect("the held request left without the main future")
            .expect("the task sends");
        assert_eq!(answer.expect("live answers"), 42);

        common::resume(pid);
        for (n, call) in in_flight.into_iter().enumerate() {
            assert_eq!(
                call.await.expect("stuck answers once resumed"),
                2 * n as u64
            );
        }
    });
    g.stop();
}

/// A node whose link drops (a reply past its frame limit) while one of its threads,
/// which held a request, waits on something of its own: the node reconnects at once,
/// as without the hold. The held request must not keep the old connection's socket
/// open (the controller would refuse the node's name as a duplicate).
#[test]
fn a_node_reconnects_while_a_thread_that_held_a_request_is_away() {
    let (connects_tx, connects) = mpsc::channel();
    let connects_tx = std::sync::Mutex::new(connects_tx);
    let (mut cluster, stuck, live, g) = mesh_with(|b| {
        b.max_frame_size(64 * 1024).on_node_connect(move |_, _| {
            let _ = connects_tx.lock().expect("lock").send(());
        })
    });
    connects.recv_timeout(WAIT).expect("the first connect");
    let pid = cluster.worker(&stuck).pid().expect("stuck pid");
    let (held_tx, held) = mpsc::channel();
    let (go_tx, go) = mpsc::channel::<()>();
    let away = {
        let (g, stuck, live) = (g.clone(), stuck.clone(), live.clone());
        std::thread::spawn(move || {
            let first = twice_on(&g, &live, 1);
            common::pause(pid);
            let in_flight: Vec<_> = (0..STUCK as u64).map(|n| twice_on(&g, &stuck, n)).collect();
            assert_eq!(first.get().expect("live answers"), 2);
            let last = twice_on(&g, &live, 21);
            held_tx.send(()).expect("the test waits");
            // Away from daffi until the test is done.
            go.recv_timeout(2 * WAIT).expect("the test ends the wait");
            drop((in_flight, last));
        })
    };
    held.recv_timeout(WAIT).expect("the thread held a request");
    let too_long = g
        .call("long")
        .on(&live)
        .args((1_000_000u64,))
        .timeout(WAIT)
        .fg::<String>();
    assert!(too_long.is_err(), "a reply past the frame limit came in");
    connects
        .recv_timeout(WITHOUT_ITS_THREAD)
        .expect("the node reconnected while the holding thread was away");
    go_tx.send(()).expect("the thread waits");
    away.join().expect("the thread");
    common::resume(pid);
    g.stop();
}

/// Floods from the user's thread, collected in a window as B's loop does, to a callee
/// that answers: every result is its call's, with requests held and flushed all along.
#[test]
fn a_window_of_bg_calls_gets_every_result_right() {
    let (_cluster, _stuck, live, g) = mesh();
    let mut window = std::collections::VecDeque::new();
    for n in 0..20_000u64 {
        window.push_back((n, twice_on(&g, &live, n)));
        if window.len() == 256 {
            let (n, call) = window.pop_front().expect("full");
            assert_eq!(call.get().expect("answers"), 2 * n);
        }
    }
    for (n, call) in window {
        assert_eq!(call.get().expect("answers"), 2 * n);
    }
    g.stop();
}
