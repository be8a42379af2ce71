//! NO_RETURN calls in batch frames (docs/PROTOCOL.md, "Batches of NO_RETURN calls")
//! under attack: a raw peer whose batches lie about their calls, a callee paused with
//! SIGSTOP mid-flood, a caller killed mid-flood, NO_RETURN calls mixed with calls that
//! want replies and with streams, nodes with a small frame limit, and byte arguments
//! around the size past which a call never joins a batch. Whatever a peer does costs
//! only that peer, and no call is lost. Real processes and sockets.

mod common;

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use common::{Worker, WAIT};
use daffi::{callback, Address, Global};
use daffi_wire::frame::{FLAG_NO_REPLY, FLAG_REQUEST_BATCH};
use daffi_wire::{Header, Kind};
use serde_bytes::ByteBuf;

const ENTRY: &str = "child_process";

/// Calls in each flood.
const FLOOD: u64 = 20_000;
/// Arguments of this size or more never join a batch (daffi's `JOINED_CALL`).
const JOINED_CALL: usize = 4 * 1024;
/// A small frame limit, for every process of a mesh or for a callee alone.
const SMALL_FRAME: usize = 8 * 1024;

/// A child's `max_frame_size`, when set.
const ENV_FRAME: &str = "DAFFI_TEST_FRAME";
/// A child controller's `max_queue_bytes`, when set.
const ENV_QUEUE: &str = "DAFFI_TEST_QUEUE";
/// A child controller's stall timeout in milliseconds, when set.
const ENV_STALL: &str = "DAFFI_TEST_STALL";
/// A worker's `max_sync_callbacks`, when set.
const ENV_SYNC: &str = "DAFFI_TEST_SYNC";

// ---- callbacks served by every worker of this binary -------------------------------

/// What `tally` ran here, in the order it ran: (tag, i).
static TALLIED: common::Log<(String, u64)> = common::Log::new();

/// Records one call.
#[callback]
fn tally(tag: String, i: u64) {
    TALLIED.push((tag, i));
}

/// The `i` of the calls tagged `tag` that ran here, in the order they ran, once `want`
/// did (or after `timeout_ms`).
#[callback]
fn arrived(tag: String, want: usize, timeout_ms: u64) -> Vec<u64> {
    TALLIED.tagged(&tag, want, timeout_ms)
}

/// How many calls tagged `tag` ran here once `n` did (or after `timeout_ms`), and the
/// first of 0..`n` missing or repeated among them: a small answer, for frame limits.
#[callback]
fn each_once(tag: String, n: u64, timeout_ms: u64) -> (u64, Option<u64>) {
    let mut ran = arrived(tag, n as usize, timeout_ms);
    ran.sort_unstable();
    (ran.len() as u64, common::first_missing(&ran, n))
}

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

/// A stream callback: 1 to `n`.
#[callback]
fn numbers(n: u64) -> impl Iterator<Item = u64> {
    1..=n
}

/// What the byte callbacks saw, in order: (tag, i, length, digest).
static BYTES_SEEN: common::Log<(String, u64, usize, u64)> = common::Log::new();

fn digest(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[callback]
fn bytes_vec(tag: String, i: u64, data: Vec<u8>) {
    BYTES_SEEN.push((tag, i, data.len(), digest(&data)));
}

#[callback]
fn bytes_buf(tag: String, i: u64, data: ByteBuf) {
    BYTES_SEEN.push((tag, i, data.len(), digest(&data)));
}

#[callback]
fn bytes_bytes(tag: String, i: u64, data: Bytes) {
    BYTES_SEEN.push((tag, i, data.len(), digest(&data)));
}

/// The byte calls tagged `tag` seen here, in order, once `want` were (or after
/// `timeout_ms`): (i, length, digest).
#[callback]
fn bytes_arrived(tag: String, want: usize, timeout_ms: u64) -> Vec<(u64, usize, u64)> {
    let of_tag =
        |items: &[(String, u64, usize, u64)]| items.iter().filter(|(t, ..)| *t == tag).count();
    BYTES_SEEN
        .wait_until(timeout_ms, |items| of_tag(items) >= want)
        .into_iter()
        .filter(|(t, ..)| *t == tag)
        .map(|(_, i, len, d)| (i, len, d))
        .collect()
}

// ---- child roles ---------------------------------------------------------------------

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[
        ("controller", controller_role),
        ("worker", worker),
        ("flooder", flooder),
        ("async_bytes", async_bytes),
    ]);
}

/// Checks that `got` holds each of 0..`n` exactly once (a sync callback runs on one of
/// several threads: calls that arrived in order may run out of it), naming the first
/// one missing or repeated rather than printing thousands.
fn assert_each_once(mut got: Vec<u64>, n: u64, what: &str) {
    got.sort_unstable();
    let first_wrong = (0..n).zip(got.iter()).find(|(want, got)| want != *got);
    assert!(
        got.len() as u64 == n && first_wrong.is_none(),
        "{what}: {} calls ran of {n}; first missing or repeated: {first_wrong:?}",
        got.len()
    );
}

/// A standalone controller with the limits its environment gives, until killed.
fn controller_role() {
    let mut b = common::builder_for(&common::address_from_env())
        .init_controller(true)
        .init_node(false);
    if let Some(frame) = common::setting(ENV_FRAME) {
        b = b.max_frame_size(frame);
    }
    if let Some(queue) = common::setting(ENV_QUEUE) {
        b = b.max_queue_bytes(queue);
    }
    if let Some(stall) = common::setting(ENV_STALL) {
        b = b.stall_timeout(Duration::from_millis(stall as u64));
    }
    b.start().expect("controller starts").join().expect("join");
}

/// A node serving the `#[callback]` functions of this file (with the frame limit its
/// environment gives).
fn worker() {
    let mut b = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"));
    if let Some(frame) = common::setting(ENV_FRAME) {
        b = b.max_frame_size(frame);
    }
    if let Some(sync) = common::setting(ENV_SYNC) {
        b = b.max_sync_callbacks(sync);
    }
    b.start().expect("worker starts").join().expect("join");
}

/// Calls `tally("killed", i)` NO_RETURN on the target, i = 0, 1, ..., until killed.
fn flooder() {
    let target = std::env::var(common::ENV_TARGET).expect("target");
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("flooder starts");
    g.wait_process_timeout(&target, WAIT).expect("target known");
    for i in 0.. {
        g.call("tally")
            .args(("killed", i as u64))
            .on(&target)
            .no_return()
            .expect("no_return");
    }
}

/// The byte arguments a caller sends, by round and position: lengths around
/// [`JOINED_CALL`], so that their calls' arguments fall on both sides of it.
fn byte_plan() -> Vec<Vec<u8>> {
    let mut plan = Vec::new();
    for round in 0..12u64 {
        for len in JOINED_CALL - 48..JOINED_CALL + 8 {
            let seed = (round * 31 + len as u64) as u8;
            plan.push((0..len).map(|j| seed.wrapping_add(j as u8)).collect());
        }
        // Small ones between, which join.
        for small in 0..20u8 {
            plan.push(vec![small; small as usize]);
        }
    }
    plan
}

/// Sends the byte plan NO_RETURN to the three byte callbacks, tagged `tag`.
async fn send_bytes_async(g: &Global, target: &str, tag: &str) {
    for (i, data) in byte_plan().into_iter().enumerate() {
        let i = i as u64;
        let call = match i % 3 {
            0 => g.call("bytes_vec").args((tag, i, data.clone())),
            1 => g
                .call("bytes_buf")
                .args((tag, i, ByteBuf::from(data.clone()))),
            _ => g
                .call("bytes_bytes")
                .args((tag, i, Bytes::from(data.clone()))),
        };
        call.on(target)
            .no_return_async()
            .await
            .expect("no_return_async");
    }
}

/// A user's program with its own runtime: the byte plan through the async API, then it
/// stops (letting what it sent go out).
#[tokio::main]
async fn async_bytes() {
    let (g, target) = common::async_child_and_target().await;
    send_bytes_async(&g, &target, "async").await;
    g.stop();
    g.join_async().await;
}

// ---- helpers -------------------------------------------------------------------------

/// Checks on `callee` that the calls tagged `tag` that ran there are each of 0..`n`
/// once (the answer stays small: for small frame limits).
fn assert_each_once_on(g: &Global, callee: &str, tag: &str, n: u64) {
    let (ran, first_wrong): (u64, Option<u64>) = g
        .call("each_once")
        .args((tag, n, WAIT.as_millis() as u64))
        .on(callee)
        .timeout(WAIT + WAIT)
        .fg()
        .expect("each_once");
    assert!(
        ran == n && first_wrong.is_none(),
        "{ran} calls ran of {n}; first missing or repeated: {first_wrong:?}"
    );
}

/// A standalone controller in a child process on a fresh Unix socket, with `env`.
fn controller(env: &[(&str, &str)]) -> (Address, std::path::PathBuf, Worker) {
    let path = std::env::temp_dir()
        .join("daffi-tests")
        .join(format!("{}.sock", common::unique("batch-attack")));
    let address = Address::Unix(path.clone());
    let process = common::spawn_child_with(ENTRY, "controller", "controller", &address, env);
    (address, path, process)
}

/// Like [`controller`], over TCP on a free port of 127.0.0.1.
fn controller_tcp(env: &[(&str, &str)]) -> (Address, Worker) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let address = Address::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let process = common::spawn_child_with(ENTRY, "controller", "controller", &address, env);
    (address, process)
}

/// A controller over TCP (`tcp`) or a Unix socket, with `env`.
fn controller_on(tcp: bool, env: &[(&str, &str)]) -> (Address, Worker) {
    if tcp {
        return controller_tcp(env);
    }
    let (address, _path, process) = controller(env);
    (address, process)
}

fn node(address: &Address, frame: Option<usize>) -> Global {
    let mut b = common::builder_for(address).process_name(common::unique("caller"));
    if let Some(frame) = frame {
        b = b.max_frame_size(frame);
    }
    b.start().expect("node starts")
}

fn spawn_worker(address: &Address, g: &Global, env: &[(&str, &str)]) -> (String, Worker) {
    common::spawn_known_worker(ENTRY, address, g, "callee", env)
}

/// The calls tagged `tag` that ran on `callee`, in order, once `want` did.
fn arrived_on(g: &Global, callee: &str, tag: &str, want: u64) -> Vec<u64> {
    g.call("arrived")
        .args((tag, want as usize, WAIT.as_millis() as u64))
        .on(callee)
        .timeout(WAIT + WAIT)
        .fg()
        .expect("arrived")
}

/// The calls tagged `tag` that ran on `callee`, once they are a whole prefix of the
/// flood (0 up to the highest one seen), or what ran after [`WAIT`]. Calls arrive in
/// order but run on several callback threads: when the highest one has run, calls
/// before it may still be running, and the count alone says nothing of which.
fn whole_prefix(g: &Global, callee: &str, tag: &str) -> Vec<u64> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let seen = arrived_on(g, callee, tag, 0);
        let highest = seen.iter().max().copied().expect("some ran");
        if seen.len() as u64 == highest + 1 || std::time::Instant::now() >= deadline {
            return seen;
        }
        // Waits (bounded) until as many ran as a whole prefix holds.
        arrived_on(g, callee, tag, highest + 1);
    }
}

/// `callee` still answers `g`.
fn still_served(g: &Global, callee: &str) {
    let sum: i64 = g
        .call("sync_add")
        .args((2, 3))
        .on(callee)
        .timeout(WAIT)
        .fg()
        .expect("sync_add");
    assert_eq!(sum, 5);
}

fn pause(worker: &Worker) {
    common::pause(worker.pid().expect("running"));
}

fn resume(worker: &Worker) {
    common::resume(worker.pid().expect("running"));
}

// ---- a raw peer whose batches lie ------------------------------------------------------

#[test]
fn lying_batches_cost_only_their_sender_and_cannot_inflate_the_counts() {
    let (address, path, _controller) = controller(&[]);
    let caller = node(&address, None);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    let raw = common::unique("raw");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &[]);
    caller.wait_process_timeout(&raw, WAIT).expect("raw known");

    let bad = |i: u64| common::wire::encode(&("bad", i));
    let flags = FLAG_NO_REPLY | FLAG_REQUEST_BATCH;
    let two_bad = common::wire::batch_payload(&[bad(0), bad(1)]);
    let request = |name: &str, flags: u8, count: u64, payload: &[u8]| {
        common::wire::batch_request(&raw, &callee, name, flags, count, payload)
    };
    let mut lies = Vec::new();
    // Counts that are not the calls': huge, larger, smaller, zero.
    for count in [u64::MAX, u64::MAX / 2, 1 << 32, 1 << 31, 3, 1, 0] {
        lies.push(request("tally", flags, count, &two_bad));
    }
    // A hundred more of the largest lie: nothing overflows.
    for _ in 0..100 {
        lies.push(request("tally", flags, u64::MAX, &two_bad));
    }
    // A length past the end, and a last length cut short.
    let mut past = two_bad.clone();
    past[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
    lies.push(request("tally", flags, 2, &past));
    lies.push(request("tally", flags, 2, &two_bad[..two_bad.len() - 1]));
    let mut cut = two_bad.clone();
    cut.extend_from_slice(&[0, 0]);
    lies.push(request("tally", flags, 2, &cut));
    // Without NO_REPLY (a caller waiting for no reply it would get), with STREAM.
    lies.push(request("tally", FLAG_REQUEST_BATCH, 2, &two_bad));
    lies.push(request("tally", flags | 0b10, 2, &two_bad));
    let mut bytes: Vec<u8> = lies.concat();
    let counted_bound: u64 = lies.iter().map(|f| (f.len() / 4) as u64).sum();

    // Well-made batches the callee cannot run: to a stream callback, to a callback it
    // does not serve, and of arguments of the wrong type; then a well-made batch of 1
    // item (not a batch: dropped) and a good batch and lone call behind them all.
    let numbers = common::wire::batch_payload(&[
        common::wire::encode(&(3u64,)),
        common::wire::encode(&(4u64,)),
    ]);
    bytes.extend(request("numbers", flags, 2, &numbers));
    bytes.extend(request("no_such_callback", flags, 2, &two_bad));
    let wrong = common::wire::batch_payload(&[
        common::wire::encode(&(7u64, "bad")),
        common::wire::encode(&("bad",)),
        common::wire::encode(&Vec::<u8>::new()),
        vec![0xc1],
    ]);
    bytes.extend(request("tally", flags, 4, &wrong));
    bytes.extend(request(
        "tally",
        flags,
        1,
        &common::wire::batch_payload(&[bad(9)]),
    ));
    let good = |i: u64| common::wire::encode(&("raw", i));
    bytes.extend(request(
        "tally",
        flags,
        3,
        &common::wire::batch_payload(&[good(0), good(1), good(2)]),
    ));
    bytes.extend(common::wire::request(
        &raw,
        &callee,
        0,
        "tally",
        &("raw", 3u64),
    ));
    stream.write_all(&bytes).expect("the batches");

    assert_each_once(arrived_on(&caller, &callee, "raw", 4), 4, "well-made calls");
    assert_eq!(
        arrived_on(&caller, &callee, "bad", 0),
        Vec::<u64>::new(),
        "a call of a lying batch ran"
    );
    // Everyone stays connected and served, the raw peer too.
    still_served(&caller, &callee);
    let members = caller.members();
    for name in [&raw, &callee] {
        assert!(members.iter().any(|m| &m.name == name), "{name} left");
    }
    stream
        .write_all(&common::wire::request(
            &raw,
            &callee,
            0,
            "tally",
            &("raw", 4u64),
        ))
        .expect("the raw peer still sends");
    assert_each_once(arrived_on(&caller, &callee, "raw", 5), 5, "well-made calls");

    // The controller counted the lies from their headers, within the documented bound
    // (a quarter of each frame's bytes), never their claims.
    let stats = caller.controller_stats().expect("stats");
    let tally = stats.calls.get("tally").copied().unwrap_or(0);
    assert!(
        tally >= 5 && tally <= counted_bound + 64,
        "tally counted {tally} calls: 5 made well, at most {counted_bound} claimed by lies"
    );
    assert!(tally < 1 << 20, "the lies inflated the count: {tally}");
}

// ---- the callee paused, the caller killed --------------------------------------------

#[test]
fn a_callee_paused_mid_flood_runs_every_call_once() {
    a_callee_paused_mid_flood(false);
}

#[test]
fn a_callee_paused_mid_flood_runs_every_call_once_over_tcp() {
    a_callee_paused_mid_flood(true);
}

fn a_callee_paused_mid_flood(tcp: bool) {
    // A queue at the controller that holds the flood, and no stall timeout to hit.
    let (address, _controller) = controller_on(
        tcp,
        &[
            (ENV_QUEUE, &(4 * 1024 * 1024).to_string()),
            (ENV_STALL, &(600 * 1000).to_string()),
        ],
    );
    let caller = node(&address, None);
    let (callee, callee_process) = spawn_worker(&address, &caller, &[]);
    still_served(&caller, &callee);

    pause(&callee_process);
    flood_tally(&caller, &callee, "paused", FLOOD);
    resume(&callee_process);
    assert_each_once(
        arrived_on(&caller, &callee, "paused", FLOOD),
        FLOOD,
        "a paused callee",
    );
    still_served(&caller, &callee);
    // The controller counted each call of each batch once (plus the `arrived` and
    // `sync_add` calls, under their own names).
    let stats = caller.controller_stats().expect("stats");
    assert_eq!(stats.calls.get("tally"), Some(&FLOOD));
}

#[test]
fn a_controller_paused_mid_flood_holds_the_callers_joins_within_its_queue_limit() {
    let (address, _path, controller_process) = controller(&[]);
    // A caller whose queue holds 64 KiB: a flood waits for room once the controller
    // stops reading, and what waits in its queue is joined into batches.
    let caller = common::builder_for(&address)
        .process_name(common::unique("caller"))
        .max_queue_bytes(64 * 1024)
        .start()
        .expect("caller starts");
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    still_served(&caller, &callee);

    pause(&controller_process);
    let (queued, first_thousand) = std::sync::mpsc::channel();
    let flood = {
        let caller = caller.clone();
        let callee = callee.clone();
        std::thread::spawn(move || {
            for i in 0..FLOOD {
                caller
                    .call("tally")
                    .args(("held", i))
                    .on(&callee)
                    .timeout(WAIT + WAIT)
                    .no_return()
                    .expect("no_return waits for room, then goes");
                if i == 1000 {
                    queued.send(()).expect("the test waits");
                }
            }
        })
    };
    // A thousand calls (some 30 KiB) fit the caller's queue with the controller paused.
    first_thousand
        .recv_timeout(WAIT)
        .expect("the first calls are queued");
    resume(&controller_process);
    flood.join().expect("the flood");
    assert_each_once(arrived_on(&caller, &callee, "held", FLOOD), FLOOD, "held");
    still_served(&caller, &callee);
}

#[test]
fn a_caller_killed_mid_flood_leaves_whole_calls_and_the_callee_serving() {
    let (address, _path, _controller) = controller(&[]);
    let caller = node(&address, None);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    let flooder_name = common::unique("flooder");
    let mut flooder = common::spawn_child_with(
        ENTRY,
        "flooder",
        &flooder_name,
        &address,
        &[(common::ENV_TARGET, &callee)],
    );
    // Once a good part of the flood ran, the flooder dies mid-flood.
    let before = arrived_on(&caller, &callee, "killed", 5_000);
    assert!(before.len() >= 5_000, "the flood ran: {}", before.len());
    // SIGKILL, and reaped: whatever it had not written is lost with it.
    flooder.kill();

    // The callee serves others, and ran a prefix of the flood: each call whole, once,
    // in order, none cut off or half-made by the death.
    still_served(&caller, &callee);
    let ran = whole_prefix(&caller, &callee, "killed");
    let n = ran.len() as u64;
    assert_each_once(ran, n, "the calls that ran are the flood's first");
    flood_tally(&caller, &callee, "after", 100);
    assert_each_once(arrived_on(&caller, &callee, "after", 100), 100, "after");
}

// ---- NO_RETURN calls mixed with calls that want replies and streams -------------------

#[test]
fn no_return_calls_mixed_with_fg_bg_and_streams_all_run_and_replies_hold() {
    let (address, _path, _controller) = controller(&[]);
    let caller = node(&address, None);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);

    let mut pending = Vec::new();
    for i in 0..FLOOD {
        caller
            .call("tally")
            .args(("mixed", i))
            .on(&callee)
            .no_return()
            .expect("no_return");
        match i % 500 {
            0 => {
                let sum: i64 = caller
                    .call("sync_add")
                    .args((i as i64, 1))
                    .on(&callee)
                    .timeout(WAIT)
                    .fg()
                    .expect("fg");
                assert_eq!(sum, i as i64 + 1);
            }
            100 | 300 => pending.push((
                i,
                caller
                    .call("sync_add")
                    .args((i as i64, 2))
                    .on(&callee)
                    .timeout(WAIT)
                    .bg::<i64>()
                    .expect("bg"),
            )),
            200 => {
                let items: Vec<u64> = caller
                    .call("numbers")
                    .args((i % 7 + 1,))
                    .on(&callee)
                    .timeout(WAIT)
                    .stream::<u64>()
                    .expect("stream")
                    .into_iter()
                    .collect::<Result<_, _>>()
                    .expect("items");
                assert_eq!(items, (1..=i % 7 + 1).collect::<Vec<u64>>());
            }
            _ => {}
        }
    }
    for (i, result) in pending {
        assert_eq!(result.get().expect("bg result"), i as i64 + 2);
    }
    assert_each_once(
        arrived_on(&caller, &callee, "mixed", FLOOD),
        FLOOD,
        "NO_RETURN calls mixed with others",
    );
}

#[test]
fn no_return_calls_mixed_with_fg_and_bg_calls_reach_a_raw_callee_in_the_order_sent() {
    // docs/PROTOCOL.md: a node's frames are delivered in the order they were sent. A
    // raw callee sees every call, NO_RETURN ones (lone or in batches) and those that
    // want a reply, in the order one thread made them, and answers the latter.
    let (address, path, _controller) = controller(&[]);
    let caller = node(&address, None);
    let raw = common::unique("raw-callee");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &["first"]);
    caller.wait_process_timeout(&raw, WAIT).expect("raw known");
    let mut replies = stream.try_clone().expect("a second handle");
    let reader = {
        let raw = raw.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut batches = 0u64;
            while (seen.len() as u64) < FLOOD {
                let frame = common::wire::read_frame_from(&mut stream);
                if frame.kind() != Kind::Request {
                    continue;
                }
                let payload = frame.payload();
                let calls: Vec<Vec<u8>> = if frame.flags() & FLAG_REQUEST_BATCH != 0 {
                    batches += 1;
                    let mut calls = Vec::new();
                    let mut rest = &payload[..];
                    while !rest.is_empty() {
                        let len = u32::from_be_bytes(rest[..4].try_into().expect("4")) as usize;
                        calls.push(rest[4..4 + len].to_vec());
                        rest = &rest[4 + len..];
                    }
                    assert_eq!(calls.len() as u64, frame.call_id());
                    calls
                } else {
                    vec![payload.to_vec()]
                };
                for args in calls {
                    let (_, i): (String, u64) = rmp_serde::from_slice(&args).expect("(tag, i)");
                    seen.push(i);
                }
                if frame.flags() & FLAG_NO_REPLY == 0 {
                    let i = *seen.last().expect("a call");
                    let body = common::wire::encode(&i);
                    let header = Header {
                        kind: Kind::Reply,
                        flags: 0,
                        call_id: frame.call_id(),
                        timeout_ms: 0,
                        src: &raw,
                        dst: frame.src(),
                        name: "",
                    };
                    let mut reply = header.encode(body.len()).to_vec();
                    reply.extend_from_slice(&body);
                    replies.write_all(&reply).expect("a reply");
                }
            }
            (seen, batches)
        })
    };
    let mut pending = Vec::new();
    for i in 0..FLOOD {
        let call = caller.call("first").args(("w", i)).on(&raw).timeout(WAIT);
        match i % 400 {
            0 => assert_eq!(call.fg::<u64>().expect("fg"), i),
            200 => pending.push((i, call.bg::<u64>().expect("bg"))),
            _ => call.no_return().expect("no_return"),
        }
    }
    for (i, result) in pending {
        assert_eq!(result.get().expect("bg"), i);
    }
    let (seen, batches) = reader.join().expect("the raw callee");
    let first_wrong = seen.iter().zip(0..FLOOD).find(|(got, want)| **got != *want);
    assert!(
        seen.len() as u64 == FLOOD && first_wrong.is_none(),
        "{} calls seen of {FLOOD}; first out of order (seen, sent): {first_wrong:?}",
        seen.len()
    );
    assert!(batches > 0, "some NO_RETURN calls left in batches");
}

// ---- small frame limits ---------------------------------------------------------------

/// A tag that makes each call's arguments about 300 bytes: some 25 fit a frame of
/// [`SMALL_FRAME`].
/// `n` NO_RETURN calls of `tally(tag, i)` from `g` to `callee`, `i` counting from 0.
fn flood_tally(g: &Global, callee: &str, tag: &str, n: u64) {
    for i in 0..n {
        g.call("tally")
            .args((tag, i))
            .on(callee)
            .no_return()
            .expect("no_return");
    }
}

fn long_tag(name: &str) -> String {
    format!("{name}-{}", "x".repeat(290))
}

#[test]
fn with_a_small_frame_limit_everywhere_batches_stay_within_it() {
    let frame = SMALL_FRAME.to_string();
    let (address, _path, _controller) = controller(&[(ENV_FRAME, &frame)]);
    let caller = node(&address, Some(SMALL_FRAME));
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[(ENV_FRAME, &frame)]);

    let tag = long_tag("small");
    flood_tally(&caller, &callee, &tag, FLOOD);
    assert_each_once_on(&caller, &callee, &tag, FLOOD);
    still_served(&caller, &callee);
    let members = caller.members();
    assert!(members.iter().any(|m| m.name == callee), "the callee left");
}

#[test]
fn a_callee_with_a_smaller_frame_limit_than_its_callers_is_not_cut_off_by_batches() {
    a_callee_with_a_smaller_frame_limit(false);
}

#[test]
fn a_callee_with_a_smaller_frame_limit_is_not_cut_off_by_batches_over_tcp() {
    a_callee_with_a_smaller_frame_limit(true);
}

fn a_callee_with_a_smaller_frame_limit(tcp: bool) {
    // Each call is far under the callee's limit, as it always was; only the batches
    // its calls join would pass it.
    let (address, _controller) = controller_on(tcp, &[]);
    let caller = node(&address, None);
    let frame = SMALL_FRAME.to_string();
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[(ENV_FRAME, &frame)]);

    let tag = long_tag("smaller");
    flood_tally(&caller, &callee, &tag, FLOOD);
    assert_each_once_on(&caller, &callee, &tag, FLOOD);
    still_served(&caller, &callee);
}

// ---- the callee's NO_RETURN allowance ------------------------------------------------

#[test]
fn a_callee_with_few_sync_callbacks_takes_batches_within_its_allowance() {
    // An allowance of 64 x 4 = 256 NO_RETURN calls waiting or running; calls of 5 bytes
    // of arguments, thousands to a batch.
    let (address, _path, _controller) = controller(&[]);
    let caller = node(&address, None);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[(ENV_SYNC, "4")]);
    // Within the allowance, however they are batched: every call runs.
    flood_tally(&caller, &callee, "within", 250);
    assert_each_once_on(&caller, &callee, "within", 250);
    // Far past it, from a caller faster than the callee: calls are dropped past the
    // allowance (logged by the callee, as documented, batched or not), never run twice,
    // and the callee keeps serving.
    flood_tally(&caller, &callee, "past", FLOOD);
    still_served(&caller, &callee);
    let mut ran = arrived_on(&caller, &callee, "past", 0);
    let before = ran.len();
    ran.sort_unstable();
    ran.dedup();
    assert_eq!(ran.len(), before, "a call ran twice");
}

// ---- byte arguments around the join's cutoff ------------------------------------------

#[test]
fn byte_arguments_around_the_join_cutoff_arrive_whole_from_sync_and_async_code() {
    let (address, _path, _controller) = controller(&[]);
    let caller = node(&address, None);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    let async_name = common::unique("async-bytes");
    let mut async_process = common::spawn_child_with(
        ENTRY,
        "async_bytes",
        &async_name,
        &address,
        &[(common::ENV_TARGET, &callee)],
    );
    // The sync API at the same time, with the same plan.
    let plan = byte_plan();
    for (i, data) in plan.iter().enumerate() {
        let i = i as u64;
        let call = match i % 3 {
            0 => caller.call("bytes_vec").args(("sync", i, data.clone())),
            1 => caller
                .call("bytes_buf")
                .args(("sync", i, ByteBuf::from(data.clone()))),
            _ => caller
                .call("bytes_bytes")
                .args(("sync", i, Bytes::from(data.clone()))),
        };
        call.on(&callee).no_return().expect("no_return");
    }
    let expected: Vec<(u64, usize, u64)> = plan
        .iter()
        .enumerate()
        .map(|(i, data)| (i as u64, data.len(), digest(data)))
        .collect();
    for tag in ["sync", "async"] {
        let seen: Vec<(u64, usize, u64)> = caller
            .call("bytes_arrived")
            .args((tag, expected.len(), WAIT.as_millis() as u64))
            .on(&callee)
            .timeout(WAIT + WAIT)
            .fg()
            .expect("bytes_arrived");
        // Sync callbacks run on several threads: calls may pass each other.
        let mut sorted = seen;
        sorted.sort_unstable();
        let wrong = expected.iter().zip(&sorted).find(|(want, got)| want != got);
        assert!(
            sorted.len() == expected.len() && wrong.is_none(),
            "{tag}: {} calls seen of {}, first wrong (expected, seen): {wrong:?}",
            sorted.len(),
            expected.len()
        );
    }
    async_process.wait_success();
    still_served(&caller, &callee);
}
