//! Client streams: a caller streams arguments to a callback's `Incoming` parameter
//! (`.stream_from(..)`), with credit-based flow control, and both ways at once. Real
//! processes over a real socket: the callee is a worker process of this binary, named
//! with `.on` (every node of this binary serves the same `#[callback]` fns), the caller a
//! node in the test process (or, to be killed, a child of its own).

mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{Cluster, Log, Transport, WAIT};
use daffi::{callback, Error, Incoming};
use futures_util::StreamExt;

const ENTRY: &str = "child_process";

/// The credit a callee grants at first (`STREAM_WINDOW` in the protocol doc).
const WINDOW: u64 = 32;

// ---- the worker ---------------------------------------------------------------------

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

/// A sync callback reading its stream with `for`, after a plain argument.
#[callback]
fn sum_sync(scale: i64, numbers: Incoming<i64>) -> daffi::Result<i64> {
    let mut total = 0;
    for n in numbers {
        total += n? * scale;
    }
    Ok(total)
}

/// An async callback reading its stream with `StreamExt`, before a plain argument.
#[callback]
async fn sum_async(mut numbers: Incoming<i64>, scale: i64) -> daffi::Result<i64> {
    let mut total = 0;
    while let Some(n) = numbers.next().await {
        total += n? * scale;
    }
    Ok(total)
}

/// Both ways at once: each item read is sent back doubled.
#[callback]
fn doubled(numbers: Incoming<i64>) -> impl Iterator<Item = i64> {
    numbers.into_iter().map_while(Result::ok).map(|n| n * 2)
}

/// Reads `n` items and returns them, leaving the rest unread.
#[callback]
fn first(n: usize, numbers: Incoming<u64>) -> daffi::Result<Vec<u64>> {
    numbers.into_iter().take(n).collect()
}

/// A slow reader: `n` items, 10 ms each.
#[callback]
async fn read_slowly(n: usize, mut numbers: Incoming<u64>) -> daffi::Result<u64> {
    let mut read = 0;
    while let Some(item) = numbers.next().await {
        item?;
        read += 1;
        if read == n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(read)
}

/// What ended the stream `watch` reads (the error's debug form), and when.
static WATCH_ENDED: Log<(String, Instant)> = Log::new();
/// Items `watch` has read.
static WATCHED: Log<u64> = Log::new();

/// Reads until the stream ends, and logs how it ended.
#[callback]
fn watch(numbers: Incoming<u64>) -> u64 {
    let ending = numbers.into_iter().find_map(|item| match item {
        Ok(n) => {
            WATCHED.push(n);
            None
        }
        Err(e) => Some(format!("{e:?}")),
    });
    WATCH_ENDED.push((ending.unwrap_or_else(|| "the end".into()), Instant::now()));
    WATCHED.wait_until(0, |_| true).len() as u64
}

/// Waits until `watch` has read an item (or `timeout_ms` passed): how many it has.
#[callback]
fn watched(timeout_ms: u64) -> u64 {
    WATCHED.wait_until(timeout_ms, |w| !w.is_empty()).len() as u64
}

/// Once `watch`'s stream ended (or after `timeout_ms`): how, and how many ms ago.
#[callback]
fn watch_ended(timeout_ms: u64) -> Option<(String, u64)> {
    let ended = WATCH_ENDED.wait_until(timeout_ms, |e| !e.is_empty());
    ended
        .first()
        .map(|(how, at)| (how.clone(), at.elapsed().as_millis() as u64))
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[("worker", worker), ("feeder", feeder)]);
}

/// A node serving this file's `#[callback]` functions and a closure taking `Incoming`.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    g.register("count", |label: String, items: Incoming<String>| {
        let n = items.into_iter().map_while(Result::ok).count();
        format!("{label}: {n}")
    })
    .expect("register count");
    g.join().expect("join");
}

/// A caller that feeds `watch` a few items and then an endless wait: killed by the test.
fn feeder() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("feeder starts");
    let target = std::env::var("DAFFI_TEST_TARGET").expect("target");
    g.wait_process_timeout(&target, WAIT)
        .expect("the worker is known");
    let items = futures_util::stream::iter(1..=3u64).chain(futures_util::stream::pending());
    let outcome = g.call("watch").on(target).stream_from(items).fg::<u64>();
    panic!("the feeder was to be killed, not to end: {outcome:?}");
}

// ---- helpers ---------------------------------------------------------------------------

/// A controller and caller in this process, and one worker.
fn cluster_with_worker() -> (Cluster, String) {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("incoming");
    cluster.spawn_worker(&worker);
    cluster
        .caller
        .wait_function_timeout("count", WAIT)
        .expect("the worker's callbacks are announced");
    (cluster, worker)
}

/// An endless stream of 1, 2, 3, ... that counts how many items were pulled from it and
/// says when it is dropped.
struct Counted {
    pulled: Arc<AtomicU64>,
    dropped: std::sync::mpsc::Sender<()>,
}

impl Counted {
    fn new() -> (Counted, Arc<AtomicU64>, std::sync::mpsc::Receiver<()>) {
        let pulled = Arc::new(AtomicU64::new(0));
        let (dropped, on_drop) = std::sync::mpsc::channel();
        let counted = Counted {
            pulled: pulled.clone(),
            dropped,
        };
        (counted, pulled, on_drop)
    }
}

impl futures_util::Stream for Counted {
    type Item = u64;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<u64>> {
        Poll::Ready(Some(self.pulled.fetch_add(1, Ordering::SeqCst) + 1))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let _ = self.dropped.send(());
    }
}

// ---- tests -----------------------------------------------------------------------------

/// The user's own runtime, as `#[tokio::main]` makes it.
#[tokio::main]
async fn users_main(address: daffi::Address, worker: String) {
    let caller = common::builder_for(&address)
        .process_name(common::unique("async-caller"))
        .start_async()
        .await
        .expect("start_async");
    caller
        .wait_function_timeout_async("sum_async", WAIT)
        .await
        .expect("announced");
    let numbers = || futures_util::stream::iter(1..=10_000i64);
    let expected = 10_000 * 10_001 / 2;

    let by_async: i64 = caller
        .call("sum_async")
        .on(&worker)
        .args((2,))
        .stream_from(numbers())
        .timeout(WAIT)
        .fg_async()
        .await
        .expect("sum_async");
    assert_eq!(by_async, 2 * expected);

    let by_sync = caller
        .call("sum_sync")
        .on(&worker)
        .args((3,))
        .stream_from(numbers())
        .timeout(WAIT)
        .bg::<i64>()
        .expect("bg")
        .await
        .expect("sum_sync");
    assert_eq!(by_sync, 3 * expected);

    // A registered closure takes `Incoming` too.
    let words = futures_util::stream::iter(["a", "b", "c"]);
    let counted: String = caller
        .call("count")
        .on(&worker)
        .args(("words",))
        .stream_from(words)
        .fg_async()
        .await
        .expect("count");
    assert_eq!(counted, "words: 3");
    caller.stop();
}

#[test]
fn ten_thousand_items_are_streamed_in_and_summed_from_the_users_own_runtime() {
    let (cluster, worker) = cluster_with_worker();
    users_main(cluster.caller.address().clone(), worker.clone());
    // And from sync code, FG.
    let sum: i64 = cluster
        .caller
        .call("sum_sync")
        .on(&worker)
        .args((1,))
        .stream_from(futures_util::stream::iter(1..=10_000i64))
        .timeout(WAIT)
        .fg()
        .expect("fg");
    assert_eq!(sum, 10_000 * 10_001 / 2);
}

#[test]
fn both_ways_at_once_items_come_back_doubled_in_order() {
    let (cluster, worker) = cluster_with_worker();
    let back: Vec<i64> = cluster
        .caller
        .call("doubled")
        .on(&worker)
        .stream_from(futures_util::stream::iter(1..=5_000i64))
        .timeout(WAIT)
        .stream::<i64>()
        .expect("stream")
        .into_iter()
        .map(|item| item.expect("item"))
        .collect();
    assert_eq!(back, (1..=5_000).map(|n| n * 2).collect::<Vec<i64>>());
}

#[test]
fn a_callee_that_returns_early_stops_the_feeding_within_its_credit() {
    let (cluster, worker) = cluster_with_worker();
    let (items, pulled, dropped) = Counted::new();
    let read: Vec<u64> = cluster
        .caller
        .call("first")
        .on(&worker)
        .args((3,))
        .stream_from(items)
        .timeout(WAIT)
        .fg()
        .expect("first");
    assert_eq!(read, vec![1, 2, 3]);
    dropped
        .recv_timeout(WAIT)
        .expect("the feeding stream is dropped");
    // The first window, plus the one item pulled and held while waiting for credit.
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(
        (3..=3 + WINDOW + 1).contains(&pulled),
        "pulled {pulled} items for a callee that read 3, with a credit of {WINDOW}"
    );
}

#[test]
fn a_slow_callee_slows_the_feeding_to_its_credit() {
    let (cluster, worker) = cluster_with_worker();
    let (items, pulled, _dropped) = Counted::new();
    let read: u64 = cluster
        .caller
        .call("read_slowly")
        .on(&worker)
        .args((20,))
        .stream_from(items)
        .timeout(WAIT)
        .fg()
        .expect("read_slowly");
    assert_eq!(read, 20);
    // In the 200 ms the callee took, an endless stream would have been pulled for
    // millions of items; it was pulled only as far as the callee granted: 20 read, a
    // top-up of 16 once 16 were read, and the first window of 32.
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(
        (20..=20 + WINDOW + 1).contains(&pulled),
        "pulled {pulled} items for a callee that read 20"
    );
}

#[test]
fn a_killed_caller_ends_the_callees_incoming_with_its_error_within_a_second() {
    let (cluster, worker) = cluster_with_worker();
    let feeder = common::unique("feeder");
    let env = [("DAFFI_TEST_TARGET", worker.as_str())];
    let mut feeding =
        common::spawn_child_with(ENTRY, "feeder", &feeder, cluster.caller.address(), &env);
    let g = &cluster.caller;
    let watched: u64 = g
        .call("watched")
        .args((WAIT.as_millis() as u64,))
        .on(&worker)
        .timeout(WAIT * 2)
        .fg()
        .expect("watched");
    assert!(watched >= 1, "the callee reads the feeder's items");
    let killed = Instant::now();
    feeding.kill();
    let (how, ms_ago): (String, u64) = g
        .call("watch_ended")
        .args((WAIT.as_millis() as u64,))
        .on(&worker)
        .timeout(WAIT * 2)
        .fg::<Option<(String, u64)>>()
        .expect("watch_ended")
        .expect("the callee's Incoming ended");
    assert!(
        how.starts_with("PeerDisconnected") && how.contains(&feeder),
        "ended with {how}"
    );
    let after = killed
        .elapsed()
        .saturating_sub(Duration::from_millis(ms_ago));
    assert!(
        after < Duration::from_secs(1),
        "ended {after:?} after the kill"
    );
    // The callee serves other calls as before.
    let sum: i64 = g
        .call("sync_add")
        .args((2, 3))
        .on(&worker)
        .timeout(WAIT)
        .fg()
        .expect("sync_add");
    assert_eq!(sum, 5);
}

#[test]
fn the_wrong_call_for_an_incoming_parameter_is_a_named_error() {
    let (cluster, worker) = cluster_with_worker();
    let g = &cluster.caller;
    match g
        .call("sum_sync")
        .on(&worker)
        .args((1,))
        .timeout(WAIT)
        .fg::<i64>()
    {
        Err(Error::NotAStream {
            callback, reason, ..
        }) => {
            assert_eq!(callback, "sum_sync");
            assert!(reason.contains("stream_from"), "{reason}");
        }
        other => panic!("expected NotAStream, got {other:?}"),
    }
    let items = futures_util::stream::iter([1i64]);
    match g
        .call("sync_add")
        .on(&worker)
        .args((1, 2))
        .stream_from(items)
        .timeout(WAIT)
        .fg::<i64>()
    {
        Err(Error::NotAStream { callback, .. }) => assert_eq!(callback, "sync_add"),
        other => panic!("expected NotAStream, got {other:?}"),
    }
    let items = futures_util::stream::iter([1i64]);
    match g.call("sum_sync").stream_from(items).no_return() {
        Err(Error::Config(message)) => assert!(message.contains("fg"), "{message}"),
        other => panic!("expected Config, got {other:?}"),
    }
    // The callee goes on serving.
    let sum: i64 = g
        .call("sum_sync")
        .on(&worker)
        .args((1,))
        .stream_from(futures_util::stream::iter(1..=4i64))
        .timeout(WAIT)
        .fg()
        .expect("sum_sync");
    assert_eq!(sum, 10);
}

#[test]
fn a_caller_that_gives_up_cancels_the_callees_incoming() {
    let (cluster, worker) = cluster_with_worker();
    let g = &cluster.caller;
    let items = futures_util::stream::iter(1..=3u64).chain(futures_util::stream::pending());
    let timeout = Duration::from_millis(300);
    match g
        .call("watch")
        .on(&worker)
        .stream_from(items)
        .timeout(timeout)
        .fg::<u64>()
    {
        Err(Error::Timeout { after, .. }) => assert_eq!(after, timeout),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let (how, _): (String, u64) = g
        .call("watch_ended")
        .args((WAIT.as_millis() as u64,))
        .on(&worker)
        .timeout(WAIT * 2)
        .fg::<Option<(String, u64)>>()
        .expect("watch_ended")
        .expect("the callee's Incoming ended");
    assert!(how.starts_with("Cancelled"), "ended with {how}");
}
