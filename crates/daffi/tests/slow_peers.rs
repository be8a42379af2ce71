//! One paused, slow or hostile peer costs only itself: a node stopped with SIGSTOP, a
//! client that never reads, a controller that dies or stops reading. Real processes
//! and sockets; the standalone controller runs with a small queue limit and a short
//! stall timeout, as a user may configure them.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use common::{Log, Worker, WAIT};
use daffi::{callback, Address, AsyncResult, Blob, Error, Global, GlobalBuilder};

const ENTRY: &str = "child_process";

/// The controller's `max_queue_bytes` in these tests.
const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// The controller's `stall_timeout` in these tests: long enough for the checks made
/// while a node is stuck to finish before it is disconnected.
const STALL: Duration = Duration::from_secs(8);
/// Arguments of the calls that flood a stuck node.
const ARG_BYTES: usize = 64 * 1024;
/// Calls in one flood: 300 x 64 KiB is nearly 5 times the queue limit.
const FLOOD: usize = 300;

// ---- callbacks served by every worker of this binary -------------------------------

/// The worker's own node, for callbacks that call others (see [`own_node`]).
static NODE: Log<Global> = Log::new();

/// The worker's own node. A callback may run before `start` has returned it: the node
/// serves as soon as it is connected, and the test sees it (and calls it) from then on.
fn own_node() -> Global {
    NODE.wait_until(WAIT.as_millis() as u64, |node| !node.is_empty())
        .pop()
        .expect("the worker's node started")
}

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

#[callback]
fn echo_len(data: Blob) -> u64 {
    data.len() as u64
}

static RUNNING: Log<()> = Log::new();

/// Sleeps `ms` after saying it runs (see `wait_running`).
#[callback]
fn signal_then_sleep(ms: u64) -> u64 {
    RUNNING.push(());
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Returns once `signal_then_sleep` runs here (or after `timeout_ms`).
#[callback]
fn wait_running(timeout_ms: u64) -> usize {
    RUNNING.wait_until(timeout_ms, |r| !r.is_empty()).len()
}

/// From this worker: floods `callback` on `target` (see [`flood`]) and returns how each
/// call ended.
#[callback]
fn flood_from_here(callback: String, target: String, timeout_ms: u64) -> Vec<String> {
    let g = own_node();
    let calls = flood(&g, &callback, &target, Duration::from_millis(timeout_ms));
    calls.into_iter().map(|c| outcome(c.get())).collect()
}

/// From this worker: `sync_add(20, 22)` on `target`.
#[callback]
fn add_on(target: String) -> Result<i64, String> {
    let g = own_node();
    g.call("sync_add")
        .args((20, 22))
        .on(&target)
        .timeout(WAIT)
        .fg()
        .map_err(|e| e.to_string())
}

/// Whether this worker knows `process` within `timeout_ms`.
#[callback]
fn knows(process: String, timeout_ms: u64) -> bool {
    let g = own_node();
    g.wait_process_timeout(&process, Duration::from_millis(timeout_ms))
        .is_ok()
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[
        ("controller", common::run_limited_controller_role),
        ("worker", worker),
    ]);
}

/// A node serving the `#[callback]` functions of this file.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    NODE.push(g.clone());
    g.join().expect("join");
}

// ---- helpers -------------------------------------------------------------------------

/// A standalone controller in a child process, with [`QUEUE_BYTES`] and [`STALL`].
struct Controller {
    address: Address,
    process: Worker,
}

impl Controller {
    /// On a fresh Unix socket.
    fn unix() -> Controller {
        let path = std::env::temp_dir()
            .join("daffi-tests")
            .join(format!("{}.sock", common::unique("slow")));
        Controller::at(Address::Unix(path))
    }

    /// On TCP, on a port that was free a moment ago.
    fn tcp() -> Controller {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Controller::at(Address::Tcp {
            host: "127.0.0.1".into(),
            port,
        })
    }

    /// Nodes started afterwards wait for it (their `connect_timeout`).
    fn at(address: Address) -> Controller {
        let process = common::spawn_limited_controller(ENTRY, &address, QUEUE_BYTES, STALL);
        Controller { address, process }
    }

    fn pid(&self) -> u32 {
        self.process.pid().expect("controller running")
    }

    fn peak_rss_kib(&self) -> u64 {
        common::peak_rss_kib(self.pid()).expect("/proc readable")
    }
}

/// Starts [`FLOOD`] calls to `callback` on `target` at once, each with [`ARG_BYTES`]
/// bytes and `timeout`.
fn flood(g: &Global, callback: &str, target: &str, timeout: Duration) -> Vec<AsyncResult<u64>> {
    let arg = Blob::from(vec![7u8; ARG_BYTES]);
    (0..FLOOD)
        .map(|_| {
            g.call(callback)
                .args((arg.clone(),))
                .on(target)
                .timeout(timeout)
                .bg()
                .expect("bg")
        })
        .collect()
}

/// How a call ended, by name.
fn outcome<T>(result: Result<T, Error>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(Error::SlowConsumer { .. }) => "SlowConsumer".into(),
        Err(Error::PeerDisconnected { .. }) => "PeerDisconnected".into(),
        Err(Error::Timeout { .. }) => "Timeout".into(),
        Err(Error::UnknownProcess { .. }) => "UnknownProcess".into(),
        Err(e) => format!("unexpected: {e}"),
    }
}

/// Checks that every call of a flood at a stuck node ended in a named error: at once
/// with `SlowConsumer` once its queue in the controller was full; `PeerDisconnected`
/// (or its own `Timeout`) for the calls queued before. A call still waiting for room
/// in its own node's queue when the stuck node was dropped is sent after its departure
/// was heard, and ends as any call to a departed node does, `UnknownProcess`.
fn assert_ended_by_name(who: &str, outcomes: &[String]) {
    assert_eq!(outcomes.len(), FLOOD, "{who}: every call ended");
    let count = |name: &str| outcomes.iter().filter(|o| *o == name).count();
    let (slow, gone, timeout, unknown) = (
        count("SlowConsumer"),
        count("PeerDisconnected"),
        count("Timeout"),
        count("UnknownProcess"),
    );
    eprintln!(
        "{who}: {slow} SlowConsumer, {gone} PeerDisconnected, {timeout} Timeout, {unknown} UnknownProcess"
    );
    assert_eq!(
        slow + gone + timeout + unknown,
        FLOOD,
        "{who}: {outcomes:?}"
    );
    assert!(slow > 0, "{who}: the queue limit was reached");
}

/// Collects the outcomes of `calls` on a thread; the receiver gets them once all ended.
fn collect(calls: Vec<AsyncResult<u64>>) -> mpsc::Receiver<Vec<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let outcomes = calls.into_iter().map(|c| outcome(c.get())).collect();
        let _ = tx.send(outcomes);
    });
    rx
}

/// Calls `callback` on `target` with a flood-sized argument until one call fails with
/// `SlowConsumer`: the controller holds as much as it may for `target`. Calls that
/// were queued instead give up after a second (they count as queued).
fn wait_until_full(g: &Global, callback: &str, target: &str) {
    let arg = Blob::from(vec![7u8; ARG_BYTES]);
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match g
            .call(callback)
            .args((arg.clone(),))
            .on(target)
            .timeout(Duration::from_secs(1))
            .fg::<u64>()
        {
            Err(Error::SlowConsumer { process, .. }) => {
                assert_eq!(process, target);
                return;
            }
            Err(Error::Timeout { .. }) => continue,
            other => panic!("a call to a stuck node ended in {other:?}"),
        }
    }
    panic!("{target}'s queue was never full");
}

/// `n` calls to `sync_add` on `target`, each of which must succeed; returns the slowest.
fn healthy_calls(g: &Global, target: &str, n: i64) -> Duration {
    (0..n)
        .map(|i| {
            let started = Instant::now();
            let sum: i64 = g
                .call("sync_add")
                .args((i, 1))
                .on(target)
                .timeout(Duration::from_secs(5))
                .fg()
                .unwrap_or_else(|e| panic!("a call to healthy {target} failed: {e}"));
            assert_eq!(sum, i + 1);
            started.elapsed()
        })
        .max()
        .unwrap_or_default()
}

/// The nodes leaving a node's view, with when.
type Departures = mpsc::Receiver<(String, Instant)>;

/// Starts the node of `builder`, reporting the nodes that leave its view.
fn start_with_departures(builder: GlobalBuilder) -> Result<(Global, Departures), Error> {
    let (tx, departures) = mpsc::channel();
    let tx = Mutex::new(tx);
    let g = builder
        .on_member_removed(move |_, name| {
            let _ = tx
                .lock()
                .expect("lock")
                .send((name.to_string(), Instant::now()));
        })
        .start()?;
    Ok((g, departures))
}

/// A caller node that reports the nodes leaving its view.
fn caller_with_departures(address: &Address) -> (Global, Departures) {
    let builder = common::builder_for(address).process_name(common::unique("caller"));
    start_with_departures(builder).expect("caller starts")
}

/// Waits (up to `limit`) for `name` to leave the view; returns when it did.
fn departure(departures: &Departures, name: &str, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match departures.recv_timeout(left) {
            Ok((gone, at)) if gone == name => return at,
            Ok(_) => continue,
            Err(_) => panic!("{name} was not announced gone within {limit:?}"),
        }
    }
}

/// A node that joins now must be let in and known to `caller` and to worker `via`.
/// Returns it, and the nodes that leave its view.
fn a_new_node_joins(address: &Address, caller: &Global, via: &str) -> (Global, Departures) {
    let late_name = common::unique("late");
    let started = Instant::now();
    let builder = common::builder_for(address)
        .process_name(late_name.clone())
        .connect_timeout(Duration::from_secs(5));
    let (late, departures) =
        start_with_departures(builder).expect("a new node joins while one node is stuck");
    caller
        .wait_process_timeout(&late_name, Duration::from_secs(5))
        .expect("the caller learns of the new node");
    let known: bool = caller
        .call("knows")
        .args((late_name.clone(), 5_000u64))
        .on(via)
        .timeout(WAIT)
        .fg()
        .expect("knows");
    assert!(known, "{via} learns of the new node");
    late.wait_process_timeout(via, Duration::from_secs(5))
        .expect("the new node learns of the others");
    eprintln!(
        "a new node joined and was known everywhere in {:?}",
        started.elapsed()
    );
    (late, departures)
}

/// The controller's peak RSS growth must stay within this many times its queue limit:
/// the stuck node's requests (one queue limit), the frames in its socket buffer, and
/// the allocator's slack. Before the queues were bounded in bytes, the same flood grew
/// the controller by hundreds of MiB.
const RSS_GROWTH_LIMIT: u64 = 4;

fn assert_memory_bounded(controller: &Controller, before_kib: u64) {
    let after = controller.peak_rss_kib();
    let growth = after.saturating_sub(before_kib);
    let limit = RSS_GROWTH_LIMIT * QUEUE_BYTES as u64 / 1024;
    eprintln!(
        "controller peak RSS {before_kib} KiB -> {after} KiB (+{growth} KiB; limit +{limit} KiB = {RSS_GROWTH_LIMIT} x max_queue_bytes)"
    );
    assert!(growth < limit, "the controller grew by {growth} KiB");
}

// ---- a node stopped with SIGSTOP -----------------------------------------------------

#[test]
fn a_paused_node_costs_only_itself() {
    let controller = Controller::unix();
    let address = controller.address.clone();
    let (caller, departures) = caller_with_departures(&address);
    let names: Vec<String> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| common::unique(n))
        .collect();
    let (w1, w2, w3) = (&names[0], &names[1], &names[2]);
    let mut workers: Vec<Worker> = names
        .iter()
        .map(|n| common::spawn_child(ENTRY, "worker", n, &address))
        .collect();
    for n in &names {
        caller.wait_process_timeout(n, WAIT).expect("worker joins");
    }
    let rss_before = controller.peak_rss_kib();

    common::pause(workers[0].pid().expect("w1 running"));
    let stopped_at = Instant::now();
    // Calls keep going to w1 from a worker and from here.
    let from_w2: AsyncResult<Vec<String>> = caller
        .call("flood_from_here")
        .args(("echo_len", w1.clone(), WAIT.as_millis() as u64))
        .on(w2)
        .timeout(WAIT + WAIT)
        .bg()
        .expect("bg");
    let from_here = collect(flood(&caller, "echo_len", w1, WAIT));
    wait_until_full(&caller, "echo_len", w1);
    eprintln!(
        "w1's queue was full {:?} after SIGSTOP",
        stopped_at.elapsed()
    );

    // Healthy nodes call each other as usual.
    let slowest = [
        healthy_calls(&caller, w2, 20),
        healthy_calls(&caller, w3, 20),
    ]
    .into_iter()
    .max()
    .unwrap_or_default();
    let between: i64 = caller
        .call("add_on")
        .args((w3.clone(),))
        .on(w2)
        .timeout(Duration::from_secs(5))
        .fg()
        .expect("w2 calls w3");
    assert_eq!(between, 42);
    eprintln!("healthy calls while w1 is stuck: slowest {slowest:?}");

    // Joins work.
    let (late, late_departures) = a_new_node_joins(&address, &caller, w2);

    // A killed node is announced gone, and its calls in flight end.
    let in_flight = caller
        .call("signal_then_sleep")
        .args((60_000u64,))
        .on(w3)
        .timeout(WAIT)
        .bg::<u64>()
        .expect("bg");
    let running: usize = caller
        .call("wait_running")
        .args((WAIT.as_millis() as u64,))
        .on(w3)
        .timeout(WAIT)
        .fg()
        .expect("running");
    assert_eq!(running, 1);
    let killed_at = Instant::now();
    workers[2].kill();
    match in_flight.get_timeout(Duration::from_secs(1)) {
        Err(Error::PeerDisconnected { process, .. }) => assert_eq!(&process, w3),
        other => panic!("expected PeerDisconnected within 1 s, got {other:?}"),
    }
    // Every node hears of it, each on its own link and in no set order: the new one
    // may learn it after the caller did.
    let announced = [&departures, &late_departures]
        .map(|departures| departure(departures, w3, Duration::from_secs(1)));
    eprintln!(
        "w3 killed: announced gone after {:?}",
        announced.map(|at| at.saturating_duration_since(killed_at))
    );
    match caller.call("sync_add").args((1, 1)).on(w3).fg::<i64>() {
        Err(Error::UnknownProcess { process }) => assert_eq!(&process, w3),
        other => panic!("expected UnknownProcess for the killed node, got {other:?}"),
    }
    assert!(matches!(
        late.wait_process_timeout(w3, Duration::from_millis(200)),
        Err(Error::Timeout { .. })
    ));
    // All of the above happened while w1 was stuck, not after it was dropped.
    assert!(
        caller.members().iter().any(|m| &m.name == w1),
        "w1 was disconnected before the checks finished (machine too slow for STALL?)"
    );

    // After the stall timeout, w1 is disconnected: every call to it ends by name.
    let w1_gone = departure(&departures, w1, STALL + WAIT);
    eprintln!(
        "w1 announced gone {:?} after SIGSTOP (stall timeout {STALL:?})",
        w1_gone.saturating_duration_since(stopped_at)
    );
    let outcomes = from_here
        .recv_timeout(WAIT)
        .expect("the caller's calls end");
    assert_ended_by_name("caller -> w1", &outcomes);
    let outcomes = from_w2.get_timeout(WAIT + WAIT).expect("w2's flood");
    assert_ended_by_name("w2 -> w1", &outcomes);
    assert_memory_bounded(&controller, rss_before);

    // Resumed, w1 finds its connection closed, reconnects, and serves again.
    common::resume(workers[0].pid().expect("w1 running"));
    caller
        .wait_process_timeout(w1, WAIT)
        .expect("w1 reconnects");
    healthy_calls(&caller, w1, 1);
    drop(late);
}

// ---- a client that never reads -------------------------------------------------------

/// Connects to `path` as a node called `name` serving `raw_cb`, and never reads.
fn never_reading_node(path: &std::path::Path, name: &str) -> UnixStream {
    let mut stream = UnixStream::connect(path).expect("connect");
    stream
        .write_all(&common::wire::opening(name, None, &["raw_cb"]))
        .expect("handshake");
    stream
}

#[test]
fn a_client_that_never_reads_costs_only_itself() {
    let controller = Controller::unix();
    let address = controller.address.clone();
    let Address::Unix(path) = &address else {
        unreachable!("a Unix socket")
    };
    let (caller, departures) = caller_with_departures(&address);
    let w2 = common::unique("w2");
    let _w2 = common::spawn_child(ENTRY, "worker", &w2, &address);
    caller.wait_process_timeout(&w2, WAIT).expect("w2 joins");
    let rss_before = controller.peak_rss_kib();

    let raw = common::unique("raw");
    let mut stream = never_reading_node(path, &raw);
    caller
        .wait_process_timeout(&raw, WAIT)
        .expect("the raw client joins");
    let stuck_at = Instant::now();
    let from_here = collect(flood(&caller, "raw_cb", &raw, WAIT));
    let from_w2: AsyncResult<Vec<String>> = caller
        .call("flood_from_here")
        .args(("raw_cb", raw.clone(), WAIT.as_millis() as u64))
        .on(&w2)
        .timeout(WAIT + WAIT)
        .bg()
        .expect("bg");
    wait_until_full(&caller, "raw_cb", &raw);

    let slowest = healthy_calls(&caller, &w2, 20);
    eprintln!("healthy calls while the raw client reads nothing: slowest {slowest:?}");
    let (late, _) = a_new_node_joins(&address, &caller, &w2);
    assert!(
        caller.members().iter().any(|m| m.name == raw),
        "the raw client was disconnected before the checks finished (machine too slow for STALL?)"
    );

    let gone = departure(&departures, &raw, STALL + WAIT);
    eprintln!(
        "the raw client was announced gone {:?} after it joined (stall timeout {STALL:?})",
        gone.saturating_duration_since(stuck_at)
    );
    let outcomes = from_here
        .recv_timeout(WAIT)
        .expect("the caller's calls end");
    assert_ended_by_name("caller -> raw", &outcomes);
    let outcomes = from_w2.get_timeout(WAIT + WAIT).expect("w2's flood");
    assert_ended_by_name("w2 -> raw", &outcomes);
    assert_memory_bounded(&controller, rss_before);
    // The controller closed the connection: what was in the socket, then the end.
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the controller kept the raw client's connection open: {e}"),
    }
    drop(late);
}

// ---- a controller that dies, or stops reading ----------------------------------------

#[test]
fn calls_fail_at_once_when_the_controller_dies() {
    let mut controller = Controller::tcp();
    let (tx, disconnects) = mpsc::channel();
    let tx = Mutex::new(tx);
    let caller = common::builder_for(&controller.address)
        .process_name(common::unique("caller"))
        .on_node_disconnect(move |_, _| {
            let _ = tx.lock().expect("lock").send(Instant::now());
        })
        .start()
        .expect("caller");
    let worker = common::unique("worker");
    let _w = common::spawn_child(ENTRY, "worker", &worker, &controller.address);
    caller.wait_process_timeout(&worker, WAIT).expect("worker");
    healthy_calls(&caller, &worker, 1);

    // Over TCP, the first write after the controller died still succeeds: the call is
    // sent into the void, and used to wait for the old link's writer to drain (1 s)
    // before it failed.
    controller.process.kill();
    let killed_at = Instant::now();
    for _ in 0..3 {
        let started = Instant::now();
        match caller
            .call("sync_add")
            .args((1, 2))
            .on(&worker)
            .timeout(WAIT)
            .fg::<i64>()
        {
            Err(Error::ControllerUnreachable { .. }) => {}
            other => panic!("expected ControllerUnreachable, got {other:?}"),
        }
        let took = started.elapsed();
        eprintln!("a call after the controller died failed in {took:?}");
        assert!(took < Duration::from_millis(300), "took {took:?}");
    }
    let noticed = disconnects.recv_timeout(WAIT).expect("on_node_disconnect");
    eprintln!(
        "the node noticed {:?} after the kill",
        noticed.saturating_duration_since(killed_at)
    );
}

#[test]
fn a_node_drops_a_controller_that_reads_nothing_and_reconnects() {
    let controller = Controller::unix();
    let (tx, events) = mpsc::channel();
    let (on_connect, on_disconnect) = (Mutex::new(tx.clone()), Mutex::new(tx));
    let node_stall = Duration::from_secs(2);
    let caller = common::builder_for(&controller.address)
        .process_name(common::unique("caller"))
        .stall_timeout(node_stall)
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

    common::pause(controller.pid());
    // Enough to fill the socket to the controller: the node's writer then waits.
    let stopped_at = Instant::now();
    let calls = flood(&caller, "echo_len", &worker, WAIT);
    assert_eq!(events.recv_timeout(WAIT), Ok("disconnect"));
    let dropped_after = stopped_at.elapsed();
    eprintln!("the node dropped the stopped controller after {dropped_after:?} (its stall timeout {node_stall:?})");
    assert!(dropped_after >= node_stall, "{dropped_after:?}");
    for call in calls {
        match call.get_timeout(WAIT) {
            Err(Error::ControllerUnreachable { .. }) | Err(Error::Timeout { .. }) => {}
            other => panic!("a call to a stopped controller ended in {other:?}"),
        }
    }
    common::resume(controller.pid());
    assert_eq!(events.recv_timeout(WAIT), Ok("connect"));
    caller.wait_process_timeout(&worker, WAIT).expect("worker");
    healthy_calls(&caller, &worker, 1);
}
