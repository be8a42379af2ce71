//! The writer task: drains the queue in batches, and closes a connection whose peer
//! reads nothing for the stall timeout.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{CloseReason, Shared, Socket, FRAME_COST, HOLD_AT_MOST};
use crate::batch::{batch_frame, flush_batch, BATCH_LIMIT, COPY_THRESHOLD};
use crate::outgoing::Outgoing;

/// A writer keeps at most this much batch buffer, and this many queue slots, between
/// batches: a controller with 1,000 connections must not keep each one's largest burst
/// (1,000 membership events of ~60 bytes each) allocated.
const KEEP_BATCH_BUFFER: usize = 4 * 1024;
/// See [`KEEP_BATCH_BUFFER`].
const KEEP_QUEUE_SLOTS: usize = 64;

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
pub(super) async fn run_writer(shared: Arc<Shared>) -> std::io::Result<()> {
    let mut batch = BytesMut::new();
    let mut frames = VecDeque::new();
    let mut stall = Stall::new(shared.limits.stall_timeout);
    // The clock of frames held for their thread to flush (made on the first hold).
    let mut hold: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let work = shared.work.notified();
        tokio::pin!(work);
        work.as_mut().enable();
        let mut held_until = None;
        let taken = {
            let mut st = shared.lock();
            if shared.closed.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Some(since) = st.held_since {
                let until = since + HOLD_AT_MOST;
                if Instant::now() < until {
                    held_until = Some(until);
                } else {
                    st.held_since = None;
                }
            }
            // While the clock runs, holds that start meanwhile are timed by it.
            st.hold_watched = held_until.is_some();
            match st.socket.take() {
                // Held frames wait for their thread's flush, or the end of the hold.
                Some(socket) if held_until.is_some() => {
                    st.socket = Some(socket);
                    None
                }
                Some(socket) if !st.queue.is_empty() => {
                    // The queue's buffer is taken whole (nothing moved), and the
                    // senders get the one written last time, emptied: a burst of
                    // frames does not regrow a queue from nothing each time.
                    std::mem::swap(&mut frames, &mut st.queue);
                    st.partial_front = false;
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
            if let Some(until) = held_until {
                let until = tokio::time::Instant::from_std(until);
                let timer = hold.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                timer.as_mut().reset(until);
                tokio::select! {
                    _ = work => {}
                    _ = timer.as_mut() => {}
                }
                continue;
            }
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
        frames.shrink_to(KEEP_QUEUE_SLOTS);
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
    frames: &mut VecDeque<Outgoing>,
) -> std::io::Result<()> {
    // One allocation for the batch's small frames, however many there are.
    let small: usize = frames
        .iter()
        .map(|f| {
            f.slices()
                .map(<[u8]>::len)
                .filter(|&len| len <= COPY_THRESHOLD)
                .sum::<usize>()
        })
        .sum();
    batch.reserve(small.min(BATCH_LIMIT));
    for frame in frames.drain(..) {
        batch_frame(out, batch, frame).await?;
    }
    flush_batch(out, batch).await?;
    out.flush().await
}
