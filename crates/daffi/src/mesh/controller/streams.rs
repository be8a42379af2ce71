//! Streams over the controller link: the caller's credit and cancel frames, and the
//! callee's streams in progress, each waiting on the credit its caller granted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Semaphore};

use super::{Connection, ControllerMesh};
use crate::callback::CallbackFailure;
use crate::error::Result;
use crate::executor::ItemSink;
use crate::mesh::{BoxFuture, CallRequest, OpenStream, StreamControl, STREAM_WINDOW};
use crate::protocol::message::{self, RemoteError};
use crate::sync::lock;
use daffi_wire::frame::{FLAG_ERROR, FLAG_STREAM};
use daffi_wire::{FrameSender, Header, Kind, Outgoing, Payload, Push};

/// MessagePack nil: the payload of a stream's end and of a cancel.
const NIL: bytes::Bytes = bytes::Bytes::from_static(&[0xc0]);

/// The most credit a stream holds at once, whatever its caller grants: a caller that
/// grants more only wastes its own memory, never the callee's.
const MAX_CREDIT: usize = 1 << 20;

/// The streams this node produces now, by caller and call id.
#[derive(Default)]
pub struct ServedStreams(Mutex<HashMap<Arc<str>, CallerStreams>>);

/// One caller's streams, by call id.
type CallerStreams = HashMap<u64, Arc<StreamGate>>;

impl ServedStreams {
    /// Records a stream for `caller`'s call `call_id`, with the first window of credit.
    fn open(&self, caller: &str, call_id: u64) -> Arc<StreamGate> {
        let gate = Arc::new(StreamGate {
            credit: Semaphore::new(STREAM_WINDOW as usize),
            cancelled: watch::channel(false).0,
        });
        let mut by_caller = lock(&self.0);
        match by_caller.get_mut(caller) {
            Some(streams) => {
                streams.insert(call_id, gate.clone());
            }
            None => {
                by_caller.insert(Arc::from(caller), HashMap::from([(call_id, gate.clone())]));
            }
        }
        gate
    }

    /// Forgets `caller`'s stream `call_id`; returns it if it was there.
    fn close(&self, caller: &str, call_id: u64) -> Option<Arc<StreamGate>> {
        let mut by_caller = lock(&self.0);
        let streams = by_caller.get_mut(caller)?;
        let gate = streams.remove(&call_id);
        if streams.is_empty() {
            by_caller.remove(caller);
        }
        gate
    }

    /// `caller` granted `items` more to its stream `call_id`.
    pub fn grant(&self, caller: &str, call_id: u64, items: u32) {
        let by_caller = lock(&self.0);
        if let Some(gate) = by_caller.get(caller).and_then(|s| s.get(&call_id)) {
            let room = MAX_CREDIT.saturating_sub(gate.credit.available_permits());
            gate.credit.add_permits((items as usize).min(room));
        }
    }

    /// `caller` dropped its stream `call_id`.
    pub fn cancel(&self, caller: &str, call_id: u64) {
        if let Some(gate) = self.close(caller, call_id) {
            gate.cancel();
        }
    }

    /// Stops every stream to `caller`: it left.
    pub fn cancel_caller(&self, caller: &str) {
        let streams = lock(&self.0).remove(caller);
        for gate in streams.into_iter().flat_map(HashMap::into_values) {
            gate.cancel();
        }
    }

    /// Stops every stream: the connection they went through is gone.
    pub fn cancel_all(&self) {
        let all = std::mem::take(&mut *lock(&self.0));
        for gate in all.into_values().flat_map(HashMap::into_values) {
            gate.cancel();
        }
    }
}

/// One stream's credit, and whether its caller cancelled it.
struct StreamGate {
    credit: Semaphore,
    cancelled: watch::Sender<bool>,
}

impl StreamGate {
    fn cancel(&self) {
        self.cancelled.send_replace(true);
        self.credit.close();
    }
}

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
            match self.gate.credit.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return false, // cancelled
            }
            let frame = self.frame(Kind::StreamItem, 0, item);
            self.queue(frame).await
        })
    }

    fn cancelled(&self) -> BoxFuture<'_, ()> {
        let mut cancelled = self.gate.cancelled.subscribe();
        Box::pin(async move {
            let _ = cancelled.wait_for(|c| *c).await;
        })
    }

    fn end(self: Box<Self>, failure: Option<CallbackFailure>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if *self.gate.cancelled.borrow() {
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
