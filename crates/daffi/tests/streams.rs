//! Streams: a callback's items flow to the caller as it reads them, with credit-based
//! flow control. Real processes over a real socket: the callee is a worker process of
//! this binary, the caller a node in the test process. The cases are shared with
//! `tests/nats_streams.rs` (`streaming`).

mod common;
mod streaming;

use std::time::Duration;

use common::{Cluster, Transport, WAIT};
use daffi::{Error, Global};
use streaming::{dropped_on, produced_on, sync_adds_succeed, WINDOW};

const ENTRY: &str = "child_process";

/// The environment variable naming the node a [`reader`] reads from.
const ENV_TARGET: &str = "DAFFI_TEST_TARGET";

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[("worker", worker), ("reader", reader)]);
}

/// A node serving the shared streaming callbacks.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    streaming::serve(&g);
    g.join().expect("join");
}

/// A node reading `endless` on the node named by [`ENV_TARGET`] as
/// fast as it can, for ever (until it is killed).
fn reader() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("reader starts");
    let target = std::env::var(ENV_TARGET).expect("target");
    g.wait_function_timeout("endless", WAIT)
        .expect("endless is served");
    let items = g
        .call("endless")
        .on(&target)
        .stream::<u64>()
        .expect("stream");
    for item in items {
        item.expect("an item");
    }
    panic!("the reader was to be killed, not to see its endless stream end");
}

/// A controller and caller in this process, and one worker; the caller knows the
/// worker's streams.
fn cluster_with_worker() -> (Cluster, String) {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("streamer");
    cluster.spawn_worker(&worker);
    cluster
        .caller
        .wait_function_timeout(streaming::LAST_REGISTERED, WAIT)
        .expect("the worker's streams are announced");
    (cluster, worker)
}

#[test]
fn ten_thousand_items_of_a_sync_iterator_are_summed_by_a_sync_caller() {
    let (cluster, _worker) = cluster_with_worker();
    streaming::sync_iterator_summed(&cluster.caller);
}

#[test]
fn an_async_stream_reaches_the_users_own_runtime() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let caller = Global::builder()
            .process_name(common::unique("async-caller"))
            .unix_sock_path(
                std::env::temp_dir()
                    .join("daffi-tests")
                    .join(format!("{}.sock", common::unique("ctl"))),
            )
            .init_controller(true)
            .start_async()
            .await
            .expect("start_async");
        let worker = common::unique("streamer");
        let _worker = common::spawn_child(ENTRY, "worker", &worker, caller.address());
        caller
            .wait_function_timeout_async(streaming::LAST_REGISTERED, WAIT)
            .await
            .expect("the worker's streams are announced");
        streaming::async_caller_reads_streams(&caller).await;
        caller.stop();
    });
}

#[test]
fn callback_fns_and_methods_stream_what_they_return() {
    let (cluster, _worker) = cluster_with_worker();
    streaming::callback_fns_and_methods(&cluster.caller);
}

#[test]
fn a_dropped_stream_stops_its_producer_which_stayed_within_its_credit() {
    let (cluster, worker) = cluster_with_worker();
    streaming::dropped_stream_stops_its_producer(&cluster.caller, &worker);
}

#[test]
fn a_killed_callee_ends_the_stream_with_its_error_within_a_second() {
    let (mut cluster, worker) = cluster_with_worker();
    let caller = cluster.caller.clone();
    streaming::killed_callee_ends_the_stream(
        &caller,
        &worker,
        || cluster.worker(&worker).kill(),
        Duration::from_secs(1),
    );
}

#[test]
fn a_stuck_stream_reader_does_not_hold_up_other_calls_to_the_same_node() {
    let (cluster, worker) = cluster_with_worker();
    streaming::stuck_reader_beside_other_calls(&cluster.caller, &worker);
}

/// Reads frames from a raw peer's connection until one of `kind`.
fn next_frame_of(raw: &mut std::net::TcpStream, kind: daffi_wire::Kind) -> daffi_wire::Frame {
    loop {
        let frame = common::wire::read_frame(raw);
        if frame.kind() == kind {
            return frame;
        }
    }
}

#[test]
fn a_producer_past_its_credit_ends_the_stream_with_a_protocol_error() {
    use daffi_wire::{Header, Kind};
    use std::io::Write;

    let cluster = Cluster::start(Transport::Tcp, ENTRY);
    let g = &cluster.caller;
    let port = g.port().expect("tcp");
    let flooder = common::unique("flooder");
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    raw.write_all(&common::wire::opening(&flooder, None, &["flood"]))
        .expect("join");
    g.wait_process_timeout(&flooder, WAIT)
        .expect("the flooder joined");
    let items = g
        .call("flood")
        .on(&flooder)
        .timeout(WAIT)
        .stream::<u64>()
        .expect("stream");
    let request = next_frame_of(&mut raw, Kind::Request);
    // A peer that ignores its credit: twice the window, one item (the integer 1) a frame.
    let header = Header {
        kind: Kind::StreamItem,
        flags: 0,
        call_id: request.call_id(),
        timeout_ms: 0,
        src: &flooder,
        dst: request.src(),
        name: "",
    };
    let mut flood = Vec::new();
    for _ in 0..2 * WINDOW {
        flood.extend_from_slice(&header.encode(1));
        flood.push(0x01);
    }
    raw.write_all(&flood).expect("flood");
    // The caller counts the credit as the items arrive: it tells the flooder to stop
    // before its stream is read at all (so no top-up was granted)...
    let cancel = next_frame_of(&mut raw, Kind::StreamCancel);
    assert_eq!(cancel.call_id(), request.call_id());
    // ...and kept only the window: then the stream ends with the named error.
    let mut read = 0;
    let error = items
        .into_iter()
        .find_map(|item| match item {
            Ok(_) => {
                read += 1;
                None
            }
            Err(e) => Some(e),
        })
        .expect("the stream ends with an error");
    assert_eq!(read, WINDOW, "items kept before the overrun");
    match &error {
        Error::Protocol { peer, message, .. } => {
            assert_eq!(peer, &flooder);
            assert!(message.contains("more results of `flood`"), "{message}");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[test]
fn a_timeout_bounds_the_wait_for_each_item() {
    let (cluster, _worker) = cluster_with_worker();
    streaming::timeout_bounds_the_wait_for_each_item(&cluster.caller);
}

#[test]
fn a_paused_producer_times_its_reader_out_and_holds_up_no_other_node() {
    let (mut cluster, producer) = cluster_with_worker();
    let other = common::unique("other");
    cluster.spawn_worker(&other);
    let timeout = Duration::from_millis(500);
    let mut items = cluster
        .caller
        .call("endless")
        .on(&producer)
        .timeout(timeout)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    assert_eq!(items.next().expect("an item").expect("item"), 1);
    let pid = cluster.worker(&producer).pid().expect("running");
    common::pause(pid);
    // What was in flight arrives (no more than the window), then the wait for the next
    // item runs out.
    let mut read = 1u64;
    let error = loop {
        match items.next().expect("items, then an error") {
            Ok(_) => read += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(error, Error::Timeout { after, .. } if after == timeout),
        "expected Timeout, got {error:?}"
    );
    assert!(read <= 1 + WINDOW, "read {read} items past the window");
    // Meanwhile, calls to another node go on.
    sync_adds_succeed(&cluster.caller, &other, 50);
    // Resumed, the producer hears of the cancel and drops its iterator, having made no
    // more than its credit ahead of what was read.
    common::resume(pid);
    let at_drop = dropped_on(&cluster.caller, &producer).expect("the iterator was dropped");
    assert!(
        at_drop <= read + WINDOW,
        "produced {at_drop} items for a reader of {read} with a credit of {WINDOW}"
    );
}

#[test]
fn a_paused_reader_stops_its_producer_within_its_credit_and_no_other_caller() {
    let (mut cluster, producer) = cluster_with_worker();
    let reader_name = common::unique("reader");
    let reader = common::spawn_child_with(
        ENTRY,
        "reader",
        &reader_name,
        &cluster.address,
        &[(ENV_TARGET, &producer)],
    );
    let g = cluster.caller.clone();
    let produced = || produced_on(&g, &producer);
    // The reader is under way once the producer made more than a window.
    let started = std::time::Instant::now();
    while produced() <= 2 * WINDOW {
        assert!(started.elapsed() < WAIT, "the reader never got going");
    }
    let pid = reader.pid().expect("running");
    common::pause(pid);
    let at_pause = produced();
    // The producer settles: nothing new over 100 calls of this second caller to the
    // same node, which all succeed.
    let settled = loop {
        let before = produced();
        sync_adds_succeed(&g, &producer, 100);
        let after = produced();
        if after == before {
            break after;
        }
        assert!(started.elapsed() < 2 * WAIT, "the producer never stopped");
    };
    // The reader had read no more than was made when it stopped; the producer ran at
    // most its credit (the window) ahead of that.
    assert!(
        settled <= at_pause + WINDOW,
        "made {settled} items, {at_pause} by the reader's pause, with a credit of {WINDOW}"
    );
    // Killed, the reader's stream is dropped at the producer.
    drop(reader);
    let at_drop = dropped_on(&g, &producer);
    assert_eq!(
        at_drop,
        Some(settled),
        "the iterator was dropped, and made no more"
    );
    cluster.worker(&producer).kill();
}
