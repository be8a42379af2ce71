//! `daffi`: run a standalone controller, and (in later versions) inspect and call a mesh.

use std::io::IsTerminal;
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
        after_help = "Examples:\n  daffi controller --host 0.0.0.0 --port 8888 --tls-cert cert.pem --tls-key key.pem\n  DAFFI_AUTH_TOKEN=$(cat token) daffi controller --host 0.0.0.0 --port 8888 --tls-cert cert.pem --tls-key key.pem\n  daffi controller --unix-socket /run/app/daffi.sock\n  daffi controller            # Unix socket <temp dir>/daffi/.sock\n\nBeyond loopback, use TLS and a token: see docs/SECURITY.md."
    )]
    Controller(ControllerArgs),
}

/// `daffi controller`: where it listens, and how it protects itself.
#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    #[command(flatten)]
    security: ControllerSecurity,
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
        // Colours only on a terminal: log files and journald get plain `key=value`.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("daffi: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Controller(args) => controller(args).await,
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

async fn controller(args: ControllerArgs) -> daffi::Result<()> {
    let g = args
        .security
        .apply(args.endpoint.builder())
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
