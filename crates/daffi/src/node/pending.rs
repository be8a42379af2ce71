//! Calls this node made that still wait for their reply.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::error::Error;

/// What a waiting call eventually receives.
pub type Completion = Result<Bytes, Error>;

/// One waiting call.
pub struct Entry {
    /// The node the request went to.
    pub target: Arc<str>,
    /// The callback called.
    pub callback: Arc<str>,
    /// Where its completion goes.
    pub done: oneshot::Sender<Completion>,
}

/// The table of calls in flight, keyed by call id.
#[derive(Default)]
pub struct Pending {
    next_id: AtomicU64,
    calls: Mutex<HashMap<u64, Entry>>,
}

impl Pending {
    /// Records a call to `callback` on `target`; returns its id and the receiver of its
    /// completion.
    pub fn insert(
        &self,
        target: Arc<str>,
        callback: Arc<str>,
    ) -> (u64, oneshot::Receiver<Completion>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (done, rx) = oneshot::channel();
        self.lock().insert(
            id,
            Entry {
                target,
                callback,
                done,
            },
        );
        (id, rx)
    }

    /// Takes call `id` out of the table to complete it, if it still waits.
    pub fn take(&self, id: u64) -> Option<Entry> {
        self.lock().remove(&id)
    }

    /// Forgets call `id` (its caller gave up).
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Fails every call waiting on `target` (it disconnected).
    pub fn fail_target(&self, target: &str) {
        let failed: Vec<Entry> = {
            let mut calls = self.lock();
            let ids: Vec<u64> = calls
                .iter()
                .filter(|(_, e)| &*e.target == target)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| calls.remove(id)).collect()
        };
        for e in failed {
            let _ = e.done.send(Err(Error::PeerDisconnected {
                process: e.target.to_string(),
                callback: e.callback.to_string(),
            }));
        }
    }

    /// Fails every waiting call with the error `make` builds.
    pub fn fail_all(&self, make: impl Fn() -> Error) {
        let failed: Vec<Entry> = self.lock().drain().map(|(_, e)| e).collect();
        for e in failed {
            let _ = e.done.send(Err(make()));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}
