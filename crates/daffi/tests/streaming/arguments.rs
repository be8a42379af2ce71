//! The argument streams the tests share, whatever the mesh (`tests/client_streams.rs`
//! over the controller, `tests/nats_streams.rs` over NATS): callbacks taking an
//! `Incoming` (served by every node of a binary that includes this module), and cases.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::common::{Log, WAIT};
use daffi::{callback, Global, Incoming};
use futures_util::StreamExt;

/// The credit a callee grants at first (`STREAM_WINDOW` in the protocol doc).
const WINDOW: u64 = 32;

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

/// An endless stream of 1, 2, 3, ... that counts how many items were pulled from it and
/// says when it is dropped.
pub struct Counted {
    pulled: Arc<AtomicU64>,
    dropped: std::sync::mpsc::Sender<()>,
}

impl Counted {
    pub fn new() -> (Counted, Arc<AtomicU64>, std::sync::mpsc::Receiver<()>) {
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

/// Both ways at once: `n` items fed to `doubled` on `worker` come back doubled, in order.
pub fn both_ways_doubled_in_order(g: &Global, worker: &str, n: i64) {
    let back: Vec<i64> = g
        .call("doubled")
        .on(worker)
        .stream_from(futures_util::stream::iter(1..=n))
        .timeout(WAIT)
        .stream::<i64>()
        .expect("stream")
        .into_iter()
        .map(|item| item.expect("item"))
        .collect();
    assert_eq!(back, (1..=n).map(|n| n * 2).collect::<Vec<i64>>());
}

/// A callee that reads 3 items and returns: the caller's endless feed is dropped,
/// having been pulled no further than the callee's credit.
pub fn returning_early_stops_the_feeding(g: &Global, worker: &str) {
    let (items, pulled, dropped) = Counted::new();
    let read: Vec<u64> = g
        .call("first")
        .on(worker)
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

/// A feeder's part: feeds `watch` on `target` three items, then waits for ever (to be
/// killed).
pub fn feed_watch_until_killed(g: &Global, target: &str) {
    g.wait_process_timeout(target, WAIT)
        .expect("the worker is known");
    let items = futures_util::stream::iter(1..=3u64).chain(futures_util::stream::pending());
    let outcome = g.call("watch").on(target).stream_from(items).fg::<u64>();
    panic!("the feeder was to be killed, not to end: {outcome:?}");
}

/// The `feeder` (feeding `watch` on `worker`) killed by `kill` once `watch` reads: the
/// callee's `Incoming` ends with `PeerDisconnected` naming it within `bound`, and the
/// callee serves on. Returns how long it took.
pub fn killed_feeder_ends_the_callees_incoming(
    g: &Global,
    worker: &str,
    feeder: &str,
    kill: impl FnOnce(),
    bound: Duration,
) -> Duration {
    let watched: u64 = g
        .call("watched")
        .args((WAIT.as_millis() as u64,))
        .on(worker)
        .timeout(WAIT * 2)
        .fg()
        .expect("watched");
    assert!(watched >= 1, "the callee reads the feeder's items");
    let killed = Instant::now();
    kill();
    let (how, ms_ago): (String, u64) = g
        .call("watch_ended")
        .args((WAIT.as_millis() as u64,))
        .on(worker)
        .timeout(WAIT * 2)
        .fg::<Option<(String, u64)>>()
        .expect("watch_ended")
        .expect("the callee's Incoming ended");
    assert!(
        how.starts_with("PeerDisconnected") && how.contains(feeder),
        "ended with {how}"
    );
    let after = killed
        .elapsed()
        .saturating_sub(Duration::from_millis(ms_ago));
    assert!(after < bound, "ended {after:?} after the kill");
    // The callee serves other calls as before.
    let sum: i64 = g
        .call("sync_add")
        .args((2, 3))
        .on(worker)
        .timeout(WAIT)
        .fg()
        .expect("sync_add");
    assert_eq!(sum, 5);
    after
}
