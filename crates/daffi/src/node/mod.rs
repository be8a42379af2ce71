//! A node: its link to the controller (with reconnects), the calls it waits on, and the
//! callbacks it serves.

mod executor;
mod link;
mod membership;
mod pending;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::callback::Handler;
use crate::error::{Error, Result};
use crate::protocol::frame::{Header, Kind, FLAG_NO_REPLY, LEN_PREFIX};
use crate::protocol::io::Outgoing;
use crate::protocol::message::Announce;
use crate::sync::{read, write};
use crate::transport::Address;
pub use membership::Membership;
use pending::Pending;

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub address: Address,
    pub max_frame_size: usize,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub auth_token: Option<String>,
}

/// One call to make.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub callback: Arc<str>,
    pub args: Bytes,
    pub on: Option<String>,
    pub timeout: Option<Duration>,
    pub eta: Option<Duration>,
    pub no_reply: bool,
}

/// One live connection to the controller: where frames go, and the calls waiting on it.
pub struct Connection {
    queue: mpsc::Sender<Outgoing>,
    pending: Pending,
}

/// Everything a node's tasks share.
pub struct NodeCore {
    pub name: Arc<str>,
    pub config: NodeConfig,
    pub membership: Membership,
    callbacks: RwLock<HashMap<String, Handler>>,
    connection: RwLock<Option<Arc<Connection>>>,
    announcing: tokio::sync::Mutex<()>,
    max_frame_size: AtomicUsize,
    stopped: watch::Sender<bool>,
}

impl NodeCore {
    /// A node that serves `callbacks`; it connects once [`NodeCore::start`] runs.
    pub fn new(name: String, config: NodeConfig, callbacks: HashMap<String, Handler>) -> Arc<Self> {
        Arc::new(NodeCore {
            name: Arc::from(name),
            max_frame_size: AtomicUsize::new(config.max_frame_size),
            config,
            membership: Membership::default(),
            callbacks: RwLock::new(callbacks),
            connection: RwLock::new(None),
            announcing: tokio::sync::Mutex::new(()),
            stopped: watch::channel(false).0,
        })
    }

    /// Connects (retrying until `connect_timeout`), then keeps reconnecting in the
    /// background until the node stops. Returns once the first connection is up.
    pub async fn start(self: &Arc<Self>) -> Result<()> {
        let (first_tx, first_rx) = oneshot::channel();
        tokio::spawn(supervise(self.clone(), first_tx));
        first_rx.await.unwrap_or(Err(Error::Stopped))
    }

    /// Stops the node: fails waiting calls, says goodbye, closes the link.
    pub fn stop(&self) {
        if self.stopped.send_replace(true) {
            return;
        }
        if let Some(conn) = write(&self.connection).take() {
            let _ = conn.queue.try_send(Outgoing::control(Kind::Goodbye, &()));
            conn.pending.close(|| Error::Stopped);
        }
        self.membership.reset(Vec::new());
        tracing::info!(process = %self.name, "node stopped");
    }

    /// Whether [`NodeCore::stop`] ran.
    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Adds a callback and tells the controller.
    pub fn register(self: &Arc<Self>, name: &str, handler: Handler) -> Result<()> {
        {
            let mut table = write(&self.callbacks);
            if table.contains_key(name) {
                return Err(Error::DuplicateCallback {
                    callback: name.to_string(),
                });
            }
            table.insert(name.to_string(), handler);
        }
        self.announce();
        Ok(())
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

    fn queue(&self) -> Option<mpsc::Sender<Outgoing>> {
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
                    .send(Outgoing::control(Kind::Announce, &Announce { callbacks }))
                    .await;
            }
        });
    }

    async fn send_quietly(&self, frame: Outgoing) {
        if let Some(queue) = self.queue() {
            let _ = queue.send(frame).await;
        }
    }

    fn unreachable(&self, reason: &str) -> Error {
        Error::ControllerUnreachable {
            address: self.config.address.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Makes one call and waits for its outcome (the empty payload for no-reply calls).
    pub async fn call(self: Arc<Self>, req: CallRequest) -> Result<Bytes> {
        if let Some(eta) = req.eta {
            let mut stop = self.stopped.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(eta) => {}
                _ = stop.wait_for(|s| *s) => return Err(Error::Stopped),
            }
        }
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        // Disconnected: say so, rather than "nobody serves it" from an emptied view.
        let conn = self
            .connection()
            .ok_or_else(|| self.unreachable("not connected (reconnecting)"))?;
        let target = match self.resolve(&req.callback, req.on.as_deref()) {
            Ok(target) => target,
            Err(_) if conn.pending.is_closed() => return Err(self.unreachable("connection lost")),
            Err(e) => return Err(e),
        };
        let header = Header {
            kind: Kind::Request,
            flags: if req.no_reply { FLAG_NO_REPLY } else { 0 },
            call_id: 0,
            timeout_ms: req
                .timeout
                .map(|t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
                .unwrap_or(0),
            src: &self.name,
            dst: &target,
            name: &req.callback,
        };
        let size = header.frame_len(req.args.len()) - LEN_PREFIX;
        let limit = self.max_frame_size.load(Ordering::Relaxed);
        if size > limit {
            return Err(Error::PayloadTooLarge {
                callback: req.callback.to_string(),
                size,
                limit,
            });
        }

        if req.no_reply {
            let frame = Outgoing {
                head: header.encode(req.args.len()),
                body: req.args,
            };
            return match conn.queue.send(frame).await {
                Ok(()) => Ok(Bytes::new()),
                Err(_) => Err(self.unreachable("connection lost")),
            };
        }

        let (call_id, done) = conn
            .pending
            .insert(target.clone(), req.callback.clone())
            .ok_or_else(|| self.unreachable("connection lost"))?;
        let guard = PendingGuard {
            pending: &conn.pending,
            call_id,
        };
        let frame = Outgoing {
            head: Header { call_id, ..header }.encode(req.args.len()),
            body: req.args,
        };
        if conn.queue.send(frame).await.is_err() {
            return Err(self.unreachable("connection lost"));
        }
        let outcome = match req.timeout {
            None => done.await,
            Some(t) => match tokio::time::timeout(t, done).await {
                Ok(outcome) => outcome,
                Err(_) => return Err(Error::timeout(req.callback.to_string(), t)),
            },
        };
        drop(guard);
        outcome.unwrap_or(Err(Error::Stopped))
    }

    /// Chooses the node a call goes to: the pinned one, or a random provider.
    fn resolve(&self, callback: &str, on: Option<&str>) -> Result<Arc<str>> {
        match on {
            Some(process) => match self.membership.serves(process, callback) {
                Some((node, true)) => Ok(node),
                Some((_, false)) => Err(Error::NoProvider {
                    callback: callback.to_string(),
                    on: Some(process.to_string()),
                }),
                None if process == &*self.name => Err(Error::Config(format!(
                    "a node cannot call itself (`.on(\"{process}\")` names this node); call the function directly"
                ))),
                None => Err(Error::UnknownProcess {
                    process: process.to_string(),
                }),
            },
            None => self
                .membership
                .pick(callback)
                .ok_or_else(|| Error::NoProvider {
                    callback: callback.to_string(),
                    on: None,
                }),
        }
    }

    /// Waits until `ready` holds for the membership view, or `timeout` passes.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Option<Duration>,
        ready: impl Fn(&Membership) -> bool,
    ) -> Result<()> {
        let mut changes = self.membership.subscribe();
        let mut stop = self.stopped.subscribe();
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.is_stopped() {
                return Err(Error::Stopped);
            }
            if ready(&self.membership) {
                return Ok(());
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changes.changed() => {}
                _ = stop.changed() => {}
                _ = sleep => {
                    return Err(Error::timeout(what, timeout.unwrap_or_default()));
                }
            }
        }
    }
}

/// Forgets a pending call when its caller stops waiting (timeout, drop).
struct PendingGuard<'a> {
    pending: &'a Pending,
    call_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.remove(self.call_id);
    }
}

/// Keeps the node connected: the first connection (retried until `connect_timeout`),
/// then reconnects with capped exponential backoff and jitter until the node stops.
async fn supervise(core: Arc<NodeCore>, first: oneshot::Sender<Result<()>>) {
    let mut first = Some(first);
    let give_up_at = Instant::now() + core.config.connect_timeout;
    let mut backoff = Backoff::default();
    let mut stop = core.stopped.subscribe();
    while !core.is_stopped() {
        match link::connect(&core, core.callback_names()).await {
            Ok(link) => {
                backoff = Backoff::default();
                let limit = core
                    .config
                    .max_frame_size
                    .min(link.welcome.max_frame_size as usize);
                core.max_frame_size.store(limit, Ordering::Relaxed);
                core.membership.reset(link.welcome.members.clone());
                let conn = Arc::new(Connection {
                    queue: link.queue.clone(),
                    pending: Pending::default(),
                });
                *write(&core.connection) = Some(conn.clone());
                // Callbacks registered while the Hello was on its way.
                core.announce();
                tracing::info!(process = %core.name, address = %core.config.address, "connected to the controller");
                if let Some(tx) = first.take() {
                    let _ = tx.send(Ok(()));
                }
                let reason = link.run(&core, &conn, &mut stop).await;
                if core.is_stopped() {
                    break;
                }
                tracing::warn!(process = %core.name, %reason, "lost the controller; reconnecting");
                // Close first: a call racing this sees a closed connection, never an
                // emptied membership view it would misreport as "nobody serves it".
                conn.pending
                    .close(|| core.unreachable(&format!("connection lost ({reason})")));
                *write(&core.connection) = None;
                core.membership.reset(Vec::new());
            }
            Err(e) => {
                let fatal = matches!(
                    e,
                    Error::DuplicateProcessName { .. }
                        | Error::Refused { .. }
                        | Error::Protocol { .. }
                );
                match first.take() {
                    Some(tx) if fatal || Instant::now() >= give_up_at => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    still_first => first = still_first,
                }
                tracing::debug!(process = %core.name, error = %e, "connecting to the controller failed; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = stop.wait_for(|s| *s) => break,
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
