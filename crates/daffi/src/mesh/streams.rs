//! The streams a node takes part in, whatever the mesh carries them: those it sends
//! ([`SentStreams`]: a callee's results, a caller's arguments), each waiting on the
//! credit the other end granted and stopping once it cancels or goes, and those it
//! receives as a callee ([`IncomingStreams`]: the arguments for a callback's
//! `Incoming`). A backend keys them by its own name of the peer (a process name, a reply
//! inbox) and the call id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Notify};

use super::pending::{overrun, Delivery, StreamSlot};
use super::{Arrived, Credit, Grant, StreamItems};
use crate::error::Error;
use crate::sync::lock;

/// The streams this node sends now, by the peer they go to and call id: the results
/// it streams to its callers, or (another table) the arguments it streams to its callees.
#[derive(Default)]
pub struct SentStreams(Mutex<HashMap<Arc<str>, PeerStreams>>);

/// One peer's streams, by call id.
type PeerStreams = HashMap<u64, Arc<StreamGate>>;

impl SentStreams {
    /// Records a stream for `caller`'s call `call_id`, with the first window of credit.
    pub fn open(&self, caller: &str, call_id: u64) -> Arc<StreamGate> {
        let gate = Arc::new(StreamGate {
            credit: Mutex::new(Credit::WINDOW),
            granted: Notify::new(),
            cancelled: watch::channel(false).0,
        });
        let mut by_caller = lock(&self.0);
        match by_caller.get_mut(caller) {
            Some(streams) => {
                streams.insert(call_id, gate.clone());
            }
            None => {
                by_caller.insert(Arc::from(caller), HashMap::from([(call_id, gate.clone())]));
            }
        }
        gate
    }

    /// Forgets `caller`'s stream `call_id`; returns it if it was there.
    pub fn close(&self, caller: &str, call_id: u64) -> Option<Arc<StreamGate>> {
        let mut by_caller = lock(&self.0);
        let streams = by_caller.get_mut(caller)?;
        let gate = streams.remove(&call_id);
        if streams.is_empty() {
            by_caller.remove(caller);
        }
        gate
    }

    /// `caller` granted `grant` more to its stream `call_id`.
    pub fn grant(&self, caller: &str, call_id: u64, grant: Grant) {
        let by_caller = lock(&self.0);
        if let Some(gate) = by_caller.get(caller).and_then(|s| s.get(&call_id)) {
            lock(&gate.credit).add(grant);
            gate.granted.notify_one();
        }
    }

    /// `caller` dropped its stream `call_id`.
    pub fn cancel(&self, caller: &str, call_id: u64) {
        if let Some(gate) = self.close(caller, call_id) {
            gate.cancel();
        }
    }

    /// Stops every stream to `caller`: it left.
    pub fn cancel_peer(&self, caller: &str) {
        let streams = lock(&self.0).remove(caller);
        for gate in streams.into_iter().flat_map(HashMap::into_values) {
            gate.cancel();
        }
    }

    /// Stops every stream: the connection they went through is gone.
    pub fn cancel_all(&self) {
        let all = std::mem::take(&mut *lock(&self.0));
        for gate in all.into_values().flat_map(HashMap::into_values) {
            gate.cancel();
        }
    }
}

/// One stream's credit, and whether its receiver cancelled it.
pub struct StreamGate {
    /// What the receiver granted that the sender has not taken yet.
    credit: Mutex<Credit>,
    /// Wakes the sender waiting for credit (a grant, or the cancel).
    granted: Notify,
    cancelled: watch::Sender<bool>,
}

impl StreamGate {
    /// Gives `unused` back, and takes all the credit there is if it allows an item.
    fn take_credit(&self, unused: Credit) -> Option<Credit> {
        let mut credit = lock(&self.credit);
        credit.items = credit.items.saturating_add(unused.items);
        credit.bytes = credit.bytes.saturating_add(unused.bytes);
        credit.allows_one().then(|| std::mem::take(&mut *credit))
    }

    /// Waits until the receiver granted room for an item, and takes all the credit
    /// there is (`unused` given back first); `None` once cancelled.
    pub async fn credit(&self, mut unused: Credit) -> Option<Credit> {
        loop {
            let granted = self.granted.notified();
            if self.is_cancelled() {
                return None;
            }
            if let Some(credit) = self.take_credit(std::mem::take(&mut unused)) {
                return Some(credit);
            }
            granted.await;
        }
    }

    /// Resolves once the stream is cancelled.
    pub async fn cancelled(&self) {
        let mut cancelled = self.cancelled.subscribe();
        let _ = cancelled.wait_for(|c| *c).await;
    }

    /// Whether the stream is cancelled.
    pub fn is_cancelled(&self) -> bool {
        *self.cancelled.borrow()
    }

    /// Cancels the stream: its producer stops at its next item or wait.
    pub fn cancel(&self) {
        self.cancelled.send_replace(true);
        self.granted.notify_one();
    }
}

/// The arguments streams callers feed to this node's callbacks, by the backend's key of
/// the caller (its process name, or its inbox) and call id.
#[derive(Default)]
pub struct IncomingStreams(Mutex<HashMap<Arc<str>, HashMap<u64, ArgumentsEntry>>>);

/// One arguments stream still being received.
struct ArgumentsEntry {
    /// The calling process, for errors.
    process: Arc<str>,
    callback: Arc<str>,
    /// Where its items go, and the credit its caller has left.
    slot: StreamSlot,
}

impl IncomingStreams {
    /// Records the stream `call_id` of `caller` (the process `process`) to `callback`;
    /// its items arrive on what this returns.
    pub fn open(
        &self,
        caller: &Arc<str>,
        process: &str,
        call_id: u64,
        callback: &str,
    ) -> StreamItems {
        let (slot, rx) = StreamSlot::open();
        let entry = ArgumentsEntry {
            process: Arc::from(process),
            callback: Arc::from(callback),
            slot,
        };
        lock(&self.0)
            .entry(caller.clone())
            .or_default()
            .insert(call_id, entry);
        rx
    }

    /// Takes `caller`'s stream `call_id` out of the table.
    fn take(&self, caller: &str, call_id: u64) -> Option<ArgumentsEntry> {
        let mut by_caller = lock(&self.0);
        let streams = by_caller.get_mut(caller)?;
        let entry = streams.remove(&call_id);
        if streams.is_empty() {
            by_caller.remove(caller);
        }
        entry
    }

    /// The callee stopped reading `caller`'s stream `call_id`.
    pub fn forget(&self, caller: &str, call_id: u64) {
        self.take(caller, call_id);
    }

    /// Whether `caller`'s stream `call_id` is still read.
    #[cfg(feature = "nats")]
    pub fn is_read(&self, caller: &str, call_id: u64) -> bool {
        lock(&self.0)
            .get(caller)
            .is_some_and(|s| s.contains_key(&call_id))
    }

    /// Items of `caller`'s arguments stream `call_id`, counted against its credit;
    /// dropped if nobody reads that stream any more. A caller past its credit ends the
    /// stream with a protocol error (the stream leaves the table; the caller is to be
    /// told to stop).
    pub fn items(&self, caller: &str, call_id: u64, arrived: Arrived) -> Delivery {
        let mut by_caller = lock(&self.0);
        let Some(entry) = by_caller.get_mut(caller).and_then(|s| s.get_mut(&call_id)) else {
            return Delivery::Dropped;
        };
        let (process, callback) = (&entry.process, &entry.callback);
        let delivery = entry
            .slot
            .deliver(arrived, || overrun(process, callback, "arguments"));
        if delivery == Delivery::Overrun {
            drop(by_caller);
            self.take(caller, call_id);
        }
        delivery
    }

    /// Takes message `seq` of `caller`'s stream `call_id` (see
    /// [`StreamSlot::take`]); nothing for a stream nobody reads any more.
    #[cfg(feature = "nats")]
    pub fn take_message(
        &self,
        caller: &str,
        call_id: u64,
        seq: u64,
        received: super::pending::Received,
    ) -> Result<Option<Arrived>, super::pending::Misfit> {
        let mut by_caller = lock(&self.0);
        match by_caller.get_mut(caller).and_then(|s| s.get_mut(&call_id)) {
            Some(entry) => entry.slot.take(seq, received),
            None => Ok(None),
        }
    }

    /// The callee granted `grant` more of `caller`'s stream `call_id`.
    pub fn grant(&self, caller: &str, call_id: u64, grant: Grant) {
        let mut by_caller = lock(&self.0);
        if let Some(entry) = by_caller.get_mut(caller).and_then(|s| s.get_mut(&call_id)) {
            entry.slot.grant(grant);
        }
    }

    /// Ends `caller`'s stream `call_id`: after its last item, or with the error
    /// `outcome` builds from the calling process and the callback's name.
    pub fn end(
        &self,
        caller: &str,
        call_id: u64,
        outcome: impl FnOnce(&str, &str) -> Option<Error>,
    ) {
        if let Some(entry) = self.take(caller, call_id) {
            if let Some(error) = outcome(&entry.process, &entry.callback) {
                entry.slot.fail(error);
            }
        }
    }

    /// `caller` gave up on its call `call_id`.
    pub fn cancel(&self, caller: &str, call_id: u64) {
        self.end(caller, call_id, |process, callback| {
            Some(Error::Cancelled {
                process: process.to_string(),
                callback: callback.to_string(),
            })
        });
    }

    /// `caller`'s stream `call_id` ends with `PeerDisconnected`: the caller is gone.
    #[cfg(feature = "nats")]
    pub fn disconnect(&self, caller: &str, call_id: u64) {
        self.end(caller, call_id, |process, callback| {
            Some(peer_disconnected(process, callback))
        });
    }

    /// Ends every stream from `caller`: it left.
    pub fn fail_caller(&self, caller: &str) {
        let streams = lock(&self.0).remove(caller);
        disconnected(streams.unwrap_or_default());
    }

    /// Ends the streams of callers for which `present` is false: they left before this
    /// node heard of every node (so no leave will be told for them).
    pub fn fail_absent(&self, present: impl Fn(&str) -> bool) {
        let absent: Vec<HashMap<u64, ArgumentsEntry>> = {
            let mut by_caller = lock(&self.0);
            let gone: Vec<Arc<str>> = by_caller.keys().filter(|c| !present(c)).cloned().collect();
            gone.iter().filter_map(|c| by_caller.remove(c)).collect()
        };
        absent.into_iter().for_each(disconnected);
    }

    /// Ends every stream: the connection they came through is gone.
    pub fn fail_all(&self) {
        let all = std::mem::take(&mut *lock(&self.0));
        all.into_values().for_each(disconnected);
    }
}

fn peer_disconnected(process: &str, callback: &str) -> Error {
    Error::PeerDisconnected {
        process: process.to_string(),
        callback: callback.to_string(),
    }
}

/// Ends `streams` with `PeerDisconnected`.
fn disconnected(streams: HashMap<u64, ArgumentsEntry>) {
    for entry in streams.into_values() {
        entry
            .slot
            .fail(peer_disconnected(&entry.process, &entry.callback));
    }
}
