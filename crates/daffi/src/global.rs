//! [`Global`]: the entry point that starts a node (and maybe the controller) and makes calls.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::runtime::Handle;

use crate::auth::AuthToken;
use crate::blocking;
use crate::call::{unexpected_answer, Call};
use crate::callback::{static_callbacks, CallbackGroup, IntoCallback};
use crate::controller::{ControllerConfig, ControllerHandle};
use crate::error::{Error, Result};
use crate::hooks::{Hook, Hooks};
use crate::info::{ControllerStats, MemberInfo};
use crate::node::{NodeConfig, NodeCore, NodeEvent, Route};
use crate::period::ScheduledTaskInfo;
use crate::protocol::message::{ControlAnswer, ControlRequest};
use crate::protocol::{check_name, NameKind, MAX_AUTH_TOKEN};
use crate::sync::lock;
use crate::transport::{Address, ClientTls, ServerTls, UNIX_NO_TLS};
use daffi_wire::channel::{DEFAULT_MAX_QUEUE_BYTES, DEFAULT_STALL_TIMEOUT};
use daffi_wire::DEFAULT_MAX_FRAME_SIZE;

/// The TLS of a `Global`: its controller's side and its node's side.
type TlsSides = (Option<Arc<ServerTls>>, Option<Arc<ClientTls>>);

/// Configures and starts a [`Global`]. Create it with [`Global::builder`].
///
/// | option | default |
/// |---|---|
/// | [`process_name`](Self::process_name) | random, `node-` and 8 letters |
/// | [`init_controller`](Self::init_controller) | `false` |
/// | [`init_node`](Self::init_node) | `true` |
/// | [`host`](Self::host) / [`port`](Self::port) | unset: Unix socket `<temp dir>/daffi/.sock` |
/// | [`unix_sock_path`](Self::unix_sock_path) | unset |
/// | [`connect_timeout`](Self::connect_timeout) | 10 s |
/// | [`max_frame_size`](Self::max_frame_size) | 128 MiB |
/// | [`handshake_timeout`](Self::handshake_timeout) | 5 s |
/// | [`max_in_flight`](Self::max_in_flight) | 10,000 calls |
/// | [`max_concurrent_callbacks`](Self::max_concurrent_callbacks) | 1,024 async callbacks |
/// | [`max_sync_callbacks`](Self::max_sync_callbacks) | 1,024 sync callbacks (threads) |
/// | [`max_connections`](Self::max_connections) | 10,000 connections (controller) |
/// | [`max_queue_bytes`](Self::max_queue_bytes) | 64 MiB per connection |
/// | [`stall_timeout`](Self::stall_timeout) | 10 s |
/// | [`stop_timeout`](Self::stop_timeout) | 5 s |
/// | [`auth_token`](Self::auth_token) | the `DAFFI_AUTH_TOKEN` environment variable, or none (at most 1,024 bytes) |
/// | [`tls_cert`](Self::tls_cert) / [`tls_key`](Self::tls_key) (controller) | unset: no TLS |
/// | [`tls_client_ca`](Self::tls_client_ca) (controller) | unset: no client certificates asked |
/// | [`tls`](Self::tls) (node) | `false`; implied by the other node options below |
/// | [`tls_ca`](Self::tls_ca) (node) | unset: the system's trusted roots |
/// | [`tls_server_name`](Self::tls_server_name) (node) | the host connected to |
/// | [`tls_client_cert`](Self::tls_client_cert) / [`tls_client_key`](Self::tls_client_key) (node) | unset: no client certificate |
///
/// TLS is for TCP. Certificates and keys are PEM files, read once at start. A node
/// that runs beside its controller (`init_controller(true)`) reaches it in-process,
/// without TLS or token: the node options (and the token) then serve the other
/// processes of the mesh only. See `docs/SECURITY.md` for which setup protects against
/// what.
#[derive(Debug, Clone)]
#[must_use = "a GlobalBuilder does nothing until you call start() or start_async()"]
pub struct GlobalBuilder {
    process_name: Option<String>,
    init_controller: bool,
    init_node: bool,
    host: Option<String>,
    port: Option<u16>,
    unix_sock_path: Option<PathBuf>,
    connect_timeout: Duration,
    max_frame_size: usize,
    auth_token: Option<AuthToken>,
    handshake_timeout: Duration,
    max_in_flight: usize,
    max_concurrent_callbacks: usize,
    max_sync_callbacks: usize,
    max_connections: usize,
    max_queue_bytes: usize,
    stall_timeout: Duration,
    stop_timeout: Duration,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    tls: bool,
    tls_ca: Option<PathBuf>,
    tls_server_name: Option<String>,
    tls_client_cert: Option<PathBuf>,
    tls_client_key: Option<PathBuf>,
    hooks: Hooks,
}

impl Default for GlobalBuilder {
    fn default() -> Self {
        GlobalBuilder {
            process_name: None,
            init_controller: false,
            init_node: true,
            host: None,
            port: None,
            unix_sock_path: None,
            connect_timeout: Duration::from_secs(10),
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            auth_token: None,
            handshake_timeout: Duration::from_secs(5),
            max_in_flight: 10_000,
            max_concurrent_callbacks: 1_024,
            max_sync_callbacks: 1_024,
            max_connections: 10_000,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            stop_timeout: Duration::from_secs(5),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls: false,
            tls_ca: None,
            tls_server_name: None,
            tls_client_cert: None,
            tls_client_key: None,
            hooks: Hooks::default(),
        }
    }
}

impl GlobalBuilder {
    /// The node's unique name among the nodes of one controller. Default: random.
    pub fn process_name(mut self, name: impl Into<String>) -> Self {
        self.process_name = Some(name.into());
        self
    }

    /// Whether this process runs the controller. Default: `false`. Its own node (unless
    /// [`init_node(false)`](Self::init_node)) then reaches it in-process: no socket, no
    /// TLS, no token, whatever the controller's certificate or token; other nodes
    /// connect to its address.
    pub fn init_controller(mut self, yes: bool) -> Self {
        self.init_controller = yes;
        self
    }

    /// Whether this process runs a node (to call and serve). Default: `true`. A process
    /// that only runs the controller sets `init_controller(true).init_node(false)`.
    pub fn init_node(mut self, yes: bool) -> Self {
        self.init_node = yes;
        self
    }

    /// Use TCP on this host. With no [`port`](Self::port), a controller started here
    /// picks a free one (read it back with [`Global::port`]).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Use TCP on this port (host defaults to `localhost`).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Use this Unix socket path instead of the default `<temp dir>/daffi/.sock`.
    pub fn unix_sock_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.unix_sock_path = Some(path.into());
        self
    }

    /// How long `start` keeps trying to reach a controller that is not up yet before it
    /// fails with [`Error::ControllerUnreachable`]. Default: 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Largest frame this process sends or accepts. A call whose arguments would exceed
    /// it fails before anything is sent. Under 1 MiB + 512 bytes, it also lowers what a
    /// node's callback names may take together (to this minus 512 bytes; see
    /// [`Global::register`]). Use the same value on every process. Default: 128 MiB.
    pub fn max_frame_size(mut self, bytes: usize) -> Self {
        self.max_frame_size = bytes;
        self
    }

    /// How long a new connection may take to complete the handshake (both sides): a
    /// controller closes connections that stay silent longer. Default: 5 s.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// How many calls this node may have in flight at once. Further calls wait for a
    /// slot (within their timeout), so a fast caller cannot queue without bound.
    /// Default: 10,000.
    pub fn max_in_flight(mut self, calls: usize) -> Self {
        self.max_in_flight = calls.max(1);
        self
    }

    /// How many async callbacks this node runs at once (they are tasks: cheap).
    /// Requests beyond it are refused at once, and their callers get
    /// [`Error::Overloaded`]. Sync callbacks have their own limit,
    /// [`max_sync_callbacks`](Self::max_sync_callbacks). Default: 1,024.
    pub fn max_concurrent_callbacks(mut self, callbacks: usize) -> Self {
        self.max_concurrent_callbacks = callbacks.max(1);
        self
    }

    /// How many sync callbacks this node runs (or has queued for a thread) at once, and
    /// so the most threads it starts for them: daffi's own, not tokio's blocking pool,
    /// so that they never wait for it, nor it for them. Requests beyond it are refused
    /// at once with [`Error::Overloaded`]; a full set of sync threads never refuses
    /// async callbacks. Default: 1,024, what sync and async callbacks shared before they
    /// had limits of their own, so that no burst that fitted then is refused now. Only
    /// slow callbacks cost threads (quick ones share one or two), and an idle thread
    /// costs its stack's address space (2 MiB), touched only as used.
    pub fn max_sync_callbacks(mut self, callbacks: usize) -> Self {
        self.max_sync_callbacks = callbacks.max(1);
        self
    }

    /// How many connections a controller started here accepts at once; more are closed
    /// at once (and logged). Default: 10,000. Connects not accepted yet wait in the
    /// listener's backlog (4,096, or the kernel's `net.core.somaxconn` if lower), so a
    /// mass start of nodes does not wait for the kernel's SYN retries.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// How many bytes one connection may hold for its peer, sent but not yet written to
    /// its socket (each frame counting 128 bytes more than its size, so that a flood of
    /// tiny frames is bounded too). Default: 64 MiB.
    ///
    /// In a controller started here, per node: a request to a node that holds this much
    /// already is not delivered, and its caller gets [`Error::SlowConsumer`] at once
    /// (one frame always passes when nothing is held, whatever its size). Frames a node
    /// cannot refuse (replies to its calls, membership events) pass the limit, up to a
    /// hard limit of twice the larger of this and [`max_frame_size`](Self::max_frame_size);
    /// a node that would pass it is disconnected. So a paused node costs the controller
    /// at most about this much memory. Calls with larger arguments in flight to one node
    /// at once need a larger limit.
    ///
    /// In a node, for its link to the controller: a call waits for room (within its
    /// timeout) once this much is queued.
    pub fn max_queue_bytes(mut self, bytes: usize) -> Self {
        self.max_queue_bytes = bytes.max(1);
        self
    }

    /// How long a connection may have something to write while its peer reads none of
    /// it; then the connection is closed. Default: 10 s (NATS's write deadline).
    ///
    /// A controller started here disconnects such a node (it is a slow consumer: paused,
    /// stuck, or far slower than its callers); the others hear that it left, and calls
    /// in flight to it get [`Error::PeerDisconnected`]. A node whose controller reads
    /// nothing drops the connection and reconnects. Any progress restarts the clock, so
    /// a large frame to a slow but reading peer is never cut. Must be longer than zero.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// How long [`Global::stop`] lets running callbacks finish. Default: 5 s.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// The shared secret. A controller started here refuses every node that does not
    /// present it (checked in constant time, before anything else from the connection is
    /// acted on); a node started here presents it. Unset: the `DAFFI_AUTH_TOKEN`
    /// environment variable if it is set (set but empty fails `start` with
    /// [`Error::Config`]); otherwise no token. At most 1,024 bytes (a longer one fails
    /// `start` with [`Error::Config`]): it travels in the small first frame a
    /// controller reads before it knows who is talking. The node of the process that runs
    /// the controller needs none: it reaches its controller in-process.
    ///
    /// A refused node fails with [`Error::AuthenticationFailed`]. Without TLS the token
    /// crosses the network in clear: use it with TLS beyond loopback.
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(AuthToken::new(&token.into()));
        self
    }

    /// Controller: the PEM file with its certificate chain (leaf first). With
    /// [`tls_key`](Self::tls_key), the controller accepts only TLS connections.
    pub fn tls_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_cert = Some(path.into());
        self
    }

    /// Controller: the PEM file with the private key of [`tls_cert`](Self::tls_cert)
    /// (PKCS#8, PKCS#1 or SEC1).
    pub fn tls_key(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_key = Some(path.into());
        self
    }

    /// Controller: mutual TLS. Every node must present a client certificate signed by a
    /// CA in this PEM file; others are refused during the TLS handshake. The node of
    /// this `Global` needs none: it reaches its controller in-process.
    pub fn tls_client_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_client_ca = Some(path.into());
        self
    }

    /// Node: connect with TLS. Alone, the controller's certificate is verified against
    /// the system's trusted roots. Implied by [`tls_ca`](Self::tls_ca),
    /// [`tls_server_name`](Self::tls_server_name) and
    /// [`tls_client_cert`](Self::tls_client_cert).
    ///
    /// These node options are for a node that connects to a controller in another
    /// process. A `Global` that runs the controller too accepts them (so that every
    /// process of a mesh may share one configuration) but its node does not use them:
    /// it reaches its controller in-process. They must still fit that controller:
    /// with no [`tls_cert`](Self::tls_cert) there, `start` fails with [`Error::Config`].
    pub fn tls(mut self, yes: bool) -> Self {
        self.tls = yes;
        self
    }

    /// Node: connect with TLS, and trust only the CAs in this PEM file (not the system's
    /// roots) to have signed the controller's certificate. Not needed by a node that
    /// runs beside its controller (see [`tls`](Self::tls)).
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// Node: the name (DNS name or IP address) the controller's certificate must be valid
    /// for. Default: the [`host`](Self::host) connected to.
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls_server_name = Some(name.into());
        self
    }

    /// Node: the PEM file with this node's client certificate chain, for a controller
    /// that requires one ([`tls_client_ca`](Self::tls_client_ca)). Not needed by a node
    /// that runs beside its controller (see [`tls`](Self::tls)).
    pub fn tls_client_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_client_cert = Some(path.into());
        self
    }

    /// Node: the PEM file with the private key of [`tls_client_cert`](Self::tls_client_cert).
    pub fn tls_client_key(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_client_key = Some(path.into());
        self
    }

    /// Runs `hook(&global, own_name)` once, after the `Global` has started (and after
    /// the first `on_node_connect`).
    ///
    /// Hooks run one at a time, in the order of the events, on a thread of their own
    /// (`daffi-hooks`, not tokio's blocking pool, so that a full pool never holds them
    /// up): they may make blocking calls. A hook that panics is logged and skipped.
    pub fn on_init(mut self, hook: impl Fn(&Global, &str) + Send + Sync + 'static) -> Self {
        self.hooks.on_init = Some(Arc::new(hook));
        self
    }

    /// Runs `hook(&global, own_name)` each time this node connects to the controller:
    /// at start and after every reconnect.
    pub fn on_node_connect(mut self, hook: impl Fn(&Global, &str) + Send + Sync + 'static) -> Self {
        self.hooks.on_node_connect = Some(Arc::new(hook));
        self
    }

    /// Runs `hook(&global, own_name)` each time this node loses the controller, and
    /// when [`Global::stop`] stops a connected node (not when the last clone is dropped:
    /// there is no `Global` left to give the hook).
    pub fn on_node_disconnect(
        mut self,
        hook: impl Fn(&Global, &str) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_node_disconnect = Some(Arc::new(hook));
        self
    }

    /// Runs `hook(&global, other_name)` when another node appears in this node's view:
    /// it joined, or this node (re)connected and learned of it.
    pub fn on_member_added(mut self, hook: impl Fn(&Global, &str) + Send + Sync + 'static) -> Self {
        self.hooks.on_member_added = Some(Arc::new(hook));
        self
    }

    /// Runs `hook(&global, other_name)` when another node leaves this node's view: it
    /// disconnected, or this node lost the controller.
    pub fn on_member_removed(
        mut self,
        hook: impl Fn(&Global, &str) + Send + Sync + 'static,
    ) -> Self {
        self.hooks.on_member_removed = Some(Arc::new(hook));
        self
    }

    /// Starts from synchronous code. daffi runs its own small runtime in the background;
    /// in async code use [`start_async`](Self::start_async).
    pub fn start(self) -> Result<Global> {
        let owned = OwnedRuntime::new()?;
        let handle = owned.handle.clone();
        blocking::wait(&handle, "start", self.launch(handle.clone(), Some(owned)))?
    }

    /// Starts from async code, on the current tokio runtime.
    pub async fn start_async(self) -> Result<Global> {
        let handle = Handle::try_current().map_err(|_| {
            Error::Config(
                "start_async must run inside a tokio runtime; use start() in sync code".into(),
            )
        })?;
        self.launch(handle, None).await
    }

    fn address(&self) -> Result<Address> {
        match (&self.host, self.port, &self.unix_sock_path) {
            (Some(_), _, Some(_)) | (None, Some(_), Some(_)) => Err(Error::Config(
                "give either host/port (TCP) or unix_sock_path, not both".into(),
            )),
            (None, None, Some(path)) => Ok(Address::Unix(path.clone())),
            (None, None, None) => Ok(Address::default_unix()),
            (host, port, None) => Ok(Address::Tcp {
                host: host.clone().unwrap_or_else(|| "localhost".into()),
                port: port.unwrap_or(0),
            }),
        }
    }

    /// The token given, or the one in the environment.
    fn token(&self) -> Result<Option<AuthToken>> {
        let token = match &self.auth_token {
            Some(t) if t.is_empty() => {
                return Err(Error::Config(
                    "auth_token must not be empty (an empty token protects nothing)".into(),
                ))
            }
            Some(t) => Some(t.clone()),
            None => AuthToken::from_env().map_err(Error::Config)?,
        };
        match token {
            Some(t) if t.expose().len() > MAX_AUTH_TOKEN => Err(Error::Config(format!(
                "the auth token is {} bytes; tokens may be at most {MAX_AUTH_TOKEN} bytes (32 random bytes, hex-encoded, are plenty)",
                t.expose().len()
            ))),
            token => Ok(token),
        }
    }

    /// Checks the TLS options against the roles of this `Global` and loads the
    /// certificates: the controller's side, and the node's. A node that runs beside its
    /// controller reaches it in-process, without TLS: its side is `None`, and the node
    /// options are left to the other processes of the mesh (which often share the
    /// same settings).
    fn load_tls(&self, address: &Address) -> Result<TlsSides> {
        let controller_options =
            self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_client_ca.is_some();
        let node_options = self.tls
            || self.tls_ca.is_some()
            || self.tls_server_name.is_some()
            || self.tls_client_cert.is_some()
            || self.tls_client_key.is_some();
        if !controller_options && !node_options {
            return Ok((None, None));
        }
        let host = match address {
            Address::Tcp { host, .. } => host,
            Address::Unix(_) => return Err(Error::Config(UNIX_NO_TLS.into())),
        };
        let server = if controller_options {
            if !self.init_controller {
                return Err(Error::Config(
                    "tls_cert, tls_key and tls_client_ca set up a controller, and this Global runs none; a node's own certificate (mutual TLS) is tls_client_cert and tls_client_key".into(),
                ));
            }
            let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
                return Err(Error::Config(
                    "TLS on the controller needs both tls_cert and tls_key".into(),
                ));
            };
            Some(Arc::new(ServerTls::load(
                cert,
                key,
                self.tls_client_ca.as_deref(),
            )?))
        } else {
            None
        };
        if node_options && !self.init_node {
            return Err(Error::Config(
                "tls, tls_ca, tls_server_name, tls_client_cert and tls_client_key set up a node, and this Global runs none (init_node(false))".into(),
            ));
        }
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "a client certificate needs both tls_client_cert and tls_client_key".into(),
                ))
            }
        };
        if self.init_controller {
            if node_options && server.is_none() {
                return Err(Error::Config(
                    "tls, tls_ca, tls_server_name, tls_client_cert and tls_client_key set up nodes for a TLS controller, and the controller this Global runs has no tls_cert and tls_key: other nodes with these settings could not connect".into(),
                ));
            }
            return Ok((server, None));
        }
        let server_name = self.tls_server_name.as_deref().unwrap_or(host);
        let client = ClientTls::load(self.tls_ca.as_deref(), identity, server_name)?;
        Ok((server, Some(Arc::new(client))))
    }

    async fn launch(self, runtime: Handle, owned: Option<OwnedRuntime>) -> Result<Global> {
        if !self.init_node && !self.init_controller {
            return Err(Error::Config(
                "init_node(false) and init_controller(false): nothing to start".into(),
            ));
        }
        let name = match &self.process_name {
            Some(n) => {
                check_name(NameKind::Process, n).map_err(Error::Config)?;
                n.clone()
            }
            None => format!("node-{}", random_suffix()),
        };
        if self.stall_timeout.is_zero() {
            return Err(Error::Config(
                "stall_timeout must be longer than zero".into(),
            ));
        }
        let mut address = self.address()?;
        let auth_token = self.token()?;
        let (server_tls, client_tls) = self.load_tls(&address)?;
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let controller = if self.init_controller {
            let config = ControllerConfig {
                max_frame_size: self.max_frame_size,
                handshake_timeout: self.handshake_timeout,
                max_connections: self.max_connections,
                tls: server_tls,
                auth_token: auth_token.clone(),
                max_queue_bytes: self.max_queue_bytes,
                stall_timeout: self.stall_timeout,
            };
            let c = ControllerHandle::start(&address, config, &runtime).await?;
            if let (Address::Tcp { port, .. }, Address::Tcp { port: bound, .. }) =
                (&mut address, c.address())
            {
                *port = *bound;
            }
            Some(c)
        } else {
            if matches!(address, Address::Tcp { port: 0, .. }) {
                return Err(Error::Config(
                    "a node without the controller needs the controller's port".into(),
                ));
            }
            None
        };
        let node = if self.init_node {
            // Beside its controller, the node links to it in-process, with no token.
            let (route, auth_token) = match &controller {
                Some(c) => (Route::InProcess(c.in_process()), None),
                None => (Route::Socket { tls: client_tls }, auth_token),
            };
            let config = NodeConfig {
                address: address.clone(),
                max_frame_size: self.max_frame_size,
                connect_timeout: self.connect_timeout,
                handshake_timeout: self.handshake_timeout,
                max_in_flight: self.max_in_flight,
                max_concurrent_callbacks: self.max_concurrent_callbacks,
                max_sync_callbacks: self.max_sync_callbacks,
                stop_timeout: self.stop_timeout,
                auth_token,
                route,
                max_queue_bytes: self.max_queue_bytes,
                stall_timeout: self.stall_timeout,
            };
            let node = NodeCore::new(name.clone(), config, static_callbacks(), events_tx);
            node.start().await?;
            Some(node)
        } else {
            None
        };
        let global = Global {
            inner: Arc::new(Inner {
                name,
                address,
                runtime: runtime.clone(),
                node,
                controller: Mutex::new(controller),
                owned_runtime: Mutex::new(owned),
                stopping: AtomicBool::new(false),
                stopped: Arc::new(tokio::sync::watch::channel(false).0),
                hooks: self.hooks.clone(),
            }),
        };
        if !self.hooks.is_empty() {
            let global = Arc::downgrade(&global.inner);
            let hooks = self.hooks;
            std::thread::Builder::new()
                .name("daffi-hooks".into())
                .spawn(move || {
                    // As on tokio's blocking pool: hooks may use the runtime.
                    let _context = runtime.enter();
                    run_hooks(global, hooks, events_rx);
                })?;
        }
        Ok(global)
    }
}

/// Runs the hooks for each node event, one at a time, on the calling thread. Ends when
/// the node is gone or the last `Global` clone is dropped.
fn run_hooks(
    global: Weak<Inner>,
    hooks: Hooks,
    mut events: tokio::sync::mpsc::UnboundedReceiver<NodeEvent>,
) {
    let run = |hook: &Hook, name: &str| {
        let Some(inner) = global.upgrade() else {
            return false;
        };
        let g = Global { inner };
        if catch_unwind(AssertUnwindSafe(|| hook(&g, name))).is_err() {
            tracing::warn!("a lifecycle hook panicked");
        }
        true
    };
    let own_name = match global.upgrade() {
        Some(inner) => inner.name.clone(),
        None => return,
    };
    // The first connection happened before the Global existed: report it first.
    let first = events.blocking_recv();
    if let Some(event) = &first {
        if let Some((hook, name)) = hooks.for_event(event, &own_name) {
            if !run(hook, name) {
                return;
            }
        }
    }
    if let Some(hook) = &hooks.on_init {
        if !run(hook, &own_name) {
            return;
        }
    }
    while let Some(event) = events.blocking_recv() {
        if let Some((hook, name)) = hooks.for_event(&event, &own_name) {
            if !run(hook, name) {
                return;
            }
        }
    }
}

/// A handle to this process's daffi node (and controller, if it runs one).
///
/// Cheap to clone; every clone is the same node. The node stops when [`Global::stop`] is
/// called or the last clone is dropped.
#[derive(Clone)]
pub struct Global {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    address: Address,
    runtime: Handle,
    node: Option<Arc<NodeCore>>,
    controller: Mutex<Option<ControllerHandle>>,
    owned_runtime: Mutex<Option<OwnedRuntime>>,
    /// `stop` was called.
    stopping: AtomicBool,
    /// Everything has stopped (what `join` waits for); shared with the drain task.
    stopped: Arc<tokio::sync::watch::Sender<bool>>,
    hooks: Hooks,
}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            .field("process_name", &self.inner.name)
            .field("address", &self.inner.address)
            .field("node", &self.inner.node.is_some())
            .finish()
    }
}

impl Global {
    /// Starts configuring a `Global`.
    pub fn builder() -> GlobalBuilder {
        GlobalBuilder::default()
    }

    /// This node's process name.
    pub fn process_name(&self) -> &str {
        &self.inner.name
    }

    /// The controller's address (with the real port when a free one was picked).
    pub fn address(&self) -> &Address {
        &self.inner.address
    }

    /// The controller's TCP port, or `None` on a Unix socket.
    pub fn port(&self) -> Option<u16> {
        match &self.inner.address {
            Address::Tcp { port, .. } => Some(*port),
            Address::Unix(_) => None,
        }
    }

    pub(crate) fn node(&self) -> Result<&Arc<NodeCore>> {
        self.inner.node.as_ref().ok_or(Error::NoNode)
    }

    pub(crate) fn runtime(&self) -> &Handle {
        &self.inner.runtime
    }

    /// Serves a closure under `name`, sync or async:
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// g.register("add", |a: i64, b: i64| a + b)?;
    /// g.register("greet", |name: String| async move { format!("hello {name}") })?;
    /// g.register("checked_div", |a: i64, b: i64| {
    ///     a.checked_div(b).ok_or("division by zero")
    /// })?;
    /// # Ok(()) }
    /// ```
    ///
    /// Arguments arrive positionally. A closure returning `Result<T, E: Display>` sends
    /// `Err` to the caller as [`Error::Remote`]. A closure that captures this `Global`
    /// keeps it alive: stop it with [`Global::stop`].
    ///
    /// A node's callback names together may take at most 1 MiB, each counting its
    /// length plus 4 bytes (less with a `max_frame_size` under 1 MiB + 512 bytes, on this
    /// node or the controller): past that, `register`, `register_instance` and `start`
    /// (for the `#[callback]` functions) fail with [`Error::CallbackListTooLarge`].
    pub fn register<M>(&self, name: &str, callback: impl IntoCallback<M>) -> Result<()> {
        check_name(NameKind::Callback, name).map_err(Error::Config)?;
        let node = self.node()?;
        let handler = callback.into_handler(name);
        // Announcing spawns onto the node's runtime.
        let _context = self.inner.runtime.enter();
        node.register(vec![(name.to_string(), handler)])
    }

    /// Serves the `pub` `&self` methods of a callback group (a type whose `impl` block
    /// is marked `#[callback]`), each under its method name. Groups are singletons: a
    /// second instance of the same type fails with [`Error::DuplicateInstance`].
    ///
    /// ```no_run
    /// struct Calc { k: i64 }
    ///
    /// #[daffi::callback]
    /// impl Calc {
    ///     pub fn mul(&self, a: i64) -> i64 { a * self.k }
    ///     pub fn version() -> String { "1".into() }   // served without an instance
    /// }
    ///
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// g.register_instance(Calc { k: 3 })?;
    /// assert!(g.register_instance(Calc { k: 4 }).is_err());
    /// # Ok(()) }
    /// ```
    pub fn register_instance<T: CallbackGroup>(&self, instance: T) -> Result<()> {
        let node = self.node()?;
        let _context = self.inner.runtime.enter();
        node.register_instance(instance)
    }

    /// Starts a call to the callback `name` on another node.
    pub fn call(&self, name: &str) -> Call {
        Call::new(self.clone(), name)
    }

    /// Callback name -> names of the nodes that serve it, this one included.
    pub fn registered_callbacks(&self) -> HashMap<String, Vec<String>> {
        let Some(node) = &self.inner.node else {
            return HashMap::new();
        };
        let mut all = node.membership.providers();
        for name in node.callback_names() {
            all.entry(name).or_default().push(self.inner.name.clone());
        }
        for nodes in all.values_mut() {
            nodes.sort();
        }
        all
    }

    /// The other nodes connected to the controller and the callbacks each serves, sorted
    /// by name: this node's view, kept current by the controller (no round trip). Empty
    /// while the node is disconnected, or for a `Global` without a node.
    pub fn members(&self) -> Vec<MemberInfo> {
        let Some(node) = &self.inner.node else {
            return Vec::new();
        };
        node.membership
            .members()
            .into_iter()
            .map(|(name, callbacks)| MemberInfo { name, callbacks })
            .collect()
    }

    /// The controller's counters: how many requests it forwarded for each callback.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// let stats = g.controller_stats()?;
    /// println!("add was called {} times", stats.calls.get("add").copied().unwrap_or(0));
    /// # Ok(()) }
    /// ```
    pub fn controller_stats(&self) -> Result<ControllerStats> {
        blocking::wait(
            self.runtime(),
            "controller_stats",
            self.controller_stats_async(),
        )?
    }

    /// Async twin of [`controller_stats`](Self::controller_stats).
    pub async fn controller_stats_async(&self) -> Result<ControllerStats> {
        let node = self.node()?.clone();
        match node
            .control(ControlRequest::Stats, "controller_stats")
            .await?
        {
            ControlAnswer::Stats {
                calls,
                other_calls,
                omitted_names,
            } => Ok(ControllerStats {
                calls,
                other_calls,
                omitted_names,
            }),
            other => Err(unexpected_answer(other)),
        }
    }

    /// Blocks until the process `name` is connected and its callbacks are known here.
    pub fn wait_process(&self, name: &str) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "wait_process",
            self.wait_process_inner(name, None),
        )?
    }

    /// Like [`wait_process`](Self::wait_process), giving up with [`Error::Timeout`] after `timeout`.
    pub fn wait_process_timeout(&self, name: &str, timeout: Duration) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "wait_process",
            self.wait_process_inner(name, Some(timeout)),
        )?
    }

    /// Async twin of [`wait_process`](Self::wait_process).
    pub async fn wait_process_async(&self, name: &str) -> Result<()> {
        self.wait_process_inner(name, None).await
    }

    /// Async twin of [`wait_process_timeout`](Self::wait_process_timeout).
    pub async fn wait_process_timeout_async(&self, name: &str, timeout: Duration) -> Result<()> {
        self.wait_process_inner(name, Some(timeout)).await
    }

    /// Blocks until some other node serves the callback `name`.
    pub fn wait_function(&self, name: &str) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "wait_function",
            self.wait_function_inner(name, None),
        )?
    }

    /// Like [`wait_function`](Self::wait_function), giving up with [`Error::Timeout`] after `timeout`.
    pub fn wait_function_timeout(&self, name: &str, timeout: Duration) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "wait_function",
            self.wait_function_inner(name, Some(timeout)),
        )?
    }

    /// Async twin of [`wait_function`](Self::wait_function).
    pub async fn wait_function_async(&self, name: &str) -> Result<()> {
        self.wait_function_inner(name, None).await
    }

    /// Async twin of [`wait_function_timeout`](Self::wait_function_timeout).
    pub async fn wait_function_timeout_async(&self, name: &str, timeout: Duration) -> Result<()> {
        self.wait_function_inner(name, Some(timeout)).await
    }

    async fn wait_process_inner(&self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let what = format!("wait_process(\"{name}\")");
        self.node()?
            .wait_until(&what, timeout, |m| m.has_node(name))
            .await
    }

    async fn wait_function_inner(&self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let what = format!("wait_function(\"{name}\")");
        self.node()?
            .wait_until(&what, timeout, |m| m.has_provider(name))
            .await
    }

    /// The tasks the controller keeps for PERIOD calls (made by any node), soonest first.
    /// The controller answers in pages that each fit a frame; this asks for every page.
    pub fn scheduled_tasks(&self) -> Result<Vec<ScheduledTaskInfo>> {
        blocking::wait(
            self.runtime(),
            "scheduled_tasks",
            self.scheduled_tasks_async(),
        )?
    }

    /// Async twin of [`scheduled_tasks`](Self::scheduled_tasks).
    pub async fn scheduled_tasks_async(&self) -> Result<Vec<ScheduledTaskInfo>> {
        let node = self.node()?;
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let now = SystemTime::now();
            let request = ControlRequest::ListTasks { after };
            let (tasks, omitted_tasks) =
                match node.clone().control(request, "scheduled_tasks").await? {
                    ControlAnswer::Tasks {
                        tasks,
                        omitted_tasks,
                    } => (tasks, omitted_tasks),
                    other => return Err(unexpected_answer(other)),
                };
            let Some(last) = tasks.last().map(|t| t.task_id) else {
                break;
            };
            all.extend(tasks.into_iter().map(|t| ScheduledTaskInfo {
                id: t.task_id,
                callback: t.callback,
                on: t.on,
                created_by: t.created_by,
                next_run: now + Duration::from_millis(t.next_run_in_ms),
                interval: t.interval_ms.map(Duration::from_millis),
                remaining_runs: t.remaining_runs,
                runs: t.runs,
                restored_by: t.restored_by,
            }));
            if omitted_tasks == 0 || last <= after {
                break;
            }
            after = last;
        }
        all.sort_by_key(|t| t.next_run);
        Ok(all)
    }

    /// Ends the scheduled task `id` (whoever created it). [`Error::TaskNotFound`] if
    /// there is none.
    pub fn cancel_scheduled_task(&self, id: u64) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "cancel_scheduled_task",
            self.cancel_scheduled_task_async(id),
        )?
    }

    /// Async twin of [`cancel_scheduled_task`](Self::cancel_scheduled_task).
    pub async fn cancel_scheduled_task_async(&self, id: u64) -> Result<()> {
        let node = self.node()?.clone();
        match node
            .control(
                ControlRequest::Cancel { task_id: id },
                "cancel_scheduled_task",
            )
            .await?
        {
            ControlAnswer::Cancelled => Ok(()),
            other => Err(unexpected_answer(other)),
        }
    }

    /// Blocks until this `Global` is stopped (from another thread, or by a callback).
    pub fn join(&self) -> Result<()> {
        blocking::wait(self.runtime(), "join", self.join_async())
    }

    /// Async twin of [`join`](Self::join).
    pub async fn join_async(&self) {
        let mut rx = self.inner.stopped.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops the node and the controller (if this process runs one), gracefully.
    ///
    /// At once: this node's own calls waiting here fail with [`Error::Stopped`], new calls
    /// from here fail the same way, and the controller routes no new requests here
    /// (their callers get [`Error::PeerStopped`]). Callbacks already running here get up
    /// to `stop_timeout` (default 5 s) to finish and send their results; then the node
    /// says goodbye, and callers still waiting get [`Error::PeerStopped`]. `stop` returns
    /// at once; [`join`](Self::join) returns when all of this is done. Idempotent; also
    /// runs when the last clone drops.
    pub fn stop(&self) {
        let connected_node = self
            .inner
            .node
            .as_ref()
            .filter(|n| !n.is_stopped() && n.is_connected());
        if let (Some(_), Some(hook)) = (connected_node, &self.inner.hooks.on_node_disconnect) {
            hook(self, &self.inner.name);
        }
        self.inner.stop();
    }
}

impl Inner {
    /// Stops the node gracefully: no new calls in or out at once; callbacks already
    /// running get up to `stop_timeout` to finish (in the background), then the node
    /// says goodbye, the controller (if any) stops, and `join` returns.
    fn stop(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let controller = lock(&self.controller).take();
        let owned_runtime = lock(&self.owned_runtime).take();
        let stopped = self.stopped.clone();
        let node = self.node.clone();
        let drain = node
            .as_ref()
            .is_some_and(|n| n.begin_stop() && n.is_serving());
        if !drain {
            // Nothing to wait for: stop at once, so that others see it right away.
            if let Some(node) = &node {
                node.close();
            }
            if let Some(controller) = &controller {
                controller.stop();
            }
        }
        self.runtime.spawn(async move {
            if let Some(node) = &node {
                if drain {
                    node.drain().await;
                    node.close();
                }
                // Let the goodbye and the last replies go out before the runtime ends.
                node.link_finished().await;
            }
            if let Some(controller) = controller {
                controller.stop();
            }
            stopped.send_replace(true);
            if let Some(rt) = owned_runtime {
                rt.shutdown();
            }
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The runtime `start()` creates: its own thread holds it, so that it is never dropped
/// inside async code (which tokio forbids).
struct OwnedRuntime {
    handle: Handle,
    shutdown: std::sync::mpsc::Sender<()>,
}

impl OwnedRuntime {
    fn new() -> Result<OwnedRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("daffi-worker")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (shutdown, rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("daffi-runtime".into())
            .spawn(move || {
                let _ = rx.recv();
                // Let replies and goodbyes go out, but never hang on a stuck callback.
                runtime.shutdown_timeout(Duration::from_millis(500));
            })?;
        Ok(OwnedRuntime { handle, shutdown })
    }

    fn shutdown(self) {
        let _ = self.shutdown.send(());
    }
}

fn random_suffix() -> String {
    (0..8).map(|_| fastrand::alphanumeric()).collect()
}
