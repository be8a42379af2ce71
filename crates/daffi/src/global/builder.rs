//! [`GlobalBuilder`]: the options of a `Global`, their defaults, and the checks of each
//! option alone. Checks that weigh options together are in `tls`; starting is `launch`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

use super::hooks::Hooks;
use super::launch::OwnedRuntime;
use super::Global;
use crate::auth::AuthToken;
use crate::blocking;
use crate::callback::Handler;
use crate::error::{Error, Result};
use crate::protocol::MAX_AUTH_TOKEN;
use crate::transport::Address;
use daffi_wire::channel::{DEFAULT_MAX_QUEUE_BYTES, DEFAULT_STALL_TIMEOUT};
use daffi_wire::DEFAULT_MAX_FRAME_SIZE;

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
/// | [`sync_spin`](Self::sync_spin) | 200 µs |
/// | [`max_concurrent_callbacks`](Self::max_concurrent_callbacks) | 1,024 async callbacks |
/// | [`max_sync_callbacks`](Self::max_sync_callbacks) | 1,024 sync callbacks (threads) |
/// | [`max_connections`](Self::max_connections) | 10,000 connections (controller) |
/// | [`controller_linger`](Self::controller_linger) | 20 µs (controller) |
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
/// | [`nats`](Self::nats) | unset: the built-in controller |
/// | [`namespace`](Self::namespace) (NATS) | `"daffi"` |
/// | requests from one node to another not yet taken (NATS) | 1,024 (a caller then waits up to [`stall_timeout`](Self::stall_timeout)) |
/// | [`nats_credentials`](Self::nats_credentials) (NATS) | unset: no credentials file |
///
/// A stream ([`Call::stream`](crate::Call::stream)) has a fixed credit of 4,096 items or
/// 2 MiB of them, whichever runs out first (one item may overdraw the bytes): its
/// callee runs at most that far ahead of the caller's reading, and items ready together
/// travel together (batches of up to 64 KiB). So has a stream of arguments
/// ([`Call::stream_from`](crate::Call::stream_from)): the caller feeds at most that much
/// beyond what the callee's [`Incoming`](crate::Incoming) has read. A sync
/// stream callback, or a sync callback reading its `Incoming`, holds one of
/// `max_sync_callbacks` until its stream ends or is dropped.
///
/// Where a sync callback runs: on the node's own callback threads (`daffi-callback`),
/// or, once it has finished quickly three times in a row (under 100 µs each, without
/// waiting on daffi's sync API), on the runtime worker that read its request, which
/// saves the hand-off between threads (on a multi-threaded runtime with two workers or
/// more: the node's own, or the user's). Either way the runtime's context is entered
/// (`Handle::current()` works) and a nested sync call works. One that turns slow there
/// holds up the node's other requests for at most about 0.5 ms (they go to the
/// callback threads) and runs on the threads next time; thread-locals a callback keeps
/// may therefore be those of either kind of thread.
///
/// TLS is for TCP. Certificates and keys are PEM files, read once at start. A node
/// that runs beside its controller (`init_controller(true)`) reaches it in-process,
/// without TLS or token: the node options (and the token) then serve the other
/// processes of the mesh only. See `docs/SECURITY.md` for which setup protects against
/// what.
///
/// With [`nats`](Self::nats), the node joins a mesh on a NATS cluster instead of a
/// controller: `auth_token`, `tls_ca` and `tls_client_cert`/`_key` then apply to the
/// connection to the NATS servers, and the controller's options do not apply.
#[derive(Debug, Clone)]
#[must_use = "a GlobalBuilder does nothing until you call start() or start_async()"]
pub struct GlobalBuilder {
    pub(super) process_name: Option<String>,
    pub(super) init_controller: bool,
    pub(super) init_node: bool,
    pub(super) host: Option<String>,
    pub(super) port: Option<u16>,
    pub(super) unix_sock_path: Option<PathBuf>,
    pub(super) connect_timeout: Duration,
    pub(super) max_frame_size: usize,
    pub(super) auth_token: Option<AuthToken>,
    pub(super) handshake_timeout: Duration,
    pub(super) max_in_flight: usize,
    pub(super) sync_spin: Duration,
    pub(super) max_concurrent_callbacks: usize,
    pub(super) max_sync_callbacks: usize,
    pub(super) max_connections: usize,
    pub(super) max_queue_bytes: usize,
    pub(super) stall_timeout: Duration,
    pub(super) controller_linger: Duration,
    pub(super) stop_timeout: Duration,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    pub(super) tls_client_ca: Option<PathBuf>,
    pub(super) tls: bool,
    pub(super) tls_ca: Option<PathBuf>,
    pub(super) tls_server_name: Option<String>,
    pub(super) tls_client_cert: Option<PathBuf>,
    pub(super) tls_client_key: Option<PathBuf>,
    pub(super) nats: Option<String>,
    pub(super) namespace: String,
    pub(super) nats_credentials: Option<PathBuf>,
    pub(super) hooks: Hooks,
    pub(super) handlers: Handlers,
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
            sync_spin: crate::spin::DEFAULT_SYNC_SPIN,
            max_concurrent_callbacks: 1_024,
            max_sync_callbacks: 1_024,
            max_connections: 10_000,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            controller_linger: crate::controller::DEFAULT_LINGER,
            stop_timeout: Duration::from_secs(5),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls: false,
            tls_ca: None,
            tls_server_name: None,
            tls_client_cert: None,
            tls_client_key: None,
            nats: None,
            namespace: "daffi".into(),
            nats_credentials: None,
            hooks: Hooks::default(),
            handlers: Handlers::default(),
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
    /// connect to its address. The controller serves on threads of its own (one per two
    /// processors, named `daffi-ctl-N`, and `daffi-ctl-members` for accepts, joins and
    /// leaves), not on the runtime that starts it: it keeps serving the other nodes
    /// while that runtime is busy, and its threads end when it stops.
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
    /// fails with [`Error::ControllerUnreachable`]. Default: 10 s. On NATS (`nats(..)`)
    /// it bounds connecting, opening the buckets and taking the name, which a cluster
    /// that just started refuses until its buckets have elected leaders.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Largest frame this process sends or accepts. A call whose arguments would exceed
    /// it fails before anything is sent. Under 1 MiB + 512 bytes, it also lowers what a
    /// node's callback names may take together (to this minus 512 bytes; see
    /// [`Global::register`]). Use the same value on every process. Over NATS it bounds
    /// payloads the same way, whatever the servers' `max_payload`. Default: 128 MiB.
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

    /// How long a thread blocked in a sync call (`fg`, `get`, `broadcast`) that is the
    /// node's only call in flight polls for the reply before it sleeps. Default: 200 µs.
    /// `Duration::ZERO` never spins. An awaited call (`fg_async`, `broadcast_async`, an
    /// `AsyncResult`'s `.await`) spins the same way where its thread has no task to run:
    /// in the future a `block_on` drives on a multi-threaded runtime (the body of
    /// `#[tokio::main]`), never inside a task nor on a current-thread runtime.
    ///
    /// A round trip on one machine takes tens of microseconds; a thread that sleeps at
    /// once is woken by the runtime worker that read the reply, one wake-up more on the
    /// way back (a slow one where waking an idle processor is, as on virtual machines).
    /// Over a plaintext socket (Unix, or TCP without TLS), the spinning thread reads a
    /// small reply from the socket itself, and the runtime is not woken for that socket
    /// while it spins; anything else that comes meanwhile goes to the runtime at once.
    /// Spinning trades processor time for that latency, so it is done only where it
    /// pays: for a lone call, while such calls have lately taken at most this long on
    /// average (a node whose callees take milliseconds never spins), and by at most one
    /// thread per two processors (none on a single processor); the spinning thread
    /// yields its processor between looks to any thread ready to run there. An awaited
    /// call first lets the futures polled beside it (a `join!`) send their calls, so
    /// that it spins only if it is still alone. While it spins, nothing else that
    /// thread polls runs: a `tokio::time::timeout` or `select!` around the await, a
    /// sibling in a `join!` that is not sending a call, or the tasks of a `LocalSet`
    /// whose `run_until`/`block_on` drives it wait for up to this limit (a timeout
    /// shorter than the spin may then see the reply instead of firing). Keep the limit
    /// short, or zero, where that matters.
    pub fn sync_spin(mut self, limit: Duration) -> Self {
        self.sync_spin = limit;
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
    /// slow callbacks cost threads (quick ones run on the runtime's workers, see the
    /// table of defaults above), and an idle thread
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

    /// How long a controller started here keeps polling its sockets after it forwarded
    /// the last reply of the calls it had in flight, before its thread sleeps. Default:
    /// 20 µs; zero: sleep at once.
    ///
    /// A caller that makes one call after another sends the next a few microseconds
    /// after it read a reply. Waking a controller thread that went to sleep meanwhile
    /// costs that call more than the polling does: on a virtual machine whose idle
    /// processors halt, a quarter of a round trip over TCP (BENCHMARKS.md, "A
    /// controller thread lingers after a reply"). Between looks the thread yields its
    /// processor, and stops once another thread ran there; it never lingers while
    /// calls it forwarded still run (their callees need the processors), nor on a
    /// machine with one processor. So a mesh making a call now and then costs its
    /// controller at most this much processor time after each, and an idle one nothing.
    pub fn controller_linger(mut self, limit: Duration) -> Self {
        self.controller_linger = limit;
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
    ///
    /// Over NATS ([`nats`](Self::nats)): a caller has at most 1,024 requests to one node
    /// that it does not know that node has taken yet (a window per callee, so that a fast
    /// caller slows down instead of overflowing a slow node, which would drop them). A
    /// call beyond them waits for that node to take some, up to its timeout or, without
    /// one, this long; then it fails with [`Error::SlowConsumer`].
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

    /// Joins a mesh on a NATS cluster instead of a controller: one or more server URLs,
    /// comma-separated (`"nats://10.0.0.1:4222,nats://10.0.0.2:4222"`); the client also
    /// learns the cluster's other servers, and reconnects across them. The same API
    /// works over it (DESIGN.md section 9): calls go to a node's own subject, and the
    /// membership lives in replicated JetStream KV buckets (JetStream must be enabled
    /// on the servers, 2.11 or later). A node that dies without saying goodbye leaves the
    /// others' view within 14 s (its claim expires 12 s after its last heartbeat, sent
    /// every 3 s, and the node holding the scheduler lease removes it within a
    /// second; calls to it fail at once meanwhile). What a node knows of the others is
    /// as over a controller (see the crate docs, "What a node knows"). Arguments and
    /// results larger than the servers' `max_payload` (1 MiB by default) go in chunks,
    /// a few in flight at a time, up to [`max_frame_size`](Self::max_frame_size); a
    /// callee that dies mid-transfer fails the call within about 250 ms
    /// ([`Error::PeerDisconnected`]). Schedules (PERIOD)
    /// live in a replicated KV bucket too, fired by one node at a time (a lease): they
    /// outlive every process, and the death of the node firing them pauses their runs
    /// for about 4 s. The controller's call counters
    /// ([`controller_stats`](crate::Global::controller_stats)) are not available: no
    /// process sees every call; they fail with [`Error::Unsupported`].
    ///
    /// The nodes a process starts with [`start_async`](Self::start_async) on one tokio
    /// runtime, with the same servers, credentials, token, TLS files and connect
    /// timeout, share one connection (a server holds about 50 KiB per connection); each
    /// keeps its own subscriptions and heartbeat, so stopping one leaves the others as
    /// they were.
    ///
    /// Not with [`init_controller(true)`](Self::init_controller) (a `Config` error).
    /// Needs daffi's `nats` cargo feature (`daffi = { features = ["nats"] }`); built
    /// without it, `start` fails with [`Error::Config`] saying so.
    pub fn nats(mut self, urls: impl Into<String>) -> Self {
        self.nats = Some(urls.into());
        self
    }

    /// Keeps several meshes apart on one NATS cluster: it prefixes their subjects and
    /// names their KV buckets (`<namespace>-alive`, `<namespace>-nodes`, ...). ASCII
    /// letters, digits, `-` and `_`. Default: `"daffi"`. Only with [`nats`](Self::nats).
    pub fn namespace(mut self, name: impl Into<String>) -> Self {
        self.namespace = name.into();
        self
    }

    /// A NATS credentials file (`.creds`: a user JWT and its NKey seed) to connect to
    /// the NATS servers with. Only with [`nats`](Self::nats). A missing or unreadable
    /// file is an [`Error::Config`]; a user the servers do not
    /// trust (unknown account, expired or revoked) gets
    /// [`Error::AuthenticationFailed`].
    pub fn nats_credentials(mut self, path: impl Into<PathBuf>) -> Self {
        self.nats_credentials = Some(path.into());
        self
    }

    /// Serves `handler` under `name` from the start, announced with the node's first
    /// connection like the `#[callback]` functions (a later `Global::register_handler`
    /// is announced a moment after the node is seen). For callbacks whose types are only
    /// known at run time (the Python package `crates/daffi-py`). Not public API: no
    /// stability promise.
    #[doc(hidden)]
    pub fn handler(mut self, name: impl Into<String>, handler: Handler) -> Self {
        self.handlers.0.push((name.into(), handler));
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

    pub(super) fn address(&self) -> Result<Address> {
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
    pub(super) fn token(&self) -> Result<Option<AuthToken>> {
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
}

/// Callbacks given to [`GlobalBuilder::handler`], served beside the `#[callback]` ones.
#[derive(Clone, Default)]
pub(super) struct Handlers(pub(super) Vec<(String, Handler)>);

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}
