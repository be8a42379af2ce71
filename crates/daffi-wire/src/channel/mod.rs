//! A connection's sending side: the [`FrameSender`] everyone who sends on it clones, and
//! its writer task.
//!
//! When the connection is idle, a sender writes its frame to the socket itself, without
//! waiting for another task to wake up: that is what a lone call's latency needs. When
//! frames come faster, they are queued, and the writer task drains the queue into one
//! buffer and one write call, so that many calls in flight share system calls. Large
//! payloads are written straight from their `Bytes`, never copied into the buffer.
//!
//! A thread that collects the results of many calls already in, and makes a new call
//! for each, can hold its requests ([`FrameSender::push_held`]) and write them together
//! when it next waits ([`HeldFrames::flush`]), as a client that reads every reply at
//! hand before it writes would: one write for a run of calls, and no writer task woken
//! for each. The writer task sends held frames anyway [`HOLD_AT_MOST`] after the first,
//! so a thread that goes off to other work delays them by no more than that.
//!
//! What a connection holds for its peer is bounded ([`QueueLimits`]), and a peer that
//! reads nothing for the stall timeout is closed (the writer's stall rule).

mod sender;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use tokio::sync::Notify;

use crate::outgoing::Outgoing;

pub use sender::{Batch, Cork, FrameSender, HeldFrames, Push, DIRECT_BATCH};
use writer::run_writer;

/// The longest the writer task leaves frames held by [`FrameSender::push_held`] for
/// their thread to flush: past it, it writes them itself (tokio's timer may add up to
/// a millisecond more).
pub const HOLD_AT_MOST: Duration = Duration::from_millis(1);

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
    /// Live [`Cork`]s: while there are any, senders leave writing to the writer task.
    corks: AtomicUsize,
    /// Live [`Batch`]es: while there are any, frames queued wake nobody; the last one
    /// dropped writes them, or wakes the writer task.
    batches: AtomicUsize,
}

struct State {
    queue: VecDeque<Outgoing>,
    /// The queue's first frame is the rest of one partly written: no frame joins it.
    partial_front: bool,
    /// Bytes accepted and not yet written: the queue's, and those of the frames the
    /// writer task took and has not finished writing; each frame counts [`FRAME_COST`]
    /// more.
    unwritten: usize,
    /// The socket, while nobody writes to it.
    socket: Option<Socket>,
    /// When the last write began (a sender's own) or ended (the writer task's).
    last_write: Option<Instant>,
    /// Why the connection closed, once it has.
    close_reason: Option<CloseReason>,
    /// Since when frames queued by [`FrameSender::push_held`] wait for their thread's
    /// [`HeldFrames::flush`]: the writer task leaves the queue alone until
    /// [`HOLD_AT_MOST`] later, or until a frame that may not wait is queued.
    held_since: Option<Instant>,
    /// The writer task's hold clock runs: a new hold need not wake it to start one.
    hold_watched: bool,
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
            partial_front: false,
            unwritten: 0,
            socket: Some(Box::new(socket)),
            last_write: None,
            close_reason: None,
            held_since: None,
            hold_watched: false,
        }),
        work: Notify::new(),
        room: Notify::new(),
        closing: Notify::new(),
        closed: AtomicBool::new(false),
        limits,
        senders: AtomicUsize::new(1),
        corks: AtomicUsize::new(0),
        batches: AtomicUsize::new(0),
    });
    let writer = run_writer(shared.clone());
    (FrameSender { shared }, writer)
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
        st.partial_front = false;
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
