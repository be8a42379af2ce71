//! The executor: runs the callbacks other nodes ask for. The mesh hands it each
//! [`Request`] (what to run, and the way back for the reply); it checks the request
//! (known callback, room, caller still waiting), runs it (async callbacks as tasks, sync
//! ones on the [`SyncRunner`](sync_runner::SyncRunner)'s threads, or quick ones on the
//! runtime worker that read them) and answers through
//! the request. It knows nothing of the mesh behind it.

mod dispatch;
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
pub use dispatch::{serve, SyncBatch};
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
    fn admit_callback(self: &Arc<Self>, kind: CallbackKind) -> Option<ServingGuard> {
        self.serving
            .admit(kind, self.limits.callback_limit(kind))
            .then(|| ServingGuard(self.clone(), kind))
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

    /// Counts one more callback of its kind, unless `limit` of that kind already are.
    fn admit(&self, kind: CallbackKind, limit: usize) -> bool {
        let limit = limit.min(Self::MAX) as u64;
        let counts = self.counts(kind);
        let mut current = counts.load(Ordering::Acquire);
        loop {
            let of_kind = if kind.one_way {
                current >> 32
            } else {
                current & u64::from(u32::MAX)
            };
            if of_kind >= limit {
                return false;
            }
            match counts.compare_exchange_weak(
                current,
                current + Self::unit(kind),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    fn finish(&self, kind: CallbackKind) {
        let unit = Self::unit(kind);
        if self.counts(kind).fetch_sub(unit, Ordering::AcqRel) == unit {
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

/// Marks a callback of its kind as finished when dropped.
pub struct ServingGuard(Arc<Executor>, CallbackKind);

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.0.serving.finish(self.1);
    }
}
