//! The daffi processes of the benchmark: controller, callee, caller, a swarm of idle
//! nodes, and one idle node. Each prints `ready ...` once it can be used, and exits when
//! its stdin closes.
//!
//! The callee registers its callbacks with `Global::register` (not `#[callback]`, which
//! would make every node of the `daffi` binary serve them).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Read};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use daffi::{Blob, Global, Reply};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;
use tokio::sync::Notify;

use super::ops::{
    self, BlobAnswer, ByteKind, CallStyle, LatencyAnswer, Op, RateAnswer, RateMode, WaitAnswer,
};
use super::proc::{answer, BoxError, Endpoint, Result};
use super::report::Percentiles;

/// How long a caller waits for its callees to be announced.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the sink waits for fire-and-forget calls still on their way.
const SINK_TIMEOUT: Duration = Duration::from_secs(60);

/// Blocks until stdin reaches its end (the parent closed it, or died).
pub fn wait_for_stdin_eof() {
    let _ = std::io::stdin().lock().read_to_end(&mut Vec::new());
}

/// The runtime of a benchmark process: what `Global::builder().start()` makes (two
/// workers), so that sync and async callers share one.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Connections the benchmark's controller takes.
const BENCH_MAX_CONNECTIONS: usize = 50_000;

/// A daffi controller alone in its process, like `daffi controller`.
pub fn controller(
    listen: &Endpoint,
    max_frame_size: Option<usize>,
    linger_us: Option<u64>,
) -> Result<()> {
    // Scenario E connects 10,000 nodes and more: past the default limit.
    let mut b = listen
        .builder()
        .init_controller(true)
        .init_node(false)
        .max_connections(BENCH_MAX_CONNECTIONS);
    if let Some(limit) = max_frame_size {
        b = b.max_frame_size(limit);
    }
    if let Some(us) = linger_us {
        b = b.controller_linger(std::time::Duration::from_micros(us));
    }
    let g = b.start()?;
    println!("ready {}", Endpoint::of_address(g.address())?);
    wait_for_stdin_eof();
    g.stop();
    Ok(())
}

/// Counts fire-and-forget calls and wakes the waiter once enough came.
struct Sink {
    count: AtomicU64,
    want: AtomicU64,
    reached: Notify,
}

impl Sink {
    fn hit(&self) {
        let seen = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if seen >= self.want.load(Ordering::Acquire) {
            self.reached.notify_one();
        }
    }

    /// Waits until `n` calls were counted (then takes them off the count), or until
    /// the timeout; returns how many were counted.
    async fn wait(&self, n: u64) -> u64 {
        self.want.store(n, Ordering::Release);
        let deadline = tokio::time::Instant::now() + SINK_TIMEOUT;
        loop {
            let seen = self.count.load(Ordering::Acquire);
            if seen >= n {
                self.count.fetch_sub(n, Ordering::AcqRel);
                self.want.store(u64::MAX, Ordering::Release);
                return n;
            }
            // `notify_one` keeps a permit when nobody waits: a hit between the check
            // and this wait is not missed.
            if tokio::time::timeout_at(deadline, self.reached.notified())
                .await
                .is_err()
            {
                self.want.store(u64::MAX, Ordering::Release);
                return self.count.swap(0, Ordering::AcqRel);
            }
        }
    }
}

/// The byte string the result callbacks return, prepared before any of them is timed.
#[derive(Default)]
struct Prepared(Mutex<&'static [u8]>);

impl Prepared {
    /// Makes the buffer `n` bytes long; answers its length. Each new size leaks one
    /// buffer, so that `&'static [u8]` results exist: C starts fresh processes per size.
    fn prepare(&self, n: u64) -> u64 {
        let mut buffer = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if buffer.len() as u64 != n {
            *buffer = Vec::leak(vec![0xA5u8; n as usize]);
        }
        buffer.len() as u64
    }

    fn get(&self) -> &'static [u8] {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Registers the callbacks that return the prepared bytes, one per [`ByteKind`]: `Blob`
/// and `Bytes` refer to the buffer (no copy), `Vec<u8>`, `ByteBuf` and the fresh `Blob`
/// are fresh copies of it (as a callee that makes a fresh value pays for it),
/// `&'static [u8]` is the buffer itself.
fn register_results(g: &Global) -> Result<()> {
    let prepared = Arc::new(Prepared::default());
    let p = prepared.clone();
    g.register(ops::PREPARE, move |n: u64| p.prepare(n))?;
    let p = prepared.clone();
    g.register(&ByteKind::Blob.result_callback(), move || {
        Blob::from(p.get())
    })?;
    let p = prepared.clone();
    g.register(&ByteKind::FreshBlob.result_callback(), move || {
        Blob::from(p.get().to_vec())
    })?;
    let p = prepared.clone();
    g.register(&ByteKind::Vec.result_callback(), move || p.get().to_vec())?;
    let p = prepared.clone();
    g.register(&ByteKind::ByteBuf.result_callback(), move || {
        Reply(ByteBuf::from(p.get().to_vec()))
    })?;
    let p = prepared.clone();
    g.register(&ByteKind::Bytes.result_callback(), move || {
        Bytes::from_static(p.get())
    })?;
    let p = prepared;
    g.register(&ByteKind::StaticSlice.result_callback(), move || p.get())?;
    Ok(())
}

/// A node serving the benchmark's callbacks.
pub fn callee(connect: &Endpoint, name: &str, max_frame_size: Option<usize>) -> Result<()> {
    let mut b = connect.builder().process_name(name);
    if let Some(limit) = max_frame_size {
        b = b.max_frame_size(limit);
    }
    let g = b.start()?;
    let sink = Arc::new(Sink {
        count: AtomicU64::new(0),
        want: AtomicU64::new(u64::MAX),
        reached: Notify::new(),
    });
    g.register(ops::ADD, |a: i64, b: i64| a + b)?;
    g.register(ops::LEN, |data: Blob| data.len() as u64)?;
    g.register(&ByteKind::Blob.echo_callback(), |data: Blob| data)?;
    g.register(&ByteKind::Vec.echo_callback(), |data: Vec<u8>| data)?;
    g.register(&ByteKind::ByteBuf.echo_callback(), |data: ByteBuf| {
        Reply(data)
    })?;
    g.register(&ByteKind::Bytes.echo_callback(), |data: Bytes| data)?;
    register_results(&g)?;
    g.register_stream(ops::STREAM_ITEMS, |n: u64| 0..n)?;
    g.register_stream(ops::STREAM_CHUNKS, |n: u64, bytes: u64| {
        let chunk = Blob::from(vec![0xA5u8; bytes as usize]);
        (0..n).map(move |_| chunk.clone())
    })?;
    let s = sink.clone();
    g.register(ops::SINK, move || s.hit())?;
    let s = sink.clone();
    g.register(ops::SINK_WAIT, move |n: u64| {
        let s = s.clone();
        async move { s.wait(n).await }
    })?;
    // Last: a caller that sees this one knows all of the above.
    g.register(&ops::ready_marker(name), || ())?;
    println!("ready");
    wait_for_stdin_eof();
    g.stop();
    Ok(())
}

/// A node that runs the parent's commands against the callees.
pub fn caller(
    connect: &Endpoint,
    name: &str,
    callees: &[String],
    max_frame_size: Option<usize>,
) -> Result<()> {
    let rt = runtime()?;
    let mut b = connect.builder().process_name(name);
    if let Some(limit) = max_frame_size {
        b = b.max_frame_size(limit);
    }
    let g = rt.block_on(b.start_async())?;
    for callee in callees {
        g.wait_function_timeout(&ops::ready_marker(callee), READY_TIMEOUT)?;
    }
    println!("ready");
    let mut caller = Caller {
        g: g.clone(),
        rt,
        blob: Blob::new(),
    };
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let reply = match serde_json::from_str::<Op>(&line) {
            Ok(op) => caller.run(op),
            Err(e) => answer::<()>(Err(format!("bad command {line:?}: {e}").into())),
        };
        println!("{reply}");
    }
    g.stop();
    Ok(())
}

struct Caller {
    g: Global,
    rt: tokio::runtime::Runtime,
    /// The payload of the last blob call, kept for the next repetition.
    blob: Blob,
}

impl Caller {
    /// Runs one command; returns the JSON answer.
    fn run(&mut self, op: Op) -> String {
        match op {
            Op::Latency {
                calls,
                warmup,
                style,
            } => answer(self.latency(calls, warmup, style)),
            Op::Rate {
                mode,
                calls,
                in_flight,
            } => answer(self.rate(mode, calls, in_flight)),
            Op::OneWay { calls, bytes: 0 } => answer(self.one_way(calls)),
            Op::OneWay { .. } => answer::<()>(Err("daffi's one-way calls carry no body".into())),
            Op::StreamItems { items } => answer(self.stream_items(items)),
            Op::StreamChunks { chunks, bytes } => answer(self.stream_chunks(chunks, bytes)),
            Op::Blob { bytes } => answer(self.blob(bytes)),
            Op::Echo { kind, bytes } => answer(self.echo(kind, bytes)),
            Op::Result { kind, bytes } => answer(self.result(kind, bytes)),
            Op::Broadcast {
                calls,
                warmup,
                nodes,
            } => answer(self.broadcast(calls, warmup, nodes)),
            Op::WaitNodes {
                groups,
                extra,
                timeout_s,
            } => answer(self.wait_nodes(&groups, &extra, timeout_s)),
        }
    }

    fn add(&self, i: usize) -> Result<()> {
        let sum: i64 = self.g.call(ops::ADD).args((i as i64, 1)).fg()?;
        check_sum(i, sum)
    }

    fn latency(&mut self, calls: usize, warmup: usize, style: CallStyle) -> Result<LatencyAnswer> {
        let mut samples = Vec::with_capacity(calls);
        match style {
            CallStyle::Fg => {
                for i in 0..warmup + calls {
                    let t = Instant::now();
                    self.add(i)?;
                    if i >= warmup {
                        samples.push(t.elapsed());
                    }
                }
            }
            CallStyle::FgAsync | CallStyle::BgAwait => {
                let g = &self.g;
                self.rt.block_on(async {
                    for i in 0..warmup + calls {
                        let t = Instant::now();
                        add_async(g, i, style).await?;
                        if i >= warmup {
                            samples.push(t.elapsed());
                        }
                    }
                    Ok::<(), BoxError>(())
                })?;
            }
        }
        Percentiles::of(&mut samples).ok_or_else(|| "no calls measured".into())
    }

    fn rate(&mut self, mode: RateMode, calls: usize, in_flight: usize) -> Result<RateAnswer> {
        let in_flight = in_flight.max(1);
        let started = Instant::now();
        match mode {
            RateMode::Bg => {
                let mut window = VecDeque::with_capacity(in_flight);
                for i in 0..calls {
                    if window.len() == in_flight {
                        if let Some(oldest) = window.pop_front() {
                            let _: i64 = daffi::AsyncResult::get(oldest)?;
                        }
                    }
                    window.push_back(self.g.call(ops::ADD).args((i as i64, 1)).bg::<i64>()?);
                }
                for pending in window {
                    let _: i64 = pending.get()?;
                }
            }
            RateMode::Async => {
                let g = self.g.clone();
                self.rt.block_on(async move {
                    let next = Arc::new(AtomicUsize::new(0));
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..in_flight {
                        let g = g.clone();
                        let next = next.clone();
                        tasks.spawn(async move {
                            while next.fetch_add(1, Ordering::Relaxed) < calls {
                                let _: i64 = g.call(ops::ADD).args((1i64, 2i64)).fg_async().await?;
                            }
                            Ok::<(), daffi::Error>(())
                        });
                    }
                    while let Some(done) = tasks.join_next().await {
                        done.map_err(|e| e.to_string())??;
                    }
                    Ok::<(), BoxError>(())
                })?;
            }
            RateMode::BgAwait => {
                let g = &self.g;
                self.rt.block_on(async {
                    let mut window = VecDeque::with_capacity(in_flight);
                    for i in 0..calls {
                        if window.len() == in_flight {
                            if let Some(oldest) = window.pop_front() {
                                let _: i64 = oldest.await?;
                            }
                        }
                        window.push_back(g.call(ops::ADD).args((i as i64, 1)).bg::<i64>()?);
                    }
                    for pending in window {
                        let _: i64 = pending.await?;
                    }
                    Ok::<(), daffi::Error>(())
                })?;
            }
            RateMode::Pipelined => return Err("pipelined is the floor's mode".into()),
        }
        Ok(RateAnswer {
            calls_per_s: calls as f64 / started.elapsed().as_secs_f64(),
            lost: 0,
        })
    }

    fn one_way(&mut self, calls: usize) -> Result<RateAnswer> {
        let started = Instant::now();
        for _ in 0..calls {
            self.g.call(ops::SINK).no_return()?;
        }
        let counted: u64 = self.g.call(ops::SINK_WAIT).args((calls as u64,)).fg()?;
        let secs = started.elapsed().as_secs_f64();
        Ok(RateAnswer {
            calls_per_s: counted as f64 / secs,
            lost: (calls as u64).saturating_sub(counted),
        })
    }

    /// Items per second of one stream of small items, read to the end.
    fn stream_items(&mut self, items: usize) -> Result<RateAnswer> {
        let started = Instant::now();
        let mut received = 0u64;
        for item in self
            .g
            .call(ops::STREAM_ITEMS)
            .args((items as u64,))
            .stream::<u64>()?
        {
            item?;
            received += 1;
        }
        Ok(RateAnswer {
            calls_per_s: received as f64 / started.elapsed().as_secs_f64(),
            lost: (items as u64).saturating_sub(received),
        })
    }

    /// MiB per second of one stream of `chunks` chunks of `bytes` bytes.
    fn stream_chunks(&mut self, chunks: usize, bytes: usize) -> Result<BlobAnswer> {
        let started = Instant::now();
        let mut received = 0usize;
        for chunk in self
            .g
            .call(ops::STREAM_CHUNKS)
            .args((chunks as u64, bytes as u64))
            .stream::<Blob>()?
        {
            received += chunk?.len();
        }
        if received != chunks * bytes {
            return Err(format!("a stream of {chunks} x {bytes} bytes brought {received}").into());
        }
        Ok(BlobAnswer {
            mib_per_s: ops::mib_per_s(received, started.elapsed().as_secs_f64()),
        })
    }

    fn blob(&mut self, bytes: usize) -> Result<BlobAnswer> {
        if self.blob.len() != bytes {
            self.blob = Blob::new(); // free the old one first
            self.blob = Blob::from(vec![0xA5u8; bytes]);
        }
        let started = Instant::now();
        let len: u64 = self.g.call(ops::LEN).args((self.blob.clone(),)).fg()?;
        let secs = started.elapsed().as_secs_f64();
        if len != bytes as u64 {
            return Err(format!("{} returned {len} for {bytes} bytes", ops::LEN).into());
        }
        Ok(BlobAnswer {
            mib_per_s: ops::mib_per_s(bytes, secs),
        })
    }

    fn echo(&mut self, kind: ByteKind, bytes: usize) -> Result<BlobAnswer> {
        let data = vec![0xA5u8; bytes];
        let secs = match kind {
            ByteKind::Blob => self.echo_as(kind, Blob::from(data))?,
            ByteKind::Vec => self.echo_as(kind, data)?,
            ByteKind::ByteBuf => self.echo_as(kind, ByteBuf::from(data))?,
            ByteKind::Bytes => self.echo_as(kind, Bytes::from(data))?,
            ByteKind::StaticSlice | ByteKind::FreshBlob => {
                return Err(format!("{} is a result only", kind.label()).into())
            }
        };
        Ok(BlobAnswer {
            mib_per_s: ops::mib_per_s(2 * bytes, secs),
        })
    }

    /// Sends `data` to the echo of `kind` and takes the answer as the same type, as a
    /// user of that type would: the seconds this took. Both values are dropped after.
    fn echo_as<T>(&self, kind: ByteKind, data: T) -> Result<f64>
    where
        T: Serialize + DeserializeOwned + AsRef<[u8]>,
    {
        let started = Instant::now();
        let back: T = self.g.call(&kind.echo_callback()).args((&data,)).fg()?;
        let secs = started.elapsed().as_secs_f64();
        if back.as_ref() != data.as_ref() {
            let (sent, got) = (data.as_ref().len(), back.as_ref().len());
            return Err(
                format!("the {} echo changed {sent} bytes into {got}", kind.label()).into(),
            );
        }
        Ok(secs)
    }

    fn result(&mut self, kind: ByteKind, bytes: usize) -> Result<BlobAnswer> {
        let prepared: u64 = self.g.call(ops::PREPARE).args((bytes as u64,)).fg()?;
        if prepared != bytes as u64 {
            return Err(format!("{} prepared {prepared} bytes, not {bytes}", ops::PREPARE).into());
        }
        let secs = match kind {
            ByteKind::Blob | ByteKind::FreshBlob | ByteKind::StaticSlice => {
                self.result_as::<Blob>(kind, bytes)?
            }
            ByteKind::Vec => self.result_as::<Vec<u8>>(kind, bytes)?,
            ByteKind::ByteBuf => self.result_as::<ByteBuf>(kind, bytes)?,
            ByteKind::Bytes => self.result_as::<Bytes>(kind, bytes)?,
        };
        if matches!(kind, ByteKind::Vec | ByteKind::ByteBuf) {
            // The user took the reply's buffer: the link reads its next large frame into
            // fresh memory. One unmeasured call pays for that here, so that the row
            // measured next does not.
            self.result_as::<Blob>(ByteKind::Blob, bytes)?;
        }
        Ok(BlobAnswer {
            mib_per_s: ops::mib_per_s(bytes, secs),
        })
    }

    /// Calls the result callback of `kind` and takes its answer as `T`, as a user of
    /// that type would: the seconds this took. The value is dropped after.
    fn result_as<T>(&self, kind: ByteKind, bytes: usize) -> Result<f64>
    where
        T: DeserializeOwned + AsRef<[u8]>,
    {
        let started = Instant::now();
        let back: T = self.g.call(&kind.result_callback()).fg()?;
        let secs = started.elapsed().as_secs_f64();
        if back.as_ref().len() != bytes || back.as_ref().first() != Some(&0xA5) {
            let got = back.as_ref().len();
            return Err(format!("the {} result was {got} bytes, not {bytes}", kind.label()).into());
        }
        Ok(secs)
    }

    fn broadcast(&mut self, calls: usize, warmup: usize, nodes: usize) -> Result<LatencyAnswer> {
        let mut samples = Vec::with_capacity(calls);
        for i in 0..warmup + calls {
            let t = Instant::now();
            let sums: HashMap<String, i64> =
                self.g.call(ops::ADD).args((i as i64, 1)).broadcast()?;
            let elapsed = t.elapsed();
            if sums.len() != nodes || sums.values().any(|s| *s != i as i64 + 1) {
                return Err(format!("broadcast answered {sums:?}, expected {nodes} nodes").into());
            }
            if i >= warmup {
                samples.push(elapsed);
            }
        }
        Percentiles::of(&mut samples).ok_or_else(|| "no broadcasts measured".into())
    }

    fn wait_nodes(
        &mut self,
        groups: &[(String, usize)],
        extra: &[String],
        timeout_s: u64,
    ) -> Result<WaitAnswer> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(timeout_s);
        let names = groups
            .iter()
            .flat_map(|(prefix, count)| (0..*count).map(move |i| format!("{prefix}{i}")))
            .chain(extra.iter().cloned());
        for name in names {
            let left = deadline.saturating_duration_since(Instant::now());
            self.g.wait_process_timeout(&name, left)?;
        }
        Ok(WaitAnswer {
            waited_s: started.elapsed().as_secs_f64(),
        })
    }
}

/// One small call from async code, made the way `style` says (`fg_async` unless it
/// says `bg` + `.await`).
async fn add_async(g: &Global, i: usize, style: CallStyle) -> Result<()> {
    let call = g.call(ops::ADD).args((i as i64, 1));
    let sum: i64 = match style {
        CallStyle::BgAwait => call.bg::<i64>()?.await?,
        CallStyle::Fg | CallStyle::FgAsync => call.fg_async().await?,
    };
    check_sum(i, sum)
}

/// Checks the answer of `bench_add(i, 1)`.
fn check_sum(i: usize, sum: i64) -> Result<()> {
    if sum != i as i64 + 1 {
        return Err(format!("{} returned {sum} for ({i}, 1)", ops::ADD).into());
    }
    Ok(())
}

/// `count` idle nodes in one process, all started at once on one runtime. Prints
/// `ready <seconds>` once every one of them is connected.
pub fn swarm(connect: &Endpoint, prefix: &str, count: usize) -> Result<()> {
    let rt = runtime()?;
    let started = Instant::now();
    let globals = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let b = connect
                .builder()
                .process_name(format!("{prefix}{i}"))
                .connect_timeout(Duration::from_secs(60));
            tasks.spawn(b.start_async());
        }
        let mut globals = Vec::with_capacity(count);
        while let Some(started) = tasks.join_next().await {
            globals.push(started.map_err(|e| e.to_string())??);
        }
        Ok::<_, BoxError>(globals)
    })?;
    println!("ready {:.3}", started.elapsed().as_secs_f64());
    wait_for_stdin_eof();
    for g in &globals {
        g.stop();
    }
    drop(globals);
    Ok(())
}

/// One idle node in its own process, whose memory the parent reads: stands in for
/// `daffi-idle-node` when that program is not built.
pub fn idle(connect: &Endpoint, name: &str) -> Result<()> {
    let g = connect.builder().process_name(name).start()?;
    println!("ready");
    wait_for_stdin_eof();
    g.stop();
    Ok(())
}
