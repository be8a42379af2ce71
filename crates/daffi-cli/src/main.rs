//! `daffi`: run a standalone controller; list, call and watch the nodes of a mesh.

mod call;
mod client;
mod json;
mod ls;
mod watch;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use daffi::Global;

use client::Failure;

/// How every subcommand finds the controller, for `--help`.
macro_rules! finding_the_controller {
    () => {
        "Finding the controller (the same way as the library):\n\
         \x20 --host/--port (DAFFI_HOST, DAFFI_PORT)   TCP; a port alone means localhost\n\
         \x20 --unix-socket (DAFFI_UNIX_SOCKET)        a Unix socket\n\
         \x20 neither                                  the Unix socket <temp dir>/daffi/.sock\n\
         \x20 --nats URLS (DAFFI_NATS)                 a mesh on a NATS cluster, not a controller;\n\
         \x20   --namespace (DAFFI_NAMESPACE)          which mesh on it (default: daffi)"
    };
}

/// The exit codes, for `--help` (the values are in `client::code`).
macro_rules! exit_codes {
    () => {
        "Exit codes:\n\
         \x20 0  success\n\
         \x20 1  other errors\n\
         \x20 2  usage: unknown option, missing or malformed value\n\
         \x20 3  no connected node serves the callback (or not the node given with --on)\n\
         \x20 4  the node given with --on is not connected\n\
         \x20 5  timeout (--timeout passed with no result)\n\
         \x20 6  the callback failed: it returned an error or panicked\n\
         \x20 7  bad arguments: an ARG is not JSON, the callback cannot decode them, or too large\n\
         \x20 8  the controller (or every NATS server) is unreachable\n\
         \x20 9  the node serving the call disconnected or stopped before it answered\n\
         \x20 10 the controller refused this command: wrong or missing token, or TLS mismatch\n\
         \x20 11 the node is busy: overloaded, or not reading what is sent to it; retry later"
    };
}

#[derive(Parser)]
#[command(
    name = "daffi",
    version,
    about = "Call functions in other processes by name",
    after_help = concat!(
        "Examples:\n",
        "  daffi controller --port 8888     # a standalone controller\n",
        "  daffi ls --port 8888             # the nodes and their callbacks\n",
        "  daffi call add 1 2 --port 8888   # JSON in, JSON out: 3\n",
        "  daffi watch --port 8888          # joins, leaves and call counts, live\n\n",
        finding_the_controller!(),
        "\n\n",
        exit_codes!(),
        "\n\nThe benchmark is its own program, not part of this one:\n",
        "  cargo run --release -p daffi-bench -- --quick   (see BENCHMARKS.md)",
    )
)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (or a `tracing` filter). Default:
    /// info for `controller`, warn for the others.
    #[arg(long, global = true, env = "DAFFI_LOG")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a standalone controller until Ctrl-C or SIGTERM.
    #[command(
        after_help = "Examples:\n  daffi controller --host 0.0.0.0 --port 8888 --tls-cert cert.pem --tls-key key.pem\n  DAFFI_AUTH_TOKEN=$(cat token) daffi controller --host 0.0.0.0 --port 8888 --tls-cert cert.pem --tls-key key.pem\n  daffi controller --unix-socket /run/app/daffi.sock\n  daffi controller            # Unix socket <temp dir>/daffi/.sock\n\nBeyond loopback, use TLS and a token: see docs/SECURITY.md."
    )]
    Controller(ControllerArgs),
    /// List the connected nodes and the callbacks each serves.
    #[command(after_help = concat!(
        "Examples:\n",
        "  daffi ls --port 8888\n",
        "  NODE  CALLBACKS\n",
        "  calc  add, greet\n",
        "  daffi ls --json      # [{\"name\":\"calc\",\"callbacks\":[\"add\",\"greet\"]}]\n\n",
        finding_the_controller!(),
        "\n\nExit codes: 0 success, 8 the controller is unreachable, 1 other errors.",
    ))]
    Ls(ls::LsArgs),
    /// Call a callback with JSON arguments and print its result as JSON.
    #[command(after_help = concat!(
        "Examples:\n",
        "  daffi call add 1 2                    # 3\n",
        "  daffi call greet '\"Ann\"'              # \"hello Ann\"\n",
        "  daffi call cfg '{\"k\": 1}'             # a map argument\n",
        "  daffi call whoami --broadcast         # {\"calc\":..,\"calc2\":..}\n",
        "  daffi call add 1 2 --on calc2 --timeout 5s\n",
        "  daffi call log '\"hi\"' --no-return\n",
        "  daffi call greet --named '{\"name\": \"Ann\"}'\n",
        "\n",
        "Results: JSON; binary data prints as an array of bytes, a non-string map key as\n",
        "its JSON text. Errors go to stderr.\n",
        "\n",
        exit_codes!(),
        "\nA broadcast prints the results it got and exits with the code of the first\n",
        "failed node (by name).\n\n",
        finding_the_controller!(),
    ))]
    Call(call::CallArgs),
    /// Show nodes joining and leaving, and call counts per callback, until Ctrl-C.
    #[command(after_help = concat!(
        "Examples:\n",
        "  daffi watch --port 8888\n",
        "  23:01:23  watching tcp://localhost:8888 as daffi-cli-1f3a9c2e (Ctrl-C to stop)\n",
        "  23:01:23  member   calc  add, greet\n",
        "  23:01:25  joined   calc2  add\n",
        "  23:01:26  calls    add  3 (+3)\n",
        "  23:01:30  left     calc2\n",
        "  daffi watch --json   # one object per line: {\"event\":\"joined\",\"node\":..}\n",
        "\n",
        "Events: watching (first line), member (connected at start), joined, updated\n",
        "(callbacks changed), left, calls (a callback's total and new calls since the\n",
        "last report), other_calls (the same for every name not listed: names no node\n",
        "serves any more, whose counts move there, and the least called ones when there\n",
        "are too many to list), disconnected/connected (this command's link to the\n",
        "controller). Over NATS there are no call counts: no controller counts the calls.\n\n",
        finding_the_controller!(),
        "\n\nExit codes: 0 stopped by Ctrl-C or SIGTERM, 8 the controller is unreachable,\n",
        "1 other errors.",
    ))]
    Watch(watch::WatchArgs),
}

/// `daffi controller`: where it listens, and how it protects itself.
#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    #[command(flatten)]
    security: ControllerSecurity,
    #[command(flatten)]
    slow_nodes: SlowNodes,
    /// How long, in microseconds, a controller thread keeps polling after it forwarded
    /// the last reply of the calls it had in flight, before it sleeps: a caller's next
    /// call then finds it awake (0: sleep at once). Default: 20.
    #[arg(long, env = "DAFFI_CONTROLLER_LINGER_US", value_name = "MICROSECONDS")]
    linger_us: Option<u64>,
}

/// How much a node that reads too little may cost the controller.
#[derive(Args)]
struct SlowNodes {
    /// Bytes held for one node before requests to it fail with "slow consumer"
    /// (replies and membership events to it may reach twice the larger of this and
    /// --max-frame-size; past that it is disconnected). Default: 64 MiB.
    #[arg(long, env = "DAFFI_MAX_QUEUE_BYTES")]
    max_queue_bytes: Option<usize>,
    /// How long a node may read nothing of what waits for it before it is
    /// disconnected, e.g. 10s or 500ms. Default: 10s.
    #[arg(long, env = "DAFFI_STALL_TIMEOUT", value_name = "DURATION", value_parser = client::parse_duration)]
    stall_timeout: Option<std::time::Duration>,
}

impl SlowNodes {
    fn apply(&self, mut b: daffi::GlobalBuilder) -> daffi::GlobalBuilder {
        if let Some(bytes) = self.max_queue_bytes {
            b = b.max_queue_bytes(bytes);
        }
        if let Some(timeout) = self.stall_timeout {
            b = b.stall_timeout(timeout);
        }
        b
    }
}

/// TLS and the auth token of a standalone controller.
#[derive(Args)]
struct ControllerSecurity {
    /// PEM file with the controller's certificate chain (leaf first). With --tls-key,
    /// only TLS connections are accepted (TCP only).
    #[arg(
        long,
        env = "DAFFI_TLS_CERT",
        requires = "tls_key",
        conflicts_with = "unix_socket"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert.
    #[arg(long, env = "DAFFI_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: PEM file with the CA(s) that must have signed every node's client
    /// certificate. Nodes without one are refused.
    #[arg(long, env = "DAFFI_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// The token every node must present. Prefer the environment variable: other users
    /// of the machine can read a command line.
    #[arg(long, env = "DAFFI_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
}

impl ControllerSecurity {
    fn apply(&self, mut b: daffi::GlobalBuilder) -> daffi::GlobalBuilder {
        if let Some(cert) = &self.tls_cert {
            b = b.tls_cert(cert.clone());
        }
        if let Some(key) = &self.tls_key {
            b = b.tls_key(key.clone());
        }
        if let Some(ca) = &self.tls_client_ca {
            b = b.tls_client_ca(ca.clone());
        }
        if let Some(token) = &self.auth_token {
            b = b.auth_token(token.clone());
        }
        b
    }
}

/// Where the controller listens (or where to find it). Neither `--host`/`--port` nor
/// `--unix-socket`: the Unix socket `<temp dir>/daffi/.sock`, as in the library.
#[derive(Args)]
struct Endpoint {
    /// TCP host of the controller.
    #[arg(long, env = "DAFFI_HOST", conflicts_with = "unix_socket")]
    host: Option<String>,
    /// TCP port of the controller (with no host: localhost).
    #[arg(long, env = "DAFFI_PORT", conflicts_with = "unix_socket")]
    port: Option<u16>,
    /// Unix socket path of the controller.
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
    let default_level = match cli.command {
        Command::Controller(_) => "info",
        _ => "warn",
    };
    let level = cli.log_level.as_deref().unwrap_or(default_level);
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and journald get plain `key=value`.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let command = cli.command;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("daffi: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Controller(args) => controller(args).await.map_err(Failure::from),
            Command::Ls(args) => ls::run(args).await,
            Command::Call(args) => call::run(args).await,
            Command::Watch(args) => watch::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("daffi: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn controller(args: ControllerArgs) -> daffi::Result<()> {
    let mut builder = args
        .slow_nodes
        .apply(args.security.apply(args.endpoint.builder()));
    if let Some(us) = args.linger_us {
        builder = builder.controller_linger(std::time::Duration::from_micros(us));
    }
    let g = builder
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
pub(crate) async fn shutdown_signal() {
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
