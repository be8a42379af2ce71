//! The streams a node produces, whatever the mesh: each waits on the credit its caller
//! granted, and stops once the caller cancels or goes. A backend keys them by its own
//! name of the caller (a process name, a reply inbox) and the stream's call id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Semaphore};

use super::STREAM_WINDOW;
use crate::sync::lock;

/// The most credit a stream holds at once, whatever its caller grants: a caller that
/// grants more only wastes its own memory, never the callee's.
const MAX_CREDIT: usize = 1 << 20;

/// The streams this node produces now, by caller and call id.
#[derive(Default)]
pub struct ServedStreams(Mutex<HashMap<Arc<str>, CallerStreams>>);

/// One caller's streams, by call id.
type CallerStreams = HashMap<u64, Arc<StreamGate>>;

impl ServedStreams {
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
    pub fn cancel_caller(&self, caller: &str) {
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
