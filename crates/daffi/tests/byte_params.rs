//! A callback's lone `Vec<u8>` or `serde_bytes::ByteBuf` parameter takes over the
//! buffer its frame was read into instead of copying it (issue 17). Between real
//! processes: echoes through sync and async callbacks, `#[callback]` functions and
//! registered closures, with the argument given by position, alone and by name, at sizes
//! around every threshold on the way (the 16 KiB by-reference threshold, the reader's
//! 32 KiB own buffers and 64 KiB shared buffer, its 1 MiB large frames) and at 64 MiB,
//! one after another and several in flight at once: every echo must come back exactly
//! as sent, so a buffer taken over while the reader still used it would show. And a peer
//! whose `bin` announces more or fewer bytes than it sends.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::{Cluster, Transport, WAIT};
use daffi::{callback, Blob, Error};
use serde_bytes::ByteBuf;

/// The ignored test that runs worker processes (see `common`).
const ENTRY: &str = "worker_process";

/// Sizes on both sides of each threshold the argument's bytes meet.
const SIZES: [usize; 15] = [
    0,
    100,
    16 * 1024 - 1,
    16 * 1024,
    16 * 1024 + 1,
    32 * 1024 - 1,
    32 * 1024,
    32 * 1024 + 1,
    64 * 1024 - 1,
    64 * 1024,
    64 * 1024 + 1,
    (1 << 20) - 64,
    1 << 20,
    (1 << 20) + 1,
    3 << 20,
];

/// Bytes different for each `len` and `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

// ---- callbacks, served by the worker ---------------------------------------------------

#[callback]
fn echo_vec(data: Vec<u8>) -> Vec<u8> {
    data
}

#[callback]
fn echo_byte_buf(data: ByteBuf) -> ByteBuf {
    data
}

#[callback]
async fn echo_vec_async(data: Vec<u8>) -> Vec<u8> {
    data
}

#[callback]
async fn echo_byte_buf_async(data: ByteBuf) -> ByteBuf {
    data
}

/// The `#[callback]` echoes: their parameters have names, so they take arguments by
/// name too.
const NAMED: [&str; 4] = [
    "echo_vec",
    "echo_byte_buf",
    "echo_vec_async",
    "echo_byte_buf_async",
];

/// The closures the worker registers: by position or alone only.
const CLOSURES: [&str; 3] = ["closure_vec", "closure_vec_async", "closure_byte_buf"];

/// Runs a worker node when started by a test; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn worker_process() {
    let Some(role) = common::child_role() else {
        return;
    };
    assert_eq!(role, "worker");
    let name = std::env::var(common::ENV_NAME).expect("worker name");
    let g = common::builder_for(&common::address_from_env())
        .process_name(name)
        .start()
        .expect("worker starts");
    g.register("closure_vec", |data: Vec<u8>| data)
        .expect("registers");
    g.register("closure_vec_async", |data: Vec<u8>| async move { data })
        .expect("registers");
    g.register("closure_byte_buf", |data: ByteBuf| data.into_vec())
        .expect("registers");
    g.join().expect("join");
}

fn cluster(name: &str) -> Cluster {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    cluster.spawn_worker(&common::unique(name));
    for closure in CLOSURES {
        cluster
            .caller
            .wait_function_timeout(closure, WAIT)
            .expect("the closures are served");
    }
    cluster
}

/// How the caller gives the one argument.
#[derive(Debug, Clone, Copy)]
enum Given {
    /// `.args((data,))`.
    ByPosition,
    /// `.args(data)`: the payload is the `bin` itself.
    Alone,
    /// `.args({"data": data})`.
    ByName,
}

/// Echoes `data` (owned, as users who give their buffer away send it) through
/// `callback`; fails unless exactly `data` comes back.
fn echo(cluster: &Cluster, callback: &str, given: Given, data: Vec<u8>) {
    let expected = data.clone();
    let call = cluster.caller.call(callback).timeout(WAIT);
    let call = match given {
        Given::ByPosition => call.args((data,)),
        Given::Alone => call.args(data),
        Given::ByName => call.args(BTreeMap::from([("data", ByteBuf::from(data))])),
    };
    let back: Vec<u8> = call
        .fg()
        .unwrap_or_else(|e| panic!("{callback} {given:?} of {}: {e}", expected.len()));
    assert!(
        back == expected,
        "{callback} {given:?}: {} bytes came back changed",
        expected.len()
    );
}

#[test]
fn a_lone_byte_parameter_echoes_unchanged_at_every_threshold() {
    let cluster = cluster("thresholds");
    let mut seed = 0u8;
    for len in SIZES {
        let base = pattern(len, 1);
        for callback in NAMED.into_iter().chain(CLOSURES) {
            let named = NAMED.contains(&callback);
            for given in [Given::ByPosition, Given::Alone, Given::ByName] {
                if matches!(given, Given::ByName) && !named {
                    continue;
                }
                seed = seed.wrapping_add(1);
                let mut data = base.clone();
                // Each call's bytes differ at both ends: bytes of another call show.
                for at in [0, len / 2, len.saturating_sub(1)] {
                    if let Some(b) = data.get_mut(at) {
                        *b = b.wrapping_add(seed);
                    }
                }
                echo(&cluster, callback, given, data);
            }
        }
    }
}

#[test]
fn echoes_of_64_mib_back_to_back_and_in_flight_together() {
    let cluster = cluster("large");
    let base = pattern(64 << 20, 7);
    // One after another: each frame is read into a buffer the last one's parameter may
    // have taken over.
    for (n, callback) in NAMED.into_iter().chain(CLOSURES).enumerate() {
        let mut data = base.clone();
        data[0] = n as u8;
        data[(64 << 20) - 1] = n as u8;
        echo(&cluster, callback, Given::ByPosition, data);
    }
    // Several in flight: the reader reads the next frames while the callbacks take
    // theirs over.
    let sent: Vec<Vec<u8>> = (0..4u8).map(|n| pattern(2 << 20, n)).collect();
    let pending: Vec<_> = sent
        .iter()
        .zip(["echo_vec", "echo_vec_async", "echo_byte_buf", "closure_vec"])
        .map(|(data, callback)| {
            cluster
                .caller
                .call(callback)
                .args((data.clone(),))
                .timeout(WAIT)
                .bg::<Vec<u8>>()
                .expect("sent")
        })
        .collect();
    for (data, pending) in sent.iter().zip(pending) {
        let back = pending.get().expect("echoed");
        assert!(back == *data, "an echo in flight came back changed");
    }
}

/// Borrowed 64 MiB arguments (`.args((&data,))`), taken back as `Vec<u8>`, between
/// echoes taken as `Blob`: the caller copies each borrowed argument into a buffer its
/// reader kept from the last reply, and reads the next reply into the copy's buffer once
/// it was sent. Every echo must come back as sent, whichever buffer it crossed.
#[test]
fn borrowed_arguments_cross_the_readers_buffers_unchanged() {
    let cluster = cluster("borrowed");
    let base = pattern(64 << 20, 11);
    for n in 0..6u8 {
        let mut data = base.clone();
        for at in [0, 32 << 20, (64 << 20) - 1] {
            data[at] = data[at].wrapping_add(n + 1);
        }
        let call = || cluster.caller.call("echo_vec").timeout(WAIT);
        let back: Vec<u8> = call().args((&data,)).fg().expect("borrowed echo");
        assert!(
            back == data,
            "echo {n}: the borrowed argument came back changed"
        );
        drop(back);
        let blob: Blob = call().args((&data,)).fg().expect("echo as Blob");
        assert!(
            blob[..] == data[..],
            "echo {n}: came back changed as a Blob"
        );
    }
}

/// Borrowed large arguments from several threads at once, in a process whose controller
/// reads the same frames (the caller embeds it): each copy may take an idle buffer of any
/// reader of the process, the controller's included, while the other threads' replies
/// are read and held. Each thread keeps its last reply as a `Blob` (a reader's buffer in
/// use) through its next calls, two of them in flight together; every reply, held or
/// not, must stay exactly as sent.
#[test]
fn borrowed_arguments_from_several_threads_at_once_come_back_unchanged() {
    let cluster = cluster("borrowed-threads");
    std::thread::scope(|scope| {
        for t in 0..4u8 {
            let cluster = &cluster;
            scope.spawn(move || {
                // Sizes within twice each other: any thread's buffers fit another's copy.
                let len = (2 << 20) + usize::from(t) * (300 << 10) + 17;
                let mut held: Option<(Vec<u8>, Blob)> = None;
                for n in 0..6u8 {
                    let seed = t.wrapping_mul(40).wrapping_add(n);
                    let first = pattern(len, seed);
                    let second = pattern(len + 1000, seed.wrapping_add(200));
                    let call = |data: &Vec<u8>| {
                        cluster.caller.call("echo_vec").args((data,)).timeout(WAIT)
                    };
                    let in_flight = call(&first).bg::<Blob>().expect("sent");
                    let back: Vec<u8> = call(&second).fg().expect("borrowed echo");
                    let blob = in_flight.get().expect("echoed in flight");
                    if let Some((data, blob)) = held.take() {
                        assert!(
                            blob[..] == data[..],
                            "thread {t}, echo {n}: a held reply changed"
                        );
                    }
                    assert!(back == second, "thread {t}, echo {n}: came back changed");
                    assert!(
                        blob[..] == first[..],
                        "thread {t}, echo {n}: came back changed as a Blob"
                    );
                    held = Some((first, blob));
                }
            });
        }
    });
}

/// `[data]` as MessagePack with a `bin32` header announcing `announced` bytes.
fn lying_bin(data: &[u8], announced: u32) -> Bytes {
    let mut out = vec![0x91, 0xc6];
    out.extend(announced.to_be_bytes());
    out.extend_from_slice(data);
    Bytes::from(out)
}

#[test]
fn a_bin_whose_length_lies_is_refused_or_read_as_announced() {
    let cluster = cluster("lies");
    for len in [20_000usize, 70_000, 2 << 20] {
        let data = pattern(len, 3);
        for callback in ["echo_vec", "echo_byte_buf_async", "closure_vec"] {
            let call = |payload: Bytes| -> daffi::Result<Vec<u8>> {
                cluster
                    .caller
                    .call(callback)
                    .raw_args(payload)
                    .timeout(WAIT)
                    .fg()
            };
            // More bytes announced than sent: refused, with the callback named.
            for announced in [len as u32 + 1, u32::MAX] {
                match call(lying_bin(&data, announced)) {
                    Err(Error::BadArguments { callback: name, .. }) => {
                        assert!(name.contains(callback), "{name}")
                    }
                    other => panic!("{callback}: {announced} announced, {len} sent: {other:?}"),
                }
            }
            // Fewer: the bytes announced, as the deserializer reads them, never more.
            let back = call(lying_bin(&data, len as u32 - 1)).expect("read as announced");
            assert!(back[..] == data[..len - 1], "{callback}: fewer announced");
            // The node serves on, and an honest `bin` is taken whole.
            let back = call(lying_bin(&data, len as u32)).expect("honest");
            assert!(back == data, "{callback}: honest after lies");
        }
    }
}
