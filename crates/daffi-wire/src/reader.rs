//! Reading frames off a byte stream: the size limit is enforced before anything is
//! allocated, and a large frame is read into a buffer of its own, kept for the next.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::frame::{Frame, FrameError, LEN_PREFIX};
use crate::memory::huge_page_buffer;

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
    /// The last large frame's whole buffer, kept for reuse (shared with that frame, whose
    /// taker may end the hold: [`KeptBuffer`]).
    spare: Arc<Mutex<Option<Bytes>>>,
    /// Until when the spare buffer is kept.
    spare_until: Option<tokio::time::Instant>,
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
            spare: Arc::default(),
            spare_until: None,
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
            let read = match self.spare_until {
                None => self.inner.read_buf(&mut self.buf).await?,
                Some(until) => {
                    let read = self.inner.read_buf(&mut self.buf);
                    match tokio::time::timeout_at(until, read).await {
                        Ok(read) => read?,
                        Err(_) => {
                            self.take_spare();
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
    /// it any more and it is big enough, a new one otherwise. Only address space until
    /// the peer sends the bytes: a peer that announces a large frame and sends little
    /// makes the process touch little.
    ///
    /// A new buffer in a burst of large frames (the last one read less than the keep
    /// time ago, its buffer still held or taken over) may be backed with huge pages:
    /// the memory the kernel hands out then is what was freed a moment ago, and huge
    /// pages fault it in at a fraction of the cost. Not after a pause: a VM that hands
    /// free memory back to its host (free page reporting) must fetch a huge page's
    /// 2 MiB back first, which costs more than ordinary pages (see BENCHMARKS.md).
    fn large_buffer(&mut self, total: usize) -> BytesMut {
        let in_burst = self.spare_until.is_some();
        if let Some(spare) = self.take_spare() {
            if let Ok(mut buf) = spare.try_into_mut() {
                if buf.capacity() >= total {
                    buf.clear();
                    return buf;
                }
            }
        }
        if !in_burst {
            return BytesMut::with_capacity(total);
        }
        // The conversions take the `Vec` over, without a copy.
        BytesMut::from(Bytes::from(huge_page_buffer(total)))
    }

    /// The large frame just read; its buffer is kept for the next one.
    fn finish_large(&mut self, frame: BytesMut) -> Result<Frame, ReadError> {
        let raw = frame.freeze();
        let Some(keep_for) = self.keep_large else {
            return Ok(Frame::parse(raw)?);
        };
        let kept = KeptBuffer {
            spare: Arc::downgrade(&self.spare),
            at: raw.as_ptr() as usize,
        };
        *lock(&self.spare) = Some(raw.clone());
        self.spare_until = Some(tokio::time::Instant::now() + keep_for);
        Ok(Frame::parse(raw)?.kept_by_reader(kept))
    }

    /// The spare buffer, no longer kept.
    fn take_spare(&mut self) -> Option<Bytes> {
        self.spare_until = None;
        lock(&self.spare).take()
    }
}

/// A reader's hold on the buffer of a large frame it read, kept to read the next large
/// frame into once nothing else holds it. Whoever takes the frame's payload over for
/// good (a result decoded into a `Vec<u8>`) ends the hold first
/// ([`release`](Self::release)): the payload is then the buffer's only holder, and is
/// taken over without a copy. A payload that is only read keeps the reuse.
#[derive(Debug, Clone)]
pub struct KeptBuffer {
    spare: Weak<Mutex<Option<Bytes>>>,
    /// Where the buffer starts: the reader may have moved on to another one.
    at: usize,
}

impl KeptBuffer {
    /// Ends the reader's hold on the buffer, if it still has it; the reader reads its
    /// next large frame into a new buffer.
    pub fn release(&self) {
        let Some(spare) = self.spare.upgrade() else {
            return;
        };
        let mut spare = lock(&spare);
        if spare
            .as_ref()
            .is_some_and(|b| b.as_ptr() as usize == self.at)
        {
            *spare = None;
        }
    }
}

/// Locks the spare buffer's slot; a panic elsewhere cannot leave it inconsistent.
fn lock(slot: &Mutex<Option<Bytes>>) -> std::sync::MutexGuard<'_, Option<Bytes>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<R> FrameReader<R> {
    /// Whether a large frame's buffer is kept for reuse.
    #[cfg(test)]
    fn keeps_spare(&self) -> bool {
        lock(&self.spare).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{frame_channel, QueueLimits};
    use crate::frame::{Header, Kind};
    use crate::outgoing::Outgoing;
    use tokio::io::AsyncWriteExt;

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

    #[tokio::test]
    async fn a_large_frame_buffer_is_reused_once_its_frame_is_dropped() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, QueueLimits::default());
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
        assert!(reader.keeps_spare());
    }

    #[tokio::test]
    async fn a_released_buffer_is_the_payload_s_alone_and_not_reused() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, QueueLimits::default());
        let writer = tokio::spawn(writer);
        let sending = tokio::spawn(async move {
            for i in 0..2u8 {
                let body = Bytes::from(vec![i; 2 * LARGE_FRAME]);
                let frame = Outgoing::new(&Header::control(Kind::Reply), body);
                tx.send(frame).await.expect("connection open");
            }
        });
        let mut reader =
            FrameReader::new(b, 4 * LARGE_FRAME).keep_large_buffers(Duration::from_secs(60));
        let first = reader.next().await.expect("read").expect("frame");
        let (payload, kept) = first.into_payload();
        let kept = kept.expect("a large frame's buffer is kept");
        let payload = payload.try_into_mut().expect_err("the reader holds it too");
        kept.release();
        let taken = payload.try_into_mut().expect("the payload's alone");
        assert!(!reader.keeps_spare());
        // The next large frame goes into a buffer of its own, the taken one untouched.
        let second = reader.next().await.expect("read").expect("frame");
        assert!(second.payload().iter().all(|&b| b == 1));
        assert!(taken.iter().all(|&b| b == 0));
        sending.await.expect("sender");
        writer.await.expect("join").expect("io");
    }

    /// Frames above glibc's largest mmap threshold (32 MiB): each buffer is a mapping
    /// of its own, whose advice no other test's buffer shares.
    #[cfg(target_os = "linux")]
    const MAPPED_FRAME: usize = 40 * LARGE_FRAME;

    /// An address inside `payload`'s first whole 2 MiB block.
    #[cfg(target_os = "linux")]
    fn inside_a_block(payload: &[u8]) -> usize {
        (payload.as_ptr() as usize).next_multiple_of(2 * LARGE_FRAME)
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn only_a_new_buffer_in_a_burst_of_large_frames_asks_for_huge_pages() {
        if !crate::memory::kernel_has_huge_pages() {
            eprintln!("no transparent huge pages in this kernel: nothing to check");
            return;
        }
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let (tx, writer) = frame_channel(a, QueueLimits::default());
        let writer = tokio::spawn(writer);
        let sending = tokio::spawn(async move {
            for i in 0..2u8 {
                let body = Bytes::from(vec![i; MAPPED_FRAME]);
                let frame = Outgoing::new(&Header::control(Kind::Request), body);
                tx.send(frame).await.expect("connection open");
            }
        });
        let mut reader =
            FrameReader::new(b, 2 * MAPPED_FRAME).keep_large_buffers(Duration::from_secs(60));
        let first = reader.next().await.expect("read").expect("frame");
        assert!(
            !crate::memory::advised(inside_a_block(&first.payload())),
            "the first large frame (no burst yet) gets ordinary pages"
        );
        // The first is still held: the second, right behind it, gets a new buffer.
        let second = reader.next().await.expect("read").expect("frame");
        assert!(
            crate::memory::advised(inside_a_block(&second.payload())),
            "a new buffer in a burst asks for huge pages"
        );
        assert!(second.payload().iter().all(|&b| b == 1));
        assert_eq!(second.payload().len(), MAPPED_FRAME);
        sending.await.expect("sender");
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
