//! The tokio floor: tasks on a 2-worker runtime, as daffi runs.
//!
//! Two variants:
//! - **batched**: one writer task per connection drains its queue into one buffer and
//!   one write call ([`write_loop`]), as daffi does;
//! - **direct**: the task that has a frame writes it itself, one write per frame, with no
//!   queue and no writer task.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use daffi_wire::reader::KEEP_LARGE_BUFFERS;
use daffi_wire::{Frame, FrameReader, Kind, Outgoing};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::write_loop::write_loop;
use super::{
    check_len_reply, check_welcome, count_in, hello, name_of_hello, reply_header, request_header,
    welcome, Answers, COPY_THRESHOLD, COUNT, SMALL_ARGS,
};
use crate::ops::{self, BlobAnswer, LatencyAnswer, Op, RateAnswer, RateMode};
use crate::proc::{answer, not_a_socket, BoxError, Endpoint, Result};
use crate::report::Percentiles;
use crate::roles::{runtime, wait_for_stdin_eof};

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Frames queued per connection (daffi's queue size).
const QUEUE_CAPACITY: usize = 4096;

async fn connect(endpoint: &Endpoint) -> std::io::Result<(BoxRead, BoxWrite)> {
    match endpoint {
        Endpoint::Tcp(host, port) => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await?;
            let (r, w) = s.into_split();
            Ok((Box::new(r), Box::new(w)))
        }
        Endpoint::Nats(url) => Err(not_a_socket(url)),
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

impl Listener {
    async fn bind(endpoint: &Endpoint) -> std::io::Result<(Listener, Endpoint)> {
        match endpoint {
            Endpoint::Tcp(host, port) => {
                let l = tokio::net::TcpListener::bind((host.as_str(), *port)).await?;
                let bound = l.local_addr()?;
                Ok((
                    Listener::Tcp(l),
                    Endpoint::Tcp(bound.ip().to_string(), bound.port()),
                ))
            }
            Endpoint::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = tokio::net::UnixListener::bind(path)?;
                Ok((Listener::Unix(l, path.clone()), endpoint.clone()))
            }
            Endpoint::Nats(url) => Err(not_a_socket(url)),
        }
    }

    async fn accept(&self) -> std::io::Result<(BoxRead, BoxWrite)> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
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

/// Writes one frame with as few write calls as the frame allows.
async fn write_frame(w: &mut BoxWrite, frame: &Outgoing) -> std::io::Result<()> {
    // The floor's payloads are one part each: this is that part, not a copy.
    let body = frame.body().to_bytes();
    if body.is_empty() {
        w.write_all(frame.head()).await
    } else if body.len() <= COPY_THRESHOLD {
        let mut buf = BytesMut::with_capacity(frame.len());
        buf.extend_from_slice(frame.head());
        buf.extend_from_slice(&body);
        w.write_all(&buf).await
    } else {
        w.write_all(frame.head()).await?;
        w.write_all(&body).await
    }
}

/// Where one task's frames go: its own writer task's queue, or the socket itself.
enum Writer {
    Batched(mpsc::Sender<Outgoing>),
    Direct(BoxWrite),
}

impl Writer {
    fn new(write: BoxWrite, batched: bool) -> Writer {
        if batched {
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            tokio::spawn(write_loop(write, rx));
            Writer::Batched(tx)
        } else {
            Writer::Direct(write)
        }
    }

    async fn send(&mut self, frame: Outgoing) -> std::io::Result<()> {
        match self {
            Writer::Batched(queue) => queue
                .send(frame)
                .await
                .map_err(|_| std::io::Error::other("the writer task ended")),
            Writer::Direct(w) => write_frame(w, &frame).await,
        }
    }
}

/// A connection's route in the relay.
#[derive(Clone)]
enum Route {
    Batched(mpsc::Sender<Outgoing>),
    Direct(Arc<tokio::sync::Mutex<BoxWrite>>),
}

impl Route {
    async fn forward(&self, raw: Bytes) -> std::io::Result<()> {
        match self {
            Route::Batched(queue) => queue
                .send(Outgoing::raw(raw))
                .await
                .map_err(|_| std::io::Error::other("the writer task ended")),
            Route::Direct(w) => w.lock().await.write_all(&raw).await,
        }
    }
}

type Routes = Arc<RwLock<HashMap<String, Route>>>;

/// The relay process: prints `ready <endpoint>`, routes until stdin closes.
pub fn relay(listen: &Endpoint, batched: bool, max_frame_size: usize) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let (listener, bound) = Listener::bind(listen).await?;
        println!("ready {bound}");
        let routes: Routes = Arc::default();
        let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            wait_for_stdin_eof();
            let _ = closed_tx.send(());
        });
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (read, write) = accepted?;
                    let routes = routes.clone();
                    tokio::spawn(async move {
                        if let Err(e) = relay_session(read, write, routes, batched, max_frame_size).await {
                            eprintln!("floor relay: a connection failed: {e}");
                        }
                    });
                }
                _ = &mut closed => break,
            }
        }
        Ok::<(), BoxError>(())
    })?;
    // Do not wait for sessions: the process ends here.
    rt.shutdown_background();
    Ok(())
}

async fn relay_session(
    read: BoxRead,
    write: BoxWrite,
    routes: Routes,
    batched: bool,
    max_frame_size: usize,
) -> Result<()> {
    let mut reader = FrameReader::new(read, max_frame_size).keep_large_buffers(KEEP_LARGE_BUFFERS);
    let name = name_of_hello(reader.next().await?)?;
    let route = if batched {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(write_loop(write, rx));
        Route::Batched(tx)
    } else {
        Route::Direct(Arc::new(tokio::sync::Mutex::new(write)))
    };
    route.forward(welcome()).await?;
    write_routes(&routes).insert(name.clone(), route);
    let result = async {
        while let Some(frame) = reader.next().await? {
            let route = read_routes(&routes).get(frame.dst()).cloned();
            if let Some(route) = route {
                // A peer that is gone loses the frame, as in daffi.
                let _ = route.forward(frame.raw().clone()).await;
            }
        }
        Ok::<(), BoxError>(())
    }
    .await;
    write_routes(&routes).remove(&name);
    result
}

fn read_routes(routes: &Routes) -> std::sync::RwLockReadGuard<'_, HashMap<String, Route>> {
    routes.read().unwrap_or_else(|p| p.into_inner())
}

fn write_routes(routes: &Routes) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Route>> {
    routes.write().unwrap_or_else(|p| p.into_inner())
}

/// Connects to the relay and names the connection; returns once the relay answered.
async fn join(
    endpoint: &Endpoint,
    name: &str,
    max_frame_size: usize,
) -> Result<(FrameReader<BoxRead>, BoxWrite)> {
    let (read, mut write) = connect(endpoint).await?;
    write.write_all(&hello(name)).await?;
    let mut reader = FrameReader::new(read, max_frame_size).keep_large_buffers(KEEP_LARGE_BUFFERS);
    check_welcome(reader.next().await?)?;
    Ok((reader, write))
}

/// The server process: answers every request at once, counts one-way ones.
pub fn server(connect: &Endpoint, name: &str, batched: bool, max_frame_size: usize) -> Result<()> {
    let rt = runtime()?;
    let name = name.to_string();
    rt.block_on(async {
        let (reader, write) = join(connect, &name, max_frame_size).await?;
        println!("ready");
        let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            wait_for_stdin_eof();
            let _ = closed_tx.send(());
        });
        tokio::select! {
            served = serve(reader, Writer::new(write, batched), &name) => served,
            _ = closed => Ok(()),
        }
    })?;
    rt.shutdown_background();
    Ok(())
}

async fn serve(mut reader: FrameReader<BoxRead>, mut writer: Writer, name: &str) -> Result<()> {
    let mut answers = Answers::default();
    while let Some(frame) = reader.next().await? {
        if let Some(body) = answers.to(&frame) {
            let header = reply_header(&frame, name);
            writer.send(Outgoing::new(&header, body)).await?;
        }
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
    use std::io::BufRead;
    let rt = runtime()?;
    let mut client = rt.block_on(async {
        let (reader, write) = join(connect, name, max_frame_size).await?;
        Ok::<_, BoxError>(Client {
            reader,
            writer: Writer::new(write, batched),
            name: name.to_string(),
            server: server.to_string(),
            next_id: 0,
            blob: Bytes::new(),
        })
    })?;
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match serde_json::from_str::<Op>(&line) {
            Ok(op) => rt.block_on(client.run(op)),
            Err(e) => answer::<()>(Err(format!("bad command {line:?}: {e}").into())),
        };
        println!("{reply}");
    }
    rt.shutdown_background();
    Ok(())
}

struct Client {
    reader: FrameReader<BoxRead>,
    writer: Writer,
    name: String,
    server: String,
    next_id: u64,
    blob: Bytes,
}

impl Client {
    async fn run(&mut self, op: Op) -> String {
        match op {
            Op::Latency { calls, warmup, .. } => answer(self.latency(calls, warmup).await),
            Op::Rate {
                mode: RateMode::Pipelined,
                calls,
                in_flight,
            } => answer(self.pipelined(calls, in_flight).await),
            Op::OneWay { calls, bytes } => answer(self.one_way(calls, bytes).await),
            Op::Blob { bytes } => answer(self.blob(bytes).await),
            other => answer::<()>(Err(format!("the floor does not do {other:?}").into())),
        }
    }

    /// Sends a request; returns its call id.
    async fn request(&mut self, callback: &str, body: Bytes, no_reply: bool) -> Result<u64> {
        self.next_id += 1;
        let header = request_header(self.next_id, &self.name, &self.server, callback, no_reply);
        self.writer.send(Outgoing::new(&header, body)).await?;
        Ok(self.next_id)
    }

    async fn reply(&mut self) -> Result<Frame> {
        match self.reader.next().await? {
            Some(f) if f.kind() == Kind::Reply => Ok(f),
            Some(f) => Err(format!("unexpected {:?} frame", f.kind()).into()),
            None => Err("the relay closed the connection".into()),
        }
    }

    async fn round_trip(&mut self, callback: &str, body: Bytes) -> Result<Frame> {
        let id = self.request(callback, body, false).await?;
        let reply = self.reply().await?;
        if reply.call_id() != id {
            return Err(format!("reply to call {} while waiting for {id}", reply.call_id()).into());
        }
        Ok(reply)
    }

    async fn latency(&mut self, calls: usize, warmup: usize) -> Result<LatencyAnswer> {
        let args = Bytes::from_static(SMALL_ARGS);
        for _ in 0..warmup {
            self.round_trip(ops::ADD, args.clone()).await?;
        }
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            self.round_trip(ops::ADD, args.clone()).await?;
            samples.push(t.elapsed());
        }
        Percentiles::of(&mut samples).ok_or_else(|| "no calls measured".into())
    }

    async fn pipelined(&mut self, calls: usize, in_flight: usize) -> Result<RateAnswer> {
        let args = Bytes::from_static(SMALL_ARGS);
        let started = Instant::now();
        let mut sent = 0;
        while sent < in_flight.max(1).min(calls) {
            self.request(ops::ADD, args.clone(), false).await?;
            sent += 1;
        }
        for _ in 0..calls {
            self.reply().await?;
            if sent < calls {
                self.request(ops::ADD, args.clone(), false).await?;
                sent += 1;
            }
        }
        Ok(RateAnswer {
            calls_per_s: calls as f64 / started.elapsed().as_secs_f64(),
            lost: 0,
        })
    }

    async fn one_way(&mut self, calls: usize, bytes: usize) -> Result<RateAnswer> {
        let body = Bytes::from(vec![0xA5u8; bytes]);
        let started = Instant::now();
        for _ in 0..calls {
            self.request(ops::SINK, body.clone(), true).await?;
        }
        let reply = self.round_trip(COUNT, Bytes::new()).await?;
        let secs = started.elapsed().as_secs_f64();
        let counted = count_in(&reply)?;
        Ok(RateAnswer {
            calls_per_s: counted as f64 / secs,
            lost: (calls as u64).saturating_sub(counted),
        })
    }

    async fn blob(&mut self, bytes: usize) -> Result<BlobAnswer> {
        if self.blob.len() != bytes {
            self.blob = Bytes::new();
            self.blob = Bytes::from(vec![0xA5u8; bytes]);
        }
        let started = Instant::now();
        let reply = self.round_trip(ops::LEN, self.blob.clone()).await?;
        let secs = started.elapsed().as_secs_f64();
        check_len_reply(&reply)?;
        Ok(BlobAnswer {
            mib_per_s: ops::mib_per_s(bytes, secs),
        })
    }
}
