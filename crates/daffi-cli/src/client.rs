//! What `ls`, `call` and `watch` share: connecting as a node, exit codes, and printing.

use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::time::Duration;

use clap::Args;
use daffi::{Error, Global, GlobalBuilder};

use crate::Endpoint;

/// Exit codes, by what went wrong. `--help` (`exit_codes!` in main.rs) and the README
/// show this table.
pub mod code {
    /// Anything not listed below.
    pub const OTHER: u8 = 1;
    // 2: the command line is wrong; clap exits with it by itself.
    /// No connected node serves the callback (or not the node named with `--on`).
    pub const NO_PROVIDER: u8 = 3;
    /// The node named with `--on` is not connected.
    pub const UNKNOWN_PROCESS: u8 = 4;
    /// No result within `--timeout`.
    pub const TIMEOUT: u8 = 5;
    /// The callback returned an error or panicked.
    pub const REMOTE: u8 = 6;
    /// An argument is not JSON, or the callback could not decode the arguments, or
    /// they are over the frame size limit.
    pub const BAD_ARGUMENTS: u8 = 7;
    /// The controller cannot be reached (or the connection to it was lost).
    pub const UNREACHABLE: u8 = 8;
    /// The node serving the call disconnected or stopped before it answered.
    pub const PEER_DISCONNECTED: u8 = 9;
    /// The connection was refused: token or TLS, or a Unix socket of another user.
    pub const REFUSED: u8 = 10;
    /// The node is too busy to take the call: overloaded, or not reading what is sent
    /// to it (a slow consumer). Retrying later may work.
    pub const BUSY: u8 = 11;
}

/// The exit code for a library error.
pub fn code_of(e: &Error) -> u8 {
    match e {
        Error::NoProvider { .. } => code::NO_PROVIDER,
        Error::UnknownProcess { .. } => code::UNKNOWN_PROCESS,
        Error::Timeout { .. } => code::TIMEOUT,
        Error::Remote { .. } => code::REMOTE,
        Error::BadArguments { .. } | Error::Encode { .. } | Error::PayloadTooLarge { .. } => {
            code::BAD_ARGUMENTS
        }
        Error::ControllerUnreachable { .. } => code::UNREACHABLE,
        Error::PeerDisconnected { .. } | Error::PeerStopped { .. } => code::PEER_DISCONNECTED,
        Error::AuthenticationFailed { .. } | Error::Tls { .. } | Error::UnsafeSocket { .. } => {
            code::REFUSED
        }
        Error::Overloaded { .. } | Error::SlowConsumer { .. } => code::BUSY,
        // The first failed node in name order decides.
        Error::Broadcast { failed, .. } => failed
            .first()
            .map_or(code::OTHER, |(_, first)| code_of(first)),
        _ => code::OTHER,
    }
}

/// Why a subcommand failed: the message for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(code_of(&e), message_of(&e))
    }
}

/// The library's message, with the advice a command-line user can follow: the library
/// advises `wait_function` / `wait_process`, which a command does not offer.
pub fn message_of(e: &Error) -> String {
    match e {
        Error::NoProvider { callback, on: None } => format!(
            "no node serves callback `{callback}`; `daffi ls` lists the callbacks each node serves"
        ),
        Error::NoProvider {
            callback,
            on: Some(node),
        } => format!(
            "node `{node}` does not serve callback `{callback}`; `daffi ls` lists the callbacks each node serves"
        ),
        Error::UnknownProcess { process } => format!(
            "node `{process}` is not connected; `daffi ls` lists the connected nodes to pass to --on"
        ),
        other => other.to_string(),
    }
}

/// How the nodes of `daffi ls`, `call` and `watch` are named, followed by 8 hex digits.
/// The controller logs the joins and leaves of nodes so named at DEBUG, not INFO.
pub const CLI_NODE_PREFIX: &str = "daffi-cli-";

/// Whether `name` is the node of a `daffi` command (hidden by `ls` and `watch` without
/// `--all`).
pub fn is_cli_node(name: &str) -> bool {
    name.strip_prefix(CLI_NODE_PREFIX)
        .is_some_and(|rest| rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Options of every subcommand that connects to a controller as a node.
#[derive(Args)]
pub struct ClientOptions {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// How long to keep trying to reach the controller before giving up (exit code 8).
    #[arg(
        long,
        env = "DAFFI_CONNECT_TIMEOUT",
        default_value = "3s",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub connect_timeout: Duration,
    #[command(flatten)]
    pub security: NodeSecurity,
    #[command(flatten)]
    pub nats: NatsOptions,
}

/// A mesh on a NATS cluster instead of a controller (DESIGN.md section 9).
#[derive(Args)]
pub struct NatsOptions {
    /// Reach a mesh on a NATS cluster instead of a controller: one or more server URLs,
    /// comma-separated (the client learns the cluster's other servers).
    #[arg(
        long,
        env = "DAFFI_NATS",
        value_name = "URLS",
        conflicts_with_all = ["host", "port", "unix_socket"]
    )]
    pub nats: Option<String>,
    /// Which mesh on the NATS cluster (as the library's `namespace`). Default: daffi.
    /// Only with --nats.
    #[arg(long, env = "DAFFI_NAMESPACE", requires = "nats")]
    pub namespace: Option<String>,
    /// A NATS credentials file (`.creds`) to connect with. Only with --nats.
    #[arg(long, env = "DAFFI_NATS_CREDENTIALS", requires = "nats")]
    pub nats_credentials: Option<std::path::PathBuf>,
}

impl NatsOptions {
    fn apply(&self, mut b: GlobalBuilder) -> GlobalBuilder {
        if let Some(urls) = &self.nats {
            b = b.nats(urls.clone());
        }
        if let Some(namespace) = &self.namespace {
            b = b.namespace(namespace.clone());
        }
        if let Some(path) = &self.nats_credentials {
            b = b.nats_credentials(path.clone());
        }
        b
    }
}

/// TLS and the token of a command's node, for a controller that requires them.
#[derive(Args)]
pub struct NodeSecurity {
    /// Use TLS, trusting the system's roots (implied by the other --tls options).
    #[arg(long, env = "DAFFI_TLS")]
    pub tls: bool,
    /// PEM file with the CA(s) the controller's certificate must be signed by.
    #[arg(long, env = "DAFFI_TLS_CA", conflicts_with = "unix_socket")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name to verify in the controller's certificate (default: --host).
    #[arg(long, env = "DAFFI_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Mutual TLS: PEM file with this command's client certificate chain.
    #[arg(long, env = "DAFFI_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// Mutual TLS: PEM file with the key of --tls-client-cert.
    #[arg(long, env = "DAFFI_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<std::path::PathBuf>,
    /// The controller's token. Prefer the environment variable: other users of the
    /// machine can read a command line.
    #[arg(long, env = "DAFFI_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
}

impl NodeSecurity {
    fn apply(&self, mut b: GlobalBuilder) -> GlobalBuilder {
        if self.tls {
            b = b.tls(true);
        }
        if let Some(ca) = &self.tls_ca {
            b = b.tls_ca(ca.clone());
        }
        if let Some(name) = &self.tls_server_name {
            b = b.tls_server_name(name.clone());
        }
        if let Some(cert) = &self.tls_client_cert {
            b = b.tls_client_cert(cert.clone());
        }
        if let Some(key) = &self.tls_client_key {
            b = b.tls_client_key(key.clone());
        }
        if let Some(token) = &self.auth_token {
            b = b.auth_token(token.clone());
        }
        b
    }
}

impl ClientOptions {
    /// A builder for this command's node: a random name `daffi-cli-xxxxxxxx`, no
    /// callbacks of its own.
    pub fn builder(&self) -> GlobalBuilder {
        let b = self.security.apply(self.endpoint.builder());
        self.nats
            .apply(b)
            .process_name(format!("{CLI_NODE_PREFIX}{}", random_suffix()))
            .connect_timeout(self.connect_timeout)
    }

    /// Where the mesh is, for messages: the NATS servers, or the controller's address.
    pub fn mesh_address(&self, g: &Global) -> String {
        match &self.nats.nats {
            Some(urls) => urls.clone(),
            None => g.address().to_string(),
        }
    }

    /// Connects, or fails with the controller-unreachable code.
    pub async fn connect(&self) -> Result<Global, Failure> {
        Ok(self.builder().start_async().await?)
    }
}

/// Parses `5s`, `250ms`, `1m30s`, ... for clap.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    daffi::parse_duration(text).map_err(|e| match e {
        Error::InvalidPeriod(why) => {
            format!("{why}; a duration is a number and a unit, e.g. 250ms, 5s, 1m30s or 2h")
        }
        other => other.to_string(),
    })
}

/// Like [`parse_duration`], for how often something repeats: zero would repeat without
/// pause, so it is a usage error.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    parse_more_than_zero(text, "the interval", "1s or 250ms")
}

/// Like [`parse_duration`], for how long to wait: zero could never be met, so it is a
/// usage error.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    parse_more_than_zero(text, "the timeout", "1ms or 5s")
}

fn parse_more_than_zero(text: &str, what: &str, examples: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("{what} must be more than zero, e.g. {examples}")),
        duration => Ok(duration),
    }
}

fn random_suffix() -> String {
    let n = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{:08x}", n as u32)
}

/// Writes one line to stdout. `false` when stdout is closed (e.g. `| head`): the caller
/// should stop quietly.
pub fn print_line(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_the_nodes_of_daffi_commands() {
        assert!(is_cli_node("daffi-cli-0a1b2c3d"));
        assert!(!is_cli_node("daffi-cli-worker"));
        assert!(!is_cli_node("daffi-cli-0a1b2c3d4"));
        assert!(!is_cli_node("calc"));
        assert!(is_cli_node(&format!(
            "{CLI_NODE_PREFIX}{}",
            random_suffix()
        )));
    }
}
