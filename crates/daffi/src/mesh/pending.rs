//! Calls this node made that still wait for their reply: the table the mesh completes
//! them through, and the [`Waiter`] a caller awaits.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use daffi_wire::frame::FLAG_REPLY_BATCH;
use daffi_wire::{Frame, KeptBuffer, Kind};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::Error;
use crate::transport::{SharedReads, Taken};

/// Calls waiting on one table from which a new request leaves with others, not alone
/// ([`Waiter::among_many`]): with this many replies on their way, the writer has company
/// for it soon, and one write of many frames costs each of the three processes less than
/// a write of one followed by a write of the rest.
pub const MANY_IN_FLIGHT: usize = 16;

/// What a waiting call eventually receives.
pub type Completion = Result<ReplyPayload, Error>;

/// A reply's payload, with its reader's hold on the buffer when the reader keeps it for
/// the next large frame: a result that takes the buffer over ends the hold first.
#[derive(Debug)]
pub struct ReplyPayload {
    /// The encoded result.
    pub bytes: Bytes,
    /// See [`KeptBuffer`].
    pub kept: Option<KeptBuffer>,
}

impl From<Bytes> for ReplyPayload {
    fn from(bytes: Bytes) -> Self {
        ReplyPayload { bytes, kept: None }
    }
}

impl From<Frame> for ReplyPayload {
    fn from(frame: Frame) -> Self {
        let (bytes, kept) = frame.into_payload();
        ReplyPayload { bytes, kept }
    }
}

/// The calls replies answered, each with its reply; and the replies that answered none
/// (a call that no longer waits: `Some` reply; one made to another node: `None`).
pub type TakenReplies<T> = (Vec<(Entry, T)>, Vec<(u64, Option<T>)>);

/// One waiting call.
pub struct Entry {
    /// The node the request went to.
    pub target: Arc<str>,
    /// The callback called.
    pub callback: Arc<str>,
    /// Where its completion goes.
    pub done: oneshot::Sender<Completion>,
}

/// The calls in flight on one connection, keyed by call id. Once the connection is
/// gone the table is closed: every waiting call is failed, and no new call can wait on it.
#[derive(Default)]
pub struct Pending {
    next_id: AtomicU64,
    table: Mutex<Table>,
    own_replies: Option<OwnReplies>,
}

/// Where a thread that spins for the reply to its call may read the reply itself (see
/// [`SharedReads`]), and what completes a call with a reply read there.
struct OwnReplies {
    reads: Arc<SharedReads>,
    /// The largest frame the connection takes: a larger one is the reader's to refuse.
    max_frame_size: usize,
    /// What the connection's reader does with a reply.
    complete: fn(&Pending, Frame),
}

impl Pending {
    /// A table for a new connection whose call ids follow those of `previous` (the
    /// last connection's): a late reply to a call made on the old connection, which a
    /// peer sends to this node by name, can then never complete a new call.
    pub fn following(previous: &Pending) -> Pending {
        Pending {
            next_id: AtomicU64::new(previous.next_id.load(Ordering::Relaxed)),
            table: Mutex::default(),
            own_replies: None,
        }
    }

    /// Lets a thread that spins for one of these calls read its reply from `reads`
    /// (frames of at most `max_frame_size`), completed with `complete` as the reader
    /// does ([`Waiter::own_reply`]). Without `reads` (TLS), nothing changes.
    pub fn with_own_replies(
        mut self,
        reads: Option<Arc<SharedReads>>,
        max_frame_size: usize,
        complete: fn(&Pending, Frame),
    ) -> Pending {
        self.own_replies = reads.map(|reads| OwnReplies {
            reads,
            max_frame_size,
            complete,
        });
        self
    }
}

#[derive(Default)]
struct Table {
    calls: HashMap<u64, Entry, BuildHasherDefault<CallIdHasher>>,
    /// Stream calls whose items still come, by the same ids.
    streams: HashMap<u64, StreamEntry, BuildHasherDefault<CallIdHasher>>,
    closed: bool,
}

/// The items of one stream, in order, as they arrived; the channel closes after the
/// last one, and an `Err` ends the stream. Credit, counted as they arrive, bounds how
/// many wait here.
pub type StreamItems = mpsc::UnboundedReceiver<Result<Arrived, Error>>;

/// The items of one stream message: one, or a batch (slices of its payload).
#[derive(Debug)]
pub enum Arrived {
    /// One item.
    One(ReplyPayload),
    /// Several items, in order.
    Batch(super::BatchItems),
}

impl Arrived {
    /// The items of a message's `payload`, a batch if `batched`; `Err` says why a
    /// batch is malformed.
    pub fn new(payload: ReplyPayload, batched: bool) -> Result<Arrived, String> {
        if !batched {
            return Ok(Arrived::One(payload));
        }
        Ok(Arrived::Batch(super::BatchItems::new(payload.bytes)?))
    }

    /// Counts these items against `credit`; `false` if it does not cover them.
    pub fn charge(&self, credit: &mut super::Credit) -> bool {
        match self {
            Arrived::One(item) => credit.take(item.bytes.len()),
            Arrived::Batch(items) => items.charge(credit),
        }
    }
}

/// What one stream message of the NATS backend carries: whole items, a part of one
/// item too large for a message (its parts come in order, nothing between them), or
/// the end.
#[cfg(feature = "nats")]
#[derive(Debug)]
pub enum Received {
    /// Whole items.
    Items(Arrived),
    /// A part of an item of `size` bytes.
    Part {
        /// This part's bytes.
        part: Bytes,
        /// The whole item's size, which every part gives.
        size: usize,
    },
    /// The items ran out.
    End,
}

/// Why a NATS stream message does not follow the one before.
#[cfg(feature = "nats")]
#[derive(Debug, PartialEq, Eq)]
pub enum Misfit {
    /// It is malformed (parts that do not fit together): a protocol violation.
    Malformed(String),
    /// Messages before it were lost on the way (a NATS server was lost meanwhile).
    Lost {
        /// Messages lost.
        messages: u64,
    },
}

/// What became of a stream's message.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Its items wait for the reader.
    Delivered,
    /// Nobody awaits that stream any more: the items are dropped.
    Dropped,
    /// Its sender sent past the credit it was granted: the stream is ended with a
    /// protocol error (the sender is to be told to stop).
    Overrun,
}

/// One stream whose items still come: where they go, and the credit its sender has
/// left (counted as they arrive, so that a sender that ignores it is caught before its
/// items pile up).
pub struct StreamSlot {
    items: mpsc::UnboundedSender<Result<Arrived, Error>>,
    credit: super::Credit,
    /// The item whose parts are arriving (NATS), until it is whole.
    #[cfg(feature = "nats")]
    joining: Option<super::Joining>,
    /// Messages taken so far (NATS): the sequence number the next one must carry.
    #[cfg(feature = "nats")]
    messages: u64,
}

impl StreamSlot {
    /// A stream's slot with the first window of credit, and where its items arrive.
    pub fn open() -> (StreamSlot, StreamItems) {
        let (items, rx) = mpsc::unbounded_channel();
        let credit = super::Credit::WINDOW;
        let slot = StreamSlot {
            items,
            credit,
            #[cfg(feature = "nats")]
            joining: None,
            #[cfg(feature = "nats")]
            messages: 0,
        };
        (slot, rx)
    }

    /// Takes the message `seq` of the stream (counted from 0): the items it completes,
    /// its own or (a part) the item it makes whole; `None` while an item's parts still
    /// come, and for the end. `Err` if messages before it were lost, or it does not fit.
    #[cfg(feature = "nats")]
    pub fn take(&mut self, seq: u64, received: Received) -> Result<Option<Arrived>, Misfit> {
        if seq != self.messages {
            let messages = seq.saturating_sub(self.messages);
            return Err(if messages > 0 {
                Misfit::Lost { messages }
            } else {
                Misfit::Malformed(format!("message {seq} came again, or out of order"))
            });
        }
        self.messages += 1;
        match received {
            Received::Items(_) | Received::End if self.joining.is_some() => Err(Misfit::Malformed(
                "an item's parts were cut short by another message".into(),
            )),
            Received::Items(arrived) => Ok(Some(arrived)),
            Received::End => Ok(None),
            Received::Part { part, size } => {
                let whole = super::Joining::join(&mut self.joining, part, size)
                    .map_err(Misfit::Malformed)?;
                Ok(whole.map(|item| Arrived::One(ReplyPayload::from(item))))
            }
        }
    }

    /// Hands `arrived` to the reader, if its sender had the credit; else `overrun`
    /// builds the error that ends the stream.
    pub fn deliver(&mut self, arrived: Arrived, overrun: impl FnOnce() -> Error) -> Delivery {
        if !arrived.charge(&mut self.credit) {
            self.fail(overrun());
            return Delivery::Overrun;
        }
        match self.items.send(Ok(arrived)) {
            Ok(()) => Delivery::Delivered,
            Err(_) => Delivery::Dropped,
        }
    }

    /// The reader granted `grant` more.
    pub fn grant(&mut self, grant: super::Grant) {
        self.credit.add(grant);
    }

    /// Ends the stream with `error`.
    pub fn fail(&self, error: Error) {
        let _ = self.items.send(Err(error));
    }
}

/// One stream call whose items still come.
pub struct StreamEntry {
    /// The node producing the items.
    pub target: Arc<str>,
    /// The callback called.
    pub callback: Arc<str>,
    slot: StreamSlot,
}

/// Hashes a call id with one multiplication: the ids are this node's own counter, not
/// input from the network, so the table needs spread, not SipHash's resistance to
/// chosen keys (which costs more than the rest of an insert).
#[derive(Default)]
struct CallIdHasher(u64);

impl Hasher for CallIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing: consecutive ids land far apart in every bit.
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Pending {
    /// Records a call to `callback` on `target`; returns its id and the receiver of its
    /// completion, or `None` once the table is closed.
    #[cfg(test)]
    pub fn insert(
        &self,
        target: Arc<str>,
        callback: Arc<str>,
    ) -> Option<(u64, oneshot::Receiver<Completion>)> {
        self.insert_counted(target, callback)
            .map(|(id, rx, _)| (id, rx))
    }

    /// Records a call to `callback` on `target`; returns its id, the receiver of its
    /// completion and how many calls waited before it, or `None` once the table is
    /// closed.
    fn insert_counted(
        &self,
        target: Arc<str>,
        callback: Arc<str>,
    ) -> Option<(u64, oneshot::Receiver<Completion>, usize)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (done, rx) = oneshot::channel();
        let mut table = self.lock();
        if table.closed {
            return None;
        }
        let entry = Entry {
            target,
            callback,
            done,
        };
        let waiting = table.calls.len();
        table.calls.insert(id, entry);
        Some((id, rx, waiting))
    }

    /// Records a call to `callback` on `target`, and returns what waits on it until
    /// `timeout` (if any) from now; `None` once the table is closed. `callback` names the
    /// call in a `Timeout` error.
    pub fn wait(
        self: &Arc<Self>,
        target: Arc<str>,
        callback: Arc<str>,
        timeout: Option<Duration>,
    ) -> Option<Waiter> {
        let (call_id, done, waiting) = self.insert_counted(target, callback.clone())?;
        let deadline = timeout.map(|t| Instant::now() + t);
        Some(Waiter {
            pending: self.clone(),
            call_id,
            among_many: waiting >= MANY_IN_FLIGHT,
            done,
            callback,
            timeout,
            timer: sleep_until(deadline),
            completed: false,
            slot: None,
            #[cfg(feature = "nats")]
            credit: None,
        })
    }

    /// Records a stream call to `callback` on `target`; returns its id and where its
    /// items arrive, or `None` once the table is closed.
    pub fn open_stream(&self, target: Arc<str>, callback: Arc<str>) -> Option<(u64, StreamItems)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (slot, rx) = StreamSlot::open();
        let mut table = self.lock();
        if table.closed {
            return None;
        }
        let entry = StreamEntry {
            target,
            callback,
            slot,
        };
        table.streams.insert(id, entry);
        Some((id, rx))
    }

    /// Hands the items that arrived to stream `id`. A sender past its credit ends the
    /// stream with a protocol error (and the stream leaves the table).
    pub fn stream_items(&self, id: u64, arrived: Arrived) -> Delivery {
        let mut table = self.lock();
        let Some(entry) = table.streams.get_mut(&id) else {
            return Delivery::Dropped;
        };
        let (target, callback) = (&entry.target, &entry.callback);
        let delivery = entry
            .slot
            .deliver(arrived, || overrun(target, callback, "results"));
        if delivery == Delivery::Overrun {
            table.streams.remove(&id);
        }
        delivery
    }

    /// Takes message `seq` of stream `id` (see [`StreamSlot::take`]); nothing for a
    /// stream no longer here (its items are dropped).
    #[cfg(feature = "nats")]
    pub fn take_stream_message(
        &self,
        id: u64,
        seq: u64,
        received: Received,
    ) -> Result<Option<Arrived>, Misfit> {
        match self.lock().streams.get_mut(&id) {
            Some(entry) => entry.slot.take(seq, received),
            None => Ok(None),
        }
    }

    /// The caller of stream `id` granted `grant` more.
    pub fn grant_stream(&self, id: u64, grant: super::Grant) {
        if let Some(entry) = self.lock().streams.get_mut(&id) {
            entry.slot.grant(grant);
        }
    }

    /// Ends stream `id`: after its last item, or (`outcome` built from its entry) with
    /// an error. Returns whether it was open.
    pub fn end_stream(&self, id: u64, outcome: impl FnOnce(&StreamEntry) -> Option<Error>) -> bool {
        let Some(entry) = self.lock().streams.remove(&id) else {
            return false;
        };
        if let Some(error) = outcome(&entry) {
            entry.slot.fail(error);
        }
        true
    }

    /// The node call or stream call `id` went to, while it waits.
    pub fn target_of(&self, id: u64) -> Option<Arc<str>> {
        let table = self.lock();
        let call = table.calls.get(&id).map(|e| &e.target);
        call.or_else(|| table.streams.get(&id).map(|s| &s.target))
            .cloned()
    }

    /// Whether the connection this table belongs to is gone.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Takes call `id` out of the table to complete it, if it still waits.
    pub fn take(&self, id: u64) -> Option<Entry> {
        self.lock().calls.remove(&id)
    }

    /// Forgets call `id` (its caller gave up).
    pub fn remove(&self, id: u64) {
        self.lock().calls.remove(&id);
    }

    /// Takes call `id` out of the table to complete it with a reply from `peer`: `Ok`
    /// if it waits and went to `peer`; `Err(true)` if it went to another node (not
    /// `peer`'s to answer: it keeps waiting), `Err(false)` if it no longer waits.
    pub fn take_from(&self, id: u64, peer: &str) -> Result<Entry, bool> {
        match self.lock().calls.entry(id) {
            std::collections::hash_map::Entry::Occupied(entry) if *entry.get().target == *peer => {
                Ok(entry.remove())
            }
            std::collections::hash_map::Entry::Occupied(_) => Err(true),
            std::collections::hash_map::Entry::Vacant(_) => Err(false),
        }
    }

    /// Takes the calls the replies `items` from `peer` answer out of the table, under
    /// one lock: each with its reply, in order. A reply to a call that no longer waits
    /// (its caller gave up), or that is not `peer`'s to answer (a call to another node:
    /// left waiting for its own reply), is in the second list, with `None` for a call
    /// made to another node.
    pub fn take_replies<T>(
        &self,
        peer: &str,
        items: impl Iterator<Item = (u64, T)>,
    ) -> TakenReplies<T> {
        // Sized once: most replies answer a call that waits.
        let mut taken = Vec::with_capacity(items.size_hint().0);
        let mut missed = Vec::new();
        let table = &mut *self.lock();
        for (id, item) in items {
            // One look-up per reply: the entry found is the one taken.
            match table.calls.entry(id) {
                std::collections::hash_map::Entry::Occupied(entry)
                    if *entry.get().target == *peer =>
                {
                    taken.push((entry.remove(), item));
                }
                std::collections::hash_map::Entry::Occupied(_) => missed.push((id, None)),
                std::collections::hash_map::Entry::Vacant(_) => missed.push((id, Some(item))),
            }
        }
        (taken, missed)
    }

    /// Fails every call waiting on `target`: it disconnected, or (`stopped`) it stopped
    /// before finishing them.
    pub fn fail_target(&self, target: &str, stopped: bool) {
        self.fail_target_with(target, |target, callback| {
            let (process, callback) = (target.to_string(), callback.to_string());
            if stopped {
                Error::PeerStopped { process, callback }
            } else {
                Error::PeerDisconnected { process, callback }
            }
        });
    }

    /// Fails every call (and stream) waiting on `target` with the error `error` makes of
    /// the target and the callback.
    pub fn fail_target_with(&self, target: &str, error: impl Fn(&Arc<str>, &Arc<str>) -> Error) {
        let (failed, streams): (Vec<Entry>, Vec<StreamEntry>) = {
            let table = &mut *self.lock();
            let calls = &mut table.calls;
            let ids: Vec<u64> = calls
                .iter()
                .filter(|(_, e)| &*e.target == target)
                .map(|(id, _)| *id)
                .collect();
            let failed = ids.iter().filter_map(|id| calls.remove(id)).collect();
            let streams = &mut table.streams;
            let ids: Vec<u64> = streams
                .iter()
                .filter(|(_, e)| &*e.target == target)
                .map(|(id, _)| *id)
                .collect();
            (
                failed,
                ids.iter().filter_map(|id| streams.remove(id)).collect(),
            )
        };
        for e in failed {
            let _ = e.done.send(Err(error(&e.target, &e.callback)));
        }
        for s in streams {
            s.slot.fail(error(&s.target, &s.callback));
        }
    }

    /// Whether stream call `id` is still open (its items still awaited).
    #[cfg(feature = "nats")]
    pub fn has_stream(&self, id: u64) -> bool {
        self.lock().streams.contains_key(&id)
    }

    /// Forgets stream call `id` (its caller dropped it).
    pub fn remove_stream(&self, id: u64) {
        self.lock().streams.remove(&id);
    }

    /// Closes the table and fails every waiting call with the error `make` builds.
    pub fn close(&self, make: impl Fn() -> Error) {
        self.lock().closed = true;
        self.fail_all(make);
    }

    /// Fails every waiting call with the error `make` builds; new calls may still wait
    /// (a mesh whose replies all come one way, lost and then back).
    pub fn fail_all(&self, make: impl Fn() -> Error) {
        let (failed, streams): (Vec<Entry>, Vec<StreamEntry>) = {
            let table = &mut *self.lock();
            let failed = table.calls.drain().map(|(_, e)| e).collect();
            (failed, table.streams.drain().map(|(_, e)| e).collect())
        };
        for e in failed {
            let _ = e.done.send(Err(make()));
        }
        for s in streams {
            s.slot.fail(make());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        crate::sync::lock(&self.table)
    }
}

/// A node's slots for its own calls in flight (`max_in_flight`): one is taken, and
/// given back, with one atomic operation (a semaphore's permit takes the semaphore's
/// lock to be given back, on every call). A call that finds none waits for one to be
/// given back ([`take`](Self::take)); more than `max` are never held.
#[derive(Debug)]
pub struct Slots {
    used: AtomicUsize,
    max: usize,
    /// Calls waiting in [`take`](Self::take): a slot given back wakes one of them.
    waiting: AtomicUsize,
    freed: tokio::sync::Notify,
}

/// One slot of [`Slots`], given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    /// `max` slots (at least one).
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            used: AtomicUsize::new(0),
            max: max.max(1),
            waiting: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        })
    }

    /// Slots taken now: calls in flight.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.max.saturating_sub(self.used.load(Ordering::SeqCst))
    }

    /// A slot if one is free now.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let mut used = self.used.load(Ordering::SeqCst);
        loop {
            if used >= self.max {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => used = now,
            }
        }
    }

    /// A slot, once one is free. Callers that look at the same time are not served in
    /// order (each takes the first it finds); a wait is bounded by its call's deadline.
    pub async fn take(self: &Arc<Self>) -> Slot {
        loop {
            if let Some(slot) = self.try_take() {
                return slot;
            }
            let freed = self.freed.notified();
            tokio::pin!(freed);
            let _waiting = Waiting::count(&self.waiting);
            // Counted and registered before looking again: a slot given back in between
            // either is found below or wakes this wait.
            freed.as_mut().enable();
            if let Some(slot) = self.try_take() {
                return slot;
            }
            freed.await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.0;
        slots.used.fetch_sub(1, Ordering::SeqCst);
        if slots.waiting.load(Ordering::SeqCst) > 0 {
            slots.freed.notify_one();
        }
    }
}

/// One call counted in [`Slots::waiting`] while it waits (also when its wait is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The error that ends a stream of `what` from `peer` (to or from `callback`) that sent
/// past its credit.
pub fn overrun(peer: &str, callback: &str, what: &str) -> Error {
    Error::protocol(
        peer.to_string(),
        format!("sent more {what} of `{callback}` than it was granted (a protocol violation)"),
    )
}

/// A call whose request is sent: all that is left is its reply (or its deadline). The
/// one thing every caller awaits (FG, BG, broadcast, control requests). It owns what it
/// needs, so it waits wherever it is polled, without a task of its own; dropped, it
/// forgets the call (the reply, if one comes, is discarded).
pub struct Waiter {
    pending: Arc<Pending>,
    call_id: u64,
    /// At least [`MANY_IN_FLIGHT`] other calls waited on the table when this one joined.
    among_many: bool,
    done: oneshot::Receiver<Completion>,
    callback: Arc<str>,
    timeout: Option<Duration>,
    /// The deadline's timer (none without a timeout; it knows the deadline).
    timer: Deadline,
    /// The completion arrived: the call is no longer in the table.
    completed: bool,
    /// The caller's place among `max_in_flight`, held until the reply.
    slot: Option<Slot>,
    /// The call's credit towards its callee, if the mesh keeps one, held until the call
    /// is over.
    #[cfg(feature = "nats")]
    credit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Waiter {
    /// Holds `slot` until the call is over.
    pub fn hold(mut self, slot: Slot) -> Self {
        self.slot = Some(slot);
        self
    }

    /// Holds the mesh's `credit` for this call until the call is over.
    #[cfg(feature = "nats")]
    pub fn hold_credit(mut self, credit: tokio::sync::OwnedSemaphorePermit) -> Self {
        self.credit = Some(credit);
        self
    }

    /// The call's id in its table (the id its reply carries).
    pub fn call_id(&self) -> u64 {
        self.call_id
    }

    /// Whether at least [`MANY_IN_FLIGHT`] other calls were waiting on the same table
    /// when this one was recorded: their replies are on their way, so the request can
    /// wait for the connection's writer to send it with others rather than be written
    /// alone (see `ControllerMesh::cork_if_many`).
    pub fn among_many(&self) -> bool {
        self.among_many
    }

    /// Whether polling would finish at once: the reply is in, or the deadline passed.
    pub fn is_ready(&self) -> bool {
        self.has_reply() || self.timer.deadline().is_some_and(|d| Instant::now() >= d)
    }

    /// Whether the reply (or the call's failure) is in: polling returns it at once,
    /// without the runtime (no timer is polled).
    pub fn has_reply(&self) -> bool {
        !self.done.is_empty()
    }

    /// What lets the thread that waits for this call read its reply itself while it
    /// spins (see [`SharedReads`]); `None` where replies cannot be read that way (TLS,
    /// NATS).
    pub fn own_reply(&self) -> Option<OwnReply> {
        self.pending.own_replies.as_ref()?;
        Some(OwnReply {
            pending: self.pending.clone(),
            call_id: self.call_id,
            step: Cell::new(OwnStep::Idle),
        })
    }
}

/// A call whose reply its spinning thread may read itself: [`Waiter::own_reply`].
pub struct OwnReply {
    pending: Arc<Pending>,
    call_id: u64,
    step: Cell<OwnStep>,
}

/// Where an [`OwnReply`] stands with the connection's reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnStep {
    /// Not looked yet.
    Idle,
    /// The runtime is not woken for the socket: this thread looks for the reply.
    Muted,
    /// The socket is the reader task's again: something else came, or the socket
    /// is closing.
    Released,
}

impl std::fmt::Debug for OwnReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnReply")
            .field("call_id", &self.call_id)
            .field("step", &self.step.get())
            .finish_non_exhaustive()
    }
}

impl OwnReply {
    /// Looks for the reply on the connection, and completes the call with it if it is
    /// the next frame there, whole: whether it did (the waiter's poll then has it). The
    /// first look mutes the runtime's watch on the socket; anything else found there
    /// goes back to the reader task, and the looks end.
    pub fn read(&self) -> bool {
        let Some(own) = &self.pending.own_replies else {
            return false;
        };
        match self.step.get() {
            OwnStep::Released => return false,
            OwnStep::Muted => {}
            OwnStep::Idle => {
                if !own.reads.mute() {
                    self.step.set(OwnStep::Released);
                    return false;
                }
                self.step.set(OwnStep::Muted);
            }
        }
        let call_id = self.call_id;
        let wanted = |frame: &Frame| {
            frame.kind() == Kind::Reply
                && frame.flags() & FLAG_REPLY_BATCH == 0
                && frame.call_id() == call_id
        };
        // Completed before anything behind the reply can be read: the reader task
        // then handles those frames (a departure, the end of the stream) after it.
        let deliver = |frame| (own.complete)(&self.pending, frame);
        match own.reads.take_frame(own.max_frame_size, wanted, deliver) {
            Taken::Frame => {
                self.release(own);
                true
            }
            Taken::Nothing => false,
            Taken::ForReader => {
                self.release(own);
                false
            }
        }
    }

    fn release(&self, own: &OwnReplies) {
        if self.step.replace(OwnStep::Released) == OwnStep::Muted {
            own.reads.release();
        }
    }
}

impl Drop for OwnReply {
    fn drop(&mut self) {
        if let Some(own) = &self.pending.own_replies {
            self.release(own);
        }
    }
}

impl std::future::Future for Waiter {
    type Output = Completion;

    /// The reply, or `Timeout` once the deadline passed. Not to be polled again after
    /// it returned `Ready`.
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        let this = &mut *self;
        // A reply already in is taken without the channel's poll (which counts against
        // the task's cooperative budget, a thread-local look-up, on every call).
        match this.done.try_recv() {
            Ok(completion) => {
                this.completed = true;
                return Poll::Ready(completion);
            }
            Err(oneshot::error::TryRecvError::Closed) => {
                this.completed = true;
                return Poll::Ready(Err(Error::Stopped));
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        if let Poll::Ready(outcome) = std::pin::Pin::new(&mut this.done).poll(cx) {
            // Whoever completed the call took it out of the table already.
            this.completed = true;
            // The completion's sender dropped unsent: the node stopped. (A match, not
            // `unwrap_or`, which builds and drops that error on every call.)
            return Poll::Ready(match outcome {
                Ok(completion) => completion,
                Err(_) => Err(Error::Stopped),
            });
        }
        if std::pin::Pin::new(&mut this.timer).poll(cx).is_ready() {
            return Poll::Ready(Err(Error::timeout(
                this.callback.to_string(),
                this.timeout.unwrap_or_default(),
            )));
        }
        Poll::Pending
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if !self.completed {
            self.pending.remove(self.call_id);
        }
    }
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("call_id", &self.call_id)
            .field("callback", &self.callback)
            .finish_non_exhaustive()
    }
}

/// Sleeps until `deadline`, or forever without one. The timer is allocated only when
/// there is a deadline: a call without one then carries no timer in its future, which
/// keeps that future small (it is moved several times on its way into a sync wait).
pub fn sleep_until(deadline: Option<Instant>) -> Deadline {
    Deadline(deadline.map(|d| Box::pin(tokio::time::sleep_until(d))))
}

/// See [`sleep_until`].
pub struct Deadline(Option<std::pin::Pin<Box<tokio::time::Sleep>>>);

impl Deadline {
    /// When it fires; `None` without a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.0.as_ref().map(|sleep| sleep.deadline())
    }
}

impl std::future::Future for Deadline {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_complete_and_leave_by_id() {
        let pending = Pending::default();
        let ids: Vec<u64> = (0..1000)
            .map(|_| pending.insert("n".into(), "f".into()).expect("open").0)
            .collect();
        for id in ids.iter().step_by(2) {
            pending.remove(*id);
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(pending.take(*id).is_some(), i % 2 == 1, "call {id}");
        }
        assert!(pending.take(ids[1]).is_none(), "taken once");
    }

    #[test]
    fn a_call_is_among_many_once_enough_others_wait() {
        let pending = Arc::new(Pending::default());
        let waiters: Vec<Waiter> = (0..=MANY_IN_FLIGHT)
            .map(|_| pending.wait("n".into(), "f".into(), None).expect("open"))
            .collect();
        let many: Vec<bool> = waiters.iter().map(Waiter::among_many).collect();
        assert!(many[..MANY_IN_FLIGHT].iter().all(|m| !m), "{many:?}");
        assert!(
            many[MANY_IN_FLIGHT],
            "the call after {MANY_IN_FLIGHT} others"
        );
        // Once the others are answered (or given up), a call is alone again.
        drop(waiters);
        let alone = pending.wait("n".into(), "f".into(), None).expect("open");
        assert!(!alone.among_many());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slots_never_pass_their_max_and_a_slot_given_back_wakes_a_waiter() {
        let slots = Slots::new(3);
        let held: Vec<Slot> = (0..3).map(|_| slots.try_take().expect("free")).collect();
        assert!(slots.try_take().is_none(), "a fourth");
        assert_eq!(slots.available(), 0);
        // A wait that is given up forwards nothing it did not take.
        let given_up = tokio::time::timeout(Duration::from_millis(20), slots.take()).await;
        assert!(given_up.is_err(), "no slot was free");
        // 64 tasks share the 3 slots, each holding one for a moment: never more than 3
        // at once, and every task gets one.
        drop(held);
        let most = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (slots, most, now) = (slots.clone(), most.clone(), now.clone());
                tokio::spawn(async move {
                    let slot = slots.take().await;
                    let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(held, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    drop(slot);
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("every task gets a slot")
                .expect("task");
        }
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?} held at once");
        assert_eq!(slots.available(), 3, "all given back");
    }

    #[test]
    fn a_new_connection_never_reuses_the_call_ids_of_the_last() {
        let old = Pending::default();
        let old_ids: Vec<u64> = (0..5)
            .map(|_| old.insert("n".into(), "f".into()).expect("open").0)
            .collect();
        let new = Pending::following(&old);
        let (first, _) = new.insert("n".into(), "f".into()).expect("open");
        assert!(
            old_ids.iter().all(|id| *id < first),
            "{old_ids:?} then {first}"
        );
        // A late reply to an old call finds nothing here.
        assert!(old_ids.iter().all(|id| new.take(*id).is_none()));
    }
}
