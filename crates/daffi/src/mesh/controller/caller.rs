//! The calling half of the seam over the controller link: requests as frames, queued on
//! the connection, their replies awaited through the connection's
//! [`Pending`](crate::mesh::Pending) table.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Connection, ControllerMesh};
use crate::error::{Error, Result};
use crate::mesh::{
    held, sleep_until, BoxFuture, CallRequest, Membership, Mesh, Scope, SentBroadcast, Waiter,
};
use crate::protocol::message::{self, ControlAnswer, ControlRequest};
use crate::transport::Address;
use daffi_wire::frame::{FLAG_INCOMING, FLAG_NO_REPLY, LEN_PREFIX};
use daffi_wire::{Header, Kind, Outgoing, Payload, Push};

/// How long a request to the controller itself may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

impl Mesh for ControllerMesh {
    fn send_call<'a>(
        &'a self,
        req: &'a CallRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, Result<Option<Waiter>>> {
        Box::pin(async move {
            let (conn, target, waiter) = match self.prepare_call(req) {
                Ok(prepared) => prepared,
                Err(_) => {
                    if self.must_subscribe(req) {
                        self.subscribe(Scope::Callback(&req.callback)).await?;
                    }
                    // Subscribed, or the providers arrived since the first look.
                    self.prepare_call(req)?
                }
            };
            if self.join_queued(&conn, &target, req, waiter.as_ref(), false) {
                return Ok(waiter);
            }
            let frame = self.request_frame(&target, req, waiter.as_ref(), req.args.clone());
            let _with_others = self.cork_if_many(&conn, waiter.as_ref());
            self.send_by(&conn, frame, deadline)
                .await
                .map_err(|unsent| self.not_sent(unsent, req))?;
            Ok(waiter)
        })
    }

    fn try_send_call(&self, req: &mut CallRequest) -> Option<Result<Option<Waiter>>> {
        let (conn, target, waiter) = match self.prepare_call(req) {
            Ok(prepared) => prepared,
            // The providers are not known yet: `send_call` asks for them.
            Err(_) if self.must_subscribe(req) => return None,
            // They may have arrived since the first look (the view now holds them).
            Err(_) => match self.prepare_call(req) {
                Ok(prepared) => prepared,
                Err(e) => return Some(Err(e)),
            },
        };
        // A BG call made while its thread collects results goes with the thread's next
        // write (see `mesh::held`).
        let hold =
            req.may_hold && waiter.as_ref().is_some_and(Waiter::among_many) && held::may_hold();
        if hold {
            held::held_on(&conn.queue);
        }
        if self.join_queued(&conn, &target, req, waiter.as_ref(), hold) {
            return Some(Ok(waiter));
        }
        // The arguments move into the frame: a clone of them would cost an allocation.
        let args = std::mem::take(&mut req.args);
        let frame = self.request_frame(&target, req, waiter.as_ref(), args);
        let _with_others = self.cork_if_many(&conn, waiter.as_ref());
        let pushed = if hold {
            conn.queue.push_held(frame)
        } else {
            conn.queue.push(frame)
        };
        match pushed {
            Push::Sent => Some(Ok(waiter)),
            Push::Closed => Some(Err(self.unreachable("connection lost"))),
            // The queue is full: nothing was sent, and the dropped waiter forgets the
            // call; `send_call` waits for room, with the arguments given back.
            Push::Full(frame) => {
                req.args = frame.body().clone();
                None
            }
        }
    }

    fn open_stream(&self, req: &CallRequest) -> Result<crate::mesh::OpenStream> {
        match self.start_stream(req) {
            Err(_) if self.must_subscribe(req) => {
                // A stream call returns at once: its first one waits here for the
                // providers (inside the node's runtime, from the calling thread).
                let runtime = tokio::runtime::Handle::current();
                let scope = Scope::Callback(&req.callback);
                crate::blocking::wait(&runtime, "stream", self.subscribe(scope))??;
                self.start_stream(req)
            }
            // Subscribed, or the providers arrived since the first look.
            Err(_) => self.start_stream(req),
            opened => opened,
        }
    }

    fn open_feed(&self, call_id: u64) -> Result<crate::mesh::Feed> {
        self.start_feed(call_id)
    }

    fn send_broadcast<'a>(
        &'a self,
        req: &'a CallRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, Result<SentBroadcast>> {
        Box::pin(self.broadcast(req, deadline))
    }

    fn control<'a>(
        &'a self,
        request: ControlRequest,
        what: &'a str,
    ) -> BoxFuture<'a, Result<ControlAnswer>> {
        Box::pin(async move {
            let conn = self.connected()?;
            let waiter = self.send_control(&conn, &request, what).await?;
            answer(waiter, &self.config.address).await
        })
    }

    fn announce(self: Arc<Self>) {
        self.announce_now();
    }

    fn size_limit(&self) -> usize {
        self.max_frame_size.load(Ordering::Relaxed)
    }

    fn membership(&self) -> &Membership {
        &self.membership
    }

    fn want<'a>(&'a self, scope: Scope<'a>) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.subscribe(scope))
    }

    fn is_connected(&self) -> bool {
        self.connection().is_some()
    }

    fn is_stopped(&self) -> bool {
        ControllerMesh::is_stopped(self)
    }

    fn stopping(&self) -> watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    fn begin_stop(&self) -> bool {
        self.stop_calls()
    }

    fn close(&self) {
        self.say_goodbye();
    }

    fn finished(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.link_finished())
    }
}

/// The controller's answer to the control request `waiter` waits on.
pub(super) async fn answer(waiter: Waiter, peer: &Address) -> Result<ControlAnswer> {
    let reply = waiter.await?;
    message::decode(&reply.bytes)
        .map_err(|e| Error::undecodable(peer.to_string(), "ControlReply", e))
}

impl ControllerMesh {
    /// Sends one request to every node serving the callback, together: one write, when
    /// the connection is idle, instead of one per node.
    async fn broadcast(
        &self,
        req: &CallRequest,
        deadline: Option<Instant>,
    ) -> Result<SentBroadcast> {
        self.subscribe(Scope::Callback(&req.callback)).await?;
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
        let mut sent = Vec::with_capacity(targets.len());
        let mut frames = Vec::with_capacity(targets.len());
        for target in targets {
            let prepared = self.prepare_request(&conn, &target, req).inspect(|waiter| {
                let args = req.args.clone();
                frames.push(self.request_frame(&target, req, waiter.as_ref(), args));
            });
            sent.push((target, prepared));
        }
        if !frames.is_empty() {
            if let Err(unsent) = self
                .send_by(&conn, Outgoing::joined(frames), deadline)
                .await
            {
                for (_, prepared) in &mut sent {
                    if prepared.is_ok() {
                        *prepared = Err(self.not_sent(unsent, req));
                    }
                }
            }
        }
        Ok(sent)
    }

    /// Queues a request the controller itself answers on `conn` (waiting for room up
    /// to the control timeout); what waits for the answer.
    pub(super) async fn send_control(
        &self,
        conn: &Arc<Connection>,
        request: &ControlRequest,
        what: &str,
    ) -> Result<Waiter> {
        let waiter = conn
            .pending
            .wait(Arc::from(""), Arc::from(what), Some(CONTROL_TIMEOUT))
            .ok_or_else(|| self.unreachable("connection lost"))?;
        let body = message::encode(request);
        let header = Header {
            call_id: waiter.call_id(),
            src: &self.name,
            ..Header::control(Kind::ControlRequest)
        };
        self.check_size(what, &header, body.len())?;
        let frame = Outgoing::new(&header, body);
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        match self.send_by(conn, frame, Some(deadline)).await {
            Ok(()) => Ok(waiter),
            Err(NotSent::Lost) => Err(self.unreachable("connection lost")),
            Err(NotSent::TimedOut) => Err(Error::timeout(what, CONTROL_TIMEOUT)),
        }
    }

    /// Whether a call to `req` that found no node must first learn the providers of its
    /// callback (and then try again). A call that need not still looks once more: the
    /// subscription of another call may have brought them since it first looked.
    fn must_subscribe(&self, req: &CallRequest) -> bool {
        !self.membership.covers(Scope::Callback(&req.callback)) && self.is_connected()
    }

    /// Makes the view hold `scope`, kept current from then on: asks the controller the
    /// first time, which sends the members in it before its answer. One subscription
    /// at a time: callers that want the same wait for the first.
    pub(super) async fn subscribe(&self, scope: Scope<'_>) -> Result<()> {
        if self.membership.covers(scope) {
            return Ok(());
        }
        let _one_at_a_time = self.subscribing.lock().await;
        if self.membership.covers(scope) {
            return Ok(());
        }
        let conn = self.connected()?;
        let generation = self.membership.subscribing(scope);
        let request = match scope {
            Scope::Everything => ControlRequest::Subscribe {
                all: true,
                names: Vec::new(),
            },
            Scope::Callback(name) => ControlRequest::Subscribe {
                all: false,
                names: vec![name.to_string()],
            },
        };
        let waiter = self.send_control(&conn, &request, "subscribe").await?;
        match answer(waiter, &self.config.address).await? {
            ControlAnswer::Subscribed => {
                self.membership.subscribed(scope, generation);
                Ok(())
            }
            other => Err(Error::undecodable(
                self.config.address.to_string(),
                "Subscribe answer",
                format!("unexpected answer {other:?}"),
            )),
        }
    }

    /// The live connection, or the error a caller should see without one.
    pub(super) fn connected(&self) -> Result<Arc<Connection>> {
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        self.connection()
            .ok_or_else(|| self.unreachable("not connected (reconnecting)"))
    }

    pub(super) fn check_size(
        &self,
        what: &str,
        header: &Header<'_>,
        payload_len: usize,
    ) -> Result<()> {
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

    /// While many calls wait on `conn` (see [`Waiter::among_many`]), the next request is
    /// left to the connection's writer task, which sends it with the others queued by
    /// then, instead of being written alone from the calling thread: a burst of calls
    /// made as replies come in (BG with many in flight, many tasks each calling) starts
    /// with one write of many frames, not a write of one frame (which the controller and
    /// the callee would each read and forward alone) followed by the rest. A lone call,
    /// or a few, is still written at once. Hold what this returns across the push.
    fn cork_if_many(&self, conn: &Connection, waiter: Option<&Waiter>) -> Option<daffi_wire::Cork> {
        waiter.filter(|w| w.among_many()).map(|_| conn.queue.cork())
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

    /// The connection, target and waiter of a call to one node (its frame is made last,
    /// by [`request_frame`](Self::request_frame)).
    fn prepare_call(
        &self,
        req: &CallRequest,
    ) -> Result<(Arc<Connection>, Arc<str>, Option<Waiter>)> {
        let conn = self.connected()?;
        let target = self.target(&conn, req)?;
        let waiter = self.prepare_request(&conn, &target, req)?;
        Ok((conn, target, waiter))
    }

    /// Checks that a request for `target` fits a frame, and returns what waits on its
    /// reply (registered in the pending table first, so a reply cannot be missed), or
    /// `None` for no-reply.
    fn prepare_request(
        &self,
        conn: &Connection,
        target: &Arc<str>,
        req: &CallRequest,
    ) -> Result<Option<Waiter>> {
        let header = self.request_header(target, req, 0);
        self.check_size(&req.callback, &header, req.args.len())?;
        if req.no_reply {
            return Ok(None);
        }
        conn.pending
            .wait(target.clone(), req.callback.clone(), req.timeout)
            .map(Some)
            .ok_or_else(|| self.unreachable("connection lost"))
    }

    /// Joins the call `req` to `target` (answered through `waiter`, if it wants a reply)
    /// to the last frame queued on `conn`, if that is a request (or batch) of the same
    /// kind (NO_RETURN, or wanting a reply) to the same node and callback, with the same
    /// timeout, with room left: the calls then leave in one batch frame, which the
    /// controller forwards and the callee reads as one. Only a frame that waits anyway is
    /// joined (the connection is busy): a lone call goes at once, as its own frame.
    /// `held`: the calling thread holds its requests (see `mesh::held`); any other call
    /// ends a hold on the frame it joins.
    fn join_queued(
        &self,
        conn: &Connection,
        target: &str,
        req: &CallRequest,
        waiter: Option<&Waiter>,
        held: bool,
    ) -> bool {
        if req.incoming || req.args.len() >= crate::mesh::JOINED_CALL {
            return false;
        }
        let call_id = waiter.map_or(0, Waiter::call_id);
        let header = self.request_header(target, req, call_id);
        let limit = self.max_frame_size.load(Ordering::Relaxed);
        if req.no_reply {
            // At most: the call, its length, and the first call's length.
            let most_added = req.args.len() + 8;
            return conn.queue.join_last(most_added, |last| {
                crate::mesh::join_call(last, &header, &req.args, limit)
            });
        }
        // At most: the call, its head, and the first call's head.
        let most_added = req.args.len() + 2 * crate::mesh::CALL_ITEM_HEAD;
        let join = |last: &mut Outgoing| {
            crate::mesh::join_call_with_reply(last, &header, &req.args, limit)
        };
        if held {
            conn.queue.join_last_held(most_added, join)
        } else {
            conn.queue.join_last(most_added, join)
        }
    }

    /// The request frame of `req` to `target`, answered through `waiter`, carrying `args`.
    fn request_frame(
        &self,
        target: &str,
        req: &CallRequest,
        waiter: Option<&Waiter>,
        args: Payload,
    ) -> Outgoing {
        let call_id = waiter.map_or(0, Waiter::call_id);
        Outgoing::new(&self.request_header(target, req, call_id), args)
    }

    /// The header of a request of `req` to `target`.
    fn request_header<'h>(
        &'h self,
        target: &'h str,
        req: &'h CallRequest,
        call_id: u64,
    ) -> Header<'h> {
        Header {
            kind: Kind::Request,
            flags: if req.no_reply { FLAG_NO_REPLY } else { 0 }
                | if req.incoming { FLAG_INCOMING } else { 0 },
            call_id,
            timeout_ms: self.timeout_ms(req),
            src: &self.name,
            dst: target,
            name: &req.callback,
        }
    }

    /// The timeout a request for `req` carries (0: none).
    pub(super) fn timeout_ms(&self, req: &CallRequest) -> u32 {
        req.timeout
            .map(|t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
            .unwrap_or(0)
    }

    /// The node `req` goes to on `conn`; if none, and the link just dropped (which
    /// empties the view), says that instead.
    pub(super) fn target(&self, conn: &Connection, req: &CallRequest) -> Result<Arc<str>> {
        self.membership
            .route(&self.name, &req.callback, req.on.as_deref())
            .map_err(|e| {
                if conn.pending.is_closed() {
                    self.unreachable("connection lost")
                } else {
                    e
                }
            })
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
