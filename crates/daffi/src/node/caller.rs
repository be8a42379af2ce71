//! The calling side of a node: single calls, broadcasts, requests to the controller, and
//! waiting for the membership view to reach a state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::pending::{Completion, Pending};
use super::{CallRequest, Connection, Membership, NodeCore};
use crate::error::{Error, Result};
use crate::protocol::message::{self, ControlAnswer, ControlRequest, TaskEntry};
use crate::protocol::TASK_OVERHEAD;
use daffi_wire::frame::{FLAG_NO_REPLY, LEN_PREFIX};
use daffi_wire::{Header, Kind, Outgoing, Push};

/// How long a request to the controller itself may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of one node's part in a broadcast.
pub type NodeOutcome = (Arc<str>, Result<Bytes>);

impl NodeCore {
    /// Makes one call and waits for its outcome (the empty payload for no-reply calls).
    pub async fn call(self: Arc<Self>, req: CallRequest) -> Result<Bytes> {
        self.wait_eta(req.eta).await?;
        let _slot = self.admit(&req).await?;
        let conn = self.connected()?;
        let target = self.target(&conn, &req)?;
        // One deadline for waiting for room to send and for the reply.
        let deadline = req.timeout.map(|t| Instant::now() + t);
        let outcome = match self.send_request(&conn, &target, &req, deadline).await? {
            None => Ok(Bytes::new()),
            Some(waiting) => waiting.outcome(&req, deadline).await,
        };
        outcome
    }

    /// Sends a call at once, from the calling thread, if nothing makes it wait (no eta,
    /// a free `max_in_flight` slot, room in the connection's queue); what is left is
    /// its reply, which the returned [`InFlight`] awaits without a task. `None`: it
    /// would have to wait, and nothing was sent: use [`NodeCore::call`] instead.
    /// With a timeout, call it with the node's runtime entered (the deadline's timer needs it).
    pub fn try_start(self: &Arc<Self>, req: &CallRequest) -> Option<Result<InFlight>> {
        if req.eta.is_some() || req.no_reply {
            return None;
        }
        let slot = self.in_flight.clone().try_acquire_owned().ok()?;
        let conn = match self.connected() {
            Ok(conn) => conn,
            Err(e) => return Some(Err(e)),
        };
        let target = match self.target(&conn, req) {
            Ok(target) => target,
            Err(e) => return Some(Err(e)),
        };
        let (frame, waiting) = match self.prepare_request(&conn, &target, req) {
            Ok((frame, Some(waiting))) => (frame, waiting),
            Ok((_, None)) => return None,
            Err(e) => return Some(Err(e)),
        };
        let Waiting { guard, done } = waiting;
        match conn.queue.push(frame) {
            Push::Sent => {}
            // The queue is full: nothing was sent; the guard forgets the call.
            Push::Full(_) => return None,
            Push::Closed => return Some(Err(self.unreachable("connection lost"))),
        }
        // From here the in-flight call forgets it when dropped.
        let call_id = guard.keep();
        let deadline = req.timeout.map(|t| Instant::now() + t);
        Some(Ok(InFlight {
            conn: conn.clone(),
            call_id,
            done,
            callback: req.callback.clone(),
            timeout: req.timeout,
            timer: sleep_until(deadline),
            deadline,
            completed: false,
            _slot: slot,
        }))
    }

    /// Calls every node serving the callback (never this one) and collects each outcome.
    /// A no-reply broadcast returns an empty list once every request is sent.
    pub async fn broadcast(self: Arc<Self>, req: CallRequest) -> Result<Vec<NodeOutcome>> {
        self.wait_eta(req.eta).await?;
        let _slot = self.admit(&req).await?;
        let conn = self.connected()?;
        let targets = self.membership.providers_of(&req.callback);
        if targets.is_empty() {
            if conn.pending.is_closed() {
                return Err(self.unreachable("connection lost"));
            }
            return Err(Error::NoProvider {
                callback: req.callback.to_string(),
                on: None,
            });
        }
        let deadline = req.timeout.map(|t| Instant::now() + t);
        // Every request is made first and they are sent together: one write, when the
        // connection is idle, instead of one per node.
        let mut waiting = Vec::with_capacity(targets.len());
        let mut frames = Vec::with_capacity(targets.len());
        for target in targets {
            let prepared = self
                .prepare_request(&conn, &target, &req)
                .map(|(frame, w)| {
                    frames.push(frame);
                    w
                });
            waiting.push((target, prepared));
        }
        if !frames.is_empty() {
            let sent = self
                .send_by(&conn, Outgoing::joined(frames), deadline)
                .await;
            if let Err(unsent) = sent {
                for (_, prepared) in &mut waiting {
                    if prepared.is_ok() {
                        *prepared = Err(self.not_sent(unsent, &req));
                    }
                }
            }
        }
        let mut outcomes = Vec::with_capacity(waiting.len());
        for (target, sent) in waiting {
            let outcome = match sent {
                Ok(Some(w)) => w.outcome(&req, deadline).await,
                Ok(None) => Ok(Bytes::new()),
                Err(e) => Err(e),
            };
            outcomes.push((target, outcome));
        }
        if req.no_reply {
            return match outcomes.into_iter().find_map(|(_, o)| o.err()) {
                Some(e) => Err(e),
                None => Ok(Vec::new()),
            };
        }
        Ok(outcomes)
    }

    /// Sends a request the controller itself answers, and waits for the answer.
    pub async fn control(
        self: Arc<Self>,
        request: ControlRequest,
        what: &str,
    ) -> Result<ControlAnswer> {
        let conn = self.connected()?;
        self.send_control(&conn, &request, what)
            .await?
            .answer()
            .await
    }

    /// Queues a request the controller itself answers on `conn` (waiting for room up
    /// to the control timeout); what to wait on for the answer.
    pub(super) async fn send_control(
        &self,
        conn: &Arc<Connection>,
        request: &ControlRequest,
        what: &str,
    ) -> Result<ControlWait> {
        let (call_id, done) = conn
            .pending
            .insert(Arc::from(""), Arc::from(what))
            .ok_or_else(|| self.unreachable("connection lost"))?;
        let wait = ControlWait {
            conn: conn.clone(),
            call_id,
            done: Some(done),
            deadline: Instant::now() + CONTROL_TIMEOUT,
            what: what.to_string(),
            peer: self.config.address.to_string(),
        };
        let body = message::encode(request);
        let header = Header {
            call_id,
            src: &self.name,
            ..Header::control(Kind::ControlRequest)
        };
        self.check_size(what, &header, body.len())?;
        let frame = Outgoing::new(&header, body);
        match self.send_by(conn, frame, Some(wait.deadline)).await {
            Ok(()) => Ok(wait),
            Err(NotSent::Lost) => Err(self.unreachable("connection lost")),
            Err(NotSent::TimedOut) => Err(Error::timeout(what, CONTROL_TIMEOUT)),
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
            tokio::select! {
                _ = changes.changed() => {}
                _ = stop.changed() => {}
                _ = sleep_until(deadline) => {
                    return Err(Error::timeout(what, timeout.unwrap_or_default()));
                }
            }
        }
    }

    /// Waits for a slot among `max_in_flight` (within the call's timeout).
    async fn admit(&self, req: &CallRequest) -> Result<tokio::sync::SemaphorePermit<'_>> {
        if let Ok(slot) = self.in_flight.try_acquire() {
            return Ok(slot);
        }
        let deadline = req.timeout.map(|t| Instant::now() + t);
        tokio::select! {
            slot = self.in_flight.acquire() => slot.map_err(|_| Error::Stopped),
            _ = sleep_until(deadline) => Err(Error::timeout(
                req.callback.to_string(),
                req.timeout.unwrap_or_default(),
            )),
        }
    }

    async fn wait_eta(&self, eta: Option<Duration>) -> Result<()> {
        if let Some(eta) = eta {
            // Boxed: calls without an eta (most) do not carry this wait in their future.
            Box::pin(async {
                let mut stop = self.stopped.subscribe();
                tokio::select! {
                    _ = tokio::time::sleep(eta) => Ok(()),
                    _ = stop.wait_for(|s| *s) => Err(Error::Stopped),
                }
            })
            .await?;
        }
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        Ok(())
    }

    /// The live connection, or the error a caller should see without one.
    fn connected(&self) -> Result<Arc<Connection>> {
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        self.connection()
            .ok_or_else(|| self.unreachable("not connected (reconnecting)"))
    }

    /// Checks that a schedule leaves [`TASK_OVERHEAD`] of the frame limit: every frame
    /// that carries it (the `Schedule` event each node gets, a `Welcome` page, a
    /// `Restore`) must fit. `entry` is the task as every node's book would hold it.
    pub fn check_schedule_size(&self, entry: &TaskEntry) -> Result<()> {
        let size = entry.size_bound() + TASK_OVERHEAD;
        let limit = self.max_frame_size.load(Ordering::Relaxed);
        if size > limit {
            return Err(Error::PayloadTooLarge {
                callback: entry.callback.clone(),
                size,
                limit,
            });
        }
        Ok(())
    }

    fn check_size(&self, what: &str, header: &Header<'_>, payload_len: usize) -> Result<()> {
        let size = header.frame_len(payload_len) - LEN_PREFIX;
        let limit = self.max_frame_size.load(Ordering::Relaxed);
        if size > limit {
            return Err(Error::PayloadTooLarge {
                callback: what.to_string(),
                size,
                limit,
            });
        }
        Ok(())
    }

    /// Sends one request to `target`, waiting for room until `deadline`. Returns what to
    /// wait on, or `None` for no-reply.
    async fn send_request<'c>(
        &self,
        conn: &'c Connection,
        target: &Arc<str>,
        req: &CallRequest,
        deadline: Option<Instant>,
    ) -> Result<Option<Waiting<'c>>> {
        let (frame, waiting) = self.prepare_request(conn, target, req)?;
        self.send_by(conn, frame, deadline)
            .await
            .map_err(|unsent| self.not_sent(unsent, req))?;
        Ok(waiting)
    }

    /// Queues `frame` on `conn`, waiting for room only until `deadline` (the call's
    /// timeout): a controller that reads slowly delays a call, never beyond it.
    async fn send_by(
        &self,
        conn: &Connection,
        frame: Outgoing,
        deadline: Option<Instant>,
    ) -> Result<(), NotSent> {
        match conn.queue.push(frame) {
            Push::Sent => Ok(()),
            Push::Closed => Err(NotSent::Lost),
            // Boxed: the common case (room at once) does not carry the wait in its future.
            Push::Full(frame) => {
                Box::pin(async {
                    tokio::select! {
                        sent = conn.queue.send(frame) => sent.map_err(|_| NotSent::Lost),
                        _ = sleep_until(deadline) => Err(NotSent::TimedOut),
                    }
                })
                .await
            }
        }
    }

    /// The error of a call to `req` whose request was not sent.
    fn not_sent(&self, unsent: NotSent, req: &CallRequest) -> Error {
        match unsent {
            NotSent::Lost => self.unreachable("connection lost"),
            NotSent::TimedOut => {
                Error::timeout(req.callback.to_string(), req.timeout.unwrap_or_default())
            }
        }
    }

    /// The request frame for `target`, and what to wait on (registered in the pending
    /// table, so a reply cannot be missed), or `None` for no-reply.
    fn prepare_request<'c>(
        &self,
        conn: &'c Connection,
        target: &Arc<str>,
        req: &CallRequest,
    ) -> Result<(Outgoing, Option<Waiting<'c>>)> {
        let mut header = Header {
            kind: Kind::Request,
            flags: if req.no_reply { FLAG_NO_REPLY } else { 0 },
            call_id: 0,
            timeout_ms: req
                .timeout
                .map(|t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
                .unwrap_or(0),
            src: &self.name,
            dst: target,
            name: &req.callback,
        };
        self.check_size(&req.callback, &header, req.args.len())?;
        let waiting = if req.no_reply {
            None
        } else {
            let (call_id, done) = conn
                .pending
                .insert(target.clone(), req.callback.clone())
                .ok_or_else(|| self.unreachable("connection lost"))?;
            header.call_id = call_id;
            Some(Waiting {
                guard: PendingGuard {
                    pending: &conn.pending,
                    call_id,
                },
                done,
            })
        };
        Ok((Outgoing::new(&header, req.args.clone()), waiting))
    }

    /// The node `req` goes to on `conn`; if none, and the link just dropped (which
    /// empties the view), says that instead.
    fn target(&self, conn: &Connection, req: &CallRequest) -> Result<Arc<str>> {
        self.resolve(&req.callback, req.on.as_deref()).map_err(|e| {
            if conn.pending.is_closed() {
                self.unreachable("connection lost")
            } else {
                e
            }
        })
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
                None if self.membership.is_leaving(process) => Err(Error::PeerStopped {
                    process: process.to_string(),
                    callback: callback.to_string(),
                }),
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
}

/// Why a request was not sent.
#[derive(Debug, Clone, Copy)]
enum NotSent {
    /// The connection to the controller closed.
    Lost,
    /// The call's timeout passed while the queue to the controller was full.
    TimedOut,
}

/// A call whose request is sent: all that is left is its reply (or its deadline). It
/// owns what it needs, so it waits wherever it is polled, without a task of its own;
/// dropped, it forgets the call (the reply, if one comes, is discarded).
pub struct InFlight {
    conn: Arc<Connection>,
    call_id: u64,
    done: oneshot::Receiver<Completion>,
    callback: Arc<str>,
    timeout: Option<Duration>,
    timer: Deadline,
    deadline: Option<Instant>,
    /// The completion arrived: the call is no longer in the table.
    completed: bool,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl InFlight {
    /// Whether polling would finish at once: the reply is in, or the deadline passed.
    pub fn is_ready(&self) -> bool {
        !self.done.is_empty() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// The reply, or `Timeout` once the deadline passed. Not to be polled again after
    /// it returned `Ready`.
    pub fn poll_outcome(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Bytes>> {
        use std::future::Future;
        use std::task::Poll;
        if let Poll::Ready(outcome) = std::pin::Pin::new(&mut self.done).poll(cx) {
            // Whoever completed the call took it out of the table already.
            self.completed = true;
            return Poll::Ready(outcome.unwrap_or(Err(Error::Stopped)));
        }
        if std::pin::Pin::new(&mut self.timer).poll(cx).is_ready() {
            return Poll::Ready(Err(Error::timeout(
                self.callback.to_string(),
                self.timeout.unwrap_or_default(),
            )));
        }
        Poll::Pending
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.completed {
            self.conn.pending.remove(self.call_id);
        }
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("call_id", &self.call_id)
            .field("callback", &self.callback)
            .finish_non_exhaustive()
    }
}

/// A request on its way: its completion, and the guard that forgets it if we stop waiting.
struct Waiting<'a> {
    guard: PendingGuard<'a>,
    done: oneshot::Receiver<Completion>,
}

impl Waiting<'_> {
    async fn outcome(self, req: &CallRequest, deadline: Option<Instant>) -> Result<Bytes> {
        let Waiting { guard, done } = self;
        tokio::select! {
            biased;
            outcome = done => {
                // Whoever completed the call took it out of the table already.
                guard.keep();
                outcome.unwrap_or(Err(Error::Stopped))
            }
            _ = sleep_until(deadline) => Err(Error::timeout(
                req.callback.to_string(),
                req.timeout.unwrap_or_default(),
            )),
        }
    }
}

/// Sleeps until `deadline`, or forever without one. The timer is allocated only when
/// there is a deadline: a call without one then carries no timer in its future, which
/// keeps that future small (it is moved several times on its way into a sync wait).
fn sleep_until(deadline: Option<Instant>) -> Deadline {
    Deadline(deadline.map(|d| Box::pin(tokio::time::sleep_until(d))))
}

/// See [`sleep_until`].
struct Deadline(Option<std::pin::Pin<Box<tokio::time::Sleep>>>);

impl std::future::Future for Deadline {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => std::task::Poll::Pending,
        }
    }
}

/// A control request sent: its answer, awaited until the control timeout. Dropped, it
/// forgets the request.
pub(super) struct ControlWait {
    conn: Arc<Connection>,
    call_id: u64,
    done: Option<oneshot::Receiver<Completion>>,
    deadline: Instant,
    what: String,
    peer: String,
}

impl ControlWait {
    /// The controller's answer.
    pub async fn answer(mut self) -> Result<ControlAnswer> {
        let Some(done) = self.done.take() else {
            return Err(Error::Stopped);
        };
        let bytes = match tokio::time::timeout_at(self.deadline, done).await {
            Ok(outcome) => outcome.unwrap_or(Err(Error::Stopped))?,
            Err(_) => return Err(Error::timeout(&self.what, CONTROL_TIMEOUT)),
        };
        message::decode(&bytes)
            .map_err(|e| Error::undecodable(self.peer.clone(), "ControlReply", e))
    }
}

impl Drop for ControlWait {
    fn drop(&mut self) {
        self.conn.pending.remove(self.call_id);
    }
}

/// Forgets a pending call when its caller stops waiting (timeout, drop).
struct PendingGuard<'a> {
    pending: &'a Pending,
    call_id: u64,
}

impl PendingGuard<'_> {
    /// Drops the guard without removing the call: its id goes to whoever removes it
    /// later, or whoever completed it removed it already.
    fn keep(self) -> u64 {
        let call_id = self.call_id;
        std::mem::forget(self);
        call_id
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.remove(self.call_id);
    }
}
