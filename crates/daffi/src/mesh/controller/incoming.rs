//! Requests from the controller, as the executor takes them: a request frame, and the
//! way back for its reply (the link's current connection).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::streams::FrameItemSink;
use super::ControllerMesh;
use crate::callback::Outcome;
use crate::executor::ItemSink;
use crate::executor::Request;
use crate::mesh::{join_reply, BoxFuture, OpenStream, JOINED_REPLY, REPLY_ITEM_HEAD};
use crate::protocol::message::{self, RemoteError};
use crate::sync::read;
use daffi_wire::frame::{FLAG_ERROR, FLAG_INCOMING, FLAG_NO_REPLY, FLAG_STREAM};
use daffi_wire::{Frame, Header, Kind, Outgoing, Payload, Push};

/// A request frame from the controller, or one call of a batch of calls.
pub struct FrameRequest {
    frame: Frame,
    /// The call's id: the frame's, or the call's own in a batch (0 in a batch of
    /// NO_RETURN calls, which are never answered).
    call_id: u64,
    /// The call's arguments, when the frame is a batch (a slice of its payload).
    args: Option<Bytes>,
    /// When the caller gives up, from the timeout the request carries.
    deadline: Option<Instant>,
    mesh: Arc<ControllerMesh>,
}

impl FrameRequest {
    /// The request in `frame`, received now.
    pub fn new(frame: Frame, mesh: &Arc<ControllerMesh>) -> Box<Self> {
        let deadline = Self::deadline_of(&frame);
        Box::new(FrameRequest {
            call_id: frame.call_id(),
            frame,
            args: None,
            deadline,
            mesh: mesh.clone(),
        })
    }

    /// One call of the batch request `frame`, `call_id` (0 for a NO_RETURN call), with
    /// its arguments `args` (a slice of the frame's payload) and the `deadline` of the
    /// frame ([`deadline_of`](Self::deadline_of)).
    pub fn call_of_batch(
        frame: Frame,
        call_id: u64,
        args: Bytes,
        deadline: Option<Instant>,
        mesh: &Arc<ControllerMesh>,
    ) -> Box<Self> {
        Box::new(FrameRequest {
            frame,
            call_id,
            args: Some(args),
            deadline,
            mesh: mesh.clone(),
        })
    }

    /// When the caller of the request in `frame`, received now, gives up.
    pub fn deadline_of(frame: &Frame) -> Option<Instant> {
        (frame.timeout_ms() > 0)
            .then(|| Instant::now() + Duration::from_millis(u64::from(frame.timeout_ms())))
    }

    /// The reply's flags and payload.
    fn reply_body(outcome: Outcome) -> (u8, Payload) {
        match outcome {
            Ok(value) => (0, value),
            Err(failure) => (
                FLAG_ERROR,
                message::encode(&RemoteError {
                    kind: failure.kind,
                    message: failure.message,
                })
                .into(),
            ),
        }
    }

    /// The header of the reply, with `flags`.
    fn reply_header(&self, flags: u8) -> Header<'_> {
        Header {
            kind: Kind::Reply,
            flags,
            call_id: self.call_id,
            timeout_ms: 0,
            src: &self.mesh.name,
            dst: self.frame.src(),
            name: "",
        }
    }
}

impl Request for FrameRequest {
    fn callback(&self) -> &str {
        self.frame.name()
    }

    fn caller(&self) -> &str {
        self.frame.src()
    }

    fn payload(&self) -> Bytes {
        match &self.args {
            Some(args) => args.clone(),
            None => self.frame.payload(),
        }
    }

    fn take_payload(&mut self) -> (Bytes, Option<daffi_wire::KeptBuffer>) {
        match self.args.take() {
            Some(args) => (args, None),
            // Large enough for a buffer of its own: the frame keeps its head only.
            None if self.frame.raw().len() >= crate::codec::BLOB_BY_REFERENCE => {
                self.frame.take_payload()
            }
            None => (self.frame.payload(), None),
        }
    }

    fn wants_reply(&self) -> bool {
        self.frame.flags() & FLAG_NO_REPLY == 0
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn wants_stream(&self) -> bool {
        self.frame.flags() & FLAG_STREAM != 0
    }

    fn open_stream(&self) -> Option<Box<dyn ItemSink>> {
        let sink = FrameItemSink::results(&self.mesh, self.frame.src(), self.call_id)?;
        Some(sink)
    }

    fn open_incoming(&self) -> Option<OpenStream> {
        if self.frame.flags() & FLAG_INCOMING == 0 {
            return None;
        }
        self.mesh
            .receive_arguments(self.frame.src(), self.call_id, self.frame.name())
    }

    /// Queues the reply on the live connection without taking a handle on it (the
    /// common case: nothing cloned per reply). Without a connection the reply is dropped.
    ///
    /// A small reply joins the reply to the same caller still queued at the back of the
    /// connection, if there is one (docs/PROTOCOL.md, "Batches of replies"): the
    /// replies then leave, are forwarded and are read as one frame. A reply that finds
    /// nothing waiting goes alone, at once.
    fn reply(self: Box<Self>, outcome: Outcome) -> Option<BoxFuture<'static, ()>> {
        let (flags, body) = Self::reply_body(outcome);
        let header = self.reply_header(flags);
        let connection = read(&self.mesh.connection);
        let Some(conn) = connection.as_ref() else {
            tracing::debug!(callback = self.frame.name(), "reply dropped: not connected");
            return None;
        };
        if body.len() < JOINED_REPLY {
            let limit = self.mesh.max_frame_size.load(Ordering::Relaxed);
            // At most: the reply, its head, and the first reply's head.
            let most_added = body.len() + 2 * REPLY_ITEM_HEAD;
            if conn
                .queue
                .join_last(most_added, |last| join_reply(last, &header, &body, limit))
            {
                return None;
            }
        }
        let reply = Outgoing::new(&header, body);
        // More replies follow at once: this one leaves with them.
        let _batching = self
            .mesh
            .executor
            .replies_follow()
            .then(|| conn.queue.cork());
        match conn.queue.push(reply) {
            Push::Sent | Push::Closed => None,
            Push::Full(reply) => {
                let queue = conn.queue.clone();
                Some(Box::pin(async move {
                    let _ = queue.send(reply).await;
                }))
            }
        }
    }
}
