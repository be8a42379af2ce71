//! A connection's life once it is open, the same at both ends of a link: the loop that
//! reads its frames and hands them on, and the end of its writer task.
//!
//! The loop reads frames first (a biased select, no random order drawn per frame), and
//! looks at the stop signal and at the writer between frames too, so that a peer that
//! floods cannot hide either. A closing connection lets what is queued go out, but
//! never waits longer than its deadline on a peer that stopped reading.

use std::future::Future;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

use crate::channel::{CloseReason, FrameSender};
use crate::frame::Frame;
use crate::reader::{FrameReader, ReadError};
use crate::when_woken::WhenWoken;

/// How long a closing connection may take to write what was queued for it: 1 s.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// What a connection does with the frames it reads.
pub trait FrameHandler {
    /// Why a frame ends the connection.
    type Refusal: Send;

    /// Handles one frame without waiting, as nearly every frame is. `next_dst`: the
    /// receiver's name of the next frame, when it is already read (frames for the same
    /// receiver may leave together). A frame that needs to wait is given back
    /// ([`Handled::Wait`]) for [`frame_waiting`](Self::frame_waiting).
    ///
    /// Two methods, not one async one: the loop would move each frame's future into
    /// place, and a future that may wait for anything is large.
    fn frame(&mut self, frame: Frame, next_dst: Option<&[u8]>) -> Handled<Self::Refusal>;

    /// Handles a frame that [`frame`](Self::frame) gave back. `Err` ends the connection.
    /// The default handles nothing: for handlers that never give a frame back.
    fn frame_waiting(
        &mut self,
        frame: Frame,
    ) -> impl Future<Output = Result<(), Self::Refusal>> + Send {
        drop(frame);
        std::future::ready(Ok(()))
    }

    /// Everything read so far is handled, and the loop is about to wait for more: work
    /// gathered from a burst of frames goes on now.
    fn caught_up(&mut self);
}

/// What [`FrameHandler::frame`] did with a frame.
#[derive(Debug)]
pub enum Handled<E> {
    /// Handled.
    Done,
    /// The frame ends the connection, for this reason.
    Refused(E),
    /// Handling it needs to wait: the loop hands it to
    /// [`FrameHandler::frame_waiting`].
    Wait(Frame),
}

/// Why [`read_frames`] returned.
#[derive(Debug)]
pub enum Ended<E> {
    /// The peer closed the connection between frames.
    PeerClosed,
    /// Reading failed, or the peer sent something that is not a frame.
    ReadFailed(ReadError),
    /// The stop signal was given.
    Stopped,
    /// The writer closed the connection, for this reason (`None`: it was closed
    /// without one).
    WriterClosed(Option<CloseReason>),
    /// The handler refused a frame.
    Refused(E),
}

/// Reads frames from `reader` and hands them to `handler`, until the peer closes, a
/// read fails, `stop` turns true, the writer behind `sender` closes the connection, or
/// the handler refuses a frame. A frame read once `stop` is true is not handled.
pub async fn read_frames<R, H>(
    reader: &mut FrameReader<R>,
    sender: &FrameSender,
    stop: &watch::Receiver<bool>,
    handler: &mut H,
) -> Ended<H::Refusal>
where
    R: AsyncRead + Unpin,
    H: FrameHandler,
{
    // One wait for each for the whole connection, not one per frame, each polled only
    // once it was woken: not at every frame.
    let mut stop_signal = stop.clone();
    let mut stopping = WhenWoken::new(async move {
        let _ = stop_signal.wait_for(|stop| *stop).await;
    });
    let mut writer_closed = WhenWoken::new(sender.closed());
    loop {
        if !reader.has_frame() {
            handler.caught_up();
        }
        // Looked at between frames too: a peer that floods while it reads nothing
        // never lets the select below see the close.
        if sender.is_closed() {
            return Ended::WriterClosed(sender.close_reason());
        }
        let next = tokio::select! {
            biased;
            next = reader.next() => next,
            _ = &mut stopping => return Ended::Stopped,
            _ = &mut writer_closed => return Ended::WriterClosed(sender.close_reason()),
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ended::PeerClosed,
            Err(e) => return Ended::ReadFailed(e),
        };
        // The version is one atomic load; the flag is read only once it moved.
        if stop.has_changed().unwrap_or(true) && *stop.borrow() {
            return Ended::Stopped;
        }
        let refused = match handler.frame(frame, reader.next_frame_dst()) {
            Handled::Done => continue,
            Handled::Refused(refusal) => refusal,
            Handled::Wait(frame) => match handler.frame_waiting(frame).await {
                Ok(()) => continue,
                Err(refusal) => refusal,
            },
        };
        return Ended::Refused(refused);
    }
}

/// A connection's writer task, spawned.
#[derive(Debug)]
pub struct WriterTask {
    task: JoinHandle<std::io::Result<()>>,
}

impl WriterTask {
    /// Spawns `writer` (the task [`frame_channel`](crate::frame_channel) returns).
    pub fn spawn<W>(writer: W) -> Self
    where
        W: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        WriterTask {
            task: tokio::spawn(writer),
        }
    }

    /// Drops `sender` (the last one) and lets what is queued go out until `deadline`;
    /// past it, the task is aborted. Returns whether the writer ended by then.
    pub async fn drain(self, sender: FrameSender, deadline: Instant) -> bool {
        drop(sender);
        let abort = self.task.abort_handle();
        let ended = timeout_at(deadline, self.task).await.is_ok();
        if !ended {
            abort.abort();
        }
        ended
    }

    /// Stops the writer at once: what is queued is dropped.
    pub fn abort(self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests;
