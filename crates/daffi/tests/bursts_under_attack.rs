//! Bursts of small calls, hundreds in flight, forwarded by a standalone controller in
//! runs of frames to one node (the controller writes such a run in one write, itself,
//! when the connection is idle; a caller with many calls waiting leaves its requests to
//! its writer task), while the callee is paused, killed, never reads, or is called by
//! many callers at once. Whatever one peer does costs only that peer, and no call is
//! lost: each is answered with its own result or fails by name. Real processes and
//! sockets.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use common::{Worker, WAIT};
use daffi::{callback, Address, AsyncResult, Blob, Error, Global};

const ENTRY: &str = "child_process";

/// The controller's `max_queue_bytes` in these tests.
const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Padding of a burst's calls: small, so that a run of them (up to 64 KiB) is written by
/// the controller's session itself, yet enough that a burst outgrows a socket's buffer.
const PAD: usize = 600;

// ---- callbacks served by every worker of this binary -------------------------------

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

/// What a burst's call returns: its own arguments, and a digest of its padding.
#[callback]
fn tagged(caller: u32, id: u64, pad: Blob) -> (u32, u64, u64) {
    (caller, id, digest(&pad))
}

/// Calls of `counted_add` this worker ran.
static COUNTED: common::Log<()> = common::Log::new();

/// `a + b`, counted (see `counted`).
#[callback]
fn counted_add(a: i64, b: i64) -> i64 {
    COUNTED.push(());
    a + b
}

/// How many `counted_add` calls ran here, once at least `want` did (or after
/// `timeout_ms`).
#[callback]
fn counted(want: usize, timeout_ms: u64) -> usize {
    COUNTED.wait_until(timeout_ms, |c| c.len() >= want).len()
}

/// The worker's own node, for `add_on`.
static NODE: common::Log<Global> = common::Log::new();

/// From this worker: `sync_add(a, 1)` on `target`.
#[callback]
fn add_on(target: String, a: i64) -> Result<i64, String> {
    let g = NODE
        .wait_until(WAIT.as_millis() as u64, |n| !n.is_empty())
        .pop()
        .expect("the worker's node started");
    g.call("sync_add")
        .args((a, 1))
        .on(&target)
        .timeout(WAIT)
        .fg()
        .map_err(|e| e.to_string())
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

/// A standalone controller in a child process on a fresh Unix socket, with
/// [`QUEUE_BYTES`] and the stall timeout `stall`.
fn controller_with_stall(stall: Duration) -> (Address, Worker) {
    let address = Address::Unix(
        std::env::temp_dir()
            .join("daffi-tests")
            .join(format!("{}.sock", common::unique("burst"))),
    );
    controller_at(address, stall)
}

/// Like [`controller_with_stall`], over TCP on a port of 127.0.0.1 free a moment ago.
fn tcp_controller_with_stall(stall: Duration) -> (Address, Worker) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let address = Address::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    controller_at(address, stall)
}

fn controller_at(address: Address, stall: Duration) -> (Address, Worker) {
    let process = common::spawn_limited_controller(ENTRY, &address, QUEUE_BYTES, stall);
    (address, process)
}

fn node(address: &Address, prefix: &str) -> Global {
    common::builder_for(address)
        .process_name(common::unique(prefix))
        .start()
        .expect("node starts")
}

/// A cheap digest of `bytes` that notices bytes moved, lost or mixed in.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The padding of call `id` from `caller`: its own bytes, of a length of its own.
fn pad_for(caller: u32, id: u64) -> Vec<u8> {
    let len = PAD / 2 + (id as usize * 37 + caller as usize * 11) % PAD;
    (0..len)
        .map(|i| (i as u64 ^ id.wrapping_mul(31) ^ u64::from(caller) << 3) as u8)
        .collect()
}

/// One call of a burst: who made it and what it must get back.
struct Sent {
    caller: u32,
    id: u64,
    digest: u64,
    call: AsyncResult<(u32, u64, u64)>,
}

/// Starts `n` BG calls of `tagged` from `g` (as caller `caller`) on `target` at once.
fn burst(g: &Global, caller: u32, target: &str, n: u64, timeout: Duration) -> Vec<Sent> {
    (0..n)
        .map(|id| {
            let pad = pad_for(caller, id);
            let digest = digest(&pad);
            let call = g
                .call("tagged")
                .args((caller, id, Blob::from(pad)))
                .on(target)
                .timeout(timeout)
                .bg()
                .expect("bg");
            Sent {
                caller,
                id,
                digest,
                call,
            }
        })
        .collect()
}

/// How a burst's call ended: "ok" if it got its own result back, else the error's name.
/// A result that belongs to another call panics.
fn ended(sent: Sent, wait: Duration) -> String {
    match sent.call.get_timeout(wait) {
        Ok(got) => {
            assert_eq!(
                got,
                (sent.caller, sent.id, sent.digest),
                "call {} of caller {} got another call's result",
                sent.id,
                sent.caller
            );
            "ok".into()
        }
        Err(Error::SlowConsumer { .. }) => "SlowConsumer".into(),
        Err(Error::PeerDisconnected { .. }) => "PeerDisconnected".into(),
        Err(Error::UnknownProcess { .. }) => "UnknownProcess".into(),
        Err(Error::Timeout { .. }) => "Timeout".into(),
        Err(Error::Overloaded { .. }) => "Overloaded".into(),
        Err(e) => format!("unexpected: {e}"),
    }
}

/// Collects how each call of `calls` ended, on a thread (waiting up to `wait` for
/// each); the receiver gets the outcomes once all ended.
fn collect(calls: Vec<Sent>, wait: Duration) -> mpsc::Receiver<Vec<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let outcomes = calls.into_iter().map(|c| ended(c, wait)).collect();
        let _ = tx.send(outcomes);
    });
    rx
}

/// The outcomes by name, with counts.
fn tally(outcomes: &[String]) -> Vec<(String, usize)> {
    let mut names: Vec<(String, usize)> = Vec::new();
    for o in outcomes {
        match names.iter_mut().find(|(n, _)| n == o) {
            Some((_, c)) => *c += 1,
            None => names.push((o.clone(), 1)),
        }
    }
    names
}

/// Checks that every outcome is "ok" or one of `named`.
fn assert_only(who: &str, outcomes: &[String], named: &[&str]) {
    let counts = tally(outcomes);
    eprintln!("{who}: {counts:?}");
    for (name, count) in &counts {
        assert!(
            name == "ok" || named.contains(&name.as_str()),
            "{who}: {count} calls ended in {name}: {counts:?}"
        );
    }
}

/// `n` calls through the controller that must all succeed: `sync_add` on `callee`
/// from here, and from worker `caller` to `callee` (another caller/callee pair).
fn the_other_pair_keeps_calling(g: &Global, caller: &str, callee: &str, n: i64) {
    for i in 0..n {
        let sum: i64 = g
            .call("sync_add")
            .args((i, 1))
            .on(callee)
            .timeout(WAIT)
            .fg()
            .unwrap_or_else(|e| panic!("a call to healthy {callee} failed: {e}"));
        assert_eq!(sum, i + 1);
        // The callback's `Err` would come back as an error.
        let sum: i64 = g
            .call("add_on")
            .args((callee.to_string(), i))
            .on(caller)
            .timeout(WAIT)
            .fg()
            .unwrap_or_else(|e| panic!("{caller} -> {callee} failed: {e}"));
        assert_eq!(sum, i + 1, "{caller} -> {callee}");
    }
}

/// The nodes leaving a node's view.
type Departures = mpsc::Receiver<String>;

fn node_with_departures(address: &Address, prefix: &str) -> (Global, Departures) {
    let (tx, departures) = mpsc::channel();
    let tx = Mutex::new(tx);
    let g = common::builder_for(address)
        .process_name(common::unique(prefix))
        .on_member_removed(move |_, name| {
            let _ = tx.lock().expect("lock").send(name.to_string());
        })
        .start()
        .expect("node starts");
    (g, departures)
}

/// Waits (up to `limit`) for `name` to leave the view.
fn departure(departures: &Departures, name: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match departures.recv_timeout(left) {
            Ok(gone) if gone == name => return,
            Ok(_) => continue,
            Err(_) => panic!("{name} was not announced gone within {limit:?}"),
        }
    }
}

/// Starts a worker called `name` and waits until `g` knows it.
fn spawn_worker(address: &Address, g: &Global, prefix: &str) -> (String, Worker) {
    common::spawn_known_worker(ENTRY, address, g, prefix, &[])
}

// ---- a callee paused mid-burst --------------------------------------------------------

/// Calls in one caller's burst.
const BURST: u64 = 1_500;

#[test]
fn a_callee_paused_mid_burst_costs_only_itself_and_loses_no_call() {
    // A stall timeout far beyond the test: the paused callee stays connected, and every
    // call the controller queued for it must be answered once it resumes.
    callee_paused_mid_burst(controller_with_stall(Duration::from_secs(300)));
}

/// Over TCP: other socket buffers, so the controller's writes to the resumed callee
/// are cut elsewhere.
#[test]
fn a_callee_paused_mid_burst_over_tcp_loses_no_call() {
    callee_paused_mid_burst(tcp_controller_with_stall(Duration::from_secs(300)));
}

fn callee_paused_mid_burst((address, _controller): (Address, Worker)) {
    let callers: Vec<Global> = (0..2).map(|_| node(&address, "caller")).collect();
    let (victim, mut victim_process) = spawn_worker(&address, &callers[0], "victim");
    let (other_callee, _w2) = spawn_worker(&address, &callers[0], "callee2");
    let (other_caller, _w3) = spawn_worker(&address, &callers[0], "caller2");
    callers[1]
        .wait_process_timeout(&victim, WAIT)
        .expect("victim known");

    // Bursts from two callers; the victim is stopped once it answered the first call,
    // with the rest of the burst on its way to it.
    let timeout = Duration::from_secs(120);
    let mut bursts: Vec<Vec<Sent>> = callers
        .iter()
        .zip(0u32..)
        .map(|(g, i)| burst(g, i, &victim, BURST, timeout))
        .collect();
    let first = bursts[0].remove(0);
    assert_eq!(ended(first, WAIT), "ok");
    let pid = victim_process.pid().expect("victim running");
    common::pause(pid);
    let results: Vec<_> = bursts.into_iter().map(|b| collect(b, timeout)).collect();

    // A third burst at the stopped victim: its calls queue up in the controller (or are
    // refused by name once the victim's queue is full).
    let late = collect(burst(&callers[1], 7, &victim, BURST, timeout), timeout);

    // The other pair calls through the same controller as usual, from here and from
    // worker to worker.
    the_other_pair_keeps_calling(&callers[0], &other_caller, &other_callee, 20);
    the_other_pair_keeps_calling(&callers[1], &other_caller, &other_callee, 20);
    assert!(
        callers[0].members().iter().any(|m| m.name == victim),
        "the paused victim stays connected"
    );

    common::resume(pid);
    for (i, rx) in results.into_iter().chain([late]).enumerate() {
        let outcomes = rx
            .recv_timeout(timeout + WAIT)
            .unwrap_or_else(|_| panic!("burst {i}: calls still waiting"));
        // Refused at once while the victim's queue was full, or by the victim when
        // more arrived at once than it runs (`max_sync_callbacks`): by name. Nothing
        // else.
        assert_only(
            &format!("burst {i}"),
            &outcomes,
            &["SlowConsumer", "Overloaded"],
        );
        assert!(outcomes.iter().any(|o| o == "ok"), "burst {i}: none served");
    }
    victim_process.kill();
}

// ---- a callee killed mid-burst --------------------------------------------------------

#[test]
fn every_call_of_a_burst_ends_by_name_when_its_callee_is_killed() {
    let (address, _controller) = controller_with_stall(Duration::from_secs(300));
    let callers: Vec<Global> = (0..2).map(|_| node(&address, "caller")).collect();
    let (victim, mut victim_process) = spawn_worker(&address, &callers[0], "victim");
    let (other_callee, _w2) = spawn_worker(&address, &callers[0], "callee2");
    let (other_caller, _w3) = spawn_worker(&address, &callers[0], "caller2");
    callers[1]
        .wait_process_timeout(&victim, WAIT)
        .expect("victim known");

    // Calls that never time out by themselves: one that is lost waits past the bounded
    // wait of `ended` and shows as "Timeout".
    let timeout = Duration::from_secs(600);
    let mut bursts: Vec<Vec<Sent>> = callers
        .iter()
        .zip(0u32..)
        .map(|(g, i)| burst(g, i, &victim, BURST, timeout))
        .collect();
    let first = bursts[1].remove(0);
    assert_eq!(ended(first, WAIT), "ok");
    victim_process.kill();
    // More calls at the dead victim, sent while its departure is heard.
    bursts.push(burst(&callers[0], 9, &victim, 200, timeout));
    let results: Vec<_> = bursts.into_iter().map(|b| collect(b, WAIT)).collect();

    for (i, rx) in results.into_iter().enumerate() {
        let outcomes = rx
            .recv_timeout(BURST as u32 * WAIT)
            .unwrap_or_else(|_| panic!("burst {i}: calls still waiting"));
        // Refused by the victim when more arrived at once than it runs
        // (`max_sync_callbacks`), before it died: by name too.
        assert_only(
            &format!("burst {i}"),
            &outcomes,
            &["PeerDisconnected", "UnknownProcess", "Overloaded"],
        );
    }
    the_other_pair_keeps_calling(&callers[1], &other_caller, &other_callee, 10);
}

// ---- many callers bursting at one callee ----------------------------------------------

#[test]
fn bursts_from_many_callers_at_one_callee_each_get_their_own_results() {
    let (address, _controller) = controller_with_stall(Duration::from_secs(300));
    let callers: Vec<Global> = (0..4)
        .map(|_| {
            common::builder_for(&address)
                .process_name(common::unique("caller"))
                .max_in_flight(200)
                .start()
                .expect("caller starts")
        })
        .collect();
    let (callee, _callee_process) = spawn_worker(&address, &callers[0], "callee");
    for g in &callers {
        g.wait_process_timeout(&callee, WAIT).expect("callee known");
    }
    // Each caller bursts from its own thread, at once: the controller's sessions
    // forward their runs of frames to the one callee's connection together.
    let start = std::sync::Arc::new(std::sync::Barrier::new(callers.len()));
    let threads: Vec<_> = callers
        .iter()
        .zip(0u32..)
        .map(|(g, i)| {
            let (g, callee, start) = (g.clone(), callee.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut outcomes = Vec::new();
                for round in 0..3u64 {
                    let calls = burst(&g, i, &callee, 1_000, WAIT);
                    outcomes.extend(calls.into_iter().map(|c| ended(c, WAIT)));
                    eprintln!("caller {i}: round {round} done");
                }
                outcomes
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let outcomes = t.join().expect("a result belongs to its own call");
        assert_eq!(outcomes.len(), 3_000);
        assert_only(&format!("caller {i}"), &outcomes, &[]);
    }
}

// ---- a raw node that never reads --------------------------------------------------------

#[test]
fn a_raw_node_that_never_reads_bursts_of_small_calls_is_closed_alone() {
    let stall = Duration::from_secs(8);
    let (address, _controller) = controller_with_stall(stall);
    let Address::Unix(path) = &address else {
        unreachable!("a Unix socket")
    };
    let (caller, departures) = node_with_departures(&address, "caller");
    let second = node(&address, "caller");
    let (other_callee, _w2) = spawn_worker(&address, &caller, "callee2");
    let (other_caller, _w3) = spawn_worker(&address, &caller, "caller2");

    let raw = common::unique("raw");
    let mut stream = UnixStream::connect(path).expect("connect");
    stream
        .write_all(&common::wire::opening(&raw, None, &["tagged"]))
        .expect("handshake");
    caller
        .wait_process_timeout(&raw, WAIT)
        .expect("the raw node joins");
    second
        .wait_process_timeout(&raw, WAIT)
        .expect("the raw node is known");

    // Bursts of small calls from two callers: runs of frames the controller writes to
    // the raw node itself, until its socket takes no more; then its queue fills.
    let timeout = stall + WAIT + WAIT;
    let mut results = Vec::new();
    for round in 0..4 {
        for (g, i) in [&caller, &second].into_iter().zip(0u32..) {
            results.push(collect(
                burst(g, i * 10 + round, &raw, 2_000, timeout),
                WAIT,
            ));
        }
    }

    // Everyone else is served meanwhile.
    the_other_pair_keeps_calling(&caller, &other_caller, &other_callee, 20);
    the_other_pair_keeps_calling(&second, &other_caller, &other_callee, 20);
    assert!(
        caller.members().iter().any(|m| m.name == raw),
        "the raw node was closed before the checks finished (machine too slow for the stall timeout?)"
    );

    // The controller closes the raw node (stalled, or a slow consumer), and every call
    // at it ends by name.
    departure(&departures, &raw, stall + WAIT);
    for (i, rx) in results.into_iter().enumerate() {
        let outcomes = rx
            .recv_timeout(2_000 * WAIT)
            .unwrap_or_else(|_| panic!("burst {i}: calls still waiting"));
        assert_only(
            &format!("burst {i}"),
            &outcomes,
            &["SlowConsumer", "PeerDisconnected", "UnknownProcess"],
        );
        assert!(!outcomes.iter().any(|o| o == "ok"), "the raw node answered");
    }
    the_other_pair_keeps_calling(&caller, &other_caller, &other_callee, 5);
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the controller kept the raw node's connection open: {e}"),
    }
}

// ---- a raw caller that stops in the middle of a frame after a burst -------------------

/// Reads one frame from `stream` (waiting up to [`WAIT`]).
fn read_unix_frame(stream: &mut UnixStream) -> daffi_wire::Frame {
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    common::wire::read_frame_from(stream)
}

/// A standalone controller (Unix socket), a caller node here, a callee and another
/// caller in child processes, and a raw caller connected by hand (handshake done).
struct RawCallerBesideAPair {
    caller: Global,
    callee: String,
    other_caller: String,
    raw: String,
    stream: UnixStream,
    /// The controller and the two workers, killed when dropped.
    _processes: [Worker; 3],
}

fn raw_caller_beside_a_pair() -> RawCallerBesideAPair {
    let (address, controller) = controller_with_stall(Duration::from_secs(300));
    let Address::Unix(path) = &address else {
        unreachable!("a Unix socket")
    };
    let caller = node(&address, "caller");
    let (callee, callee_process) = spawn_worker(&address, &caller, "callee");
    let (other_caller, other_process) = spawn_worker(&address, &caller, "caller2");
    let raw = common::unique("raw");
    let mut stream = UnixStream::connect(path).expect("connect");
    stream
        .write_all(&common::wire::opening(&raw, None, &[]))
        .expect("handshake");
    assert_eq!(
        read_unix_frame(&mut stream).kind(),
        daffi_wire::Kind::Welcome
    );
    RawCallerBesideAPair {
        caller,
        callee,
        other_caller,
        raw,
        stream,
        _processes: [controller, callee_process, other_process],
    }
}

#[test]
fn a_caller_that_stops_mid_frame_after_a_burst_holds_up_no_one() {
    use daffi_wire::Kind;
    let RawCallerBesideAPair {
        caller,
        callee,
        other_caller,
        raw,
        mut stream,
        _processes,
    } = raw_caller_beside_a_pair();

    // A burst of requests to the callee in one write, and the start of one more: its
    // header, receiver's name included, but not all of it. The controller forwards the
    // run of requests read, then waits for the rest of the last frame.
    const CALLS: u64 = 300;
    let mut bytes = Vec::new();
    for id in 0..CALLS {
        bytes.extend(common::wire::request(
            &raw,
            &callee,
            id,
            "sync_add",
            &(id as i64, 1i64),
        ));
    }
    let half = common::wire::request(&raw, &callee, CALLS, "sync_add", &(0i64, 1i64));
    bytes.extend_from_slice(&half[..half.len() - 3]);
    stream.write_all(&bytes).expect("the burst");

    // Every request of the burst reaches the callee and is answered.
    let mut answered = vec![false; CALLS as usize];
    let mut left = CALLS;
    while left > 0 {
        let frame = read_unix_frame(&mut stream);
        if frame.kind() != Kind::Reply {
            assert_ne!(
                frame.kind(),
                Kind::Undeliverable,
                "a request was not delivered"
            );
            continue;
        }
        // Replies to one caller may come in batches (docs/PROTOCOL.md).
        for (id, _, payload) in common::wire::replies_of(&frame) {
            let sum: i64 = rmp_serde::from_slice(&payload).expect("an i64");
            assert_eq!(sum, id as i64 + 1, "call {id}");
            assert!(
                !std::mem::replace(&mut answered[id as usize], true),
                "call {id} twice"
            );
            left -= 1;
        }
    }
    // Others' calls to the same callee, and between other nodes, go through while the
    // raw caller is still in the middle of its frame.
    the_other_pair_keeps_calling(&caller, &other_caller, &callee, 20);
    assert!(
        caller.members().iter().any(|m| m.name == raw),
        "the raw caller is still connected"
    );
}

// ---- a raw caller that sends garbage right after a burst ------------------------------

#[test]
fn garbage_right_after_a_burst_closes_only_its_sender_and_the_burst_is_delivered() {
    let RawCallerBesideAPair {
        caller,
        callee,
        other_caller,
        raw,
        mut stream,
        _processes,
    } = raw_caller_beside_a_pair();

    // A burst of requests to the callee, then, in the same write, a whole frame of an
    // unknown kind addressed to the callee too: the controller reads the run, looks
    // ahead to the bad frame's receiver (the same node), and ends the connection on it.
    const CALLS: usize = 300;
    let mut bytes = Vec::new();
    for id in 0..CALLS {
        bytes.extend(common::wire::request(
            &raw,
            &callee,
            id as u64,
            "counted_add",
            &(id as i64, 1i64),
        ));
    }
    let mut bad = common::wire::request(&raw, &callee, 0, "counted_add", &(0i64, 1i64));
    bad[4] = 99;
    bytes.extend(bad);
    stream.write_all(&bytes).expect("the burst");

    // The controller closes the raw caller's connection (after what it still sends).
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the controller kept the raw caller's connection open: {e}"),
    }
    // The requests it had accepted before the bad frame reached the callee, and the
    // callee serves everyone else.
    let ran: usize = caller
        .call("counted")
        .args((CALLS, WAIT.as_millis() as u64))
        .on(&callee)
        .timeout(WAIT + WAIT)
        .fg()
        .expect("counted");
    assert_eq!(ran, CALLS, "the burst's requests that ran");
    the_other_pair_keeps_calling(&caller, &other_caller, &callee, 20);
}
