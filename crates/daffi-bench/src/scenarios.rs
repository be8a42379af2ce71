//! The scenarios: which processes each starts, what it measures, and the report rows.
//!
//! daffi and the floor run side by side in one run, their repetitions interleaved
//! (floor, daffi, floor, daffi, ...), so that a burst of load on the machine hits both.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::floor::Engine;
use super::monitor;
use super::ops::{
    BlobAnswer, ByteKind, CallStyle, LatencyAnswer, Op, RateAnswer, RateMode, WaitAnswer,
};
use super::proc::{ChildProc, Endpoint, Memory, Result};
use super::report::{Row, Spread, Target, Unit};

/// The frame limit daffi starts with (128 MiB); bigger payloads raise it.
const DEFAULT_FRAME_LIMIT: usize = 128 * 1024 * 1024;
/// How long the spinning floor's client polls for a reply before it blocks: daffi's
/// default `sync_spin`.
const SPIN_FLOOR: Duration = Duration::from_micros(200);
/// How long the caller may wait for the swarm of scenario E.
const SWARM_TIMEOUT_S: u64 = 120;
/// Nodes of scenario E that are not in the swarm: caller, callee, idle node.
const E_OWN_NODES: usize = 3;
/// The idle node of scenario E: a program of its own, built with the benchmark.
const IDLE_NODE_PROGRAM: &str = "daffi-idle-node";

/// The processes the swarm of scenario E is spread over.
const SWARM_PROCESSES: usize = 5;

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Round trip of one small FG call at a time, Unix socket and TCP.
    A,
    /// Many small calls in flight (BG and async), and NO_RETURN.
    B,
    /// Large byte strings: a `Blob` argument, and echoes of each byte type.
    C,
    /// Broadcast to 4 nodes with results.
    D,
    /// 1,000 nodes on one controller.
    E,
}

/// A transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// Unix domain socket.
    Unix,
    /// TCP on loopback.
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }
}

/// What to run, and how much of it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Repetitions of each figure.
    pub reps: usize,
    /// Measured calls per repetition of A, D and E.
    pub latency_calls: usize,
    /// Unmeasured calls before them.
    pub latency_warmup: usize,
    /// Calls per repetition of B.
    pub rate_calls: usize,
    /// Calls in flight in B.
    pub in_flight: usize,
    /// Payload sizes of C.
    pub blob_sizes: Vec<usize>,
    /// Nodes the broadcast of D reaches.
    pub broadcast_nodes: usize,
    /// Nodes connected in E: one run of E for each count.
    pub swarm_nodes: Vec<usize>,
    /// Transport of B to E.
    pub transport: Transport,
    /// A running controller to use instead of starting one.
    pub connect: Option<Endpoint>,
    /// The monitoring port (`HOST:PORT`) of the nats-server of a run over NATS.
    pub nats_monitor: Option<String>,
    /// Scenarios to run.
    pub scenarios: Vec<Scenario>,
    /// Log level of the child processes.
    pub log_level: String,
    /// The controllers' linger, in microseconds, if not the library's default.
    pub controller_linger_us: Option<u64>,
    /// Where Unix sockets go.
    pub dir: PathBuf,
    /// Prefix of every process name (unique per run).
    pub tag: String,
}

/// What one scenario adds to the report.
#[derive(Default)]
pub struct Outcome {
    /// Report rows.
    pub rows: Vec<Row>,
    /// Notes.
    pub notes: Vec<String>,
}

impl Outcome {
    /// Adds the rows and notes of the scenario `what`, or notes (and says) that it failed:
    /// the others go on.
    fn add(&mut self, what: &str, result: Result<Outcome>) {
        match result {
            Ok(o) => {
                self.rows.extend(o.rows);
                self.notes.extend(o.notes);
            }
            Err(e) => {
                eprintln!("daffi-bench: {what} failed: {e}");
                self.notes.push(format!("{what} failed: {e}"));
            }
        }
    }
}

impl Plan {
    fn wants(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }

    /// Scenario A's command: small calls one at a time, made the way `style` says.
    fn latency(&self, style: CallStyle) -> Op {
        Op::Latency {
            calls: self.latency_calls,
            warmup: self.latency_warmup,
            style,
        }
    }

    fn listen(&self, group: &str, transport: Transport) -> Endpoint {
        match transport {
            Transport::Unix => Endpoint::Unix(self.dir.join(format!("{group}.sock"))),
            Transport::Tcp => Endpoint::Tcp("127.0.0.1".into(), 0),
        }
    }

    fn spawn(&self, what: &str, args: Vec<String>) -> Result<ChildProc> {
        ChildProc::spawn(what, &self.log_level, &args)
    }

    /// A controller (or the running one), `callees` callees and a caller.
    fn daffi(
        &self,
        group: &str,
        transport: Transport,
        callees: usize,
        frame_limit: Option<usize>,
    ) -> Result<DaffiSet> {
        let limit_args = |args: &mut Vec<String>| {
            if let Some(limit) = frame_limit {
                args.push("--max-frame-size".into());
                args.push(limit.to_string());
            }
        };
        let (controller, endpoint) = match &self.connect {
            Some(endpoint) => (None, endpoint.clone()),
            None => {
                let mut args = vec![
                    "controller".into(),
                    "--listen".into(),
                    self.listen(group, transport).to_string(),
                ];
                limit_args(&mut args);
                if let Some(us) = self.controller_linger_us {
                    args.extend(["--linger-us".into(), us.to_string()]);
                }
                let mut c = self.spawn(&format!("{group} controller"), args)?;
                let endpoint: Endpoint = c.ready()?.parse()?;
                (Some(c), endpoint)
            }
        };
        let mut names = Vec::new();
        let mut callee_procs = Vec::new();
        for i in 0..callees {
            let name = format!("{}-{group}-callee{i}", self.tag);
            let mut args = vec![
                "callee".into(),
                "--connect".into(),
                endpoint.to_string(),
                "--name".into(),
                name.clone(),
            ];
            limit_args(&mut args);
            callee_procs.push(self.spawn(&name, args)?);
            names.push(name);
        }
        for c in &mut callee_procs {
            c.ready()?;
        }
        let name = format!("{}-{group}-caller", self.tag);
        let mut args = vec![
            "caller".into(),
            "--connect".into(),
            endpoint.to_string(),
            "--name".into(),
            name.clone(),
            "--callees".into(),
            names.join(","),
        ];
        limit_args(&mut args);
        let mut caller = self.spawn(&name, args)?;
        caller.ready()?;
        Ok(DaffiSet {
            controller,
            callees: callee_procs,
            caller,
            endpoint,
        })
    }

    /// Every floor (each engine, batched and direct), for small frames, and the threads
    /// floor whose client spins before it blocks ([`SPIN_FLOOR`]).
    fn floors(&self, group: &str, transport: Transport) -> Result<Vec<FloorSet>> {
        let mut floors = Vec::new();
        for engine in [Engine::Tokio, Engine::Threads] {
            for batched in [true, false] {
                floors.push(self.floor(group, transport, engine, batched, DEFAULT_FRAME_LIMIT)?);
            }
        }
        floors.push(self.spin_floor(group, transport)?);
        Ok(floors)
    }

    /// The threads floor, direct, whose client polls for a reply for [`SPIN_FLOOR`]
    /// before it blocks: what daffi's sync caller does for a lone call.
    fn spin_floor(&self, group: &str, transport: Transport) -> Result<FloorSet> {
        let mut floor = self.floor_with(
            &format!("{group}-spin"),
            transport,
            (Engine::Threads, false),
            DEFAULT_FRAME_LIMIT,
            SPIN_FLOOR,
        )?;
        floor.name = "floor threads spin".into();
        Ok(floor)
    }

    /// Raw async-nats request-reply through the nats-server at `url`: a server and a client.
    fn nats_floor(&self, url: &str) -> Result<FloorSet> {
        let server_name = format!("{}-nats-floor-server", self.tag);
        let mut server = self.spawn(
            &server_name,
            vec![
                "nats-floor-server".into(),
                "--url".into(),
                url.into(),
                "--name".into(),
                server_name.clone(),
            ],
        )?;
        server.ready()?;
        let mut client = self.spawn(
            "nats floor client",
            vec![
                "nats-floor-client".into(),
                "--url".into(),
                url.into(),
                "--server".into(),
                server_name,
            ],
        )?;
        client.ready()?;
        Ok(FloorSet {
            name: "raw async-nats".into(),
            relay: None,
            server,
            client,
        })
    }

    /// A floor relay, server and client.
    fn floor(
        &self,
        group: &str,
        transport: Transport,
        engine: Engine,
        batched: bool,
        frame_limit: usize,
    ) -> Result<FloorSet> {
        self.floor_with(
            group,
            transport,
            (engine, batched),
            frame_limit,
            Duration::ZERO,
        )
    }

    /// A floor relay, server and client, the client spinning for up to `spin` before it
    /// blocks for a reply (threads only).
    fn floor_with(
        &self,
        group: &str,
        transport: Transport,
        (engine, batched): (Engine, bool),
        frame_limit: usize,
        spin: Duration,
    ) -> Result<FloorSet> {
        let variant = if batched { "batched" } else { "direct" };
        let engine_name = engine.label();
        let group = format!("{group}-floor-{engine_name}-{variant}");
        let mut relay_args = vec![
            "floor-relay".into(),
            "--listen".into(),
            self.listen(&group, transport).to_string(),
            "--max-frame-size".into(),
            frame_limit.to_string(),
        ];
        let mut common = vec![
            "--max-frame-size".into(),
            frame_limit.to_string(),
            "--engine".into(),
            engine_name.into(),
        ];
        if batched {
            relay_args.push("--batched".into());
            common.push("--batched".into());
        }
        relay_args.extend(["--engine".into(), engine_name.into()]);
        let mut relay = self.spawn(&format!("{group} relay"), relay_args)?;
        let endpoint = relay.ready()?;
        let server_name = format!("{}-{group}-server", self.tag);
        let mut args = vec![
            "floor-server".into(),
            "--connect".into(),
            endpoint.clone(),
            "--name".into(),
            server_name.clone(),
        ];
        args.extend(common.iter().cloned());
        let mut server = self.spawn(&server_name, args)?;
        server.ready()?;
        let client_name = format!("{}-{group}-client", self.tag);
        let mut args = vec![
            "floor-client".into(),
            "--connect".into(),
            endpoint,
            "--name".into(),
            client_name.clone(),
            "--server".into(),
            server_name,
        ];
        args.extend(common);
        if !spin.is_zero() {
            args.extend(["--spin-us".into(), spin.as_micros().to_string()]);
        }
        let mut client = self.spawn(&client_name, args)?;
        client.ready()?;
        Ok(FloorSet {
            name: format!("floor {engine_name} {variant}"),
            relay: Some(relay),
            server,
            client,
        })
    }
}

struct DaffiSet {
    controller: Option<ChildProc>,
    callees: Vec<ChildProc>,
    caller: ChildProc,
    endpoint: Endpoint,
}

impl DaffiSet {
    fn finish(self) {
        self.caller.finish();
        for c in self.callees {
            c.finish();
        }
        if let Some(c) = self.controller {
            c.finish();
        }
    }
}

struct FloorSet {
    name: String,
    /// `None` for the NATS floor: the nats-server relays.
    relay: Option<ChildProc>,
    server: ChildProc,
    client: ChildProc,
}

impl FloorSet {
    fn finish(self) {
        self.client.finish();
        self.server.finish();
        if let Some(relay) = self.relay {
            relay.finish();
        }
    }
}

fn progress(what: &str, rep: usize, reps: usize) {
    eprintln!("daffi-bench: {what}: repetition {}/{reps}", rep + 1);
}

/// Values of one figure across repetitions, by who measured them.
struct Series {
    daffi: Vec<f64>,
    floors: Vec<Vec<f64>>,
}

impl Series {
    fn new(floors: usize) -> Series {
        Series {
            daffi: Vec::new(),
            floors: vec![Vec::new(); floors],
        }
    }
}

/// The floor variant with the best median for this figure: the strictest reference.
fn best_floor(names: &[String], floors: &[Vec<f64>], higher_is_better: bool) -> (String, Spread) {
    let mut best: Option<(String, Spread)> = None;
    for (name, values) in names.iter().zip(floors) {
        let Some(s) = Spread::of(values) else {
            continue;
        };
        let better = match &best {
            None => true,
            Some((_, b)) if higher_is_better => s.median > b.median,
            Some((_, b)) => s.median < b.median,
        };
        if better {
            best = Some((name.clone(), s));
        }
    }
    best.unwrap_or_else(|| ("floor".into(), Spread::one(f64::NAN)))
}

fn spread(values: &[f64]) -> Spread {
    Spread::of(values).unwrap_or_else(|| Spread::one(f64::NAN))
}

/// Scenarios A and B over the NATS backend through the nats-server at `url`, beside raw
/// async-nats request-reply through it (the floor of this backend), and E over it.
pub fn run_nats(plan: &Plan, url: &str) -> Outcome {
    let on_nats = Plan {
        connect: Some(Endpoint::Nats(url.to_string())),
        ..plan.clone()
    };
    let mut out = Outcome::default();
    let mut add = |what: &str, result| out.add(&format!("{what} on NATS"), result);
    let wanted = (plan.wants(Scenario::A), plan.wants(Scenario::B));
    if wanted.0 || wanted.1 {
        let result = on_nats.nats_floor(url).and_then(|floor| {
            let daffi = on_nats.daffi("ab-nats", Transport::Tcp, 1, None)?;
            run_a_b_with(plan, (vec![floor], daffi), None, wanted)
        });
        add("A/B", result);
    }
    if plan.wants(Scenario::E) {
        add("E", run_e(&on_nats));
    }
    out
}

/// Scenarios A and B on one transport: they share their processes.
pub fn run_a_b(plan: &Plan, transport: Transport, a: bool, b: bool) -> Result<Outcome> {
    let group = format!("ab-{}", transport.name());
    let start = || -> Result<ProcessSets> {
        let floors = plan.floors(&group, transport)?;
        let daffi = plan.daffi(&group, transport, 1, None)?;
        Ok((floors, daffi))
    };
    run_a_b_with(plan, start()?, Some(&start), (a, b))
}

/// The floors and daffi's processes of one run of A and B.
type ProcessSets = (Vec<FloorSet>, DaffiSet);

/// A and/or B against `floors`. With `restart`, each repetition of A after the first
/// runs on fresh processes (see [`run_a`]).
fn run_a_b_with(
    plan: &Plan,
    (mut floors, mut daffi): ProcessSets,
    restart: Option<&dyn Fn() -> Result<ProcessSets>>,
    (a, b): (bool, bool),
) -> Result<Outcome> {
    let mut out = Outcome::default();
    if a {
        let (rows, sets) = run_a(plan, (floors, daffi), restart)?;
        out.rows.extend(rows);
        (floors, daffi) = sets;
    }
    if b {
        let b = run_b(plan, &mut floors, &mut daffi)?;
        out.rows.extend(b.rows);
        out.notes.extend(b.notes);
    }
    daffi.finish();
    for f in floors {
        f.finish();
    }
    Ok(out)
}

/// The ways a daffi caller makes one call at a time in A: sync first, then from async
/// code on the caller's own runtime.
const A_STYLES: [CallStyle; 3] = [CallStyle::Fg, CallStyle::FgAsync, CallStyle::BgAwait];

/// Scenario A: one small call at a time, each way of [`A_STYLES`], against every floor.
///
/// With `restart`, each repetition after the first starts every process set afresh.
/// Where the scheduler places a set's threads on the processors decides its round trip
/// (on two processors: 16-29 µs per hop within one, 35-38 µs across), and a set keeps
/// its placement for its whole life: one set per side for every repetition would make
/// the ratio a draw of two placements, not a comparison of the two paths.
fn run_a(
    plan: &Plan,
    (mut floors, mut daffi): ProcessSets,
    restart: Option<&dyn Fn() -> Result<ProcessSets>>,
) -> Result<(Vec<Row>, ProcessSets)> {
    let t = daffi.endpoint.transport();
    let op = |style| plan.latency(style);
    // Per style, then per percentile (p50, p99, p99.9).
    let mut series: Vec<[Series; 3]> = A_STYLES
        .iter()
        .map(|_| std::array::from_fn(|_| Series::new(floors.len())))
        .collect();
    for rep in 0..plan.reps {
        progress(&format!("A {t}"), rep, plan.reps);
        if let Some(restart) = restart.filter(|_| rep > 0) {
            // The old sets end first: the fresh ones listen where they did.
            for f in floors {
                f.finish();
            }
            daffi.finish();
            (floors, daffi) = restart()?;
        }
        for (i, f) in floors.iter_mut().enumerate() {
            let r: LatencyAnswer = f.client.request(&op(CallStyle::Fg))?;
            for (p, value) in [r.p50, r.p99, r.p999].into_iter().enumerate() {
                series[0][p].floors[i].push(value);
            }
        }
        for (s, style) in A_STYLES.iter().enumerate() {
            let r: LatencyAnswer = daffi.caller.request(&op(*style))?;
            for (p, value) in [r.p50, r.p99, r.p999].into_iter().enumerate() {
                series[s][p].daffi.push(value);
            }
        }
    }
    let floor_names = names_of(&floors);
    let labels = ["p50", "p99", "p99.9"];
    let targets = if t == "nats" {
        // Issue 14's targets over NATS: p50 only.
        [Some(1.3), None, None]
    } else {
        [Some(1.25), Some(1.5), None]
    };
    let mut rows = Vec::new();
    for (s, style) in A_STYLES.iter().enumerate() {
        for p in 0..3 {
            // The floors' samples are the same for every style: the sync caller's.
            let (name, reference) = best_floor(&floor_names, &series[0][p].floors, false);
            let mut row = Row::info(
                'A',
                format!("{t} {} round trip {}", style.label(), labels[p]),
                Unit::Micros,
                spread(&series[s][p].daffi),
            )
            .against(name, reference);
            // The targets are the sync call's, as before the async rows.
            if let (CallStyle::Fg, Some(bound)) = (style, targets[p]) {
                row = row.target(Target::RatioAtMost { bound });
            }
            rows.push(row);
        }
    }
    for (i, name) in floor_names.iter().enumerate() {
        for (p, label) in labels.iter().enumerate() {
            rows.push(Row::info(
                'A',
                format!("{name}: {t} round trip {label}"),
                Unit::Micros,
                spread(&series[0][p].floors[i]),
            ));
        }
    }
    Ok((rows, (floors, daffi)))
}

/// The ways a daffi caller keeps many calls in flight in B, and their labels.
const B_MODES: [(RateMode, &str); 3] = [
    (RateMode::Bg, "BG + get()"),
    (RateMode::Async, "fg_async tasks,"),
    (RateMode::BgAwait, "bg + .await,"),
];

/// Scenario B: many small calls in flight, each way of [`B_MODES`], and NO_RETURN,
/// against every floor.
fn run_b(plan: &Plan, floors: &mut [FloorSet], daffi: &mut DaffiSet) -> Result<Outcome> {
    let t = daffi.endpoint.transport();
    let n = plan.rate_calls;
    let k = plan.in_flight;
    let pipelined = Op::Rate {
        mode: RateMode::Pipelined,
        calls: n,
        in_flight: k,
    };
    let one_way = Op::OneWay { calls: n, bytes: 0 };
    let chunks_one_way = Op::OneWay {
        calls: stream_chunks(plan),
        bytes: STREAM_CHUNK,
    };
    // Issue 14's target over NATS, for calls with results.
    let bound = if t == "nats" { 0.7 } else { 0.5 };
    let mut floor_rate = Series::new(floors.len());
    let mut floor_one_way = Series::new(floors.len());
    let mut floor_chunks = Series::new(floors.len());
    let mut rates = vec![Vec::new(); B_MODES.len()];
    let mut no_return = Vec::new();
    let mut lost = 0;
    for rep in 0..plan.reps {
        progress(&format!("B {t}"), rep, plan.reps);
        for (i, f) in floors.iter_mut().enumerate() {
            let r: RateAnswer = f.client.request(&pipelined)?;
            floor_rate.floors[i].push(r.calls_per_s);
            let r: RateAnswer = f.client.request(&one_way)?;
            floor_one_way.floors[i].push(r.calls_per_s);
            let r: RateAnswer = f.client.request(&chunks_one_way)?;
            floor_chunks.floors[i].push(r.calls_per_s * super::ops::mib_per_s(STREAM_CHUNK, 1.0));
        }
        for ((mode, _), into) in B_MODES.iter().zip(&mut rates) {
            let op = Op::Rate {
                mode: *mode,
                calls: n,
                in_flight: k,
            };
            let r: RateAnswer = daffi.caller.request(&op)?;
            into.push(r.calls_per_s);
        }
        let r: RateAnswer = daffi.caller.request(&one_way)?;
        no_return.push(r.calls_per_s);
        lost += r.lost;
    }
    let floor_names = names_of(floors);
    let (rate_floor, rate_reference) = best_floor(&floor_names, &floor_rate.floors, true);
    let (one_way_floor, one_way_reference) = best_floor(&floor_names, &floor_one_way.floors, true);
    let chunks_floor = best_floor(&floor_names, &floor_chunks.floors, true);
    let mut out = Outcome::default();
    for ((_, label), values) in B_MODES.iter().zip(&rates) {
        out.rows.push(
            Row::info(
                'B',
                format!("{t} {label} {k} in flight"),
                Unit::CallsPerSec,
                spread(values),
            )
            .against(&rate_floor, rate_reference)
            .target(Target::RatioAtLeast { bound }),
        );
    }
    out.rows.push(
        Row::info(
            'B',
            format!("{t} NO_RETURN, counted at callee, {lost} lost"),
            Unit::CallsPerSec,
            spread(&no_return),
        )
        .against(format!("{one_way_floor} one-way"), one_way_reference)
        .target(Target::RatioAtLeast { bound: 0.5 }),
    );
    let items_floor = (format!("{one_way_floor} one-way"), one_way_reference);
    let chunks_floor = (
        format!("{} one-way, {}", chunks_floor.0, size_label(STREAM_CHUNK)),
        chunks_floor.1,
    );
    out.rows
        .extend(stream_rows(plan, daffi, items_floor, chunks_floor)?);
    for (i, name) in floor_names.iter().enumerate() {
        out.rows.push(Row::info(
            'B',
            format!("{name}: {t} {k} in flight"),
            Unit::CallsPerSec,
            spread(&floor_rate.floors[i]),
        ));
        out.rows.push(Row::info(
            'B',
            format!("{name}: {t} one-way"),
            Unit::CallsPerSec,
            spread(&floor_one_way.floors[i]),
        ));
        out.rows.push(Row::info(
            'B',
            format!("{name}: {t} one-way, {}", size_label(STREAM_CHUNK)),
            Unit::MibPerSec,
            spread(&floor_chunks.floors[i]),
        ));
    }
    Ok(out)
}

/// Bytes of each chunk in the stream-of-chunks row.
const STREAM_CHUNK: usize = 64 * 1024;

/// Chunks in the stream-of-chunks row (and one-way frames of that size at the floors).
fn stream_chunks(plan: &Plan) -> usize {
    (plan.rate_calls / 64).max(16)
}

/// Streams: items/s of small items, beside the floor's one-way rate of empty frames,
/// and MiB/s of 64 KiB chunks, beside its one-way MiB/s of 64 KiB frames (each a
/// reference: the floor's name and its figure).
fn stream_rows(
    plan: &Plan,
    daffi: &mut DaffiSet,
    items_floor: (String, Spread),
    chunks_floor: (String, Spread),
) -> Result<Vec<Row>> {
    let t = daffi.endpoint.transport();
    let items = Op::StreamItems {
        items: plan.rate_calls,
    };
    let chunks = Op::StreamChunks {
        chunks: stream_chunks(plan),
        bytes: STREAM_CHUNK,
    };
    let (mut item_rates, mut chunk_rates) = (Vec::new(), Vec::new());
    for rep in 0..plan.reps {
        progress(&format!("B {t} streams"), rep, plan.reps);
        let r: RateAnswer = daffi.caller.request(&items)?;
        item_rates.push(r.calls_per_s);
        let r: BlobAnswer = daffi.caller.request(&chunks)?;
        chunk_rates.push(r.mib_per_s);
    }
    Ok(vec![
        Row::info(
            'B',
            format!("{t} stream of small items, items/s"),
            Unit::CallsPerSec,
            spread(&item_rates),
        )
        .against(items_floor.0, items_floor.1)
        .target(Target::RatioAtLeast { bound: 0.5 }),
        Row::info(
            'B',
            format!("{t} stream of {} chunks", size_label(STREAM_CHUNK)),
            Unit::MibPerSec,
            spread(&chunk_rates),
        )
        .against(chunks_floor.0, chunks_floor.1)
        .target(Target::RatioAtLeast { bound: 0.5 }),
    ])
}

fn names_of(floors: &[FloorSet]) -> Vec<String> {
    floors.iter().map(|f| f.name.clone()).collect()
}

fn size_label(bytes: usize) -> String {
    const MIB: usize = 1024 * 1024;
    if bytes >= 1024 * MIB && bytes % (1024 * MIB) == 0 {
        format!("{} GiB", bytes / (1024 * MIB))
    } else if bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} B")
    }
}

/// Scenario C: one large `bytes` argument per call, for each size; fresh processes per
/// size, so that each process's peak RSS belongs to that size. Below 512 MiB, then the
/// echoes of each byte type.
pub fn run_c(plan: &Plan) -> Result<Outcome> {
    const MIB: usize = 1024 * 1024;
    let transport = plan.transport;
    let mut out = Outcome::default();
    for &size in &plan.blob_sizes {
        let raised = size + MIB > DEFAULT_FRAME_LIMIT;
        let limit = raised.then_some(size + MIB);
        let label = if raised {
            format!("{} (frame limit raised)", size_label(size))
        } else {
            size_label(size)
        };
        let group = format!("c-{}", size / MIB);
        // Large payloads are written from their own memory in both variants: one floor
        // is enough, and it halves the memory the run needs.
        let big = size >= 512 * MIB;
        let mut floors = vec![plan.floor(
            &group,
            transport,
            Engine::Tokio,
            true,
            limit.unwrap_or(DEFAULT_FRAME_LIMIT),
        )?];
        if !big {
            floors.push(plan.floor(
                &group,
                transport,
                Engine::Tokio,
                false,
                DEFAULT_FRAME_LIMIT,
            )?);
        }
        let mut daffi = plan.daffi(&group, transport, 1, limit)?;
        let t = daffi.endpoint.transport();
        let floor_names = names_of(&floors);
        // As many repetitions at 1 GiB as at 64 MiB: each one pays for faulting in fresh
        // buffers on both sides (the last one's are given back after a second), which
        // swings with the machine, and a median of three moved with a single one.
        let reps = plan.reps;
        let op = Op::Blob { bytes: size };
        // One unmeasured call on each side first, as A and D warm up: the first call of a
        // fresh process pays for faulting in its payload-sized buffers, which later calls
        // reuse, and one such repetition among five decided the median.
        for f in floors.iter_mut() {
            let _: BlobAnswer = f.client.request(&op)?;
        }
        let _: BlobAnswer = daffi.caller.request(&op)?;
        let mut series = Series::new(floors.len());
        for rep in 0..reps {
            progress(&format!("C {t} {label}"), rep, reps);
            for (i, f) in floors.iter_mut().enumerate() {
                let r: BlobAnswer = f.client.request(&op)?;
                series.floors[i].push(r.mib_per_s);
            }
            let r: BlobAnswer = daffi.caller.request(&op)?;
            series.daffi.push(r.mib_per_s);
        }
        let (name, reference) = best_floor(&floor_names, &series.floors, true);
        out.rows.push(
            Row::info(
                'C',
                format!("{t} {label} argument"),
                Unit::MibPerSec,
                spread(&series.daffi),
            )
            .against(name, reference)
            .target(Target::RatioAtLeast { bound: 0.8 }),
        );
        let payload_mib = size as f64 / MIB as f64;
        let mut peaks: Vec<(&str, Memory)> = vec![("caller", daffi.caller.memory()?)];
        if let Some(c) = &daffi.controller {
            peaks.push(("controller", c.memory()?));
        }
        peaks.push(("callee", daffi.callees[0].memory()?));
        for (who, m) in peaks {
            out.rows.push(
                Row::info(
                    'C',
                    format!("{label}: peak RSS of the {who}"),
                    Unit::Mib,
                    Spread::one(m.peak_mib),
                )
                .target(Target::AtMost {
                    bound: 3.0 * payload_mib,
                }),
            );
        }
        for (i, name) in floor_names.iter().enumerate() {
            out.rows.push(Row::info(
                'C',
                format!("{name}: {t} {label}"),
                Unit::MibPerSec,
                spread(&series.floors[i]),
            ));
        }
        let relay = floors[0]
            .relay
            .as_ref()
            .ok_or("C has socket floors only")?
            .memory()?;
        out.rows.push(Row::info(
            'C',
            format!("{label}: peak RSS of the {} relay", floor_names[0]),
            Unit::Mib,
            Spread::one(relay.peak_mib),
        ));
        daffi.finish();
        if !big {
            let echo = Echo {
                group: format!("{group}-echo"),
                frame_limit: limit,
                size,
                label: &label,
            };
            out.rows.extend(echo.rows(plan, &mut floors, &floor_names)?);
        }
        for f in floors {
            f.finish();
        }
    }
    if plan.blob_sizes.iter().any(|&size| size < 512 * MIB) {
        out.notes.push(
            "C: an echo sends its payload as the argument and gets it back as the result, \
             both of the type named; its MiB/s counts the payload both ways"
                .into(),
        );
        out.notes.push(
            "C: a result call has no argument; the callee returns the payload as the type \
             named, made from one buffer prepared before the timing: Blob and Bytes refer \
             to it (no copy), Vec<u8>, ByteBuf and Blob (fresh Vec) are fresh copies of it \
             (the copy is inside the timing, so Vec<u8> and ByteBuf are compared with Blob \
             (fresh Vec)), &'static [u8] is the buffer itself; the caller takes the result \
             as the same type (&'static [u8] and the fresh Blob as Blob); MiB/s counts the \
             payload once"
                .into(),
        );
    }
    Ok(out)
}

/// Scenario C's byte types at one size: echoes (argument and result) and results alone,
/// each type against `Blob`, in fresh processes (the argument's peak RSS rows stay its
/// own).
struct Echo<'a> {
    group: String,
    frame_limit: Option<usize>,
    size: usize,
    label: &'a str,
}

impl Echo<'_> {
    /// Repetitions of every echo and result, interleaved with the floors' own; one row
    /// per type and direction, `Blob` against the better floor and the others against
    /// `Blob`.
    fn rows(
        &self,
        plan: &Plan,
        floors: &mut [FloorSet],
        floor_names: &[String],
    ) -> Result<Vec<Row>> {
        let mut daffi = plan.daffi(&self.group, plan.transport, 1, self.frame_limit)?;
        let t = daffi.endpoint.transport();
        let bytes = self.size;
        let echoes = ByteKind::ECHOED.map(|kind| Op::Echo { kind, bytes });
        let results = ByteKind::RETURNED.map(|kind| Op::Result { kind, bytes });
        let ops: Vec<&Op> = echoes.iter().chain(&results).collect();
        for op in &ops {
            let _: BlobAnswer = daffi.caller.request(op)?;
        }
        let floor_op = Op::Blob { bytes };
        let mut floor_series = vec![Vec::new(); floors.len()];
        let mut series = vec![Vec::new(); ops.len()];
        for rep in 0..plan.reps {
            progress(&format!("C {t} {} byte types", self.label), rep, plan.reps);
            for (i, f) in floors.iter_mut().enumerate() {
                let r: BlobAnswer = f.client.request(&floor_op)?;
                floor_series[i].push(r.mib_per_s);
            }
            for (i, op) in ops.iter().enumerate() {
                let r: BlobAnswer = daffi.caller.request(op)?;
                series[i].push(r.mib_per_s);
            }
        }
        daffi.finish();
        let floor = best_floor(floor_names, &floor_series, true);
        let (echo_series, result_series) = series.split_at(echoes.len());
        let mut rows = self.kind_rows(t, "echo", &ByteKind::ECHOED, echo_series, &floor);
        rows.extend(self.kind_rows(t, "result", &ByteKind::RETURNED, result_series, &floor));
        Ok(rows)
    }

    /// One row per kind: `Blob` (the first) against the floor, `Vec<u8>` and `ByteBuf`
    /// results against the fresh `Blob` (their callees copy the same way), the others
    /// against `Blob`.
    fn kind_rows(
        &self,
        t: &str,
        what: &str,
        kinds: &[ByteKind],
        series: &[Vec<f64>],
        floor: &(String, Spread),
    ) -> Vec<Row> {
        let blob = spread(&series[0]);
        let fresh_blob = kinds
            .iter()
            .position(|&k| k == ByteKind::FreshBlob)
            .map(|i| spread(&series[i]));
        kinds
            .iter()
            .zip(series)
            .map(|(kind, values)| {
                let row = Row::info(
                    'C',
                    format!("{t} {} {} {what}", self.label, kind.label()),
                    Unit::MibPerSec,
                    spread(values),
                );
                match (kind, fresh_blob) {
                    (ByteKind::Blob, _) => row.against(floor.0.clone(), floor.1),
                    (ByteKind::FreshBlob, _) => row.against(format!("Blob {what}"), blob),
                    (ByteKind::Vec | ByteKind::ByteBuf, Some(fresh)) => row
                        .against(format!("Blob (fresh Vec) {what}"), fresh)
                        .target(Target::RatioAtLeast { bound: 0.8 }),
                    _ => row
                        .against(format!("Blob {what}"), blob)
                        .target(Target::RatioAtLeast { bound: 0.8 }),
                }
            })
            .collect()
    }
}

/// Scenario D: a broadcast with results to `broadcast_nodes` callees, against single
/// calls measured by the same processes in the same repetitions.
pub fn run_d(plan: &Plan) -> Result<Outcome> {
    let nodes = plan.broadcast_nodes;
    let mut daffi = plan.daffi("d", plan.transport, nodes, None)?;
    let t = daffi.endpoint.transport();
    let single = plan.latency(CallStyle::Fg);
    let broadcast = Op::Broadcast {
        calls: plan.latency_calls,
        warmup: plan.latency_warmup,
        nodes,
    };
    let (mut a50, mut a99, mut d50, mut d99) = (vec![], vec![], vec![], vec![]);
    for rep in 0..plan.reps {
        progress(&format!("D {t}"), rep, plan.reps);
        let a: LatencyAnswer = daffi.caller.request(&single)?;
        a50.push(a.p50);
        a99.push(a.p99);
        let d: LatencyAnswer = daffi.caller.request(&broadcast)?;
        d50.push(d.p50);
        d99.push(d.p99);
    }
    let mut out = Outcome::default();
    out.rows.push(
        Row::info(
            'D',
            format!("{t} broadcast to {nodes}, p50"),
            Unit::Micros,
            spread(&d50),
        )
        .against("A p50, same processes", spread(&a50))
        .target(Target::RatioAtMost { bound: 2.5 }),
    );
    out.rows.push(
        Row::info(
            'D',
            format!("{t} broadcast to {nodes}, p99"),
            Unit::Micros,
            spread(&d99),
        )
        .against("A p99, same processes", spread(&a99)),
    );
    daffi.finish();
    Ok(out)
}

/// Scenario E at each of the plan's node counts, each on a fresh controller (its peak
/// memory is the run's own): the growth. A count that fails is noted, and the next
/// runs: the table shows where the growth breaks.
pub fn run_e(plan: &Plan) -> Result<Outcome> {
    let mut out = Outcome::default();
    for &nodes in &plan.swarm_nodes {
        match run_e_at(plan, nodes) {
            Ok(at) => {
                out.rows.extend(at.rows);
                out.notes.extend(at.notes);
            }
            Err(e) => {
                eprintln!("daffi-bench: E with {nodes} nodes failed: {e}");
                out.notes.push(format!("E with {nodes} nodes failed: {e}"));
            }
        }
    }
    Ok(out)
}

/// Scenario E: `nodes` nodes on one controller. The swarm's nodes share
/// [`SWARM_PROCESSES`] helper processes (1,000 processes are too many for 2 cores);
/// one idle node runs alone so that its memory can be read.
fn run_e_at(plan: &Plan, nodes: usize) -> Result<Outcome> {
    let mut daffi = plan.daffi("e", plan.transport, 1, None)?;
    let t = daffi.endpoint.transport();
    let total = nodes.max(E_OWN_NODES + SWARM_PROCESSES);
    let op = plan.latency(CallStyle::Fg);
    // A's reference: the same round trip on a mesh of 2 nodes. With a controller of its
    // own, that is a second mesh beside this one, measured repetition by repetition in
    // turn with the loaded one, so that the machine's drift falls on both alike. On a
    // controller or server given (`--connect`, NATS), a second mesh would share it:
    // the reference is then this mesh before the swarm joins and after it left.
    let mut reference = match plan.connect {
        None => Some(plan.daffi(&format!("e{total}-ref"), plan.transport, 1, None)?),
        Some(_) => None,
    };
    let mut two_nodes = Vec::new();
    if reference.is_none() {
        for rep in 0..plan.reps {
            progress(&format!("E {t}, 2 nodes"), rep, plan.reps);
            let r: LatencyAnswer = daffi.caller.request(&op)?;
            two_nodes.push(r.p50);
        }
    }

    eprintln!("daffi-bench: E {t}: connecting {total} nodes");
    let count = total - E_OWN_NODES;
    let prefix = format!("{}-e{total}-swarm", plan.tag);
    let idle_name = format!("{}-e{total}-idle", plan.tag);
    let endpoint = daffi.endpoint.to_string();
    let started = Instant::now();
    let mut swarms = Vec::with_capacity(SWARM_PROCESSES);
    let mut groups = Vec::with_capacity(SWARM_PROCESSES);
    for part in 0..SWARM_PROCESSES {
        let share = count / SWARM_PROCESSES + usize::from(part < count % SWARM_PROCESSES);
        let part_prefix = format!("{prefix}{part}-");
        groups.push((part_prefix.clone(), share));
        swarms.push(plan.spawn(
            "the swarm",
            vec![
                "swarm".into(),
                "--connect".into(),
                endpoint.clone(),
                "--prefix".into(),
                part_prefix,
                "--count".into(),
                share.to_string(),
            ],
        )?);
    }
    // A user's minimal node program, not this binary: its memory is an idle node's.
    // `cargo run -p daffi-bench` builds only this binary: a role of it then stands in.
    let idle_args = vec![
        "--connect".into(),
        endpoint,
        "--name".into(),
        idle_name.clone(),
    ];
    let (mut idle, idle_program) = match ChildProc::beside(IDLE_NODE_PROGRAM) {
        Some(path) => (
            ChildProc::spawn_program(&idle_name, &path, &idle_args)?,
            IDLE_NODE_PROGRAM,
        ),
        None => {
            eprintln!(
                "daffi-bench: {IDLE_NODE_PROGRAM} is not built (`cargo build --release -p daffi-bench`): \
                 E's idle node runs as a role of daffi-bench, whose code pages are larger"
            );
            let args = ["idle".to_string()].into_iter().chain(idle_args).collect();
            (plan.spawn(&idle_name, args)?, "a daffi-bench role")
        }
    };
    let _: WaitAnswer = daffi.caller.request(&Op::WaitNodes {
        groups,
        extra: vec![idle_name.clone()],
        timeout_s: SWARM_TIMEOUT_S,
    })?;
    let connect_s = started.elapsed().as_secs_f64();
    let mut swarm_says = 0.0f64;
    for swarm in &mut swarms {
        swarm_says = swarm_says.max(swarm.ready()?.parse().unwrap_or(f64::NAN));
    }
    idle.ready()?;
    let controller = daffi
        .controller
        .as_ref()
        .map(ChildProc::memory)
        .transpose()?;
    let idle_memory = idle.memory()?;
    let swarm_memory = swarms
        .iter()
        .map(ChildProc::memory)
        .collect::<Result<Vec<Memory>>>()?;
    let swarm_rss_mib: f64 = swarm_memory.iter().map(|m| m.rss_mib).sum();

    let mut loaded = Vec::new();
    // A bound of 10% is finer than one repetition's spread on a shared machine: each
    // repetition takes about a second here, and three times as many settle the medians.
    let rounds = if reference.is_some() {
        3 * plan.reps
    } else {
        plan.reps
    };
    for rep in 0..rounds {
        progress(&format!("E {t}, {total} nodes"), rep, rounds);
        // Each mesh goes first in every other repetition.
        if rep % 2 == 1 {
            measure_reference(&mut reference, &op, &mut two_nodes)?;
        }
        let r: LatencyAnswer = daffi.caller.request(&op)?;
        loaded.push(r.p50);
        if rep % 2 == 0 {
            measure_reference(&mut reference, &op, &mut two_nodes)?;
        }
    }

    let mut out = Outcome::default();
    out.rows.push(
        Row::info(
            'E',
            format!("{t} connect {total} nodes (all known to a node)"),
            Unit::Secs,
            Spread::one(connect_s),
        )
        .target(Target::Below { bound: 10.0 }),
    );
    out.rows.push(Row::info(
        'E',
        format!("{t} swarm of {count} in {SWARM_PROCESSES} processes: all started"),
        Unit::Secs,
        Spread::one(swarm_says),
    ));
    if let Some(monitor) = &plan.nats_monitor {
        out.rows
            .extend(nats_server_rows(monitor, &idle_name, total)?);
    }
    match controller {
        Some(m) => {
            out.rows.push(
                Row::info(
                    'E',
                    format!("controller peak RSS, {total} nodes"),
                    Unit::Mib,
                    Spread::one(m.peak_mib),
                )
                .target(Target::AtMost { bound: 128.0 }),
            );
            out.rows.push(Row::info(
                'E',
                format!("controller RSS now, {total} nodes"),
                Unit::Mib,
                Spread::one(m.rss_mib),
            ));
        }
        None if plan.nats_monitor.is_some() => {}
        None => out
            .notes
            .push("E: a running controller was used; its memory is not measured".into()),
    }
    out.rows.push(
        Row::info(
            'E',
            format!("idle node RSS ({idle_program}, its own process), {total} nodes"),
            Unit::Mib,
            Spread::one(idle_memory.rss_mib),
        )
        .target(Target::AtMost { bound: 8.0 }),
    );
    out.rows.push(Row::info(
        'E',
        format!("idle node peak RSS, {total} nodes"),
        Unit::Mib,
        Spread::one(idle_memory.peak_mib),
    ));
    out.rows.push(Row::info(
        'E',
        format!("idle node anonymous RSS (without its binary's pages), {total} nodes"),
        Unit::Mib,
        Spread::one(idle_memory.anon_mib),
    ));
    out.rows.push(Row::info(
        'E',
        format!("swarm RSS, {SWARM_PROCESSES} processes of {count} nodes together"),
        Unit::Mib,
        Spread::one(swarm_rss_mib),
    ));
    out.rows.push(Row::info(
        'E',
        format!("swarm RSS per node, {count} nodes (MiB/1000 = KiB)"),
        Unit::Mib,
        Spread::one(swarm_rss_mib * 1000.0 / count as f64),
    ));
    for swarm in swarms {
        swarm.finish();
    }
    idle.finish();
    let compared_with = match reference {
        Some(reference) => {
            reference.finish();
            "p50 on a mesh of 2, in turn"
        }
        None => {
            // Now that the swarm is gone: on both sides of the loaded repetitions, so
            // that a drift in the machine's load shows on both sides.
            for rep in 0..plan.reps {
                progress(&format!("E {t}, 2 nodes again"), rep, plan.reps);
                let r: LatencyAnswer = daffi.caller.request(&op)?;
                two_nodes.push(r.p50);
            }
            "p50 with 2 nodes, before and after"
        }
    };
    out.rows.push(
        Row::info(
            'E',
            format!("{t} FG round trip p50, {total} nodes"),
            Unit::Micros,
            spread(&loaded),
        )
        .against(compared_with, spread(&two_nodes))
        .target(Target::RatioAtMost { bound: 1.1 }),
    );
    daffi.finish();
    Ok(out)
}

/// One repetition of A on E's reference mesh of 2 nodes, if it has one of its own.
fn measure_reference(reference: &mut Option<DaffiSet>, op: &Op, p50s: &mut Vec<f64>) -> Result<()> {
    if let Some(reference) = reference {
        let r: LatencyAnswer = reference.caller.request(op)?;
        p50s.push(r.p50);
    }
    Ok(())
}

/// How long the messages an idle node receives are counted.
const IDLE_COUNT_WINDOW: Duration = Duration::from_secs(5);

/// E over NATS: the nats-server's memory, and the messages per second the server sends
/// the idle node `idle_name` (read twice from its monitoring port `monitor`).
fn nats_server_rows(monitor: &str, idle_name: &str, total: usize) -> Result<Vec<Row>> {
    let before = monitor::messages_to(monitor, idle_name)?;
    let counted = Instant::now();
    std::thread::sleep(IDLE_COUNT_WINDOW);
    let after = monitor::messages_to(monitor, idle_name)?;
    let per_sec = after.saturating_sub(before) as f64 / counted.elapsed().as_secs_f64();
    let server_mib = monitor::server_memory_mib(monitor)?;
    Ok(vec![
        Row::info(
            'E',
            format!("nats-server RSS, {total} nodes"),
            Unit::Mib,
            Spread::one(server_mib),
        )
        .target(Target::AtMost { bound: 128.0 }),
        Row::info(
            'E',
            format!("messages/s to an idle node, {total} nodes"),
            Unit::MsgsPerSec,
            Spread::one(per_sec),
        ),
    ])
}

/// Runs every scenario of the plan; a scenario that fails is noted, the others go on.
pub fn run_all(plan: &Plan) -> Outcome {
    let mut all = Outcome::default();
    let mut add = |what: &str, result| all.add(what, result);
    let transports: Vec<Transport> = match &plan.connect {
        Some(Endpoint::Unix(_)) => vec![Transport::Unix],
        Some(Endpoint::Tcp(..) | Endpoint::Nats(_)) => vec![Transport::Tcp],
        None => vec![Transport::Unix, Transport::Tcp],
    };
    let connected = plan.connect.as_ref().map(|e| match e {
        Endpoint::Unix(_) => Transport::Unix,
        Endpoint::Tcp(..) | Endpoint::Nats(_) => Transport::Tcp,
    });
    let b_transport = connected.unwrap_or(plan.transport);
    for transport in transports {
        let a = plan.wants(Scenario::A);
        let b = plan.wants(Scenario::B) && transport == b_transport;
        if a || b {
            add(
                &format!("A/B on {}", transport.name()),
                run_a_b(plan, transport, a, b),
            );
        }
    }
    if plan.wants(Scenario::C) {
        add("C", run_c(plan));
    }
    if plan.wants(Scenario::D) {
        add("D", run_d(plan));
    }
    if plan.wants(Scenario::E) {
        add("E", run_e(plan));
    }
    all
}
