//! The built-in backend: the node's link to a controller (with reconnects), the calls
//! it waits on, and the replica of the controller's schedules.

mod book;
mod caller;
mod incoming;
mod link;
mod streams;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::streams::{IncomingStreams, SentStreams};
use super::{check_callback_list, Changes, Membership, NodeEvent, Pending};
use crate::auth::AuthToken;
use crate::controller::InProcessDoor;
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::protocol::message::{self, Announce, ControlAnswer};
use crate::sync::{read, write};
use crate::transport::{Address, ClientTls, IN_PROCESS_PEER};
use daffi_wire::{FrameSender, Kind};

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub address: Address,
    pub max_frame_size: usize,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub auth_token: Option<AuthToken>,
    /// How the node reaches the controller.
    pub route: Route,
    /// Bytes queued for the controller before a sender waits for room.
    pub max_queue_bytes: usize,
    /// How long the controller may read nothing of what waits for it before the node
    /// drops the connection (and reconnects).
    pub stall_timeout: Duration,
    /// Keep every other node in the view from the start (the membership hooks need it);
    /// otherwise only what the node asks for, when it first needs it.
    pub whole_view: bool,
    /// A thread of this node may spin for its reply, and read it from a plaintext socket
    /// itself ([`SharedReads`](crate::transport::SharedReads)); otherwise the link's
    /// reads are the runtime's alone, with one descriptor less.
    pub own_replies: bool,
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

/// One live connection to the controller: where frames go, and the calls waiting on it.
pub struct Connection {
    queue: FrameSender,
    pending: Arc<Pending>,
}

/// The node's side of the controller link: everything its tasks share.
pub struct ControllerMesh {
    name: Arc<str>,
    config: NodeConfig,
    membership: Membership,
    /// A replica of the controller's scheduled tasks, given back to it if it restarts.
    book: book::ScheduleBook,
    /// Runs the requests that come in.
    executor: Arc<Executor>,
    connection: RwLock<Option<Arc<Connection>>>,
    announcing: tokio::sync::Mutex<()>,
    /// Held while a subscription is on its way: callers that need it wait for it.
    subscribing: tokio::sync::Mutex<()>,
    max_frame_size: AtomicUsize,
    /// Set when stopping begins: no new calls from here, no new requests routed here.
    stopped: watch::Sender<bool>,
    /// Set when the node is gone: the link closes, nothing reconnects.
    closed: watch::Sender<bool>,
    /// Set when the link task has ended (after flushing what was queued).
    link_done: watch::Sender<bool>,
    events: mpsc::UnboundedSender<NodeEvent>,
    /// The streams of results this node produces now, waiting on their callers' credit.
    served: Arc<SentStreams>,
    /// The streams of arguments this node feeds to its callees, waiting on their credit.
    feeds: Arc<SentStreams>,
    /// The streams of arguments callers feed to this node's callbacks.
    incoming: Arc<IncomingStreams>,
}

impl ControllerMesh {
    /// The link of a node whose requests `executor` runs; it connects once
    /// [`ControllerMesh::start`] runs. What happens to it is sent on `events` (dropped
    /// if nobody listens).
    pub fn new(
        config: NodeConfig,
        executor: Arc<Executor>,
        events: mpsc::UnboundedSender<NodeEvent>,
    ) -> Arc<Self> {
        Arc::new(ControllerMesh {
            name: executor.name.clone(),
            max_frame_size: AtomicUsize::new(config.max_frame_size),
            membership: Membership::new(config.whole_view),
            config,
            book: book::ScheduleBook::default(),
            executor,
            connection: RwLock::new(None),
            announcing: tokio::sync::Mutex::new(()),
            subscribing: tokio::sync::Mutex::new(()),
            stopped: watch::channel(false).0,
            closed: watch::channel(false).0,
            link_done: watch::channel(false).0,
            events,
            served: Arc::default(),
            feeds: Arc::default(),
            incoming: Arc::default(),
        })
    }

    /// Connects (retrying until `connect_timeout`), then keeps reconnecting in the
    /// background until the node stops. Returns once the first connection is up.
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        check_callback_list(&self.executor.callback_names(), self.config.max_frame_size)?;
        let (first_tx, first_rx) = oneshot::channel();
        let core = self.clone();
        tokio::spawn(async move {
            supervise(core.clone(), first_tx).await;
            core.link_done.send_replace(true);
        });
        first_rx.await.unwrap_or(Err(Error::Stopped))
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

    /// Whether this node asks for every other node (from the start, or since it first
    /// needed them); otherwise for the providers of the names it uses.
    fn asks_everything(&self) -> bool {
        self.config.whole_view || self.membership.everything_asked()
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
    fn announce_now(self: &Arc<Self>) {
        let core = self.clone();
        tokio::spawn(async move {
            let _in_order = core.announcing.lock().await;
            if let Some(queue) = core.queue() {
                let callbacks = core.executor.callback_names();
                let _ = queue
                    .send(message::control_frame(
                        Kind::Announce,
                        &Announce { callbacks },
                    ))
                    .await;
            }
        });
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
                match caller::answer(wait, &core.config.address).await {
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

    fn unreachable(&self, reason: &str) -> Error {
        Error::unreachable(&self.config.address, reason)
    }
}

/// The lifecycle half of the seam; the calling half is in `caller`.
impl ControllerMesh {
    /// See [`Mesh::begin_stop`](super::Mesh::begin_stop).
    fn stop_calls(&self) -> bool {
        if self.stopped.send_replace(true) {
            return false;
        }
        if let Some(conn) = self.connection() {
            conn.pending.close(|| Error::Stopped);
            // Past the byte limit if need be: calls queued ahead must not keep it back.
            let _ = conn
                .queue
                .push_unrefused(message::control_frame(Kind::Leaving, &()));
        }
        tracing::info!(process = %self.name, "node stopping");
        true
    }

    /// See [`Mesh::close`](super::Mesh::close).
    fn say_goodbye(&self) {
        self.stop_calls();
        if self.closed.send_replace(true) {
            return;
        }
        if let Some(conn) = write(&self.connection).take() {
            let _ = conn
                .queue
                .push_unrefused(message::control_frame(Kind::Goodbye, &()));
        }
        self.executor.retire();
        self.membership.reset(Vec::new());
        tracing::info!(process = %self.name, "node stopped");
    }

    /// Waits (up to a second) until the link has flushed and closed after the goodbye.
    async fn link_finished(&self) {
        let mut done = self.link_done.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(1), done.wait_for(|d| *d)).await;
    }

    fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }
}

/// Keeps the node connected: the first connection (retried until `connect_timeout`),
/// then reconnects with capped exponential backoff and jitter until the node stops.
async fn supervise(core: Arc<ControllerMesh>, first: oneshot::Sender<Result<()>>) {
    let mut first = Some(first);
    let give_up_at = Instant::now() + core.config.connect_timeout;
    let mut backoff = Backoff::default();
    let closed = core.closed.subscribe();
    // The calls of the last connection: the next one's call ids follow theirs.
    let mut previous = Arc::new(Pending::default());
    while !core.is_stopped() {
        match link::connect(&core, core.executor.callback_names()).await {
            Ok(mut link) => {
                backoff = Backoff::default();
                let limit = core
                    .config
                    .max_frame_size
                    .min(link.welcome.max_frame_size as usize);
                core.max_frame_size.store(limit, Ordering::Relaxed);
                // A controller that keeps no views tells every node everything.
                let whole = !link.welcome.views || core.asks_everything();
                let members = std::mem::take(&mut link.welcome.members);
                let changes = core.membership.welcome(members, whole);
                let restore = core.book.welcome(
                    link.welcome.instance,
                    std::mem::take(&mut link.welcome.tasks),
                    std::time::Instant::now(),
                );
                let pending = Pending::following(&previous).with_own_replies(
                    link.shared_reads.clone(),
                    limit,
                    link::complete_reply,
                );
                let conn = Arc::new(Connection {
                    queue: link.queue.clone(),
                    pending: Arc::new(pending),
                });
                previous = conn.pending.clone();
                if let Some(restore) = restore {
                    // Before anything else this node sends: a cancel made right after
                    // the reconnect finds the task it cancels.
                    core.restore_schedule(&conn, restore).await;
                }
                *write(&core.connection) = Some(conn.clone());
                // Callbacks registered while the Hello was on its way.
                core.announce_now();
                tracing::info!(process = %core.name, controller = %core.config.controller_peer(), "connected to the controller");
                core.emit(NodeEvent::Connected);
                core.report(changes);
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
                let reason = link.run(&core, &conn, &closed).await;
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
                core.served.cancel_all();
                core.feeds.cancel_all();
                core.incoming.fail_all();
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
