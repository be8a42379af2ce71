//! The processes `daffi-bench` starts: this same binary re-run as `daffi-bench role ...`.
//!
//! A child prints one line when it is ready (`ready ...`), and exits when its stdin
//! closes. Client children (callers) also read one JSON command per line on stdin and
//! answer with one JSON line on stdout.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors of the benchmark: a message is all the user needs.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Result alias of the benchmark.
pub type Result<T, E = BoxError> = std::result::Result<T, E>;

/// How long a child may take to exit once its stdin is closed before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// Where a controller or relay listens: `tcp:HOST:PORT` or `unix:PATH`; or the
/// nats-server of a mesh on NATS (`nats://HOST:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP host and port (0: any free port, when listening).
    Tcp(String, u16),
    /// A Unix socket path.
    Unix(PathBuf),
    /// The URL of a nats-server.
    Nats(String),
}

impl Endpoint {
    /// A daffi builder aimed at this endpoint.
    pub fn builder(&self) -> daffi::GlobalBuilder {
        let b = daffi::Global::builder();
        match self {
            Endpoint::Tcp(host, port) => b.host(host.clone()).port(*port),
            Endpoint::Unix(path) => b.unix_sock_path(path.clone()),
            Endpoint::Nats(url) => b.nats(url.clone()),
        }
    }

    /// The transport's name, for labels.
    pub fn transport(&self) -> &'static str {
        match self {
            Endpoint::Tcp(..) => "tcp",
            Endpoint::Unix(_) => "unix",
            Endpoint::Nats(_) => "nats",
        }
    }

    /// The endpoint of a daffi address.
    pub fn of_address(address: &daffi::Address) -> std::result::Result<Endpoint, String> {
        match address {
            daffi::Address::Tcp { host, port } => Ok(Endpoint::Tcp(host.clone(), *port)),
            daffi::Address::Unix(path) => Ok(Endpoint::Unix(path.clone())),
            other => Err(format!(
                "daffi-bench runs over TCP or a Unix socket, not {other}"
            )),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(host, port) => write!(f, "tcp:{host}:{port}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Nats(url) => f.write_str(url),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        if s.starts_with("nats://") {
            return Ok(Endpoint::Nats(s.to_string()));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            if let Some((host, port)) = rest.rsplit_once(':') {
                if let Ok(port) = port.parse() {
                    return Ok(Endpoint::Tcp(host.to_string(), port));
                }
            }
        }
        Err(format!(
            "`{s}` is not an endpoint: write tcp:HOST:PORT or unix:PATH"
        ))
    }
}

/// The error of a socket operation asked of a nats-server's URL.
pub fn not_a_socket(url: &str) -> std::io::Error {
    std::io::Error::other(format!(
        "{url} is a nats-server, not a socket of daffi-bench's; use --nats"
    ))
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident now (`VmRSS`), MiB.
    pub rss_mib: f64,
    /// Peak resident (`VmHWM`), MiB.
    pub peak_mib: f64,
    /// Resident anonymous memory now (`RssAnon`), MiB: the process's own, without the
    /// pages of its binary and libraries (`RssFile`), which a bigger binary makes more.
    pub anon_mib: f64,
}

/// Reads the memory figures of process `pid`.
pub fn memory_of(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the memory of process {pid}: {e}"))?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    match (field("VmRSS:"), field("VmHWM:"), field("RssAnon:")) {
        (Some(rss_mib), Some(peak_mib), Some(anon_mib)) => Ok(Memory {
            rss_mib,
            peak_mib,
            anon_mib,
        }),
        _ => Err(format!("no VmRSS/VmHWM/RssAnon in /proc/{pid}/status").into()),
    }
}

/// A child process in a bench role.
pub struct ChildProc {
    name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

impl ChildProc {
    /// Starts `daffi-bench role <args..>`, named `name` in messages.
    pub fn spawn(name: &str, log_level: &str, args: &[String]) -> Result<ChildProc> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("--log-level")
            .arg(log_level)
            .arg("role")
            .args(args);
        Self::spawn_command(name, command)
    }

    /// The path of `program` if it is built beside this one (same directory).
    pub fn beside(program: &str) -> Option<std::path::PathBuf> {
        let path = std::env::current_exe().ok()?.with_file_name(program);
        path.exists().then_some(path)
    }

    /// Starts the program at `path` with `args`, named `name` in messages.
    pub fn spawn_program(name: &str, path: &std::path::Path, args: &[String]) -> Result<ChildProc> {
        let mut command = Command::new(path);
        command.args(args);
        Self::spawn_command(name, command)
    }

    fn spawn_command(name: &str, mut command: Command) -> Result<ChildProc> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| format!("{name}: no stdout"))?;
        Ok(ChildProc {
            name: name.to_string(),
            child: Some(child),
            stdin,
            stdout: Some(BufReader::new(stdout)),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Its memory now.
    pub fn memory(&self) -> Result<Memory> {
        memory_of(self.pid())
    }

    /// Reads the next line the child prints (blocking).
    pub fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        let stdout = self
            .stdout
            .as_mut()
            .ok_or_else(|| format!("{}: stdout closed", self.name))?;
        if stdout.read_line(&mut line)? == 0 {
            let status = self
                .child
                .as_mut()
                .and_then(|c| c.wait().ok())
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown status".into());
            return Err(format!("{} exited ({status}) before answering", self.name).into());
        }
        Ok(line.trim_end().to_string())
    }

    /// Waits for the `ready` line; returns what follows `ready`.
    pub fn ready(&mut self) -> Result<String> {
        let line = self.read_line()?;
        match line.strip_prefix("ready") {
            Some(rest) => Ok(rest.trim().to_string()),
            None => Err(format!("{}: expected `ready`, got {line:?}", self.name).into()),
        }
    }

    /// Sends a command and reads its answer.
    pub fn request<C: Serialize, R: DeserializeOwned>(&mut self, command: &C) -> Result<R> {
        let mut line = serde_json::to_string(command)?;
        line.push('\n');
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("{}: stdin closed", self.name))?;
        stdin.write_all(line.as_bytes())?;
        stdin.flush()?;
        let answer = self.read_line()?;
        let answer: std::result::Result<R, String> = serde_json::from_str(&answer)
            .map_err(|e| format!("{}: bad answer {answer:?}: {e}", self.name))?;
        answer.map_err(|e| format!("{}: {e}", self.name).into())
    }

    /// Closes its stdin (it exits), and waits for it; kills it if it takes too long.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The child's stdout reaches its end when the child exits.
        if let Some(mut stdout) = self.stdout.take() {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut stdout, &mut std::io::sink());
                let _ = tx.send(());
            });
            if rx.recv_timeout(EXIT_GRACE).is_err() {
                eprintln!(
                    "daffi-bench: {} (pid {}) did not exit; killing it",
                    self.name,
                    child.id()
                );
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The answer a client child writes for one command.
pub fn answer<T: Serialize>(result: Result<T>) -> String {
    let result: std::result::Result<T, String> = result.map_err(|e| e.to_string());
    serde_json::to_string(&result).unwrap_or_else(|e| format!("{{\"Err\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        for text in ["tcp:127.0.0.1:8888", "unix:/tmp/x/.sock"] {
            let e: Endpoint = text.parse().expect("valid");
            assert_eq!(e.to_string(), text);
        }
        assert!("127.0.0.1:80".parse::<Endpoint>().is_err());
        assert!("tcp:host:notaport".parse::<Endpoint>().is_err());
    }
}
