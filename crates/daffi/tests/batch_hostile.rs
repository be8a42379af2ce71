//! Hostile cases of the batch paths (issue 17, B), with real processes over real
//! sockets:
//! - a quick sync callback that turns slow in the middle of a batch answers every call
//!   once and right, and never runs more than `max_sync_callbacks` at once (the calls
//!   not run yet go to the callback threads, each still counted);
//! - a callee killed (SIGKILL) while a batch of calls to it is being served, with more
//!   queued behind it: every call ends, with its result or an error naming the callee,
//!   from the sync API and from the async API in the user's own `#[tokio::main]`;
//! - a caller's `max_in_flight`: many more calls than it allows, with short timeouts,
//!   some futures dropped while others wait: each ends by name, no slot is leaked, and
//!   the callee never sees more than `max_in_flight` of them at once.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{Worker, WAIT};
use daffi::{callback, Address, AsyncResult, Error, Global};

const ENTRY: &str = "batch_hostile_process";

/// A child's `max_sync_callbacks`, when set.
const ENV_MAX_SYNC: &str = "DAFFI_TEST_MAX_SYNC";
/// The node a child caller's callee tells when it holds a call.
const ENV_PING: &str = "DAFFI_TEST_PING";

/// Calls a flood keeps in flight.
const WINDOW: usize = 256;

// ---- callbacks served by every worker of this binary -------------------------------

/// Callbacks of this file running here now, and the most that ever ran at once.
static RUNNING: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

/// Counts a callback as running while it lives.
struct Running;

impl Running {
    fn begin() -> Running {
        let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
        PEAK.fetch_max(now, Ordering::SeqCst);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The most callbacks of this file that ran here at once.
#[callback]
fn peak() -> u64 {
    PEAK.load(Ordering::SeqCst)
}

/// `turns` runs here so far.
static TURNS: AtomicU64 = AtomicU64::new(0);
/// What `turns` ran here: (tag, i).
static TURNED: common::Log<(String, u64)> = common::Log::new();
/// `turns` is quick for this many runs.
const QUICK_FIRST: u64 = 1_000;
/// After them, each `i` divisible by this takes [`SLOW`].
const SLOW_EVERY: u64 = 48;
const SLOW: Duration = Duration::from_millis(20);

/// Gives back its arguments: quick for its first [`QUICK_FIRST`] runs here, then slow
/// ([`SLOW`]) for every `i` divisible by [`SLOW_EVERY`], mid-batch.
#[callback]
fn turns(tag: String, i: u64) -> (String, u64) {
    let _running = Running::begin();
    let run = TURNS.fetch_add(1, Ordering::SeqCst) + 1;
    if run > QUICK_FIRST && i % SLOW_EVERY == 0 {
        // Slow on purpose: that is this callback's work.
        std::thread::sleep(SLOW);
    }
    TURNED.push((tag.clone(), i));
    (tag, i)
}

/// How many `turns` calls tagged `tag` ran here once `n` did (or after `timeout_ms`),
/// and the first of 0..`n` missing or repeated among them.
#[callback]
fn each_once(tag: String, n: u64, timeout_ms: u64) -> (u64, Option<u64>) {
    let mut ran = TURNED.tagged(&tag, n as usize, timeout_ms);
    ran.sort_unstable();
    let first_wrong =
        common::first_missing(&ran, n).or_else(|| (ran.len() as u64 > n).then_some(n));
    (ran.len() as u64, first_wrong)
}

/// The `gate` calls holding now, and which release they wait for.
struct Gate {
    holding: u64,
    releases: u64,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    holding: 0,
    releases: 0,
});
static GATE_CHANGED: Condvar = Condvar::new();
/// `gate` runs here so far.
static GATE_RUNS: AtomicU64 = AtomicU64::new(0);

fn gate_lock() -> std::sync::MutexGuard<'static, Gate> {
    GATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// With `hold`, waits until the next `release_gate` (at most twice `WAIT`, longer than
/// any call of the tests waits); without, returns at once. Gives back `i`.
#[callback]
fn gate(i: u64, hold: bool) -> u64 {
    let _running = Running::begin();
    GATE_RUNS.fetch_add(1, Ordering::SeqCst);
    if hold {
        let mut g = gate_lock();
        g.holding += 1;
        GATE_CHANGED.notify_all();
        let release = g.releases + 1;
        let (mut g, _) = GATE_CHANGED
            .wait_timeout_while(g, 2 * WAIT, |g| g.releases < release)
            .unwrap_or_else(|e| e.into_inner());
        g.holding -= 1;
    }
    i
}

/// Gives back `i` at once (counted with the `gate` calls).
#[callback]
fn pass(i: u64) -> u64 {
    let _running = Running::begin();
    GATE_RUNS.fetch_add(1, Ordering::SeqCst);
    i
}

/// Waits until `n` `gate` calls hold (or `timeout_ms` passes); how many hold then.
#[callback]
fn wait_holding(n: u64, timeout_ms: u64) -> u64 {
    let g = gate_lock();
    let (g, _) = GATE_CHANGED
        .wait_timeout_while(g, Duration::from_millis(timeout_ms), |g| g.holding < n)
        .unwrap_or_else(|e| e.into_inner());
    g.holding
}

/// Ends every `gate` call holding now.
#[callback]
fn release_gate() {
    gate_lock().releases += 1;
    GATE_CHANGED.notify_all();
}

/// `gate` and `pass` runs here so far, and the most callbacks of this file that ran at once.
#[callback]
fn gate_stats() -> (u64, u64) {
    (
        GATE_RUNS.load(Ordering::SeqCst),
        PEAK.load(Ordering::SeqCst),
    )
}

// ---- child roles ---------------------------------------------------------------------

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn batch_hostile_process() {
    common::run_role(&[
        ("controller", common::run_controller_role),
        ("worker", worker),
        ("async_caller", async_caller),
    ]);
}

/// A node serving the `#[callback]` functions of this file, and `stall(ping, tag, i,
/// hold_at)`: gives back `(tag, i)`; for `i == hold_at` it first tells node `ping`
/// (its `held(i)`, NO_RETURN) and then holds for twice `WAIT` (it is killed first).
fn worker() {
    let mut b = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"));
    if let Some(limit) = common::setting(ENV_MAX_SYNC) {
        b = b.max_sync_callbacks(limit);
    }
    let g = b.start().expect("worker starts");
    let me = g.clone();
    g.register(
        "stall",
        move |ping: String, tag: String, i: u64, hold_at: u64| -> (String, u64) {
            if i == hold_at {
                me.call("held")
                    .args((i,))
                    .on(&ping)
                    .no_return()
                    .expect("tell the test");
                // Slow on purpose, until killed.
                std::thread::sleep(2 * WAIT);
            }
            (tag, i)
        },
    )
    .expect("register stall");
    g.join().expect("join");
}

/// A user's program with its own runtime: warms `stall` up on the target (quick calls),
/// then sends [`WINDOW`] BG calls (awaited with `.await`) and 64 `fg_async` calls (in
/// tasks of its own), one of which (`i == HOLD_AT`) holds the callee until the test
/// kills it. Exits with success only if every call ended with its result or an error
/// naming the callee, the held one with an error.
#[tokio::main]
async fn async_caller() {
    let ping = std::env::var(ENV_PING).expect("ping");
    let (g, target) = common::async_child_and_target().await;
    // `stall` is registered once the worker runs.
    g.wait_function_timeout_async("stall", WAIT)
        .await
        .expect("stall known");
    for i in 0..50u64 {
        let got: (String, u64) = g
            .call("stall")
            .args((&ping, "warm", i, u64::MAX))
            .on(&target)
            .timeout(WAIT)
            .fg_async()
            .await
            .expect("warm-up");
        assert_eq!(got, ("warm".to_string(), i));
    }
    let mut bg = Vec::new();
    for i in 0..WINDOW as u64 {
        let call = g
            .call("stall")
            .args((&ping, "bg", i, HOLD_AT))
            .on(&target)
            .timeout(WAIT + WAIT)
            .bg::<(String, u64)>()
            .expect("bg");
        bg.push((i, call));
    }
    let mut fg = Vec::new();
    for i in WINDOW as u64..WINDOW as u64 + 64 {
        let call = g
            .call("stall")
            .args((&ping, "fg", i, HOLD_AT))
            .on(&target)
            .timeout(WAIT + WAIT);
        fg.push((i, tokio::spawn(call.fg_async::<(String, u64)>())));
    }
    let mut failed = Vec::new();
    for (i, call) in bg {
        if !ended_by_name(&target, "bg", i, call.await) {
            failed.push(i);
        }
    }
    for (i, task) in fg {
        if !ended_by_name(&target, "fg", i, task.await.expect("the task")) {
            failed.push(i);
        }
    }
    assert!(
        failed.contains(&HOLD_AT),
        "the held call failed: {failed:?}"
    );
    g.stop();
    g.join_async().await;
}

/// The call of `stall` that holds its callee until killed.
const HOLD_AT: u64 = 100;

// ---- helpers -------------------------------------------------------------------------

/// Checks a call of `stall(.., tag, i, ..)` to `callee`, which was killed: its result,
/// or an error naming the callee (never a timeout, never another error). Whether it
/// got its result.
fn ended_by_name(callee: &str, tag: &str, i: u64, got: daffi::Result<(String, u64)>) -> bool {
    match got {
        Ok(value) => {
            assert_ne!(i, HOLD_AT, "the held call was answered");
            assert_eq!(value, (tag.to_string(), i), "the reply of call {i}");
            true
        }
        Err(Error::PeerDisconnected { process, .. }) | Err(Error::UnknownProcess { process }) => {
            assert_eq!(process, callee, "call {i}");
            false
        }
        Err(e) => panic!("call {i} to the killed callee: {e}"),
    }
}

/// A standalone controller in a child process on a fresh Unix socket.
fn controller() -> (Address, Worker) {
    let path = std::env::temp_dir()
        .join("daffi-tests")
        .join(format!("{}.sock", common::unique("hostile-batches")));
    let address = Address::Unix(path);
    let process = common::spawn_child(ENTRY, "controller", "controller", &address);
    (address, process)
}

fn node(address: &Address) -> Global {
    common::builder_for(address)
        .process_name(common::unique("caller"))
        .start()
        .expect("node starts")
}

fn spawn_worker(address: &Address, g: &Global, env: &[(&str, &str)]) -> (String, Worker) {
    common::spawn_known_worker(ENTRY, address, g, "callee", env)
}

/// Registers `held(i)` on `g`: the `i` of each call that holds a callee, in order.
fn on_held(g: &Global) -> std::sync::mpsc::Receiver<u64> {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    g.register("held", move |i: u64| {
        let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(i);
    })
    .expect("register held");
    rx
}

// ---- (1) a quick callback that turns slow mid-batch ----------------------------------

/// A flood of `calls` calls of `turns`, [`WINDOW`] BG calls in flight, to a callee with
/// `max_sync_callbacks = limit` (`None`: the default, 1,024). Every call is answered
/// right, once; those refused `Overloaded` (by name) are sent again; the callee never
/// ran more than the limit at once.
fn slow_mid_batch(limit: Option<u64>, tag: &str, calls: u64) -> u64 {
    let (address, _controller) = controller();
    let caller = node(&address);
    let limit_text = limit.map(|l| l.to_string());
    let env: Vec<(&str, &str)> = limit_text
        .as_deref()
        .map(|l| vec![(ENV_MAX_SYNC, l)])
        .unwrap_or_default();
    let (callee, _callee_process) = spawn_worker(&address, &caller, &env);

    let mut overloaded = 0u64;
    let mut in_flight: VecDeque<(u64, AsyncResult<(String, u64)>)> = VecDeque::new();
    let send = |i: u64| {
        let call = caller
            .call("turns")
            .args((tag, i))
            .on(&callee)
            .timeout(WAIT + WAIT)
            .bg::<(String, u64)>()
            .expect("bg");
        (i, call)
    };
    let mut next = 0u64;
    while next < calls || !in_flight.is_empty() {
        while next < calls && in_flight.len() < WINDOW {
            in_flight.push_back(send(next));
            next += 1;
        }
        let (i, call) = in_flight.pop_front().expect("one");
        match call.get_timeout(WAIT + WAIT) {
            Ok(value) => assert_eq!(value, (tag.to_string(), i), "the reply of call {i}"),
            Err(Error::Overloaded { process, callback }) if limit.is_some() => {
                assert_eq!((process.as_str(), callback.as_str()), (&*callee, "turns"));
                overloaded += 1;
                in_flight.push_back(send(i));
            }
            Err(e) => panic!("call {i}: {e}"),
        }
    }
    let (ran, first_wrong): (u64, Option<u64>) = caller
        .call("each_once")
        .args((tag, calls, WAIT.as_millis() as u64))
        .on(&callee)
        .timeout(WAIT + WAIT)
        .fg()
        .expect("each_once");
    assert!(
        ran == calls && first_wrong.is_none(),
        "{ran} calls ran of {calls}; first missing or repeated: {first_wrong:?}"
    );
    let peak: u64 = caller
        .call("peak")
        .on(&callee)
        .timeout(WAIT)
        .fg()
        .expect("peak");
    assert!(
        peak <= limit.unwrap_or(1_024),
        "{peak} callbacks ran at once (max_sync_callbacks = {limit:?})"
    );
    overloaded
}

#[test]
fn a_callback_turning_slow_mid_batch_answers_every_call_once() {
    let overloaded = slow_mid_batch(None, "default", 6_000);
    assert_eq!(overloaded, 0, "never past the default limit");
}

#[test]
fn a_callback_turning_slow_mid_batch_stays_within_max_sync_callbacks() {
    // Past the limit, calls are refused by name and sent again: each still runs once.
    slow_mid_batch(Some(12), "limited", 3_000);
}

/// The calls of a batch behind a quick callback's call that turns slow on a runtime
/// worker run on other threads meanwhile, as lone calls queued behind it do: a burst of
/// calls that each wait for the others to have started all start. (A batch is one job;
/// the node's watch takes the calls it has not run yet once one runs slow.)
#[test]
fn the_calls_of_a_batch_behind_a_call_that_turned_slow_run_meanwhile() {
    const BURST: u64 = 8;
    let (address, _controller) = controller();
    let caller = node(&address);
    let observer = node(&address);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    observer
        .wait_process_timeout(&callee, WAIT)
        .expect("callee known");
    // Quick runs first: `gate` is then served on the runtime worker that reads it.
    for i in 0..50u64 {
        let got: u64 = caller
            .call("gate")
            .args((i, false))
            .on(&callee)
            .timeout(WAIT)
            .fg()
            .expect("warm-up");
        assert_eq!(got, i);
    }
    let burst: Vec<AsyncResult<u64>> = (0..BURST)
        .map(|i| {
            caller
                .call("gate")
                .args((i, true))
                .on(&callee)
                .timeout(WAIT + WAIT)
                .bg()
                .expect("bg")
        })
        .collect();
    let holding: u64 = observer
        .call("wait_holding")
        .args((BURST, WAIT.as_millis() as u64))
        .on(&callee)
        .timeout(WAIT + WAIT)
        .fg()
        .expect("wait_holding");
    assert_eq!(holding, BURST, "calls of the burst running at once");
    observer
        .call("release_gate")
        .on(&callee)
        .timeout(WAIT)
        .fg::<()>()
        .expect("release_gate");
    for (i, call) in burst.into_iter().enumerate() {
        assert_eq!(call.get_timeout(WAIT + WAIT).expect("burst call"), i as u64);
    }
}

// ---- (2) a callee killed while a batch to it is served -------------------------------

#[test]
fn a_callee_killed_while_serving_a_batch_ends_every_sync_call_by_name() {
    let (address, _controller) = controller();
    let caller = node(&address);
    let held = on_held(&caller);
    let (callee, mut callee_process) = spawn_worker(&address, &caller, &[]);
    // `stall` is registered once the worker runs.
    caller
        .wait_function_timeout("stall", WAIT)
        .expect("stall known");
    let me = caller.process_name().to_string();
    for i in 0..50u64 {
        let got: (String, u64) = caller
            .call("stall")
            .args((&me, "warm", i, u64::MAX))
            .on(&callee)
            .timeout(WAIT)
            .fg()
            .expect("warm-up");
        assert_eq!(got, ("warm".to_string(), i));
    }
    // A flood, WINDOW calls in flight, until WINDOW calls after the kill (or the
    // callee is gone from the view); call HOLD_AT holds the callee in the middle of a
    // batch, and the test kills it then.
    let killed = Arc::new(AtomicBool::new(false));
    let flood = {
        let (caller, callee, me) = (caller.clone(), callee.clone(), me.clone());
        let killed = killed.clone();
        std::thread::spawn(move || {
            let (mut answered, mut failed, mut sent) = (0u64, Vec::new(), 0u64);
            let mut in_flight = VecDeque::new();
            let mut after_kill = 0;
            let mut finish = |(i, call): (u64, AsyncResult<(String, u64)>)| {
                // Bounded: a call that hangs fails the test as a timeout.
                if ended_by_name(&callee, "flood", i, call.get_timeout(WAIT + WAIT)) {
                    answered += 1;
                } else {
                    failed.push(i);
                }
            };
            for i in 0u64.. {
                if killed.load(Ordering::SeqCst) {
                    after_kill += 1;
                    if after_kill > WINDOW {
                        break;
                    }
                }
                match caller
                    .call("stall")
                    .args((&me, "flood", i, HOLD_AT))
                    .on(&callee)
                    .timeout(WAIT + WAIT)
                    .bg::<(String, u64)>()
                {
                    Ok(call) => in_flight.push_back((i, call)),
                    // Gone from the view: no call is sent any more.
                    Err(Error::NoProvider { .. } | Error::UnknownProcess { .. }) => break,
                    Err(e) => panic!("call {i}: {e}"),
                }
                sent += 1;
                if in_flight.len() >= WINDOW {
                    finish(in_flight.pop_front().expect("one"));
                }
            }
            in_flight.into_iter().for_each(&mut finish);
            (sent, answered, failed)
        })
    };
    let at = held.recv_timeout(WAIT).expect("the callee holds a call");
    assert_eq!(at, HOLD_AT);
    callee_process.kill();
    killed.store(true, Ordering::SeqCst);
    let (sent, answered, failed) = flood.join().expect("the flood");
    assert_eq!(answered + failed.len() as u64, sent, "every call ended");
    assert!(
        failed.contains(&HOLD_AT),
        "the held call failed: {failed:?}"
    );
}

#[test]
fn a_callee_killed_while_serving_a_batch_ends_every_async_call_by_name() {
    let (address, _controller) = controller();
    let caller = node(&address);
    let held = on_held(&caller);
    let (callee, mut callee_process) = spawn_worker(&address, &caller, &[]);
    let mut async_process = common::spawn_child_with(
        ENTRY,
        "async_caller",
        &common::unique("async-caller"),
        &address,
        &[
            (common::ENV_TARGET, &callee),
            (ENV_PING, caller.process_name()),
        ],
    );
    let at = held.recv_timeout(WAIT).expect("the callee holds a call");
    assert_eq!(at, HOLD_AT);
    callee_process.kill();
    async_process.wait_success();
}

// ---- (3) a caller's in-flight slots ----------------------------------------------------

#[test]
fn max_in_flight_leaks_no_slot_when_waiters_time_out_or_are_dropped() {
    const MAX: u64 = 8;
    let (address, _controller) = controller();
    let observer = node(&address);
    let (callee, _callee_process) = spawn_worker(&address, &observer, &[]);
    let holding = |n: u64| -> u64 {
        observer
            .call("wait_holding")
            .args((n, WAIT.as_millis() as u64))
            .on(&callee)
            .timeout(WAIT + WAIT)
            .fg()
            .expect("wait_holding")
    };
    let release = || {
        observer
            .call("release_gate")
            .on(&callee)
            .timeout(WAIT)
            .fg::<()>()
            .expect("release_gate")
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let caller = runtime.block_on(async {
        let g = common::builder_for(&address)
            .process_name(common::unique("limited-caller"))
            .max_in_flight(MAX as usize)
            .start_async()
            .await
            .expect("caller starts");
        g.wait_process_timeout_async(&callee, WAIT)
            .await
            .expect("callee known");
        g
    });
    // Holders call `gate`, which is never quick; the others `pass`, which is.
    let gate = |i: u64, hold: bool, timeout: Option<Duration>| {
        let call = if hold {
            caller.call("gate").args((i, hold))
        } else {
            caller.call("pass").args((i,))
        };
        let call = call.on(&callee);
        match timeout {
            Some(t) => call.timeout(t),
            None => call,
        }
    };

    for round in 0..2u64 {
        // MAX calls hold every slot, all at the callee at once.
        let holders: Vec<AsyncResult<u64>> = (0..MAX)
            .map(|i| gate(i, true, Some(WAIT + WAIT)).bg().expect("bg"))
            .collect();
        assert_eq!(
            holding(MAX),
            MAX,
            "round {round}: MAX calls in flight at once"
        );

        // While no slot is free: calls with short timeouts (BG and async), futures
        // dropped while they wait, and calls that wait long enough for a slot.
        let short: Vec<AsyncResult<u64>> = (0..200)
            .map(|i| {
                gate(1_000 + i, false, Some(Duration::from_millis(30)))
                    .bg()
                    .expect("bg")
            })
            .collect();
        let patient: Vec<AsyncResult<u64>> = (0..50)
            .map(|i| gate(2_000 + i, false, Some(WAIT + WAIT)).bg().expect("bg"))
            .collect();
        let (short_async, dropped) = runtime.block_on(async {
            let short = (0..50).map(|i| {
                let call = gate(3_000 + i, false, Some(Duration::from_millis(30)));
                tokio::spawn(call.fg_async::<u64>())
            });
            let short: Vec<_> = short.collect();
            // The user's own timeout: the future is dropped while it waits.
            let dropped = (0..50).map(|i| {
                let call = gate(4_000 + i, false, None);
                tokio::spawn(async move {
                    tokio::time::timeout(Duration::from_millis(30), call.fg_async::<u64>()).await
                })
            });
            let dropped: Vec<_> = dropped.collect();
            let mut short_out = Vec::new();
            for task in short {
                short_out.push(task.await.expect("task"));
            }
            let mut dropped_out = Vec::new();
            for task in dropped {
                dropped_out.push(task.await.expect("task"));
            }
            (short_out, dropped_out)
        });
        for (i, call) in short.into_iter().enumerate() {
            match call.get_timeout(WAIT) {
                Err(Error::Timeout { what, .. }) => assert_eq!(what, "pass", "short call {i}"),
                other => panic!("short call {i} with no slot free: {other:?}"),
            }
        }
        for (i, got) in short_async.into_iter().enumerate() {
            match got {
                Err(Error::Timeout { what, .. }) => assert_eq!(what, "pass", "async call {i}"),
                other => panic!("async call {i} with no slot free: {other:?}"),
            }
        }
        assert!(
            dropped.iter().all(Result::is_err),
            "futures dropped while no slot was free"
        );

        // The holders end; the patient calls take their slots, MAX at a time at most.
        release();
        for (i, call) in holders.into_iter().enumerate() {
            assert_eq!(call.get_timeout(WAIT + WAIT).expect("holder"), i as u64);
        }
        for (i, call) in patient.into_iter().enumerate() {
            assert_eq!(
                call.get_timeout(WAIT + WAIT).expect("patient"),
                2_000 + i as u64
            );
        }
    }
    // Only the holders and the patient calls ran; never more than MAX at once.
    let (runs, peak): (u64, u64) = observer
        .call("gate_stats")
        .on(&callee)
        .timeout(WAIT)
        .fg()
        .expect("gate_stats");
    assert_eq!(runs, 2 * (MAX + 50), "only calls that had a slot ran");
    assert!(peak <= MAX, "{peak} calls of one caller ran at once");
    caller.stop();
    runtime.block_on(caller.join_async());
}
