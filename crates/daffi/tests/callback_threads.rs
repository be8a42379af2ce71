//! Sync callbacks run on threads of their own, with a limit of their own: a full set of
//! them refuses neither async callbacks nor a reconnect, and a full tokio blocking pool
//! (the user's `spawn_blocking`) holds up neither them, nor reconnects, nor hooks. Real
//! processes over real sockets.

mod common;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use common::{Log, StandaloneController, WAIT};
use daffi::{callback, Address, Error, Global};
use tokio::sync::watch;

const ENTRY: &str = "callback_threads_process";

// ---- callbacks served by every process of this binary --------------------------------

/// `hold` callbacks running now.
static HELD: LazyLock<watch::Sender<usize>> = LazyLock::new(|| watch::channel(0).0);
/// One item per `release` call.
static RELEASED: Log<()> = Log::new();
/// Threads of tokio's blocking pool parked for good by the user's own work.
static POOL_BUSY: LazyLock<watch::Sender<usize>> = LazyLock::new(|| watch::channel(0).0);
/// Times this node connected to the controller, counted by its `on_node_connect` hook.
static CONNECTS: LazyLock<watch::Sender<usize>> = LazyLock::new(|| watch::channel(0).0);

/// A sync callback that keeps its thread until `release` has been called more than
/// `gate` times (or `WAIT` passes).
#[callback]
fn hold(gate: usize) -> bool {
    HELD.send_modify(|n| *n += 1);
    let released = RELEASED.wait_until(WAIT.as_millis() as u64, |r| r.len() > gate);
    HELD.send_modify(|n| *n -= 1);
    released.len() > gate
}

#[callback]
async fn release() {
    RELEASED.push(());
}

/// Waits (up to `WAIT`) until `count` reaches `n`; its value then.
async fn reach(count: &watch::Sender<usize>, n: usize) -> usize {
    let mut rx = count.subscribe();
    let _ = tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n)).await;
    let now = *rx.borrow();
    now
}

#[callback]
async fn held(n: usize) -> usize {
    reach(&HELD, n).await
}

#[callback]
async fn pool_busy(n: usize) -> usize {
    reach(&POOL_BUSY, n).await
}

#[callback]
async fn connects(n: usize) -> usize {
    reach(&CONNECTS, n).await
}

#[callback]
async fn ping() -> String {
    "pong".into()
}

// ---- child processes -----------------------------------------------------------------

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn callback_threads_process() {
    common::run_role(&[
        ("controller", common::run_controller_role),
        ("limited", limited_worker),
        ("crowded", crowded_worker),
    ]);
}

/// A node that runs at most 4 sync callbacks at once.
fn limited_worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .max_sync_callbacks(4)
        .start()
        .expect("worker starts");
    g.join().expect("join");
}

/// A node started from the user's own runtime, whose blocking pool (2 threads) the
/// user's own work fills for good once it is connected; it finds its controller by the
/// host name `localhost`, and runs at most 2 sync callbacks.
fn crowded_worker() {
    let name = std::env::var(common::ENV_NAME).expect("name");
    let Address::Tcp { port, .. } = common::address_from_env() else {
        panic!("the crowded worker needs a TCP controller")
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let g = Global::builder()
            .process_name(name)
            .host("localhost")
            .port(port)
            .connect_timeout(WAIT)
            .max_sync_callbacks(2)
            .on_node_connect(|_, _| CONNECTS.send_modify(|n| *n += 1))
            .start_async()
            .await
            .expect("worker starts");
        for _ in 0..2 {
            tokio::task::spawn_blocking(|| {
                POOL_BUSY.send_modify(|n| *n += 1);
                loop {
                    std::thread::park();
                }
            });
        }
        g.join_async().await;
    });
}

// ---- limits --------------------------------------------------------------------------

#[test]
fn full_sync_threads_refuse_sync_calls_at_once_and_never_async_ones() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = common::Cluster::with_standalone(&controller);
    let worker = common::unique("limited");
    cluster.spawn_role(&worker, "limited");
    let g = cluster.caller.clone();
    let call = |name: &str, timeout: Duration| g.call(name).on(&worker).timeout(timeout);

    // Its 4 sync threads, each held.
    let holding: Vec<_> = (0..4)
        .map(|_| {
            call("hold", WAIT)
                .args((0usize,))
                .bg::<bool>()
                .expect("sent")
        })
        .collect();
    assert_eq!(
        call("held", WAIT)
            .args((4usize,))
            .fg::<usize>()
            .expect("call"),
        4
    );

    // One more sync call is refused at once; async ones are served at once.
    let began = Instant::now();
    match call("hold", WAIT).args((0usize,)).fg::<bool>() {
        Err(Error::Overloaded { .. }) => {}
        other => panic!("expected Overloaded, got {other:?}"),
    }
    let refused_in = began.elapsed();
    assert!(refused_in < WAIT / 4, "refused only after {refused_in:?}");
    assert_eq!(call("ping", WAIT).fg::<String>().expect("ping"), "pong");

    // Released, everything is served again.
    call("release", WAIT).fg::<()>().expect("release");
    for h in holding {
        assert!(h.get().expect("held call"), "released");
    }
    assert!(call("hold", WAIT)
        .args((0usize,))
        .fg::<bool>()
        .expect("served again"));
    eprintln!("a sync call beyond max_sync_callbacks was refused in {refused_in:?}");
}

#[test]
fn queued_sync_calls_whose_callers_gave_up_do_not_keep_their_places() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = common::Cluster::with_standalone(&controller);
    let worker = common::unique("limited");
    cluster.spawn_role(&worker, "limited");
    let g = cluster.caller.clone();
    let call = |name: &str, timeout: Duration| g.call(name).on(&worker).timeout(timeout);

    // NO_RETURN calls (which have a larger allowance) take the 4 threads...
    for _ in 0..4 {
        call("hold", WAIT)
            .args((0usize,))
            .no_return()
            .expect("sent");
    }
    assert_eq!(
        call("held", WAIT)
            .args((4usize,))
            .fg::<usize>()
            .expect("call"),
        4
    );
    // ...so that 4 calls with a reply wait in the queue, and their callers give up.
    let short = Duration::from_millis(100);
    let gave_up: Vec<_> = (0..4)
        .map(|_| {
            call("hold", short)
                .args((0usize,))
                .bg::<bool>()
                .expect("sent")
        })
        .collect();
    for c in gave_up {
        assert!(matches!(c.get(), Err(Error::Timeout { .. })));
    }
    // A round trip more, so that the callee's copy of their deadline (taken when the
    // requests arrived) has passed too.
    assert_eq!(call("ping", WAIT).fg::<String>().expect("ping"), "pong");

    // Their places are free: a new call waits for a thread instead of being refused.
    let waiting = call("hold", WAIT)
        .args((0usize,))
        .bg::<bool>()
        .expect("sent");
    call("release", WAIT).fg::<()>().expect("release");
    assert!(waiting.get().expect("a queued call is served"));
}

// ---- reconnecting while every blocking thread is busy ---------------------------------

#[test]
fn a_node_whose_blocking_pool_and_sync_threads_are_full_rejoins_promptly() {
    const BOUND: Duration = Duration::from_secs(5);
    let mut controller = StandaloneController::start_tcp(ENTRY);
    let (events_tx, events) = std::sync::mpsc::channel::<&'static str>();
    let (on_connect, on_disconnect) = (
        std::sync::Mutex::new(events_tx.clone()),
        std::sync::Mutex::new(events_tx),
    );
    let caller = common::builder_for(&controller.address)
        .process_name(common::unique("caller"))
        .on_node_connect(move |_, _| {
            let _ = on_connect.lock().expect("lock").send("connected");
        })
        .on_node_disconnect(move |_, _| {
            let _ = on_disconnect.lock().expect("lock").send("disconnected");
        })
        .start()
        .expect("caller connects");
    let next_event = || events.recv_timeout(WAIT).expect("a connection event");
    assert_eq!(next_event(), "connected");
    let worker = common::unique("crowded");
    let _w = common::spawn_child(ENTRY, "crowded", &worker, &controller.address);
    caller
        .wait_process_timeout(&worker, WAIT)
        .expect("worker connects");
    let call = |name: &str| caller.call(name).on(&worker).timeout(WAIT);

    // Both threads of its blocking pool, and both of its sync callback threads, busy.
    assert_eq!(
        call("pool_busy")
            .args((2usize,))
            .fg::<usize>()
            .expect("call"),
        2
    );
    let _holding: Vec<_> = (0..2)
        .map(|_| call("hold").args((0usize,)).bg::<bool>().expect("sent"))
        .collect();
    assert_eq!(call("held").args((2usize,)).fg::<usize>().expect("call"), 2);
    assert_eq!(
        call("connects")
            .args((1usize,))
            .fg::<usize>()
            .expect("call"),
        1
    );

    // The controller dies and comes back.
    controller.kill();
    assert_eq!(next_event(), "disconnected");
    controller.restart();
    let restarted = Instant::now();
    assert_eq!(next_event(), "connected");
    caller
        .wait_process_timeout(&worker, BOUND)
        .expect("the crowded worker rejoins");
    let rejoined_in = restarted.elapsed();
    eprintln!("the crowded worker rejoined {rejoined_in:?} after the controller restarted");
    assert!(rejoined_in < BOUND, "rejoined after {rejoined_in:?}");

    // Its hooks ran, and it serves; its sync threads are still held.
    assert_eq!(
        call("connects")
            .args((2usize,))
            .fg::<usize>()
            .expect("call"),
        2
    );
    assert_eq!(call("held").args((2usize,)).fg::<usize>().expect("call"), 2);
    assert_eq!(call("ping").fg::<String>().expect("ping"), "pong");
    call("release").fg::<()>().expect("release");
}
