//! FG, BG and NO_RETURN calls, target choice, and every named error, between real
//! processes over TCP and Unix sockets.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Cluster, Log, Transport, WAIT};
use daffi::{callback, Blob, Error, Global};
use serde::Serialize;

/// The ignored test that runs worker processes (see `common`).
const ENTRY: &str = "worker_process";

// ---- callbacks, served by every process of this binary -------------------------------

/// Large bytes both ways: the reversed argument, with `suffix` appended.
#[callback]
fn blob_reverse(data: Blob, suffix: String) -> Blob {
    let mut out: Vec<u8> = data.iter().rev().copied().collect();
    out.extend_from_slice(suffix.as_bytes());
    Blob::from(out)
}

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

#[callback]
async fn async_sub(a: i64, b: i64) -> i64 {
    a - b
}

#[callback]
async fn slow_echo(ms: u64, value: i64) -> i64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    value
}

#[callback]
fn slow_sync(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[callback]
fn whoami() -> String {
    std::env::var(common::ENV_NAME).unwrap_or_else(|_| "the test process".into())
}

static RECORDED: Log<u64> = Log::new();

#[callback]
fn record(n: u64) {
    RECORDED.push(n);
}

/// Waits until `count` values were recorded (or `timeout_ms` passes); returns them.
#[callback]
fn wait_recorded(count: usize, timeout_ms: u64) -> Vec<u64> {
    RECORDED.wait_until(timeout_ms, |v| v.len() >= count)
}

#[callback(name = "fails")]
fn always_fails(reason: String) -> Result<i64, String> {
    Err(reason)
}

#[callback]
fn boom() -> i64 {
    panic!("boom on purpose")
}

static HANGING: Log<()> = Log::new();

#[callback]
fn hang() -> i64 {
    HANGING.push(());
    std::thread::sleep(Duration::from_secs(120));
    0
}

/// Returns once at least one `hang` call is running here.
#[callback]
fn wait_hanging(timeout_ms: u64) -> usize {
    HANGING.wait_until(timeout_ms, |h| !h.is_empty()).len()
}

/// Runs a worker node when started by a test; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn worker_process() {
    common::run_role(&[("worker", worker)]);
}

/// A node serving closures beside the `#[callback]` functions.
fn worker() {
    let name = std::env::var(common::ENV_NAME).expect("worker name");
    let g = common::builder_for(&common::address_from_env())
        .process_name(name)
        .start()
        .expect("worker starts");
    g.register("closure_mul", |a: i64, b: i64| a * b)
        .expect("register sync closure");
    g.register("closure_concat", |a: String, b: String| async move {
        format!("{a}{b}")
    })
    .expect("register async closure");
    g.register("closure_div", |a: i64, b: i64| {
        a.checked_div(b).ok_or("division by zero")
    })
    .expect("register fallible closure");
    g.join().expect("join");
}

// ---- FG, BG, NO_RETURN on both transports --------------------------------------------

fn modes_work(transport: Transport) {
    let mut cluster = Cluster::start(transport, ENTRY);
    cluster.spawn_worker(&common::unique("modes"));
    let g = &cluster.caller;

    // FG: a sync caller to an async callback.
    let delta: i64 = g.call("async_sub").args((10, 3)).fg().expect("fg");
    assert_eq!(delta, 7);
    let with_timeout: i64 = g
        .call("async_sub")
        .args((1, 2))
        .timeout(WAIT)
        .fg()
        .expect("fg with timeout");
    assert_eq!(with_timeout, -1);

    // BG: returns while the 300 ms callback still runs.
    let pending = g
        .call("slow_echo")
        .args((300u64, 42i64))
        .bg::<i64>()
        .expect("bg");
    assert!(!pending.is_ready(), "bg must not wait for the callback");
    assert_eq!(pending.get_timeout(WAIT).expect("bg result"), 42);

    // Closures registered on the worker: sync, async, fallible. They are announced
    // after the worker joined, so wait until they are known here.
    for name in ["closure_mul", "closure_concat", "closure_div"] {
        g.wait_function_timeout(name, WAIT)
            .expect("closure announced");
    }
    assert_eq!(
        g.call("closure_mul").args((6, 7)).fg::<i64>().expect("mul"),
        42
    );
    let joined: String = g
        .call("closure_concat")
        .args(("da", "ffi"))
        .fg()
        .expect("concat");
    assert_eq!(joined, "daffi");
    match g.call("closure_div").args((1, 0)).fg::<i64>() {
        Err(Error::Remote {
            message,
            panicked: false,
            ..
        }) => {
            assert!(message.contains("division by zero"), "{message}")
        }
        other => panic!("expected a remote error, got {other:?}"),
    }

    // NO_RETURN: the callee sees every one.
    for n in 0..50u64 {
        g.call("record").args((n,)).no_return().expect("no_return");
    }
    let seen: Vec<u64> = g
        .call("wait_recorded")
        .args((50usize, WAIT.as_millis() as u64))
        .fg()
        .expect("wait_recorded");
    let mut seen_sorted = seen.clone();
    seen_sorted.sort();
    assert_eq!(seen_sorted, (0..50).collect::<Vec<_>>());
}

#[test]
fn fg_bg_and_no_return_over_tcp() {
    modes_work(Transport::Tcp);
}

#[test]
fn fg_bg_and_no_return_over_unix_socket() {
    modes_work(Transport::Unix);
}

#[test]
fn async_caller_reaches_sync_callback() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let caller = Global::builder()
            .process_name(common::unique("async-caller"))
            .host("127.0.0.1")
            .init_controller(true)
            .start_async()
            .await
            .expect("start_async");
        let worker_name = common::unique("sync-callee");
        let _worker = common::spawn_child(ENTRY, "worker", &worker_name, caller.address());
        caller
            .wait_process_timeout_async(&worker_name, WAIT)
            .await
            .expect("worker connects");

        let sum: i64 = caller
            .call("sync_add")
            .args((4, 6))
            .fg_async()
            .await
            .expect("fg_async");
        assert_eq!(sum, 10);
        let bg = caller
            .call("sync_add")
            .args((1, 1))
            .bg::<i64>()
            .expect("bg");
        assert_eq!(bg.await.expect("bg awaited"), 2);
        caller
            .call("record")
            .args((7u64,))
            .no_return_async()
            .await
            .expect("no_return_async");
        let seen: Vec<u64> = caller
            .call("wait_recorded")
            .args((1usize, WAIT.as_millis() as u64))
            .fg_async()
            .await
            .expect("wait_recorded");
        assert_eq!(seen, vec![7]);

        // A blocking method inside a current-thread runtime errors instead of hanging.
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("current-thread runtime");
        let g = caller.clone();
        let blocked = std::thread::spawn(move || {
            current.block_on(async move { g.call("sync_add").args((1, 2)).fg::<i64>() })
        })
        .join()
        .expect("thread");
        assert!(
            matches!(blocked, Err(Error::BlockingInAsync { method: "fg" })),
            "{blocked:?}"
        );
        // So does `get` whose reply is already in (it would not block): the answer does
        // not depend on when the reply came.
        let arrived = caller
            .call("sync_add")
            .args((2, 2))
            .bg::<i64>()
            .expect("bg");
        let deadline = Instant::now() + WAIT;
        while !arrived.is_ready() {
            assert!(Instant::now() < deadline, "the reply never came");
            tokio::task::yield_now().await;
        }
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("current-thread runtime");
        let got = std::thread::spawn(move || current.block_on(async move { arrived.get() }))
            .join()
            .expect("thread");
        assert!(
            matches!(got, Err(Error::BlockingInAsync { method: "get" })),
            "{got:?}"
        );
        caller.stop();
    });
}

/// Calls that find this node's queue to the controller full wait for room and are sent
/// later: each still carries its own arguments (they move into a request only once it
/// is queued) and gets its own result.
#[test]
fn calls_that_wait_for_room_carry_their_own_arguments() {
    const LEN: usize = 64 * 1024;
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    cluster.spawn_worker(&common::unique("room"));
    // Two requests fill the queue: a burst of them mostly waits for room.
    let caller = common::builder_for(&cluster.address)
        .process_name(common::unique("small-queue"))
        .max_queue_bytes(2 * LEN)
        .start()
        .expect("caller starts");
    let calls: Vec<_> = (0..128u8)
        .map(|seed| {
            caller
                .call("blob_reverse")
                .args((Blob::from(vec![seed; LEN]), seed.to_string()))
                .timeout(WAIT)
                .bg::<Blob>()
                .expect("bg")
        })
        .collect();
    for (seed, call) in calls.into_iter().enumerate() {
        let back = call.get().expect("call");
        let suffix = seed.to_string();
        assert_eq!(back.len(), LEN + suffix.len(), "call {seed}");
        assert!(
            back[..LEN].iter().all(|&b| usize::from(b) == seed),
            "call {seed} came back with another call's arguments"
        );
        assert_eq!(&back[LEN..], suffix.as_bytes(), "call {seed}");
    }
    caller.stop();
}

#[derive(Serialize)]
struct AddArgs {
    a: i64,
    b: i64,
}

#[test]
fn named_arguments_reach_macro_callbacks() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    cluster.spawn_worker(&common::unique("named"));
    let g = &cluster.caller;
    let by_struct: i64 = g
        .call("sync_add")
        .args(AddArgs { a: 40, b: 2 })
        .fg()
        .expect("named args");
    assert_eq!(by_struct, 42);
    let by_map: i64 = g
        .call("sync_add")
        .args(HashMap::from([("b", 1), ("a", 2)]))
        .fg()
        .expect("map args");
    assert_eq!(by_map, 3);
}

// ---- target choice and load ----------------------------------------------------------

#[test]
fn three_nodes_share_calls_and_none_lands_on_the_caller() {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let names: Vec<String> = (0..3)
        .map(|i| common::unique(&format!("share{i}")))
        .collect();
    for name in &names {
        cluster.spawn_worker(name);
    }
    let g = &cluster.caller;
    let mut hits: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let who: String = g.call("whoami").fg().expect("whoami");
        *hits.entry(who).or_default() += 1;
    }
    assert_eq!(hits.values().sum::<usize>(), 300);
    for name in &names {
        assert!(
            hits.get(name).copied().unwrap_or(0) > 0,
            "{name} got no call: {hits:?}"
        );
    }
    assert_eq!(hits.len(), 3, "a call landed elsewhere: {hits:?}");

    let served = g.registered_callbacks();
    let mut whoami_nodes = served["whoami"].clone();
    whoami_nodes.retain(|n| n != g.process_name());
    whoami_nodes.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(whoami_nodes, expected);
}

fn blobs_cross_intact(transport: Transport) {
    let mut cluster = Cluster::start(transport, ENTRY);
    cluster.spawn_worker(&common::unique("blobs"));
    let g = &cluster.caller;
    let pattern = |len: usize, seed: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    // Small (copied), 64 KiB (a part of its own), 3 MiB (a large frame, twice: the second
    // one may reuse the first one's buffer on every hop).
    for (len, seed) in [(10, 1u8), (64 * 1024, 2), (3 << 20, 3), (3 << 20, 4)] {
        let data = pattern(len, seed);
        let back: Blob = g
            .call("blob_reverse")
            .args((Blob::from(data.clone()), "!"))
            .timeout(WAIT)
            .fg()
            .expect("blob call");
        let mut expected: Vec<u8> = data.into_iter().rev().collect();
        expected.push(b'!');
        assert!(back[..] == expected[..], "{len} bytes came back changed");
    }
    // The same bytes sent as `bytes::Bytes` and by name reach a `Blob` parameter.
    #[derive(Serialize)]
    struct Named {
        data: bytes::Bytes,
        suffix: &'static str,
    }
    let back: bytes::Bytes = g
        .call("blob_reverse")
        .args(Named {
            data: bytes::Bytes::from(pattern(100_000, 5)),
            suffix: "",
        })
        .fg()
        .expect("named bytes call");
    let expected: Vec<u8> = pattern(100_000, 5).into_iter().rev().collect();
    assert!(back[..] == expected[..]);
}

#[test]
fn blobs_cross_intact_over_tcp() {
    blobs_cross_intact(Transport::Tcp);
}

#[test]
fn blobs_cross_intact_over_unix_socket() {
    blobs_cross_intact(Transport::Unix);
}

#[test]
fn a_thousand_bg_calls_in_flight_all_come_back() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    cluster.spawn_worker(&common::unique("thousand"));
    let g = &cluster.caller;
    let pending: Vec<_> = (0..1000i64)
        .map(|i| g.call("sync_add").args((i, i)).bg::<i64>().expect("bg"))
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.get_timeout(WAIT).expect("result"), 2 * i as i64);
    }
}

#[test]
fn a_slow_callback_does_not_delay_other_calls() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    let worker = common::unique("slow");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    let slow_sync = g
        .call("slow_sync")
        .args((3000u64,))
        .on(&worker)
        .bg::<u64>()
        .expect("bg");
    let slow_async = g
        .call("slow_echo")
        .args((3000u64, 1i64))
        .on(&worker)
        .bg::<i64>()
        .expect("bg");
    for i in 0..20 {
        let sum: i64 = g
            .call("sync_add")
            .args((i, 1))
            .on(&worker)
            .fg()
            .expect("fast call");
        assert_eq!(sum, i + 1);
    }
    assert!(
        !slow_sync.is_ready() && !slow_async.is_ready(),
        "fast calls should finish while the 3 s callbacks still run"
    );
}

// ---- named errors --------------------------------------------------------------------

#[test]
fn no_provider_and_unknown_process_fail_promptly() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    cluster.spawn_worker(&common::unique("errs"));
    let g = &cluster.caller;
    let started = Instant::now();
    match g.call("nobody_serves_this").timeout(WAIT).fg::<i64>() {
        Err(Error::NoProvider { callback, on: None }) => assert_eq!(callback, "nobody_serves_this"),
        other => panic!("expected NoProvider, got {other:?}"),
    }
    match g
        .call("sync_add")
        .args((1, 2))
        .on("ghost")
        .timeout(WAIT)
        .fg::<i64>()
    {
        Err(Error::UnknownProcess { process }) => assert_eq!(process, "ghost"),
        other => panic!("expected UnknownProcess, got {other:?}"),
    }
    // Neither waited for its timeout.
    assert!(started.elapsed() < WAIT);
}

#[test]
fn timeout_is_reported_by_name() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    cluster.spawn_worker(&common::unique("timeout"));
    let g = &cluster.caller;
    match g
        .call("slow_echo")
        .args((5_000u64, 1i64))
        .timeout(Duration::from_millis(200))
        .fg::<i64>()
    {
        Err(Error::Timeout { what, after }) => {
            assert_eq!(what, "slow_echo");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    // The node still works after a timed-out call.
    assert_eq!(
        g.call("sync_add")
            .args((2, 2))
            .fg::<i64>()
            .expect("after timeout"),
        4
    );
}

#[test]
fn bg_calls_beyond_max_in_flight_wait_for_a_slot_and_bg_timeouts_are_named() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    let worker = common::unique("slots");
    cluster.spawn_worker(&worker);
    let g = common::builder_for(&cluster.address)
        .process_name(common::unique("two-slots"))
        .max_in_flight(2)
        .start()
        .expect("node starts");
    g.wait_process_timeout(&worker, WAIT).expect("worker known");
    // Two are sent at once; the other four wait for a slot, then go.
    let pending: Vec<_> = (0..6i64)
        .map(|i| {
            g.call("slow_echo")
                .args((100u64, i))
                .bg::<i64>()
                .expect("bg")
        })
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.get_timeout(WAIT).expect("result"), i as i64);
    }
    // A BG call's own timeout: the result is ready once it passed, and names the call.
    let late = g
        .call("slow_echo")
        .args((5_000u64, 1i64))
        .timeout(Duration::from_millis(200))
        .bg::<i64>()
        .expect("bg");
    let started = Instant::now();
    match late.get() {
        Err(Error::Timeout { what, after }) => {
            assert_eq!(
                (what.as_str(), after),
                ("slow_echo", Duration::from_millis(200))
            );
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(started.elapsed() < WAIT, "the timeout ended the wait");
    // Its slot came back: the node still makes calls.
    let sum: i64 = g.call("sync_add").args((2, 3)).fg().expect("after timeout");
    assert_eq!(sum, 5);
}

#[test]
fn killed_callee_fails_the_call_within_a_second() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    let victim = common::unique("victim");
    cluster.spawn_worker(&victim);
    let g = cluster.caller.clone();
    let in_flight = g
        .call("hang")
        .on(&victim)
        .timeout(Duration::from_secs(120))
        .bg::<i64>()
        .expect("bg");
    let running: usize = g
        .call("wait_hanging")
        .args((WAIT.as_millis() as u64,))
        .on(&victim)
        .fg()
        .expect("hang started");
    assert_eq!(running, 1);

    cluster.worker(&victim).kill();
    match in_flight.get_timeout(Duration::from_secs(1)) {
        Err(Error::PeerDisconnected { process, callback }) => {
            assert_eq!(
                (process.as_str(), callback.as_str()),
                (victim.as_str(), "hang")
            );
        }
        other => panic!("expected PeerDisconnected within a second, got {other:?}"),
    }
}

#[test]
fn callback_errors_and_panics_reach_the_caller_and_the_callee_keeps_serving() {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("faulty");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;

    match g.call("fails").args(("disk full",)).fg::<i64>() {
        Err(Error::Remote {
            process,
            callback,
            message,
            panicked,
        }) => {
            assert_eq!(
                (process.as_str(), callback.as_str()),
                (worker.as_str(), "fails")
            );
            assert_eq!(message, "disk full");
            assert!(!panicked);
        }
        other => panic!("expected Remote, got {other:?}"),
    }
    match g.call("boom").fg::<i64>() {
        Err(Error::Remote {
            message, panicked, ..
        }) => {
            assert!(panicked);
            assert!(message.contains("boom on purpose"), "{message}");
        }
        other => panic!("expected a panic report, got {other:?}"),
    }
    assert_eq!(
        g.call("sync_add")
            .args((20, 22))
            .on(&worker)
            .fg::<i64>()
            .expect("still serving"),
        42
    );
}

#[test]
fn wrong_argument_types_name_the_callback() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    cluster.spawn_worker(&common::unique("types"));
    let g = &cluster.caller;
    match g.call("sync_add").args(("four", "six")).fg::<i64>() {
        Err(Error::BadArguments {
            callback, message, ..
        }) => {
            assert_eq!(callback, "sync_add");
            assert!(message.contains("sync_add(a: i64, b: i64)"), "{message}");
        }
        other => panic!("expected BadArguments, got {other:?}"),
    }
    g.wait_function_timeout("closure_mul", WAIT)
        .expect("closure announced");
    match g.call("closure_mul").args(("x",)).fg::<i64>() {
        Err(Error::BadArguments { message, .. }) => assert_eq!(
            message,
            "`closure_mul` expects 2 arguments (i64, i64), got 1"
        ),
        other => panic!("expected BadArguments, got {other:?}"),
    }
    // The result type is checked at the caller, with the callback named.
    match g.call("sync_add").args((1, 2)).fg::<String>() {
        Err(Error::BadResult {
            callback,
            expected,
            message,
            ..
        }) => {
            assert_eq!(
                (callback.as_str(), expected, message.as_str()),
                (
                    "sync_add",
                    "alloc::string::String",
                    "is an integer, not a `String`"
                )
            )
        }
        other => panic!("expected BadResult, got {other:?}"),
    }
}

#[test]
fn a_duplicate_process_name_is_refused() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    let taken = common::unique("taken");
    cluster.spawn_worker(&taken);
    let second = common::builder_for(&cluster.address)
        .process_name(taken.clone())
        .start();
    match second {
        Err(Error::DuplicateProcessName { process }) => assert_eq!(process, taken),
        other => panic!("expected DuplicateProcessName, got {other:?}"),
    }
    // The first holder of the name is unaffected.
    let who: String = cluster
        .caller
        .call("whoami")
        .on(&taken)
        .fg()
        .expect("original node");
    assert_eq!(who, taken);
}

#[test]
fn calls_after_stop_fail_with_stopped() {
    let cluster = Cluster::start(Transport::Tcp, ENTRY);
    let g = cluster.caller.clone();
    g.stop();
    assert!(matches!(
        g.call("sync_add").args((1, 2)).fg::<i64>(),
        Err(Error::Stopped)
    ));
    g.join().expect("join returns once stopped");
}

#[test]
fn eta_delays_the_request() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    let worker = common::unique("eta");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    // Sent first but delayed: it arrives after the one sent second.
    g.call("record")
        .args((1u64,))
        .on(&worker)
        .eta(Duration::from_millis(300))
        .no_return()
        .expect("delayed no_return");
    g.call("record")
        .args((2u64,))
        .on(&worker)
        .no_return()
        .expect("no_return");
    let seen: Vec<u64> = g
        .call("wait_recorded")
        .args((2usize, WAIT.as_millis() as u64))
        .on(&worker)
        .fg()
        .expect("wait_recorded");
    assert_eq!(seen, vec![2, 1]);

    let delayed = g
        .call("sync_add")
        .args((1, 2))
        .eta(Duration::from_millis(200))
        .bg::<i64>()
        .expect("bg with eta");
    assert_eq!(delayed.get_timeout(WAIT).expect("delayed result"), 3);
}

#[test]
fn dropping_the_last_global_clone_stops_the_node() {
    let cluster = Cluster::start(Transport::Tcp, ENTRY);
    let name = common::unique("dropped");
    let node = common::builder_for(&cluster.address)
        .process_name(name.clone())
        .start()
        .expect("node starts");
    node.register("only_here", || 1).expect("register");
    let clone = node.clone();
    drop(node);
    cluster
        .caller
        .wait_function_timeout("only_here", WAIT)
        .expect("still alive while a clone exists");
    drop(clone);
    // The node is gone: it stopped gracefully (`PeerStopped`), or the controller no
    // longer routes to it, or the call that raced its departure fails when it leaves.
    match cluster
        .caller
        .call("only_here")
        .on(&name)
        .timeout(WAIT)
        .fg::<i64>()
    {
        Err(Error::PeerStopped { .. })
        | Err(Error::UnknownProcess { .. })
        | Err(Error::PeerDisconnected { .. }) => {}
        other => panic!("expected the node to be gone, got {other:?}"),
    }
}

#[test]
fn a_node_without_a_controller_fails_clearly() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let result = Global::builder()
        .host("127.0.0.1")
        .port(port)
        .connect_timeout(Duration::from_millis(300))
        .start();
    match result {
        Err(Error::ControllerUnreachable { address, .. }) => {
            assert_eq!(address, format!("tcp://127.0.0.1:{port}"))
        }
        other => panic!("expected ControllerUnreachable, got {other:?}"),
    }
}

#[test]
fn calls_fail_by_name_when_the_controller_is_gone() {
    let controller = Global::builder()
        .host("127.0.0.1")
        .init_controller(true)
        .init_node(false)
        .start()
        .expect("controller");
    let a = common::builder_for(controller.address())
        .start()
        .expect("node a");
    a.register("ping", || "pong").expect("register");
    let b = common::builder_for(controller.address())
        .start()
        .expect("node b");
    b.wait_function_timeout("ping", WAIT).expect("ping known");
    assert_eq!(b.call("ping").fg::<String>().expect("ping"), "pong");

    controller.stop();
    match b.call("ping").timeout(WAIT).fg::<String>() {
        Err(Error::ControllerUnreachable { .. }) => {}
        other => panic!("expected ControllerUnreachable, got {other:?}"),
    }
}
