//! One NATS connection per process, shared by its nodes.
//!
//! A NATS server keeps about 50 KiB for every client connection (its buffers and two
//! goroutines), and 1-1.6 KiB for a subscription: 10,000 nodes with a connection each
//! cost the server over 800 MiB, and each join a TCP (and TLS) handshake. So, as NATS
//! advises for the clients of one process:
//! - the nodes of a process that run on the same tokio runtime with the same settings
//!   (servers, credentials, token, TLS files, connect timeout) share one connection.
//!   Each keeps its own request and probe subscriptions, heartbeat and membership
//!   entries: a node's liveness is its heartbeat, never the connection, so closing one
//!   node leaves the others as they were. The connection closes when the last node
//!   using it is dropped, and is named after the node that opened it (the name the
//!   server's monitoring shows). Nodes on different runtimes never share: the client's
//!   I/O task lives on the runtime that opened it, and ends with it.
//! - a subject that every node follows alike (the scheduler lease's announcements) takes
//!   one subscription per connection (see [`Connection::follow`]);
//! - the replies to all the nodes' calls come under one inbox of the connection, each
//!   node's under its own token (`<inbox>.<node>.<name>.<id>`), read by one task (see
//!   [`ReplyRoutes`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use super::{connect, unreachable_by, NatsConfig, NatsMesh, Subjects};
use crate::error::Result;
use crate::sync::lock;

/// How many messages of a followed subject wait for a node that is behind; older ones
/// are dropped for it (the lease's announcements come seconds apart).
const FOLLOWED_BACKLOG: usize = 16;

/// The client's connection events, for one node.
pub(super) type Events = mpsc::UnboundedReceiver<async_nats::Event>;

/// What two nodes must have in common to share a connection.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Settings {
    runtime: tokio::runtime::Id,
    urls: String,
    credentials: Option<PathBuf>,
    token: Option<String>,
    tls: Option<[Option<PathBuf>; 3]>,
    connect_timeout: Duration,
}

impl Settings {
    fn of(config: &NatsConfig) -> Settings {
        Settings {
            runtime: tokio::runtime::Handle::current().id(),
            urls: config.urls.clone(),
            credentials: config.credentials.clone(),
            token: config.auth_token.as_ref().map(|t| t.expose().to_string()),
            tls: config.tls.as_ref().map(|_| config.tls_files.clone()),
            connect_timeout: config.connect_timeout,
        }
    }
}

/// The connection of a set of [`Settings`], while some node uses it. Locked while it is
/// being opened, so that the nodes of a mass start wait for the first one's connection
/// instead of each opening their own.
type Slot = Arc<tokio::sync::Mutex<Weak<Connection>>>;

/// The connections of this process.
static OPEN: LazyLock<Mutex<HashMap<Settings, Slot>>> = LazyLock::new(Default::default);

/// A client connection and the nodes that listen to its events.
pub(super) struct Connection {
    client: async_nats::Client,
    listeners: Arc<Listeners>,
    /// The subjects its nodes follow alike, each to the task that reads its one
    /// subscription (see [`Connection::follow`]).
    followed: Mutex<HashMap<String, broadcast::WeakSender<async_nats::Message>>>,
    replies: Arc<ReplyRoutes>,
    /// Dropped with the connection: the task that reads the replies ends.
    _reading_replies: oneshot::Sender<()>,
}

impl Connection {
    /// The connection for a node `name` with `config`: the one this process already has
    /// for the same settings on this runtime, or a new one (retried until `give_up_at`,
    /// see [`connect`]). Returns it with the node's own receiver of its events.
    pub(super) async fn open(
        config: &NatsConfig,
        name: &str,
        give_up_at: Instant,
    ) -> Result<(Arc<Connection>, Events)> {
        let slot = slot(Settings::of(config));
        let mut held = tokio::time::timeout_at(give_up_at, slot.lock())
            .await
            .map_err(|_| {
                unreachable_by(
                    &config.urls,
                    "",
                    "timed out waiting for this process's connection to open",
                )
            })?;
        let connection = match held.upgrade() {
            Some(connection) => {
                tracing::debug!(process = %name, opened_by = %connection.listeners.opened_by, "sharing this process's NATS connection");
                connection
            }
            None => {
                let listeners = Arc::new(Listeners::new(name));
                let client = connect(config, name, give_up_at, listeners.clone()).await?;
                let replies = Arc::new(ReplyRoutes::new(client.new_inbox()));
                let subscriber = client
                    .subscribe(format!("{}.*.*.*", replies.inbox))
                    .await
                    .map_err(|e| unreachable_by(&config.urls, "subscribing failed: ", e))?;
                let (reading_replies, stop) = oneshot::channel();
                tokio::spawn(route_replies(replies.clone(), subscriber, stop));
                let connection = Arc::new(Connection {
                    client,
                    listeners,
                    followed: Mutex::default(),
                    replies,
                    _reading_replies: reading_replies,
                });
                *held = Arc::downgrade(&connection);
                connection
            }
        };
        drop(held);
        let events = connection.listeners.add();
        Ok((connection, events))
    }

    /// The client, to clone into the node.
    pub(super) fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// A node's own inbox for the replies to its calls (see [`Subjects::reply_inbox`]):
    /// what comes there is handed to `node`'s `complete` while it lives, until it closes.
    /// The route is taken away when the returned [`ReplyRoute`] drops.
    pub(super) fn route_replies(&self, node: Weak<NatsMesh>, name: &str) -> ReplyRoute {
        let id = self.replies.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.replies.nodes).insert(id, node);
        ReplyRoute {
            inbox: Subjects::reply_inbox(&format!("{}.{id}", self.replies.inbox), name),
            id,
            routes: self.replies.clone(),
        }
    }

    /// The messages on `subject`, for one node: the nodes that follow it share one
    /// subscription, read by a task that ends when the last of them drops its receiver.
    /// The receiver is closed if subscribing failed (logged) or the subscription ended.
    pub(super) fn follow(&self, subject: &str) -> broadcast::Receiver<async_nats::Message> {
        let mut followed = lock(&self.followed);
        let live = followed
            .get(subject)
            .and_then(broadcast::WeakSender::upgrade)
            .filter(|sender| sender.receiver_count() > 0);
        if let Some(sender) = live {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(FOLLOWED_BACKLOG);
        followed.retain(|_, sender| sender.strong_count() > 0);
        followed.insert(subject.to_string(), sender.downgrade());
        tokio::spawn(read_followed(
            self.client.clone(),
            subject.to_string(),
            sender,
        ));
        receiver
    }
}

/// The nodes whose replies come to the connection's inbox, by their token there.
struct ReplyRoutes {
    /// `_INBOX.<unique>`: the node's token, its name and the reply's own token follow.
    inbox: String,
    next: AtomicU64,
    nodes: Mutex<HashMap<u64, Weak<NatsMesh>>>,
}

impl ReplyRoutes {
    fn new(inbox: String) -> ReplyRoutes {
        ReplyRoutes {
            inbox,
            next: AtomicU64::new(0),
            nodes: Mutex::default(),
        }
    }

    /// The node that `subject` (`<inbox>.<node>.<name>.<token>`) is a reply to.
    fn node_of(&self, subject: &str) -> Option<Arc<NatsMesh>> {
        let id = subject.rsplit('.').nth(2)?.parse().ok()?;
        lock(&self.nodes).get(&id)?.upgrade()
    }
}

/// A node's inbox for its replies; the route to it ends when this drops.
pub(super) struct ReplyRoute {
    /// `<connection inbox>.<node>.<escaped name>`.
    pub(super) inbox: String,
    id: u64,
    routes: Arc<ReplyRoutes>,
}

impl Drop for ReplyRoute {
    fn drop(&mut self) {
        lock(&self.routes.nodes).remove(&self.id);
    }
}

/// Hands each reply to the node it is for (a closed node takes none), until the
/// connection drops `stop`.
async fn route_replies(
    routes: Arc<ReplyRoutes>,
    mut replies: async_nats::Subscriber,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            Some(reply) = replies.next() => {
                match routes.node_of(&reply.subject) {
                    Some(node) if !node.is_closed() => node.complete(reply),
                    _ => tracing::trace!(subject = %reply.subject, "a reply for a node that is gone"),
                }
            }
            _ = &mut stop => return,
            else => return,
        }
    }
}

/// Reads the one subscription to `subject` into `nodes`, until none of them listens.
async fn read_followed(
    client: async_nats::Client,
    subject: String,
    nodes: broadcast::Sender<async_nats::Message>,
) {
    let mut subscriber = match client.subscribe(subject.clone()).await {
        Ok(subscriber) => subscriber,
        Err(e) => {
            tracing::warn!(%subject, error = %e, "could not subscribe");
            return;
        }
    };
    loop {
        tokio::select! {
            message = subscriber.next() => match message {
                Some(message) => {
                    let _ = nodes.send(message);
                }
                None => return,
            },
            _ = nodes.closed() => return,
        }
    }
}

/// The slot of `settings`; forgets the slots no node uses any more.
fn slot(settings: Settings) -> Slot {
    let mut open = lock(&OPEN);
    open.retain(|_, slot| {
        Arc::strong_count(slot) > 1 || slot.try_lock().map_or(true, |c| c.strong_count() > 0)
    });
    open.entry(settings).or_default().clone()
}

/// The nodes that share a connection, each told of its events.
pub(super) struct Listeners {
    /// The node that opened the connection, in logs.
    opened_by: String,
    senders: Mutex<Vec<mpsc::UnboundedSender<async_nats::Event>>>,
    /// Messages the client dropped because a subscription of one of the nodes was read
    /// too slowly.
    dropped: AtomicU64,
}

impl Listeners {
    fn new(opened_by: &str) -> Listeners {
        Listeners {
            opened_by: opened_by.to_string(),
            senders: Mutex::default(),
            dropped: Default::default(),
        }
    }

    fn add(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.senders).push(tx);
        rx
    }

    /// Hands `event` to every node still listening. A dropped message is logged here,
    /// once for the connection: the client does not say which subscription, so not which
    /// node, overflowed (the first, then one line per thousand).
    pub(super) fn tell(&self, event: async_nats::Event) {
        let mut senders = lock(&self.senders);
        if let async_nats::Event::SlowConsumer(_) = event {
            let dropped = 1 + self.dropped.fetch_add(1, Ordering::Relaxed);
            if dropped == 1 || dropped % 1000 == 0 {
                tracing::warn!(
                    connection = %self.opened_by,
                    nodes = senders.len(),
                    dropped,
                    "a node on this NATS connection reads its messages too slowly: the client dropped some"
                );
            }
            return;
        }
        senders.retain(|node| node.send(event.clone()).is_ok());
    }
}
