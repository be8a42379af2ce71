//! Streams over the controller link: the caller's credit and cancel frames, and the
//! way back for the callee's items (its streams in progress are a
//! [`ServedStreams`](crate::mesh::served::ServedStreams)).

use std::sync::Arc;

use super::{Connection, ControllerMesh};
use crate::callback::CallbackFailure;
use crate::error::Result;
use crate::executor::ItemSink;
use crate::mesh::served::StreamGate;
use crate::mesh::{BoxFuture, CallRequest, OpenStream, StreamControl};
use crate::protocol::message::{self, RemoteError};
use daffi_wire::frame::{FLAG_ERROR, FLAG_STREAM};
use daffi_wire::{FrameSender, Header, Kind, Outgoing, Payload, Push};

/// MessagePack nil: the payload of a stream's end and of a cancel.
const NIL: bytes::Bytes = bytes::Bytes::from_static(&[0xc0]);

/// The way back for one stream's items, over the controller link.
pub struct FrameItemSink {
    mesh: Arc<ControllerMesh>,
    gate: Arc<StreamGate>,
    caller: Box<str>,
    call_id: u64,
}

impl FrameItemSink {
    /// Opens the stream for `caller`'s call `call_id` (before the next frame is read).
    pub fn open(mesh: &Arc<ControllerMesh>, caller: &str, call_id: u64) -> Box<Self> {
        Box::new(FrameItemSink {
            gate: mesh.served.open(caller, call_id),
            mesh: mesh.clone(),
            caller: caller.into(),
            call_id,
        })
    }

    fn frame(&self, kind: Kind, flags: u8, body: Payload) -> Outgoing {
        let header = Header {
            kind,
            flags,
            call_id: self.call_id,
            timeout_ms: 0,
            src: &self.mesh.name,
            dst: &self.caller,
            name: "",
        };
        Outgoing::new(&header, body)
    }

    /// Queues `frame` (waiting for room); `false` without a connection.
    async fn queue(&self, frame: Outgoing) -> bool {
        match self.mesh.queue() {
            Some(queue) => queue.send(frame).await.is_ok(),
            None => false,
        }
    }
}

impl ItemSink for FrameItemSink {
    fn send(&mut self, item: Payload) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            if !self.gate.take_credit().await {
                return false; // cancelled
            }
            let frame = self.frame(Kind::StreamItem, 0, item);
            self.queue(frame).await
        })
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
        self.mesh.served.close(&self.caller, self.call_id);
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
            flags: FLAG_STREAM,
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
        let control = FrameStreamControl {
            conn,
            name: self.name.clone(),
            target: target.clone(),
            call_id,
        };
        Ok(OpenStream {
            target,
            items,
            control: Box::new(control),
        })
    }
}

/// Credit and cancel frames of one stream call, to its callee.
struct FrameStreamControl {
    conn: Arc<Connection>,
    name: Arc<str>,
    target: Arc<str>,
    call_id: u64,
}

impl FrameStreamControl {
    /// Queues a small frame past the byte limit: it must not wait behind the data it
    /// regulates.
    fn push(&self, kind: Kind, body: Payload) {
        let header = Header {
            kind,
            flags: 0,
            call_id: self.call_id,
            timeout_ms: 0,
            src: &self.name,
            dst: &self.target,
            name: "",
        };
        let queue: &FrameSender = &self.conn.queue;
        if let Push::Full(_) = queue.push_unrefused(Outgoing::new(&header, body)) {
            tracing::warn!(callee = %self.target, ?kind, "stream frame dropped: the link to the controller is past its hard limit");
        }
    }
}

impl StreamControl for FrameStreamControl {
    fn grant(&self, items: u32) {
        self.push(Kind::StreamCredit, message::encode(&items).into());
    }

    fn cancel(&self) {
        self.conn.pending.remove_stream(self.call_id);
        self.push(Kind::StreamCancel, Payload::from(NIL));
    }
}
