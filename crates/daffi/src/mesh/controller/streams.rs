//! Streams over the controller link, both ways: a callee's results to its caller, and a
//! caller's arguments to its callee's `Incoming`. The sending side waits on the credit
//! the receiving side grants; the receiving side's credit and cancel frames go back.
//! Frames of an arguments stream carry `FLAG_ARGUMENTS`, so that a node tells its own
//! calls from calls made to it (both ends may use the same call id).

use std::sync::Arc;

use super::{Connection, ControllerMesh};
use crate::callback::CallbackFailure;
use crate::error::{Error, Result};
use crate::executor::ItemSink;
use crate::mesh::streams::{IncomingStreams, SentStreams, StreamGate};
use crate::mesh::{
    BoxFuture, CallRequest, Credit, Feed, Grant, ItemBatch, OpenStream, Scope, StreamControl,
};
use crate::protocol::message::{self, RemoteError};
use daffi_wire::frame::{FLAG_ARGUMENTS, FLAG_BATCH, FLAG_ERROR, FLAG_INCOMING, FLAG_STREAM};
use daffi_wire::{FrameSender, Header, Kind, Outgoing, Payload, Push};

/// MessagePack nil: the payload of a stream's end and of a cancel.
const NIL: bytes::Bytes = bytes::Bytes::from_static(&[0xc0]);

/// The items of one stream on their way out over the controller link: a callee's
/// results, or a caller's arguments.
pub struct FrameItemSink {
    table: Arc<SentStreams>,
    gate: Arc<StreamGate>,
    conn: Arc<Connection>,
    name: Arc<str>,
    /// Where the items go: the caller (results) or the callee (arguments).
    peer: Box<str>,
    call_id: u64,
    /// `FLAG_ARGUMENTS` for a caller's arguments, 0 for a callee's results.
    direction: u8,
}

impl FrameItemSink {
    /// Opens the stream of results for `caller`'s call `call_id` (before the next frame
    /// is read, so that a cancel finds it); `None` without a connection.
    pub fn results(mesh: &ControllerMesh, caller: &str, call_id: u64) -> Option<Box<Self>> {
        let conn = mesh.connection()?;
        Some(Self::open(mesh, &mesh.served, conn, caller, call_id, 0))
    }

    fn open(
        mesh: &ControllerMesh,
        table: &Arc<SentStreams>,
        conn: Arc<Connection>,
        peer: &str,
        call_id: u64,
        direction: u8,
    ) -> Box<Self> {
        Box::new(FrameItemSink {
            gate: table.open(peer, call_id),
            table: table.clone(),
            conn,
            name: mesh.name.clone(),
            peer: peer.into(),
            call_id,
            direction,
        })
    }

    fn frame(&self, kind: Kind, flags: u8, body: Payload) -> Outgoing {
        let header = Header {
            kind,
            flags: flags | self.direction,
            call_id: self.call_id,
            timeout_ms: 0,
            src: &self.name,
            dst: &self.peer,
            name: "",
        };
        Outgoing::new(&header, body)
    }

    /// Queues `frame` (waiting for room); `false` once the connection is gone.
    async fn queue(&self, frame: Outgoing) -> bool {
        self.conn.queue.send(frame).await.is_ok()
    }
}

impl ItemSink for FrameItemSink {
    fn credit(&self, unused: Credit) -> BoxFuture<'_, Option<Credit>> {
        Box::pin(self.gate.credit(unused))
    }

    fn send(&self, batch: ItemBatch) -> BoxFuture<'_, bool> {
        let (payload, batched) = batch.into_payload();
        let frame = self.frame(
            Kind::StreamItem,
            if batched { FLAG_BATCH } else { 0 },
            payload,
        );
        Box::pin(self.queue(frame))
    }

    fn cancelled(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.gate.cancelled())
    }

    fn end(self: Box<Self>, failure: Option<CallbackFailure>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if self.gate.is_cancelled() {
                return;
            }
            let (flags, body) = match failure {
                None => (0, Payload::from(NIL)),
                Some(failure) => {
                    let error = RemoteError {
                        kind: failure.kind,
                        message: failure.message,
                    };
                    (FLAG_ERROR, message::encode(&error).into())
                }
            };
            let frame = self.frame(Kind::StreamEnd, flags, body);
            self.queue(frame).await;
        })
    }
}

impl Drop for FrameItemSink {
    fn drop(&mut self) {
        self.table.close(&self.peer, self.call_id);
    }
}

impl ControllerMesh {
    /// See [`Mesh::open_stream`](crate::mesh::Mesh::open_stream).
    pub(super) fn start_stream(&self, req: &CallRequest) -> Result<OpenStream> {
        let conn = self.connected()?;
        let target = self.target(&conn, req)?;
        let (call_id, items) = conn
            .pending
            .open_stream(target.clone(), req.callback.clone())
            .ok_or_else(|| self.unreachable("connection lost"))?;
        let header = Header {
            kind: Kind::Request,
            flags: FLAG_STREAM | if req.incoming { FLAG_INCOMING } else { 0 },
            call_id,
            timeout_ms: self.timeout_ms(req),
            src: &self.name,
            dst: &target,
            name: &req.callback,
        };
        if let Err(e) = self.check_size(&req.callback, &header, req.args.len()) {
            conn.pending.remove_stream(call_id);
            return Err(e);
        }
        let request = Outgoing::new(&header, req.args.clone());
        if let Push::Full(request) = conn.queue.push(request) {
            // The queue is full: the request goes once there is room (a lost connection
            // fails the stream through its table).
            let queue = conn.queue.clone();
            tokio::spawn(async move {
                let _ = queue.send(request).await;
            });
        }
        let control = FrameStreamControl::new(self, conn, target.clone(), call_id, Side::Caller);
        Ok(OpenStream {
            target,
            call_id,
            items,
            control: Box::new(control),
        })
    }

    /// See [`Mesh::open_feed`](crate::mesh::Mesh::open_feed).
    pub(super) fn start_feed(&self, call_id: u64) -> Result<Feed> {
        let conn = self.connected()?;
        let callee = conn.pending.target_of(call_id).ok_or_else(|| {
            Error::Config("the call ended before its arguments stream started".into())
        })?;
        let items = FrameItemSink::open(
            self,
            &self.feeds,
            conn.clone(),
            &callee,
            call_id,
            FLAG_ARGUMENTS,
        );
        let control = FrameStreamControl::new(self, conn, callee, call_id, Side::Caller);
        Ok(Feed {
            items,
            control: Box::new(control),
        })
    }

    /// The arguments `caller` streams with its call `call_id` to `callback`, as they
    /// arrive (registered before the next frame is read); `None` without a connection.
    pub(super) fn receive_arguments(
        self: &Arc<Self>,
        caller: &str,
        call_id: u64,
        callback: &str,
    ) -> Option<OpenStream> {
        let conn = self.connection()?;
        let caller: Arc<str> = Arc::from(caller);
        let items = self.incoming.open(&caller, &caller, call_id, callback);
        self.hear_of_callers();
        let control = FrameStreamControl::new(
            self,
            conn,
            caller.clone(),
            call_id,
            Side::Callee(self.incoming.clone()),
        );
        Some(OpenStream {
            target: caller,
            call_id,
            items,
            control: Box::new(control),
        })
    }
}

impl ControllerMesh {
    /// A node fed a stream of arguments must hear when its caller leaves (the callback's
    /// `Incoming` then ends with `PeerDisconnected`), so the first such stream makes it
    /// ask for every node; callers that left before the view was whole are ended then.
    fn hear_of_callers(self: &Arc<Self>) {
        if self.membership.covers(Scope::Everything) {
            return;
        }
        let mesh = self.clone();
        tokio::spawn(async move {
            match mesh.subscribe(Scope::Everything).await {
                Ok(()) => mesh
                    .incoming
                    .fail_absent(|caller| mesh.membership.has_node(caller)),
                Err(e) => {
                    tracing::warn!(error = %e, "a node fed a stream of arguments could not ask for every member; a caller that leaves ends its stream only at the call's timeout")
                }
            }
        });
    }
}

/// Which end of a call a [`FrameStreamControl`] speaks for.
enum Side {
    /// The caller, to its callee: credit for results, and cancelling the call.
    Caller,
    /// The callee, to its caller: credit for arguments, and no more of them.
    Callee(Arc<IncomingStreams>),
}

/// Credit and cancel frames of one stream, to the other end of its call.
struct FrameStreamControl {
    conn: Arc<Connection>,
    name: Arc<str>,
    peer: Arc<str>,
    call_id: u64,
    side: Side,
}

impl FrameStreamControl {
    fn new(
        mesh: &ControllerMesh,
        conn: Arc<Connection>,
        peer: Arc<str>,
        call_id: u64,
        side: Side,
    ) -> Self {
        FrameStreamControl {
            conn,
            name: mesh.name.clone(),
            peer,
            call_id,
            side,
        }
    }

    fn push(&self, kind: Kind, body: Payload) {
        let flags = match self.side {
            Side::Caller => 0,
            Side::Callee(_) => FLAG_ARGUMENTS,
        };
        let to = Addressed {
            conn: &self.conn,
            src: &self.name,
            dst: &self.peer,
            call_id: self.call_id,
            flags,
        };
        to.push(kind, body);
    }
}

/// Where a stream's control frame goes: its connection, its ends, its call id and flags.
pub(super) struct Addressed<'a> {
    pub conn: &'a Connection,
    pub src: &'a str,
    pub dst: &'a str,
    pub call_id: u64,
    pub flags: u8,
}

impl Addressed<'_> {
    /// Queues a small frame past the byte limit: it must not wait behind the data it
    /// regulates.
    pub fn push(&self, kind: Kind, body: Payload) {
        let header = Header {
            kind,
            flags: self.flags,
            call_id: self.call_id,
            timeout_ms: 0,
            src: self.src,
            dst: self.dst,
            name: "",
        };
        let queue: &FrameSender = &self.conn.queue;
        if let Push::Full(_) = queue.push_unrefused(Outgoing::new(&header, body)) {
            tracing::warn!(peer = %self.dst, ?kind, "stream frame dropped: the link to the controller is past its hard limit");
        }
    }

    /// Tells the sender of a stream that overran its credit to stop.
    pub fn cancel_overrun(&self) {
        tracing::warn!(peer = %self.dst, call_id = self.call_id, "a peer sent stream items past the credit it was granted (a protocol violation); the stream is ended");
        self.push(Kind::StreamCancel, Payload::from(NIL));
    }
}

impl StreamControl for FrameStreamControl {
    fn grant(&self, grant: Grant) {
        match &self.side {
            Side::Caller => self.conn.pending.grant_stream(self.call_id, grant),
            Side::Callee(incoming) => incoming.grant(&self.peer, self.call_id, grant),
        }
        self.push(Kind::StreamCredit, message::encode(&grant).into());
    }

    fn cancel(&self) {
        match &self.side {
            Side::Caller => self.conn.pending.remove_stream(self.call_id),
            Side::Callee(incoming) => incoming.forget(&self.peer, self.call_id),
        }
        self.push(Kind::StreamCancel, Payload::from(NIL));
    }
}
