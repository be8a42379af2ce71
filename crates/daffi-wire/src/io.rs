//! Reading frames off a byte stream, and writing them.
//!
//! Each connection has one [`FrameSender`] (cloned by everyone who sends on it) and one
//! writer task. When the connection is idle, a sender writes its frame to the socket
//! itself, without waiting for another task to wake up: that is what a lone call's
//! latency needs. When frames come faster, they are queued, and the writer task drains
//! the queue into one buffer and one write call, so that many calls in flight share
//! system calls. Large payloads are written straight from their `Bytes`, never copied
//! into the buffer.
//!
//! [`write_loop`] is the plain batching writer (a queue and a writer task, nothing
//! written by the senders), kept for tools that want exactly that.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use super::frame::{Frame, FrameError, Header, LEN_PREFIX};
use super::payload::Payload;

/// A frame ready to send: the encoded head (length prefix and header) and the payload.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// Length prefix and header, or a whole forwarded frame.
    pub(crate) head: Bytes,
    /// Payload; may be empty.
    pub(crate) body: Payload,
}

impl Outgoing {
    /// A frame whose bytes are all in `raw` (a forwarded frame).
    pub fn raw(raw: Bytes) -> Self {
        Outgoing {
            head: raw,
            body: Payload::default(),
        }
    }

    /// A frame of `header` and `body`, the length prefix computed.
    pub fn new(header: &Header<'_>, body: impl Into<Payload>) -> Self {
        let body = body.into();
        Outgoing {
            head: header.encode(body.len()),
            body,
        }
    }

    /// Several frames sent as one: they go out together, in order, in one write when
    /// the connection is idle (a broadcast's requests, say).
    pub fn joined(frames: Vec<Outgoing>) -> Self {
        let mut frames = frames.into_iter();
        let Some(mut joined) = frames.next() else {
            return Outgoing::default();
        };
        for Outgoing { head, body } in frames {
            joined.body.push(head);
            joined.body.append(body);
        }
        joined
    }

    /// The length prefix and header (or a whole forwarded frame).
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// The payload (for joined frames: the frames after the first).
    pub fn body(&self) -> &Payload {
        &self.body
    }

    /// Appends the frame's bytes to `out`: for what is written in one piece (the
    /// opening of a connection) and for tests.
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        for part in self.body.parts() {
            out.extend_from_slice(part);
        }
    }

    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether the frame is empty (never true for a valid frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why reading the next frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Eof,
}

/// Frames at least this long are read into a buffer of their own, which the reader
/// keeps for the next large frame once every part of the frame has been dropped.
const LARGE_FRAME: usize = 1024 * 1024;
/// How long daffi's connections keep a large frame's buffer for the next one (see
/// [`FrameReader::keep_large_buffers`]).
pub const KEEP_LARGE_BUFFERS: Duration = Duration::from_secs(1);

/// How much a reader's buffer holds once the connection is up: one read takes up to this
/// much of a burst of frames.
pub const READ_BUFFER: usize = 64 * 1024;

/// Reads length-prefixed frames, enforcing the size limit before allocating.
///
/// `next` is cancel-safe: bytes read are kept in the reader until their frame is whole.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_frame_size: usize,
    /// A large frame being read, and its length with prefix.
    large: Option<(BytesMut, usize)>,
    /// The last large frame's whole buffer, and until when it is kept for reuse.
    spare: Option<(Bytes, tokio::time::Instant)>,
    /// How long a large frame's buffer is kept; `None`: not kept.
    keep_large: Option<Duration>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader; frames over `max_frame_size` bytes (prefix excluded) are refused.
    pub fn new(inner: R, max_frame_size: usize) -> Self {
        Self::with_buffer(inner, max_frame_size, READ_BUFFER)
    }

    /// Like [`new`](Self::new), with a buffer of `capacity` bytes to begin with: a peer
    /// that has not authenticated gets a small one ([`grow_buffer`](Self::grow_buffer)
    /// once it has).
    pub fn with_buffer(inner: R, max_frame_size: usize, capacity: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(capacity),
            max_frame_size,
            large: None,
            spare: None,
            keep_large: None,
        }
    }

    /// Keeps the buffer of each large frame (1 MiB or more) for up to `keep_for`, and
    /// reads the next large frame into it if nothing else holds it by then: a burst of
    /// large calls then costs no fresh memory mapping (page faults, zeroing by the
    /// kernel) per frame, and a connection that goes quiet gives the memory back.
    /// Needs a Tokio runtime with time enabled.
    pub fn keep_large_buffers(mut self, keep_for: Duration) -> Self {
        self.keep_large = Some(keep_for);
        self
    }

    /// Changes the limit (after the handshake told us the controller's).
    pub fn set_max_frame_size(&mut self, limit: usize) {
        self.max_frame_size = limit;
    }

    /// Moves what is buffered into a buffer of [`READ_BUFFER`] bytes: a reader made
    /// small for the handshake reads bursts of frames in one call from then on. (A new
    /// buffer, not a `reserve`: `BytesMut` sizes the buffers it makes later after the
    /// one it was created with.)
    pub fn grow_buffer(&mut self) {
        let mut grown = BytesMut::with_capacity(READ_BUFFER.max(self.buf.len()));
        grown.extend_from_slice(&self.buf);
        self.buf = grown;
    }

    /// The underlying reader; bytes already buffered are dropped.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads exactly `n` raw bytes (the handshake preamble).
    pub async fn read_exact_bytes(&mut self, n: usize) -> Result<Bytes, ReadError> {
        while self.buf.len() < n {
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Eof);
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// Whether a whole frame is buffered: the next [`next`](Self::next) returns without
    /// reading (a frame, or the error that its length prefix is over the limit).
    pub fn has_frame(&self) -> bool {
        self.large.is_none()
            && self.buffered_frame_len().is_some_and(|total| {
                total - LEN_PREFIX > self.max_frame_size || self.buf.len() >= total
            })
    }

    /// The receiver's name of the next frame, if it is whole in the buffer (see
    /// [`has_frame`](Self::has_frame)); its bytes are not checked yet.
    pub fn next_frame_dst(&self) -> Option<&[u8]> {
        if self.has_frame() {
            super::frame::peek_dst(&self.buf)
        } else {
            None
        }
    }

    /// The length, prefix included, of the frame the buffer starts with, once its
    /// length prefix is in.
    fn buffered_frame_len(&self) -> Option<usize> {
        (self.buf.len() >= LEN_PREFIX)
            .then(|| LEN_PREFIX + (&self.buf[..LEN_PREFIX]).get_u32() as usize)
    }

    /// The next frame, or `None` when the peer closed the connection between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some((frame, total)) = &mut self.large {
                let missing = *total - frame.len();
                if missing == 0 {
                    let frame = std::mem::take(frame);
                    self.large = None;
                    return self.finish_large(frame).map(Some);
                }
                if self.inner.read_buf(&mut frame.limit(missing)).await? == 0 {
                    return Err(ReadError::Eof);
                }
                continue;
            }
            if let Some(len) = self.complete_frame_len()? {
                let raw = self.buf.split_to(len).freeze();
                return Ok(Some(Frame::parse(raw)?));
            }
            if self.large.is_some() {
                continue;
            }
            let read = match self.spare.as_ref().map(|(_, until)| *until) {
                None => self.inner.read_buf(&mut self.buf).await?,
                Some(until) => {
                    let read = self.inner.read_buf(&mut self.buf);
                    match tokio::time::timeout_at(until, read).await {
                        Ok(read) => read?,
                        Err(_) => {
                            self.spare = None;
                            continue;
                        }
                    }
                }
            };
            if read == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Eof)
                };
            }
        }
    }

    /// If the buffer holds a whole frame, its length with prefix. Otherwise reserves room
    /// for it, or starts reading it into a buffer of its own if it is large.
    fn complete_frame_len(&mut self) -> Result<Option<usize>, FrameError> {
        let Some(total) = self.buffered_frame_len() else {
            return Ok(None);
        };
        let size = total - LEN_PREFIX;
        if size > self.max_frame_size {
            return Err(FrameError::TooLarge {
                size,
                limit: self.max_frame_size,
            });
        }
        if self.buf.len() >= total {
            Ok(Some(total))
        } else if total >= LARGE_FRAME {
            // Everything buffered belongs to this frame: it is longer than the buffer.
            let mut frame = self.large_buffer(total);
            frame.extend_from_slice(&self.buf);
            self.buf.clear();
            self.large = Some((frame, total));
            Ok(None)
        } else {
            // One allocation for the frame instead of doubling repeatedly.
            self.buf.reserve(total - self.buf.len());
            Ok(None)
        }
    }

    /// An empty buffer with room for `total` bytes: the spare one if nothing else holds
    /// it any more and it is big enough, a new one otherwise.
    fn large_buffer(&mut self, total: usize) -> BytesMut {
        if let Some((spare, _)) = self.spare.take() {
            if let Ok(mut buf) = spare.try_into_mut() {
                if buf.capacity() >= total {
                    buf.clear();
                    return buf;
                }
            }
        }
        BytesMut::with_capacity(total)
    }

    /// The large frame just read; its buffer is kept for the next one.
    fn finish_large(&mut self, frame: BytesMut) -> Result<Frame, ReadError> {
        let raw = frame.freeze();
        if let Some(keep_for) = self.keep_large {
            self.spare = Some((raw.clone(), tokio::time::Instant::now() + keep_for));
        }
        Ok(Frame::parse(raw)?)
    }
}

/// Payloads up to this size are copied into the batch buffer; larger ones are written
/// from their own memory.
const COPY_THRESHOLD: usize = 16 * 1024;
/// Flush the batch once it holds this much.
const BATCH_LIMIT: usize = 256 * 1024;

/// Writes everything sent on `rx` to `writer`, batching frames that are queued together.
/// Returns when every sender is gone (after flushing) or the socket fails.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch = BytesMut::with_capacity(BATCH_LIMIT);
    while let Some(first) = rx.recv().await {
        push(&mut writer, &mut batch, first).await?;
        while batch.len() < BATCH_LIMIT {
            match rx.try_recv() {
                Ok(next) => push(&mut writer, &mut batch, next).await?,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            writer.write_all(&batch).await?;
            batch.clear();
        }
        writer.flush().await?;
    }
    let _ = writer.shutdown().await;
    Ok(())
}

async fn push<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut BytesMut,
    frame: Outgoing,
) -> std::io::Result<()> {
    if frame.head.len() > COPY_THRESHOLD {
        flush_batch(writer, batch).await?;
        writer.write_all(&frame.head).await?;
    } else {
        batch.extend_from_slice(&frame.head);
    }
    for part in frame.body.parts() {
        if part.len() > COPY_THRESHOLD {
            flush_batch(writer, batch).await?;
            writer.write_all(part).await?;
        } else {
            batch.extend_from_slice(part);
        }
    }
    Ok(())
}

async fn flush_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut BytesMut,
) -> std::io::Result<()> {
    if !batch.is_empty() {
        writer.write_all(batch).await?;
        batch.clear();
    }
    Ok(())
}

/// A sender writes its frame itself only if the connection wrote nothing for this long:
/// a connection that is busy batches instead (one system call per frame would cost more
/// than it saves).
const QUIET_BEFORE_DIRECT_WRITE: Duration = Duration::from_micros(30);
/// A writer keeps at most this much batch buffer, and this many queue slots, between
/// batches: a controller with 1,000 connections must not keep each one's largest burst
/// (1,000 membership events of ~60 bytes each) allocated.
const KEEP_BATCH_BUFFER: usize = 4 * 1024;
/// See [`KEEP_BATCH_BUFFER`].
const KEEP_QUEUE_SLOTS: usize = 64;

/// What a queued frame costs besides its bytes (its entry in the queue, the handles on
/// its buffers), counted against the byte limit: a flood of tiny frames is bounded too.
pub const FRAME_COST: usize = 128;
/// Bytes one connection holds, accepted but not yet written, before a sender waits (or
/// is refused): 64 MiB.
pub const DEFAULT_MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// How long a connection may have bytes to write while its peer reads none of them
/// before it is closed: 10 s (NATS's write deadline).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How much one connection may hold for its peer, and how long the peer may read
/// nothing. A peer that is paused or slower than its senders costs at most this much
/// memory, for at most this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Bytes accepted but not yet written (each frame counting [`FRAME_COST`] more)
    /// before a sender waits (or is refused). One frame always passes when nothing is
    /// held, whatever its size.
    pub bytes: usize,
    /// Bytes past which even a frame that cannot be refused (a reply, a membership
    /// event) is not queued: the connection is closed instead.
    pub hard_bytes: usize,
    /// How long the writer may have bytes to write without any of them leaving before
    /// the connection is closed. Any progress restarts the clock, so a large frame to a
    /// slow reader is never cut.
    pub stall_timeout: Duration,
}

impl QueueLimits {
    /// Limits of `bytes`, for frames of up to `max_frame_size`: the hard limit is twice
    /// the larger of the two, so that two frames of the largest size always fit.
    pub fn new(bytes: usize, max_frame_size: usize, stall_timeout: Duration) -> Self {
        QueueLimits {
            bytes,
            hard_bytes: bytes.max(max_frame_size).saturating_mul(2),
            stall_timeout,
        }
    }

    /// Whether holding `bytes` is past the limit, or (`hard`) past the hard limit.
    fn exceeded(&self, bytes: usize, hard: bool) -> bool {
        bytes > if hard { self.hard_bytes } else { self.bytes }
    }
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits::new(
            DEFAULT_MAX_QUEUE_BYTES,
            crate::DEFAULT_MAX_FRAME_SIZE,
            DEFAULT_STALL_TIMEOUT,
        )
    }
}

/// The write half of a connection, as the writer keeps it.
type Socket = Box<dyn AsyncWrite + Send + Unpin>;

/// The connection is closed: the frame was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection is closed")]
pub struct Closed;

/// Why a connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Writing to the socket failed.
    WriteFailed(String),
    /// The peer read nothing for this long while there was something to write.
    Stalled(Duration),
    /// Frames that cannot be refused would have passed the hard limit: this many bytes
    /// in this many frames were held for the peer.
    Overflowed {
        /// Bytes accepted and not yet written.
        bytes: usize,
        /// Frames queued.
        frames: usize,
    },
}

impl CloseReason {
    /// Whether the peer was closed for reading too slowly (or not at all).
    pub fn is_slow_consumer(&self) -> bool {
        !matches!(self, CloseReason::WriteFailed(_))
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::WriteFailed(e) => write!(f, "writing failed: {e}"),
            CloseReason::Stalled(after) => {
                write!(f, "the peer read nothing for {after:?} (slow consumer)")
            }
            CloseReason::Overflowed { bytes, frames } => write!(
                f,
                "{bytes} bytes in {frames} frames were waiting for the peer, past the hard limit (slow consumer)"
            ),
        }
    }
}

/// Sends frames on one connection: writes them itself when the connection is idle,
/// queues them for the connection's writer task otherwise. Frames leave in the order
/// they were sent. Cheap to clone; the writer task ends (after writing what is queued)
/// when every clone is dropped.
///
/// What is held for the peer is bounded by [`QueueLimits`]: the bytes of the frames
/// accepted but not yet written (counted until the socket took them), and a
/// [`FRAME_COST`] per frame. A peer that reads nothing
/// for the stall timeout is closed, as is one that would make a frame which cannot be
/// refused pass the hard limit ([`FrameSender::close_as_slow_consumer`]).
pub struct FrameSender {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer task: frames are queued, or the last sender is gone.
    work: Notify,
    /// Wakes senders waiting for room in a full queue.
    room: Notify,
    /// Wakes whoever waits for the connection to close.
    closing: Notify,
    /// Nothing more can be sent. Set only under the state's lock; read without it.
    closed: AtomicBool,
    limits: QueueLimits,
    /// Live `FrameSender` clones (an atomic: a clone per forwarded frame is common).
    senders: AtomicUsize,
}

struct State {
    queue: VecDeque<Outgoing>,
    /// Bytes accepted and not yet written: the queue's, and those of the frames the
    /// writer task took and has not finished writing; each frame counts [`FRAME_COST`]
    /// more.
    unwritten: usize,
    /// The socket, while nobody writes to it.
    socket: Option<Socket>,
    /// When a write last ended.
    last_write: Option<Instant>,
    /// Why the connection closed, once it has.
    close_reason: Option<CloseReason>,
}

/// What trying to send found.
pub enum Push {
    /// The frame is written or queued.
    Sent,
    /// The queue is full: the frame is given back.
    Full(Outgoing),
    /// The connection is closed: the frame is dropped.
    Closed,
}

/// What a connection held when it was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Bytes accepted and not yet written (with [`FRAME_COST`] per frame).
    pub bytes: usize,
    /// Frames queued.
    pub frames: usize,
}

/// A sender for `socket` within `limits`, and the writer task to spawn. The task returns
/// when the socket fails or stalls, when the connection is closed, or once every sender
/// is gone and the queue is written (then it shuts the socket down).
pub fn frame_channel<W>(
    socket: W,
    limits: QueueLimits,
) -> (
    FrameSender,
    impl std::future::Future<Output = std::io::Result<()>> + Send + 'static,
)
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            unwritten: 0,
            socket: Some(Box::new(socket)),
            last_write: None,
            close_reason: None,
        }),
        work: Notify::new(),
        room: Notify::new(),
        closing: Notify::new(),
        closed: AtomicBool::new(false),
        limits,
        senders: AtomicUsize::new(1),
    });
    let writer = run_writer(shared.clone());
    (FrameSender { shared }, writer)
}

impl Clone for FrameSender {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        FrameSender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for FrameSender {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.work.notify_one();
        }
    }
}

impl std::fmt::Debug for FrameSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSender").finish_non_exhaustive()
    }
}

impl FrameSender {
    /// Sends `frame`, waiting while the queue is full.
    pub async fn send(&self, frame: Outgoing) -> Result<(), Closed> {
        let mut frame = frame;
        loop {
            match self.push(frame) {
                Push::Sent => return Ok(()),
                Push::Closed => return Err(Closed),
                Push::Full(back) => frame = back,
            }
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before looking again: room made in between is not missed.
            room.as_mut().enable();
            match self.push(frame) {
                Push::Sent => return Ok(()),
                Push::Closed => return Err(Closed),
                Push::Full(back) => frame = back,
            }
            room.await;
        }
    }

    /// Sends `frame` unless the queue is full (or the connection closed).
    pub fn try_send(&self, frame: Outgoing) -> Result<(), Closed> {
        match self.push(frame) {
            Push::Sent => Ok(()),
            Push::Full(_) | Push::Closed => Err(Closed),
        }
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Resolves once the connection is closed: a write failed or stalled, or it was
    /// closed as a slow consumer.
    pub async fn closed(&self) {
        self.shared.closed().await;
    }

    /// Why the connection closed; `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.lock().close_reason.clone()
    }

    /// Closes the connection at once, dropping what is queued for it: its peer reads
    /// too little of what is sent to it. Returns what it held. The writer task ends
    /// without finishing its write.
    pub fn close_as_slow_consumer(&self) -> Held {
        let mut st = self.shared.lock();
        let held = Held {
            bytes: st.unwritten,
            frames: st.queue.len(),
        };
        self.shared.close(
            &mut st,
            CloseReason::Overflowed {
                bytes: held.bytes,
                frames: held.frames,
            },
        );
        held
    }

    /// Sends `frame` if the queue has room; gives it back otherwise.
    pub fn push(&self, frame: Outgoing) -> Push {
        self.push_with(frame, false)
    }

    /// Like [`push`](Self::push); with `more_follow` (the sender has more frames for this
    /// connection at hand: the controller forwarding the frames of one read, a node's
    /// replies to queued callbacks), the writing is left to the writer task even on an
    /// idle connection, so that they leave in one write.
    pub fn push_with(&self, frame: Outgoing, more_follow: bool) -> Push {
        self.push_within(frame, more_follow, false)
    }

    /// Like [`push_with`](Self::push_with), for a frame the peer cannot refuse (a reply,
    /// a membership event): it passes the byte limit, up to the hard limit. `Full`
    /// means past the hard limit: the caller closes the connection
    /// ([`close_as_slow_consumer`](Self::close_as_slow_consumer)).
    pub fn push_unrefused(&self, frame: Outgoing, more_follow: bool) -> Push {
        self.push_within(frame, more_follow, true)
    }

    fn push_within(&self, frame: Outgoing, more_follow: bool, hard: bool) -> Push {
        let mut st = self.shared.lock();
        if self.shared.closed.load(Ordering::Relaxed) {
            return Push::Closed;
        }
        // The clock is read last: a busy connection is decided without it. An idle
        // socket with an empty queue means nothing is held: the writer task gives the
        // socket back only once it wrote everything it took.
        let direct = !more_follow
            && st.queue.is_empty()
            && st.socket.is_some()
            && st
                .last_write
                .map_or(true, |t| t.elapsed() >= QUIET_BEFORE_DIRECT_WRITE);
        if direct {
            if let Some(mut socket) = st.socket.take() {
                drop(st);
                let written = write_now(&mut socket, frame);
                let mut st = self.shared.lock();
                st.socket = Some(socket);
                st.last_write = Some(Instant::now());
                match written {
                    Ok(None) if st.queue.is_empty() => {}
                    Ok(None) => self.shared.work.notify_one(),
                    Ok(Some(rest)) => {
                        // The socket is full: the writer task finishes the frame first.
                        st.unwritten += rest.len() + FRAME_COST;
                        st.queue.push_front(rest);
                        self.shared.work.notify_one();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "a write failed; closing the connection");
                        self.shared
                            .close(&mut st, CloseReason::WriteFailed(e.to_string()));
                        return Push::Closed;
                    }
                }
                return Push::Sent;
            }
        }
        let cost = frame.len() + FRAME_COST;
        // One frame always passes when nothing is held, whatever its size.
        if st.unwritten > 0 && self.shared.limits.exceeded(st.unwritten + cost, hard) {
            return Push::Full(frame);
        }
        st.unwritten += cost;
        st.queue.push_back(frame);
        // Whoever holds the socket now looks at the queue when it gives the socket back.
        if st.socket.is_some() {
            self.shared.work.notify_one();
        }
        Push::Sent
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the connection (once; the first reason stays): drops the queue and wakes
    /// everyone who waits on it.
    fn close(&self, st: &mut State, reason: CloseReason) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        st.close_reason = Some(reason);
        st.queue.clear();
        st.unwritten = 0;
        self.work.notify_one();
        self.room.notify_waiters();
        self.closing.notify_waiters();
    }

    /// `n` bytes left for the socket: room for more.
    fn wrote(&self, n: usize) {
        let mut st = self.lock();
        st.unwritten = st.unwritten.saturating_sub(n);
        drop(st);
        self.room.notify_waiters();
    }

    async fn closed(&self) {
        loop {
            let closing = self.closing.notified();
            tokio::pin!(closing);
            // Registered before looking: a close in between is not missed.
            closing.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            closing.await;
        }
    }
}

struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// A waker that does nothing: a write attempted outside the writer task never waits.
fn noop_waker() -> &'static Waker {
    static WAKER: OnceLock<Waker> = OnceLock::new();
    WAKER.get_or_init(|| Waker::from(Arc::new(NoopWake)))
}

/// Most buffers one vectored write passes: the head and the first parts of the payload.
const MAX_SLICES: usize = 8;

/// Writes `frame` now, as far as the socket takes it without waiting. Returns what is
/// left (for the writer task), or `None` when all of it went out.
fn write_now(socket: &mut Socket, frame: Outgoing) -> std::io::Result<Option<Outgoing>> {
    let mut cx = Context::from_waker(noop_waker());
    let Outgoing { mut head, mut body } = frame;
    while !head.is_empty() || !body.is_empty() {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        slices[0] = IoSlice::new(&head);
        let mut used = 1;
        for (slot, part) in slices[1..].iter_mut().zip(body.parts()) {
            *slot = IoSlice::new(part);
            used += 1;
        }
        match Pin::new(&mut *socket).poll_write_vectored(&mut cx, &slices[..used]) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                let from_head = n.min(head.len());
                head.advance(from_head);
                body.advance(n - from_head);
            }
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(Some(Outgoing { head, body })),
        }
    }
    // A no-op on plain sockets; a stream that buffers gets flushed by the writer task.
    match Pin::new(&mut *socket).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok(None),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(Some(Outgoing::default())),
    }
}

/// The clock of a writer whose socket takes nothing: it runs while a write waits, and
/// any progress stops it. Its timer is made on the first wait, so a connection that
/// never waits never arms one.
struct Stall {
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    running: bool,
}

impl Stall {
    fn new(timeout: Duration) -> Self {
        Stall {
            timeout,
            timer: None,
            running: false,
        }
    }

    /// Passes on what one write (or flush) attempt gave; while it waits, fails it once
    /// the clock passes the timeout.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if attempt.is_ready() {
            self.running = false;
            return attempt;
        }
        let timer = match &mut self.timer {
            Some(timer) if self.running => timer,
            slot => {
                let deadline = tokio::time::Instant::now() + self.timeout;
                self.running = true;
                let timer =
                    slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                timer.as_mut().reset(deadline);
                timer
            }
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the peer read nothing for {:?} (slow consumer)",
                    self.timeout
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The socket as the writer task writes to it: a write that waits longer than the stall
/// timeout fails, and every byte taken is counted off what the connection holds.
struct Watched<'a> {
    socket: &'a mut Socket,
    stall: &'a mut Stall,
    shared: &'a Shared,
}

impl AsyncWrite for Watched<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut *this.socket).poll_write(cx, buf);
        let written = this.stall.watch(cx, attempt);
        if let Poll::Ready(Ok(n)) = written {
            this.shared.wrote(n);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut *this.socket).poll_flush(cx);
        this.stall.watch(cx, attempt)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let attempt = Pin::new(&mut *this.socket).poll_shutdown(cx);
        this.stall.watch(cx, attempt)
    }
}

/// The writer task: drains the queue in batches while senders queue faster than they
/// could write.
async fn run_writer(shared: Arc<Shared>) -> std::io::Result<()> {
    let mut batch = BytesMut::new();
    let mut frames = Vec::new();
    let mut stall = Stall::new(shared.limits.stall_timeout);
    loop {
        let work = shared.work.notified();
        tokio::pin!(work);
        work.as_mut().enable();
        let taken = {
            let mut st = shared.lock();
            if shared.closed.load(Ordering::Relaxed) {
                return Ok(());
            }
            match st.socket.take() {
                Some(socket) if !st.queue.is_empty() => {
                    frames.extend(st.queue.drain(..));
                    if st.queue.capacity() > KEEP_QUEUE_SLOTS {
                        st.queue = VecDeque::new();
                    }
                    Some((socket, false))
                }
                Some(socket) if shared.senders.load(Ordering::Acquire) == 0 => Some((socket, true)),
                other => {
                    st.socket = other;
                    None
                }
            }
        };
        let Some((mut socket, finished)) = taken else {
            work.await;
            // Let the tasks woken with this one (by the same read of many replies, say)
            // queue their frames first: they go out in this batch, not one write each.
            tokio::task::yield_now().await;
            continue;
        };
        let mut out = Watched {
            socket: &mut socket,
            stall: &mut stall,
            shared: &shared,
        };
        if finished {
            let _ = out.shutdown().await;
            return Ok(());
        }
        let taken = frames.len();
        // A connection closed from outside (a slow consumer) ends the write at once.
        let written = tokio::select! {
            biased;
            written = write_batch(&mut out, &mut batch, &mut frames) => written,
            _ = shared.closed() => return Ok(()),
        };
        frames.clear();
        if frames.capacity() > KEEP_QUEUE_SLOTS {
            frames = Vec::new();
        }
        if batch.capacity() > KEEP_BATCH_BUFFER {
            batch = BytesMut::new();
        }
        let mut st = shared.lock();
        st.last_write = Some(Instant::now());
        match written {
            Ok(()) => {
                // Their bytes were counted off as they left; now their cost per frame.
                st.unwritten = st.unwritten.saturating_sub(taken * FRAME_COST);
                st.socket = Some(socket);
                drop(st);
                shared.room.notify_waiters();
            }
            Err(e) => {
                let reason = match e.kind() {
                    std::io::ErrorKind::TimedOut => CloseReason::Stalled(stall.timeout),
                    _ => CloseReason::WriteFailed(e.to_string()),
                };
                shared.close(&mut st, reason);
                return Err(e);
            }
        }
    }
}

/// Writes `frames` in one batch: small parts copied into `batch`, large ones from their
/// own memory.
async fn write_batch(
    out: &mut Watched<'_>,
    batch: &mut BytesMut,
    frames: &mut Vec<Outgoing>,
) -> std::io::Result<()> {
    // One allocation for the batch's small frames, however many there are.
    let small: usize = frames
        .iter()
        .map(|f| {
            let head = if f.head.len() > COPY_THRESHOLD {
                0
            } else {
                f.head.len()
            };
            let body: usize = f
                .body
                .parts()
                .map(Bytes::len)
                .filter(|&len| len <= COPY_THRESHOLD)
                .sum();
            head + body
        })
        .sum();
    batch.reserve(small.min(BATCH_LIMIT));
    for frame in frames.drain(..) {
        push(out, batch, frame).await?;
    }
    flush_batch(out, batch).await?;
    out.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Kind;

    /// Default limits, with room for about `n` small frames.
    fn frames(n: usize) -> QueueLimits {
        QueueLimits {
            bytes: n * (FRAME_COST + 32),
            ..QueueLimits::default()
        }
    }

    /// Limits for the tests below: 1,000 bytes, a hard limit of 2,000.
    fn small(stall_timeout: Duration) -> QueueLimits {
        QueueLimits {
            bytes: 1000,
            hard_bytes: 2000,
            stall_timeout,
        }
    }

    fn raw(len: usize) -> Outgoing {
        Outgoing::raw(Bytes::from(vec![0u8; len]))
    }

    fn goodbye() -> Outgoing {
        Outgoing::new(&Header::control(Kind::Goodbye), Payload::default())
    }

    #[tokio::test]
    async fn one_frame_of_any_size_passes_when_nothing_is_held() {
        // The peer reads nothing: the socket takes 64 bytes, the rest stays held.
        let (a, _peer) = tokio::io::duplex(64);
        let (tx, writer) = frame_channel(a, small(Duration::from_secs(60)));
        let _writer = tokio::spawn(writer);
        assert!(
            matches!(tx.push(raw(5000)), Push::Sent),
            "5x the byte limit"
        );
        assert!(
            matches!(tx.push(raw(1)), Push::Full(_)),
            "then nothing more"
        );
        assert!(matches!(tx.push_unrefused(raw(1), false), Push::Full(_)));
    }

    #[tokio::test]
    async fn the_byte_limit_refuses_requests_and_the_hard_limit_closes() {
        let (a, _peer) = tokio::io::duplex(64);
        let (tx, writer) = frame_channel(a, small(Duration::from_secs(60)));
        let writer = tokio::spawn(writer);
        // 64 bytes go to the socket at once; the rest is held, with the frame's cost.
        let mut held = 600 - 64 + FRAME_COST;
        assert!(matches!(tx.push(raw(600)), Push::Sent));
        held += 200 + FRAME_COST;
        assert!(held <= 1000);
        assert!(matches!(tx.push(raw(200)), Push::Sent));
        assert!(held + 100 + FRAME_COST > 1000);
        assert!(matches!(tx.push(raw(100)), Push::Full(_)));
        assert_eq!(tx.try_send(raw(100)), Err(Closed), "full, not sent");
        assert!(!tx.is_closed(), "a full queue is not a closed one");
        // A frame that cannot be refused passes the byte limit, up to the hard limit.
        assert!(matches!(tx.push_unrefused(raw(100), false), Push::Sent));
        held += 100 + FRAME_COST;
        assert!(held + 700 + FRAME_COST > 2000);
        assert!(matches!(tx.push_unrefused(raw(700), false), Push::Full(_)));
        assert_eq!(tx.close_as_slow_consumer().bytes, held);
        assert!(tx.is_closed());
        tokio::time::timeout(Duration::from_secs(10), tx.closed())
            .await
            .expect("closed() resolves once closed");
        assert!(matches!(
            tx.close_reason(),
            Some(CloseReason::Overflowed { bytes, .. }) if bytes == held
        ));
        assert_eq!(tx.send(raw(1)).await, Err(Closed));
        // The writer, stuck in a write to a peer that reads nothing, ends at once.
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writer ends when the connection is closed")
            .expect("join")
            .expect("not a write failure");
    }

    #[tokio::test]
    async fn bytes_count_until_the_socket_takes_them() {
        let (a, mut peer) = tokio::io::duplex(64);
        let (tx, writer) = frame_channel(a, small(Duration::from_secs(60)));
        let _writer = tokio::spawn(writer);
        assert!(matches!(tx.push(raw(1000)), Push::Sent));
        assert!(matches!(tx.push(raw(100)), Push::Full(_)));
        // The writer task took the rest of the frame from the queue: it is still held
        // until the peer has read it. Once it has, there is room again.
        let mut got = vec![0u8; 1000];
        peer.read_exact(&mut got).await.expect("read");
        tokio::time::timeout(Duration::from_secs(10), tx.send(raw(900)))
            .await
            .expect("room once the peer read")
            .expect("open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_nothing_is_closed_after_the_stall_timeout() {
        let (a, _peer) = tokio::io::duplex(64);
        let stall = Duration::from_secs(10);
        let (tx, writer) = frame_channel(a, small(stall));
        let writer = tokio::spawn(writer);
        let started = tokio::time::Instant::now();
        assert!(matches!(tx.push(raw(1000)), Push::Sent));
        tx.closed().await;
        assert!(started.elapsed() >= stall, "{:?}", started.elapsed());
        assert_eq!(tx.close_reason(), Some(CloseReason::Stalled(stall)));
        assert!(tx
            .close_reason()
            .is_some_and(|r| r.to_string().contains("slow consumer")));
        let failed = writer.await.expect("join").expect_err("the writer failed");
        assert_eq!(failed.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(tx.try_send(raw(1)), Err(Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_peer_that_keeps_reading_is_never_cut() {
        // 64 bytes every 6 s: the frame takes minutes, but no wait reaches 10 s.
        let (a, mut peer) = tokio::io::duplex(64);
        let stall = Duration::from_secs(10);
        let (tx, writer) = frame_channel(a, small(stall));
        let writer = tokio::spawn(writer);
        let started = tokio::time::Instant::now();
        assert!(matches!(tx.push(raw(2000)), Push::Sent));
        let mut got = 0;
        let mut chunk = [0u8; 64];
        while got < 2000 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            got += peer.read(&mut chunk).await.expect("read");
        }
        assert!(started.elapsed() > 5 * stall, "{:?}", started.elapsed());
        assert!(!tx.is_closed(), "{:?}", tx.close_reason());
        drop(tx);
        writer.await.expect("join").expect("written in full");
    }

    #[tokio::test]
    async fn frames_survive_the_writer_and_reader() {
        let (a, b) = tokio::io::duplex(1024);
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(write_loop(a, rx));
        let big = Bytes::from(vec![7u8; 100_000]);
        for (i, body) in [Bytes::from_static(b"small"), big.clone()]
            .into_iter()
            .enumerate()
        {
            let mut h = Header::control(Kind::Request);
            h.call_id = i as u64;
            tx.send(Outgoing {
                head: h.encode(body.len()),
                body: body.into(),
            })
            .await
            .expect("writer alive");
        }
        drop(tx);
        let mut reader = FrameReader::new(b, 1 << 20);
        let first = reader.next().await.expect("read").expect("frame");
        assert_eq!(&first.payload()[..], b"small");
        let second = reader.next().await.expect("read").expect("frame");
        assert_eq!((second.call_id(), second.payload()), (1, big));
        assert!(reader.next().await.expect("clean end").is_none());
        writer.await.expect("join").expect("io");
    }

    #[tokio::test]
    async fn the_next_buffered_frame_tells_where_it_goes() {
        let frame = |dst: &str| {
            let h = Header {
                dst,
                ..Header::control(Kind::Request)
            };
            h.encode(0)
        };
        let (mut a, b) = tokio::io::duplex(1024);
        let mut both = frame("one").to_vec();
        both.extend_from_slice(&frame("two"));
        a.write_all(&both).await.unwrap();
        let mut reader = FrameReader::new(b, 1 << 20);
        assert_eq!(reader.next_frame_dst(), None, "nothing read yet");
        let first = reader.next().await.unwrap().unwrap();
        assert_eq!(first.dst(), "one");
        assert_eq!(reader.next_frame_dst(), Some(&b"two"[..]));
        let second = reader.next().await.unwrap().unwrap();
        assert_eq!(second.dst(), "two");
        assert_eq!(reader.next_frame_dst(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_left_to_the_writer_on_an_idle_connection_still_go_out() {
        // `push_with(.., true)` never writes itself: the writer task must be woken for it,
        // even when nothing else is sent afterwards.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, frames(8));
        let writer = tokio::spawn(writer);
        for id in 1..=3u64 {
            let mut h = Header::control(Kind::Request);
            h.call_id = id;
            assert!(matches!(
                tx.push_with(Outgoing::new(&h, Bytes::from_static(b"x")), true),
                Push::Sent
            ));
        }
        let mut reader = FrameReader::new(b, 1 << 20);
        for id in 1..=3u64 {
            let f = tokio::time::timeout(Duration::from_secs(10), reader.next())
                .await
                .expect("the frame within 10 s")
                .expect("read")
                .expect("a frame");
            assert_eq!(f.call_id(), id);
        }
        drop(tx);
        writer.await.expect("join").expect("io");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_sender_keeps_order_through_direct_and_queued_writes() {
        // A pipe smaller than one frame: direct writes stop part-way and the writer task
        // finishes them, while other tasks keep sending.
        let (a, b) = tokio::io::duplex(512);
        let (tx, writer) = frame_channel(a, frames(8));
        let writer = tokio::spawn(writer);
        let reading = tokio::spawn(async move {
            let mut reader = FrameReader::new(b, 1 << 20);
            let mut ids = Vec::new();
            while let Some(f) = reader.next().await.expect("read") {
                assert_eq!(f.payload().len(), (f.call_id() % 7) as usize * 300);
                ids.push(f.call_id());
            }
            ids
        });
        let mut tasks = Vec::new();
        for sender in 0..4u64 {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u64 {
                    let id = sender * 1000 + i;
                    let mut h = Header::control(Kind::Request);
                    h.call_id = id;
                    let body = Bytes::from(vec![1u8; (id % 7) as usize * 300]);
                    tx.send(Outgoing {
                        head: h.encode(body.len()),
                        body: body.into(),
                    })
                    .await
                    .expect("connection open");
                }
            }));
        }
        for t in tasks {
            t.await.expect("sender");
        }
        drop(tx);
        writer.await.expect("join").expect("io");
        let ids = reading.await.expect("reader");
        assert_eq!(ids.len(), 800);
        for sender in 0..4u64 {
            let mine: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| id / 1000 == sender)
                .collect();
            let sorted: Vec<u64> = (0..200).map(|i| sender * 1000 + i).collect();
            assert_eq!(mine, sorted, "frames of one sender arrive in order");
        }
    }

    #[tokio::test]
    async fn a_frame_sender_from_a_blocking_thread_and_after_the_peer_left() {
        let (a, b) = tokio::io::duplex(64);
        let (tx, writer) = frame_channel(a, frames(2));
        let writer = tokio::spawn(writer);
        let blocking = tx.clone();
        let runtime = tokio::runtime::Handle::current();
        let sent = tokio::task::spawn_blocking(move || {
            (0..50u64)
                .map(|i| {
                    let mut h = Header::control(Kind::Reply);
                    h.call_id = i;
                    runtime.block_on(blocking.send(Outgoing {
                        head: h.encode(0),
                        body: Payload::default(),
                    }))
                })
                .filter(Result::is_ok)
                .count()
        });
        let mut reader = FrameReader::new(b, 1 << 20);
        for i in 0..50u64 {
            let f = reader.next().await.expect("read").expect("frame");
            assert_eq!(f.call_id(), i);
        }
        assert_eq!(sent.await.expect("join"), 50);
        drop(reader);
        // The peer is gone: a frame sent now is written at once or queued; either way the
        // write fails, the writer ends, and every later frame fails by name.
        let _ = tx.send(goodbye()).await;
        let _ = writer.await.expect("join");
        assert!(tx.is_closed());
        assert_eq!(tx.send(goodbye()).await, Err(Closed));
        assert_eq!(tx.try_send(goodbye()), Err(Closed));
    }

    #[tokio::test]
    async fn a_large_frame_buffer_is_reused_once_its_frame_is_dropped() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, frames(8));
        let writer = tokio::spawn(writer);
        let sending = tokio::spawn(async move {
            for i in 0..3u8 {
                let body = Bytes::from(vec![i; 3 * LARGE_FRAME]);
                let frame = Outgoing::new(&Header::control(Kind::Request), body);
                tx.send(frame).await.expect("connection open");
            }
        });
        let mut reader =
            FrameReader::new(b, 4 * LARGE_FRAME).keep_large_buffers(Duration::from_secs(60));
        let first = reader.next().await.expect("read").expect("frame");
        let first_at = first.payload().as_ptr();
        // Still held: the second frame gets a buffer of its own.
        let second = reader.next().await.expect("read").expect("frame");
        assert_ne!(second.payload().as_ptr(), first_at);
        assert!(second.payload().iter().all(|&b| b == 1));
        let second_at = second.payload().as_ptr();
        drop(first);
        drop(second);
        // Nothing holds the second frame's buffer now: the third reuses it.
        let third = reader.next().await.expect("read").expect("frame");
        assert_eq!(third.payload().as_ptr(), second_at);
        assert!(third.payload().iter().all(|&b| b == 2));
        assert_eq!(third.payload().len(), 3 * LARGE_FRAME);
        sending.await.expect("sender");
        writer.await.expect("join").expect("io");
        assert!(reader.spare.is_some());
    }

    #[tokio::test]
    async fn joined_frames_arrive_as_separate_frames_in_order() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (tx, writer) = frame_channel(a, frames(8));
        let writer = tokio::spawn(writer);
        let frames = (0..5u64)
            .map(|i| {
                let mut h = Header::control(Kind::Request);
                h.call_id = i;
                let body = Payload::from_parts([
                    Bytes::from(vec![i as u8; 10]),
                    Bytes::from(vec![i as u8; 20_000]),
                ]);
                Outgoing::new(&h, body)
            })
            .collect();
        tx.send(Outgoing::joined(frames)).await.expect("sent");
        drop(tx);
        let mut reader = FrameReader::new(b, 1 << 20);
        for i in 0..5u64 {
            let f = reader.next().await.expect("read").expect("frame");
            assert_eq!(f.call_id(), i);
            assert_eq!(f.payload().len(), 20_010);
            assert!(f.payload().iter().all(|&b| b == i as u8));
        }
        assert!(reader.next().await.expect("clean end").is_none());
        writer.await.expect("join").expect("io");
    }

    #[tokio::test]
    async fn oversized_prefix_is_refused_before_reading_the_body() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
        let mut reader = FrameReader::new(b, 1024);
        assert!(matches!(
            reader.next().await,
            Err(ReadError::Frame(FrameError::TooLarge { limit: 1024, .. }))
        ));
    }
}
