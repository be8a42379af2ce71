//! The NATS backend: the same mesh over a NATS cluster (DESIGN.md section 9).
//!
//! - **calls** go to a node's own subject (`<ns>.node.<process>.<callback>`, see
//!   [`subjects`]), chosen from the membership view: at random among the providers, or
//!   the one named by `.on`; never this node. Replies come back on this node's inbox,
//!   under its connection's (one subscription for the nodes that share the
//!   connection: `connection`), and complete the calls through a [`Pending`] table
//!   (`caller`).
//! - **incoming requests** arrive on `<ns>.node.<this node>.*` (`incoming`).
//! - **membership** lives in two replicated JetStream KV buckets (`members`): the
//!   claims on the names in `<ns>-alive` (created atomically, renewed by a heartbeat,
//!   expired by the bucket's age limit when a node dies; nobody watches them), and the
//!   nodes and the providers of each callback in `<ns>-nodes`, written only when
//!   something changes. A node watches the providers of the names it uses, or every
//!   node once it asks for them; the holder of the scheduler lease removes the nodes
//!   that died.
//! - **streams**, both ways: messages to the caller on its inbox (`<inbox>.s<call id>`),
//!   to the callee on `<ns>.node.<callee>.~streams`; credit and cancel from the reader,
//!   probes both ways so that either side learns at once that the other died
//!   (`streams`).
//! - **large payloads** (over the server's `max_payload`) are split and joined, with
//!   flow control (`chunks`).
//! - **schedules** (PERIOD) live in the replicated KV bucket `<ns>-schedules`, fired
//!   by one node at a time, the holder of a lease in `<ns>-scheduler`, which it
//!   announces on `<ns>.lease` to the others, less often the larger the mesh, and
//!   answers for on `<ns>.lease.holder` (`schedules`); the call counters of
//!   `controller_stats` are not available (no process sees every call).
//! - **reconnects** are async-nats's: across the cluster's servers (the ones given and
//!   the ones it learns). Losing the connection fails the calls in flight; the view
//!   is kept, and brought up to date by a new watch once the connection is back.
//! - **starting** retries taking the name and writing the node's entries until
//!   `connect_timeout` (a fresh cluster answers "no responders" until its buckets have
//!   leaders), with daffi's own KV requests (`kv`: no stream info, a bucket created by
//!   its first request if missing); a name held by a node that crashed is taken over at
//!   once.
//!
//! Bounds when one server of three is killed (SIGKILL, clients given only its URL;
//! `tests/nats.rs` and `tests/nats_schedules.rs`, 10 runs each): calls fail with named
//! errors (`ControllerUnreachable` while reconnecting) for at most 6.5 ms, one failed
//! call per run (test bound 3 s), since calls go to the nodes' subjects from a view
//! that the buckets' leader election does not touch; schedule runs pause 0.2-6.5 s
//! (test bound 15 s): a run is claimed by a write to the schedules bucket, which waits
//! for the bucket's new leader (NATS's election timeout, 4-9 s) when the killed server
//! led it, and for the JetStream meta group's when it led that (on a loaded 2-core
//! machine, pauses of 0.2-8.4 s in 15 of 16 runs, and 13.1 s once, JetStream
//! "temporarily unavailable" for 12 s). No membership entry or schedule is lost.

mod caller;
mod chunks;
mod connection;
mod flow;
mod incoming;
mod kv;
mod members;
mod schedules;
mod streams;
mod subjects;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::streams::{IncomingStreams, SentStreams};
use super::{check_callback_list, Changes, Membership, NodeEvent, Pending};
use crate::auth::AuthToken;
use crate::error::{Error, Result};
use crate::executor::Executor;
use members::{MemberRecord, RecordCommand, Wants};
use schedules::Schedules;
pub use subjects::check_namespace;
use subjects::Subjects;

/// Room kept in every message for its headers: payloads larger than the server's
/// `max_payload` less this are sent in chunks.
const HEADER_ROOM: usize = 1024;

/// How long a JetStream API request (opening or creating a bucket, starting a watch)
/// waits for its answer, instead of async-nats's 10 s: when several nodes create a
/// bucket at once or a bucket elects a leader, some requests get no answer, and are
/// better tried again soon. Calls set their own timeouts.
const API_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of a node on a NATS cluster.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URLs, comma-separated.
    pub urls: String,
    /// Keeps meshes apart on one cluster (subjects and bucket names).
    pub namespace: String,
    /// A NATS `.creds` file.
    pub credentials: Option<PathBuf>,
    pub auth_token: Option<AuthToken>,
    pub tls: Option<rustls::ClientConfig>,
    /// What `tls` was built from (CA, client certificate, client key): nodes with the
    /// same files may share a connection.
    pub tls_files: [Option<PathBuf>; 3],
    pub connect_timeout: Duration,
    pub max_frame_size: usize,
    /// How long a call without a timeout waits for credit towards a callee that is
    /// behind before it fails with `SlowConsumer` (`stall_timeout`).
    pub stall_timeout: Duration,
    /// Keep every other node in the view from the start (the membership hooks and a
    /// producer of streams need it); otherwise only what the node asks for.
    pub whole_view: bool,
}

/// A node's side of a NATS cluster: everything its tasks share.
pub struct NatsMesh {
    /// This node itself, for the task a stream call starts from `&self`.
    me: Weak<NatsMesh>,
    name: Arc<str>,
    config: NatsConfig,
    subjects: Subjects,
    client: async_nats::Client,
    /// The process's connection this node shares (see `connection`): kept open while
    /// the node lives.
    connection: Arc<connection::Connection>,
    executor: Arc<Executor>,
    membership: Membership,
    /// What the membership watch covers (see `members`).
    wants: watch::Sender<Wants>,
    /// Calls this node waits on; failed (not closed) when the connection drops.
    pending: Arc<Pending>,
    /// Where replies to this node's calls come: `<inbox>.<call id>` (the inbox names
    /// this node, see [`Subjects::reply_inbox`]), and the connection's route of them to
    /// this node (see `connection`), taken away when the node drops.
    replies: connection::ReplyRoute,
    /// The streams of results this node produces, by the inbox of their caller and
    /// call id.
    served: SentStreams,
    /// The streams of arguments this node feeds to its callees, by this node's inbox
    /// (where their credit comes) and call id.
    feeds: SentStreams,
    /// The streams of arguments callers feed to this node's callbacks, by the caller's
    /// inbox and call id.
    incoming: IncomingStreams,
    /// Stream calls whose caller feeds arguments, until their task has published the
    /// request: the feed's items wait for it (see `streams`).
    unsent: std::sync::Mutex<std::collections::HashMap<u64, oneshot::Receiver<()>>>,
    /// The credit of this node's calls towards each callee; acks come to
    /// `<inbox>.w<window id>`.
    windows: flow::Windows,
    /// The largest arguments a request may carry (`max_frame_size`).
    size_limit: usize,
    /// The largest payload one message carries; larger ones go in chunks.
    chunk_size: usize,
    /// Whether the client is connected to a server now.
    connected: watch::Sender<bool>,
    /// How many times the client lost its server: a stream produced across a loss may
    /// have lost items on the way.
    losses: AtomicU64,
    /// Set when stopping begins: no new calls from here, no new requests run here.
    stopped: watch::Sender<bool>,
    /// Set once the goodbye is done (the membership entry deleted, or given up).
    finished: watch::Sender<bool>,
    /// The PERIOD tasks and the lease of the node that fires them.
    schedules: Schedules,
    /// To the task that owns this node's membership entry.
    record: mpsc::UnboundedSender<RecordCommand>,
    events: mpsc::UnboundedSender<NodeEvent>,
    /// `close` ran: the node's tasks end.
    closed: watch::Sender<bool>,
}

impl NatsMesh {
    /// Connects, takes this node's name and writes its membership entries with daffi's
    /// own KV requests (no bucket opened: see `kv`; each step tried
    /// again until `connect_timeout` while the cluster is unreachable or electing
    /// leaders), and starts serving; returns once the node has its first view of the
    /// others.
    pub async fn start(
        config: NatsConfig,
        executor: Arc<Executor>,
        events: mpsc::UnboundedSender<NodeEvent>,
    ) -> Result<Arc<Self>> {
        check_namespace(&config.namespace).map_err(Error::Config)?;
        let give_up_at = Instant::now() + config.connect_timeout;
        let (connection, client_events) =
            connection::Connection::open(&config, &executor.name, give_up_at).await?;
        let client = connection.client().clone();
        let chunk_size = client
            .server_info()
            .max_payload
            .saturating_sub(HEADER_ROOM)
            .max(1);
        check_callback_list(
            &executor.callback_names(),
            chunk_size.min(config.max_frame_size),
        )?;
        let name = executor.name.clone();
        let subjects = Subjects::new(&config.namespace);
        let requests = client
            .subscribe(subjects.node_inbox(&name))
            .await
            .map_err(|e| unreachable_by(&config.urls, "subscribing failed: ", e))?;
        let record = MemberRecord::new(executor.callback_names());
        let probes = client
            .subscribe(subjects.node_alive(&name, record.instance))
            .await
            .map_err(|e| unreachable_by(&config.urls, "subscribing failed: ", e))?;
        let urls = &config.urls;
        // On a cluster that just started, JetStream answers "no responders" until the
        // buckets' replicas have elected their leaders: these steps are tried again. The
        // buckets are not opened (no stream info): their first request creates them if
        // the servers say they are not there (see `kv`).
        let buckets = members::buckets(&client, &subjects, urls);
        let revision = retrying(give_up_at, "taking the process name", || {
            members::take_name(&client, &subjects, &buckets.alive, &name, &record, urls)
        })
        .await?;
        retrying(give_up_at, "joining the membership", || async {
            members::publish(&buckets.nodes, &name, &record)
                .await
                .map_err(|e| unreachable_by(urls, "could not write the membership entries: ", e))
        })
        .await?;
        let schedules = Schedules::new(
            &client,
            &config.namespace,
            &config.urls,
            config.connect_timeout,
        );
        let (record_tx, record_rx) = mpsc::unbounded_channel();
        let mesh = Arc::new_cyclic(|me| {
            let replies = connection.route_replies(me.clone(), &name);
            NatsMesh {
                me: me.clone(),
                name,
                subjects,
                client,
                connection,
                executor,
                membership: Membership::new(config.whole_view),
                wants: watch::channel(Wants::new(config.whole_view)).0,
                pending: Arc::default(),
                served: SentStreams::default(),
                feeds: SentStreams::default(),
                incoming: IncomingStreams::default(),
                unsent: Default::default(),
                windows: flow::Windows::new(&replies.inbox),
                replies,
                size_limit: config.max_frame_size,
                chunk_size,
                connected: watch::channel(true).0,
                losses: AtomicU64::new(0),
                stopped: watch::channel(false).0,
                finished: watch::channel(false).0,
                schedules,
                record: record_tx,
                events,
                closed: watch::channel(false).0,
                config,
            }
        });
        tokio::spawn(incoming::serve_requests(mesh.clone(), requests));
        tokio::spawn(members::answer_probes(mesh.clone(), probes));
        tokio::spawn(members::keep_record(
            mesh.clone(),
            buckets.clone(),
            record,
            revision,
            record_rx,
        ));
        let (first_view, first_view_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(members::watch_members(
            mesh.clone(),
            buckets.nodes.clone(),
            first_view,
        ));
        tokio::spawn(members::reap_dead(mesh.clone(), buckets));
        tokio::spawn(follow_connection(mesh.clone(), client_events));
        tokio::spawn(schedules::lead(mesh.clone()));
        first_view_rx.await.map_err(|_| Error::Stopped)??;
        tracing::info!(process = %mesh.name, servers = %mesh.config.urls, namespace = %mesh.config.namespace, "connected to the NATS cluster");
        mesh.emit(NodeEvent::Connected);
        Ok(mesh)
    }

    fn emit(&self, event: NodeEvent) {
        let _ = self.events.send(event);
    }

    fn report(&self, changes: Changes) {
        if !changes.removed.is_empty() {
            tracing::debug!(process = %self.name, removed = ?changes.removed, "members left the view");
        }
        for (gone, stopped) in &changes.gone {
            self.pending.fail_target(gone, *stopped);
            self.windows.close(gone);
        }
        for name in changes.added {
            self.emit(NodeEvent::MemberAdded(name));
        }
        for name in changes.removed {
            self.emit(NodeEvent::MemberRemoved(name));
        }
    }

    /// This node's inbox for the replies to its calls.
    fn inbox(&self) -> &str {
        &self.replies.inbox
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    fn unreachable(&self, reason: &str) -> Error {
        Error::unreachable(nats_address(&self.config.urls), reason)
    }

    /// The client lost its server: calls in flight fail (their replies may be lost),
    /// the streams this node produces end at their next item (theirs may be lost too),
    /// and new calls fail until it is back. The view stays: the membership lives in the
    /// cluster, not in this connection, and is most likely the same once the client
    /// is back (the watch then corrects it), so calls work again at once.
    fn lost_connection(&self) {
        if !self.connected.send_replace(false) {
            return;
        }
        tracing::warn!(process = %self.name, "lost the NATS server; reconnecting");
        self.pending
            .fail_all(|| self.unreachable("connection to the NATS server lost"));
        self.losses.fetch_add(1, Ordering::Relaxed);
        self.emit(NodeEvent::Disconnected);
    }

    /// The client is connected again: the membership entry is renewed at once, and the
    /// view brought up to date (by a new watch).
    fn regained_connection(&self) {
        if self.connected.send_replace(true) {
            return;
        }
        tracing::info!(process = %self.name, "reconnected to the NATS cluster");
        let _ = self.record.send(RecordCommand::Renew);
        self.emit(NodeEvent::Connected);
    }

    /// See [`Mesh::begin_stop`](super::Mesh::begin_stop).
    fn stop_calls(&self) -> bool {
        if self.stopped.send_replace(true) {
            return false;
        }
        self.pending.close(|| Error::Stopped);
        let _ = self.record.send(RecordCommand::Leaving);
        tracing::info!(process = %self.name, "node stopping");
        true
    }

    /// See [`Mesh::close`](super::Mesh::close).
    fn say_goodbye(&self) {
        self.stop_calls();
        if self.closed.send_replace(true) {
            return;
        }
        let _ = self.record.send(RecordCommand::Goodbye);
        self.served.cancel_all();
        self.feeds.cancel_all();
        self.incoming.fail_all();
        self.executor.retire();
        self.membership.reset(Vec::new());
        tracing::info!(process = %self.name, "node stopped");
    }

    /// Waits (up to a second) for the goodbye and the last replies to go out.
    async fn goodbye_sent(&self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut finished = self.finished.subscribe();
        let _ = tokio::time::timeout_at(deadline, finished.wait_for(|f| *f)).await;
        let _ = tokio::time::timeout_at(deadline, self.client.flush()).await;
    }
}

/// Resolves once `flag` is `value` (never, if its sender is gone).
async fn until(flag: &mut watch::Receiver<bool>, value: bool) {
    if flag.wait_for(|v| *v == value).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The address in errors: the servers given.
fn nats_address(urls: &str) -> String {
    format!("NATS {urls}")
}

/// [`Error::ControllerUnreachable`] for the cluster at `urls`, because of `cause`.
fn unreachable_by(urls: &str, reason: &str, cause: impl std::fmt::Display) -> Error {
    Error::unreachable(nats_address(urls), format!("{reason}{cause}"))
}

/// Connects to one of the servers in `config` for the node `name`, retrying until
/// `give_up_at`; fails at once when a retry cannot help (authentication, TLS, bad
/// options). The connection's events go to `listeners`.
async fn connect(
    config: &NatsConfig,
    name: &str,
    give_up_at: Instant,
    listeners: Arc<connection::Listeners>,
) -> Result<async_nats::Client> {
    let servers = server_addresses(&config.urls)?;
    retrying(give_up_at, "connecting to NATS", || async {
        let options = connect_options(config, name, listeners.clone()).await?;
        // async-nats bounds the TCP connect, not the wait for the server's greeting:
        // a server that accepts and says nothing (paused, overloaded, not NATS) would
        // hold the start past its `connect_timeout`.
        let attempt_ends = (Instant::now() + attempt_timeout(config)).min(give_up_at);
        match tokio::time::timeout_at(attempt_ends, options.connect(servers.as_slice())).await {
            Ok(connected) => connected.map_err(|e| connect_error(config, e)),
            Err(_) => Err(unreachable_by(
                &config.urls,
                "",
                "the server accepted the connection but did not greet the client in time (is it paused, overloaded, or not a NATS server?)",
            )),
        }
    })
    .await
}

/// How long one try at connecting may take (the client's own bound on each TCP
/// connect too).
fn attempt_timeout(config: &NatsConfig) -> Duration {
    config.connect_timeout.min(Duration::from_secs(5))
}

/// The named error of a failed connection: authentication and TLS failures apart.
fn connect_error(config: &NatsConfig, e: async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind as Kind;
    let urls = config.urls.as_str();
    match e.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => Error::AuthenticationFailed {
            address: nats_address(urls),
            reason: e.to_string(),
            remedy: auth_remedy(config),
        },
        Kind::Tls => Error::Tls {
            address: nats_address(urls),
            message: e.to_string(),
            source: Some(Box::new(e)),
        },
        // A failed handshake comes as an I/O error: no retry helps it.
        Kind::Io if is_tls_failure(&e) => Error::Tls {
            address: nats_address(urls),
            message: e.to_string(),
            source: Some(Box::new(e)),
        },
        _ => unreachable_by(urls, "", &e),
    }
}

/// What would let a refused node in: trusted credentials, or the right token.
fn auth_remedy(config: &NatsConfig) -> String {
    match &config.credentials {
        Some(path) => format!(
            "the user of nats_credentials `{}` must belong to an account the server trusts, and not be expired or revoked",
            path.display()
        ),
        None => crate::error::TOKEN_REMEDY.to_string(),
    }
}

/// Whether rustls is behind `error` (a certificate refused by either side).
fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if e.is::<rustls::Error>() || inner.is_some_and(|i| i.is::<rustls::Error>()) {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Runs `step` until it succeeds, fails with an error a retry cannot help (anything but
/// [`Error::ControllerUnreachable`]: a taken name, authentication, TLS), or `give_up_at`
/// passes; waits about 50 ms after the first failure, doubling up to about a second,
/// each wait drawn from half to one and a half times that, so that the nodes of a mass
/// start that failed together do not all try again in the same instant.
async fn retrying<T, F, Fut>(give_up_at: Instant, what: &str, mut step: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(50);
    loop {
        match step().await {
            Err(error @ Error::ControllerUnreachable { .. }) if Instant::now() < give_up_at => {
                tracing::debug!(%error, "{what} failed; trying again");
            }
            done => return done,
        }
        let wait = delay.mul_f64(0.5 + fastrand::f64());
        tokio::time::sleep(wait.min(give_up_at.saturating_duration_since(Instant::now()))).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// The servers in `urls` (comma-separated).
fn server_addresses(urls: &str) -> Result<Vec<async_nats::ServerAddr>> {
    let servers: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse()
                .map_err(|e| Error::Config(format!("`{url}` is not a NATS server URL: {e}")))
        })
        .collect::<Result<_>>()?;
    if servers.is_empty() {
        return Err(Error::Config(
            "nats(..) needs at least one server URL, like `nats://127.0.0.1:4222`".into(),
        ));
    }
    Ok(servers)
}

/// The client's options from the node's: credentials, token, TLS, its name (the node
/// `name` that opens it, so that the server's monitoring shows whose connection it
/// is), and its events told to `listeners`.
async fn connect_options(
    config: &NatsConfig,
    name: &str,
    listeners: Arc<connection::Listeners>,
) -> Result<async_nats::ConnectOptions> {
    let mut options = match &config.credentials {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| {
                Error::Config(format!(
                    "nats_credentials `{}` is not a usable NATS credentials file: {e}",
                    path.display()
                ))
            })?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(token) = &config.auth_token {
        options = options.token(token.expose().to_string());
    }
    if let Some(tls) = &config.tls {
        options = options.require_tls(true).tls_client_config(tls.clone());
    }
    Ok(options
        .name(name)
        .connection_timeout(attempt_timeout(config))
        // A call fails once the connection is lost; there is no point in buffering
        // much for a server that is not there.
        .client_capacity(4096)
        .request_timeout(Some(API_TIMEOUT))
        .subscription_capacity(flow::SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            listeners.tell(event);
            std::future::ready(())
        }))
}

/// Follows the client's connection events until the node stops.
async fn follow_connection(mesh: Arc<NatsMesh>, mut events: connection::Events) {
    let mut closed = mesh.closed.subscribe();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = until(&mut closed, true) => None,
        };
        let Some(event) = event else { return };
        match event {
            async_nats::Event::Disconnected => mesh.lost_connection(),
            async_nats::Event::Connected => mesh.regained_connection(),
            other => tracing::debug!(process = %mesh.name, event = %other, "NATS client event"),
        }
    }
}
