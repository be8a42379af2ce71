//! Sending a stream's items (a stream callback's results, or a caller's arguments): as
//! the receiver grants credit, in batches of the items that are ready when the last
//! batch went. An item is never held back waiting for more: a slow producer's items
//! go one by one at once, a fast producer's join in batches (up to
//! [`MAX_BATCH_BYTES`](crate::mesh::MAX_BATCH_BYTES)) while the one before goes out.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use daffi_wire::Payload;

use super::dispatch::panic_failure;
use super::ItemSink;
use crate::callback::{CallbackFailure, ItemIter, ItemStream, Outcome};
use crate::mesh::{Credit, ItemBatch};
use crate::sync::lock;

/// What a producer has next.
enum Next {
    Item(Payload),
    /// The items ran out, or (`Some`) producing them failed.
    End(Option<CallbackFailure>),
    /// The producer never started (its job was dropped): nothing more to send.
    Gone,
}

/// Where a stream's items come from.
trait Producer {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next>;
    /// The sender now holds `credit`: the producer may make that much.
    fn allow(&mut self, credit: Credit);
}

/// Sends the items of an async stream (an async stream callback's results, or a
/// caller's arguments) as the receiving end grants credit; the stream is dropped as
/// soon as the receiving end cancels or goes, even while it waits for an item.
pub async fn send_items(items: Result<ItemStream, CallbackFailure>, sink: Box<dyn ItemSink>) {
    match items {
        Ok(items) => drive(AsyncItems(items), sink).await,
        Err(failure) => sink.end(Some(failure)).await,
    }
}

/// Sends what a sync iterator makes on its thread (see [`thread_items`]).
pub(super) async fn send_thread_items(items: ThreadItems, sink: Box<dyn ItemSink>) {
    drive(items, sink).await;
}

/// Takes credit, then sends each batch of what `items` has ready, until they end or
/// the receiving end cancels.
async fn drive(mut items: impl Producer, mut sink: Box<dyn ItemSink>) {
    let mut credit = Credit::default();
    loop {
        if !credit.allows_one() {
            let Some(taken) = sink.credit(credit).await else {
                return; // cancelled, or gone
            };
            credit = taken;
            items.allow(credit);
        }
        let first = tokio::select! {
            next = poll_fn(|cx| items.poll_next(cx)) => next,
            () = sink.cancelled() => return,
        };
        let mut batch = ItemBatch::default();
        let mut next = first;
        let end = loop {
            match next {
                Next::Item(item) => {
                    credit.take(item.len());
                    batch.push(item);
                }
                Next::End(failure) => break Some(failure),
                Next::Gone => break None,
            }
            if !credit.allows_one() || !batch.has_room() {
                break None;
            }
            match poll_fn(|cx| Poll::Ready(items.poll_next(cx))).await {
                Poll::Ready(more) => next = more,
                Poll::Pending => break None,
            }
        };
        if batch.is_empty() && end.is_none() {
            return; // the producer never started
        }
        if !batch.is_empty() && !sink.send(batch).await {
            return;
        }
        if let Some(failure) = end {
            return sink.end(failure).await;
        }
    }
}

/// An async stream's items; a panic while polling becomes its failure.
struct AsyncItems(ItemStream);

impl Producer for AsyncItems {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        let polled = catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll_next(cx)))
            .unwrap_or_else(|p| Poll::Ready(Some(Err(panic_failure(p)))));
        polled.map(|item| match item {
            None => Next::End(None),
            Some(Err(failure)) => Next::End(Some(failure)),
            Some(Ok(item)) => Next::Item(item),
        })
    }

    /// An async stream is polled only while there is credit.
    fn allow(&mut self, _credit: Credit) {}
}

/// The two halves of a sync iterator's items: the thread that runs the iterator hands
/// them over ([`ThreadFeed`]), a task sends them ([`ThreadItems`], with
/// [`send_thread_items`]). The thread advances the iterator only as far as the credit
/// the task holds.
pub(super) fn thread_items() -> (ThreadFeed, ThreadItems) {
    let handoff = Arc::new(Handoff::default());
    let items = ThreadItems {
        handoff: handoff.clone(),
        taken: VecDeque::new(),
    };
    (ThreadFeed(handoff), items)
}

#[derive(Default)]
struct Handoff {
    state: Mutex<HandoffState>,
    /// Wakes the thread waiting for credit (or to hear that the sender stopped).
    room: Condvar,
}

#[derive(Default)]
struct HandoffState {
    /// Items made, not yet taken by the sender.
    queue: VecDeque<Payload>,
    /// How the items ended, until the sender takes it.
    end: Option<Option<CallbackFailure>>,
    /// The thread is done: it ended the items, or never ran them.
    done: bool,
    /// What the thread may still make.
    credit: Credit,
    /// The sender is gone: make no more.
    stopped: bool,
    /// The sender waiting for the next item.
    waker: Option<Waker>,
}

/// The sending task's half of a [`thread_items`] handoff.
pub(super) struct ThreadItems {
    handoff: Arc<Handoff>,
    /// Items taken from the handoff together (one lock for all), not yet sent.
    taken: VecDeque<Payload>,
}

impl Producer for ThreadItems {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        if let Some(item) = self.taken.pop_front() {
            return Poll::Ready(Next::Item(item));
        }
        let mut state = lock(&self.handoff.state);
        std::mem::swap(&mut state.queue, &mut self.taken);
        if let Some(item) = self.taken.pop_front() {
            return Poll::Ready(Next::Item(item));
        }
        if let Some(end) = state.end.take() {
            return Poll::Ready(Next::End(end));
        }
        if state.done {
            return Poll::Ready(Next::Gone);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn allow(&mut self, credit: Credit) {
        // The sender asks for credit only once it sent all the thread made: both count
        // the same items, so this is the thread's credit too.
        lock(&self.handoff.state).credit = credit;
        self.handoff.room.notify_one();
    }
}

impl Drop for ThreadItems {
    fn drop(&mut self) {
        lock(&self.handoff.state).stopped = true;
        self.handoff.room.notify_one();
    }
}

/// The producing thread's half of a [`thread_items`] handoff.
pub(super) struct ThreadFeed(Arc<Handoff>);

impl ThreadFeed {
    /// Runs `items` on this thread, handing each item over as soon as it is made, as
    /// far as the credit allows; stops once the sender is gone.
    pub(super) fn run(self, items: Result<ItemIter, CallbackFailure>) {
        let mut items = match items {
            Ok(items) => items,
            Err(failure) => return self.finish(Some(failure)),
        };
        while self.wait_for_room() {
            let next: Option<Outcome> = catch_unwind(AssertUnwindSafe(|| items.next()))
                .unwrap_or_else(|p| Some(Err(panic_failure(p))));
            match next {
                None => return self.finish(None),
                Some(Err(failure)) => return self.finish(Some(failure)),
                Some(Ok(item)) => self.hand_over(item),
            }
        }
    }

    /// Waits until the credit allows another item; `false` once the sender is gone.
    fn wait_for_room(&self) -> bool {
        let mut state = lock(&self.0.state);
        loop {
            if state.stopped {
                return false;
            }
            if state.credit.allows_one() {
                return true;
            }
            state = self
                .0
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn hand_over(&self, item: Payload) {
        let waker = {
            let mut state = lock(&self.0.state);
            state.credit.take(item.len());
            state.queue.push_back(item);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn finish(&self, end: Option<CallbackFailure>) {
        let waker = {
            let mut state = lock(&self.0.state);
            state.end = Some(end);
            state.done = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for ThreadFeed {
    fn drop(&mut self) {
        let waker = {
            let mut state = lock(&self.0.state);
            state.done = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}
