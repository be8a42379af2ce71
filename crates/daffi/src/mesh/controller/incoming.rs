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
use crate::executor::{CallBatch, Request};
use crate::mesh::batch::{CallItems, MAX_REPLIES_BATCH_BYTES};
use crate::mesh::{
    join_reply, put_reply_head, BatchItems, BoxFuture, OpenStream, JOINED_REPLY, REPLY_ITEM_HEAD,
};
use crate::protocol::message::{self, RemoteError};
use crate::sync::read;
use bytes::BytesMut;
use daffi_wire::frame::{
    FLAG_ERROR, FLAG_INCOMING, FLAG_NO_REPLY, FLAG_REPLY_BATCH, FLAG_STREAM, LEN_PREFIX,
};
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

/// The calls of a batch request frame from the controller (checked whole), served as
/// one unit ([`CallBatch`]): their replies are written into one batch reply as they
/// come (docs/PROTOCOL.md, "Batches of replies"), which leaves at
/// [`CallBatch::flush`], or sooner once full.
pub struct FrameBatch {
    frame: Frame,
    calls: BatchCalls,
    /// Calls not taken yet.
    left: usize,
    /// The id of the call last taken (0 for NO_RETURN calls).
    taken: u64,
    deadline: Option<Instant>,
    mesh: Arc<ControllerMesh>,
    /// The replies written so far, each with its head (call id, flags, length).
    replies: BytesMut,
    /// How many.
    answered: u64,
    /// Replies that found the way back full, and wait for room.
    waits: Vec<BoxFuture<'static, ()>>,
}

/// The calls of a batch: with their ids (calls that want replies), or NO_RETURN.
enum BatchCalls {
    Replies(CallItems),
    OneWay(BatchItems),
}

/// What a batch reply's buffer holds at first: room for many small replies.
const REPLIES_CAPACITY: usize = 4 * 1024;

impl FrameBatch {
    /// The calls of the batch request `frame`, `count` of them (its `call_id`, checked):
    /// `calls` for a batch of calls that want replies, `one_way` for NO_RETURN ones.
    fn new(frame: Frame, calls: BatchCalls, count: usize, mesh: &Arc<ControllerMesh>) -> Box<Self> {
        Box::new(FrameBatch {
            deadline: FrameRequest::deadline_of(&frame),
            frame,
            calls,
            left: count,
            taken: 0,
            mesh: mesh.clone(),
            replies: BytesMut::new(),
            answered: 0,
            waits: Vec::new(),
        })
    }

    /// The calls that want replies of the batch request `frame` (see [`batch_requests`](crate::mesh::batch_requests)).
    pub fn with_replies(frame: Frame, calls: CallItems, mesh: &Arc<ControllerMesh>) -> Box<Self> {
        let count = usize::try_from(frame.call_id()).unwrap_or(usize::MAX);
        Self::new(frame, BatchCalls::Replies(calls), count, mesh)
    }

    /// The NO_RETURN calls of the batch request `frame` (see [`batch_calls`](crate::mesh::batch_calls)).
    pub fn one_way(frame: Frame, calls: BatchItems, mesh: &Arc<ControllerMesh>) -> Box<Self> {
        let count = usize::try_from(frame.call_id()).unwrap_or(usize::MAX);
        Self::new(frame, BatchCalls::OneWay(calls), count, mesh)
    }

    /// The next call: its id (0 for NO_RETURN) and arguments.
    fn next_item(&mut self) -> Option<(u64, Bytes)> {
        if self.left == 0 {
            return None;
        }
        let item = match &mut self.calls {
            BatchCalls::Replies(calls) => calls.next(),
            BatchCalls::OneWay(calls) => calls.next().map(|args| (0, args)),
        };
        self.left = if item.is_some() {
            self.left.saturating_sub(1)
        } else {
            0
        };
        item
    }

    /// The header of a reply (or a batch of them: `call_id` their count) to the caller.
    fn reply_header(&self, flags: u8, call_id: u64) -> Header<'_> {
        Header {
            kind: Kind::Reply,
            flags,
            call_id,
            timeout_ms: 0,
            src: &self.mesh.name,
            dst: self.frame.src(),
            name: "",
        }
    }

    /// Queues `frame` (a reply, or a batch of them); a frame that finds the way back
    /// full waits for room (see [`CallBatch::flush`]).
    fn send(&mut self, reply: Outgoing) {
        let connection = read(&self.mesh.connection);
        let Some(conn) = connection.as_ref() else {
            tracing::debug!(callback = self.frame.name(), "reply dropped: not connected");
            return;
        };
        // More replies follow at once: these leave with them.
        let _batching = self
            .mesh
            .executor
            .replies_follow()
            .then(|| conn.queue.cork());
        if let Push::Full(reply) = conn.queue.push(reply) {
            let queue = conn.queue.clone();
            self.waits.push(Box::pin(async move {
                let _ = queue.send(reply).await;
            }));
        }
    }

    /// Sends the replies written so far: one alone as a lone reply, more as a batch.
    fn send_replies(&mut self) {
        let replies = std::mem::take(&mut self.replies).freeze();
        let reply = match std::mem::take(&mut self.answered) {
            0 => return,
            1 => {
                let head = &replies[..REPLY_ITEM_HEAD];
                let call_id = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
                let header = self.reply_header(head[8], call_id);
                Outgoing::new(&header, replies.slice(REPLY_ITEM_HEAD..))
            }
            count => Outgoing::new(&self.reply_header(FLAG_REPLY_BATCH, count), replies),
        };
        self.send(reply);
    }
}

impl CallBatch for FrameBatch {
    fn callback(&self) -> &str {
        self.frame.name()
    }

    fn caller(&self) -> &str {
        self.frame.src()
    }

    fn wants_reply(&self) -> bool {
        self.frame.flags() & FLAG_NO_REPLY == 0
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn remaining(&self) -> usize {
        self.left
    }

    fn next_call(&mut self) -> Option<Bytes> {
        let (call_id, args) = self.next_item()?;
        self.taken = call_id;
        Some(args)
    }

    /// Writes the reply into the batch reply being made; a large one (see
    /// [`JOINED_REPLY`]) goes alone at once, from its own memory, and a batch with no
    /// room left for it goes first.
    fn answer(&mut self, outcome: Outcome) {
        let (flags, body) = FrameRequest::reply_body(outcome);
        let len = body.len();
        if len >= JOINED_REPLY {
            let reply = Outgoing::new(&self.reply_header(flags, self.taken), body);
            return self.send(reply);
        }
        let limit = self.mesh.max_frame_size.load(Ordering::Relaxed);
        let new_len = self.replies.len() + REPLY_ITEM_HEAD + len;
        let header = self.reply_header(FLAG_REPLY_BATCH, 0);
        if self.answered > 0
            && (new_len > MAX_REPLIES_BATCH_BYTES || header.frame_len(new_len) - LEN_PREFIX > limit)
        {
            self.send_replies();
        }
        if self.replies.capacity() == 0 {
            self.replies = BytesMut::with_capacity(REPLIES_CAPACITY);
        }
        put_reply_head(&mut self.replies, self.taken, flags, len);
        for part in body.parts() {
            self.replies.extend_from_slice(part);
        }
        self.answered += 1;
    }

    fn flush(&mut self) -> Option<BoxFuture<'static, ()>> {
        self.send_replies();
        match self.waits.len() {
            0 => None,
            1 => self.waits.pop(),
            _ => {
                let waits = std::mem::take(&mut self.waits);
                Some(Box::pin(async move {
                    for wait in waits {
                        wait.await;
                    }
                }))
            }
        }
    }

    fn split_batch(&mut self, keep: usize) -> Option<Box<dyn CallBatch>> {
        if keep >= self.left {
            return None;
        }
        let mut rest = Box::new(FrameBatch {
            frame: self.frame.clone(),
            calls: match &self.calls {
                BatchCalls::Replies(calls) => BatchCalls::Replies(calls.clone()),
                BatchCalls::OneWay(calls) => BatchCalls::OneWay(calls.clone()),
            },
            left: self.left,
            taken: 0,
            deadline: self.deadline,
            mesh: self.mesh.clone(),
            replies: BytesMut::new(),
            answered: 0,
            waits: Vec::new(),
        });
        for _ in 0..keep {
            rest.next_item();
        }
        self.left = keep;
        Some(rest)
    }

    fn split_off(&mut self, keep: usize) -> Vec<Box<dyn Request>> {
        if keep >= self.left {
            return Vec::new();
        }
        // The calls kept are the next `keep`: skipped here, taken back after.
        let kept = match &self.calls {
            BatchCalls::Replies(calls) => BatchCalls::Replies(calls.clone()),
            BatchCalls::OneWay(calls) => BatchCalls::OneWay(calls.clone()),
        };
        for _ in 0..keep {
            self.next_item();
        }
        let mut rest = Vec::with_capacity(self.left);
        while let Some((call_id, args)) = self.next_item() {
            let request = FrameRequest::call_of_batch(
                self.frame.clone(),
                call_id,
                args,
                self.deadline,
                &self.mesh,
            );
            rest.push(request as Box<dyn Request>);
        }
        self.calls = kept;
        self.left = keep;
        rest
    }
}
