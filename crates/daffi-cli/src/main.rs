//! `daffi`: run a standalone controller, and (in later versions) inspect and call a mesh.

mod bench;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use daffi::Global;

#[derive(Parser)]
#[command(
    name = "daffi",
    version,
    about = "Call functions in other processes by name"
)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (or a `tracing` filter).
    #[arg(long, global = true, env = "DAFFI_LOG", default_value = "info")]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a standalone controller until Ctrl-C or SIGTERM.
    #[command(
        after_help = "Examples:\n  daffi controller --host 0.0.0.0 --port 8888\n  daffi controller --unix-socket /run/app/daffi.sock\n  daffi controller            # Unix socket <temp dir>/daffi/.sock"
    )]
    Controller(Endpoint),
    /// Measure latency and throughput beside a raw frame relay (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// A process `daffi bench` starts.
    #[command(hide = true)]
    BenchRole(bench::RoleArgs),
}

/// Where the controller listens. Neither `--host`/`--port` nor `--unix-socket`: the Unix
/// socket `<temp dir>/daffi/.sock`, as in the library.
#[derive(Args)]
struct Endpoint {
    /// TCP host to listen on.
    #[arg(long, env = "DAFFI_HOST", conflicts_with = "unix_socket")]
    host: Option<String>,
    /// TCP port to listen on (with no host: localhost).
    #[arg(long, env = "DAFFI_PORT", conflicts_with = "unix_socket")]
    port: Option<u16>,
    /// Unix socket path to listen on.
    #[arg(long, env = "DAFFI_UNIX_SOCKET")]
    unix_socket: Option<PathBuf>,
    /// Largest frame accepted, in bytes.
    #[arg(long, env = "DAFFI_MAX_FRAME_SIZE")]
    max_frame_size: Option<usize>,
}

impl Endpoint {
    fn builder(&self) -> daffi::GlobalBuilder {
        let mut b = Global::builder();
        if let Some(host) = &self.host {
            b = b.host(host.clone());
        }
        if let Some(port) = self.port {
            b = b.port(port);
        }
        if let Some(path) = &self.unix_socket {
            b = b.unix_sock_path(path.clone());
        }
        if let Some(limit) = self.max_frame_size {
            b = b.max_frame_size(limit);
        }
        b
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // The benchmark starts its own processes and runtimes.
    let command = match cli.command {
        Command::Bench(args) => return bench::run(args),
        Command::BenchRole(args) => return bench::run_role(args),
        command => command,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("daffi: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Controller(endpoint) => controller(endpoint).await,
            Command::Bench(_) | Command::BenchRole(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("daffi: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn controller(endpoint: Endpoint) -> daffi::Result<()> {
    let g = endpoint
        .builder()
        .init_controller(true)
        .init_node(false)
        .start_async()
        .await?;
    // Scripts and tests read this line to learn the address (and a free port).
    println!("daffi controller listening on {}", g.address());
    shutdown_signal().await;
    tracing::info!("shutting down");
    g.stop();
    Ok(())
}

/// Resolves on Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
