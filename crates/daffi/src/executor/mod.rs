//! The executor: runs the callbacks other nodes ask for. The mesh hands it each
//! [`Request`] (what to run, and the way back for the reply); it checks the request
//! (known callback, room, caller still waiting), runs it (async callbacks as tasks, sync
//! ones on the [`SyncRunner`](sync_runner::SyncRunner)'s threads, or quick ones on the
//! runtime worker that read them) and answers through
//! the request; the calls of a batch frame come as one [`CallBatch`]. It knows nothing
//! of the mesh behind it.

mod dispatch;
mod idle_run;
mod items;
mod pace;
mod sync_runner;
mod thread_clock;

use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::callback::{CallbackGroup, Handler, Outcome};
use crate::error::{Error, Result};
use crate::mesh::BoxFuture;
use crate::sync::{lock, read, write};
pub use dispatch::{serve, serve_batch, SyncBatch};
pub use items::send_items;

/// A request from another node, as the mesh hands it over: what to run, and the way
/// back for its outcome.
pub trait Request: Send + 'static {
    /// The callback asked for.
    fn callback(&self) -> &str;
    /// The process that asked.
    fn caller(&self) -> &str;
    /// The encoded arguments.
    fn payload(&self) -> Bytes;
    /// The encoded arguments, handed over to run the callback: the request may let go
    /// of its own hold on their buffer, and gives the reader's hold on it if there is
    /// one, so that a lone large byte-string argument may take the buffer over instead
    /// of being copied (see `codec::handing_over`). Called once, before the callback.
    fn take_payload(&mut self) -> (Bytes, Option<daffi_wire::KeptBuffer>) {
        (self.payload(), None)
    }
    /// Whether the caller waits for the outcome (not NO_RETURN).
    fn wants_reply(&self) -> bool;
    /// When the caller gives up, if it said: work that would start later is skipped.
    fn deadline(&self) -> Option<Instant>;
    /// Sends `outcome` back to the caller, or drops it if the way back is gone. When the
    /// way back is full, returns the wait for room (run it off any lock).
    /// ([`Executor::replies_follow`] says whether more outcomes come at once.)
    fn reply(self: Box<Self>, outcome: Outcome) -> Option<BoxFuture<'static, ()>>;
    /// Whether the caller asked for a stream of items rather than one reply.
    fn wants_stream(&self) -> bool {
        false
    }
    /// The way back for a stream of items, ready before the next frame is read (so that
    /// a cancel finds it); `None` if the mesh does not carry streams.
    fn open_stream(&self) -> Option<Box<dyn ItemSink>> {
        None
    }
    /// The arguments the caller streams with this request (the callback's
    /// [`Incoming`](crate::Incoming)), registered before the next frame is read (so that
    /// its items find it); `None` if the caller streams none, or the mesh carries none.
    fn open_incoming(&self) -> Option<crate::mesh::OpenStream> {
        None
    }
}

/// The calls of one batch frame to one callback (docs/PROTOCOL.md, "Batches of calls"),
/// as the mesh hands them over: a quick sync callback serves them as one unit (one
/// lookup, one admission pass, one job, its replies gathered into one frame); any other
/// takes them one by one, as lone [`Request`]s ([`CallBatch::split_off`]). Each call is
/// admitted against the limits and answered (if its caller waits) exactly once.
pub trait CallBatch: Send + 'static {
    /// The callback asked for.
    fn callback(&self) -> &str;
    /// The process that asked.
    fn caller(&self) -> &str;
    /// Whether the callers wait for outcomes (not NO_RETURN).
    fn wants_reply(&self) -> bool;
    /// When the caller gives up on these calls, if it said.
    fn deadline(&self) -> Option<Instant>;
    /// Calls not taken yet.
    fn remaining(&self) -> usize;
    /// The next call's arguments, in order; `None` once all were taken.
    fn next_call(&mut self) -> Option<Bytes>;
    /// Answers the call last taken: the outcome is kept with the others', to leave
    /// together at [`flush`](CallBatch::flush) (a large one may leave at once).
    fn answer(&mut self, outcome: Outcome);
    /// Sends the outcomes kept. When the way back is full, returns the wait for room
    /// (run it off any lock).
    fn flush(&mut self) -> Option<BoxFuture<'static, ()>>;
    /// The calls not taken yet past the first `keep` of them, as lone requests (taken
    /// from the batch: it keeps only those `keep`).
    fn split_off(&mut self, keep: usize) -> Vec<Box<dyn Request>>;
    /// The calls not taken yet past the first `keep` of them, as a batch of their own
    /// (taken from this one, which keeps only those `keep`); `None` if there are no
    /// more than `keep`.
    fn split_batch(&mut self, keep: usize) -> Option<Box<dyn CallBatch>>;
}

/// The way a stream's items go (a stream callback's results, or a caller's
/// arguments), with the receiver's credit. The sender takes credit in bulk and sends
/// the items it covers in batches ([`send_items`] does both).
pub trait ItemSink: Send + Sync + 'static {
    /// Gives `unused` credit back, waits until the receiver granted room for one more
    /// item, and takes all the credit there is; `None` once the receiver cancelled or is
    /// gone (produce no more).
    fn credit(&self, unused: crate::mesh::Credit) -> BoxFuture<'_, Option<crate::mesh::Credit>>;
    /// Queues `batch` (items within the credit taken); `false` once the receiver is
    /// gone.
    fn send(&self, batch: crate::mesh::ItemBatch) -> BoxFuture<'_, bool>;
    /// Resolves once the caller cancelled or is gone (made once per stream, polled
    /// while the producer has no items ready).
    fn cancelled(&self) -> BoxFuture<'_, ()>;
    /// Ends the stream: the items ran out, or (`failure`) producing them failed.
    fn end(
        self: Box<Self>,
        failure: Option<crate::callback::CallbackFailure>,
    ) -> BoxFuture<'static, ()>;
}

/// A callback served here, with how its recent runs went.
#[derive(Clone)]
struct Served {
    handler: Handler,
    pace: Arc<pace::Pace>,
}

impl Served {
    fn entry((name, handler): (String, Handler)) -> (String, Served) {
        let pace = Arc::default();
        (name, Served { handler, pace })
    }
}

/// How many callbacks a node runs at once, and how long a stop lets them finish.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Async callbacks this node runs at once; more are refused with `Overloaded`.
    pub max_concurrent_callbacks: usize,
    /// Sync callbacks this node runs (or has queued) at once; more are
    /// refused with `Overloaded`.
    pub max_sync_callbacks: usize,
    /// How long `stop` lets running callbacks finish.
    pub stop_timeout: Duration,
}

/// The callbacks a node serves, and what runs them.
pub struct Executor {
    /// This node's process name, for messages and logs.
    pub name: Arc<str>,
    limits: Limits,
    callbacks: RwLock<HashMap<String, Served>>,
    /// The callback last looked up, with its name: requests for one name in a row find
    /// it without hashing the name. Never stale: a name, once served, keeps its
    /// callback (names are only added).
    last_served: Mutex<Option<(String, Served)>>,
    instances: Mutex<HashSet<TypeId>>,
    /// Callbacks running or waiting to run now.
    serving: Serving,
    /// Sync callbacks waiting for a thread, and the threads running them.
    sync_runner: sync_runner::SyncRunner,
}

impl Executor {
    /// An executor serving `callbacks`.
    pub fn new(name: Arc<str>, limits: Limits, callbacks: HashMap<String, Handler>) -> Arc<Self> {
        Arc::new(Executor {
            name,
            limits,
            callbacks: RwLock::new(callbacks.into_iter().map(Served::entry).collect()),
            last_served: Mutex::new(None),
            instances: Mutex::new(HashSet::new()),
            serving: Serving::default(),
            sync_runner: sync_runner::SyncRunner::default(),
        })
    }

    /// Adds callbacks: all or none, if a name is taken or `check` refuses the names
    /// served with them.
    pub fn register(
        &self,
        handlers: Vec<(String, Handler)>,
        check: impl FnOnce(&[&str]) -> Result<()>,
    ) -> Result<()> {
        let mut table = write(&self.callbacks);
        let mut seen = HashSet::new();
        if let Some((taken, _)) = handlers
            .iter()
            .find(|(name, _)| table.contains_key(name) || !seen.insert(name))
        {
            return Err(Error::DuplicateCallback {
                callback: taken.clone(),
            });
        }
        let names: Vec<&str> = table
            .keys()
            .chain(handlers.iter().map(|(name, _)| name))
            .map(String::as_str)
            .collect();
        check(&names)?;
        table.extend(handlers.into_iter().map(Served::entry));
        Ok(())
    }

    /// Serves the methods of `instance`; one instance per type and node.
    pub fn register_instance<T: CallbackGroup>(
        &self,
        instance: T,
        check: impl FnOnce(&[&str]) -> Result<()>,
    ) -> Result<()> {
        let type_name = std::any::type_name::<T>();
        if !lock(&self.instances).insert(TypeId::of::<T>()) {
            return Err(Error::DuplicateInstance { type_name });
        }
        let handlers = T::__daffi_methods(Arc::new(instance))
            .into_iter()
            .map(|(name, handler)| (name.to_string(), handler))
            .collect();
        let registered = self.register(handlers, check);
        if registered.is_err() {
            lock(&self.instances).remove(&TypeId::of::<T>());
        }
        registered
    }

    /// Whether more replies come at once (sync callbacks are queued, and their threads
    /// take them as soon as they are done): a reply may wait for them, to leave
    /// together.
    pub fn replies_follow(&self) -> bool {
        self.sync_runner.queued() > 0
    }

    /// Names of the callbacks served here, sorted.
    pub fn callback_names(&self) -> Vec<String> {
        let mut names: Vec<String> = read(&self.callbacks).keys().cloned().collect();
        names.sort();
        names
    }

    /// Whether a stream callback is among them.
    pub fn serves_streams(&self) -> bool {
        read(&self.callbacks)
            .values()
            .any(|served| served.handler.is_stream())
    }

    fn handler(&self, name: &str) -> Option<Served> {
        let mut last = self.last_served.try_lock().ok();
        if let Some(Some((last_name, served))) = last.as_deref() {
            if last_name == name {
                return Some(served.clone());
            }
        }
        let served = read(&self.callbacks).get(name).cloned()?;
        if let Some(last) = last.as_deref_mut() {
            *last = Some((name.to_string(), served.clone()));
        }
        Some(served)
    }

    /// Whether callbacks are running here now.
    pub fn is_serving(&self) -> bool {
        self.serving.total() > 0
    }

    /// Waits until no callback runs here, or `stop_timeout` passes.
    pub async fn drain(&self) {
        if tokio::time::timeout(self.limits.stop_timeout, self.serving.idle())
            .await
            .is_err()
        {
            tracing::warn!(
                process = %self.name,
                running = self.serving.total(),
                "stop_timeout passed with callbacks still running; their callers get PeerStopped"
            );
        }
    }

    /// The node closed: the sync callback threads end once idle.
    pub fn retire(&self) {
        self.sync_runner.retire();
    }

    /// Counts a callback as running (or waiting to run), unless as many of its kind as
    /// allowed already are.
    #[cfg(test)]
    fn admit_callback(self: &Arc<Self>, kind: CallbackKind) -> Option<ServingGuard> {
        self.admit_callbacks(kind, 1)
    }

    /// Counts up to `calls` callbacks of one kind as running, as many as their limit
    /// allows (the first of them, in order); `None` if none may.
    fn admit_callbacks(self: &Arc<Self>, kind: CallbackKind, calls: u32) -> Option<ServingGuard> {
        let admitted = self
            .serving
            .admit_up_to(kind, self.limits.callback_limit(kind), calls);
        (admitted > 0).then(|| ServingGuard {
            executor: self.clone(),
            kind,
            calls: admitted,
        })
    }
}

impl Limits {
    /// How many callbacks of `kind` may run or wait at once. NO_RETURN ones have a
    /// larger allowance: their callers cannot be told to back off.
    fn callback_limit(&self, kind: CallbackKind) -> usize {
        let limit = if kind.sync {
            self.max_sync_callbacks
        } else {
            self.max_concurrent_callbacks
        };
        if kind.one_way {
            limit.saturating_mul(dispatch::NO_RETURN_BACKLOG_FACTOR)
        } else {
            limit
        }
    }
}

/// What a callback counts against: sync or async, with a reply or NO_RETURN.
#[derive(Debug, Clone, Copy)]
pub struct CallbackKind {
    pub sync: bool,
    pub one_way: bool,
}

/// Callbacks running or waiting to run, by kind: sync and async ones have limits of
/// their own (a full set of sync threads never refuses async callbacks), and so do
/// NO_RETURN ones. Each pair (with a reply in the low 32 bits, NO_RETURN in the high)
/// lives in one atomic, so that admitting and finishing a callback take no lock; `idle`
/// wakes a graceful stop when every count reaches zero.
#[derive(Default)]
struct Serving {
    /// Async callbacks, then sync ones.
    counts: [AtomicU64; 2],
    idle: tokio::sync::Notify,
}

impl Serving {
    const ONE_WAY: u64 = 1 << 32;
    const WITH_REPLY: u64 = 1;
    const MAX: usize = u32::MAX as usize - 1;

    fn unit(kind: CallbackKind) -> u64 {
        if kind.one_way {
            Self::ONE_WAY
        } else {
            Self::WITH_REPLY
        }
    }

    fn counts(&self, kind: CallbackKind) -> &AtomicU64 {
        &self.counts[usize::from(kind.sync)]
    }

    fn total(&self) -> usize {
        self.counts
            .iter()
            .map(|c| {
                let c = c.load(Ordering::Acquire);
                (c >> 32) as usize + (c & u64::from(u32::MAX)) as usize
            })
            .sum()
    }

    /// Counts up to `calls` more callbacks of its kind, as many as keep that kind
    /// within `limit`; returns how many.
    fn admit_up_to(&self, kind: CallbackKind, limit: usize, calls: u32) -> u32 {
        let limit = limit.min(Self::MAX) as u64;
        let counts = self.counts(kind);
        let mut current = counts.load(Ordering::Acquire);
        loop {
            let of_kind = if kind.one_way {
                current >> 32
            } else {
                current & u64::from(u32::MAX)
            };
            let admitted = limit.saturating_sub(of_kind).min(u64::from(calls));
            if admitted == 0 {
                return 0;
            }
            match counts.compare_exchange_weak(
                current,
                current + Self::unit(kind) * admitted,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                // At most `calls`, a u32.
                Ok(_) => return admitted as u32,
                Err(seen) => current = seen,
            }
        }
    }

    /// `calls` callbacks of `kind` finished.
    fn finish(&self, kind: CallbackKind, calls: u32) {
        let gone = Self::unit(kind) * u64::from(calls);
        if calls > 0 && self.counts(kind).fetch_sub(gone, Ordering::AcqRel) == gone {
            // This kind reached zero; `idle` looks at the others.
            self.idle.notify_waiters();
        }
    }

    /// Resolves once no callback runs or waits here.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check: a finish between the two is not missed.
            notified.as_mut().enable();
            if self.total() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Marks callbacks of its kind (one, or the calls of a batch) as finished when dropped.
pub struct ServingGuard {
    executor: Arc<Executor>,
    kind: CallbackKind,
    calls: u32,
}

impl ServingGuard {
    /// A guard that counts nothing.
    fn none(executor: &Arc<Executor>) -> ServingGuard {
        ServingGuard {
            executor: executor.clone(),
            kind: CallbackKind {
                sync: true,
                one_way: false,
            },
            calls: 0,
        }
    }

    /// Takes one of the callbacks it counts into a guard of its own; `None` if it
    /// counts none.
    fn take_one(&mut self) -> Option<ServingGuard> {
        self.take(1)
    }

    /// Takes `calls` of the callbacks it counts into a guard of their own; `None` if
    /// it counts fewer.
    fn take(&mut self, calls: u32) -> Option<ServingGuard> {
        self.calls = self.calls.checked_sub(calls)?;
        Some(ServingGuard {
            executor: self.executor.clone(),
            kind: self.kind,
            calls,
        })
    }
}

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.executor.serving.finish(self.kind, self.calls);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_admitted_as_far_as_the_limit_allows_and_each_call_counts() {
        let serving = Serving::default();
        let kind = CallbackKind {
            sync: true,
            one_way: false,
        };
        let one_way = CallbackKind {
            sync: true,
            one_way: true,
        };
        assert_eq!(serving.admit_up_to(kind, 10, 4), 4);
        assert_eq!(serving.admit_up_to(kind, 10, 50), 6, "the first six of 50");
        assert_eq!(serving.admit_up_to(kind, 10, 1), 0, "at the limit");
        assert_eq!(
            serving.admit_up_to(one_way, 10, 3),
            3,
            "NO_RETURN calls have their own count"
        );
        assert_eq!(serving.total(), 13);
        serving.finish(kind, 6);
        assert_eq!(serving.admit_up_to(kind, 10, 50), 6);
        serving.finish(kind, 10);
        serving.finish(one_way, 3);
        assert_eq!(serving.total(), 0);
    }

    #[test]
    fn a_guard_split_in_shares_finishes_each_share_once() {
        let limits = Limits {
            max_concurrent_callbacks: 1,
            max_sync_callbacks: 100,
            stop_timeout: Duration::ZERO,
        };
        let executor = Executor::new("test".into(), limits, HashMap::new());
        let kind = CallbackKind {
            sync: true,
            one_way: false,
        };
        let mut all = executor.admit_callbacks(kind, 130).expect("room");
        assert_eq!(all.calls, 100, "as many as the limit allows");
        let share = all.take(64).expect("64 of them");
        let one = all.take_one().expect("one of them");
        assert!(all.take(64).is_none(), "35 left");
        assert_eq!(executor.serving.total(), 100);
        drop(share);
        assert_eq!(executor.serving.total(), 36);
        drop(one);
        drop(all);
        assert_eq!(executor.serving.total(), 0);
    }
}
