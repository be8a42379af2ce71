//! `daffi-bench`: daffi's latency and throughput beside raw frame relays. See
//! `BENCHMARKS.md`; run it with `cargo run --release -p daffi-bench -- [OPTIONS]`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use daffi_bench::{BenchArgs, RoleArgs};

#[derive(Parser)]
#[command(
    name = "daffi-bench",
    version,
    about = "Measure daffi's latency and throughput beside raw frame relays (see BENCHMARKS.md)",
    after_help = "Examples:\n  \
        cargo run --release -p daffi-bench                  # every scenario, a few minutes\n  \
        cargo run --release -p daffi-bench -- --quick       # every scenario, rough, in seconds\n  \
        cargo run --release -p daffi-bench -- --only a,b --no-big --json\n  \
        cargo run --release -p daffi-bench -- --nats nats://127.0.0.1:4222   # A, B and E over NATS\n  \
        cargo run --release -p daffi-bench -- --nats nats://127.0.0.1:4222 --nats-monitor 127.0.0.1:8222 --only e --nodes 500,1000,2000"
)]
struct Cli {
    /// Log level of this process: error, warn, info, debug or trace (or a `tracing`
    /// filter).
    #[arg(long, global = true, env = "DAFFI_LOG", default_value = "warn")]
    log_level: String,

    #[command(flatten)]
    bench: BenchArgs,

    #[command(subcommand)]
    process: Option<Process>,
}

#[derive(Subcommand)]
enum Process {
    /// A process the benchmark starts.
    #[command(hide = true)]
    Role(RoleArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.process {
        Some(Process::Role(args)) => daffi_bench::run_role(args),
        None => daffi_bench::run(cli.bench),
    }
}
