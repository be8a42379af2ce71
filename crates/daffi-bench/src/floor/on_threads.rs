//! The threads floor: blocking std threads and `std::net` sockets, no runtime at all.
//!
//! The client runs every command on its main thread; the server answers on one thread;
//! the relay reads each connection on a thread of its own and writes into the
//! destination's socket under a lock. Two variants:
//! - **batched**: writes go to a `BufWriter`, flushed when the writer has no more frames
//!   already read waiting behind this one (its read buffer is empty);
//! - **direct**: one write call per frame (header and a small payload copied together).
//!
//! Over a Unix socket every read first waits in `poll(2)` for data (see [`poll_first`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi_wire::frame::{peek_dst, LEN_PREFIX};
use daffi_wire::{Frame, Kind};

use super::{
    check_len_reply, check_welcome, count_in, hello, name_of_hello, reply_header, request_header,
    welcome, Answers, COPY_THRESHOLD, COUNT, SMALL_ARGS,
};
use crate::ops::{self, BlobAnswer, LatencyAnswer, Op, RateAnswer, RateMode};
use crate::proc::{answer, not_a_socket, Endpoint, Result};
use crate::report::Percentiles;
use crate::roles::wait_for_stdin_eof;

/// Read and write buffer of every socket: daffi's batch limit.
const BUFFER: usize = 64 * 1024;

/// A connected socket, TCP or Unix.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(endpoint: &Endpoint) -> std::io::Result<Stream> {
        match endpoint {
            Endpoint::Tcp(host, port) => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Endpoint::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
            Endpoint::Nats(url) => Err(not_a_socket(url)),
        }
    }

    /// Shuts both directions: a thread blocked reading it returns.
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(&limit) = SPIN.get() {
            spin_until_readable(self, limit);
        }
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => {
                if poll_first() {
                    wait_readable(s)?;
                }
                s.read(buf)
            }
        }
    }
}

/// A reply passed from the client's reader thread to its main thread, which spins
/// (yielding) until it is in (see [`Client::latency_read_by_a_thread`]).
#[derive(Default)]
struct Handoff {
    slot: Mutex<Option<Result<Frame>>>,
    ready: std::sync::atomic::AtomicBool,
}

impl Handoff {
    fn put(&self, reply: Result<Frame>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(reply);
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    fn take(&self) -> Result<Frame> {
        use std::sync::atomic::Ordering;
        while !self.ready.swap(false, Ordering::Acquire) {
            std::thread::yield_now();
        }
        let reply = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        reply.ok_or("the reader thread handed over no reply")?
    }
}

/// How long a read polls for data before it blocks: set in the client of the spinning
/// floor only (see [`spin_before_blocking`]).
static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// See [`super::spin_before_blocking`].
pub fn spin_before_blocking(limit: Duration) {
    if !limit.is_zero() {
        let _ = SPIN.set(limit);
    }
}

/// Polls `stream` (without waiting) until it has data or `limit` passed: what a client
/// that spins before it blocks does.
fn spin_until_readable(stream: &Stream, limit: Duration) {
    use std::os::fd::AsRawFd;
    let fd = match stream {
        Stream::Tcp(s) => s.as_raw_fd(),
        Stream::Unix(s) => s.as_raw_fd(),
    };
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Elapsed against the limit, not `now + limit`: any `--spin-us` is a valid span.
    let started = Instant::now();
    while started.elapsed() < limit {
        // SAFETY: one valid pollfd, for a descriptor the stream keeps open; a zero
        // timeout never waits.
        if unsafe { libc::poll(&mut poll, 1, 0) } != 0 {
            return;
        }
        for _ in 0..16 {
            std::hint::spin_loop();
        }
    }
}

/// Whether a read from a Unix socket first waits in `poll(2)` for data: yes, unless
/// `DAFFI_FLOOR_POLL=0` (the floor as it was before, for comparison).
///
/// A thread blocked in `recv` on a Unix stream socket sleeps on the socket's one wait
/// queue, and the kernel wakes that queue also when the peer reads what this side wrote
/// (`unix_write_space`): the relay's reader of a connection is woken each time the peer
/// reads a frame the relay wrote there, and so are the client and the server, blocked
/// in `recv` while the relay reads their frame. Half a wake-up or more per frame for
/// nothing, which spread the floor over both vCPUs of a small machine. `poll` for
/// `POLLIN` is woken only for data. TCP has no such wake-up (it wakes a writer only
/// once a write found the buffer full), so TCP reads do not poll. See BENCHMARKS.md,
/// "A over TCP: what differs from Unix sockets".
fn poll_first() -> bool {
    static POLL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POLL.get_or_init(|| std::env::var_os("DAFFI_FLOOR_POLL").map_or(true, |v| v != "0"))
}

/// Blocks until `socket` has data to read (or is closed, or failed: the read says which).
fn wait_readable(socket: &UnixStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, for a descriptor the socket keeps open.
        if unsafe { libc::poll(&mut fd, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn bind(endpoint: &Endpoint) -> std::io::Result<(Listener, Endpoint)> {
        match endpoint {
            Endpoint::Tcp(host, port) => {
                let l = TcpListener::bind((host.as_str(), *port))?;
                let bound = l.local_addr()?;
                let endpoint = Endpoint::Tcp(bound.ip().to_string(), bound.port());
                Ok((Listener::Tcp(l), endpoint))
            }
            Endpoint::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)?;
                Ok((Listener::Unix(l, path.clone()), endpoint.clone()))
            }
            Endpoint::Nats(url) => Err(not_a_socket(url)),
        }
    }

    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Reads frames off a socket, blocking.
struct Frames {
    reader: BufReader<Stream>,
    max_frame_size: usize,
}

impl Frames {
    fn new(stream: Stream, max_frame_size: usize) -> Frames {
        Frames {
            reader: BufReader::with_capacity(BUFFER, stream),
            max_frame_size,
        }
    }

    /// The next frame's bytes, length prefix included; `None` at a clean end.
    fn next_raw(&mut self) -> Result<Option<Bytes>> {
        let mut prefix = [0u8; LEN_PREFIX];
        if self.reader.fill_buf()?.is_empty() {
            return Ok(None);
        }
        self.reader.read_exact(&mut prefix)?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max_frame_size {
            return Err(format!("a {len}-byte frame is over the limit").into());
        }
        let mut raw = vec![0u8; LEN_PREFIX + len];
        raw[..LEN_PREFIX].copy_from_slice(&prefix);
        self.reader.read_exact(&mut raw[LEN_PREFIX..])?;
        Ok(Some(Bytes::from(raw)))
    }

    fn next(&mut self) -> Result<Option<Frame>> {
        match self.next_raw()? {
            Some(raw) => Ok(Some(Frame::parse(raw)?)),
            None => Ok(None),
        }
    }

    /// Whether frames already read wait behind the last one: time to flush if not.
    fn drained(&self) -> bool {
        self.reader.buffer().is_empty()
    }
}

/// Where one thread's frames go.
struct Writer {
    out: BufWriter<Stream>,
    batched: bool,
}

impl Writer {
    fn new(stream: Stream, batched: bool) -> Writer {
        Writer {
            out: BufWriter::with_capacity(BUFFER, stream),
            batched,
        }
    }

    /// Writes a frame: into the buffer when batched (flushed by [`Writer::flush_if`]),
    /// else at once, with one write call unless the payload is large.
    fn frame(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<()> {
        if self.batched {
            self.out.write_all(head)?;
            return self.out.write_all(body);
        }
        let socket = self.out.get_mut();
        if body.is_empty() {
            socket.write_all(head)
        } else if body.len() <= COPY_THRESHOLD {
            let mut joined = Vec::with_capacity(head.len() + body.len());
            joined.extend_from_slice(head);
            joined.extend_from_slice(body);
            socket.write_all(&joined)
        } else {
            socket.write_all(head)?;
            socket.write_all(body)
        }
    }

    /// Flushes when `drained`: nothing more is ready to go out with it.
    fn flush_if(&mut self, drained: bool) -> std::io::Result<()> {
        if drained {
            self.out.flush()?;
        }
        Ok(())
    }
}

type Route = Arc<Mutex<Writer>>;
type Routes = Arc<RwLock<HashMap<String, Route>>>;

fn lock(route: &Route) -> MutexGuard<'_, Writer> {
    route.lock().unwrap_or_else(|p| p.into_inner())
}

/// The relay process: prints `ready <endpoint>`, routes until stdin closes.
pub fn relay(listen: &Endpoint, batched: bool, max_frame_size: usize) -> Result<()> {
    let (listener, bound) = Listener::bind(listen)?;
    println!("ready {bound}");
    let routes: Routes = Arc::default();
    std::thread::spawn(move || loop {
        let accepted = listener.accept();
        let routes = routes.clone();
        std::thread::spawn(move || {
            let session = accepted
                .map_err(Into::into)
                .and_then(|s| relay_session(s, routes, batched, max_frame_size));
            if let Err(e) = session {
                eprintln!("threads floor relay: a connection failed: {e}");
            }
        });
    });
    // The process ends here, its threads with it.
    wait_for_stdin_eof();
    Ok(())
}

fn relay_session(
    stream: Stream,
    routes: Routes,
    batched: bool,
    max_frame_size: usize,
) -> Result<()> {
    let write = stream.try_clone()?;
    let mut frames = Frames::new(stream, max_frame_size);
    let name = name_of_hello(frames.next()?)?;
    let own: Route = Arc::new(Mutex::new(Writer::new(write, batched)));
    {
        let mut w = lock(&own);
        w.frame(&welcome(), &[])?;
        w.flush_if(true)?;
    }
    write_routes(&routes).insert(name.clone(), own);
    let result = forward_all(&mut frames, &routes);
    write_routes(&routes).remove(&name);
    result
}

/// Forwards every frame to its `dst`, flushing the destinations written to whenever no
/// more frames are already read.
fn forward_all(frames: &mut Frames, routes: &Routes) -> Result<()> {
    let mut unflushed: Vec<Route> = Vec::new();
    while let Some(raw) = frames.next_raw()? {
        let dst = peek_dst(&raw).ok_or("a frame shorter than its header")?;
        let route = std::str::from_utf8(dst)
            .ok()
            .and_then(|dst| read_routes(routes).get(dst).cloned());
        // A peer that is gone loses the frame, as in daffi.
        if let Some(route) = route {
            let _ = lock(&route).frame(&raw, &[]);
            if !unflushed.iter().any(|r| Arc::ptr_eq(r, &route)) {
                unflushed.push(route);
            }
        }
        if frames.drained() {
            for route in unflushed.drain(..) {
                let _ = lock(&route).flush_if(true);
            }
        }
    }
    Ok(())
}

fn read_routes(routes: &Routes) -> std::sync::RwLockReadGuard<'_, HashMap<String, Route>> {
    routes.read().unwrap_or_else(|p| p.into_inner())
}

fn write_routes(routes: &Routes) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Route>> {
    routes.write().unwrap_or_else(|p| p.into_inner())
}

/// Connects to the relay and names the connection; returns once the relay answered.
fn join(
    endpoint: &Endpoint,
    name: &str,
    batched: bool,
    max_frame_size: usize,
) -> Result<(Frames, Writer)> {
    let stream = Stream::connect(endpoint)?;
    let mut writer = Writer::new(stream.try_clone()?, batched);
    writer.frame(&hello(name), &[])?;
    writer.flush_if(true)?;
    let mut frames = Frames::new(stream, max_frame_size);
    check_welcome(frames.next()?)?;
    Ok((frames, writer))
}

/// The server process: answers every request at once, counts one-way ones.
pub fn server(connect: &Endpoint, name: &str, batched: bool, max_frame_size: usize) -> Result<()> {
    let (frames, writer) = join(connect, name, batched, max_frame_size)?;
    println!("ready");
    let name = name.to_string();
    std::thread::spawn(move || {
        if let Err(e) = serve(frames, writer, &name) {
            eprintln!("threads floor server: {e}");
        }
    });
    wait_for_stdin_eof();
    Ok(())
}

fn serve(mut frames: Frames, mut writer: Writer, name: &str) -> Result<()> {
    let mut answers = Answers::default();
    while let Some(frame) = frames.next()? {
        if let Some(body) = answers.to(&frame) {
            let head = reply_header(&frame, name).encode(body.len());
            writer.frame(&head, &body)?;
        }
        writer.flush_if(frames.drained())?;
    }
    Ok(())
}

/// The client process: runs the parent's commands against the server.
pub fn client(
    connect: &Endpoint,
    name: &str,
    server: &str,
    batched: bool,
    max_frame_size: usize,
) -> Result<()> {
    let (frames, writer) = join(connect, name, batched, max_frame_size)?;
    let mut client = Client {
        frames,
        writer,
        name: name.to_string(),
        server: server.to_string(),
        next_id: 0,
        blob: Vec::new(),
    };
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match serde_json::from_str::<Op>(&line) {
            Ok(op) => client.run(op),
            Err(e) => answer::<()>(Err(format!("bad command {line:?}: {e}").into())),
        };
        println!("{reply}");
    }
    Ok(())
}

struct Client {
    frames: Frames,
    writer: Writer,
    name: String,
    server: String,
    next_id: u64,
    blob: Vec<u8>,
}

impl Client {
    fn run(&mut self, op: Op) -> String {
        match op {
            Op::Latency { calls, warmup, .. } => answer(self.latency(calls, warmup)),
            Op::Rate {
                mode: RateMode::Pipelined,
                calls,
                in_flight,
            } => answer(self.pipelined(calls, in_flight)),
            Op::OneWay { calls, bytes } => answer(self.one_way(calls, bytes)),
            Op::Blob { bytes } => answer(self.blob(bytes)),
            other => answer::<()>(Err(format!("the floor does not do {other:?}").into())),
        }
    }

    /// Writes a request (into the buffer when batched); returns its call id.
    fn request(&mut self, callback: &str, body: &[u8], no_reply: bool) -> Result<u64> {
        self.next_id += 1;
        let header = request_header(self.next_id, &self.name, &self.server, callback, no_reply);
        self.writer.frame(&header.encode(body.len()), body)?;
        Ok(self.next_id)
    }

    /// Sends what is buffered.
    fn flush(&mut self) -> Result<()> {
        Ok(self.writer.flush_if(true)?)
    }

    fn reply(&mut self) -> Result<Frame> {
        match self.frames.next()? {
            Some(f) if f.kind() == Kind::Reply => Ok(f),
            Some(f) => Err(format!("unexpected {:?} frame", f.kind()).into()),
            None => Err("the relay closed the connection".into()),
        }
    }

    fn round_trip(&mut self, callback: &str, body: &[u8]) -> Result<Frame> {
        let id = self.request(callback, body, false)?;
        self.flush()?;
        let reply = self.reply()?;
        if reply.call_id() != id {
            return Err(format!("reply to call {} while waiting for {id}", reply.call_id()).into());
        }
        Ok(reply)
    }

    fn latency(&mut self, calls: usize, warmup: usize) -> Result<LatencyAnswer> {
        if std::env::var_os("DAFFI_FLOOR_READER_THREAD").is_some_and(|v| v == "1") {
            return self.latency_read_by_a_thread(calls, warmup);
        }
        for _ in 0..warmup {
            self.round_trip(ops::ADD, SMALL_ARGS)?;
        }
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            self.round_trip(ops::ADD, SMALL_ARGS)?;
            samples.push(t.elapsed());
        }
        Percentiles::of(&mut samples).ok_or_else(|| "no calls measured".into())
    }

    /// A's round trips with the replies read by a second thread, blocked in its read,
    /// which hands each to this one through a flag this one spins on (yielding): the
    /// shape of daffi's spinning sync caller, whose runtime worker reads the reply. The
    /// latency op of the client when `DAFFI_FLOOR_READER_THREAD=1` (a profiling aid; see
    /// BENCHMARKS.md, "A's gap by thread"). Run it without `--spin-us`: with it, the
    /// reader too would poll before it blocks, and two threads would spin.
    fn latency_read_by_a_thread(&mut self, calls: usize, warmup: usize) -> Result<LatencyAnswer> {
        let total = calls + warmup;
        let handoff = Handoff::default();
        let Client {
            frames,
            writer,
            name,
            server,
            next_id,
            ..
        } = self;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..total {
                    let reply = match frames.next() {
                        Ok(Some(f)) if f.kind() == Kind::Reply => Ok(f),
                        Ok(Some(f)) => Err(format!("unexpected {:?} frame", f.kind()).into()),
                        Ok(None) => Err("the relay closed the connection".into()),
                        Err(e) => Err(e),
                    };
                    let failed = reply.is_err();
                    handoff.put(reply);
                    if failed {
                        return;
                    }
                }
            });
            let mut samples = Vec::with_capacity(calls);
            let mut round_trip = || -> Result<Duration> {
                let t = Instant::now();
                *next_id += 1;
                let header = request_header(*next_id, name, server, ops::ADD, false);
                writer.frame(&header.encode(SMALL_ARGS.len()), SMALL_ARGS)?;
                writer.flush_if(true)?;
                let reply = handoff.take()?;
                if reply.call_id() != *next_id {
                    return Err(format!(
                        "reply to call {} while waiting for {next_id}",
                        reply.call_id()
                    )
                    .into());
                }
                Ok(t.elapsed())
            };
            for i in 0..total {
                match round_trip() {
                    Ok(took) if i >= warmup => samples.push(took),
                    Ok(_) => {}
                    Err(e) => {
                        // The reader may be blocked in its read: end it.
                        writer.out.get_ref().shutdown();
                        return Err(e);
                    }
                }
            }
            Percentiles::of(&mut samples).ok_or_else(|| "no calls measured".into())
        })
    }

    /// Keeps `in_flight` requests outstanding: a request is written for each reply,
    /// and the buffer is flushed when no more replies are already read.
    fn pipelined(&mut self, calls: usize, in_flight: usize) -> Result<RateAnswer> {
        let started = Instant::now();
        let mut sent = 0;
        while sent < in_flight.max(1).min(calls) {
            self.request(ops::ADD, SMALL_ARGS, false)?;
            sent += 1;
        }
        self.flush()?;
        for _ in 0..calls {
            self.reply()?;
            if sent < calls {
                self.request(ops::ADD, SMALL_ARGS, false)?;
                sent += 1;
            }
            self.writer.flush_if(self.frames.drained())?;
        }
        Ok(RateAnswer {
            calls_per_s: calls as f64 / started.elapsed().as_secs_f64(),
            lost: 0,
        })
    }

    fn one_way(&mut self, calls: usize, bytes: usize) -> Result<RateAnswer> {
        let body = vec![0xA5u8; bytes];
        let started = Instant::now();
        for _ in 0..calls {
            self.request(ops::SINK, &body, true)?;
        }
        let reply = self.round_trip(COUNT, &[])?;
        let secs = started.elapsed().as_secs_f64();
        let counted = count_in(&reply)?;
        Ok(RateAnswer {
            calls_per_s: counted as f64 / secs,
            lost: (calls as u64).saturating_sub(counted),
        })
    }

    fn blob(&mut self, bytes: usize) -> Result<BlobAnswer> {
        if self.blob.len() != bytes {
            self.blob = Vec::new();
            self.blob = vec![0xA5u8; bytes];
        }
        let started = Instant::now();
        let blob = std::mem::take(&mut self.blob);
        let reply = self.round_trip(ops::LEN, &blob);
        self.blob = blob;
        let secs = started.elapsed().as_secs_f64();
        check_len_reply(&reply?)?;
        Ok(BlobAnswer {
            mib_per_s: ops::mib_per_s(bytes, secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daffi_wire::Header;

    #[test]
    fn frames_survive_both_writers_and_the_reader() {
        for batched in [true, false] {
            let (a, b) = UnixStream::pair().expect("socket pair");
            let mut writer = Writer::new(Stream::Unix(a), batched);
            let big = vec![7u8; 100_000];
            for (i, body) in [&b"small"[..], &big].into_iter().enumerate() {
                let mut h = Header::control(Kind::Request);
                h.call_id = i as u64;
                writer.frame(&h.encode(body.len()), body).expect("write");
            }
            writer.flush_if(true).expect("flush");
            drop(writer);
            let mut frames = Frames::new(Stream::Unix(b), 1 << 20);
            let first = frames.next().expect("read").expect("frame");
            assert_eq!(&first.payload()[..], b"small");
            let second = frames.next().expect("read").expect("frame");
            assert_eq!((second.call_id(), &second.payload()[..]), (1, &big[..]));
            assert!(frames.next().expect("clean end").is_none());
        }
    }
}
