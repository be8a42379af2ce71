//! Streams: a callback's items flow to the caller as it reads them, with credit-based
//! flow control. Real processes over a real socket: the callee is a worker process of
//! this binary, the caller a node in the test process.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, Log, Transport, WAIT};
use daffi::{callback, Error, Global};
use futures_util::StreamExt;

const ENTRY: &str = "child_process";

/// The credit a caller grants at first, in items (`STREAM_WINDOW` in the protocol doc;
/// these items are far below its bytes).
const WINDOW: u64 = 256;

// ---- the worker ---------------------------------------------------------------------

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

/// A `#[callback]` fn streaming an iterator's items.
#[callback]
fn numbers(n: u64) -> impl Iterator<Item = u64> {
    1..=n
}

/// A `#[callback]` fn streaming a `Stream`'s items.
#[callback]
fn squares(n: u64) -> impl futures_util::Stream<Item = u64> {
    futures_util::stream::iter(1..=n).then(|i| async move {
        tokio::task::yield_now().await;
        i * i
    })
}

/// A callback group whose method streams.
struct Multiples {
    k: u64,
}

#[callback]
impl Multiples {
    pub fn multiples(&self, n: u64) -> impl Iterator<Item = u64> {
        let k = self.k;
        (1..=n).map(move |i| i * k)
    }
}

/// Items the `endless` iterator has produced, in this worker.
static PRODUCED: AtomicU64 = AtomicU64::new(0);
/// The count of items produced when an `endless` iterator was dropped.
static DROPPED: Log<u64> = Log::new();

/// Counts up for ever; tells [`DROPPED`] when it is dropped.
struct Endless(u64);

impl Iterator for Endless {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        self.0 += 1;
        PRODUCED.fetch_add(1, Ordering::SeqCst);
        Some(self.0)
    }
}

impl Drop for Endless {
    fn drop(&mut self) {
        DROPPED.push(PRODUCED.load(Ordering::SeqCst));
    }
}

/// How many items `endless` produced so far.
#[callback]
fn produced() -> u64 {
    PRODUCED.load(Ordering::SeqCst)
}

/// Once an `endless` iterator was dropped (or after `timeout_ms`): the items produced
/// by then, if it was.
#[callback]
fn endless_dropped(timeout_ms: u64) -> Option<u64> {
    DROPPED
        .wait_until(timeout_ms, |d| !d.is_empty())
        .first()
        .copied()
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[("worker", worker)]);
}

/// A node serving this file's `#[callback]` functions and its stream closures.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    g.register_instance(Multiples { k: 3 })
        .expect("register Multiples");
    g.register_stream("count_sync", |n: u64| 1..=n)
        .expect("register count_sync");
    g.register_stream("count_async", |n: u64| {
        futures_util::stream::unfold(0, move |i| async move {
            tokio::task::yield_now().await;
            (i < n).then_some((i + 1, i + 1))
        })
    })
    .expect("register count_async");
    g.register_stream("endless", || Endless(0))
        .expect("register endless");
    g.register_stream("then_nothing", |n: u64| {
        futures_util::stream::iter(1..=n).chain(futures_util::stream::pending())
    })
    .expect("register then_nothing");
    g.join().expect("join");
}

// ---- helpers ---------------------------------------------------------------------------

/// A controller and caller in this process, and one worker; the caller knows the
/// worker's streams.
fn cluster_with_worker() -> (Cluster, String) {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("streamer");
    cluster.spawn_worker(&worker);
    cluster
        .caller
        .wait_function_timeout("then_nothing", WAIT)
        .expect("the worker's streams are announced");
    (cluster, worker)
}

fn produced_on(g: &Global, worker: &str) -> u64 {
    g.call("produced")
        .on(worker)
        .timeout(WAIT)
        .fg()
        .expect("produced")
}

// ---- tests -----------------------------------------------------------------------------

#[test]
fn ten_thousand_items_of_a_sync_iterator_are_summed_by_a_sync_caller() {
    let (cluster, _worker) = cluster_with_worker();
    let items = cluster
        .caller
        .call("count_sync")
        .args((10_000u64,))
        .timeout(WAIT)
        .stream::<u64>()
        .expect("stream");
    let (mut count, mut sum) = (0u64, 0u64);
    for item in items {
        sum += item.expect("item");
        count += 1;
    }
    assert_eq!((count, sum), (10_000, 10_000 * 10_001 / 2));
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
            .wait_function_timeout_async("then_nothing", WAIT)
            .await
            .expect("the worker's streams are announced");

        let mut items = caller
            .call("count_async")
            .args((10_000u64,))
            .timeout(WAIT)
            .stream::<u64>()
            .expect("stream");
        let (mut count, mut sum) = (0u64, 0u64);
        while let Some(item) = items.next().await {
            sum += item.expect("item");
            count += 1;
        }
        assert_eq!((count, sum), (10_000, 10_000 * 10_001 / 2));

        // A sync iterator to an async reader, too.
        let sync_items: Vec<u64> = caller
            .call("count_sync")
            .args((5u64,))
            .stream::<u64>()
            .expect("stream")
            .map(|item| item.expect("item"))
            .collect()
            .await;
        assert_eq!(sync_items, vec![1, 2, 3, 4, 5]);

        // The wrong terminal for the callback is a named error, both ways.
        let mut plain = caller
            .call("sync_add")
            .args((1, 2))
            .stream::<i64>()
            .expect("stream");
        match plain.next().await {
            Some(Err(Error::NotAStream { callback, .. })) => assert_eq!(callback, "sync_add"),
            other => panic!("expected NotAStream, got {other:?}"),
        }
        assert!(plain.next().await.is_none(), "the stream ended");
        match caller
            .call("count_sync")
            .args((3u64,))
            .fg_async::<u64>()
            .await
        {
            Err(Error::NotAStream { callback, .. }) => assert_eq!(callback, "count_sync"),
            other => panic!("expected NotAStream, got {other:?}"),
        }
        caller.stop();
    });
}

#[test]
fn callback_fns_and_methods_stream_what_they_return() {
    let (cluster, _worker) = cluster_with_worker();
    let g = &cluster.caller;
    g.wait_function_timeout("multiples", WAIT)
        .expect("the group is announced");
    let collect = |name: &str| -> Vec<u64> {
        g.call(name)
            .args((4u64,))
            .timeout(WAIT)
            .stream::<u64>()
            .expect("stream")
            .into_iter()
            .map(|item| item.expect("item"))
            .collect()
    };
    assert_eq!(collect("numbers"), vec![1, 2, 3, 4]);
    assert_eq!(collect("squares"), vec![1, 4, 9, 16]);
    assert_eq!(collect("multiples"), vec![3, 6, 9, 12]);
}

#[test]
fn a_dropped_stream_stops_its_producer_which_stayed_within_its_credit() {
    let (cluster, worker) = cluster_with_worker();
    let g = &cluster.caller;
    let mut items = g
        .call("endless")
        .timeout(WAIT)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    for expected in 1..=10u64 {
        assert_eq!(items.next().expect("an item").expect("item"), expected);
        // A slow reader: the producer has every chance to run ahead.
        std::thread::sleep(Duration::from_millis(20));
    }
    // Only as far ahead as granted: the first window (the iterator is not advanced
    // without credit).
    let ahead = produced_on(g, &worker);
    assert!(
        (10..=WINDOW).contains(&ahead),
        "produced {ahead} items for a reader of 10 with a credit of {WINDOW}"
    );
    drop(items);
    let at_drop: Option<u64> = g
        .call("endless_dropped")
        .args((WAIT.as_millis() as u64,))
        .on(&worker)
        .timeout(WAIT * 2)
        .fg()
        .expect("endless_dropped");
    let at_drop = at_drop.expect("the iterator was dropped");
    assert!(
        (ahead..=WINDOW).contains(&at_drop),
        "produced {at_drop} items by the drop, beyond its credit"
    );
}

#[test]
fn a_killed_callee_ends_the_stream_with_its_error_within_a_second() {
    let (mut cluster, worker) = cluster_with_worker();
    let mut items = cluster
        .caller
        .call("endless")
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    assert_eq!(items.next().expect("an item").expect("item"), 1);
    let killed = Instant::now();
    cluster.worker(&worker).kill();
    let error = items
        .by_ref()
        .find_map(Result::err)
        .expect("the stream ends with an error");
    let after = killed.elapsed();
    match error {
        Error::PeerDisconnected { process, callback } => {
            assert_eq!(
                (process.as_str(), callback.as_str()),
                (worker.as_str(), "endless")
            );
        }
        other => panic!("expected PeerDisconnected, got {other:?}"),
    }
    assert!(
        after < Duration::from_secs(1),
        "ended {after:?} after the kill"
    );
    assert!(items.next().is_none(), "nothing after the error");
}

#[test]
fn a_stuck_stream_reader_does_not_hold_up_other_calls_to_the_same_node() {
    let (cluster, worker) = cluster_with_worker();
    let g = &cluster.caller;
    let mut stuck = g
        .call("endless")
        .on(&worker)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    assert_eq!(stuck.next().expect("an item").expect("item"), 1);
    // The reader stops here; its producer waits for credit. Calls and another stream
    // to the same node go on.
    for i in 0..200i64 {
        let sum: i64 = g
            .call("sync_add")
            .args((i, 1))
            .on(&worker)
            .timeout(WAIT)
            .fg()
            .expect("a call beside the stuck stream");
        assert_eq!(sum, i + 1);
    }
    let total: u64 = g
        .call("count_sync")
        .args((1_000u64,))
        .on(&worker)
        .timeout(WAIT)
        .stream::<u64>()
        .expect("stream")
        .into_iter()
        .map(|item| item.expect("item"))
        .sum();
    assert_eq!(total, 1_000 * 1_001 / 2);
    assert!(produced_on(g, &worker) <= WINDOW);
    drop(stuck);
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
    let timeout = Duration::from_millis(300);
    let mut items = cluster
        .caller
        .call("then_nothing")
        .args((3u64,))
        .timeout(timeout)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    for expected in 1..=3u64 {
        assert_eq!(items.next().expect("an item").expect("item"), expected);
    }
    let waited = Instant::now();
    match items.next() {
        Some(Err(Error::Timeout { after, .. })) => assert_eq!(after, timeout),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let waited = waited.elapsed();
    assert!(
        waited >= timeout && waited < WAIT,
        "timed out after {waited:?}"
    );
    assert!(items.next().is_none(), "nothing after the timeout");
}
