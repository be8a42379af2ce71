//! Reading frames off a byte stream: the size limit is enforced before anything is
//! allocated, and a large or mid-size frame is read into a buffer of its own, kept for
//! the next.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::frame::{Frame, FrameError, LEN_PREFIX};
use crate::memory::{huge_page_buffer, room_suits};

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
/// Frames at least this long (prefix included) that are not whole in the reader's buffer
/// are read into a buffer of their own, which the reader keeps, among a few, for the next
/// frames of that size once every part of the frame has been dropped (with
/// [`FrameReader::keep_large_buffers`]). Below it, frames share the reader's buffer.
const MID_FRAME: usize = 32 * 1024;
/// Bytes of mid-size frame buffers (below `LARGE_FRAME`) one reader keeps at most:
/// enough for the frames a stream has in flight (its window is 2 MiB) with room to
/// spare. Past it, a frame gets fresh memory, given back when the frame is dropped.
const MID_KEPT_BYTES: usize = 4 * 1024 * 1024;
/// Mid-size buffers are allocated in multiples of this, so that frames of slightly
/// different sizes reuse each other's.
const MID_GRAIN: usize = 8 * 1024;

/// How long daffi's connections keep a large frame's buffer, and mid-size ones, for the
/// next frames (see [`FrameReader::keep_large_buffers`]).
pub const KEEP_LARGE_BUFFERS: Duration = Duration::from_secs(1);

/// How much a reader's buffer holds once the connection is up: one read takes up to this
/// much of a burst of frames.
pub const READ_BUFFER: usize = 64 * 1024;

/// How much the buffer of a reader that [grows when busy](FrameReader::grow_when_busy)
/// holds until then: a frame or a few, on a fraction of a memory page. A read touches
/// the first page of the buffer it fills, so a controller with 10,000 idle nodes kept
/// about 37 MiB resident in 64 KiB buffers it never filled (BENCHMARKS.md, "A
/// controller's idle connections").
const QUIET_READ_BUFFER: usize = 512;

/// Reads length-prefixed frames, enforcing the size limit before allocating.
///
/// `next` is cancel-safe: bytes read are kept in the reader until their frame is whole.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_frame_size: usize,
    /// A large or mid-size frame being read into a buffer of its own, and its length
    /// with prefix.
    large: Option<(BytesMut, usize)>,
    /// The buffers kept for reuse (shared with the frames read into them, whose takers
    /// may end the hold: [`KeptBuffer`]).
    spare: Arc<Mutex<Spares>>,
    /// Until when the spare buffers are kept.
    spare_until: Option<tokio::time::Instant>,
    /// Whether a large frame was read since the large spare was last taken or let go:
    /// a burst of large frames (see [`large_buffer`](Self::large_buffer)).
    large_burst: bool,
    /// How long a large frame's buffer is kept; `None`: not kept.
    keep_large: Option<Duration>,
    /// Whether `spare` is among the [`KEEPING_LARGE`] readers.
    listed: bool,
    /// Whether the last frame was read into a buffer of its own: the next read takes at
    /// most [`READ_AFTER_OWN`] bytes, so that if the next frame is one too (a stream of
    /// chunks), little of it is copied there from the shared buffer.
    after_own: bool,
    /// Whether the buffer grows to [`READ_BUFFER`] once a read fills it.
    grow_when_full: bool,
}

/// What one read into the shared buffer takes at most right after a frame read into a
/// buffer of its own: the next frame's header and a little more.
const READ_AFTER_OWN: usize = 4 * 1024;

/// Reads into `buf`, at most `room` bytes if given.
async fn fill<R: AsyncRead + Unpin>(
    inner: &mut R,
    buf: &mut BytesMut,
    room: Option<usize>,
) -> std::io::Result<usize> {
    match room {
        Some(room) => inner.read_buf(&mut buf.limit(room)).await,
        None => inner.read_buf(buf).await,
    }
}

/// The buffers a reader keeps for its next frames.
#[derive(Debug, Default)]
struct Spares {
    /// The last large frame's whole buffer.
    large: Option<Bytes>,
    /// Whole buffers of recent mid-size frames with their capacities, oldest first (the
    /// likeliest to be free again).
    mid: VecDeque<(Bytes, usize)>,
    /// The capacities of `mid`, summed (at most [`MID_KEPT_BYTES`]).
    mid_bytes: usize,
}

impl Spares {
    /// An empty buffer with room for `total` bytes among the mid-size ones that nothing
    /// else holds any more. Free ones too small for it are let go.
    fn free_mid(&mut self, total: usize) -> Option<BytesMut> {
        let mut i = 0;
        while i < self.mid.len() {
            if !self.mid[i].0.is_unique() {
                i += 1;
                continue;
            }
            let Some((spare, capacity)) = self.mid.remove(i) else {
                break;
            };
            self.mid_bytes = self.mid_bytes.saturating_sub(capacity);
            if capacity >= total {
                if let Ok(mut buf) = spare.try_into_mut() {
                    buf.clear();
                    return Some(buf);
                }
            }
        }
        None
    }

    /// Keeps `whole`, a mid-size frame's buffer of `capacity` bytes, if there is room.
    fn keep_mid(&mut self, whole: Bytes, capacity: usize) -> bool {
        if self.mid_bytes + capacity > MID_KEPT_BYTES {
            return false;
        }
        self.mid_bytes += capacity;
        self.mid.push_back((whole, capacity));
        true
    }

    /// Ends the hold on the buffer that starts at `at`, if it is kept.
    fn release(&mut self, at: usize) {
        if self
            .large
            .as_ref()
            .is_some_and(|b| b.as_ptr() as usize == at)
        {
            self.large = None;
        } else if let Some(i) = self.mid.iter().position(|(b, _)| b.as_ptr() as usize == at) {
            if let Some((_, capacity)) = self.mid.remove(i) {
                self.mid_bytes = self.mid_bytes.saturating_sub(capacity);
            }
        }
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader; frames over `max_frame_size` bytes (prefix excluded) are refused.
    pub fn new(inner: R, max_frame_size: usize) -> Self {
        Self::with_buffer(inner, max_frame_size, READ_BUFFER)
    }

    /// Like [`new`](Self::new), with a buffer of `capacity` bytes to begin with: a peer
    /// that has not authenticated gets a small one ([`grow_when_busy`](Self::grow_when_busy)
    /// once it has).
    pub fn with_buffer(inner: R, max_frame_size: usize, capacity: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(capacity),
            max_frame_size,
            large: None,
            spare: Arc::default(),
            spare_until: None,
            large_burst: false,
            keep_large: None,
            listed: false,
            after_own: false,
            grow_when_full: false,
        }
    }

    /// Keeps the buffer of each large frame (1 MiB or more) for up to `keep_for`, and
    /// reads the next large frame into it if nothing else holds it by then: a burst of
    /// large calls then costs no fresh memory mapping (page faults, zeroing by the
    /// kernel) per frame, and a connection that goes quiet gives the memory back.
    ///
    /// Mid-size frames (32 KiB up to 1 MiB) that are not whole in the reader's
    /// buffer get a buffer of their own too, among up to 4 MiB kept for the
    /// same time: a steady stream of them (64 KiB chunks, say) reuses the buffers its
    /// earlier frames were read into once they are dropped, and touches no new pages.
    /// Needs a Tokio runtime with time enabled.
    pub fn keep_large_buffers(mut self, keep_for: Duration) -> Self {
        self.keep_large = Some(keep_for);
        self
    }

    /// Changes the limit (after the handshake told us the controller's).
    pub fn set_max_frame_size(&mut self, limit: usize) {
        self.max_frame_size = limit;
    }

    /// Moves what is buffered into a buffer of a few hundred bytes, which grows to
    /// [`READ_BUFFER`] bytes at the first read that fills it: a peer that sends a burst
    /// of frames once has them read in one call from then on, and one that sends a frame
    /// now and then (most of the nodes of a large mesh) costs its reader little memory.
    /// For a reader made small for the handshake, once the peer is authenticated.
    pub fn grow_when_busy(&mut self) {
        self.move_buffer(QUIET_READ_BUFFER);
        self.grow_when_full = true;
    }

    /// Moves what is buffered into a new buffer of `capacity` bytes (or more, if more is
    /// buffered). A new buffer, not a `reserve`: `BytesMut` sizes the buffers it makes
    /// later after the one it was created with.
    fn move_buffer(&mut self, capacity: usize) {
        let mut moved = BytesMut::with_capacity(capacity.max(self.buf.len()));
        moved.extend_from_slice(&self.buf);
        self.buf = moved;
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
                self.after_own = false;
                let raw = self.buf.split_to(len).freeze();
                return Ok(Some(Frame::parse(raw)?));
            }
            if self.large.is_some() {
                continue;
            }
            if self.grow_when_full {
                // Room for half a quiet buffer at least (most often the one it has, its
                // frames read and dropped): a read that fills it brought a burst, not the
                // last few bytes of a buffer nearly used up.
                self.buf.reserve(QUIET_READ_BUFFER / 2);
            }
            let room = self.after_own.then_some(READ_AFTER_OWN);
            let read = match self.spare_until {
                None => fill(&mut self.inner, &mut self.buf, room).await?,
                Some(until) => {
                    let read = fill(&mut self.inner, &mut self.buf, room);
                    match tokio::time::timeout_at(until, read).await {
                        Ok(read) => read?,
                        Err(_) => {
                            self.let_spares_go();
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
            if self.grow_when_full && self.buf.len() == self.buf.capacity() {
                // The read took all the room there was: more may be waiting.
                self.grow_when_full = false;
                self.move_buffer(READ_BUFFER);
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
        } else if total >= MID_FRAME && self.keep_large.is_some() {
            // A buffer of its own, kept for the next frames of this size: growing the
            // shared one would take fresh memory for each (the last frames read into it
            // are still held, by the writers that forward them, say).
            let mut frame = self.mid_buffer(total);
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
        let in_burst = self.large_burst;
        self.large_burst = false;
        let spare = lock(&self.spare).large.take();
        if let Some(spare) = spare {
            if let Ok(mut buf) = spare.try_into_mut() {
                if buf.capacity() >= total {
                    buf.clear();
                    return buf;
                }
            }
        }
        // The conversions take the `Vec` over, without a copy.
        if let Some(lent) = crate::memory::lent_buffer(total) {
            return BytesMut::from(Bytes::from(lent));
        }
        if !in_burst {
            return BytesMut::with_capacity(total);
        }
        // The conversions take the `Vec` over, without a copy.
        BytesMut::from(Bytes::from(huge_page_buffer(total)))
    }

    /// An empty buffer with room for `total` bytes, for a mid-size frame: a kept one
    /// that nothing else holds any more, or a new one (rounded up to [`MID_GRAIN`], so
    /// that frames of a little more or less reuse it).
    fn mid_buffer(&mut self, total: usize) -> BytesMut {
        if let Some(buf) = lock(&self.spare).free_mid(total) {
            return buf;
        }
        BytesMut::with_capacity(total.next_multiple_of(MID_GRAIN))
    }

    /// The large or mid-size frame just read; its buffer is kept for the next one.
    fn finish_large(&mut self, frame: BytesMut) -> Result<Frame, ReadError> {
        self.after_own = true;
        let capacity = frame.capacity();
        let large = frame.len() >= LARGE_FRAME;
        let raw = frame.freeze();
        let Some(keep_for) = self.keep_large else {
            return Ok(Frame::parse(raw)?);
        };
        let kept = KeptBuffer {
            spare: Arc::downgrade(&self.spare),
            at: raw.as_ptr() as usize,
        };
        {
            let mut spares = lock(&self.spare);
            if large {
                spares.large = Some(raw.clone());
                self.large_burst = true;
            } else if !spares.keep_mid(raw.clone(), capacity) {
                drop(spares);
                return Ok(Frame::parse(raw)?);
            }
        }
        if large && !self.listed {
            self.listed = true;
            list_keeping_large(Arc::downgrade(&self.spare));
        }
        self.spare_until = Some(tokio::time::Instant::now() + keep_for);
        Ok(Frame::parse(raw)?.kept_by_reader(kept))
    }

    /// Lets every kept buffer go (each is freed once its frame's parts are dropped).
    fn let_spares_go(&mut self) {
        self.spare_until = None;
        self.large_burst = false;
        {
            let mut spares = lock(&self.spare);
            spares.large = None;
            spares.mid.clear();
            spares.mid_bytes = 0;
        }
        if std::mem::take(&mut self.listed) {
            unlist_keeping_large(&self.spare);
        }
    }
}

/// A reader's hold on the buffer of a large frame it read, kept to read the next large
/// frame into once nothing else holds it. Whoever takes the frame's payload over for
/// good (a result decoded into a `Vec<u8>`) ends the hold first
/// ([`release`](Self::release)): the payload is then the buffer's only holder, and is
/// taken over without a copy. A payload that is only read keeps the reuse.
#[derive(Debug, Clone)]
pub struct KeptBuffer {
    spare: Weak<Mutex<Spares>>,
    /// Where the buffer starts: the reader may have moved on to another one.
    at: usize,
}

impl KeptBuffer {
    /// Ends the reader's hold on the buffer, if it still has it; the reader reads its
    /// next large frame into a new buffer.
    pub fn release(&self) {
        if let Some(spare) = self.spare.upgrade() {
            lock(&spare).release(self.at);
        }
    }
}

/// The readers of this process that kept a large frame's buffer lately, until they let
/// their buffers go (see [`take_idle_large_buffer`]); gone ones are dropped from the
/// list as it is read.
static KEEPING_LARGE: Mutex<Vec<Weak<Mutex<Spares>>>> = Mutex::new(Vec::new());

/// The list of [`KEEPING_LARGE`] readers, its gone ones dropped.
fn keeping_large() -> std::sync::MutexGuard<'static, Vec<Weak<Mutex<Spares>>>> {
    let mut readers = KEEPING_LARGE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    readers.retain(|r| r.strong_count() > 0);
    readers
}

/// Adds a reader's spares to [`KEEPING_LARGE`], at the first large frame it keeps.
fn list_keeping_large(spare: Weak<Mutex<Spares>>) {
    keeping_large().push(spare);
}

/// Takes a reader's spares off [`KEEPING_LARGE`] once it let them go: the list holds
/// the readers that read a large frame lately, however many connections the process
/// has had.
fn unlist_keeping_large(spare: &Arc<Mutex<Spares>>) {
    keeping_large().retain(|r| !std::ptr::eq(r.as_ptr(), Arc::as_ptr(spare)));
}

/// An empty buffer with room for `len` bytes (and at most twice that, so that a small
/// string does not hold a huge buffer) that a reader of this process keeps for its next
/// large frame and nothing else holds any more (the frame read into it was dropped):
/// memory already mapped, for a large byte string that must be copied (a borrowed
/// argument being encoded). The reader reads its next large frame into a buffer lent to
/// it ([`lend_large_buffers`](crate::lend_large_buffers)), such as the one this buffer
/// goes back to once sent, or a new one.
pub fn take_idle_large_buffer(len: usize) -> Option<Vec<u8>> {
    if len < LARGE_FRAME {
        return None;
    }
    keeping_large().iter().find_map(|reader| {
        let spare = reader.upgrade()?;
        let mut spares = lock(&spare);
        // The room decides, not the last frame's length (a reader reads smaller frames
        // into its buffer too); a frame over twice the string rules its buffer out.
        let large = spares.large.take_if(|b| b.len() <= len.saturating_mul(2))?;
        match large.try_into_mut() {
            Ok(mut buf) if room_suits(buf.capacity(), len) => {
                buf.clear();
                Some(Vec::from(buf))
            }
            Ok(other) => {
                spares.large = Some(other.freeze());
                None
            }
            Err(held) => {
                spares.large = Some(held);
                None
            }
        }
    })
}

/// Locks the spare buffers; a panic elsewhere cannot leave them inconsistent.
fn lock(slot: &Mutex<Spares>) -> std::sync::MutexGuard<'_, Spares> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<R> FrameReader<R> {
    /// Whether a large frame's buffer is kept for reuse.
    #[cfg(test)]
    fn keeps_spare(&self) -> bool {
        lock(&self.spare).large.is_some()
    }

    /// Whether this reader is among the [`KEEPING_LARGE`] ones.
    #[cfg(test)]
    fn listed(&self) -> bool {
        keeping_large()
            .iter()
            .any(|r| std::ptr::eq(r.as_ptr(), Arc::as_ptr(&self.spare)))
    }

    /// The mid-size buffers kept: how many, and their bytes.
    #[cfg(test)]
    fn mid_kept(&self) -> (usize, usize) {
        let spares = lock(&self.spare);
        (spares.mid.len(), spares.mid_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{frame_channel, QueueLimits};
    use crate::frame::{Header, Kind};
    use crate::outgoing::Outgoing;
    use tokio::io::AsyncWriteExt;

    /// An empty request to `dst`, encoded.
    fn frame(dst: &str) -> Bytes {
        let h = Header {
            dst,
            ..Header::control(Kind::Request)
        };
        h.encode(0)
    }

    #[tokio::test]
    async fn the_next_buffered_frame_tells_where_it_goes() {
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
    async fn a_reader_that_grows_when_busy_stays_small_for_one_frame_at_a_time() {
        let (mut a, b) = tokio::io::duplex(256 * 1024);
        let mut reader = FrameReader::with_buffer(b, 1 << 20, 64);
        reader.grow_when_busy();
        for i in 0..100 {
            let dst = format!("node-{i}");
            a.write_all(&frame(&dst)).await.unwrap();
            let read = reader.next().await.unwrap().unwrap();
            assert_eq!(read.dst(), dst);
            assert!(
                reader.buf.capacity() <= QUIET_READ_BUFFER,
                "a frame at a time: {} bytes, not {}",
                reader.buf.capacity(),
                QUIET_READ_BUFFER
            );
        }
        // A burst larger than the buffer: the read that fills it makes it grow, and
        // every frame of the burst comes out whole, in order.
        let mut burst = Vec::new();
        for i in 0..1000 {
            burst.extend_from_slice(&frame(&format!("burst-{i}")));
        }
        a.write_all(&burst).await.unwrap();
        for i in 0..1000 {
            let read = reader.next().await.unwrap().unwrap();
            assert_eq!(read.dst(), format!("burst-{i}"));
        }
        // (What is left of it: the frames read took their part.)
        assert!(
            reader.buf.capacity() > 8 * QUIET_READ_BUFFER,
            "grown for bursts: {} bytes",
            reader.buf.capacity()
        );
    }

    /// The body of the frame [`a_lent_buffer_takes_a_new_large_frame`] reads: a size no
    /// other test uses, so the lender (set for the whole test process) lends only to it.
    const LENT_BODY: usize = 3 * LARGE_FRAME + 4321;

    /// Where the buffer lent for [`LENT_BODY`] starts.
    static LENT_AT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[tokio::test]
    async fn a_lent_buffer_takes_a_new_large_frame() {
        fn lender(capacity: usize) -> Option<Vec<u8>> {
            let header = Header::control(Kind::Request);
            if capacity != header.frame_len(LENT_BODY) {
                return None;
            }
            let mut buffer = Vec::with_capacity(capacity + 100);
            buffer.extend_from_slice(&[9; 50]); // what it held before: cleared for use
            buffer.clear();
            LENT_AT.store(
                buffer.as_ptr() as usize,
                std::sync::atomic::Ordering::SeqCst,
            );
            Some(buffer)
        }
        crate::lend_large_buffers(lender);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, QueueLimits::default());
        let writer = tokio::spawn(writer);
        let sending = tokio::spawn(async move {
            for size in [LENT_BODY, 3 * LARGE_FRAME] {
                let body = Bytes::from(pattern(size));
                let frame = Outgoing::new(&Header::control(Kind::Request), body);
                tx.send(frame).await.expect("connection open");
            }
        });
        let mut reader =
            FrameReader::new(b, 4 * LARGE_FRAME).keep_large_buffers(Duration::from_secs(60));
        let lent = reader.next().await.expect("read").expect("frame");
        let at = LENT_AT.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            lent.raw().as_ptr() as usize,
            at,
            "read into the lent buffer"
        );
        assert!(lent.payload() == pattern(LENT_BODY));
        // Another size: the lender has none, and the reader allocates as before.
        let other = reader.next().await.expect("read").expect("frame");
        assert_ne!(other.raw().as_ptr() as usize, at);
        assert!(other.payload() == pattern(3 * LARGE_FRAME));
        sending.await.expect("sender");
        drop(reader);
        writer.await.expect("join").expect("io");
    }

    /// The body of the frames [`an_idle_large_buffer_is_taken_for_a_copy`] reads. The
    /// buffers it asks for (of 4-8, 9-18 and 100-200 MiB) fit no other test's frames, so
    /// it takes no other test's buffer (the readers listed are the test process's).
    const IDLE_BODY: usize = 9 * LARGE_FRAME + 123;

    #[tokio::test]
    async fn an_idle_large_buffer_is_taken_for_a_copy() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, QueueLimits::default());
        let writer = tokio::spawn(writer);
        let sending = tokio::spawn(async move {
            for _ in 0..2 {
                let body = Bytes::from(pattern(IDLE_BODY));
                let frame = Outgoing::new(&Header::control(Kind::Request), body);
                tx.send(frame).await.expect("connection open");
            }
        });
        let mut reader =
            FrameReader::new(b, 16 * LARGE_FRAME).keep_large_buffers(Duration::from_secs(60));
        let first = reader.next().await.expect("read").expect("frame");
        let at = first.raw().as_ptr() as usize;
        assert!(
            take_idle_large_buffer(IDLE_BODY).is_none(),
            "not while its frame is held"
        );
        assert!(reader.keeps_spare(), "still kept after a refusal");
        drop(first);
        assert!(
            take_idle_large_buffer(4 * LARGE_FRAME).is_none(),
            "not for a string of less than half its size"
        );
        assert!(
            take_idle_large_buffer(100 * LARGE_FRAME).is_none(),
            "not for a string larger than it"
        );
        let taken = take_idle_large_buffer(IDLE_BODY).expect("the reader's idle buffer");
        assert_eq!(taken.as_ptr() as usize, at, "the frame's buffer");
        assert!(taken.is_empty() && taken.capacity() >= IDLE_BODY);
        assert!(!reader.keeps_spare(), "no longer the reader's");
        assert!(take_idle_large_buffer(IDLE_BODY).is_none(), "taken once");
        // The reader reads its next large frame into another buffer, whole.
        let second = reader.next().await.expect("read").expect("frame");
        assert_ne!(second.raw().as_ptr() as usize, at);
        assert!(second.payload() == pattern(IDLE_BODY));
        drop(taken);
        sending.await.expect("sender");
        drop(reader);
        writer.await.expect("join").expect("io");
    }

    /// The frames [`an_idle_buffer_much_larger_than_a_string_is_not_taken`] reads: one
    /// large, then a smaller one read into its buffer. Sizes no other test reads or asks
    /// for (the readers listed are the test process's): the smaller one's frame lies
    /// outside 4-8, 9-18 and 100-200 MiB, and 3.5-7 MiB holds no other test's frame.
    const ROOMY_BODIES: [usize; 2] = [20 * LARGE_FRAME + 55, 3 * LARGE_FRAME + LARGE_FRAME / 2];

    #[tokio::test]
    async fn an_idle_buffer_much_larger_than_a_string_is_not_taken() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, QueueLimits::default());
        let writer = tokio::spawn(writer);
        let sending = tokio::spawn(async move {
            for size in ROOMY_BODIES {
                let body = Bytes::from(pattern(size));
                let frame = Outgoing::new(&Header::control(Kind::Request), body);
                tx.send(frame).await.expect("connection open");
            }
        });
        let mut reader =
            FrameReader::new(b, 32 * LARGE_FRAME).keep_large_buffers(Duration::from_secs(60));
        let first = reader.next().await.expect("read").expect("frame");
        let at = first.raw().as_ptr() as usize;
        drop(first);
        let second = reader.next().await.expect("read").expect("frame");
        assert_eq!(
            second.raw().as_ptr() as usize,
            at,
            "read into the first's buffer"
        );
        assert!(second.payload() == pattern(ROOMY_BODIES[1]));
        drop(second);
        // The buffer holds 20 MiB: a string of 3.5 MiB must not hold it (a decoded
        // `Vec<u8>` the user keeps, say).
        let small = ROOMY_BODIES[1];
        if let Some(taken) = take_idle_large_buffer(small) {
            assert!(
                taken.capacity() <= 2 * small,
                "{} bytes of room taken for a string of {small}",
                taken.capacity()
            );
        }
        assert!(reader.keeps_spare(), "still the reader's");
        sending.await.expect("sender");
        drop(reader);
        writer.await.expect("join").expect("io");
    }

    /// `len` bytes that differ from place to place.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
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

    /// Bytes of a stream chunk in the mid-size tests: a frame a little over 64 KiB.
    const CHUNK: usize = 64 * 1024;

    /// A reader that keeps buffers (for `keep`), fed `count` request frames of `size`
    /// payload bytes, the i-th filled with `i as u8`, by a writer task; and a sender
    /// that holds the connection open until it is dropped (the feeder ends then).
    fn fed_reader(
        count: usize,
        size: usize,
        keep: Duration,
    ) -> (
        FrameReader<tokio::io::DuplexStream>,
        crate::FrameSender,
        tokio::task::JoinHandle<()>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (tx, writer) = frame_channel(a, QueueLimits::default());
        let open = tx.clone();
        let feeding = tokio::spawn(async move {
            let writer = tokio::spawn(writer);
            for i in 0..count {
                let body = Bytes::from(vec![i as u8; size]);
                let frame = Outgoing::new(&Header::control(Kind::Request), body);
                tx.send(frame).await.expect("connection open");
            }
            drop(tx);
            writer.await.expect("join").expect("io");
        });
        let reader = FrameReader::new(b, 4 * LARGE_FRAME).keep_large_buffers(keep);
        (reader, open, feeding)
    }

    async fn next_of(reader: &mut FrameReader<tokio::io::DuplexStream>, i: usize) -> Frame {
        let frame = reader.next().await.expect("read").expect("frame");
        assert_eq!(frame.payload().len(), CHUNK);
        assert!(
            frame.payload().iter().all(|&b| b == i as u8),
            "frame {i} holds its own bytes"
        );
        frame
    }

    #[tokio::test]
    async fn a_mid_size_frame_buffer_is_reused_once_its_frame_is_dropped() {
        let (mut reader, open, feeding) = fed_reader(4, CHUNK, Duration::from_secs(60));
        let first = next_of(&mut reader, 0).await;
        let first_at = first.raw().as_ptr();
        // Still held: the second frame gets a buffer of its own.
        let second = next_of(&mut reader, 1).await;
        let second_at = second.raw().as_ptr();
        assert_ne!(second_at, first_at);
        assert_eq!(reader.mid_kept().0, 2);
        drop(first);
        // The oldest free buffer is read into again, the held one left alone.
        let third = next_of(&mut reader, 2).await;
        assert_eq!(third.raw().as_ptr(), first_at);
        assert!(second.payload().iter().all(|&b| b == 1));
        drop(second);
        drop(third);
        let fourth = next_of(&mut reader, 3).await;
        assert_eq!(fourth.raw().as_ptr(), second_at);
        assert_eq!(reader.mid_kept().0, 2, "no buffer was added");
        drop(open);
        feeding.await.expect("feeder");
    }

    #[tokio::test]
    async fn a_mid_size_buffer_with_any_part_still_held_is_not_reused() {
        let (mut reader, open, feeding) = fed_reader(3, CHUNK, Duration::from_secs(60));
        let first = next_of(&mut reader, 0).await;
        let first_at = first.raw().as_ptr();
        // A slice of the payload outlives its frame (a `Blob` the user kept, say).
        let part = first.payload().slice(100..200);
        drop(first);
        let second = next_of(&mut reader, 1).await;
        assert_ne!(second.raw().as_ptr(), first_at);
        drop(second);
        let third = next_of(&mut reader, 2).await;
        assert_ne!(third.raw().as_ptr(), first_at);
        assert!(part.iter().all(|&b| b == 0), "the held part is untouched");
        drop(open);
        feeding.await.expect("feeder");
    }

    #[tokio::test]
    async fn mid_size_buffers_kept_stay_within_their_bound() {
        let count = 2 * MID_KEPT_BYTES / CHUNK;
        let (mut reader, open, feeding) = fed_reader(count, CHUNK, Duration::from_secs(60));
        let mut held = Vec::new();
        for i in 0..count {
            let frame = next_of(&mut reader, i).await;
            let (kept, bytes) = reader.mid_kept();
            assert!(
                bytes <= MID_KEPT_BYTES,
                "{bytes} bytes kept in {kept} buffers"
            );
            held.push(frame);
        }
        let (kept, bytes) = reader.mid_kept();
        assert!(kept > 0 && kept < count, "{kept} of {count} buffers kept");
        assert!(
            bytes + CHUNK + MID_GRAIN > MID_KEPT_BYTES,
            "only {bytes} bytes kept"
        );
        let unkept = held
            .into_iter()
            .filter(|f| f.clone().into_payload().1.is_none())
            .count();
        assert_eq!(
            unkept,
            count - kept,
            "the frames past the bound are not kept"
        );
        drop(open);
        feeding.await.expect("feeder");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_reader_lets_its_mid_size_buffers_go() {
        let keep = Duration::from_secs(1);
        let (mut reader, open, feeding) = fed_reader(2, CHUNK, keep);
        let first = next_of(&mut reader, 0).await;
        let second = next_of(&mut reader, 1).await;
        drop((first, second));
        assert_eq!(reader.mid_kept().0, 2);
        // The connection stays open and quiet past the keep time (the clock is Tokio's
        // paused one: it jumps to each timer).
        let waited = tokio::time::timeout(10 * keep, reader.next()).await;
        assert!(waited.is_err(), "no frame came");
        assert_eq!(reader.mid_kept(), (0, 0), "nothing is kept once quiet");
        drop(open);
        assert!(
            matches!(reader.next().await, Ok(None)),
            "then it ends cleanly"
        );
        feeding.await.expect("feeder");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_reader_leaves_the_list_of_readers_keeping_large_buffers() {
        let keep = Duration::from_secs(1);
        let (mut reader, open, feeding) = fed_reader(1, 2 * LARGE_FRAME, keep);
        assert!(!reader.listed(), "not before its first large frame");
        let frame = reader.next().await.expect("read").expect("frame");
        drop(frame);
        assert!(reader.listed() && reader.keeps_spare());
        let waited = tokio::time::timeout(10 * keep, reader.next()).await;
        assert!(waited.is_err(), "no frame came");
        assert!(!reader.keeps_spare(), "its buffer let go once quiet");
        assert!(!reader.listed(), "and off the list");
        drop(open);
        assert!(matches!(reader.next().await, Ok(None)));
        feeding.await.expect("feeder");
    }

    #[tokio::test]
    async fn a_released_mid_size_buffer_is_the_payload_s_alone() {
        let (mut reader, open, feeding) = fed_reader(2, CHUNK, Duration::from_secs(60));
        let first = next_of(&mut reader, 0).await;
        let (payload, kept) = first.into_payload();
        let kept = kept.expect("a mid-size frame's buffer is kept");
        let payload = payload.try_into_mut().expect_err("the reader holds it too");
        kept.release();
        assert_eq!(reader.mid_kept().0, 0);
        let taken = payload.try_into_mut().expect("the payload's alone");
        let second = next_of(&mut reader, 1).await;
        assert!(
            taken.iter().all(|&b| b == 0),
            "the taken buffer is untouched"
        );
        drop(second);
        drop(open);
        feeding.await.expect("feeder");
    }

    #[tokio::test]
    async fn frames_of_every_size_in_turn_come_whole_and_in_order() {
        let sizes = [
            10,
            CHUNK,
            20,
            30,
            CHUNK - 100,
            MID_FRAME,
            MID_FRAME - 40,
            2 * LARGE_FRAME,
            CHUNK,
            CHUNK,
            5,
            LARGE_FRAME - 100,
            3000,
            CHUNK + 7000,
            1,
        ];
        let (a, b) = tokio::io::duplex(16 * 1024);
        let (tx, writer) = frame_channel(a, QueueLimits::default());
        let feeding = tokio::spawn(async move {
            let writer = tokio::spawn(writer);
            for (i, size) in sizes.into_iter().enumerate() {
                let body = Bytes::from(vec![i as u8; size]);
                let frame = Outgoing::new(&Header::control(Kind::Request), body);
                tx.send(frame).await.expect("connection open");
            }
            drop(tx);
            writer.await.expect("join").expect("io");
        });
        let mut reader =
            FrameReader::new(b, 4 * LARGE_FRAME).keep_large_buffers(Duration::from_secs(60));
        // Every other frame is held, so that buffers are both reused and not.
        let mut held = Vec::new();
        for (i, size) in sizes.into_iter().enumerate() {
            let frame = reader.next().await.expect("read").expect("frame");
            assert_eq!(frame.payload().len(), size, "frame {i}");
            assert!(frame.payload().iter().all(|&b| b == i as u8), "frame {i}");
            if i % 2 == 0 {
                held.push((i, frame));
            }
        }
        assert!(matches!(reader.next().await, Ok(None)), "then the end");
        for (i, frame) in held {
            assert!(
                frame.payload().iter().all(|&b| b == i as u8),
                "held frame {i}"
            );
        }
        feeding.await.expect("feeder");
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
