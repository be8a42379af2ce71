//! Nothing lost, nothing hangs: controller restarts, dead callees, bad input, limits,
//! overload and graceful stop, with real processes and sockets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, Log, StandaloneController, Transport, WAIT};
use daffi::{callback, Address, Error, Global};
use daffi_wire::{preamble, Header, Kind, PROTOCOL_VERSION};

const ENTRY: &str = "child_process";

// ---- callbacks served by every process of this binary --------------------------------

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

#[callback]
fn slow_sync(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

static RUNNING: Log<()> = Log::new();

/// Sleeps `ms` after saying it runs (see `wait_running`).
#[callback]
fn signal_then_sleep(ms: u64, value: i64) -> i64 {
    RUNNING.push(());
    std::thread::sleep(Duration::from_millis(ms));
    value
}

/// Returns once `signal_then_sleep` runs here (or after `timeout_ms`).
#[callback]
fn wait_running(timeout_ms: u64) -> usize {
    RUNNING.wait_until(timeout_ms, |r| !r.is_empty()).len()
}

static ONE_WAY: Log<()> = Log::new();

/// A NO_RETURN target that takes `ms` and counts itself.
#[callback]
fn count_one_way(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
    ONE_WAY.push(());
}

/// How many `count_one_way` calls ran here, once `want` did (or after `timeout_ms`).
#[callback]
fn one_way_count(want: u64, timeout_ms: u64) -> u64 {
    ONE_WAY
        .wait_until(timeout_ms, |n| n.len() as u64 >= want)
        .len() as u64
}

/// Lists inside one another (`In(In(..End))`), built, measured and dropped without
/// recursion, so that a test can hold one deeper than any stack.
#[derive(serde::Serialize, serde::Deserialize)]
enum Nested {
    End,
    In(Box<Nested>),
}

impl Nested {
    fn deep(levels: u32) -> Nested {
        (0..levels).fold(Nested::End, |inner, _| Nested::In(Box::new(inner)))
    }

    fn levels(&self) -> u32 {
        std::iter::successors(Some(self), |n| match n {
            Nested::In(inner) => Some(&**inner),
            Nested::End => None,
        })
        .count() as u32
            - 1
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        if let Nested::In(inner) = self {
            let mut next = std::mem::replace(&mut **inner, Nested::End);
            while let Nested::In(inner) = &mut next {
                next = std::mem::replace(&mut **inner, Nested::End);
            }
        }
    }
}

#[callback]
fn nested_levels(value: Nested) -> u32 {
    value.levels()
}

#[callback]
fn nested_result(levels: u32) -> Nested {
    Nested::deep(levels)
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[
        ("controller", common::run_controller_role),
        ("worker", worker),
    ]);
}

/// A node that serves `stop_self`, with the stop timeout the test gave it.
fn worker() {
    let stop_timeout = std::env::var("DAFFI_TEST_STOP_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(5));
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .stop_timeout(stop_timeout)
        .max_sync_callbacks(64)
        .start()
        .expect("worker starts");
    let me = g.clone();
    g.register("stop_self", move || me.stop())
        .expect("register");
    g.join().expect("join");
}

// ---- reconnection --------------------------------------------------------------------

#[test]
fn calls_fail_by_name_during_a_controller_outage_and_work_again_after_it() {
    let mut controller = StandaloneController::start(ENTRY);
    let (events_tx, events) = mpsc::channel::<&'static str>();
    let (on_connect, on_disconnect) = (Mutex::new(events_tx.clone()), Mutex::new(events_tx));
    let caller = common::builder_for(&controller.address)
        .process_name(common::unique("caller"))
        .on_node_connect(move |_, _| {
            let _ = on_connect.lock().expect("lock").send("connect");
        })
        .on_node_disconnect(move |_, _| {
            let _ = on_disconnect.lock().expect("lock").send("disconnect");
        })
        .start()
        .expect("caller");
    assert_eq!(events.recv_timeout(WAIT), Ok("connect"));
    let worker = common::unique("worker");
    let _w = common::spawn_child(ENTRY, "worker", &worker, &controller.address);
    caller.wait_process_timeout(&worker, WAIT).expect("worker");

    // Calls run all along in the background; each must end in a value or a named error.
    let running = Arc::new(AtomicBool::new(true));
    let (outcomes_tx, outcomes) = mpsc::channel::<Result<i64, Error>>();
    let background = {
        let (caller, running) = (caller.clone(), running.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                let outcome = caller.call("sync_add").args((1, 2)).timeout(WAIT).fg();
                let failed = outcome.is_err();
                if outcomes_tx.send(outcome).is_err() {
                    break;
                }
                if failed {
                    // While the controller is away, do not spin.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };
    let check = |outcome: Result<i64, Error>| -> bool {
        match outcome {
            Ok(3) => true,
            Err(Error::ControllerUnreachable { .. })
            | Err(Error::NoProvider { .. })
            | Err(Error::PeerDisconnected { .. }) => false,
            other => panic!("a call ended in neither a value nor a named outage error: {other:?}"),
        }
    };
    let next_success = || {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if check(outcomes.recv_timeout(WAIT).expect("background calls go on")) {
                return;
            }
        }
        panic!("no call succeeded within {WAIT:?}");
    };
    next_success();

    controller.kill();
    assert_eq!(events.recv_timeout(WAIT), Ok("disconnect"));
    match caller.call("sync_add").args((1, 2)).fg::<i64>() {
        Err(Error::ControllerUnreachable { .. }) => {}
        other => panic!("expected ControllerUnreachable during the outage, got {other:?}"),
    }

    controller.restart();
    assert_eq!(events.recv_timeout(WAIT), Ok("connect"));
    caller
        .wait_process_timeout(&worker, WAIT)
        .expect("the worker reconnects by itself");
    assert_eq!(
        caller
            .call("sync_add")
            .args((2, 3))
            .fg::<i64>()
            .expect("after"),
        5
    );
    // The background calls recover too, without any user code.
    next_success();

    running.store(false, Ordering::Relaxed);
    drop(outcomes);
    background.join().expect("background thread");
}

// ---- dead callee ---------------------------------------------------------------------

#[test]
fn every_caller_hears_within_a_second_when_the_callee_dies() {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let victim = common::unique("victim");
    cluster.spawn_worker(&victim);
    let second = common::builder_for(&cluster.address)
        .process_name(common::unique("caller2"))
        .start()
        .expect("second caller");
    second
        .wait_process_timeout(&victim, WAIT)
        .expect("victim known");
    let calls: Vec<_> = [&cluster.caller, &second]
        .iter()
        .map(|g| {
            g.call("signal_then_sleep")
                .args((120_000u64, 1i64))
                .on(&victim)
                .timeout(Duration::from_secs(120))
                .bg::<i64>()
                .expect("bg")
        })
        .collect();
    let running: usize = cluster
        .caller
        .call("wait_running")
        .args((WAIT.as_millis() as u64,))
        .on(&victim)
        .fg()
        .expect("running");
    assert!(running >= 1);
    cluster.worker(&victim).kill();
    for call in calls {
        match call.get_timeout(Duration::from_secs(1)) {
            Err(Error::PeerDisconnected { process, .. }) => assert_eq!(process, victim),
            other => panic!("expected PeerDisconnected within a second, got {other:?}"),
        }
    }
    // And the dead node is out of every view: broadcasts skip it.
    assert!(matches!(
        second.call("sync_add").args((1, 1)).broadcast::<i64>(),
        Ok(all) if !all.contains_key(&victim)
    ));
}

// ---- bad input -----------------------------------------------------------------------

/// Reads until the peer closes; returns what it sent. Fails if it stays open.
fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => got,
        // A reset also means the controller closed it.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => got,
        Err(e) => panic!("the controller kept a bad connection open: {e}"),
    }
}

#[test]
fn bad_input_closes_only_that_connection() {
    let caller = Global::builder()
        .process_name(common::unique("caller"))
        .host("127.0.0.1")
        .init_controller(true)
        .handshake_timeout(Duration::from_millis(500))
        .max_frame_size(64 * 1024)
        .start()
        .expect("controller");
    let worker = common::unique("worker");
    let _w = common::spawn_child(ENTRY, "worker", &worker, caller.address());
    caller.wait_process_timeout(&worker, WAIT).expect("worker");
    let port = caller.port().expect("tcp");
    let connect = || TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let still_works = |round: i64| {
        let sum: i64 = caller
            .call("sync_add")
            .args((round, 1))
            .on(&worker)
            .timeout(WAIT)
            .fg()
            .expect("the other node still works");
        assert_eq!(sum, round + 1);
    };

    // Idle connections that never say anything, held while the rest goes on.
    let flood: Vec<TcpStream> = (0..200).map(|_| connect()).collect();
    still_works(0);

    // Random bytes instead of the preamble.
    let mut garbage = connect();
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = garbage.write_all(&noise);
    read_until_closed(&mut garbage);
    still_works(1);

    // The wrong protocol version gets a `Refused` frame, then the close.
    let mut old = connect();
    old.write_all(&preamble(999)).expect("write");
    let answer = read_until_closed(&mut old);
    assert!(
        answer.len() > 5 && answer[4] == Kind::Refused as u8,
        "{answer:?}"
    );
    still_works(2);

    // A length prefix over the limit.
    let mut oversized = connect();
    let mut bytes = preamble(PROTOCOL_VERSION).to_vec();
    bytes.extend_from_slice(&(u32::MAX).to_be_bytes());
    oversized.write_all(&bytes).expect("write");
    read_until_closed(&mut oversized);
    still_works(3);

    // A truncated frame, then the sender stops writing.
    let mut truncated = connect();
    let mut bytes = preamble(PROTOCOL_VERSION).to_vec();
    bytes.extend_from_slice(&100u32.to_be_bytes());
    bytes.extend_from_slice(&[1, 0, 0]);
    truncated.write_all(&bytes).expect("write");
    truncated
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    read_until_closed(&mut truncated);

    // A handshake that never completes is closed after the handshake timeout.
    let mut silent = connect();
    silent
        .write_all(&preamble(PROTOCOL_VERSION))
        .expect("write");
    let started = Instant::now();
    read_until_closed(&mut silent);
    assert!(started.elapsed() < WAIT);
    still_works(4);

    // A joined node that then sends a frame of an unknown kind.
    let mut rogue = connect();
    let mut bytes = common::wire::opening(&common::unique("rogue"), None, &[]);
    let mut bad = Header::control(Kind::Request).encode(0).to_vec();
    bad[4] = 250; // no such kind
    bytes.extend_from_slice(&bad);
    rogue.write_all(&bytes).expect("write");
    let answer = read_until_closed(&mut rogue);
    assert_eq!(answer.get(4), Some(&(Kind::Welcome as u8)), "joined first");
    still_works(5);

    // The idle flood was closed by the handshake timeout, and nobody else noticed.
    for mut idle in flood {
        read_until_closed(&mut idle);
    }
    still_works(6);
    assert_eq!(caller.registered_callbacks()["sync_add"].len(), 2);
}

// ---- limits and backpressure ---------------------------------------------------------

#[test]
fn an_argument_over_the_frame_limit_fails_at_the_caller_before_sending() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    let worker = common::unique("limit");
    cluster.spawn_worker(&worker);
    let small = common::builder_for(&cluster.address)
        .process_name(common::unique("small"))
        .max_frame_size(1024)
        .start()
        .expect("node with a small limit");
    small.wait_process_timeout(&worker, WAIT).expect("worker");
    let big = "x".repeat(4096);
    match small.call("sync_add").args((big, 1)).fg::<i64>() {
        Err(e @ Error::PayloadTooLarge { limit: 1024, .. }) => {
            assert!(e.to_string().contains("1024"), "{e}")
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    // Nothing was sent, nothing broke.
    assert_eq!(
        small
            .call("sync_add")
            .args((1, 1))
            .fg::<i64>()
            .expect("after"),
        2
    );
}

#[test]
fn a_value_nested_too_deep_fails_by_name_on_the_caller_and_on_the_callee() {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("deep");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    let call = |name: &str| g.call(name).on(&worker).timeout(WAIT);

    // The caller's own argument: refused before anything is sent, with the limit.
    match call("nested_levels")
        .args((Nested::deep(100_000),))
        .fg::<u32>()
    {
        Err(Error::Encode { message, .. }) => {
            assert!(
                message.contains("nested deeper than 1023 levels"),
                "{message}"
            )
        }
        other => panic!("expected Error::Encode, got {other:?}"),
    }
    let fits: u32 = call("nested_levels")
        .args((Nested::deep(1000),))
        .fg()
        .expect("a value within the limit");
    assert_eq!(fits, 1000);

    // A callee's result: its caller gets the reason, and the callee goes on serving.
    match call("nested_result").args((100_000u32,)).fg::<Nested>() {
        Err(Error::Remote {
            message,
            panicked: false,
            ..
        }) => assert!(
            message.contains("could not encode the result")
                && message.contains("nested deeper than 1023 levels"),
            "{message}"
        ),
        other => panic!(
            "expected Error::Remote, got {:?}",
            other.map(|n| n.levels())
        ),
    }
    let sum: i64 = call("sync_add").args((2, 3)).fg().expect("still serving");
    assert_eq!(sum, 5);
}

/// Peak resident memory of a process, from /proc.

#[test]
fn a_slow_callee_flooded_by_fast_callers_keeps_the_controller_bounded() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = Cluster::with_standalone(&controller);
    let slow = common::unique("slow");
    cluster.spawn_worker(&slow);
    let fast_callers: Vec<Global> = (0..3)
        .map(|i| {
            common::builder_for(&controller.address)
                .process_name(common::unique(&format!("fast{i}")))
                .max_in_flight(2_000)
                .start()
                .expect("caller")
        })
        .collect();
    for c in &fast_callers {
        c.wait_process_timeout(&slow, WAIT).expect("slow known");
    }
    let pid = controller.pid().expect("controller pid");
    let before = common::peak_rss_kib(pid);

    const PER_CALLER: usize = 5_000;
    let flooders: Vec<_> = fast_callers
        .iter()
        .map(|g| {
            let (g, slow) = (g.clone(), slow.clone());
            std::thread::spawn(move || {
                let calls: Vec<_> = (0..PER_CALLER)
                    .map(|_| {
                        g.call("slow_sync")
                            .args((20u64,))
                            .on(&slow)
                            .timeout(Duration::from_secs(60))
                            .bg::<u64>()
                            .expect("bg")
                    })
                    .collect();
                let mut tally = (0usize, 0usize);
                for call in calls {
                    match call.get() {
                        Ok(20) => tally.0 += 1,
                        Err(Error::Overloaded { .. }) => tally.1 += 1,
                        other => panic!("a flooded call ended badly: {other:?}"),
                    }
                }
                tally
            })
        })
        .collect();
    let (mut ok, mut overloaded) = (0, 0);
    for f in flooders {
        let (o, v) = f.join().expect("flooder");
        ok += o;
        overloaded += v;
    }
    assert_eq!(ok + overloaded, 3 * PER_CALLER, "every call accounted for");
    assert!(ok > 0 && overloaded > 0, "ok {ok}, overloaded {overloaded}");
    let after = common::peak_rss_kib(pid);
    eprintln!(
        "controller peak RSS before/after the flood: {before:?} / {after:?} KiB; {ok} served, {overloaded} refused as overloaded"
    );
    if let Some(after) = after {
        assert!(after < 128 * 1024, "controller peak RSS {after} KiB");
    }
}

// ---- graceful stop -------------------------------------------------------------------

#[test]
fn a_burst_of_no_return_calls_beyond_the_callback_limit_runs_in_full() {
    // The worker runs at most 64 sync callbacks at once; NO_RETURN calls beyond that wait for
    // a thread instead of being dropped (their callers could not be told), and do not
    // crowd out a call that wants a reply.
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("sink");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    const BURST: u64 = 64 * 32;
    for _ in 0..BURST {
        g.call("count_one_way")
            .args((10u64,))
            .on(&worker)
            .no_return()
            .expect("sent");
    }
    let sum: i64 = g
        .call("sync_add")
        .args((1, 2))
        .on(&worker)
        .timeout(WAIT)
        .fg()
        .expect("a call with a reply is not refused while NO_RETURN calls wait");
    assert_eq!(sum, 3);
    let counted: u64 = g
        .call("one_way_count")
        .args((BURST, WAIT.as_millis() as u64))
        .on(&worker)
        .timeout(WAIT + WAIT)
        .fg()
        .expect("count");
    assert_eq!(counted, BURST, "every NO_RETURN call ran");
}

/// Starts a call to `worker` that sleeps `ms` and returns `value`, waits until it runs
/// there, then tells `worker` to stop. Returns the call in flight.
fn stop_while_running(g: &Global, worker: &str, ms: u64, value: i64) -> daffi::AsyncResult<i64> {
    g.wait_function_timeout("stop_self", WAIT)
        .expect("stop_self announced");
    let running = g
        .call("signal_then_sleep")
        .args((ms, value))
        .on(worker)
        .bg::<i64>()
        .expect("bg");
    let started: usize = g
        .call("wait_running")
        .args((WAIT.as_millis() as u64,))
        .on(worker)
        .fg()
        .expect("running");
    assert_eq!(started, 1);
    g.call("stop_self").on(worker).no_return().expect("stop it");
    running
}

#[test]
fn stop_lets_running_calls_finish_and_refuses_new_ones_by_name() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    let worker = common::unique("stopping");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    let running = stop_while_running(g, &worker, 400, 9);
    // The call it was serving finishes with its value.
    assert_eq!(
        running.get_timeout(WAIT).expect("finished during the stop"),
        9
    );
    // New calls to it get a clean, named error.
    match g
        .call("sync_add")
        .args((1, 2))
        .on(&worker)
        .timeout(WAIT)
        .fg::<i64>()
    {
        Err(Error::PeerStopped { process, .. }) | Err(Error::UnknownProcess { process }) => {
            assert_eq!(process, worker)
        }
        other => panic!("expected PeerStopped, got {other:?}"),
    }
    cluster.worker(&worker).wait_success();
}

#[test]
fn a_call_outliving_the_stop_timeout_gets_peer_stopped() {
    let cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("deadline");
    let child = common::spawn_child_with(
        ENTRY,
        "worker",
        &worker,
        &cluster.address,
        &[("DAFFI_TEST_STOP_TIMEOUT_MS", "200")],
    );
    let long = stop_while_running(&cluster.caller, &worker, 60_000, 1);
    match long.get_timeout(WAIT) {
        Err(Error::PeerStopped { process, callback }) => {
            assert_eq!(
                (process.as_str(), callback.as_str()),
                (worker.as_str(), "signal_then_sleep")
            )
        }
        other => panic!("expected PeerStopped, got {other:?}"),
    }
    drop(child);
}

/// A process that ran the controller, stopped and joined, starts it again on the same
/// address at once (`join` returns once the listener is closed: the port is free, the
/// socket file gone), and its nodes in other processes come back by themselves. Several
/// rounds, so that a listener closed a moment after `join` would show.
#[test]
fn a_joined_controller_starts_again_on_its_address_at_once() {
    for transport in [Transport::Tcp, Transport::Unix] {
        let Cluster {
            address,
            mut caller,
            ..
        } = Cluster::start(transport, ENTRY);
        let worker = common::unique("comes-back");
        let mut child = common::spawn_child(ENTRY, "worker", &worker, &address);
        for round in 0..5 {
            caller
                .wait_process_timeout(&worker, WAIT)
                .unwrap_or_else(|e| panic!("{transport:?} round {round}: worker: {e}"));
            let sum: i64 = caller
                .call("sync_add")
                .args((round, 1))
                .on(&worker)
                .timeout(WAIT)
                .fg()
                .unwrap_or_else(|e| panic!("{transport:?} round {round}: call: {e}"));
            assert_eq!(sum, round + 1);
            caller.stop();
            caller.join().expect("join");
            if let Address::Unix(path) = &address {
                assert!(!path.exists(), "{} outlived join", path.display());
            }
            drop(caller);
            caller = common::builder_for(&address)
                .process_name(common::unique("caller"))
                .init_controller(true)
                .start()
                .unwrap_or_else(|e| {
                    panic!("{transport:?} round {round}: the controller starts again: {e}")
                });
        }
        caller
            .wait_process_timeout(&worker, WAIT)
            .expect("the worker comes back after the last start");
        caller
            .call("stop_self")
            .on(&worker)
            .timeout(WAIT)
            .fg::<()>()
            .expect("the worker stops");
        child.wait_success();
    }
}
