//! Replies in batch frames (docs/PROTOCOL.md, "Batches of replies"): floods of BG calls
//! from sync code and from a `#[tokio::main]` program get every reply right and matched
//! to its call; a raw caller sees the batches and their layout; a raw callee whose
//! batches lie costs only its own calls, which fail by name; a callee paused mid-flood
//! answers every call once, a callee killed mid-flood fails every call in flight by name
//! while another callee keeps answering, and a caller killed mid-flood leaves the callee
//! and the controller serving. A caller with a smaller frame limit than its callee gets
//! the batches split to fit. Real processes and sockets.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::{Worker, WAIT};
use daffi::{callback, Address, AsyncResult, Error, Global};
use daffi_wire::frame::{FLAG_ERROR, FLAG_REPLY_BATCH, FLAG_REQUEST_BATCH};
use daffi_wire::{Frame, Header, Kind};

const ENTRY: &str = "child_process";

/// Calls in each flood.
const FLOOD: u64 = 20_000;
/// Calls a flood keeps in flight.
const IN_FLIGHT: usize = 256;

/// A child's `max_frame_size`, when set.
const ENV_FRAME: &str = "DAFFI_TEST_FRAME";
/// A child's `max_sync_callbacks`, when set.
const ENV_MAX_SYNC: &str = "DAFFI_TEST_MAX_SYNC";

// ---- callbacks served by every worker of this binary -------------------------------

/// What `echo` ran here: (tag, i).
static ECHOED: common::Log<(String, u64)> = common::Log::new();

/// Gives back its arguments; fails for every `i` divisible by 7, naming it.
#[callback]
fn echo(tag: String, i: u64) -> Result<(String, u64), String> {
    ECHOED.push((tag.clone(), i));
    if i % 7 == 0 {
        return Err(format!("no {i}"));
    }
    Ok((tag, i))
}

/// `echo` as an async callback.
#[callback]
async fn echo_async(tag: String, i: u64) -> Result<(String, u64), String> {
    echo(tag, i)
}

/// A result of `len` bytes, each `i` (as a byte).
#[callback]
fn sized(i: u64, len: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![i as u8; len])
}

/// How many calls tagged `tag` ran here once `n` did (or after `timeout_ms`), and the
/// first of 0..`n` missing or repeated among them.
#[callback]
fn each_once(tag: String, n: u64, timeout_ms: u64) -> (u64, Option<u64>) {
    let mut ran = ECHOED.tagged(&tag, n as usize, timeout_ms);
    ran.sort_unstable();
    (ran.len() as u64, common::first_missing(&ran, n))
}

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

// ---- child roles ---------------------------------------------------------------------

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[
        ("controller", common::run_controller_role),
        ("worker", worker),
        ("async_caller", async_caller),
        ("bg_flooder", bg_flooder),
        ("small_queue_controller", small_queue_controller),
    ]);
}

/// A standalone controller that holds at most 64 KiB for a node (and never closes one
/// for reading too little, within a test).
fn small_queue_controller() {
    common::builder_for(&common::address_from_env())
        .init_controller(true)
        .init_node(false)
        .max_queue_bytes(64 * 1024)
        .stall_timeout(std::time::Duration::from_secs(600))
        .start()
        .expect("controller starts")
        .join()
        .expect("join");
}

/// A node serving the `#[callback]` functions of this file.
fn worker() {
    let mut b = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"));
    if let Some(frame) = common::setting(ENV_FRAME) {
        b = b.max_frame_size(frame);
    }
    if let Some(limit) = common::setting(ENV_MAX_SYNC) {
        b = b.max_sync_callbacks(limit);
    }
    b.start().expect("worker starts").join().expect("join");
}

/// A user's program with its own runtime: a flood of BG calls awaited with `.await`,
/// [`IN_FLIGHT`] at a time, half to the sync `echo` and half to `echo_async`; every
/// result is checked against its call. Exits with success only if all were right.
#[tokio::main]
async fn async_caller() {
    let (g, target) = common::async_child_and_target().await;
    let mut in_flight: VecDeque<(u64, AsyncResult<(String, u64)>)> = VecDeque::new();
    let mut checked = 0;
    for i in 0..FLOOD {
        let callback = if i % 2 == 0 { "echo" } else { "echo_async" };
        let call = g
            .call(callback)
            .args(("async", i))
            .on(&target)
            .timeout(WAIT)
            .bg::<(String, u64)>()
            .expect("bg");
        in_flight.push_back((i, call));
        if in_flight.len() >= IN_FLIGHT {
            let (i, call) = in_flight.pop_front().expect("one");
            check_echo(&target, "async", i, call.await);
            checked += 1;
        }
    }
    for (i, call) in in_flight {
        check_echo(&target, "async", i, call.await);
        checked += 1;
    }
    assert_eq!(checked, FLOOD);
    g.stop();
    g.join_async().await;
}

/// Calls `echo("bg-killed", i)` BG on the target, [`IN_FLIGHT`] at a time, until killed.
fn bg_flooder() {
    let target = std::env::var(common::ENV_TARGET).expect("target");
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("flooder starts");
    g.wait_process_timeout(&target, WAIT).expect("target known");
    let mut in_flight = VecDeque::new();
    for i in 0u64.. {
        let call = g
            .call("echo")
            .args(("bg-killed", i))
            .on(&target)
            .bg::<(String, u64)>()
            .expect("bg");
        in_flight.push_back(call);
        if in_flight.len() >= IN_FLIGHT {
            let _ = in_flight.pop_front().expect("one").get();
        }
    }
}

// ---- helpers -------------------------------------------------------------------------

/// Checks one `echo` outcome: `(tag, i)`, or for `i` divisible by 7 the callee's error
/// naming `i`.
fn check_echo(callee: &str, tag: &str, i: u64, got: daffi::Result<(String, u64)>) {
    match got {
        Ok(value) => {
            assert!(i % 7 != 0, "call {i} should have failed, got {value:?}");
            assert_eq!(value, (tag.to_string(), i), "the reply of call {i}");
        }
        Err(Error::Remote {
            process, message, ..
        }) => {
            assert_eq!(i % 7, 0, "call {i} failed: {message}");
            assert_eq!(process, callee);
            assert!(message.contains(&format!("no {i}")), "{message}");
        }
        Err(e) => panic!("call {i}: {e}"),
    }
}

/// A standalone controller in a child process on a fresh Unix socket.
fn controller() -> (Address, std::path::PathBuf, Worker) {
    let path = std::env::temp_dir()
        .join("daffi-tests")
        .join(format!("{}.sock", common::unique("replies")));
    let address = Address::Unix(path.clone());
    let process = common::spawn_child(ENTRY, "controller", "controller", &address);
    (address, path, process)
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

/// BG calls of `echo(tag, i)` for `i` in `range` from `g` to `callee`, [`IN_FLIGHT`] at
/// a time, each checked against its call (bounded by `WAIT`: none may hang).
fn bg_flood(g: &Global, callee: &str, tag: &str, range: std::ops::Range<u64>) {
    let mut in_flight = VecDeque::new();
    let finish = |(i, call): (u64, AsyncResult<(String, u64)>)| {
        check_echo(callee, tag, i, call.get_timeout(WAIT + WAIT));
    };
    for i in range {
        let callback = if i % 3 == 0 { "echo_async" } else { "echo" };
        let call = g
            .call(callback)
            .args((tag, i))
            .on(callee)
            .bg::<(String, u64)>()
            .expect("bg");
        in_flight.push_back((i, call));
        if in_flight.len() >= IN_FLIGHT {
            finish(in_flight.pop_front().expect("one"));
        }
    }
    in_flight.into_iter().for_each(finish);
}

/// Checks on `callee` that the calls tagged `tag` that ran there are each of 0..`n` once.
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

/// A batch reply made by hand, from `src` to `dst`: `count` in `call_id`, `flags`,
/// carrying `payload`.
fn reply_frame(src: &str, dst: &str, flags: u8, call_id: u64, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        kind: Kind::Reply,
        flags,
        call_id,
        timeout_ms: 0,
        src,
        dst,
        name: "",
    };
    let mut out = header.encode(payload.len()).to_vec();
    out.extend_from_slice(payload);
    out
}

/// A batch reply's payload: (call id, flags, payload) each.
fn replies_payload(items: &[(u64, u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, flags, payload) in items {
        out.extend_from_slice(&id.to_be_bytes());
        out.push(*flags);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
    }
    out
}

/// The call ids of the next `n` calls a raw node reads (other frames skipped), lone or
/// in batches of calls that want replies (docs/PROTOCOL.md).
fn read_requests(stream: &mut impl std::io::Read, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let frame = common::wire::read_frame_from(stream);
        if frame.kind() == Kind::Request {
            ids.extend(calls_of(&frame).into_iter().map(|(id, _)| id));
        }
    }
    ids
}

// ---- floods from the sync API and the async API in the user's runtime ----------------

#[test]
fn bg_floods_from_sync_and_async_code_get_every_reply_right() {
    let (address, _path, _controller) = controller();
    let caller = node(&address);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);

    // The async API in the user's own runtime (#[tokio::main]), in another process.
    let async_name = common::unique("async-caller");
    let mut async_process = common::spawn_child_with(
        ENTRY,
        "async_caller",
        &async_name,
        &address,
        &[(common::ENV_TARGET, &callee)],
    );
    // The sync API, from two threads of this process at the same time.
    let other = {
        let (caller, callee) = (caller.clone(), callee.clone());
        std::thread::spawn(move || bg_flood(&caller, &callee, "sync-b", 0..FLOOD / 2))
    };
    bg_flood(&caller, &callee, "sync", 0..FLOOD);
    other.join().expect("the second flood");
    async_process.wait_success();
    assert_each_once_on(&caller, &callee, "sync", FLOOD);
    assert_each_once_on(&caller, &callee, "sync-b", FLOOD / 2);
    assert_each_once_on(&caller, &callee, "async", FLOOD);
    still_served(&caller, &callee);
}

#[test]
fn a_raw_caller_gets_its_replies_in_batches_each_matched_to_its_call() {
    let (address, path, _controller) = controller();
    let caller = node(&address);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    let raw = common::unique("raw");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &[]);
    caller.wait_process_timeout(&raw, WAIT).expect("raw known");

    // Nine hundred requests in one write (within the callee's 1,024 sync callbacks at
    // once): their replies come faster than one at a time leaves, and join.
    const CALLS: u64 = 900;
    let mut bytes = Vec::new();
    for id in 1..=CALLS {
        bytes.extend(common::wire::request(
            &raw,
            &callee,
            id,
            "echo",
            &("raw", id),
        ));
    }
    stream.write_all(&bytes).expect("the requests");
    let mut answered = BTreeMap::new();
    let mut batches = 0;
    let deadline = Instant::now() + WAIT;
    while (answered.len() as u64) < CALLS && Instant::now() < deadline {
        let frame = common::wire::read_frame_from(&mut stream);
        if frame.kind() != Kind::Reply {
            continue;
        }
        assert_eq!((frame.src(), frame.dst()), (callee.as_str(), raw.as_str()));
        batches += u64::from(frame.flags() & FLAG_REPLY_BATCH != 0);
        for (id, flags, payload) in common::wire::replies_of(&frame) {
            let error = flags & FLAG_ERROR != 0;
            assert!(
                answered.insert(id, (error, payload)).is_none(),
                "{id} twice"
            );
        }
    }
    for id in 1..=CALLS {
        let (error, payload) = answered.get(&id).expect("every call answered");
        assert_eq!(
            *error,
            id % 7 == 0,
            "call {id}: an error if and only if it failed"
        );
        if !error {
            let value: (String, u64) = rmp_serde::from_slice(payload).expect("(tag, i)");
            assert_eq!(value, ("raw".to_string(), id));
        }
    }
    assert!(batches > 0, "replies to a burst left in batches");
}

/// A batch of calls to a quick sync callback is served as one job, each call still
/// admitted against `max_sync_callbacks`: those past it are answered `Overloaded` (by
/// name), the others with their results, every call once, none lost.
#[test]
fn a_batch_past_max_sync_callbacks_gets_overloaded_for_the_rest_and_loses_none() {
    const LIMIT: u64 = 4;
    let (address, path, _controller) = controller();
    let caller = node(&address);
    let limit = LIMIT.to_string();
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[(ENV_MAX_SYNC, &limit)]);
    let raw = common::unique("raw");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &[]);
    caller.wait_process_timeout(&raw, WAIT).expect("raw known");
    let mut reader = stream.try_clone().expect("a clone");
    let mut replies = |n: usize| {
        let mut answered = BTreeMap::new();
        let deadline = Instant::now() + WAIT;
        while answered.len() < n && Instant::now() < deadline {
            let frame = common::wire::read_frame_from(&mut reader);
            if frame.kind() != Kind::Reply {
                continue;
            }
            for (id, flags, payload) in common::wire::replies_of(&frame) {
                let error = flags & FLAG_ERROR != 0;
                assert!(
                    answered.insert(id, (error, payload)).is_none(),
                    "{id} answered twice"
                );
            }
        }
        answered
    };
    // A few lone calls first, one at a time: `echo` is then seen to finish quickly.
    for id in 1..=4u64 {
        let request = common::wire::request(&raw, &callee, id, "echo", &("warm", id));
        stream.write_all(&request).expect("a request");
        let answered = replies(1);
        assert!(answered.contains_key(&id), "warm-up call {id} answered");
    }

    const CALLS: u64 = 50;
    let calls: Vec<(u64, Vec<u8>)> = (100..100 + CALLS)
        .map(|id| (id, common::wire::encode(&("batch", id))))
        .collect();
    stream
        .write_all(&call_batch(
            &raw,
            &callee,
            FLAG_REQUEST_BATCH,
            CALLS,
            &calls,
        ))
        .expect("the batch");
    let answered = replies(CALLS as usize);
    let (mut ran, mut overloaded) = (0, 0);
    for id in 100..100 + CALLS {
        let (error, payload) = answered.get(&id).expect("every call of the batch answered");
        let text = String::from_utf8_lossy(payload);
        if *error && text.contains(&format!("max_sync_callbacks = {LIMIT}")) {
            overloaded += 1;
            continue;
        }
        ran += 1;
        assert_eq!(*error, id % 7 == 0, "call {id}: {text}");
        if !error {
            let value: (String, u64) = rmp_serde::from_slice(payload).expect("(tag, i)");
            assert_eq!(value, ("batch".to_string(), id));
        }
    }
    assert_eq!(
        answered.len() as u64,
        CALLS,
        "only the batch's calls answered"
    );
    // A warm-up call may still count as running for a moment after its reply left.
    assert!(
        (LIMIT - 1..=LIMIT).contains(&ran),
        "{ran} calls ran, {overloaded} were refused (limit {LIMIT})"
    );
    assert_eq!(ran + overloaded, CALLS);
    still_served(&caller, &callee);
}

// ---- a raw callee whose batches lie --------------------------------------------------

#[test]
fn lying_batches_of_replies_fail_only_their_senders_calls_by_name() {
    let (address, path, _controller) = controller();
    let caller = node(&address);
    let (honest, _honest_process) = spawn_worker(&address, &caller, &[]);
    let liar = common::unique("liar");
    let mut stream = common::wire::raw_unix_node(&path, &liar, &["echo"]);
    caller
        .wait_process_timeout(&liar, WAIT)
        .expect("liar known");
    let other_caller = node(&address);
    other_caller
        .wait_process_timeout(&honest, WAIT)
        .expect("honest known");

    let ok = |tag: &str, i: u64| common::wire::encode(&(tag, i));
    // Each lie answers two calls; the whole batch is malformed.
    type Lie = Box<dyn Fn(u64, u64) -> (u8, u64, Vec<u8>)>;
    let lies: Vec<(&str, Lie)> = vec![
        (
            "count 0",
            Box::new(move |a, b| (FLAG_REPLY_BATCH, 0, two(a, b))),
        ),
        (
            "count huge",
            Box::new(move |a, b| (FLAG_REPLY_BATCH, u64::MAX, two(a, b))),
        ),
        (
            "count 3 of 2",
            Box::new(move |a, b| (FLAG_REPLY_BATCH, 3, two(a, b))),
        ),
        (
            "a length past the end",
            Box::new(move |a, b| {
                let mut p = two(a, b);
                let at = p.len() - 4 - ok_len();
                p[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
                (FLAG_REPLY_BATCH, 2, p)
            }),
        ),
        (
            "cut short",
            Box::new(move |a, b| {
                let mut p = two(a, b);
                p.truncate(p.len() - ok_len() - 2);
                (FLAG_REPLY_BATCH, 2, p)
            }),
        ),
        (
            "ERROR with BATCH",
            Box::new(move |a, b| (FLAG_REPLY_BATCH | FLAG_ERROR, 2, two(a, b))),
        ),
        (
            "an item's flags",
            Box::new(move |a, b| {
                let mut p = two(a, b);
                p[8] = 0b100;
                (FLAG_REPLY_BATCH, 2, p)
            }),
        ),
        (
            "one reply",
            Box::new(move |a, _| {
                let p = replies_payload(&[(a, 0, common::wire::encode(&("echo", a)))]);
                (FLAG_REPLY_BATCH, 1, p)
            }),
        ),
        (
            "empty",
            Box::new(move |_, _| (FLAG_REPLY_BATCH, 2, Vec::new())),
        ),
    ];
    fn ok_len() -> usize {
        common::wire::encode(&("echo", 0u64)).len()
    }
    fn two(a: u64, b: u64) -> Vec<u8> {
        replies_payload(&[
            (a, 0, common::wire::encode(&("echo", 0u64))),
            (b, 0, common::wire::encode(&("echo", 0u64))),
        ])
    }

    // Meanwhile another caller floods the honest callee: none of it is affected.
    let flood = {
        let (other_caller, honest) = (other_caller.clone(), honest.clone());
        std::thread::spawn(move || bg_flood(&other_caller, &honest, "other", 0..FLOOD / 4))
    };
    for (round, (what, lie)) in lies.iter().enumerate() {
        let round = round as u64;
        let calls: Vec<AsyncResult<(String, u64)>> = (0..2)
            .map(|k| {
                caller
                    .call("echo")
                    .args(("echo", round * 2 + k))
                    .on(&liar)
                    .timeout(WAIT)
                    .bg()
                    .expect("bg")
            })
            .collect();
        let ids = read_requests(&mut stream, 2);
        let (flags, count, payload) = lie(ids[0], ids[1]);
        stream
            .write_all(&reply_frame(
                &liar,
                caller.process_name(),
                flags,
                count,
                &payload,
            ))
            .expect("the lie");
        for call in calls {
            match call.get_timeout(WAIT + WAIT) {
                Err(Error::Protocol { peer, .. }) => assert_eq!(peer, liar, "{what}"),
                other => panic!("{what}: a call answered by a lying batch gave {other:?}"),
            }
        }
        still_served(&caller, &honest);
    }

    // A well-made batch whose middle reply is for a call made to the honest node: that
    // call is not the liar's to answer, and gets its own reply. The two calls to the
    // liar get theirs.
    let first = caller
        .call("echo")
        .args(("echo", 100u64))
        .on(&liar)
        .timeout(WAIT)
        .bg::<(String, u64)>()
        .expect("bg");
    let first_id = read_requests(&mut stream, 1)[0];
    let honest_call = caller
        .call("echo")
        .args(("stolen", 1u64))
        .on(&honest)
        .timeout(WAIT)
        .bg::<(String, u64)>()
        .expect("bg");
    let second = caller
        .call("echo")
        .args(("echo", 101u64))
        .on(&liar)
        .timeout(WAIT)
        .bg::<(String, u64)>()
        .expect("bg");
    let second_id = read_requests(&mut stream, 1)[0];
    let mut stolen_ids: Vec<u64> = (first_id + 1..second_id).collect();
    stolen_ids.push(first_id + 1);
    let mut items = vec![(first_id, 0, ok("liar", 100))];
    items.extend(stolen_ids.iter().map(|id| (*id, 0, ok("liar", 999))));
    items.push((second_id, 0, ok("liar", 101)));
    let payload = replies_payload(&items);
    stream
        .write_all(&reply_frame(
            &liar,
            caller.process_name(),
            FLAG_REPLY_BATCH,
            items.len() as u64,
            &payload,
        ))
        .expect("the batch");
    assert_eq!(
        first.get_timeout(WAIT).expect("first"),
        ("liar".into(), 100)
    );
    assert_eq!(
        second.get_timeout(WAIT).expect("second"),
        ("liar".into(), 101)
    );
    assert_eq!(
        honest_call.get_timeout(WAIT).expect("the honest call"),
        ("stolen".into(), 1),
        "answered by the node it went to"
    );

    // A lone reply for a call made to another node is ignored too. `quiet` answers its
    // call only once the liar's false reply was read: the liar answers a call of its
    // own right behind the false one, on the same connection.
    let quiet = common::unique("quiet");
    let mut quiet_stream = common::wire::raw_unix_node(&path, &quiet, &["echo"]);
    caller
        .wait_process_timeout(&quiet, WAIT)
        .expect("quiet known");
    let to_quiet = caller
        .call("echo")
        .args(("echo", 7u64))
        .on(&quiet)
        .timeout(WAIT)
        .bg::<(String, u64)>()
        .expect("bg");
    let quiet_id = read_requests(&mut quiet_stream, 1)[0];
    let behind = caller
        .call("echo")
        .args(("echo", 8u64))
        .on(&liar)
        .timeout(WAIT)
        .bg::<(String, u64)>()
        .expect("bg");
    let behind_id = read_requests(&mut stream, 1)[0];
    let mut lone = reply_frame(&liar, caller.process_name(), 0, quiet_id, &ok("liar", 666));
    lone.extend(reply_frame(
        &liar,
        caller.process_name(),
        0,
        behind_id,
        &ok("liar", 8),
    ));
    stream.write_all(&lone).expect("the false reply");
    assert_eq!(
        behind.get_timeout(WAIT).expect("behind"),
        ("liar".into(), 8)
    );
    quiet_stream
        .write_all(&reply_frame(
            &quiet,
            caller.process_name(),
            0,
            quiet_id,
            &ok("quiet", 7),
        ))
        .expect("the true reply");
    assert_eq!(
        to_quiet.get_timeout(WAIT).expect("the call to quiet"),
        ("quiet".into(), 7),
        "answered by the node it went to, not the liar"
    );

    flood.join().expect("the other caller's flood");
    // Everyone is still connected and served.
    still_served(&caller, &honest);
    let members = caller.members();
    for name in [&liar, &honest] {
        assert!(members.iter().any(|m| &m.name == name), "{name} left");
    }
}

// ---- a callee paused, a callee killed, a caller killed --------------------------------

#[test]
fn a_callee_paused_mid_flood_answers_every_call_once() {
    const HELD: u64 = 500;
    let (address, _path, _controller) = controller();
    let caller = node(&address);
    let (callee, callee_process) = spawn_worker(&address, &caller, &[]);
    still_served(&caller, &callee);

    let sent = Arc::new(AtomicU64::new(0));
    let (at_half, half_sent) = std::sync::mpsc::channel();
    let flood = {
        let (caller, callee, sent) = (caller.clone(), callee.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut in_flight = VecDeque::new();
            for i in 0..FLOOD {
                let call = caller
                    .call("echo")
                    .args(("paused", i))
                    .on(&callee)
                    .bg::<(String, u64)>()
                    .expect("bg");
                in_flight.push_back((i, call));
                sent.store(i + 1, Ordering::Relaxed);
                if i == FLOOD / 2 {
                    at_half.send(()).expect("the test waits");
                }
                if in_flight.len() >= IN_FLIGHT {
                    let (i, call) = in_flight.pop_front().expect("one");
                    check_echo(&callee, "paused", i, call.get_timeout(WAIT + WAIT));
                }
            }
            for (i, call) in in_flight {
                check_echo(&callee, "paused", i, call.get_timeout(WAIT + WAIT));
            }
        })
    };
    half_sent.recv_timeout(WAIT).expect("half the flood sent");
    common::pause(callee_process.pid().expect("running"));
    // While it is stopped, calls from this thread queue at the controller (with the
    // flood's, within the callee's 1,024 sync callbacks at once).
    let held: Vec<AsyncResult<(String, u64)>> = (0..HELD)
        .map(|i| {
            caller
                .call("echo")
                .args(("held", i))
                .on(&callee)
                .bg()
                .expect("bg")
        })
        .collect();
    assert!(sent.load(Ordering::Relaxed) > FLOOD / 2);
    common::resume(callee_process.pid().expect("running"));
    for (i, call) in held.into_iter().enumerate() {
        check_echo(&callee, "held", i as u64, call.get_timeout(WAIT + WAIT));
    }
    flood.join().expect("the flood");
    assert_each_once_on(&caller, &callee, "paused", FLOOD);
    assert_each_once_on(&caller, &callee, "held", HELD);
    still_served(&caller, &callee);
}

#[test]
fn a_callee_killed_mid_flood_fails_every_call_in_flight_by_name() {
    let (address, _path, _controller) = controller();
    let caller = node(&address);
    let (doomed, mut doomed_process) = spawn_worker(&address, &caller, &[]);
    let (healthy, _healthy_process) = spawn_worker(&address, &caller, &[]);
    let other_caller = node(&address);
    other_caller
        .wait_process_timeout(&healthy, WAIT)
        .expect("healthy known");

    let healthy_flood = {
        let (other_caller, healthy) = (other_caller.clone(), healthy.clone());
        std::thread::spawn(move || bg_flood(&other_caller, &healthy, "healthy", 0..FLOOD / 2))
    };
    let (at_start, started) = std::sync::mpsc::channel();
    let doomed_flood = {
        let (caller, doomed) = (caller.clone(), doomed.clone());
        std::thread::spawn(move || {
            let (mut answered, mut failed) = (0u64, 0u64);
            let mut in_flight = VecDeque::new();
            let mut finish = |(i, call): (u64, AsyncResult<(String, u64)>)| {
                // Bounded: a call that hangs fails the test as a timeout.
                match call.get_timeout(WAIT + WAIT) {
                    Err(Error::PeerDisconnected { process, .. }) => {
                        assert_eq!(process, doomed);
                        failed += 1;
                    }
                    Err(Error::UnknownProcess { process }) => {
                        assert_eq!(process, doomed);
                        failed += 1;
                    }
                    other => {
                        check_echo(&doomed, "doomed", i, other);
                        answered += 1;
                    }
                }
            };
            for i in 0..FLOOD {
                if i == 2_000 {
                    at_start.send(()).expect("the test waits");
                }
                match caller
                    .call("echo")
                    .args(("doomed", i))
                    .on(&doomed)
                    .bg::<(String, u64)>()
                {
                    Ok(call) => in_flight.push_back((i, call)),
                    // Gone from the view: no call is sent any more.
                    Err(Error::NoProvider { .. } | Error::UnknownProcess { .. }) => break,
                    Err(e) => panic!("call {i}: {e}"),
                }
                if in_flight.len() >= IN_FLIGHT {
                    finish(in_flight.pop_front().expect("one"));
                }
            }
            in_flight.into_iter().for_each(&mut finish);
            (answered, failed)
        })
    };
    started.recv_timeout(WAIT).expect("the flood runs");
    doomed_process.kill();
    let (answered, failed) = doomed_flood.join().expect("the doomed flood");
    assert!(answered >= 1_000, "answered before the kill: {answered}");
    assert!(failed > 0, "calls in flight at the kill failed by name");
    healthy_flood.join().expect("the healthy flood");
    bg_flood(&caller, &healthy, "after", 0..1000);
    still_served(&other_caller, &healthy);
}

#[test]
fn a_caller_killed_mid_flood_leaves_the_callee_and_controller_serving() {
    let (address, _path, _controller) = controller();
    let caller = node(&address);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    let flooder_name = common::unique("flooder");
    let mut flooder = common::spawn_child_with(
        ENTRY,
        "bg_flooder",
        &flooder_name,
        &address,
        &[(common::ENV_TARGET, &callee)],
    );
    // Once a good part of the flood ran, the flooder dies mid-flood.
    let (ran, _) = caller
        .call("each_once")
        .args(("bg-killed", 5_000u64, WAIT.as_millis() as u64))
        .on(&callee)
        .timeout(WAIT + WAIT)
        .fg::<(u64, Option<u64>)>()
        .expect("each_once");
    assert!(ran >= 5_000, "the flood ran: {ran}");
    flooder.kill();
    // The callee's replies to the dead caller are dropped; it serves the others.
    bg_flood(&caller, &callee, "after-kill", 0..FLOOD / 4);
    assert_each_once_on(&caller, &callee, "after-kill", FLOOD / 4);
    still_served(&caller, &callee);
    caller.controller_stats().expect("the controller answers");
}

// ---- frame limits ----------------------------------------------------------------------

#[test]
fn a_caller_with_a_smaller_frame_limit_gets_batches_split_to_fit() {
    let (address, _path, _controller) = controller();
    // The caller takes frames of 8 KiB; the callee joins replies up to 16 KiB.
    let caller = common::builder_for(&address)
        .process_name(common::unique("small-caller"))
        .max_frame_size(8 * 1024)
        .start()
        .expect("caller starts");
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    let mut in_flight = VecDeque::new();
    let finish = |(i, len, call): (u64, usize, AsyncResult<serde_bytes::ByteBuf>)| {
        let got = call.get_timeout(WAIT + WAIT).expect("a result");
        assert_eq!(got.len(), len, "call {i}");
        assert!(got.iter().all(|b| *b == i as u8), "call {i}");
    };
    for i in 0..5_000u64 {
        // Results of 1 to 4 KiB: many join, and a batch passes 8 KiB.
        let len = 1024 + (i as usize * 509) % 3000;
        let call = caller
            .call("sized")
            .args((i, len))
            .on(&callee)
            .bg::<serde_bytes::ByteBuf>()
            .expect("bg");
        in_flight.push_back((i, len, call));
        if in_flight.len() >= IN_FLIGHT {
            finish(in_flight.pop_front().expect("one"));
        }
    }
    in_flight.into_iter().for_each(finish);
    // The caller kept its connection all along (a frame over its limit would have
    // cost it the connection, and the calls in flight).
    still_served(&caller, &callee);
}

// ---- versions --------------------------------------------------------------------------

#[test]
fn a_version_4_node_is_refused_by_name() {
    let (_address, path, _controller) = controller();
    // The controller listens once its socket exists: a node proves it.
    let _caller = node(&Address::Unix(path.clone()));
    let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut opening = daffi_wire::preamble(4).to_vec();
    opening.extend(common::wire::control_frame(
        Kind::Hello,
        &common::wire::Hello {
            process_name: "old",
            auth_token: None,
            max_frame_size: 1 << 20,
        },
    ));
    stream.write_all(&opening).expect("write");
    let refused = common::wire::read_frame_from(&mut stream);
    assert_eq!(refused.kind(), Kind::Refused);
    let refused: common::wire::Refused = common::wire::decode(&refused.payload());
    assert_eq!(refused.code, common::wire::RefuseCode::Version);
    assert!(
        refused.message.contains("version 4") && refused.message.contains("version 5"),
        "{}",
        refused.message
    );
}

// ---- calls that want replies in batch frames -------------------------------------------

/// The calls of a `Request` frame: (call id, arguments) each, a batch split as
/// docs/PROTOCOL.md ("Batches of calls that want replies") says.
fn calls_of(frame: &Frame) -> Vec<(u64, Vec<u8>)> {
    let payload = frame.payload();
    if frame.flags() & FLAG_REQUEST_BATCH == 0 {
        return vec![(frame.call_id(), payload.to_vec())];
    }
    assert_eq!(frame.flags(), FLAG_REQUEST_BATCH, "BATCH alone");
    let mut calls = Vec::new();
    let mut rest = &payload[..];
    while !rest.is_empty() {
        let id = u64::from_be_bytes(rest[..8].try_into().expect("an id"));
        let len = u32::from_be_bytes(rest[8..12].try_into().expect("a length")) as usize;
        calls.push((id, rest[12..12 + len].to_vec()));
        rest = &rest[12 + len..];
    }
    assert_eq!(calls.len() as u64, frame.call_id(), "call_id counts them");
    assert!(calls.len() >= 2, "a batch holds two calls or more");
    calls
}

/// A batch of calls that want replies, made by hand: (call id, arguments) each.
fn call_batch(src: &str, dst: &str, flags: u8, count: u64, calls: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, args) in calls {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&(args.len() as u32).to_be_bytes());
        payload.extend_from_slice(args);
    }
    common::wire::batch_request(src, dst, "echo", flags, count, &payload)
}

#[test]
fn a_raw_callee_gets_bg_calls_in_batches_and_each_gets_its_own_reply() {
    let (address, path, _controller) = controller();
    let caller = node(&address);
    let raw = common::unique("raw-callee");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &["echo"]);
    caller.wait_process_timeout(&raw, WAIT).expect("raw known");

    const CALLS: u64 = 5_000;
    let callee = {
        let (raw, caller_name) = (raw.clone(), caller.process_name().to_string());
        std::thread::spawn(move || {
            let (mut answered, mut batches) = (0u64, 0u64);
            while answered < CALLS {
                let frame = common::wire::read_frame_from(&mut stream);
                if frame.kind() != Kind::Request {
                    continue;
                }
                assert_eq!(
                    (frame.src(), frame.dst()),
                    (caller_name.as_str(), raw.as_str())
                );
                batches += u64::from(frame.flags() & FLAG_REQUEST_BATCH != 0);
                let mut replies = Vec::new();
                for (id, args) in calls_of(&frame) {
                    let (tag, i): (String, u64) = rmp_serde::from_slice(&args).expect("(tag, i)");
                    replies.extend(reply_frame(
                        &raw,
                        frame.src(),
                        0,
                        id,
                        &common::wire::encode(&(tag, i * 2)),
                    ));
                    answered += 1;
                }
                stream.write_all(&replies).expect("the replies");
            }
            batches
        })
    };
    let mut in_flight = VecDeque::new();
    for i in 0..CALLS {
        let call = caller
            .call("echo")
            .args(("raw", i))
            .on(&raw)
            .timeout(WAIT)
            .bg::<(String, u64)>()
            .expect("bg");
        in_flight.push_back((i, call));
        if in_flight.len() >= IN_FLIGHT {
            let (i, call) = in_flight.pop_front().expect("one");
            assert_eq!(call.get().expect("a reply"), ("raw".to_string(), i * 2));
        }
    }
    for (i, call) in in_flight {
        assert_eq!(call.get().expect("a reply"), ("raw".to_string(), i * 2));
    }
    let batches = callee.join().expect("the raw callee");
    assert!(
        batches > 0,
        "calls made while others waited left in batches"
    );
}

#[test]
fn the_controller_answers_every_call_of_a_batch_it_cannot_deliver() {
    let (address, path, _controller) = controller();
    let caller = node(&address);
    let (callee, mut callee_process) = spawn_worker(&address, &caller, &[]);
    let raw = common::unique("raw");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &[]);
    caller.wait_process_timeout(&raw, WAIT).expect("raw known");
    let args = |i: u64| common::wire::encode(&("raw", i));

    // To a node that never was, and (once the controller said it left) to one that was.
    callee_process.kill();
    #[derive(serde::Deserialize)]
    struct Event {
        event: String,
        name: String,
    }
    loop {
        let frame = common::wire::read_frame_from(&mut stream);
        if frame.kind() != Kind::Membership {
            continue;
        }
        let payload = frame.payload();
        let events: Vec<Event> = rmp_serde::from_slice(&payload)
            .or_else(|_| rmp_serde::from_slice(&payload).map(|e: Event| vec![e]))
            .expect("membership events");
        if events.iter().any(|e| e.event == "left" && e.name == callee) {
            break;
        }
    }
    for (dst, first) in [("nobody-ever", 100u64), (callee.as_str(), 200)] {
        let calls: Vec<(u64, Vec<u8>)> = (first..first + 5).map(|id| (id, args(id))).collect();
        stream
            .write_all(&call_batch(&raw, dst, FLAG_REQUEST_BATCH, 5, &calls))
            .expect("the batch");
        let mut told: Vec<u64> = Vec::new();
        while told.len() < 5 {
            let frame = common::wire::read_frame_from(&mut stream);
            if frame.kind() != Kind::Undeliverable {
                continue;
            }
            assert_eq!(frame.name(), dst, "names the missing node");
            told.push(frame.call_id());
        }
        told.sort_unstable();
        assert_eq!(
            told,
            (first..first + 5).collect::<Vec<_>>(),
            "every call, once"
        );
    }
}

#[test]
fn lying_batches_of_calls_cost_only_their_sender() {
    let (address, path, _controller) = controller();
    let caller = node(&address);
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[]);
    let raw = common::unique("raw");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &[]);
    caller.wait_process_timeout(&raw, WAIT).expect("raw known");

    let bad = |id: u64| (id, common::wire::encode(&("bad", id)));
    let two = [bad(1), bad(2)];
    let b = FLAG_REQUEST_BATCH;
    let mut lies = Vec::new();
    for (flags, count) in [
        (b, 0),
        (b, u64::MAX),
        (b, 3),
        (b, 1),
        (b | 0b10, 2),
        (b | 0b100, 2),
    ] {
        lies.extend(call_batch(&raw, &callee, flags, count, &two));
    }
    let mut past = call_batch(&raw, &callee, b, 2, &two);
    let at = past.len() - two[1].1.len() - 4;
    past[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    lies.extend(past);
    lies.extend(call_batch(&raw, &callee, b, 1, &[bad(3)]));
    // A well-made batch behind the lies: its calls are answered, each by its id.
    let good: Vec<(u64, Vec<u8>)> = (10..14u64)
        .map(|id| (id, common::wire::encode(&("good", id))))
        .collect();
    lies.extend(call_batch(&raw, &callee, b, 4, &good));
    stream.write_all(&lies).expect("the batches");

    let mut answered = BTreeMap::new();
    while answered.len() < good.len() {
        let frame = common::wire::read_frame_from(&mut stream);
        if frame.kind() != Kind::Reply {
            continue;
        }
        for (id, flags, payload) in common::wire::replies_of(&frame) {
            assert!((10..14).contains(&id), "a lie's call {id} was answered");
            assert_eq!(flags, 0, "call {id}");
            answered.insert(
                id,
                rmp_serde::from_slice::<(String, u64)>(&payload).unwrap(),
            );
        }
    }
    for id in 10..14u64 {
        assert_eq!(answered[&id], ("good".to_string(), id));
    }
    // The lies ran nothing, and everyone is still connected and served.
    assert_each_once_on(&caller, &callee, "bad", 0);
    still_served(&caller, &callee);
    bg_flood(&caller, &callee, "after-lies", 0..1000);
    let members = caller.members();
    for name in [&raw, &callee] {
        assert!(members.iter().any(|m| &m.name == name), "{name} left");
    }
}

#[test]
fn a_callee_with_a_smaller_frame_limit_gets_batches_of_calls_split_to_fit() {
    let (address, _path, _controller) = controller();
    let caller = node(&address);
    let frame = (8 * 1024).to_string();
    let (callee, _callee_process) = spawn_worker(&address, &caller, &[(ENV_FRAME, &frame)]);
    // Arguments of 1 to 4 KiB: calls join up to 16 KiB, past the callee's 8 KiB.
    let mut in_flight = VecDeque::new();
    let finish = |(i, call): (u64, AsyncResult<(String, u64)>)| {
        let (tag, got) = call.get_timeout(WAIT + WAIT).expect("a reply");
        assert_eq!(got, i * 7 + 1, "call {i}");
        assert_eq!(tag.len(), 1000 + (i as usize * 509) % 3000, "call {i}");
    };
    for i in 0..5_000u64 {
        let tag = "t".repeat(1000 + (i as usize * 509) % 3000);
        let call = caller
            .call("echo")
            .args((tag, i * 7 + 1))
            .on(&callee)
            .bg::<(String, u64)>()
            .expect("bg");
        in_flight.push_back((i, call));
        if in_flight.len() >= IN_FLIGHT {
            finish(in_flight.pop_front().expect("one"));
        }
    }
    in_flight.into_iter().for_each(finish);
    // The callee kept its connection all along (a frame over its limit would have cost
    // it the connection, and every call in flight to it).
    still_served(&caller, &callee);
}

#[test]
fn batches_to_a_node_that_reads_nothing_are_refused_whole_and_every_call_is_told() {
    let path = std::env::temp_dir()
        .join("daffi-tests")
        .join(format!("{}.sock", common::unique("replies-slow")));
    let address = Address::Unix(path.clone());
    let _controller = common::spawn_child(ENTRY, "small_queue_controller", "controller", &address);
    let watcher = node(&address);
    let sink = common::unique("sink");
    // Joins, then reads nothing more.
    let _sink_stream = common::wire::raw_unix_node(&path, &sink, &["echo"]);
    let raw = common::unique("raw");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &[]);
    watcher
        .wait_process_timeout(&sink, WAIT)
        .expect("sink known");
    watcher.wait_process_timeout(&raw, WAIT).expect("raw known");

    // 200 batches of 300 calls (2.5 MiB): far more than the sink's socket and its
    // 64 KiB at the controller hold. Then a lone call to a node that never was: its
    // answer comes after every answer to the batches.
    const BATCHES: u64 = 200;
    const CALLS: u64 = 300;
    let mut bytes = Vec::new();
    for batch in 0..BATCHES {
        let calls: Vec<(u64, Vec<u8>)> = (0..CALLS)
            .map(|k| {
                let id = batch * 1000 + k + 1;
                (id, common::wire::encode(&("slow", id)))
            })
            .collect();
        bytes.extend(call_batch(&raw, &sink, FLAG_REQUEST_BATCH, CALLS, &calls));
    }
    const MARK: u64 = u64::MAX;
    bytes.extend(common::wire::request(
        &raw,
        "nobody-ever",
        MARK,
        "echo",
        &("m", 0u64),
    ));
    // Written while the answers are read: the controller waits for room in the raw
    // node's queue to tell it, and reads it no further meanwhile.
    let mut writing = stream.try_clone().expect("a second handle");
    let writer = std::thread::spawn(move || writing.write_all(&bytes).expect("the batches"));

    #[derive(serde::Deserialize)]
    struct Undeliverable {
        code: String,
    }
    let mut told: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    loop {
        let frame = common::wire::read_frame_from(&mut stream);
        if frame.kind() != Kind::Undeliverable {
            continue;
        }
        let code = rmp_serde::from_slice::<Undeliverable>(&frame.payload())
            .expect("an Undeliverable")
            .code;
        if frame.call_id() == MARK {
            assert_eq!(code, "unknown_process");
            break;
        }
        assert_eq!(code, "slow_consumer", "call {}", frame.call_id());
        assert_eq!(frame.name(), sink);
        let id = frame.call_id();
        told.entry((id - 1) / 1000).or_default().push(id);
    }
    writer.join().expect("the writer");
    assert!(
        !told.is_empty(),
        "the sink's queue filled: some batches were refused"
    );
    for (batch, mut ids) in told {
        ids.sort_unstable();
        let all: Vec<u64> = (0..CALLS).map(|k| batch * 1000 + k + 1).collect();
        assert_eq!(ids, all, "batch {batch}: every call told once, or none");
    }
    // The controller and the others are fine.
    assert!(watcher.members().iter().any(|m| m.name == raw));
}
