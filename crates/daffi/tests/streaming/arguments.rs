//! The argument streams the tests share, whatever the mesh (`tests/client_streams.rs`
//! over the controller, `tests/nats_streams.rs` over NATS): callbacks taking an
//! `Incoming` (served by every node of a binary that includes this module), and cases.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::common::WAIT;
use daffi::{callback, Global, Incoming};
use futures_util::StreamExt;

/// The credit a callee grants at first, in items (`STREAM_WINDOW` in the protocol doc;
/// these items are far below its bytes).
pub const WINDOW: u64 = 4096;

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
    // The first window at most (items are pulled only with credit for them).
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(
        (3..=WINDOW).contains(&pulled),
        "pulled {pulled} items for a callee that read 3, with a credit of {WINDOW}"
    );
}
