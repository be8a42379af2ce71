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
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use super::frame::{Frame, FrameError, Header, Kind, LEN_PREFIX};
use super::payload::Payload;

/// A frame ready to send: the encoded head (length prefix and header) and the payload.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// Length prefix and header, or a whole forwarded frame.
    pub head: Bytes,
    /// Payload; may be empty.
    pub body: Payload,
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

    /// A control frame (no routing fields) with a MessagePack payload.
    pub fn control<T: serde::Serialize>(kind: Kind, payload: &T) -> Self {
        Outgoing::new(&Header::control(kind), super::message::encode(payload))
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
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
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
            crate::protocol::frame::peek_dst(&self.buf)
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

/// The write half of a connection, as the writer keeps it.
type Socket = Box<dyn AsyncWrite + Send + Unpin>;

/// The connection is closed: the frame was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection is closed")]
pub struct Closed;

/// Sends frames on one connection: writes them itself when the connection is idle,
/// queues them for the connection's writer task otherwise. Frames leave in the order
/// they were sent. Cheap to clone; the writer task ends (after writing what is queued)
/// when every clone is dropped.
pub struct FrameSender {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer task: frames are queued, or the last sender is gone.
    work: Notify,
    /// Wakes senders waiting for room in a full queue.
    room: Notify,
    capacity: usize,
    /// Live `FrameSender` clones (an atomic: a clone per forwarded frame is common).
    senders: AtomicUsize,
}

struct State {
    queue: VecDeque<Outgoing>,
    /// The socket, while nobody writes to it.
    socket: Option<Socket>,
    /// A write failed: nothing more can be sent.
    closed: bool,
    /// When a write last ended.
    last_write: Option<Instant>,
}

/// What trying to send found.
pub(crate) enum Push {
    Sent,
    Full(Outgoing),
    Closed,
}

/// A sender for `socket`, with room for `capacity` queued frames, and the writer task to
/// spawn. The task returns when the socket fails, or once every sender is gone and the
/// queue is written (then it shuts the socket down).
pub fn frame_channel<W>(
    socket: W,
    capacity: usize,
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
            socket: Some(Box::new(socket)),
            closed: false,
            last_write: None,
        }),
        work: Notify::new(),
        room: Notify::new(),
        capacity: capacity.max(1),
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

    /// Sends `frame` from synchronous code, blocking the thread while the queue is full.
    /// Not for async code (it would block a runtime thread).
    pub fn blocking_send(&self, frame: Outgoing) -> Result<(), Closed> {
        match self.push(frame) {
            Push::Sent => Ok(()),
            Push::Closed => Err(Closed),
            Push::Full(frame) => crate::blocking::park(self.send(frame)),
        }
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Sends `frame` if the queue has room; gives it back otherwise.
    pub(crate) fn push(&self, frame: Outgoing) -> Push {
        self.push_with(frame, false)
    }

    /// Like [`push`](Self::push); with `more_follow` (the sender has more frames for this
    /// connection at hand: the controller forwarding the frames of one read, a node's
    /// replies to queued callbacks), the writing is left to the writer task even on an
    /// idle connection, so that they leave in one write.
    pub(crate) fn push_with(&self, frame: Outgoing, more_follow: bool) -> Push {
        let mut st = self.shared.lock();
        if st.closed {
            return Push::Closed;
        }
        // The clock is read last: a busy connection is decided without it.
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
                        st.queue.push_front(rest);
                        self.shared.work.notify_one();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "a write failed; closing the connection");
                        st.closed = true;
                        st.queue.clear();
                        self.shared.work.notify_one();
                        self.shared.room.notify_waiters();
                        return Push::Closed;
                    }
                }
                return Push::Sent;
            }
        }
        if st.queue.len() >= self.shared.capacity {
            return Push::Full(frame);
        }
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

/// The writer task: drains the queue in batches while senders queue faster than they
/// could write.
async fn run_writer(shared: Arc<Shared>) -> std::io::Result<()> {
    let mut batch = BytesMut::new();
    let mut frames = Vec::new();
    loop {
        let work = shared.work.notified();
        tokio::pin!(work);
        work.as_mut().enable();
        let taken = {
            let mut st = shared.lock();
            if st.closed {
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
        if finished {
            let _ = socket.shutdown().await;
            return Ok(());
        }
        shared.room.notify_waiters();
        let mut written = Ok(());
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
            if let Err(e) = push(&mut socket, &mut batch, frame).await {
                written = Err(e);
                break;
            }
        }
        if written.is_ok() {
            written = flush_batch(&mut socket, &mut batch).await;
        }
        if written.is_ok() {
            written = socket.flush().await;
        }
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
            Ok(()) => st.socket = Some(socket),
            Err(e) => {
                st.closed = true;
                st.queue.clear();
                drop(st);
                shared.room.notify_waiters();
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (tx, writer) = frame_channel(a, 8);
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
        let (tx, writer) = frame_channel(a, 8);
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
        let (tx, writer) = frame_channel(a, 2);
        let writer = tokio::spawn(writer);
        let blocking = tx.clone();
        let sent = tokio::task::spawn_blocking(move || {
            (0..50u64)
                .map(|i| {
                    let mut h = Header::control(Kind::Reply);
                    h.call_id = i;
                    blocking.blocking_send(Outgoing {
                        head: h.encode(0),
                        body: Payload::default(),
                    })
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
        let _ = tx.send(Outgoing::control(Kind::Goodbye, &())).await;
        let _ = writer.await.expect("join");
        assert!(tx.is_closed());
        assert_eq!(
            tx.send(Outgoing::control(Kind::Goodbye, &())).await,
            Err(Closed)
        );
        assert_eq!(
            tx.try_send(Outgoing::control(Kind::Goodbye, &())),
            Err(Closed)
        );
    }

    #[tokio::test]
    async fn a_large_frame_buffer_is_reused_once_its_frame_is_dropped() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, 8);
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
        let (tx, writer) = frame_channel(a, 8);
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
