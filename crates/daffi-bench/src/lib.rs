//! `daffi-bench`: latency and throughput of daffi, beside raw frame relays (the floors)
//! measured in the same run. See `BENCHMARKS.md` at the repository root; run it with
//! `cargo run --release -p daffi-bench -- [OPTIONS]`.
//!
//! A crate of its own (`publish = false`), so that the shipped `daffi` binary does not
//! carry it. The parent process starts every other process itself, as this same binary
//! in a hidden role (`daffi-bench role ...`), and talks to them over their stdin and
//! stdout:
//! - `floor/`: the floors' relays, servers and clients, on tokio and on std threads;
//! - `roles.rs`: daffi's controller, callee, caller, a swarm of nodes, an idle node;
//! - `scenarios.rs`: scenarios A to E, which start those and collect the figures;
//! - `report.rs`: the table and the JSON;
//! - `ops.rs`, `proc.rs`: the commands children run, and the children themselves.

#![warn(missing_docs)]

mod floor;
mod monitor;
mod ops;
mod proc;
mod report;
mod roles;
mod scenarios;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

pub use proc::Endpoint;
use report::Report;
use scenarios::{Plan, Scenario, Transport};

/// Options of `daffi-bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// A short run of every scenario (seconds, not minutes): fewer calls and
    /// repetitions, a 4 MiB payload instead of 64 MiB and 1 GiB, 30 nodes instead of
    /// 1,000. Its figures are rough.
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Repetitions of each figure [default: 5, or 2 with --quick].
    #[arg(long)]
    reps: Option<usize>,
    /// Run only these scenarios, e.g. `--only a,b` [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Transport of scenarios B to E (A runs on both).
    #[arg(long, value_enum, default_value = "unix")]
    transport: Transport,
    /// Use a running controller (tcp:HOST:PORT or unix:PATH) instead of starting one.
    /// No other node on it may serve the `bench_*` callbacks.
    #[arg(long)]
    connect: Option<Endpoint>,
    /// Measured calls per repetition in A, D and E [default: 10000, or 300 with --quick].
    #[arg(long)]
    calls: Option<usize>,
    /// Calls per repetition in B [default: 200000, or 3000 with --quick].
    #[arg(long)]
    rate_calls: Option<usize>,
    /// Skip the 1 GiB payload of scenario C.
    #[arg(long)]
    no_big: bool,
    /// Nodes connected in scenario E, spread over 5 processes [default: 1000, or 30
    /// with --quick]. Several counts (`--nodes 1000,2500,5000,10000`) run E once per
    /// count, each on a fresh controller, and print the growth: the figures at each.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Run A and B over the NATS backend through this nats-server (`nats://HOST:PORT`),
    /// beside raw async-nats request-reply through the same server, and E over it,
    /// instead of the other scenarios. Start one with `nats-server --jetstream`
    /// (`.ci/tools` installs it into target/ci-venv/bin).
    #[arg(long, value_name = "URL", conflicts_with = "connect")]
    nats: Option<String>,
    /// The monitoring port of that nats-server (`HOST:PORT`, its `-m`): E over NATS then
    /// reports the server's memory and the messages an idle node receives per second.
    #[arg(long, value_name = "HOST:PORT", requires = "nats")]
    nats_monitor: Option<String>,
    /// Log level of the processes the benchmark starts.
    #[arg(long, default_value = "warn")]
    child_log_level: String,
    /// How long, in microseconds, the controllers it starts keep polling after the last
    /// reply of their calls in flight (`GlobalBuilder::controller_linger`) [default: the
    /// library's, 20]. 0 measures a controller that sleeps at once.
    #[arg(long, value_name = "MICROSECONDS")]
    controller_linger_us: Option<u64>,
}

/// The role of a process `daffi-bench` started.
#[derive(Args)]
pub struct RoleArgs {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// A daffi controller.
    Controller {
        #[arg(long)]
        listen: Endpoint,
        #[arg(long)]
        max_frame_size: Option<usize>,
        #[arg(long)]
        linger_us: Option<u64>,
    },
    /// A daffi node serving the bench callbacks.
    Callee {
        #[arg(long)]
        connect: Endpoint,
        #[arg(long)]
        name: String,
        #[arg(long)]
        max_frame_size: Option<usize>,
    },
    /// A daffi node running the parent's commands.
    Caller {
        #[arg(long)]
        connect: Endpoint,
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',')]
        callees: Vec<String>,
        #[arg(long)]
        max_frame_size: Option<usize>,
    },
    /// Many idle daffi nodes in one process.
    Swarm {
        #[arg(long)]
        connect: Endpoint,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: usize,
    },
    /// One idle daffi node (when `daffi-idle-node` is not built).
    Idle {
        #[arg(long)]
        connect: Endpoint,
        #[arg(long)]
        name: String,
    },
    /// The NATS floor's server: raw async-nats, answering requests.
    NatsFloorServer {
        #[arg(long)]
        url: String,
        #[arg(long)]
        name: String,
    },
    /// The NATS floor's client: raw async-nats requests to `server`.
    NatsFloorClient {
        #[arg(long)]
        url: String,
        #[arg(long)]
        server: String,
    },
    /// The floor's relay.
    FloorRelay {
        #[arg(long)]
        listen: Endpoint,
        #[arg(long, value_enum, default_value = "tokio")]
        engine: floor::Engine,
        #[arg(long)]
        batched: bool,
        #[arg(long)]
        max_frame_size: usize,
    },
    /// The floor's server.
    FloorServer {
        #[arg(long)]
        connect: Endpoint,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value = "tokio")]
        engine: floor::Engine,
        #[arg(long)]
        batched: bool,
        #[arg(long)]
        max_frame_size: usize,
    },
    /// The floor's client.
    FloorClient {
        #[arg(long)]
        connect: Endpoint,
        #[arg(long)]
        name: String,
        #[arg(long)]
        server: String,
        #[arg(long, value_enum, default_value = "tokio")]
        engine: floor::Engine,
        #[arg(long)]
        batched: bool,
        #[arg(long)]
        max_frame_size: usize,
        /// Microseconds the threads client polls for a reply before it blocks (0: it
        /// blocks at once).
        #[arg(long, default_value_t = 0)]
        spin_us: u64,
    },
}

/// Runs the benchmark.
pub fn run(args: BenchArgs) -> ExitCode {
    const MIB: usize = 1024 * 1024;
    let quick = args.quick;
    let pick = |given: Option<usize>, full: usize, short: usize| {
        given.unwrap_or(if quick { short } else { full }).max(1)
    };
    let mut blob_sizes = if quick { vec![4 * MIB] } else { vec![64 * MIB] };
    if !quick && !args.no_big {
        blob_sizes.push(1024 * MIB);
    }
    let transport = match &args.connect {
        Some(Endpoint::Unix(_)) => Transport::Unix,
        Some(Endpoint::Tcp(..)) => Transport::Tcp,
        Some(Endpoint::Nats(url)) => {
            eprintln!("daffi-bench: to run over NATS, use --nats {url}");
            return ExitCode::from(2);
        }
        None => args.transport,
    };
    let dir = std::env::temp_dir().join(format!("daffi-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("daffi-bench: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let plan = Plan {
        reps: pick(args.reps, 5, 2),
        latency_calls: pick(args.calls, 10_000, 300),
        latency_warmup: if quick { 50 } else { 1_000 },
        rate_calls: pick(args.rate_calls, 200_000, 3_000),
        in_flight: 256,
        blob_sizes,
        broadcast_nodes: 4,
        swarm_nodes: if args.nodes.is_empty() {
            vec![pick(None, 1_000, 30)]
        } else {
            args.nodes
        },
        transport,
        connect: args.connect,
        nats_monitor: args.nats_monitor,
        scenarios: if args.only.is_empty() {
            vec![
                Scenario::A,
                Scenario::B,
                Scenario::C,
                Scenario::D,
                Scenario::E,
            ]
        } else {
            args.only
        },
        log_level: args.child_log_level,
        controller_linger_us: args.controller_linger_us,
        dir: dir.clone(),
        tag: format!("bench{}", std::process::id()),
    };
    let started = Instant::now();
    let load_before = report::load_average();
    let outcome = match args.nats {
        Some(url) => scenarios::run_nats(&plan, &url),
        None => scenarios::run_all(&plan),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let report = Report {
        version: env!("CARGO_PKG_VERSION"),
        quick,
        reps: plan.reps,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average: [load_before, report::load_average()],
        elapsed_s: started.elapsed().as_secs_f64(),
        rows: outcome.rows,
        notes: outcome.notes,
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("daffi-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.table());
    }
    let failed = report.notes.iter().any(|n| n.contains(" failed: "));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs one process of the benchmark (`daffi-bench role ...`).
pub fn run_role(args: RoleArgs) -> ExitCode {
    let result = match &args.role {
        Role::Controller {
            listen,
            max_frame_size,
            linger_us,
        } => roles::controller(listen, *max_frame_size, *linger_us),
        Role::Callee {
            connect,
            name,
            max_frame_size,
        } => roles::callee(connect, name, *max_frame_size),
        Role::Caller {
            connect,
            name,
            callees,
            max_frame_size,
        } => roles::caller(connect, name, callees, *max_frame_size),
        Role::Swarm {
            connect,
            prefix,
            count,
        } => roles::swarm(connect, prefix, *count),
        Role::Idle { connect, name } => roles::idle(connect, name),
        Role::NatsFloorServer { url, name } => floor::on_nats::server(url, name),
        Role::NatsFloorClient { url, server } => floor::on_nats::client(url, server),
        Role::FloorRelay {
            listen,
            engine,
            batched,
            max_frame_size,
        } => floor::relay(*engine, listen, *batched, *max_frame_size),
        Role::FloorServer {
            connect,
            name,
            engine,
            batched,
            max_frame_size,
        } => floor::server(*engine, connect, name, *batched, *max_frame_size),
        Role::FloorClient {
            connect,
            name,
            server,
            engine,
            batched,
            max_frame_size,
            spin_us,
        } => {
            floor::spin_before_blocking(Duration::from_micros(*spin_us));
            floor::client(*engine, connect, (name, server), *batched, *max_frame_size)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("daffi-bench role: {e}");
            ExitCode::FAILURE
        }
    }
}
