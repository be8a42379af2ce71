//! Test support: a controller in the test process and worker nodes in separate child
//! processes that talk to it over real sockets.
//!
//! A worker is this same test binary, re-run with `--exact <entry> --ignored` and the
//! role in environment variables; it exits when the test kills it or when its stdin
//! closes (the test process died).
#![allow(dead_code)]

#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "nats")]
pub mod nats_jwt;
pub mod pki;
pub mod poll;
pub mod wire;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use daffi::{Address, Global, GlobalBuilder};

/// How long a test waits for anything that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(20);

/// Environment variables a worker reads.
pub const ENV_ROLE: &str = "DAFFI_TEST_ROLE";
pub const ENV_NAME: &str = "DAFFI_TEST_NAME";
pub const ENV_ADDR: &str = "DAFFI_TEST_ADDR";
/// In a child: the node it calls.
pub const ENV_TARGET: &str = "DAFFI_TEST_TARGET";

/// Which transport a cluster uses.
#[derive(Debug, Clone, Copy)]
pub enum Transport {
    Tcp,
    Unix,
}

/// A controller (with a caller node) in this process, and workers in child processes.
pub struct Cluster {
    pub caller: Global,
    pub address: Address,
    /// The name of the test binary's entry that runs a worker.
    entry: &'static str,
    workers: Vec<Worker>,
}

/// A worker process; killed when dropped.
pub struct Worker {
    pub name: String,
    /// `None` once reaped.
    child: Option<Child>,
}

impl Worker {
    /// Kills the process and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id, while it is not reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits (bounded) for the process to exit by itself, and checks that it succeeded.
    pub fn wait_success(&mut self) {
        let Some(mut child) = self.child.take() else {
            panic!("{} was already reaped", self.name)
        };
        let (tx, rx) = std::sync::mpsc::channel();
        // `Child::wait` closes stdin first, which tells the child its test is gone: keep
        // it open until the child exits by itself. The child still exits when this test
        // process does, so a wait that outlives the timeout below ends then.
        let stdin = child.stdin.take();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
            drop(stdin);
        });
        match rx.recv_timeout(WAIT) {
            Ok(Ok(status)) => assert!(status.success(), "{} exited with {status}", self.name),
            Ok(Err(e)) => panic!("waiting for {}: {e}", self.name),
            Err(_) => panic!("{} did not exit within {WAIT:?}", self.name),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A unique name for this test run.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A builder aimed at `address`.
pub fn builder_for(address: &Address) -> GlobalBuilder {
    let b = Global::builder().connect_timeout(WAIT);
    match address {
        Address::Tcp { host, port } => b.host(host.clone()).port(*port),
        Address::Unix(path) => b.unix_sock_path(path.clone()),
        other => panic!("no test uses {other}"),
    }
}

fn encode_address(address: &Address) -> String {
    match address {
        Address::Tcp { host, port } => format!("tcp:{host}:{port}"),
        Address::Unix(path) => format!("unix:{}", path.display()),
        other => panic!("no test uses {other}"),
    }
}

/// A number a test gave its child in the environment variable `name`, if it did.
pub fn setting(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().expect("a number"))
}

/// The address a worker was given.
pub fn address_from_env() -> Address {
    let raw = std::env::var(ENV_ADDR).expect("worker started without an address");
    if let Some(path) = raw.strip_prefix("unix:") {
        return Address::Unix(PathBuf::from(path));
    }
    let rest = raw.strip_prefix("tcp:").expect("address is tcp: or unix:");
    let (host, port) = rest.rsplit_once(':').expect("host:port");
    Address::Tcp {
        host: host.to_string(),
        port: port.parse().expect("port"),
    }
}

/// A standalone controller in a child process (role `controller`) on a Unix socket.
pub struct StandaloneController {
    pub address: Address,
    entry: &'static str,
    process: Option<Worker>,
}

impl StandaloneController {
    /// Starts `daffi`'s controller in a child process on a fresh socket path. Nodes
    /// started afterwards wait for it (their `connect_timeout`), so no readiness signal
    /// is needed.
    pub fn start(entry: &'static str) -> StandaloneController {
        let address = Address::Unix(
            std::env::temp_dir()
                .join("daffi-tests")
                .join(format!("{}.sock", unique("standalone"))),
        );
        let mut c = StandaloneController {
            address,
            entry,
            process: None,
        };
        c.restart();
        c
    }

    /// Like [`StandaloneController::start`], over TCP on a free port of 127.0.0.1 that
    /// stays the same across restarts.
    pub fn start_tcp(entry: &'static str) -> StandaloneController {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut c = StandaloneController {
            address: Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            entry,
            process: None,
        };
        c.restart();
        c
    }

    /// The controller process's id.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Worker::pid)
    }

    /// Kills the controller process (like a crash: no goodbye, the socket file stays).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts a new controller process on the same address.
    pub fn restart(&mut self) {
        self.kill();
        self.process = Some(spawn_child(
            self.entry,
            "controller",
            "controller",
            &self.address,
        ));
    }
}

/// In a child: runs the controller role until killed.
pub fn run_controller_role() {
    let g = builder_for(&address_from_env())
        .init_controller(true)
        .init_node(false)
        .start()
        .expect("controller starts");
    g.join().expect("join");
}

/// In a child: a node named by [`ENV_NAME`], serving this binary's `#[callback]`
/// functions, until killed.
pub fn run_worker_role() {
    builder_for(&address_from_env())
        .process_name(std::env::var(ENV_NAME).expect("name"))
        .start()
        .expect("worker starts")
        .join()
        .expect("join");
}

/// A child controller's queue limit (`max_queue_bytes`), set by
/// [`spawn_limited_controller`].
const ENV_QUEUE_BYTES: &str = "DAFFI_TEST_MAX_QUEUE_BYTES";
/// A child controller's stall timeout in milliseconds, set by
/// [`spawn_limited_controller`].
const ENV_STALL_MS: &str = "DAFFI_TEST_STALL_MS";

/// Starts the test binary `entry` as a standalone controller at `address` (its
/// "controller" role running [`run_limited_controller_role`]) with these limits.
pub fn spawn_limited_controller(
    entry: &str,
    address: &Address,
    queue_bytes: usize,
    stall: Duration,
) -> Worker {
    let queue = queue_bytes.to_string();
    let stall = stall.as_millis().to_string();
    spawn_child_with(
        entry,
        "controller",
        "controller",
        address,
        &[(ENV_QUEUE_BYTES, &queue), (ENV_STALL_MS, &stall)],
    )
}

/// In a child: a standalone controller with the queue limit and stall timeout given by
/// [`spawn_limited_controller`], until killed.
pub fn run_limited_controller_role() {
    let setting =
        |name: &str| -> usize { std::env::var(name).expect(name).parse().expect("a number") };
    let g = builder_for(&address_from_env())
        .init_controller(true)
        .init_node(false)
        .max_queue_bytes(setting(ENV_QUEUE_BYTES))
        .stall_timeout(Duration::from_millis(setting(ENV_STALL_MS) as u64))
        .start()
        .expect("controller starts");
    g.join().expect("join");
}

impl Cluster {
    /// A caller node in this process, connected to a standalone controller.
    pub fn with_standalone(controller: &StandaloneController) -> Cluster {
        let caller = builder_for(&controller.address)
            .process_name(unique("caller"))
            .start()
            .expect("caller connects");
        Cluster {
            address: controller.address.clone(),
            caller,
            entry: controller.entry,
            workers: Vec::new(),
        }
    }

    /// Starts a controller and a caller node in this process. `entry` is the name of the
    /// ignored test that runs a worker in this binary.
    pub fn start(transport: Transport, entry: &'static str) -> Cluster {
        let builder = match transport {
            Transport::Tcp => Global::builder().host("127.0.0.1"),
            Transport::Unix => Global::builder().unix_sock_path(
                std::env::temp_dir()
                    .join("daffi-tests")
                    .join(format!("{}.sock", unique("ctl"))),
            ),
        };
        let caller = builder
            .process_name(unique("caller"))
            .init_controller(true)
            .start()
            .expect("controller and caller start");
        Cluster {
            address: caller.address().clone(),
            caller,
            entry,
            workers: Vec::new(),
        }
    }

    /// Starts a worker process called `name` (role `worker`) and waits until the caller
    /// knows it and its callbacks.
    pub fn spawn_worker(&mut self, name: &str) -> &mut Worker {
        self.spawn_role(name, "worker")
    }

    /// Starts a child process in `role` and waits for its node to appear.
    pub fn spawn_role(&mut self, name: &str, role: &str) -> &mut Worker {
        let worker = spawn_child(self.entry, role, name, &self.address);
        self.caller
            .wait_process_timeout(name, WAIT)
            .expect("worker connects");
        self.workers.push(worker);
        self.workers.last_mut().expect("just pushed")
    }

    /// The worker called `name`.
    pub fn worker(&mut self, name: &str) -> &mut Worker {
        self.workers
            .iter_mut()
            .find(|w| w.name == name)
            .expect("no such worker")
    }
}

/// Starts a worker child of test binary `entry` (role `worker`), named `prefix` and a
/// unique part, with the extra environment `env`, and waits until `g` knows it.
pub fn spawn_known_worker(
    entry: &str,
    address: &Address,
    g: &Global,
    prefix: &str,
    env: &[(&str, &str)],
) -> (String, Worker) {
    let name = unique(prefix);
    let worker = spawn_child_with(entry, "worker", &name, address, env);
    g.wait_process_timeout(&name, WAIT).expect("worker joins");
    (name, worker)
}

/// Starts this test binary as a child in `role`.
pub fn spawn_child(entry: &str, role: &str, name: &str, address: &Address) -> Worker {
    spawn_child_with(entry, role, name, address, &[])
}

/// Like [`spawn_child`], with extra environment variables.
pub fn spawn_child_with(
    entry: &str,
    role: &str,
    name: &str,
    address: &Address,
    env: &[(&str, &str)],
) -> Worker {
    let address = encode_address(address);
    let mut env = env.to_vec();
    env.push((ENV_ADDR, &address));
    spawn_role_child(entry, role, name, &env)
}

/// Starts this test binary as a child in `role`, called `name`, with the environment
/// variables `env` (and no controller address: for other meshes, like NATS).
pub fn spawn_role_child(entry: &str, role: &str, name: &str, env: &[(&str, &str)]) -> Worker {
    let child = Command::new(std::env::current_exe().expect("test binary path"))
        .envs(env.iter().copied())
        .args([entry, "--exact", "--ignored", "--nocapture", "--quiet"])
        .env(ENV_ROLE, role)
        .env(ENV_NAME, name)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn worker");
    Worker {
        name: name.to_string(),
        child: Some(child),
    }
}

/// Stops process `pid`, a child of this one, with SIGSTOP; returns once all of it has
/// stopped. Sending the signal only asks: each thread stops when it next takes it, and
/// one that runs, or waits for a CPU on a loaded machine, may go on working (reading,
/// forwarding) for a while after `kill` returned.
pub fn pause(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("a pid");
    // SAFETY: plain system calls on our own child, with a valid status pointer.
    let (sent, waited, status) = unsafe {
        let sent = libc::kill(pid, libc::SIGSTOP);
        let mut status = 0;
        let waited = libc::waitpid(pid, &mut status, libc::WUNTRACED);
        (sent, waited, status)
    };
    assert_eq!(sent, 0, "kill -STOP {pid}");
    assert!(
        waited == pid && libc::WIFSTOPPED(status),
        "{pid} did not stop (waitpid {waited}, status {status:#x})"
    );
}

/// Resumes process `pid` after [`pause`].
pub fn resume(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("a pid");
    // SAFETY: a plain system call.
    let sent = unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(sent, 0, "kill -CONT {pid}");
}

/// Peak resident memory of a process in KiB, from /proc (`None` where there is none).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What callbacks in a worker record, for a test in another process to wait on.
pub struct Log<T> {
    items: std::sync::Mutex<Vec<T>>,
    changed: std::sync::Condvar,
}

impl<T: Clone> Log<T> {
    pub const fn new() -> Self {
        Log {
            items: std::sync::Mutex::new(Vec::new()),
            changed: std::sync::Condvar::new(),
        }
    }

    pub fn push(&self, item: T) {
        self.items.lock().expect("lock").push(item);
        self.changed.notify_all();
    }

    /// Waits until `ready` holds for the items (or `timeout_ms` passes); returns them.
    pub fn wait_until(&self, timeout_ms: u64, ready: impl Fn(&[T]) -> bool) -> Vec<T> {
        let guard = self.items.lock().expect("lock");
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, Duration::from_millis(timeout_ms), |items| {
                !ready(items)
            })
            .expect("lock");
        guard.clone()
    }
}

impl Log<(String, u64)> {
    /// The `i` of the items logged under `tag`, in the order they were logged, once
    /// `want` are (or after `timeout_ms`).
    pub fn tagged(&self, tag: &str, want: usize, timeout_ms: u64) -> Vec<u64> {
        let of_tag = |items: &[(String, u64)]| items.iter().filter(|(t, _)| t == tag).count();
        self.wait_until(timeout_ms, |items| of_tag(items) >= want)
            .into_iter()
            .filter(|(t, _)| t == tag)
            .map(|(_, i)| i)
            .collect()
    }
}

/// In a child whose own `#[tokio::main]` runs it: its node, started from its
/// environment with `start_async`, and the node named in [`ENV_TARGET`], once known.
pub async fn async_child_and_target() -> (Global, String) {
    let target = std::env::var(ENV_TARGET).expect("target");
    let g = builder_for(&address_from_env())
        .process_name(std::env::var(ENV_NAME).expect("name"))
        .start_async()
        .await
        .expect("async caller starts");
    g.wait_process_timeout_async(&target, WAIT)
        .await
        .expect("target known");
    (g, target)
}

/// The first of `0..n` not in its place in `sorted` (calls numbered from 0 that each
/// ran once, sorted): one missing or repeated. `None` when the first `n` are all there.
pub fn first_missing(sorted: &[u64], n: u64) -> Option<u64> {
    (0..n)
        .zip(sorted)
        .find(|(want, got)| want != *got)
        .map(|(want, _)| want)
}

/// In a child: schedules `tick(tag)` every `every` on the node named in
/// [`ENV_TARGET`], then stops, so that the schedule outlives its creator.
pub fn schedule_tick_and_stop(tag: &str, every: Duration) {
    let target = std::env::var(ENV_TARGET).expect("target");
    let g = builder_for(&address_from_env())
        .process_name(std::env::var(ENV_NAME).expect("name"))
        .start()
        .expect("scheduler starts");
    g.wait_process_timeout(&target, WAIT).expect("target known");
    let _task = g
        .call("tick")
        .args((tag,))
        .on(&target)
        .period(daffi::Period::every(every))
        .expect("schedule");
    g.stop();
}

/// In a child started by a test: runs the function of its role in `roles` (after
/// arranging to exit with the test). Does nothing when the helper test is run by hand.
pub fn run_role(roles: &[(&str, fn())]) {
    let Some(role) = child_role() else {
        return;
    };
    match roles.iter().find(|(name, _)| *name == role) {
        Some((_, run)) => run(),
        None => panic!("unknown role {role}"),
    }
}

/// In a child started by a test: its role (after arranging to exit with the test).
/// `None` when the helper test is run by hand.
pub fn child_role() -> Option<String> {
    let Ok(role) = std::env::var(ENV_ROLE) else {
        eprintln!("this helper is started by other tests as a child process; nothing to do alone");
        return None;
    };
    exit_when_parent_dies();
    logs_from_env();
    Some(role)
}

/// Logs of this process to stderr when `RUST_LOG` is set (`RUST_LOG=daffi=debug cargo
/// test ...`): to see what a failing test's nodes did.
pub fn logs_from_env() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_env_filter(filter)
            .try_init();
    }
}

/// In a worker: exits the process when stdin closes, so that no worker outlives its test.
pub fn exit_when_parent_dies() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while let Ok(n) = std::io::stdin().read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        std::process::exit(0);
    });
}

/// What a child's `Global` is built with over NATS: its servers, namespace and name,
/// from its environment.
#[cfg(feature = "nats")]
pub fn nats_child_builder() -> daffi::GlobalBuilder {
    daffi::Global::builder()
        .nats(std::env::var(nats::ENV_NATS).expect("servers"))
        .namespace(std::env::var(nats::ENV_NAMESPACE).expect("namespace"))
        .process_name(std::env::var(ENV_NAME).expect("name"))
        .connect_timeout(WAIT)
}

/// The processor time this thread has used (whether a waiting thread spun).
pub fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to; CLOCK_THREAD_CPUTIME_ID always exists on
    // Linux.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(read, 0, "clock_gettime");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// What this thread did over a stretch of time (see [`ThreadUsage::now`] and
/// [`ThreadUsage::since`]): the processor time it used, and the times it blocked.
#[derive(Debug, Clone, Copy)]
pub struct ThreadUsage {
    pub cpu: Duration,
    /// Voluntary context switches: a thread that parks to wait blocks; one that spins
    /// does not, even when it yields its processor between looks.
    pub blocks: u64,
}

impl ThreadUsage {
    /// This thread's totals so far.
    pub fn now() -> Self {
        // SAFETY: an all-zero `rusage` is a valid value for `getrusage` to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid `rusage` to write to; RUSAGE_THREAD exists on Linux.
        let read = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        assert_eq!(read, 0, "getrusage");
        ThreadUsage {
            cpu: thread_cpu(),
            blocks: usage.ru_nvcsw as u64,
        }
    }

    /// What this thread did since `before`.
    pub fn since(before: ThreadUsage) -> Self {
        let now = ThreadUsage::now();
        ThreadUsage {
            cpu: now.cpu - before.cpu,
            blocks: now.blocks - before.blocks,
        }
    }

    /// Whether a thread that waited `waits` times spun through (nearly) all of them: it
    /// used at least `cpu` of the processor, or it blocked in at most a quarter of the
    /// waits. The second holds on a machine whose processors are all busy, where a
    /// spinner that yields between looks gets little processor time but never parks; a
    /// thread that parks blocks at least once per wait.
    pub fn spun(&self, cpu: Duration, waits: usize) -> bool {
        self.cpu >= cpu || self.blocks <= waits as u64 / 4
    }
}

/// Whether this machine has processors enough for a waiting thread to spin (see
/// `GlobalBuilder::sync_spin`).
pub fn two_processors_or_more() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}
