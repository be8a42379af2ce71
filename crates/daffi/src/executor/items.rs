//! Sending a stream's items (a stream callback's results, or a caller's arguments): as
//! the receiver grants credit, in batches of the items that are ready when the last
//! batch went. Each item is encoded straight into the batch that carries it. An item is
//! never held back waiting for more: a slow producer's items go one by one at once, a
//! fast producer's join in batches (up to `MAX_BATCH_BYTES`) while the one before goes
//! out.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::dispatch::panic_failure;
use super::ItemSink;
use crate::callback::{CallbackFailure, Fill, ItemIter, ItemStream};
use crate::mesh::{Credit, ItemBatch};
use crate::sync::lock;

/// What a producer has next.
enum Next {
    /// Items, within the credit.
    Batch(ItemBatch),
    /// The items ran out, or (`Some`) producing them failed.
    End(Option<CallbackFailure>),
    /// The producer never started (its job was dropped): nothing more to send.
    Gone,
}

/// Where a stream's items come from.
trait Producer {
    /// The items ready now (at least one), counted against `credit`, which allows one.
    fn poll_batch(&mut self, cx: &mut Context<'_>, credit: &mut Credit) -> Poll<Next>;
    /// The sender now holds `credit`: the producer may make that much.
    fn allow(&mut self, credit: Credit);
}

/// Sends the items of an async stream (an async stream callback's results, or a
/// caller's arguments) as the receiving end grants credit; the stream is dropped as
/// soon as the receiving end cancels or goes, even while it waits for an item.
pub async fn send_items(items: Result<ItemStream, CallbackFailure>, sink: Box<dyn ItemSink>) {
    match items {
        Ok(items) => drive(AsyncItems { items, end: None }, sink).await,
        Err(failure) => sink.end(Some(failure)).await,
    }
}

/// Sends what a sync iterator makes on its thread (see [`thread_items`]).
pub(super) async fn send_thread_items(items: ThreadItems, sink: Box<dyn ItemSink>) {
    drive(items, sink).await;
}

/// Sends what `items` makes, then ends the stream (unless the receiving end cancelled
/// or went).
async fn drive(mut items: impl Producer, sink: Box<dyn ItemSink>) {
    if let Some(end) = send_all(&mut items, &*sink).await {
        sink.end(end).await;
    }
}

/// Takes credit, then sends each batch of what `items` has ready, until they end
/// (`Some`, how) or the receiving end cancels or goes (`None`).
async fn send_all(
    items: &mut impl Producer,
    sink: &dyn ItemSink,
) -> Option<Option<CallbackFailure>> {
    let mut credit = Credit::default();
    let mut cancelled = sink.cancelled();
    loop {
        if !credit.allows_one() {
            credit = sink.credit(credit).await?;
            items.allow(credit);
        }
        let next = tokio::select! {
            next = poll_fn(|cx| items.poll_batch(cx, &mut credit)) => next,
            () = &mut cancelled => return None,
        };
        match next {
            Next::Batch(batch) => {
                if !sink.send(batch).await {
                    return None;
                }
            }
            Next::End(failure) => return Some(failure),
            Next::Gone => return None,
        }
    }
}

/// An async stream's items; a panic while polling becomes its failure.
struct AsyncItems {
    items: ItemStream,
    /// How the items ended, once they did, to send after the last batch.
    end: Option<Option<CallbackFailure>>,
}

impl AsyncItems {
    /// Adds the next item to `batch` if it is ready; `false` once none is ready, or
    /// the items ended.
    fn poll_one(&mut self, cx: &mut Context<'_>, batch: &mut ItemBatch) -> bool {
        let polled = catch_unwind(AssertUnwindSafe(|| self.items.poll_next_into(cx, batch)))
            .unwrap_or_else(|p| Poll::Ready(Some(Err(panic_failure(p)))));
        match polled {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(()))) => true,
            Poll::Ready(Some(Err(failure))) => {
                self.end = Some(Some(failure));
                false
            }
            Poll::Ready(None) => {
                self.end = Some(None);
                false
            }
        }
    }
}

impl Producer for AsyncItems {
    fn poll_batch(&mut self, cx: &mut Context<'_>, credit: &mut Credit) -> Poll<Next> {
        let mut batch = ItemBatch::default();
        while self.end.is_none() && credit.allows_one() && batch.has_room() {
            let before = batch.item_bytes();
            if !self.poll_one(cx, &mut batch) {
                break;
            }
            credit.take(batch.item_bytes() - before);
        }
        if !batch.is_empty() {
            return Poll::Ready(Next::Batch(batch));
        }
        match self.end.take() {
            Some(end) => Poll::Ready(Next::End(end)),
            None => Poll::Pending,
        }
    }

    /// An async stream is polled only while there is credit.
    fn allow(&mut self, _credit: Credit) {}
}

/// The two halves of a sync iterator's items: the thread that runs the iterator
/// encodes them into the batch the two share ([`ThreadFeed`]), a task takes the batch
/// and sends it ([`ThreadItems`], with [`send_thread_items`]). The thread advances the
/// iterator only as far as the credit the task holds.
pub(super) fn thread_items() -> (ThreadFeed, ThreadItems) {
    let handoff = Arc::new(Handoff::default());
    (ThreadFeed(handoff.clone()), ThreadItems { handoff })
}

#[derive(Default)]
struct Handoff {
    state: Mutex<HandoffState>,
    /// Wakes the thread waiting for credit (or to hear that the sender stopped).
    room: Condvar,
}

#[derive(Default)]
struct HandoffState {
    /// Batches of items made, not yet taken by the sender; the last one fills while
    /// it has room (it is out on the thread while an item joins it).
    ready: VecDeque<ItemBatch>,
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
}

impl Producer for ThreadItems {
    fn poll_batch(&mut self, cx: &mut Context<'_>, credit: &mut Credit) -> Poll<Next> {
        let mut state = lock(&self.handoff.state);
        if let Some(batch) = state.ready.pop_front() {
            drop(state);
            batch.charge(credit);
            return Poll::Ready(Next::Batch(batch));
        }
        if let Some(end) = state.end.take() {
            return Poll::Ready(Next::End(end));
        }
        if state.done {
            return Poll::Ready(Next::Gone);
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            waker => *waker = Some(cx.waker().clone()),
        }
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
    /// Runs `items` on this thread, each item joining the shared batch as soon as it is
    /// made, as far as the credit allows; stops once the sender is gone.
    pub(super) fn run(self, items: Result<ItemIter, CallbackFailure>) {
        let mut items = match items {
            Ok(items) => items,
            Err(failure) => return self.finish(Some(failure)),
        };
        let mut room = self.wait_for_room();
        while room {
            let mut lend = Lend {
                handoff: &self.0,
                room: false,
            };
            let next = catch_unwind(AssertUnwindSafe(|| items.next_into(&mut lend)))
                .unwrap_or_else(|p| Some(Err(panic_failure(p))));
            match next {
                None => return self.finish(None),
                Some(Err(failure)) => return self.finish(Some(failure)),
                Some(Ok(())) => {}
            }
            room = lend.room || self.wait_for_room();
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

    fn finish(&self, end: Option<CallbackFailure>) {
        let mut state = lock(&self.0.state);
        state.end = Some(end);
        state.done = true;
        wake_sender(state);
    }
}

impl Drop for ThreadFeed {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.done = true;
        wake_sender(state);
    }
}

/// Lends the thread the batch still filling while it encodes one item into it (or a
/// new one, if it is full): the lock is not held meanwhile, so the sender never waits
/// on an encoding (it takes the batches before it, or is woken when the item joined).
struct Lend<'a> {
    handoff: &'a Handoff,
    /// Whether the credit allowed another item when the batch went back (then the
    /// thread need not look again).
    room: bool,
}

impl Fill for Lend<'_> {
    fn fill(
        &mut self,
        add: &mut dyn FnMut(&mut ItemBatch) -> Result<(), CallbackFailure>,
    ) -> Result<(), CallbackFailure> {
        let batch = {
            let mut state = lock(&self.handoff.state);
            if state.ready.back().is_some_and(ItemBatch::has_room) {
                state.ready.pop_back().unwrap_or_default()
            } else {
                ItemBatch::default()
            }
        };
        let mut lent = Lent {
            handoff: self.handoff,
            room: &mut self.room,
            before: (batch.items(), batch.item_bytes()),
            batch,
        };
        add(&mut lent.batch)
    }
}

/// The shared batch while lent: dropped (even by a panic while encoding), it goes
/// back, its new item counted against the thread's credit.
struct Lent<'a> {
    handoff: &'a Handoff,
    /// Set to whether the credit allows another item, once the batch is back.
    room: &'a mut bool,
    batch: ItemBatch,
    /// Its items and their bytes when lent.
    before: (u32, usize),
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        let added = batch.items() > self.before.0;
        let len = batch.item_bytes() - self.before.1;
        if !added && batch.is_empty() {
            return;
        }
        let mut state = lock(&self.handoff.state);
        state.ready.push_back(batch);
        if added {
            state.credit.take(len);
        }
        *self.room = !state.stopped && state.credit.allows_one();
        wake_sender(state);
    }
}

/// Wakes the sender if it waits for items, once the lock is released.
fn wake_sender(mut state: MutexGuard<'_, HandoffState>) {
    let waker = state.waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}
