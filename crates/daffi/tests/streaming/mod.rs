//! What the stream tests share, whatever the mesh (`tests/streams.rs` over the
//! controller, `tests/nats_streams.rs` over NATS): the worker's streaming callbacks
//! (`#[callback]` ones are served by every node of a binary that includes this module),
//! and each case, run by a caller against a worker that [`serve`]s them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Log, WAIT};
use daffi::{callback, Error, Global};
use futures_util::StreamExt;

/// The credit a caller grants at first, in items (`STREAM_WINDOW` in the protocol doc;
/// these items are far below its bytes).
pub const WINDOW: u64 = 4096;

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

/// Registers the worker's stream closures and callback group on `g`.
pub fn serve(g: &Global) {
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
}

/// The callback the caller waits for before a case: registered last.
pub const LAST_REGISTERED: &str = "then_nothing";

/// The items `endless` iterators on `worker` made so far.
pub fn produced_on(g: &Global, worker: &str) -> u64 {
    g.call("produced")
        .on(worker)
        .timeout(WAIT)
        .fg()
        .expect("produced")
}

/// Once an `endless` iterator on `worker` was dropped (waiting up to `WAIT`): the items
/// produced by then, if it was.
pub fn dropped_on(g: &Global, worker: &str) -> Option<u64> {
    g.call("endless_dropped")
        .args((WAIT.as_millis() as u64,))
        .on(worker)
        .timeout(WAIT * 2)
        .fg()
        .expect("endless_dropped")
}

/// Makes `calls` calls of `sync_add` on `node`, each of which must succeed with the sum:
/// the calls beside a stuck or paused peer's stream.
pub fn sync_adds_succeed(g: &Global, node: &str, calls: i64) {
    for i in 0..calls {
        let sum: i64 = g
            .call("sync_add")
            .args((i, 1))
            .on(node)
            .timeout(WAIT)
            .fg()
            .unwrap_or_else(|e| panic!("call {i} to {node} beside a stuck stream: {e}"));
        assert_eq!(sum, i + 1);
    }
}

// ---- the cases -------------------------------------------------------------------------

/// 10,000 items of a sync iterator, summed by a sync caller.
pub fn sync_iterator_summed(g: &Global) {
    let items = g
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

/// From an async caller (in the user's own runtime): 10,000 items of an async stream
/// summed, a sync iterator collected, and `NotAStream` both ways.
pub async fn async_caller_reads_streams(caller: &Global) {
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
}

/// `#[callback]` fns (iterator and `Stream`) and a group's method stream what they return.
pub fn callback_fns_and_methods(g: &Global) {
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

/// An endless stream read slowly for 10 items: the producer stayed within its credit;
/// dropped, it stops.
pub fn dropped_stream_stops_its_producer(g: &Global, worker: &str) {
    let mut items = g
        .call("endless")
        .on(worker)
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
    let ahead = produced_on(g, worker);
    assert!(
        (10..=WINDOW).contains(&ahead),
        "produced {ahead} items for a reader of 10 with a credit of {WINDOW}"
    );
    drop(items);
    let at_drop = dropped_on(g, worker).expect("the iterator was dropped");
    assert!(
        (ahead..=WINDOW).contains(&at_drop),
        "produced {at_drop} items by the drop, beyond its credit"
    );
}

/// The worker killed (by `kill`) mid-stream: the stream ends with `PeerDisconnected`
/// within `bound`. Returns how long it took.
pub fn killed_callee_ends_the_stream(
    g: &Global,
    worker: &str,
    kill: impl FnOnce(),
    bound: Duration,
) -> Duration {
    let mut items = g
        .call("endless")
        .on(worker)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    assert_eq!(items.next().expect("an item").expect("item"), 1);
    let killed = Instant::now();
    kill();
    let error = items
        .by_ref()
        .find_map(Result::err)
        .expect("the stream ends with an error");
    let after = killed.elapsed();
    match error {
        Error::PeerDisconnected { process, callback } => {
            assert_eq!((process.as_str(), callback.as_str()), (worker, "endless"));
        }
        other => panic!("expected PeerDisconnected, got {other:?}"),
    }
    assert!(after < bound, "ended {after:?} after the kill");
    assert!(items.next().is_none(), "nothing after the error");
    after
}

/// A reader that stops after one item: 200 calls and a 1,000-item stream to the same
/// worker still complete, and the stuck producer stays within its credit.
pub fn stuck_reader_beside_other_calls(g: &Global, worker: &str) {
    let mut stuck = g
        .call("endless")
        .on(worker)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    assert_eq!(stuck.next().expect("an item").expect("item"), 1);
    // The reader stops here; its producer waits for credit. Calls and another stream
    // to the same node go on.
    sync_adds_succeed(g, worker, 200);
    let total: u64 = g
        .call("count_sync")
        .args((1_000u64,))
        .on(worker)
        .timeout(WAIT)
        .stream::<u64>()
        .expect("stream")
        .into_iter()
        .map(|item| item.expect("item"))
        .sum();
    assert_eq!(total, 1_000 * 1_001 / 2);
    assert!(produced_on(g, worker) <= WINDOW);
    drop(stuck);
}

/// A stream with a 300 ms `timeout` whose fourth item never comes: `Timeout` after it.
pub fn timeout_bounds_the_wait_for_each_item(g: &Global) {
    let timeout = Duration::from_millis(300);
    let mut items = g
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
