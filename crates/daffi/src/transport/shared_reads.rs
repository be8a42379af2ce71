//! A plaintext socket's reads, shared between the connection's reader task and a thread
//! that spins for the reply to its own call.
//!
//! When a reply lands on a node's socket, the kernel wakes a runtime worker, which reads
//! it and hands it to the waiting thread. On a small machine that wake-up is most of
//! the reply's way back: a thread spinning for its reply saw the reply's bytes in the
//! socket 6.7-8.2 µs (p50) before the worker handed them over (BENCHMARKS.md, "The
//! spinning thread reads its own reply"). So a spinning thread takes its reply from the
//! socket itself, as the floor's client does, on three conditions:
//!
//! - every byte read from the socket so far belongs to frames already read whole, and
//!   handled: the socket's next byte starts a frame ([`FrameStart`]), and the reader
//!   task came back to wait since its last read;
//! - its one read of the socket begins with the whole frame, which is small and the
//!   reply it waits for (`wanted`);
//! - nobody else reads the socket meanwhile: every read, the reader task's too, takes
//!   the same lock, which neither waits for.
//!
//! Reading the reply first is not enough: the worker would still be woken for it, just
//! as the thread takes it, and get in its way (measured: slower than not reading at
//! all). So the runtime does not watch the socket itself but an epoll instance of its
//! own that watches it, and a spinning thread mutes that watch while it spins
//! ([`SharedReads::mute`]). Whatever it finds that is not its reply (a request for the
//! node, a large reply, the rest of a frame the reader began, the end of the stream), it
//! hands back to the reader task at once: the watch is restored, and the task woken.
//!
//! The thread reads once, at most [`MOST_TAKEN`] bytes: no look first, which would be a
//! second system call per reply. What that read brought besides the reply, or instead
//! of it, is kept for the reader task (the *stash*, never more than one read's worth:
//! no frame is taken while it holds bytes), which reads it before the socket's next
//! bytes.
//!
//! A frame taken this way is one the reader task never sees, and it keeps its place:
//! it is taken only once the reader task has handled every frame it read, and the call
//! is completed before anything behind it can be read. A callee's departure right
//! after its reply, or a second reply to the same call, is handled after the reply, as
//! the reader task alone would.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::task::Waker;

use bytes::Bytes;
use daffi_wire::Frame;

/// The largest frame a spinning thread takes from the socket, length prefix included: a
/// small reply. Larger ones are left to the reader task, whose buffers are made for them.
const MOST_TAKEN: usize = 512;

/// Bytes in a frame's length prefix.
const LEN_PREFIX: usize = 4;

/// See the module docs.
#[derive(Debug)]
pub struct SharedReads {
    /// The socket's descriptor. Used only while `state` says it is open: the reader's
    /// half closes it only after saying so under the lock.
    fd: RawFd,
    /// The epoll instance that watches the socket for the runtime (see
    /// [`mute`](Self::mute)). The reader's half owns it: used under the same rule.
    epoll: RawFd,
    state: Mutex<ReadState>,
    /// The reader task found the lock taken and went back to waiting for readiness,
    /// which it cleared: whoever held the lock then looks whether bytes are left
    /// ([`hand_back`](Self::hand_back)).
    reader_left: AtomicBool,
    /// Bytes were left after the reader task went back to waiting: it reads at its
    /// next poll without waiting for readiness (no new event would come for them).
    read_now: AtomicBool,
    /// The reader task's waker, as of its last wait for readiness.
    reader: Mutex<Option<Waker>>,
    /// The reader task handled every frame it read: it went back to waiting since its
    /// last read (cleared under the lock as it reads). A frame taken from the socket
    /// then overtakes none.
    reader_caught_up: AtomicBool,
    /// `state.stash` holds bytes (set and cleared under the lock): a look that finds
    /// the socket empty still hands them over.
    stashed: AtomicBool,
}

#[derive(Debug, Default)]
struct ReadState {
    start: FrameStart,
    /// The reader's half is gone: `fd` may no longer be this socket.
    closed: bool,
    /// Threads spinning for their reply now, which keep the runtime from being woken
    /// for the socket (see [`SharedReads::mute`]).
    spinners: usize,
    /// Bytes a spinning thread read from the socket that are not its reply: the reader
    /// task's next read takes them, before the socket's next bytes. Empty but for a
    /// moment after a thread looked while another frame came first.
    stash: Vec<u8>,
}

/// What [`SharedReads::take_frame`] found.
#[derive(Debug)]
pub enum Taken {
    /// The frame wanted, taken from the socket and delivered.
    Frame,
    /// Nothing to read, or the reader task is reading: look again.
    Nothing,
    /// Bytes that are the reader task's: it has been woken for them.
    ForReader,
}

/// The events the runtime watches the socket for, edge-triggered as tokio's own
/// registrations are: readable, or closed by the peer.
const ARMED: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// What [`SharedReads::try_read`] did.
#[derive(Debug)]
pub enum Attempt {
    /// It read, or failed to.
    Read(io::Result<usize>),
    /// A spinning thread held the lock: the task may go back to waiting for readiness;
    /// if that thread leaves bytes in the socket, it wakes the task, and
    /// [`SharedReads::take_read_now`] says to read them.
    Busy,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can panic while it holds a lock; a poisoned lock is still whole.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SharedReads {
    /// The reads of the socket `fd`, which the caller keeps open until
    /// [`close`](Self::close); and the epoll instance for the runtime to watch instead
    /// of the socket (readable when the socket is, unless muted).
    pub fn new(fd: RawFd) -> io::Result<(Self, OwnedFd)> {
        // SAFETY: `epoll_create1` returns a new descriptor, owned from here on, or -1.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, and owned by nothing else.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let reads = SharedReads {
            fd,
            epoll: epoll.as_raw_fd(),
            state: Mutex::default(),
            reader_left: AtomicBool::new(false),
            read_now: AtomicBool::new(false),
            reader: Mutex::new(None),
            reader_caught_up: AtomicBool::new(false),
            stashed: AtomicBool::new(false),
        };
        reads.watch(libc::EPOLL_CTL_ADD, ARMED)?;
        Ok((reads, epoll))
    }

    /// Sets what the runtime's epoll instance watches the socket for.
    fn watch(&self, op: libc::c_int, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: 0 };
        // SAFETY: both descriptors are open (the caller holds the lock and saw the
        // half open, or is creating it), and `event` is valid for the call.
        if unsafe { libc::epoll_ctl(self.epoll, op, self.fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A thread starts to spin for its reply: the runtime is no longer woken for the
    /// socket's bytes (a wake-up that would come just as the thread takes its reply,
    /// and only get in its way), until every such thread [`release`](Self::release)s
    /// it. Whatever the spinning thread finds that is not its reply, it leaves to the
    /// reader task and releases at once (see [`take_frame`](Self::take_frame)).
    /// `false` if the socket is closing: nothing was muted.
    pub fn mute(&self) -> bool {
        let mut state = lock(&self.state);
        if state.closed {
            return false;
        }
        state.spinners += 1;
        if state.spinners == 1 {
            // Failing leaves the socket watched, as before: nothing is lost.
            let _ = self.watch(libc::EPOLL_CTL_MOD, 0);
        }
        true
    }

    /// A thread that [`mute`](Self::mute)d stops spinning: the last one lets the
    /// runtime watch the socket again, and wakes the reader task for what arrived
    /// meanwhile.
    pub fn release(&self) {
        {
            let mut state = lock(&self.state);
            state.spinners = state.spinners.saturating_sub(1);
            if state.spinners == 0 && !state.closed {
                if let Err(e) = self.watch(libc::EPOLL_CTL_MOD, ARMED) {
                    // The reader task would never be woken again: end the connection.
                    tracing::error!(
                        "could not watch the socket again ({e}); closing the connection"
                    );
                    // SAFETY: the descriptor is open (`closed` is false under the lock).
                    unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
                }
            }
        }
        // Bytes that came while muted raised no event (and one that came just now may
        // have been missed by the watch): the reader is told directly.
        if self.readable() || self.stashed.load(Ordering::Acquire) {
            self.wake_reader();
        }
    }

    /// The reader task waits for readiness: `waker` is how a thread that holds the
    /// lock, or mutes the socket, wakes it. `true` if it was already told to read
    /// ([`take_read_now`](Self::take_read_now) would say so): it should not wait.
    pub fn reader_waits(&self, waker: &Waker) -> bool {
        // Whatever the task read, it handled before it came back to wait.
        self.reader_caught_up.store(true, Ordering::Release);
        {
            let mut reader = lock(&self.reader);
            if !reader.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *reader = Some(waker.clone());
            }
        }
        self.read_now.load(Ordering::Acquire)
    }

    /// Wakes the reader task to read without waiting for readiness.
    fn wake_reader(&self) {
        self.read_now.store(true, Ordering::Release);
        if let Some(reader) = lock(&self.reader).as_ref() {
            reader.wake_by_ref();
        }
    }

    /// Reads what the socket holds into `buf` with `read`, for the connection's reader
    /// task (whose waker is `waker`), keeping count of where frames start. Never waits:
    /// a reply wakes the task just as its waiting thread takes it, and making either
    /// wait for the other would cost a wake-up of a thread on every call.
    pub fn try_read(
        &self,
        buf: &mut [u8],
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
        waker: &Waker,
    ) -> Attempt {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // Leave a way back first, then look again: the holder either sees
                // `reader_left` once it lets go, or had let go before this look.
                let _ = self.reader_waits(waker);
                self.reader_left.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.state.try_lock() {
                    Ok(state) => state,
                    Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                    Err(TryLockError::WouldBlock) => return Attempt::Busy,
                }
            }
        };
        let n = if state.stash.is_empty() {
            let n = match read(buf) {
                Ok(n) => n,
                Err(e) => return Attempt::Read(Err(e)),
            };
            state.start.advance(&buf[..n]);
            n
        } else {
            let n = state.stash.len().min(buf.len());
            buf[..n].copy_from_slice(&state.stash[..n]);
            state.stash.drain(..n);
            self.stashed
                .store(!state.stash.is_empty(), Ordering::Release);
            // The socket may hold more, whose event was taken while muted: the next
            // read does not wait for one.
            self.read_on();
            n
        };
        if n > 0 {
            self.reader_caught_up.store(false, Ordering::Release);
        }
        Attempt::Read(Ok(n))
    }

    /// Whether bytes were left for the reader task after it went back to waiting (see
    /// [`Attempt::Busy`]): it reads them without waiting for readiness.
    pub fn take_read_now(&self) -> bool {
        self.read_now.load(Ordering::Acquire) && self.read_now.swap(false, Ordering::AcqRel)
    }

    /// The reader task read without an event and filled its buffer: bytes may be left,
    /// for which no event comes either. Its next read does not wait.
    pub fn read_on(&self) {
        self.read_now.store(true, Ordering::Release);
    }

    /// The reader's half is closing the socket: no frame is taken from it any more.
    pub fn close(&self) {
        lock(&self.state).closed = true;
    }

    /// Takes the socket's next frame if it starts there, is whole and small, and
    /// `wanted` (given the parsed frame) says it is the one, and hands it to `deliver`:
    /// without waiting, and without reading anything if not. Any other bytes are the
    /// reader task's, which is woken for them: a frame that does not parse (it fails
    /// the connection, as for any other bad frame), one over `max_frame_size`, the rest
    /// of a frame it began to read.
    ///
    /// The frame keeps its place in the stream: it is taken only once the reader task
    /// has handled every frame it read (none is overtaken), and `deliver` runs before
    /// the reader task can read anything behind it (the lock is held).
    pub fn take_frame(
        &self,
        max_frame_size: usize,
        wanted: impl FnOnce(&Frame) -> bool,
        deliver: impl FnOnce(Frame),
    ) -> Taken {
        // Without the lock first: most looks find nothing.
        if !self.readable() && !self.stashed.load(Ordering::Acquire) {
            return Taken::Nothing;
        }
        let Ok(mut state) = self.state.try_lock() else {
            return Taken::Nothing;
        };
        if !state.closed && !state.stash.is_empty() {
            // Bytes read earlier go first: the reader task was woken for them.
            drop(state);
            self.hand_back(true);
            return Taken::Nothing;
        }
        if !state.closed && state.start.at_start() && !self.reader_caught_up.load(Ordering::Acquire)
        {
            // The reader task is handling frames it read: they go first. It reads
            // this one too if it can; otherwise it waits, caught up, and the next look
            // takes it.
            return Taken::Nothing;
        }
        let taken = if state.closed || !state.start.at_start() {
            None
        } else {
            self.take_next(&mut state, max_frame_size, wanted)
        };
        let taken = match taken {
            Some(frame) => {
                deliver(frame);
                true
            }
            None => false,
        };
        let stashed = !state.stash.is_empty();
        drop(state);
        self.hand_back(stashed);
        // Bytes left for the reader: it reads them without waiting for an event.
        if !taken || stashed {
            self.wake_reader();
        }
        if taken {
            Taken::Frame
        } else {
            Taken::ForReader
        }
    }

    /// [`take_frame`](Self::take_frame)'s read, under the lock, at the start of a frame:
    /// one `recv`. The frame wanted, if the read began with it whole; whatever else it
    /// read goes to the stash, for the reader task.
    fn take_next(
        &self,
        state: &mut ReadState,
        max_frame_size: usize,
        wanted: impl FnOnce(&Frame) -> bool,
    ) -> Option<Frame> {
        let mut got = [0u8; MOST_TAKEN];
        let n = self.recv(&mut got)?;
        let got = &got[..n];
        state.start.advance(got);
        let frame = Self::whole_frame(got, max_frame_size).filter(|(frame, _)| wanted(frame));
        let rest = match &frame {
            Some((_, total)) => &got[*total..],
            None => got,
        };
        if !rest.is_empty() {
            state.stash.extend_from_slice(rest);
            self.stashed.store(true, Ordering::Release);
        }
        frame.map(|(frame, _)| frame)
    }

    /// The frame `bytes` begin with, and its length, if it is whole and allowed.
    fn whole_frame(bytes: &[u8], max_frame_size: usize) -> Option<(Frame, usize)> {
        let prefix: [u8; LEN_PREFIX] = bytes.get(..LEN_PREFIX)?.try_into().ok()?;
        let body = u32::from_be_bytes(prefix) as usize;
        let total = LEN_PREFIX + body;
        if total > bytes.len() || body > max_frame_size {
            return None;
        }
        let frame = Frame::parse(Bytes::copy_from_slice(&bytes[..total])).ok()?;
        Some((frame, total))
    }

    /// After holding the lock: if the reader task went back to waiting meanwhile and
    /// bytes are left for it (`stashed`, or in the socket), it is woken to read them.
    fn hand_back(&self, stashed: bool) {
        fence(Ordering::SeqCst);
        if self.reader_left.swap(false, Ordering::SeqCst) && (stashed || self.readable()) {
            self.wake_reader();
        }
    }

    /// Whether the socket has bytes to read, without waiting.
    fn readable(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a zero timeout never waits. A descriptor closed
        // meanwhile only makes `poll` report it (or another file) ready: the lock's
        // `closed` is looked at before any read.
        unsafe { libc::poll(&mut poll, 1, 0) > 0 && poll.revents & libc::POLLIN != 0 }
    }

    /// One `recv` without waiting; `None` if it read nothing (or failed: the reader task
    /// sees the failure itself).
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes; the caller holds the lock and saw
        // the descriptor open.
        let n = unsafe {
            libc::recv(
                self.fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        usize::try_from(n).ok().filter(|&n| n > 0)
    }
}

/// Where the socket's next byte falls in the stream of frames: counted over every byte
/// read, from the length prefix of each frame.
#[derive(Debug, Default)]
struct FrameStart {
    /// The length prefix read so far of the frame that starts next.
    prefix: [u8; LEN_PREFIX],
    /// How many bytes of `prefix` were read.
    have: usize,
    /// Bytes of the current frame's body still to come.
    body_left: usize,
}

impl FrameStart {
    /// Counts `bytes`, the next ones read from the socket.
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (LEN_PREFIX - self.have).min(bytes.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == LEN_PREFIX {
                self.have = 0;
                self.body_left = u32::from_be_bytes(self.prefix) as usize;
            }
        }
    }

    /// Whether the next byte starts a frame.
    fn at_start(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::Duration;

    use daffi_wire::frame::Header;
    use daffi_wire::{FrameReader, Kind};
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::transport::split::node_halves;
    use crate::transport::{BoxRead, BoxWrite, Halves};

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn frame_starts_are_found_however_the_bytes_are_cut() {
        let mut stream = framed(b"first frame");
        stream.extend(framed(b""));
        stream.extend(framed(&[7u8; 300]));
        // Where each frame ends, the next one starts.
        let ends = [15, 19, stream.len()];
        for cut in 1..=stream.len() {
            let mut start = FrameStart::default();
            let mut at = 0;
            for piece in stream.chunks(cut) {
                start.advance(piece);
                at += piece.len();
                assert_eq!(
                    start.at_start(),
                    ends.contains(&at),
                    "after {at} bytes, in pieces of {cut}"
                );
            }
        }
    }

    /// A frame of `kind` for call `call_id` with `payload`, as the controller sends it.
    fn frame(kind: Kind, call_id: u64, payload: &[u8]) -> Vec<u8> {
        let header = Header {
            kind,
            flags: 0,
            call_id,
            timeout_ms: 0,
            src: "callee",
            dst: "caller",
            name: if kind == Kind::Request { "echo" } else { "" },
        };
        let mut bytes = header.encode(payload.len()).to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    /// The node's end (its frame reader and shared reads) and the controller's end.
    fn link() -> (FrameReader<BoxRead>, Arc<SharedReads>, BoxWrite, UnixStream) {
        let (node, controller) = UnixStream::pair().expect("a socket pair");
        node.set_nonblocking(true).expect("non-blocking");
        let Halves {
            read,
            write,
            shared_reads,
        } = node_halves(node, true).expect("halves");
        let reader = FrameReader::new(read, 1 << 20);
        (reader, shared_reads.expect("shared"), write, controller)
    }

    const SOON: Duration = Duration::from_secs(10);

    fn reply_to(call_id: u64) -> impl Fn(&Frame) -> bool {
        move |f: &Frame| f.kind() == Kind::Reply && f.call_id() == call_id
    }

    /// Looks until the bytes written are seen (they are on their way through the kernel):
    /// what was found, and the frame taken.
    fn take(reads: &SharedReads, wanted: impl Fn(&Frame) -> bool) -> (Taken, Option<Frame>) {
        let until = std::time::Instant::now() + SOON;
        let delivered = std::cell::RefCell::new(None);
        loop {
            let deliver = |frame| *delivered.borrow_mut() = Some(frame);
            match reads.take_frame(1 << 20, &wanted, deliver) {
                Taken::Nothing if std::time::Instant::now() < until => std::hint::spin_loop(),
                taken => return (taken, delivered.take()),
            }
        }
    }

    /// Until the reader task has come back to wait, with all it read handled.
    async fn caught_up(reads: &SharedReads) {
        let waited = async {
            while !reads.reader_caught_up.load(Ordering::Acquire) {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(SOON, waited)
            .await
            .expect("the reader waits");
    }

    /// The reader's next frame, within [`SOON`]; `what` says what should have come.
    async fn next_frame(reader: &mut FrameReader<BoxRead>, what: &str) -> Frame {
        let next = tokio::time::timeout(SOON, reader.next()).await;
        next.expect(what).unwrap().expect("a frame")
    }

    /// Polls the reader until it waits for more (nothing is there yet).
    async fn wait_once(reader: &mut FrameReader<BoxRead>) {
        tokio::select! {
            biased;
            _ = reader.next() => panic!("nothing was written"),
            _ = tokio::task::yield_now() => {}
        }
    }

    #[tokio::test]
    async fn a_spinning_thread_takes_only_its_reply_and_the_reader_reads_on() {
        let (mut reader, reads, _write, mut controller) = link();
        wait_once(&mut reader).await;
        let mut bytes = frame(Kind::Reply, 7, b"mine");
        bytes.extend(frame(Kind::Request, 1, b"theirs"));
        assert!(reads.mute());
        std::io::Write::write_all(&mut controller, &bytes).unwrap();
        match take(&reads, reply_to(7)) {
            (Taken::Frame, Some(f)) => assert_eq!(&f.payload()[..], b"mine"),
            other => panic!("expected the reply, got {other:?}"),
        }
        // The request behind it, read with the reply, is the reader's: no look takes
        // it, and the reader reads it before anything after it.
        let deliver = |_| panic!("the stashed request was taken");
        assert!(matches!(
            reads.take_frame(1 << 20, |_| true, deliver),
            Taken::Nothing
        ));
        std::io::Write::write_all(&mut controller, &frame(Kind::Request, 2, b"next")).unwrap();
        reads.release();
        let next = next_frame(&mut reader, "the reader is woken").await;
        assert_eq!(
            (next.kind(), &next.payload()[..]),
            (Kind::Request, &b"theirs"[..])
        );
        let after = next_frame(&mut reader, "the reader reads on").await;
        assert_eq!((after.kind(), after.call_id()), (Kind::Request, 2));
    }

    #[tokio::test]
    async fn a_taken_reply_keeps_its_place_in_the_stream() {
        let (mut reader, reads, _write, mut controller) = link();
        // Two frames read together: the reader has handed out the first only.
        let mut before = frame(Kind::Request, 1, b"first");
        before.extend(frame(Kind::Request, 2, b"second"));
        std::io::Write::write_all(&mut controller, &before).unwrap();
        let first = next_frame(&mut reader, "read").await;
        assert_eq!(first.call_id(), 1);
        assert!(reads.mute());
        let mut after = frame(Kind::Reply, 7, b"mine");
        after.extend(frame(Kind::Request, 3, b"behind"));
        std::io::Write::write_all(&mut controller, &after).unwrap();
        // The reply may not overtake the frame the reader still holds.
        let deliver = |_| panic!("taken before the frame read ahead of it was handled");
        assert!(matches!(
            reads.take_frame(1 << 20, reply_to(7), deliver),
            Taken::Nothing
        ));
        let second = next_frame(&mut reader, "read").await;
        assert_eq!(second.call_id(), 2);
        wait_once(&mut reader).await;
        // Caught up: the reply is taken, and delivered before anything behind it can be
        // read (the lock is held meanwhile).
        let delivered = std::cell::Cell::new(false);
        let deliver = |f: Frame| {
            assert_eq!(f.call_id(), 7);
            assert!(
                reads.state.try_lock().is_err(),
                "delivered outside the lock"
            );
            delivered.set(true);
        };
        assert!(matches!(
            reads.take_frame(1 << 20, reply_to(7), deliver),
            Taken::Frame
        ));
        assert!(delivered.get());
        reads.release();
        let behind = next_frame(&mut reader, "read").await;
        assert_eq!(behind.call_id(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_comes_while_muted_reaches_a_waiting_reader() {
        let (mut reader, reads, _write, mut controller) = link();
        let waiting = tokio::spawn(async move { reader.next().await.map(|f| f.map(|f| f.kind())) });
        // The reader task waits for readiness before anything is written.
        caught_up(&reads).await;
        assert!(reads.mute());
        std::io::Write::write_all(&mut controller, &frame(Kind::Request, 1, b"x")).unwrap();
        // Not the reply waited for: left to the reader, which is woken for it.
        assert!(matches!(take(&reads, reply_to(9)).0, Taken::ForReader));
        let got = tokio::time::timeout(SOON, waiting)
            .await
            .expect("the reader is woken");
        assert_eq!(got.unwrap().unwrap(), Some(Kind::Request));
        reads.release();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_hands_over_what_came_while_muted() {
        let (mut reader, reads, _write, mut controller) = link();
        assert!(reads.mute());
        let waiting = tokio::spawn(async move { reader.next().await.map(|f| f.map(|f| f.kind())) });
        std::io::Write::write_all(&mut controller, &frame(Kind::Reply, 3, b"late")).unwrap();
        // The spinning thread gave up before it looked: nothing else wakes the reader.
        reads.release();
        let got = tokio::time::timeout(SOON, waiting)
            .await
            .expect("the reader is woken");
        assert_eq!(got.unwrap().unwrap(), Some(Kind::Reply));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_frame_that_came_while_muted_is_read_whole() {
        let (mut reader, reads, _write, mut controller) = link();
        wait_once(&mut reader).await;
        assert!(reads.mute());
        // Larger than the reader's first read, and all in the socket before the
        // release: the reader reads on without waiting for more to come.
        let payload = vec![9u8; 120_000];
        controller.set_nonblocking(false).unwrap();
        std::io::Write::write_all(&mut controller, &frame(Kind::Reply, 4, &payload)).unwrap();
        // Too large to take: the reader's.
        assert!(matches!(take(&reads, reply_to(4)).0, Taken::ForReader));
        reads.release();
        let next = next_frame(&mut reader, "the reader reads it all").await;
        assert_eq!(next.payload().len(), payload.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_frame_begun_behind_a_taken_reply_is_read_whole() {
        let (mut reader, reads, _write, mut controller) = link();
        wait_once(&mut reader).await;
        let large = frame(Kind::Request, 8, &[3u8; 4_000]);
        let (head, tail) = large.split_at(100);
        let mut bytes = frame(Kind::Reply, 6, b"mine");
        bytes.extend_from_slice(head);
        assert!(reads.mute());
        std::io::Write::write_all(&mut controller, &bytes).unwrap();
        match take(&reads, reply_to(6)) {
            (Taken::Frame, Some(f)) => assert_eq!(&f.payload()[..], b"mine"),
            other => panic!("expected the reply, got {other:?}"),
        }
        reads.release();
        // The head, read with the reply, comes out first; the tail from the socket.
        let waiting = tokio::spawn(async move { next_frame(&mut reader, "the frame").await });
        controller.set_nonblocking(false).unwrap();
        std::io::Write::write_all(&mut controller, tail).unwrap();
        let next = tokio::time::timeout(SOON, waiting)
            .await
            .expect("read whole");
        let next = next.unwrap();
        assert_eq!((next.call_id(), next.payload().len()), (8, 4_000));
        assert!(next.payload().iter().all(|&b| b == 3));
    }

    #[tokio::test]
    async fn bad_bytes_a_spinning_thread_reads_fail_the_connection_at_the_reader() {
        // A frame over the node's limit, and one too short for its header: each read
        // by the spinning thread, neither taken, and each failing the connection at
        // the reader as it would without the thread.
        let too_large = (1u32 << 21).to_be_bytes().to_vec();
        let too_short = framed(b"xy");
        for bad in [too_large, too_short] {
            let (mut reader, reads, _write, mut controller) = link();
            wait_once(&mut reader).await;
            assert!(reads.mute());
            std::io::Write::write_all(&mut controller, &bad).unwrap();
            assert!(matches!(take(&reads, reply_to(1)).0, Taken::ForReader));
            reads.release();
            let next = tokio::time::timeout(SOON, reader.next()).await;
            assert!(
                next.expect("the reader is woken").is_err(),
                "{bad:?} was read as a frame"
            );
        }
    }

    #[tokio::test]
    async fn a_frame_the_reader_began_is_left_to_it() {
        let (mut reader, reads, _write, mut controller) = link();
        let whole = frame(Kind::Reply, 5, &[1u8; 64]);
        let (first, rest) = whole.split_at(20);
        std::io::Write::write_all(&mut controller, first).unwrap();
        // The reader takes the first part, then waits for the rest.
        let mut next = std::pin::pin!(reader.next());
        let began = async {
            while lock(&reads.state).start.at_start() {
                tokio::select! {
                    biased;
                    _ = &mut next => panic!("half a frame is not a frame"),
                    _ = tokio::task::yield_now() => {}
                }
            }
        };
        tokio::time::timeout(SOON, began)
            .await
            .expect("the reader reads the first part");
        std::io::Write::write_all(&mut controller, rest).unwrap();
        assert!(reads.mute());
        // Bytes in the socket, but not at a frame's start: never taken.
        caught_up(&reads).await;
        assert!(matches!(take(&reads, reply_to(5)).0, Taken::ForReader));
        reads.release();
        let next = tokio::time::timeout(SOON, next).await;
        let next = next
            .expect("the reader is woken")
            .unwrap()
            .expect("a frame");
        assert_eq!(next.call_id(), 5);
    }

    #[tokio::test]
    async fn a_peer_gone_while_muted_is_seen_by_the_reader() {
        let (mut reader, reads, mut write, controller) = link();
        wait_once(&mut reader).await;
        assert!(reads.mute());
        drop(controller);
        assert!(matches!(take(&reads, reply_to(1)).0, Taken::ForReader));
        reads.release();
        let end = tokio::time::timeout(SOON, reader.next()).await;
        assert!(matches!(end.expect("the reader is woken"), Ok(None)));
        let _ = write.shutdown().await;
    }
}
