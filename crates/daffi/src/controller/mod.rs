//! The controller: accepts nodes, keeps the membership table, and forwards frames.
//!
//! It reads only each frame's routing header; request and reply payloads pass through
//! untouched. It runs inside a node's process (`init_controller(true)`) or on its own
//! (`daffi controller`).

mod changes;
mod counters;
mod linger;
pub(crate) mod members;
mod scheduler;
mod session;
mod shards;
mod welcome;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::AuthToken;
use crate::error::{Error, Result};
use crate::transport::{self, Address, Halves, Listener, ServerTls, UNIX_NO_TLS};
use daffi_wire::channel::{DEFAULT_MAX_QUEUE_BYTES, DEFAULT_STALL_TIMEOUT};
use daffi_wire::{QueueLimits, DEFAULT_MAX_FRAME_SIZE};
use session::Shared;
use shards::Shards;

/// Settings of a controller.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ControllerConfig {
    /// Largest frame accepted, prefix excluded. Default: 128 MiB.
    pub max_frame_size: usize,
    /// How long a new connection may take to say who it is, TLS handshake included.
    /// Default: 5 s.
    pub handshake_timeout: Duration,
    /// Connections served at once; more are closed on accept. Default: 10,000.
    pub max_connections: usize,
    /// TLS on a TCP listener (certificate, and optionally the CA of client
    /// certificates). Default: none, plaintext.
    pub tls: Option<Arc<ServerTls>>,
    /// The token every node must present in its `Hello`. Default: none, no check.
    pub auth_token: Option<AuthToken>,
    /// Bytes held for one node, accepted and not yet written to it, before requests to
    /// it fail with `SlowConsumer`. Frames it cannot refuse (replies, membership events)
    /// pass it up to twice the larger of this and `max_frame_size`; past that the node
    /// is disconnected. Default: 64 MiB.
    pub max_queue_bytes: usize,
    /// How long a node may read nothing of what is waiting for it before it is
    /// disconnected as a slow consumer. Default: 10 s.
    pub stall_timeout: Duration,
    /// How long a controller thread keeps polling its sockets after it forwarded the
    /// last reply of the calls it had in flight, before it sleeps: a caller's next call
    /// usually comes within microseconds, and waking a sleeping thread costs that call
    /// more than polling does. It yields its processor between looks and stops once
    /// another thread ran there; it never lingers while calls it forwarded run, nor on
    /// a machine with one processor. Zero: sleep at once. Default: 20 µs.
    pub linger: Duration,
}

/// The default [`ControllerConfig::linger`].
pub const DEFAULT_LINGER: Duration = Duration::from_micros(20);

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            handshake_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            tls: None,
            auth_token: None,
            max_queue_bytes: DEFAULT_MAX_QUEUE_BYTES,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            linger: DEFAULT_LINGER,
        }
    }
}

/// A running controller. Dropping it (or calling [`ControllerHandle::stop`]) closes the
/// listener and every connection.
pub struct ControllerHandle {
    address: Address,
    shutdown: watch::Sender<bool>,
    /// Its sender goes away once the listener is closed (see [`ControllerHandle::closed`]).
    listening: watch::Receiver<()>,
    door: InProcessDoor,
}

impl ControllerHandle {
    /// Binds `address` and starts serving, on threads of its own (see `shards`): the
    /// runtime this is called on is not used once it returns.
    pub async fn start(address: &Address, config: ControllerConfig) -> Result<ControllerHandle> {
        if config.tls.is_some() && matches!(address, Address::Unix(_)) {
            return Err(Error::Config(UNIX_NO_TLS.into()));
        }
        let (shutdown, stop_rx) = watch::channel(false);
        let shards = Arc::new(Shards::start(&stop_rx, config.linger)?);
        let membership = shards.membership();
        // Bound on the thread that will accept on it, so that its readiness wakes that
        // thread.
        let bind_address = address.clone();
        let listener = membership
            .run(async move { Listener::bind(&bind_address).await })
            .await
            .ok_or_else(|| {
                std::io::Error::other("the controller's thread stopped before it could listen")
            })??;
        let address = listener.local_address()?;
        let members = Arc::new(members::Members::default());
        let calls = Arc::new(counters::CallCounts::default());
        let scheduler = scheduler::Scheduler::new(
            members.clone(),
            calls.open(counters::SCHEDULER),
            stop_rx.clone(),
            config.max_frame_size,
        );
        let shared = Arc::new(Shared {
            instance: fastrand::u64(1..),
            config,
            scheduler: Arc::new(scheduler),
            members,
            membership: membership.clone(),
            calls,
            dropped_one_way: Default::default(),
            next_conn_id: AtomicU64::new(1),
        });
        tracing::info!(
            %address,
            instance = shared.instance,
            tls = config_tls(&shared.config),
            auth_token = shared.config.auth_token.is_some(),
            "controller listening"
        );
        let door = InProcessDoor {
            shared: shared.clone(),
            shards: shards.clone(),
            stop: stop_rx.clone(),
        };
        membership.spawn(shared.members.clone().send_changes(stop_rx.clone()));
        let (closed, listening) = watch::channel(());
        let listener = OpenListener {
            listener,
            _closed: closed,
        };
        membership.spawn(accept_loop(listener, shared, shards.clone(), stop_rx));
        Ok(ControllerHandle {
            address,
            shutdown,
            listening,
            door,
        })
    }

    /// The address it listens on (with the real port when port 0 was asked for).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The way in for the node of this process (see [`InProcessDoor`]).
    pub fn in_process(&self) -> InProcessDoor {
        self.door.clone()
    }

    /// Stops accepting and closes every connection. Returns at once; see
    /// [`closed`](Self::closed).
    pub fn stop(&self) {
        self.shutdown.send_replace(true);
    }

    /// Returns once the listener is closed (after [`stop`](Self::stop)): its port, or its
    /// socket file's path, can be bound again at once.
    pub async fn closed(&self) {
        let mut listening = self.listening.clone();
        // Never sent on: this returns when the sender is dropped.
        while listening.changed().await.is_ok() {}
    }
}

/// The listener and what says it is open: the fields drop in this order, so that
/// whoever waits in [`ControllerHandle::closed`] sees the listener closed.
struct OpenListener {
    listener: Listener,
    _closed: watch::Sender<()>,
}

impl Drop for ControllerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ControllerConfig {
    /// What each connection may hold for its node.
    fn queue_limits(&self) -> QueueLimits {
        QueueLimits::new(
            self.max_queue_bytes,
            self.max_frame_size,
            self.stall_timeout,
        )
    }
}

/// How the node of the process that runs the controller reaches it: in-process, not
/// through the listening socket ([`transport::in_process`]). Each [`open`](Self::open)
/// starts a session like any accepted connection's (the same frames, routing, queue
/// limits and slow-consumer rules), except that it needs no TLS and no token (the
/// controller trusts its own process: whatever could send on this link could as well
/// read the controller's memory), and takes no slot of `max_connections` (the own node
/// must always get in).
#[derive(Clone)]
pub struct InProcessDoor {
    shared: Arc<Shared>,
    shards: Arc<Shards>,
    stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for InProcessDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InProcessDoor")
    }
}

impl InProcessDoor {
    /// A new connection to the controller: the node's reader and writer, its reads
    /// shared with a spinning thread if `share_reads` (see [`transport::SharedReads`]).
    /// Fails with [`Error::Stopped`] once the controller has stopped (it never comes
    /// back).
    pub fn open(&self, share_reads: bool) -> Result<Halves> {
        if *self.stop.borrow() {
            return Err(Error::Stopped);
        }
        let (node_side, controller_side) = transport::in_process(share_reads)?;
        let (shared, stop) = (self.shared.clone(), self.stop.clone());
        let conn_id = shared.new_conn_id();
        self.shards.serve(controller_side, move |incoming| {
            session::serve(shared, conn_id, incoming, stop)
        });
        Ok(node_side)
    }
}

fn config_tls(config: &ControllerConfig) -> &'static str {
    match &config.tls {
        None => "off",
        Some(tls) if tls.requires_client_certificates() => "on, client certificates required",
        Some(_) => "on",
    }
}

async fn accept_loop(
    open: OpenListener,
    shared: Arc<Shared>,
    shards: Arc<Shards>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        shared
            .config
            .max_connections
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            accepted = open.listener.accept() => accepted,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok(conn) => {
                failures.recovered();
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(peer = %conn.peer(), limit = shared.config.max_connections, "refused a connection: too many connections");
                    continue; // dropping the halves closes it
                };
                let conn_id = shared.new_conn_id();
                let shared = shared.clone();
                let stop = stop.clone();
                shards.serve(conn, move |incoming| async move {
                    session::serve(shared, conn_id, incoming, stop).await;
                    drop(slot);
                });
            }
            Err(e) => {
                let pause = failures.failed(&e);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    drop(open);
    tracing::info!("controller stopped");
}

/// Failed accepts in a row (usually: no file descriptor left). Each is retried after a
/// pause that doubles from 50 ms to 1 s while they go on; the first is logged, then at
/// most one line per [`AcceptFailures::SUMMARY_EVERY`] with the count, so that a
/// controller out of descriptors neither spins nor floods its log.
#[derive(Default)]
struct AcceptFailures {
    /// Failures since the last success.
    in_a_row: u32,
    /// Failures not logged yet.
    unlogged: u64,
    /// When the last line was logged.
    last_logged: Option<std::time::Instant>,
}

impl AcceptFailures {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    const MAX_PAUSE: Duration = Duration::from_secs(1);
    const SUMMARY_EVERY: Duration = Duration::from_secs(10);

    /// Logs (or counts) a failure; returns how long to wait before the next accept.
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        self.in_a_row = self.in_a_row.saturating_add(1);
        self.unlogged += 1;
        let now = std::time::Instant::now();
        match self.last_logged {
            None => {
                tracing::warn!(%error, "accept failed; retrying with backoff (out of file descriptors? raise `ulimit -n` or lower max_connections)");
                self.unlogged = 0;
                self.last_logged = Some(now);
            }
            Some(at) if now.duration_since(at) >= Self::SUMMARY_EVERY => {
                tracing::warn!(%error, failures = self.unlogged, since = ?now.duration_since(at), "accept failed again");
                self.unlogged = 0;
                self.last_logged = Some(now);
            }
            Some(_) => {}
        }
        Self::FIRST_PAUSE
            .saturating_mul(1 << (self.in_a_row - 1).min(5))
            .min(Self::MAX_PAUSE)
    }

    /// An accept succeeded: the next failure starts over.
    fn recovered(&mut self) {
        if self.in_a_row > 0 {
            tracing::info!(failures = self.in_a_row, "accepting connections again");
            *self = AcceptFailures::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AcceptFailures;
    use std::time::Duration;

    #[test]
    fn accept_failures_back_off_from_50_ms_to_1_s_and_start_over_after_a_success() {
        let mut failures = AcceptFailures::default();
        let error = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<u64> = (0..8)
            .map(|_| failures.failed(&error).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        failures.recovered();
        assert_eq!(failures.failed(&error), Duration::from_millis(50));
    }
}
