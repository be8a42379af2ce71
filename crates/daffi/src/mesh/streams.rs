//! The streams a node takes part in, whatever the mesh carries them: those it sends
//! ([`SentStreams`]: a callee's results, a caller's arguments), each waiting on the
//! credit the other end granted and stopping once it cancels or goes, and those it
//! receives as a callee ([`IncomingStreams`]: the arguments for a callback's
//! `Incoming`). A backend keys them by its own name of the peer (a process name, a reply
//! inbox) and the call id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Semaphore};

use tokio::sync::mpsc;

use super::pending::Completion;
use super::{StreamItems, STREAM_WINDOW};
use crate::error::Error;
use crate::sync::lock;

/// The most credit a stream holds at once, whatever its caller grants: a caller that
/// grants more only wastes its own memory, never the callee's.
const MAX_CREDIT: usize = 1 << 20;

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
            credit: Semaphore::new(STREAM_WINDOW as usize),
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

    /// `caller` granted `items` more to its stream `call_id`.
    pub fn grant(&self, caller: &str, call_id: u64, items: u32) {
        let by_caller = lock(&self.0);
        if let Some(gate) = by_caller.get(caller).and_then(|s| s.get(&call_id)) {
            let room = MAX_CREDIT.saturating_sub(gate.credit.available_permits());
            gate.credit.add_permits((items as usize).min(room));
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

/// One stream's credit, and whether its caller cancelled it.
pub struct StreamGate {
    credit: Semaphore,
    cancelled: watch::Sender<bool>,
}

impl StreamGate {
    /// Waits for credit for one item and uses it; `false` once the stream is cancelled.
    pub async fn take_credit(&self) -> bool {
        match self.credit.acquire().await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
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
        self.credit.close();
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
    items: mpsc::UnboundedSender<Completion>,
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
        let (items, rx) = mpsc::unbounded_channel();
        let entry = ArgumentsEntry {
            process: Arc::from(process),
            callback: Arc::from(callback),
            items,
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

    /// Where the items of `caller`'s stream `call_id` go; `None` if nobody reads that
    /// stream any more (its items are dropped).
    pub fn items_of(
        &self,
        caller: &str,
        call_id: u64,
    ) -> Option<mpsc::UnboundedSender<Completion>> {
        let by_caller = lock(&self.0);
        Some(by_caller.get(caller)?.get(&call_id)?.items.clone())
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
                let _ = entry.items.send(Err(error));
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
        let _ = entry
            .items
            .send(Err(peer_disconnected(&entry.process, &entry.callback)));
    }
}
