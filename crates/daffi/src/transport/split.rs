//! A plaintext socket split into halves that wake their task only for what it waits on.
//!
//! Tokio's own halves register the socket for reading and writing at once. Every time the
//! peer reads what this side wrote, the kernel then reports "writable" to this process,
//! and a runtime thread parked in `epoll_wait` wakes up for nothing: nothing here waits
//! to write, because a write only waits when the socket buffer is full. On a connection
//! that carries one small frame each way at a time (a blocking call), that was one
//! useless thread wake-up per frame in every process.
//!
//! Here the socket is registered for reading only. A write goes straight to the socket;
//! only when the socket buffer is full does the writer register a second descriptor of
//! the same socket for writability, and it drops that registration again at its next
//! flush, once the batch is out.
//!
//! A node's end of its link shares its reads with a thread that spins for its reply
//! ([`SharedReads`]): the runtime then watches, for reading, an epoll instance that
//! watches the socket, which that thread can mute while it reads its reply itself.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::runtime::Handle;

use super::shared_reads::{Attempt, SharedReads};
use super::{BoxRead, BoxWrite, Halves};

/// A connected stream socket as the standard library has it (set to non-blocking), used
/// through a shared reference by both halves.
pub trait StdSocket: AsRawFd + AsFd + Send + Sync + 'static {
    /// Reads what the socket holds, up to `buf.len()` bytes.
    fn read_shared(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes what the socket takes of `bufs`.
    fn write_shared(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Closes the writing direction: the peer reads the end of the stream.
    fn shutdown_write(&self) -> io::Result<()>;
}

macro_rules! std_socket {
    ($socket:ty) => {
        impl StdSocket for $socket {
            fn read_shared(&self, buf: &mut [u8]) -> io::Result<usize> {
                (&mut &*self).read(buf)
            }
            fn write_shared(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                (&mut &*self).write_vectored(bufs)
            }
            fn shutdown_write(&self) -> io::Result<()> {
                self.shutdown(Shutdown::Write)
            }
        }
    };
}

std_socket!(std::net::TcpStream);
std_socket!(std::os::unix::net::UnixStream);

/// Splits a non-blocking socket into a reader and a writer (see the module docs). Call
/// it inside the runtime that will drive them.
pub fn split<S: StdSocket>(socket: S) -> io::Result<(BoxRead, BoxWrite)> {
    let (read, write, _) = halves(socket, false)?;
    Ok((read, write))
}

/// [`split`] for a node's end of its link: the reader's reads shared with a thread
/// that spins for its own reply ([`SharedReads`]) if `share`.
pub fn node_halves<S: StdSocket>(socket: S, share: bool) -> io::Result<Halves> {
    let (read, write, shared_reads) = halves(socket, share)?;
    Ok(Halves {
        read,
        write,
        shared_reads,
    })
}

fn halves<S: StdSocket>(
    socket: S,
    share: bool,
) -> io::Result<(BoxRead, BoxWrite, Option<Arc<SharedReads>>)> {
    let runtime = Handle::try_current().map_err(io::Error::other)?;
    let socket = Arc::new(socket);
    let (watched, shared) = if share {
        let (shared, epoll) = SharedReads::new(socket.as_raw_fd())?;
        (Watched::Epoll(epoll), Some(Arc::new(shared)))
    } else {
        (Watched::Socket(socket.clone()), None)
    };
    // SAFETY: the descriptor is the socket's, which the `Arc` keeps open, or the epoll
    // instance's, which `Watched` owns; neither changes.
    let watched = unsafe { AsyncFd::register_with_interest(watched, Interest::READABLE)? };
    Ok((
        Box::new(ReadHalf {
            socket: socket.clone(),
            watched,
            shared: shared.clone(),
        }),
        Box::new(WriteHalf {
            socket,
            writable: None,
            runtime,
        }),
        shared,
    ))
}

/// What the runtime watches for a read half: the socket itself, or, when its reads are
/// shared, an epoll instance that watches the socket and that a spinning thread can
/// mute ([`SharedReads::mute`]).
enum Watched<S> {
    Socket(Arc<S>),
    Epoll(OwnedFd),
}

impl<S: StdSocket> AsRawFd for Watched<S> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Watched::Socket(socket) => socket.as_raw_fd(),
            Watched::Epoll(epoll) => epoll.as_raw_fd(),
        }
    }
}

/// The read half: registered for reading only.
struct ReadHalf<S: StdSocket> {
    socket: Arc<S>,
    watched: AsyncFd<Watched<S>>,
    /// Every read goes through it, if the reads are shared (see [`SharedReads`]).
    shared: Option<Arc<SharedReads>>,
}

impl<S: StdSocket> AsyncRead for ReadHalf<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Bytes a spinning thread left for this task: no readiness event may come
            // for them.
            let read_now = this.shared.as_ref().is_some_and(|s| s.take_read_now());
            let mut ready = if read_now {
                None
            } else {
                match this.watched.poll_read_ready(cx) {
                    Poll::Ready(ready) => Some(ready?),
                    Poll::Pending => match &this.shared {
                        Some(shared) if shared.reader_waits(cx.waker()) => continue,
                        _ => return Poll::Pending,
                    },
                }
            };
            // SAFETY: the bytes are only written by the kernel's `read` (never read from
            // here), and only the `n` it reports are marked initialized below: the same
            // contract as tokio's own sockets. Zeroing the buffer first instead would cost
            // a pass over every large frame's buffer on each read.
            let unfilled = unsafe { &mut *(buf.unfilled_mut() as *mut [_] as *mut [u8]) };
            let len = unfilled.len();
            let socket = &this.socket;
            let attempt = match &this.shared {
                Some(shared) => {
                    shared.try_read(unfilled, |into| socket.read_shared(into), cx.waker())
                }
                None => Attempt::Read(socket.read_shared(unfilled)),
            };
            match attempt {
                Attempt::Read(Ok(n)) => {
                    // SAFETY: `read` initialized the first `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    // A short read emptied the socket: the next read would only find
                    // nothing, so wait for the next readiness event instead.
                    if n > 0 && n < len {
                        if let Some(ready) = &mut ready {
                            ready.clear_ready();
                        }
                    }
                    // Read without an event, and bytes may be left: the next read
                    // does not wait for one either.
                    if read_now && n == len {
                        if let Some(shared) = &this.shared {
                            shared.read_on();
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Attempt::Read(Err(e)) if e.kind() != io::ErrorKind::WouldBlock => {
                    return Poll::Ready(Err(e))
                }
                // Nothing there, or a spinning thread is taking its reply (it wakes
                // this task if it leaves bytes behind): wait for readiness.
                Attempt::Read(Err(_)) | Attempt::Busy => {
                    if let Some(ready) = &mut ready {
                        ready.clear_ready();
                    }
                }
            }
        }
    }
}

impl<S: StdSocket> Drop for ReadHalf<S> {
    fn drop(&mut self) {
        // Before the descriptors can close: no spinning thread reads or mutes them from
        // now on.
        if let Some(shared) = &self.shared {
            shared.close();
        }
    }
}

/// The write half: writes straight to the socket, and registers for writability only
/// while the socket buffer is full.
struct WriteHalf<S: StdSocket> {
    socket: Arc<S>,
    /// A second descriptor of the socket, registered for writability: there only while a
    /// write waits for room (dropped at the next flush).
    writable: Option<AsyncFd<OwnedFd>>,
    /// The runtime the registration belongs to: writes also come from threads outside it
    /// (a sync caller, a callback's thread).
    runtime: Handle,
}

impl<S: StdSocket> WriteHalf<S> {
    /// Runs `write` until it does not find the socket full, waiting for room between.
    fn poll_io<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&S) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            match write(&self.socket) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
            let writable = match &mut self.writable {
                Some(registered) => registered,
                None => {
                    let fd = self.socket.as_fd().try_clone_to_owned()?;
                    let _runtime = self.runtime.enter();
                    // SAFETY: the `OwnedFd` is the registration's own, open until it drops.
                    let registered =
                        unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE)? };
                    self.writable.insert(registered)
                }
            };
            let mut ready = ready!(writable.poll_write_ready(cx))?;
            // Room may have been made before the registration saw it: look again, and
            // wait for the next event only if the socket is still full.
            match write(&self.socket) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                done => return Poll::Ready(done),
            }
        }
    }
}

impl<S: StdSocket> AsyncWrite for WriteHalf<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_io(cx, |s| s.write_shared(&[IoSlice::new(buf)]))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |s| s.write_shared(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here. The batch is out: stop watching for room.
        self.get_mut().writable = None;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.writable = None;
        Poll::Ready(this.socket.shutdown_write())
    }
}

impl<S: StdSocket> Drop for WriteHalf<S> {
    fn drop(&mut self) {
        // As with tokio's halves: the peer sees the end of the stream once the writer is
        // gone, even while the reader still reads.
        let _ = self.socket.shutdown_write();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn pair() -> ((BoxRead, BoxWrite), (BoxRead, BoxWrite)) {
        let (a, b) = UnixStream::pair().expect("a socket pair");
        a.set_nonblocking(true).expect("non-blocking");
        b.set_nonblocking(true).expect("non-blocking");
        (
            split(a).expect("halves of a"),
            split(b).expect("halves of b"),
        )
    }

    #[tokio::test]
    async fn bytes_cross_both_ways() {
        let ((mut a_read, mut a_write), (mut b_read, mut b_write)) = pair();
        a_write.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b_read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        let parts = [IoSlice::new(b"po"), IoSlice::new(b"ng")];
        let n = b_write.write_vectored(&parts).await.unwrap();
        assert_eq!(n, 4);
        a_read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_waits_for_room_and_the_peer_reads_everything() {
        // Far more than a socket buffer holds: the writer finds the socket full many
        // times, and must be woken each time the reader makes room.
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let ((_a_read, mut a_write), (mut b_read, _b_write)) = pair();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a_write.write_all(&sent).await?;
            a_write.flush().await?;
            // Dropping the writer ends the stream for the peer.
            drop(a_write);
            Ok::<_, io::Error>(())
        });
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            b_read.read_to_end(&mut got),
        )
        .await
        .expect("the whole stream within 30 s")
        .unwrap();
        assert_eq!(read, data.len());
        assert!(got == data, "the bytes arrived changed");
        writer.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_outside_the_runtime_can_wait_for_room() {
        // A sync caller writes from its own thread: waiting for room registers the
        // socket with the runtime the halves were made in.
        let data = vec![7u8; 4 * 1024 * 1024];
        let ((_a_read, mut a_write), (mut b_read, _b_write)) = pair();
        let len = data.len();
        let writer = std::thread::spawn(move || {
            crate::blocking::park(async move {
                a_write.write_all(&data).await?;
                a_write.flush().await
            })
        });
        let mut got = vec![0u8; len];
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            b_read.read_exact(&mut got),
        )
        .await
        .expect("everything within 30 s")
        .unwrap();
        assert!(got.iter().all(|&b| b == 7));
        writer.join().expect("the writer thread").unwrap();
    }

    #[tokio::test]
    async fn a_closed_peer_ends_the_stream_and_fails_writes() {
        let ((mut a_read, mut a_write), b) = pair();
        drop(b);
        let mut buf = [0u8; 16];
        assert_eq!(a_read.read(&mut buf).await.unwrap(), 0);
        let mut failed = None;
        // The first write may still be taken by the kernel; a later one fails.
        for _ in 0..16 {
            if let Err(e) = a_write.write_all(&[0u8; 1024]).await {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("writing to a closed peer fails");
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
