//! A node: its link to the controller (with reconnects), the calls it waits on, and the
//! callbacks it serves.

mod book;
mod caller;
mod dispatch;
mod link;
mod membership;
mod pending;
mod sync_runner;

use std::any::TypeId;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::auth::AuthToken;
use crate::callback::{CallbackGroup, Handler};
use crate::controller::InProcessDoor;
use crate::error::{Error, Result};
use crate::protocol::message::{self, Announce, ControlAnswer};
use crate::sync::{lock, read, write};
use crate::transport::{Address, ClientTls, IN_PROCESS_PEER};
pub use caller::{InFlight, NodeOutcome};
use daffi_wire::{FrameSender, Kind, Outgoing, Push};
pub use membership::{Changes, Membership};
use pending::Pending;

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub address: Address,
    pub max_frame_size: usize,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Calls this node may have in flight at once; more wait for a slot.
    pub max_in_flight: usize,
    /// Async callbacks this node runs at once; more are refused with `Overloaded`.
    pub max_concurrent_callbacks: usize,
    /// Sync callbacks this node runs at once, each on a thread of its own; more are
    /// refused with `Overloaded`.
    pub max_sync_callbacks: usize,
    /// How long `stop` lets running callbacks finish.
    pub stop_timeout: Duration,
    pub auth_token: Option<AuthToken>,
    /// How the node reaches the controller.
    pub route: Route,
    /// Bytes queued for the controller before a sender waits for room.
    pub max_queue_bytes: usize,
    /// How long the controller may read nothing of what waits for it before the node
    /// drops the connection (and reconnects).
    pub stall_timeout: Duration,
}

/// How a node reaches its controller.
#[derive(Debug, Clone)]
pub enum Route {
    /// The socket at the node's `address`, under TLS when given (TCP only).
    Socket { tls: Option<Arc<ClientTls>> },
    /// In-process: this process runs the controller. No address, TLS or token.
    InProcess(InProcessDoor),
}

impl Route {
    /// The TLS of the link, if any.
    fn tls(&self) -> Option<&ClientTls> {
        match self {
            Route::Socket { tls } => tls.as_deref(),
            Route::InProcess(_) => None,
        }
    }
}

impl NodeConfig {
    /// Where the link goes, for logs: the controller's address, or `in-process`.
    fn controller_peer(&self) -> String {
        match self.route {
            Route::Socket { .. } => self.address.to_string(),
            Route::InProcess(_) => IN_PROCESS_PEER.to_string(),
        }
    }
}

/// One call to make.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub callback: Arc<str>,
    pub args: daffi_wire::Payload,
    pub on: Option<String>,
    pub timeout: Option<Duration>,
    pub eta: Option<Duration>,
    pub no_reply: bool,
}

/// Something that happened to a node, for the lifecycle hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// This node connected (or reconnected) to the controller.
    Connected,
    /// This node lost the controller (it will reconnect).
    Disconnected,
    /// Another node appeared in this node's view.
    MemberAdded(String),
    /// Another node left this node's view.
    MemberRemoved(String),
}

/// One live connection to the controller: where frames go, and the calls waiting on it.
pub struct Connection {
    queue: FrameSender,
    pending: Pending,
}

/// Everything a node's tasks share.
pub struct NodeCore {
    pub name: Arc<str>,
    pub config: NodeConfig,
    pub membership: Membership,
    /// A replica of the controller's scheduled tasks, given back to it if it restarts.
    book: book::ScheduleBook,
    callbacks: RwLock<HashMap<String, Handler>>,
    instances: Mutex<HashSet<TypeId>>,
    connection: RwLock<Option<Arc<Connection>>>,
    announcing: tokio::sync::Mutex<()>,
    max_frame_size: AtomicUsize,
    /// Set when stopping begins: no new calls from here, no new requests routed here.
    stopped: watch::Sender<bool>,
    /// Set when the node is gone: the link closes, nothing reconnects.
    closed: watch::Sender<bool>,
    /// Callbacks running or waiting to run now.
    serving: Serving,
    /// Sync callbacks waiting for a thread, and the threads running them.
    sync_runner: sync_runner::SyncRunner,
    /// Set when the link task has ended (after flushing what was queued).
    link_done: watch::Sender<bool>,
    /// Slots for this node's own calls in flight.
    in_flight: Arc<tokio::sync::Semaphore>,
    events: mpsc::UnboundedSender<NodeEvent>,
}

impl NodeCore {
    /// A node that serves `callbacks`; it connects once [`NodeCore::start`] runs. What
    /// happens to it is sent on `events` (dropped if nobody listens).
    pub fn new(
        name: String,
        config: NodeConfig,
        callbacks: HashMap<String, Handler>,
        events: mpsc::UnboundedSender<NodeEvent>,
    ) -> Arc<Self> {
        let config_in_flight = config
            .max_in_flight
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Arc::new(NodeCore {
            name: Arc::from(name),
            max_frame_size: AtomicUsize::new(config.max_frame_size),
            config,
            membership: Membership::default(),
            book: book::ScheduleBook::default(),
            callbacks: RwLock::new(callbacks),
            instances: Mutex::new(HashSet::new()),
            connection: RwLock::new(None),
            announcing: tokio::sync::Mutex::new(()),
            stopped: watch::channel(false).0,
            closed: watch::channel(false).0,
            serving: Serving::default(),
            sync_runner: sync_runner::SyncRunner::default(),
            link_done: watch::channel(false).0,
            in_flight: Arc::new(tokio::sync::Semaphore::new(config_in_flight)),
            events,
        })
    }

    /// Connects (retrying until `connect_timeout`), then keeps reconnecting in the
    /// background until the node stops. Returns once the first connection is up.
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        self.check_callback_list(&self.callback_names())?;
        let (first_tx, first_rx) = oneshot::channel();
        let core = self.clone();
        tokio::spawn(async move {
            supervise(core.clone(), first_tx).await;
            core.link_done.send_replace(true);
        });
        first_rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Begins stopping: this node's own calls fail with `Stopped`, and the controller
    /// routes no new requests here. Callbacks already running go on; see
    /// [`NodeCore::drain`] and [`NodeCore::close`]. Returns `false` if already stopping.
    pub fn begin_stop(&self) -> bool {
        if self.stopped.send_replace(true) {
            return false;
        }
        if let Some(conn) = self.connection() {
            conn.pending.close(|| Error::Stopped);
            // Past the byte limit if need be: calls queued ahead must not keep it back.
            let _ = conn
                .queue
                .push_unrefused(message::control_frame(Kind::Leaving, &()), false);
        }
        tracing::info!(process = %self.name, "node stopping");
        true
    }

    /// Whether callbacks are running here now.
    pub fn is_serving(&self) -> bool {
        self.serving.total() > 0
    }

    /// Waits until no callback runs here, or `stop_timeout` passes.
    pub async fn drain(&self) {
        if tokio::time::timeout(self.config.stop_timeout, self.serving.idle())
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

    /// Ends the node: says goodbye to the controller and closes the link for good.
    pub fn close(&self) {
        self.begin_stop();
        if self.closed.send_replace(true) {
            return;
        }
        if let Some(conn) = write(&self.connection).take() {
            let _ = conn
                .queue
                .push_unrefused(message::control_frame(Kind::Goodbye, &()), false);
        }
        self.sync_runner.retire();
        self.membership.reset(Vec::new());
        tracing::info!(process = %self.name, "node stopped");
    }

    /// Waits (up to a second) until the link has flushed and closed after [`NodeCore::close`].
    pub async fn link_finished(&self) {
        let mut done = self.link_done.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(1), done.wait_for(|d| *d)).await;
    }

    /// Counts a callback as running (or waiting to run), unless as many of its kind as
    /// allowed already are.
    fn admit_callback(self: &Arc<Self>, kind: CallbackKind) -> Option<ServingGuard> {
        self.serving
            .admit(kind, self.config.callback_limit(kind))
            .then(|| ServingGuard(self.clone(), kind))
    }

    fn emit(&self, event: NodeEvent) {
        let _ = self.events.send(event);
    }

    fn report(&self, changes: Changes) {
        for name in changes.added {
            self.emit(NodeEvent::MemberAdded(name));
        }
        for name in changes.removed {
            self.emit(NodeEvent::MemberRemoved(name));
        }
    }

    /// Whether the node has a live connection to the controller now.
    pub fn is_connected(&self) -> bool {
        self.connection().is_some()
    }

    /// Whether [`NodeCore::stop`] ran.
    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Adds callbacks (all or none, if a name is taken or the names would take too
    /// much together) and tells the controller.
    pub fn register(self: &Arc<Self>, handlers: Vec<(String, Handler)>) -> Result<()> {
        {
            let mut table = write(&self.callbacks);
            let mut seen = std::collections::HashSet::new();
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
            self.check_callback_list(&names)?;
            table.extend(handlers);
        }
        self.announce();
        Ok(())
    }

    /// Serves the methods of `instance`; one instance per type and node.
    pub fn register_instance<T: CallbackGroup>(self: &Arc<Self>, instance: T) -> Result<()> {
        let type_name = std::any::type_name::<T>();
        if !lock(&self.instances).insert(std::any::TypeId::of::<T>()) {
            return Err(Error::DuplicateInstance { type_name });
        }
        let handlers = T::__daffi_methods(Arc::new(instance))
            .into_iter()
            .map(|(name, handler)| (name.to_string(), handler))
            .collect();
        let registered = self.register(handlers);
        if registered.is_err() {
            lock(&self.instances).remove(&std::any::TypeId::of::<T>());
        }
        registered
    }

    /// Checks that `names` fit what one node may announce with the frames it sends: its
    /// own frame limit, or the controller's once connected, whichever is smaller.
    fn check_callback_list<S: AsRef<str>>(&self, names: &[S]) -> Result<()> {
        let max_frame_size = self.max_frame_size.load(Ordering::Relaxed);
        crate::protocol::check_callback_list(names, max_frame_size).map_err(|e| {
            Error::CallbackListTooLarge {
                size: e.size,
                limit: e.limit,
            }
        })
    }

    /// Names of the callbacks this node serves.
    pub fn callback_names(&self) -> Vec<String> {
        let mut names: Vec<String> = read(&self.callbacks).keys().cloned().collect();
        names.sort();
        names
    }

    fn handler(&self, name: &str) -> Option<Handler> {
        read(&self.callbacks).get(name).cloned()
    }

    fn connection(&self) -> Option<Arc<Connection>> {
        read(&self.connection).clone()
    }

    fn queue(&self) -> Option<FrameSender> {
        self.connection().map(|c| c.queue.clone())
    }

    /// Sends the current callback list to the controller. The list is read when the
    /// frame is sent, under a lock, so the last announce always carries the latest list
    /// however the spawned tasks are ordered.
    fn announce(self: &Arc<Self>) {
        let core = self.clone();
        tokio::spawn(async move {
            let _in_order = core.announcing.lock().await;
            if let Some(queue) = core.queue() {
                let callbacks = core.callback_names();
                let _ = queue
                    .send(message::control_frame(
                        Kind::Announce,
                        &Announce { callbacks },
                    ))
                    .await;
            }
        });
    }

    /// Queues a reply on the live connection without taking a handle on it (the common
    /// case: nothing cloned per reply). A full queue gives the reply back with the queue,
    /// to wait for room; without a connection the reply is dropped. `more_follow`: more
    /// replies come at once (queued sync callbacks), so the writer task sends them
    /// together rather than this one being written alone.
    fn push_reply(
        &self,
        reply: Outgoing,
        callback: &str,
        more_follow: bool,
    ) -> Option<(Outgoing, FrameSender)> {
        let connection = read(&self.connection);
        let Some(conn) = connection.as_ref() else {
            tracing::debug!(callback, "reply dropped: not connected");
            return None;
        };
        match conn.queue.push_with(reply, more_follow) {
            Push::Sent | Push::Closed => None,
            Push::Full(reply) => Some((reply, conn.queue.clone())),
        }
    }

    /// Gives a restarted controller what this node's schedule book holds and it does
    /// not: queues every `Restore` request on `conn`, then, in the background, takes in
    /// the answers. A restore cut short (the connection dropped) is made again at the
    /// next `Welcome`.
    async fn restore_schedule(self: &Arc<Self>, conn: &Arc<Connection>, restore: book::Restore) {
        let requests = restore.requests(self.max_frame_size.load(Ordering::Relaxed));
        let mut answers = Vec::with_capacity(requests.len());
        for request in &requests {
            match self.send_control(conn, request, "restore_schedule").await {
                Ok(wait) => answers.push(wait),
                Err(e) => {
                    tracing::warn!(process = %self.name, error = %e, "could not give the scheduled tasks back to the restarted controller; trying again at the next connection");
                    return;
                }
            }
        }
        tracing::info!(process = %self.name, instance = restore.instance(), requests = requests.len(), "the controller restarted: giving it back the scheduled tasks it does not list");
        let core = self.clone();
        tokio::spawn(async move {
            for wait in answers {
                match wait.answer().await {
                    Ok(ControlAnswer::Restored { refused, .. }) => core.book.refused(&refused),
                    Ok(other) => {
                        tracing::warn!(process = %core.name, answer = ?other, "unexpected answer to a Restore");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(process = %core.name, error = %e, "giving the scheduled tasks back failed; trying again at the next connection");
                        return;
                    }
                }
            }
            core.book.restored(&restore);
        });
    }

    async fn send_quietly(&self, frame: Outgoing) {
        if let Some(queue) = self.queue() {
            let _ = queue.send(frame).await;
        }
    }

    fn unreachable(&self, reason: &str) -> Error {
        Error::unreachable(&self.config.address, reason)
    }
}

impl NodeConfig {
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
pub struct ServingGuard(Arc<NodeCore>, CallbackKind);

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.0.serving.finish(self.1);
    }
}

/// Keeps the node connected: the first connection (retried until `connect_timeout`),
/// then reconnects with capped exponential backoff and jitter until the node stops.
async fn supervise(core: Arc<NodeCore>, first: oneshot::Sender<Result<()>>) {
    let mut first = Some(first);
    let give_up_at = Instant::now() + core.config.connect_timeout;
    let mut backoff = Backoff::default();
    let mut closed = core.closed.subscribe();
    while !core.is_stopped() {
        match link::connect(&core, core.callback_names()).await {
            Ok(mut link) => {
                backoff = Backoff::default();
                let limit = core
                    .config
                    .max_frame_size
                    .min(link.welcome.max_frame_size as usize);
                core.max_frame_size.store(limit, Ordering::Relaxed);
                let changes = core.membership.reset(link.welcome.members.clone());
                let restore = core.book.welcome(
                    link.welcome.instance,
                    std::mem::take(&mut link.welcome.tasks),
                    std::time::Instant::now(),
                );
                let conn = Arc::new(Connection {
                    queue: link.queue.clone(),
                    pending: Pending::default(),
                });
                if let Some(restore) = restore {
                    // Before anything else this node sends: a cancel made right after
                    // the reconnect finds the task it cancels.
                    core.restore_schedule(&conn, restore).await;
                }
                *write(&core.connection) = Some(conn.clone());
                // Callbacks registered while the Hello was on its way.
                core.announce();
                tracing::info!(process = %core.name, controller = %core.config.controller_peer(), "connected to the controller");
                core.emit(NodeEvent::Connected);
                core.report(changes);
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
                let reason = link.run(&core, &conn, &mut closed).await;
                if core.is_stopped() {
                    // This handle on the queue kept the writer from finishing (so every
                    // stop waited the whole drain): with it gone, the writer sends
                    // what is queued, closes, and the drain ends.
                    drop(conn);
                    link.drain().await;
                    break;
                }
                tracing::warn!(process = %core.name, %reason, "lost the controller; reconnecting");
                // At once, before anything else: calls in flight fail, and calls made
                // from now on fail without waiting (the old writer is not drained: what
                // it held cannot reach anyone). Close first: a call racing this sees a
                // closed connection, never an emptied membership view it would
                // misreport as "nobody serves it".
                conn.pending
                    .close(|| core.unreachable(&format!("connection lost ({reason})")));
                *write(&core.connection) = None;
                link.abort();
                let changes = core.membership.reset(Vec::new());
                core.emit(NodeEvent::Disconnected);
                core.report(changes);
            }
            Err(Error::Stopped) => {
                // Only the controller of this process says so: it stopped with the
                // Global, for good. Nothing to reconnect to.
                tracing::info!(process = %core.name, "the controller in this process stopped; not reconnecting");
                break;
            }
            Err(e) => {
                // Refusals a retry cannot fix: fail `start` at once rather than after
                // `connect_timeout`. Once connected, the node keeps trying (the
                // controller may come back configured as before).
                let fatal = matches!(
                    e,
                    Error::DuplicateProcessName { .. }
                        | Error::Refused { .. }
                        | Error::Protocol { .. }
                        | Error::AuthenticationFailed { .. }
                        | Error::Tls { .. }
                        | Error::UnsafeSocket { .. }
                );
                match first.take() {
                    Some(tx) if fatal || Instant::now() >= give_up_at => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    still_first => first = still_first,
                }
                if matches!(
                    e,
                    Error::AuthenticationFailed { .. }
                        | Error::Tls { .. }
                        | Error::UnsafeSocket { .. }
                ) {
                    tracing::warn!(process = %core.name, error = %e, "the controller refused this node; retrying");
                } else {
                    tracing::debug!(process = %core.name, error = %e, "connecting to the controller failed; retrying");
                }
            }
        }
        let mut stopping = core.stopped.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
    }
}

/// Capped exponential backoff with jitter: 50 ms, 100 ms, ... up to 2 s, each +-25 %.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let base = 50u64.saturating_mul(1 << self.attempt.min(6)).min(2_000);
        self.attempt += 1;
        let jitter = fastrand::u64(0..=base / 2);
        Duration::from_millis(base - base / 4 + jitter)
    }
}
