//! Test support: a `daffi controller` process, nodes in the test process, and running
//! the built `daffi` binary against them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use daffi::{Global, GlobalBuilder};

/// The raw client of daffi's own tests: frames, and the control payloads it needs.
#[path = "../../../daffi/tests/common/wire.rs"]
pub mod wire;

/// nats-server processes for the tests, as daffi's own NATS tests start them.
#[path = "../../../daffi/tests/common/nats.rs"]
pub mod nats;
/// Waiting on what nothing signals, for `nats`.
#[path = "../../../daffi/tests/common/poll.rs"]
mod poll;

/// A name no other test (or test process) uses: `<prefix>-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// How long a test waits for anything that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where a controller started by a test listens.
#[derive(Clone)]
pub enum Endpoint {
    Tcp(u16),
    Unix(PathBuf),
}

impl Endpoint {
    /// The flags that point `daffi` at it.
    pub fn flags(&self) -> Vec<String> {
        match self {
            Endpoint::Tcp(port) => vec![
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
            ],
            Endpoint::Unix(path) => vec!["--unix-socket".into(), path.display().to_string()],
        }
    }

    /// A node connected to it.
    pub fn node(&self, name: &str) -> Global {
        self.builder(name).start().expect("node connects")
    }

    /// A builder for a node connected to it.
    pub fn builder(&self, name: &str) -> GlobalBuilder {
        let b = Global::builder().process_name(name).connect_timeout(WAIT);
        match self {
            Endpoint::Tcp(port) => b.host("127.0.0.1").port(*port),
            Endpoint::Unix(path) => b.unix_sock_path(path),
        }
    }
}

/// Starts `daffi controller` with `listen` flags; returns it once it listens.
pub fn start_controller(listen: &[&str]) -> (KillOnDrop, String) {
    start_controller_logging(listen, "warn", Stdio::inherit())
}

/// Like [`start_controller`], logging at `level` to `stderr`.
pub fn start_controller_logging(
    listen: &[&str],
    level: &str,
    stderr: Stdio,
) -> (KillOnDrop, String) {
    let mut child = daffi_command()
        .arg("controller")
        .args(listen)
        .args(["--log-level", level])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn daffi controller");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    (KillOnDrop(child), line)
}

pub fn tcp_controller() -> (KillOnDrop, Endpoint) {
    tcp_controller_with(&[])
}

/// Like [`tcp_controller`], with more flags for `daffi controller`.
pub fn tcp_controller_with(flags: &[&str]) -> (KillOnDrop, Endpoint) {
    let mut listen = vec!["--host", "127.0.0.1", "--port", "0"];
    listen.extend_from_slice(flags);
    let (child, line) = start_controller(&listen);
    (child, tcp_endpoint(&line))
}

/// The endpoint of a TCP controller, from the line it prints once it listens.
pub fn tcp_endpoint(listening: &str) -> Endpoint {
    let port = listening
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {listening:?}"));
    Endpoint::Tcp(port)
}

/// The `daffi` binary, with none of its environment variables inherited.
pub fn daffi_command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_daffi"));
    for var in [
        "DAFFI_HOST",
        "DAFFI_PORT",
        "DAFFI_UNIX_SOCKET",
        "DAFFI_LOG",
        "DAFFI_NATS",
        "DAFFI_NAMESPACE",
        "DAFFI_NATS_CREDENTIALS",
    ] {
        c.env_remove(var);
    }
    c
}

/// Runs `daffi` with `args` and the flags that find `endpoint`.
pub fn daffi(endpoint: &Endpoint, args: &[&str]) -> Output {
    daffi_command()
        .args(args)
        .args(endpoint.flags())
        .output()
        .expect("run daffi")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}
