//! Flow control of the requests from one node to another, so that a fast caller slows
//! down instead of overflowing a callee's subscription (where the NATS client would drop
//! what does not fit).
//!
//! - **The caller** holds a window of [`WINDOW`] credits per callee. Every request (FG,
//!   BG, NO_RETURN) takes one before it is published, waiting for it at most until the
//!   call's deadline (or `stall_timeout` for a call without a timeout); past that, the
//!   call fails with [`Error::SlowConsumer`] naming the callee. A request with a reply
//!   gives its credit back when the call is over (the reply proves the callee took it).
//! - **The callee** acknowledges NO_RETURN requests (whose reply subject is the ack
//!   subject of the caller's [`Window`], see [`is_ack_subject`]) once they are handed
//!   to its executor: one ack per caller carries how many it took, sent after
//!   [`ACK_EVERY`] of them, or once it has taken all it has received ([`Acks`]).
//!
//! So one caller never has more than [`WINDOW`] requests waiting in a callee's
//! subscription, and the callee's subscription (of [`SUBSCRIPTION_CAPACITY`] messages)
//! holds the windows of 64 callers at full speed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::mesh::sleep_until;

/// Requests one caller may have in flight to one callee, not yet known to be taken: the
/// async callbacks a node runs at once by default (`max_concurrent_callbacks`), so a
/// window holds no fewer calls than the callee would run.
pub const WINDOW: usize = 1024;

/// A callee acks after taking this many NO_RETURN requests from one caller, so that the
/// caller gets credit back before its window runs dry.
pub const ACK_EVERY: u32 = (WINDOW / 4) as u32;

/// Messages a subscription of the client holds before it drops what comes (and reports
/// a slow consumer): the windows of 64 callers.
pub const SUBSCRIPTION_CAPACITY: usize = 64 * WINDOW;

/// The first byte of the last token of an ack's subject (`<inbox>.w<window id>`); call
/// ids, the last token of replies, are digits only.
const ACK_TOKEN: char = 'w';

/// Whether `reply`, the reply subject of a request, is where its caller awaits acks: a
/// NO_RETURN request, to be acked rather than answered.
pub fn is_ack_subject(reply: &str) -> bool {
    reply
        .rsplit('.')
        .next()
        .is_some_and(|token| token.starts_with(ACK_TOKEN))
}

/// The credit of this node towards one callee.
pub struct Window {
    credit: Arc<Semaphore>,
    /// Where the callee sends its acks.
    acks_to: Subject,
    /// The subjects of the callee's callbacks called so far: built once, not per call.
    call_subjects: std::sync::Mutex<HashMap<Arc<str>, Subject>>,
}

/// A credit taken for a request with a reply: given back when dropped.
pub type Credit = OwnedSemaphorePermit;

impl Window {
    /// Takes a credit for a request to `target`, waiting no later than `deadline`, or
    /// `stall` from now for a call without one.
    pub async fn take(
        &self,
        target: &str,
        callback: &str,
        deadline: Option<Instant>,
        stall: Duration,
    ) -> Result<Credit> {
        let slow = || Error::SlowConsumer {
            process: target.to_string(),
            callback: callback.to_string(),
        };
        match self.credit.clone().try_acquire_owned() {
            Ok(credit) => return Ok(credit),
            Err(TryAcquireError::Closed) => return Err(gone(target)),
            Err(TryAcquireError::NoPermits) => {}
        }
        tracing::debug!(process = %target, callback, "waiting for credit: the callee is behind");
        tokio::select! {
            credit = self.credit.clone().acquire_owned() => credit.map_err(|_| gone(target)),
            _ = sleep_until(Some(deadline.unwrap_or_else(|| Instant::now() + stall))) => Err(slow()),
        }
    }

    /// The subject of requests for `callback` on the callee (`make` builds it the first
    /// time).
    pub fn call_subject(&self, callback: &Arc<str>, make: impl FnOnce() -> String) -> Subject {
        let mut subjects = crate::sync::lock(&self.call_subjects);
        if let Some(subject) = subjects.get(callback) {
            return subject.clone();
        }
        let subject = Subject::from(make());
        subjects.insert(callback.clone(), subject.clone());
        subject
    }

    /// The subject of the acks for NO_RETURN requests through this window.
    pub fn acks_to(&self) -> &Subject {
        &self.acks_to
    }
}

/// The error of a call whose callee left while it waited for credit.
fn gone(target: &str) -> Error {
    Error::UnknownProcess {
        process: target.to_string(),
    }
}

/// This node's windows, one per callee it has called.
pub struct Windows {
    inbox: String,
    next_id: AtomicU64,
    state: std::sync::Mutex<WindowMap>,
}

#[derive(Default)]
struct WindowMap {
    by_target: HashMap<Arc<str>, (u64, Arc<Window>)>,
    by_id: HashMap<u64, Arc<Window>>,
}

impl Windows {
    /// Windows whose acks come to `<inbox>.w<id>`.
    pub fn new(inbox: &str) -> Windows {
        Windows {
            inbox: inbox.to_string(),
            next_id: AtomicU64::new(0),
            state: Default::default(),
        }
    }

    /// The window towards `target`, opened if new.
    pub fn towards(&self, target: &Arc<str>) -> Arc<Window> {
        let mut state = crate::sync::lock(&self.state);
        if let Some((_, window)) = state.by_target.get(target) {
            return window.clone();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let window = Arc::new(Window {
            credit: Arc::new(Semaphore::new(WINDOW)),
            acks_to: format!("{}.{ACK_TOKEN}{id}", self.inbox).into(),
            call_subjects: Default::default(),
        });
        state.by_target.insert(target.clone(), (id, window.clone()));
        state.by_id.insert(id, window.clone());
        window
    }

    /// Closes the window towards `target` (it left the view): calls waiting for its
    /// credit fail, and a node that comes back under its name starts with a new one.
    pub fn close(&self, target: &str) {
        let mut state = crate::sync::lock(&self.state);
        if let Some((id, window)) = state.by_target.remove(target) {
            state.by_id.remove(&id);
            window.credit.close();
        }
    }

    /// Takes an ack, if the last token of `subject` is one's: credit back to its window.
    /// Returns whether it was an ack.
    pub fn take_ack(&self, last_token: &str, payload: &[u8]) -> bool {
        let Some(id) = last_token.strip_prefix(ACK_TOKEN) else {
            return false;
        };
        let id = id.parse::<u64>().ok();
        let taken = std::str::from_utf8(payload)
            .ok()
            .and_then(|n| n.parse::<usize>().ok());
        let window = id.and_then(|id| crate::sync::lock(&self.state).by_id.get(&id).cloned());
        if let (Some(window), Some(taken)) = (window, taken) {
            window.credit.add_permits(taken.min(WINDOW));
        }
        true
    }
}

/// The acks a callee owes: NO_RETURN requests taken, by the subject their caller awaits
/// acks on (a list: the callers of one burst are few).
#[derive(Default)]
pub struct Acks {
    owed: Vec<(Subject, u32)>,
}

impl Acks {
    /// Counts a request taken for `acks_to`; returns the ack to send now, if one is due.
    pub fn taken(&mut self, acks_to: Subject) -> Option<(Subject, u32)> {
        let i = match self.owed.iter().position(|(s, _)| *s == acks_to) {
            Some(i) => i,
            None => {
                self.owed.push((acks_to, 0));
                self.owed.len() - 1
            }
        };
        self.owed[i].1 += 1;
        (self.owed[i].1 >= ACK_EVERY).then(|| self.owed.swap_remove(i))
    }

    /// Every ack owed, for sending now (the callee has taken all it received).
    pub fn drain(&mut self) -> impl Iterator<Item = (Subject, u32)> + '_ {
        self.owed.drain(..)
    }
}

/// Sends the ack of `taken` NO_RETURN requests to `acks_to`.
pub async fn send_ack(client: &async_nats::Client, acks_to: Subject, taken: u32) {
    if let Err(e) = client.publish(acks_to, taken.to_string().into()).await {
        tracing::debug!(error = %e, "ack dropped: the NATS client is closed");
    }
}
