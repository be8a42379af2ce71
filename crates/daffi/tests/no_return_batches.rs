//! NO_RETURN calls to one callback travel together in batch requests (docs/PROTOCOL.md,
//! "Batches of NO_RETURN calls"): floods from the sync API and from the async API in the
//! user's own runtime all arrive; calls to different callbacks and nodes keep their
//! order and never share a batch; and a raw peer that sends malformed batches costs only
//! its own calls. Real processes and sockets.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use common::{Worker, WAIT};
use daffi::{callback, Address, Global};
use daffi_wire::frame::{FLAG_NO_REPLY, FLAG_REQUEST_BATCH};
use daffi_wire::{Frame, Kind};

const ENTRY: &str = "child_process";

/// Calls in each flood.
const FLOOD: u64 = 20_000;

// ---- callbacks served by every worker of this binary -------------------------------

/// What `tally` and `tally_async` ran here: (tag, i).
static TALLIED: common::Log<(String, u64)> = common::Log::new();

/// Records one NO_RETURN call (a sync callback).
#[callback]
fn tally(tag: String, i: u64) {
    TALLIED.push((tag, i));
}

/// Records one NO_RETURN call (an async callback).
#[callback]
async fn tally_async(tag: String, i: u64) {
    TALLIED.push((tag, i));
}

/// The `i` of the calls tagged `tag` that ran here, once `want` did (or after
/// `timeout_ms`), sorted.
#[callback]
fn tallied(tag: String, want: usize, timeout_ms: u64) -> Vec<u64> {
    let mut seen = TALLIED.tagged(&tag, want, timeout_ms);
    seen.sort_unstable();
    seen
}

/// `a + b`: the callee still serves calls that want a reply.
#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[
        ("controller", common::run_controller_role),
        ("worker", worker),
        ("async_caller", async_caller),
    ]);
}

/// A node serving the `#[callback]` functions of this file.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    g.join().expect("join");
}

/// A user's program with its own runtime: a flood of NO_RETURN calls through the async
/// API to the node named in `DAFFI_TEST_TARGET`, half to a sync callback and half to an
/// async one, then it stops (letting what it sent go out).
#[tokio::main]
async fn async_caller() {
    let (g, target) = common::async_child_and_target().await;
    for i in 0..FLOOD {
        let callback = if i % 2 == 0 { "tally" } else { "tally_async" };
        g.call(callback)
            .args(("async", i))
            .on(&target)
            .no_return_async()
            .await
            .expect("no_return_async");
    }
    g.stop();
    g.join_async().await;
}

// ---- helpers -------------------------------------------------------------------------

/// A standalone controller in a child process on a fresh Unix socket.
fn controller() -> (Address, std::path::PathBuf, Worker) {
    let path = std::env::temp_dir()
        .join("daffi-tests")
        .join(format!("{}.sock", common::unique("batches")));
    let address = Address::Unix(path.clone());
    let process = common::spawn_child(ENTRY, "controller", "controller", &address);
    (address, path, process)
}

fn node(address: &Address, prefix: &str) -> Global {
    common::builder_for(address)
        .process_name(common::unique(prefix))
        .start()
        .expect("node starts")
}

fn spawn_worker(address: &Address, g: &Global, prefix: &str) -> (String, Worker) {
    common::spawn_known_worker(ENTRY, address, g, prefix, &[])
}

/// What a callee in another process ran of the calls tagged `tag`, once `want` did.
fn tallied_on(g: &Global, callee: &str, tag: &str, want: u64) -> Vec<u64> {
    g.call("tallied")
        .args((tag, want as usize, WAIT.as_millis() as u64))
        .on(callee)
        .timeout(WAIT + WAIT)
        .fg()
        .expect("tallied")
}

/// The calls (their arguments) of a request frame, split as docs/PROTOCOL.md says: a
/// batch's `call_id` calls, each a `u32` length and its bytes; a lone request's payload.
fn calls_of(frame: &Frame) -> Vec<Vec<u8>> {
    let payload = frame.payload();
    if frame.flags() & FLAG_REQUEST_BATCH == 0 {
        return vec![payload.to_vec()];
    }
    assert_eq!(frame.flags(), FLAG_NO_REPLY | FLAG_REQUEST_BATCH);
    let mut calls = Vec::new();
    let mut rest = &payload[..];
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[..4].try_into().expect("a length")) as usize;
        calls.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    assert_eq!(
        calls.len() as u64,
        frame.call_id(),
        "call_id counts the calls"
    );
    assert!(calls.len() >= 2, "a batch holds two calls or more");
    calls
}

fn encoded(tag: &str, i: u64) -> Vec<u8> {
    common::wire::encode(&(tag, i))
}

// ---- floods from the sync API and the async API in the user's runtime ----------------

#[test]
fn floods_of_no_return_calls_from_sync_and_async_code_all_arrive() {
    let (address, _path, _controller) = controller();
    let caller = node(&address, "caller");
    let (callee, _callee_process) = spawn_worker(&address, &caller, "callee");

    // The async API in the user's own runtime (#[tokio::main]), in another process.
    let async_name = common::unique("async-caller");
    let mut async_process = common::spawn_child_with(
        ENTRY,
        "async_caller",
        &async_name,
        &address,
        &[(common::ENV_TARGET, &callee)],
    );
    // The sync API, from this thread, at the same time: to the sync callback and to the
    // async one, in turns of unequal length.
    for i in 0..FLOOD {
        let callback = if i % 7 < 4 { "tally" } else { "tally_async" };
        caller
            .call(callback)
            .args(("sync", i))
            .on(&callee)
            .no_return()
            .expect("no_return");
    }
    let all: Vec<u64> = (0..FLOOD).collect();
    assert_eq!(
        tallied_on(&caller, &callee, "sync", FLOOD),
        all,
        "every call of the sync flood ran once"
    );
    assert_eq!(
        tallied_on(&caller, &callee, "async", FLOOD),
        all,
        "every call of the async flood ran once"
    );
    async_process.wait_success();
    let sum: i64 = caller
        .call("sync_add")
        .args((2, 3))
        .on(&callee)
        .timeout(WAIT)
        .fg()
        .expect("sync_add");
    assert_eq!(sum, 5);
}

// ---- calls to two callbacks on two nodes, interleaved ------------------------------

#[test]
fn interleaved_calls_keep_their_order_and_batches_never_mix_callbacks_or_nodes() {
    let (address, path, _controller) = controller();
    let caller = node(&address, "caller");
    let names = [common::unique("raw-a"), common::unique("raw-b")];
    let streams: Vec<UnixStream> = names
        .iter()
        .map(|name| common::wire::raw_unix_node(&path, name, &["first", "second"]))
        .collect();
    for name in &names {
        caller
            .wait_process_timeout(name, WAIT)
            .expect("raw node known");
    }

    // Runs of calls of lengths 1 to 40 to (node, callback) pairs in turn: a run may
    // leave in batches; the next run's first call never joins them.
    let targets = [(0, "first"), (0, "second"), (1, "first")];
    let mut plan: Vec<(usize, &str, u64)> = Vec::new();
    let mut sent: BTreeMap<(usize, &str), u64> = BTreeMap::new();
    let mut run = 0u64;
    while (plan.len() as u64) < FLOOD {
        let (node, callback) = targets[(run % 3) as usize];
        for _ in 0..1 + (run * 7919) % 40 {
            let next = sent.entry((node, callback)).or_default();
            plan.push((node, callback, *next));
            *next += 1;
        }
        run += 1;
    }

    // Each raw node reads its requests and splits their batches.
    let readers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(node, mut stream)| {
            let name = names[node].clone();
            let want = plan.iter().filter(|(n, _, _)| *n == node).count() as u64;
            std::thread::spawn(move || {
                let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
                let (mut calls, mut batches) = (0u64, 0u64);
                let deadline = Instant::now() + WAIT + WAIT;
                while calls < want && Instant::now() < deadline {
                    let frame = common::wire::read_frame_from(&mut stream);
                    if frame.kind() != Kind::Request {
                        continue;
                    }
                    assert_eq!(frame.dst(), name, "a request for another node");
                    batches += u64::from(frame.flags() & FLAG_REQUEST_BATCH != 0);
                    for args in calls_of(&frame) {
                        let (tag, i): (String, u64) =
                            rmp_serde::from_slice(&args).expect("arguments (tag, i)");
                        assert_eq!(
                            tag,
                            format!("{}@{node}", frame.name()),
                            "a call in a frame of another callback or node"
                        );
                        got.entry(frame.name().to_string()).or_default().push(i);
                        calls += 1;
                    }
                }
                (got, batches)
            })
        })
        .collect();
    for (node, callback, i) in &plan {
        caller
            .call(callback)
            .args((format!("{callback}@{node}"), *i))
            .on(&names[*node])
            .no_return()
            .expect("no_return");
    }
    let mut batches = 0;
    for (node, reader) in readers.into_iter().enumerate() {
        let (got, node_batches) = reader.join().expect("reader");
        batches += node_batches;
        for ((n, callback), count) in &sent {
            if *n != node {
                continue;
            }
            let expected: Vec<u64> = (0..*count).collect();
            assert_eq!(
                got.get(*callback),
                Some(&expected),
                "{callback} on node {node}: every call, in order"
            );
        }
    }
    assert!(batches > 0, "runs of calls from one thread left in batches");
}

// ---- a raw caller sending malformed batches -------------------------------------------

#[test]
fn malformed_batches_from_a_raw_caller_cost_only_its_own_calls() {
    let (address, path, _controller) = controller();
    let caller = node(&address, "caller");
    let (callee, _callee_process) = spawn_worker(&address, &caller, "callee");
    let raw = common::unique("raw");
    let mut stream = common::wire::raw_unix_node(&path, &raw, &[]);
    caller.wait_process_timeout(&raw, WAIT).expect("raw known");

    let bad = |i: u64| encoded("bad", i);
    let good = |i: u64| encoded("raw", i);
    let flags = FLAG_NO_REPLY | FLAG_REQUEST_BATCH;
    let request = |flags: u8, count: u64, payload: &[u8]| {
        common::wire::batch_request(&raw, &callee, "tally", flags, count, payload)
    };
    let two_bad = common::wire::batch_payload(&[bad(0), bad(1)]);
    let mut past_the_end = common::wire::batch_payload(&[bad(2), bad(3)]);
    let last = past_the_end.len() - bad(3).len() - 4;
    past_the_end[last..last + 4].copy_from_slice(&1000u32.to_be_bytes());
    let mut bytes = Vec::new();
    for frame in [
        request(flags, 2, &past_the_end),
        request(flags, 0, &[]),
        request(flags, 1, &common::wire::batch_payload(&[bad(4)])),
        request(flags, 3, &two_bad),
        request(flags, 0, &two_bad),
        request(FLAG_REQUEST_BATCH, 2, &two_bad),
        request(flags | 0b10, 2, &two_bad),
        request(flags, 2, &[0xff, 0xff, 0xff, 0xff, 0xc1, 0x00, 0x07]),
        request(
            flags,
            2,
            &common::wire::batch_payload(&[vec![0xc1], vec![0xc1, 0xc1]]),
        ),
        // A well-made batch, and a lone call, behind them.
        request(
            flags,
            3,
            &common::wire::batch_payload(&[good(0), good(1), good(2)]),
        ),
        common::wire::request(&raw, &callee, 0, "tally", &("raw", 3u64)),
    ] {
        bytes.extend(frame);
    }
    stream.write_all(&bytes).expect("the batches");

    // The well-made calls ran, none of the malformed batches' did (their arguments,
    // well-made themselves, would be tagged "bad")...
    assert_eq!(tallied_on(&caller, &callee, "raw", 4), vec![0, 1, 2, 3]);
    assert_eq!(tallied_on(&caller, &callee, "bad", 0), Vec::<u64>::new());
    // ...and everyone stays connected and served: the controller forwards batches
    // without reading them, and the callee drops what it cannot read.
    let sum: i64 = caller
        .call("sync_add")
        .args((2, 3))
        .on(&callee)
        .timeout(WAIT)
        .fg()
        .expect("sync_add");
    assert_eq!(sum, 5);
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
        .expect("the raw caller still sends");
    assert_eq!(tallied_on(&caller, &callee, "raw", 5), vec![0, 1, 2, 3, 4]);
}
