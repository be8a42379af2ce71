//! The sending half: a frame goes to the socket at once on an idle connection, or to
//! the queue of the writer task.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;

use super::{CloseReason, Closed, Held, Shared, Socket, State, FRAME_COST};
use crate::outgoing::Outgoing;

/// A sender writes its frame itself only if no write began on the connection for this
/// long (or, the writer task's, ended): a connection that is busy batches instead (one
/// system call per frame would cost more than it saves).
pub(super) const QUIET_BEFORE_DIRECT_WRITE: Duration = Duration::from_micros(30);
/// Sends frames on one connection: writes them itself when the connection is idle,
/// queues them for the connection's writer task otherwise. Frames leave in the order
/// they were sent. Cheap to clone; the writer task ends (after writing what is queued)
/// when every clone is dropped.
///
/// What is held for the peer is bounded by [`QueueLimits`](super::QueueLimits): the bytes of the frames
/// accepted but not yet written (counted until the socket took them), and a
/// [`FRAME_COST`] per frame. A peer that reads nothing
/// for the stall timeout is closed, as is one that would make a frame which cannot be
/// refused pass the hard limit ([`FrameSender::close_as_slow_consumer`]).
pub struct FrameSender {
    pub(super) shared: Arc<Shared>,
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
        self.push_within(frame, false, false)
    }

    /// Like [`push`](Self::push), for a thread that has more frames for this connection
    /// at hand and will flush them itself ([`HeldFrames::flush`], on what
    /// [`held_frames`](Self::held_frames) returns) before it waits: the frame is queued,
    /// never written at once, and the writer task leaves the queue to that flush for up
    /// to [`HOLD_AT_MOST`](super::HOLD_AT_MOST) (woken once, for that bound, by the
    /// first frame held). A frame pushed any other way ends the hold: everything queued
    /// then goes together.
    pub fn push_held(&self, frame: Outgoing) -> Push {
        self.push_within(frame, false, true)
    }

    /// The frames this thread holds on this connection, to flush before it waits. It
    /// does not keep the connection open (unlike a clone of the sender).
    pub fn held_frames(&self) -> HeldFrames {
        HeldFrames {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// Like [`push`](Self::push), for a frame the peer cannot refuse (a reply, a
    /// membership event): it passes the byte limit, up to the hard limit. `Full` means
    /// past the hard limit: the caller closes the connection
    /// ([`close_as_slow_consumer`](Self::close_as_slow_consumer)).
    pub fn push_unrefused(&self, frame: Outgoing) -> Push {
        self.push_within(frame, true, false)
    }

    /// Says that more frames for this connection are at hand (the controller forwarding
    /// the frames of one read, a node's replies to queued callbacks): while the
    /// [`Cork`] is held, no sender writes itself, even on an idle connection; the
    /// writer task sends what is queued together, in one write.
    pub fn cork(&self) -> Cork {
        self.shared.corks.fetch_add(1, Ordering::Relaxed);
        Cork {
            shared: self.shared.clone(),
        }
    }

    /// Opens a [`Batch`]: the frames queued until it is dropped leave together, written
    /// by whoever drops the last one.
    pub fn batch(&self) -> Batch {
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        Batch {
            shared: self.shared.clone(),
        }
    }

    /// Lets `join` change the last frame still queued (one nobody has started to write:
    /// whole, [`Outgoing::is_one_frame`]), under the queue's lock, so that what it adds
    /// leaves with that frame: a sender merges its message into a frame that waits
    /// anyway, rather than queueing a frame of its own. `join` says whether it changed
    /// the frame (it must leave it a valid frame either way); what it added counts
    /// against the queue's limits like a frame's bytes. `false` (nothing called) when
    /// the queue is empty, its last frame is partly written, the connection is closed,
    /// or `most_added` more bytes would pass the byte limit. Nothing waits: a frame
    /// that no longer waits is never held back for company.
    ///
    /// What joins a frame held for its thread's flush ([`push_held`](Self::push_held))
    /// ends the hold: it may not wait. A holding thread joins with
    /// [`join_last_held`](Self::join_last_held).
    pub fn join_last(&self, most_added: usize, join: impl FnOnce(&mut Outgoing) -> bool) -> bool {
        self.join_within(most_added, false, join)
    }

    /// Like [`join_last`](Self::join_last), for a thread that holds its frames
    /// ([`push_held`](Self::push_held)): a hold goes on.
    pub fn join_last_held(
        &self,
        most_added: usize,
        join: impl FnOnce(&mut Outgoing) -> bool,
    ) -> bool {
        self.join_within(most_added, true, join)
    }

    fn join_within(
        &self,
        most_added: usize,
        held: bool,
        join: impl FnOnce(&mut Outgoing) -> bool,
    ) -> bool {
        let mut st = self.shared.lock();
        if self.shared.closed.load(Ordering::Relaxed)
            || (st.partial_front && st.queue.len() == 1)
            || self
                .shared
                .limits
                .exceeded(st.unwritten + most_added, false)
        {
            return false;
        }
        let Some(last) = st.queue.back_mut() else {
            return false;
        };
        // A frame that grows is whole: it grew by joins, in the queue.
        if !last.is_growing() && !last.is_one_frame() {
            return false;
        }
        let before = last.len();
        if !join(last) {
            return false;
        }
        let after = last.len();
        st.unwritten = (st.unwritten + after).saturating_sub(before);
        // The writer task may be leaving the queue to a flush: no longer.
        let wake_writer = !held && st.held_since.take().is_some() && st.socket.is_some();
        drop(st);
        if wake_writer {
            self.shared.work.notify_one();
        }
        true
    }

    /// Queues all of `frames`, in order, or none of them: all when the queue has room
    /// for them together (or holds nothing), else they are given back (`Full`, the
    /// frames joined in one [`Outgoing`]). For the pieces of a batch split to fit its
    /// node, which must go all or not at all. Left to the writer task (no direct write).
    pub fn push_all(&self, frames: Vec<Outgoing>) -> Push {
        let mut st = self.shared.lock();
        if self.shared.closed.load(Ordering::Relaxed) {
            return Push::Closed;
        }
        let cost: usize = frames.iter().map(|f| f.len() + FRAME_COST).sum();
        if st.unwritten > 0 && self.shared.limits.exceeded(st.unwritten + cost, false) {
            return Push::Full(Outgoing::joined(frames));
        }
        st.unwritten += cost;
        st.queue.extend(frames);
        // They may not wait: a hold ends (see `push_held`).
        st.held_since = None;
        let wake_writer = st.socket.is_some() && self.shared.batches.load(Ordering::Relaxed) == 0;
        drop(st);
        if wake_writer {
            self.shared.work.notify_one();
        }
        Push::Sent
    }

    fn push_within(&self, frame: Outgoing, hard: bool, held: bool) -> Push {
        let mut st = self.shared.lock();
        if self.shared.closed.load(Ordering::Relaxed) {
            return Push::Closed;
        }
        // The clock is read last, and once: a busy connection is decided without it.
        // An idle socket with an empty queue means nothing is held: the writer task
        // gives the socket back only once it wrote everything it took.
        let batching = self.shared.batches.load(Ordering::Relaxed) > 0;
        let began = (!held
            && !batching
            && self.shared.corks.load(Ordering::Relaxed) == 0
            && st.queue.is_empty()
            && st.socket.is_some())
        .then(Instant::now)
        .filter(|now| {
            st.last_write
                .map_or(true, |t| now.duration_since(t) >= QUIET_BEFORE_DIRECT_WRITE)
        });
        if let Some(began) = began {
            if let Some(mut socket) = st.socket.take() {
                drop(st);
                let written = write_now(&mut socket, frame);
                if !give_back(&self.shared, socket, written, 0, began) {
                    return Push::Closed;
                }
                return Push::Sent;
            }
        }
        let cost = frame.len() + FRAME_COST;
        // One frame always passes when nothing is held, whatever its size.
        if st.unwritten > 0 && self.shared.limits.exceeded(st.unwritten + cost, hard) {
            return Push::Full(frame);
        }
        // Frames already waiting for the writer task (not held) are not held back for
        // this one: it goes with them, as if it were not held.
        let held = held && (st.held_since.is_some() || st.queue.is_empty());
        st.unwritten += cost;
        st.queue.push_back(frame);
        // A held frame wakes the writer task only to start the hold's clock; any other
        // frame ends the hold.
        let first_held = held && st.held_since.is_none();
        if first_held {
            st.held_since = Some(Instant::now());
        } else if !held {
            st.held_since = None;
        }
        // Whoever holds the socket now looks at the queue when it gives the socket back;
        // the last `Batch` dropped writes it (or wakes the writer task then).
        let wake_writer =
            st.socket.is_some() && !batching && (!held || (first_held && !st.hold_watched));
        // Woken outside the lock: a wake-up can hand this thread's processor to the
        // woken one, and a sender preempted while holding the lock blocks every other.
        drop(st);
        if wake_writer {
            self.shared.work.notify_one();
        }
        Push::Sent
    }
}

/// A run of frames for a connection that one task queues now, without waiting in
/// between (the controller forwarding the frames of one read to one node): until the
/// last `Batch` is dropped, frames queued wake nobody. The one who drops it writes them
/// itself, in one write call, if the connection is idle and they are small (up to
/// [`DIRECT_BATCH`] bytes together); otherwise it wakes the writer task for them. So a
/// burst of forwarded frames costs one write and no task wake-up.
///
/// Hold it only while queueing, never across an `.await`: frames queued meanwhile wait
/// for it.
pub struct Batch {
    shared: Arc<Shared>,
}

/// The most bytes a dropped [`Batch`] writes itself; more go to the writer task.
pub const DIRECT_BATCH: usize = 64 * 1024;

impl Drop for Batch {
    fn drop(&mut self) {
        let shared = &self.shared;
        let st = shared.lock();
        // Counted down under the lock: a sender that saw a batch open (under the lock)
        // queued its frame before the look at the queue below.
        if shared.batches.fetch_sub(1, Ordering::Relaxed) != 1
            || st.queue.is_empty()
            || shared.closed.load(Ordering::Relaxed)
        {
            return;
        }
        write_queue_here(shared, st);
    }
}

/// Writes what is queued from this thread, in one write call, if the connection is idle
/// and it is small (up to [`DIRECT_BATCH`] bytes); otherwise leaves it to the writer
/// task (woken if it is not writing: it looks at the queue when it is done).
fn write_queue_here(shared: &Shared, mut st: std::sync::MutexGuard<'_, State>) {
    st.held_since = None;
    let bytes: usize = st.queue.iter().map(Outgoing::len).sum();
    let socket = match st.socket.take() {
        Some(socket) if bytes <= DIRECT_BATCH => socket,
        other => {
            // The writer task has the socket (and looks at the queue when it gives
            // it back), or there is too much to copy: it writes them.
            if other.is_some() {
                st.socket = other;
                drop(st);
                shared.work.notify_one();
            }
            return;
        }
    };
    let frames = st.queue.len();
    let mut out = Vec::with_capacity(bytes);
    for frame in st.queue.drain(..) {
        frame.copy_to(&mut out);
    }
    st.partial_front = false;
    drop(st);
    let mut socket = socket;
    let began = Instant::now();
    let written = write_now(&mut socket, Outgoing::raw(Bytes::from(out)));
    if !give_back(shared, socket, written, bytes + frames * FRAME_COST, began) {
        return;
    }
    shared.room.notify_waiters();
}

/// The frames one thread queued with [`FrameSender::push_held`] on a connection: the
/// thread flushes them before it waits. Holding it does not keep the connection open.
pub struct HeldFrames {
    /// Weak: a thread that never waits again must not keep the connection's socket
    /// (owned by `Shared`) open once everyone else let go of it.
    shared: Weak<Shared>,
}

impl HeldFrames {
    /// Whether these are `sender`'s connection's.
    pub fn are_for(&self, sender: &FrameSender) -> bool {
        std::ptr::eq(self.shared.as_ptr(), Arc::as_ptr(&sender.shared))
    }

    /// Sends what is held: written from this thread when the connection is idle (one
    /// write call), else left to the writer task. Nothing if the hold already ended
    /// (another frame, or the writer task after
    /// [`HOLD_AT_MOST`](super::HOLD_AT_MOST), sent them).
    pub fn flush(self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let shared = &*shared;
        let st = shared.lock();
        if st.held_since.is_none()
            || st.queue.is_empty()
            || shared.closed.load(Ordering::Relaxed)
            || shared.batches.load(Ordering::Relaxed) > 0
        {
            return;
        }
        write_queue_here(shared, st);
    }
}

impl std::fmt::Debug for HeldFrames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldFrames").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

/// More frames for a connection are at hand: until it is dropped, its frames are left to
/// the writer task, to leave together ([`FrameSender::cork`]). Frames queued meanwhile
/// are already the writer's to send: dropping it wakes nobody.
pub struct Cork {
    shared: Arc<Shared>,
}

impl Drop for Cork {
    fn drop(&mut self) {
        self.shared.corks.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Cork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cork").finish_non_exhaustive()
    }
}

struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// A waker that does nothing: a write attempted outside the writer task never waits.
pub(super) fn noop_waker() -> &'static Waker {
    static WAKER: OnceLock<Waker> = OnceLock::new();
    WAKER.get_or_init(|| Waker::from(Arc::new(NoopWake)))
}

/// Most buffers one vectored write passes: the head and the first parts of the payload.
const MAX_SLICES: usize = 8;

/// Writes `frame` now, as far as the socket takes it without waiting. Returns what is
/// left (for the writer task), or `None` when all of it went out.
/// Gives the socket back after a sender wrote on it itself (`written`: what
/// [`write_now`] returned, from a write that `began` then), and counts off `counted`
/// bytes the queue held for what was written. A frame cut short goes to the front of
/// the queue, for the writer task; `false` if the write failed (the connection is then
/// closed). The writer task is woken after the lock is let go: a wake-up can hand this
/// thread's processor to the woken one, and a sender preempted while holding the lock
/// blocks every other.
///
/// The write counts from when it began. A write that does not wait takes a few
/// microseconds, unless the peer it wakes takes the sender's processor in it: then the
/// sender gets it back only once the peer answered, and a write stamped at its end
/// would make the sender's next frame (a lone caller's next request) look like one of a
/// busy connection's, sent through the writer task.
fn give_back(
    shared: &Shared,
    socket: Socket,
    written: std::io::Result<Option<Outgoing>>,
    counted: usize,
    began: Instant,
) -> bool {
    let mut st = shared.lock();
    st.socket = Some(socket);
    st.last_write = Some(began);
    st.unwritten = st.unwritten.saturating_sub(counted);
    let wake_writer = match written {
        Ok(None) => !st.queue.is_empty(),
        Ok(Some(rest)) => {
            // The socket is full: the writer task finishes the frame first.
            st.unwritten += rest.len() + FRAME_COST;
            st.queue.push_front(rest);
            st.partial_front = true;
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "a write failed; closing the connection");
            shared.close(&mut st, CloseReason::WriteFailed(e.to_string()));
            return false;
        }
    };
    drop(st);
    if wake_writer {
        shared.work.notify_one();
    }
    true
}

fn write_now(socket: &mut Socket, frame: Outgoing) -> std::io::Result<Option<Outgoing>> {
    let mut cx = Context::from_waker(noop_waker());
    // Only a queued frame grows; made whole in case one ever comes this way.
    let mut frame = frame;
    frame.seal();
    let Outgoing {
        mut head, mut body, ..
    } = frame;
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
            Poll::Pending => return Ok(Some(Outgoing::from_parts(head, body))),
        }
    }
    // A no-op on plain sockets; a stream that buffers gets flushed by the writer task.
    match Pin::new(&mut *socket).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok(None),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(Some(Outgoing::default())),
    }
}
