//! Security between real processes: TLS with certificates made here by rcgen, mutual
//! TLS, the auth token, and Unix socket files.
//!
//! Controllers run in child processes (this binary, re-run in a role) so that their log
//! lines can be read: each refusal must be logged with the peer's address.

mod common;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Instant;

use common::pki::Pki;
use common::wire::{self, read_frame, Announce, RefuseCode, Refused};
use common::{unique, WAIT};
use daffi::{callback, Address, Error, Global, GlobalBuilder};
use daffi_wire::{Frame, Header, Kind};

/// The ignored test that runs child processes.
const ENTRY: &str = "security_process";

// Environment of a child process, besides common's role, name and address.
const ENV_TLS_CERT: &str = "DAFFI_TEST_TLS_CERT";
const ENV_TLS_KEY: &str = "DAFFI_TEST_TLS_KEY";
const ENV_TLS_CLIENT_CA: &str = "DAFFI_TEST_TLS_CLIENT_CA";
const ENV_TLS_CA: &str = "DAFFI_TEST_TLS_CA";
const ENV_TLS_CLIENT_CERT: &str = "DAFFI_TEST_TLS_CLIENT_CERT";
const ENV_TLS_CLIENT_KEY: &str = "DAFFI_TEST_TLS_CLIENT_KEY";
const ENV_TOKEN: &str = "DAFFI_AUTH_TOKEN";
/// A child started with it may open only this many files (and its controller waits
/// `WAIT` for handshakes, so that idle connections stay).
const ENV_NOFILE: &str = "DAFFI_TEST_NOFILE";
/// The user `nobody`, who owns what the socket-ownership tests hand to "another user".
const NOBODY: u32 = 65534;

/// Extra environment variables for a child.
type Env = Vec<(&'static str, OsString)>;

// ---- callbacks, served by every process of this binary -------------------------------

#[callback]
fn sec_add(a: i64, b: i64) -> i64 {
    a + b
}

#[callback]
fn sec_len(text: String) -> usize {
    text.len()
}

static PROBES: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[callback]
fn probe(n: u64) {
    PROBES.lock().expect("lock").push(n);
}

#[callback]
fn probes() -> Vec<u64> {
    PROBES.lock().expect("lock").clone()
}

static SLEEPING: common::Log<u64> = common::Log::new();

/// Sleeps `ms` (a callback still running when its node is stopped), and returns it.
#[callback]
fn sec_sleep(ms: u64) -> u64 {
    SLEEPING.push(ms);
    std::thread::sleep(std::time::Duration::from_millis(ms));
    ms
}

/// Returns once a `sec_sleep` call runs here (or after `timeout_ms`): how many did.
#[callback]
fn sec_sleeping(timeout_ms: u64) -> usize {
    SLEEPING.wait_until(timeout_ms, |s| !s.is_empty()).len()
}

// ---- child processes -----------------------------------------------------------------

/// Runs a controller or a worker when started by a test; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn security_process() {
    let Ok(role) = std::env::var(common::ENV_ROLE) else {
        eprintln!("security_process is started by other tests; nothing to do alone");
        return;
    };
    common::exit_when_parent_dies();
    if role == "squatter" {
        return squat(&common::address_from_env());
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter("info")
        .try_init();
    let env = |key: &str| std::env::var(key).ok();
    let mut b = match env(common::ENV_ADDR).as_deref() {
        // As the README's first example starts: the default Unix socket.
        Some(DEFAULT_ADDRESS) => Global::builder(),
        _ => common::builder_for(&common::address_from_env()),
    };
    if let Some(files) = env(ENV_NOFILE) {
        limit_open_files(files.parse().expect("a number of files"));
        b = b.handshake_timeout(WAIT);
    }
    let controller_tls = |mut b: GlobalBuilder| {
        if let (Some(cert), Some(key)) = (env(ENV_TLS_CERT), env(ENV_TLS_KEY)) {
            b = b.tls_cert(cert).tls_key(key);
        }
        if let Some(ca) = env(ENV_TLS_CLIENT_CA) {
            b = b.tls_client_ca(ca);
        }
        b
    };
    b = match role.as_str() {
        "controller" => controller_tls(b.init_controller(true).init_node(false)),
        // A controller inside a node, given only the controller's TLS settings.
        "hub" => controller_tls(
            b.init_controller(true)
                .process_name(std::env::var(common::ENV_NAME).expect("hub name")),
        ),
        "worker" => {
            b = b.process_name(std::env::var(common::ENV_NAME).expect("worker name"));
            if let Some(ca) = env(ENV_TLS_CA) {
                b = b.tls_ca(ca);
            }
            if let (Some(cert), Some(key)) = (env(ENV_TLS_CLIENT_CERT), env(ENV_TLS_CLIENT_KEY)) {
                b = b.tls_client_cert(cert).tls_client_key(key);
            }
            b
        }
        other => panic!("unknown role {other}"),
    };
    match b.start() {
        Ok(g) => {
            if role == "hub" {
                serve_as_hub(&g);
            }
            println!("ready {}", encode_address(g.address()));
            std::io::stdout().flush().expect("flush");
            g.join().expect("join");
            println!("joined");
        }
        Err(e) => {
            println!("failed {e}");
            std::io::stdout().flush().expect("flush");
        }
    }
}

/// What a child's address is when it should use the default Unix socket (in its
/// temp directory).
const DEFAULT_ADDRESS: &str = "default";

/// A hub's own callbacks: `sec_relay` makes its node call `sec_add` on another node,
/// and `stop_self` stops it.
fn serve_as_hub(g: &Global) {
    let me = g.clone();
    g.register("sec_relay", move |process: String, a: i64, b: i64| {
        me.call("sec_add")
            .args((a, b))
            .on(&process)
            .timeout(WAIT)
            .fg::<i64>()
            .map_err(|e| e.to_string())
    })
    .expect("register sec_relay");
    let me = g.clone();
    g.register("stop_self", move || me.stop())
        .expect("register stop_self");
}

/// In a child started as root: becomes `nobody`, listens on the Unix socket at
/// `address` as another user would, and holds what connects until killed.
fn squat(address: &Address) {
    let Address::Unix(path) = address else {
        panic!("a squatter needs a Unix socket path")
    };
    // SAFETY: setuid changes this process's user; nothing else here depends on it.
    let rc = unsafe { libc::setuid(NOBODY) };
    assert_eq!(rc, 0, "setuid: {}", std::io::Error::last_os_error());
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind as nobody");
    println!("ready unix:{}", path.display());
    std::io::stdout().flush().expect("flush");
    let mut held = Vec::new();
    for stream in listener.incoming() {
        held.push(stream);
    }
}

/// Lowers this process's limit of open files to `files`.
fn limit_open_files(files: libc::rlim_t) {
    let limit = libc::rlimit {
        rlim_cur: files,
        rlim_max: files,
    };
    // SAFETY: setrlimit reads the struct it is given, nothing else.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

fn encode_address(address: &Address) -> String {
    match address {
        Address::Tcp { host, port } => format!("tcp:{host}:{port}"),
        Address::Unix(path) => format!("unix:{}", path.display()),
        other => panic!("no test uses {other}"),
    }
}

/// A child process of this binary, with its stdout and stderr read line by line.
struct Child {
    name: String,
    child: std::process::Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl Child {
    fn spawn(role: &str, name: &str, address: &str, env: &Env) -> Child {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
        cmd.args([ENTRY, "--exact", "--ignored", "--nocapture", "--quiet"])
            .env(common::ENV_ROLE, role)
            .env(common::ENV_NAME, name)
            .env(common::ENV_ADDR, address)
            .env("RUST_BACKTRACE", "0")
            .env_remove(ENV_TOKEN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn child");
        let lines = |r: Box<dyn Read + Send>| {
            let (tx, rx) = channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().expect("piped")));
        let stderr = lines(Box::new(child.stderr.take().expect("piped")));
        Child {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Waits for the child to report `ready <address>` (returned) or `failed <why>`.
    fn ready(&mut self) -> std::result::Result<String, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    if let Some(address) = line.strip_prefix("ready ") {
                        return Ok(address.to_string());
                    }
                    if let Some(why) = line.strip_prefix("failed ") {
                        return Err(why.to_string());
                    }
                }
                Err(_) => panic!(
                    "{} said neither ready nor failed within {WAIT:?}",
                    self.name
                ),
            }
        }
    }

    /// Waits for a log line (stderr) containing every one of `parts`; returns it.
    fn log_line(&mut self, parts: &[&str]) -> String {
        let matches = |line: &str| parts.iter().all(|p| line.contains(p));
        if let Some(line) = self.seen.iter().find(|l| matches(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{} logged no line with {parts:?} within {WAIT:?}; it logged:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the line `line` on stdout (after [`Child::ready`]).
    fn stdout_line(&mut self, line: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(got) if got == line => return,
                Ok(_) => {}
                Err(_) => panic!("{} printed no `{line}` within {WAIT:?}", self.name),
            }
        }
    }

    /// Waits for the process to exit by itself (its stderr closes), checks that it
    /// succeeded, and returns every line it logged.
    fn log_until_exit(&mut self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{} did not exit within {WAIT:?}; it logged:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
        let status = self.child.wait().expect("wait for the child");
        assert!(status.success(), "{} exited with {status}", self.name);
        self.seen.clone()
    }

    /// Kills the process (like a crash: no cleanup) and waits for it to be gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A controller in a child process.
struct Controller {
    process: Child,
    address: Address,
}

impl Controller {
    /// Starts a controller on `address` (`tcp:127.0.0.1:0` for a free TCP port).
    fn start(address: &str, env: &Env) -> Controller {
        Controller::try_start(address, env).unwrap_or_else(|e| panic!("controller failed: {e}"))
    }

    fn try_start(address: &str, env: &Env) -> std::result::Result<Controller, String> {
        let mut process = Child::spawn("controller", "controller", address, env);
        let bound = process.ready()?;
        let address = parse_address(&bound);
        Ok(Controller { process, address })
    }

    fn tcp(env: &Env) -> Controller {
        Controller::start("tcp:127.0.0.1:0", env)
    }

    fn encoded(&self) -> String {
        encode_address(&self.address)
    }

    /// A node builder aimed at this controller.
    fn node(&self, name: &str) -> GlobalBuilder {
        common::builder_for(&self.address).process_name(name)
    }

    /// Starts a worker child that connects with `env`, and waits until it is connected.
    fn worker(&self, name: &str, env: &Env) -> Child {
        let mut w = Child::spawn("worker", name, &self.encoded(), env);
        if let Err(e) = w.ready() {
            panic!("worker {name} failed to start: {e}");
        }
        w
    }

    fn log_line(&mut self, parts: &[&str]) -> String {
        self.process.log_line(parts)
    }
}

fn parse_address(raw: &str) -> Address {
    if let Some(path) = raw.strip_prefix("unix:") {
        return Address::Unix(PathBuf::from(path));
    }
    let rest = raw.strip_prefix("tcp:").expect("tcp: or unix:");
    let (host, port) = rest.rsplit_once(':').expect("host:port");
    Address::Tcp {
        host: host.to_string(),
        port: port.parse().expect("port"),
    }
}

fn tcp_port(address: &Address) -> u16 {
    match address {
        Address::Tcp { port, .. } => *port,
        _ => panic!("not TCP"),
    }
}

// ---- certificates --------------------------------------------------------------------

/// What the children of these tests are given of the certificates.
impl Pki {
    /// The environment of a TLS controller (and, with `mutual`, of one that asks for
    /// client certificates).
    fn controller_env(&self, mutual: bool) -> Env {
        let mut env = vec![
            (ENV_TLS_CERT, self.path("server.pem").into()),
            (ENV_TLS_KEY, self.path("server.key").into()),
        ];
        if mutual {
            env.push((ENV_TLS_CLIENT_CA, self.path("ca.pem").into()));
        }
        env
    }

    /// The environment of a worker that trusts the CA (and presents a client certificate).
    fn worker_env(&self, client_cert: bool) -> Env {
        let mut env = vec![(ENV_TLS_CA, self.path("ca.pem").into())];
        if client_cert {
            env.push((ENV_TLS_CLIENT_CERT, self.path("client.pem").into()));
            env.push((ENV_TLS_CLIENT_KEY, self.path("client.key").into()));
        }
        env
    }
}

// ---- raw sockets ---------------------------------------------------------------------

/// A `Request` frame, written by hand.
fn request(src: &str, dst: &str, callback: &str, args: &impl serde::Serialize) -> Vec<u8> {
    common::wire::request(src, dst, 7, callback, args)
}

/// Expects the controller to close the connection (after anything it still sends).
fn expect_closed(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected the controller to close the connection: {e}"),
    }
}

/// Reads one frame, then expects the controller to close the connection.
fn read_frame_then_close(stream: &mut TcpStream) -> Frame {
    let frame = read_frame(stream);
    let mut more = [0u8; 1];
    match stream.read(&mut more) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the controller to close the connection, got {other:?}"),
    }
    frame
}

fn refused(frame: &Frame) -> Refused {
    assert_eq!(frame.kind(), Kind::Refused, "expected Refused");
    wire::decode(&frame.payload())
}

/// Asserts that `start` failed at once (not after `connect_timeout` of retries) and
/// returns the error.
fn fails_fast(what: &str, builder: GlobalBuilder) -> Error {
    let began = Instant::now();
    let outcome = builder.connect_timeout(WAIT).start();
    let took = began.elapsed();
    let e = match outcome {
        Ok(_) => panic!("{what}: the node was let in"),
        Err(e) => e,
    };
    assert!(
        took < WAIT,
        "{what}: refused only after {took:?} of retries: {e}"
    );
    e
}

// ---- TLS -----------------------------------------------------------------------------

#[test]
fn calls_work_over_tls() {
    let pki = Pki::new();
    let ctl = Controller::tcp(&pki.controller_env(false));
    let worker = unique("tls-worker");
    let _w = ctl.worker(&worker, &pki.worker_env(false));
    let caller = ctl
        .node(&unique("tls-caller"))
        .tls_ca(pki.path("ca.pem"))
        .start()
        .expect("caller connects over TLS");
    caller
        .wait_process_timeout(&worker, WAIT)
        .expect("worker known");
    let sum: i64 = caller
        .call("sec_add")
        .args((2, 3))
        .on(&worker)
        .fg()
        .expect("call");
    assert_eq!(sum, 5);
    // Large enough to span many TLS records each way.
    let text = "x".repeat(3 * 1024 * 1024);
    let len: usize = caller
        .call("sec_len")
        .args((text,))
        .on(&worker)
        .fg()
        .expect("large call");
    assert_eq!(len, 3 * 1024 * 1024);
    // The controller checks the name: `localhost` is in the certificate too.
    let by_name = Global::builder()
        .host("localhost")
        .port(tcp_port(&ctl.address))
        .process_name(unique("by-name"))
        .tls_ca(pki.path("ca.pem"))
        .connect_timeout(WAIT)
        .start();
    // `localhost` may resolve to ::1 first, where nothing listens; it falls back to
    // 127.0.0.1, so the node must get in.
    by_name.expect("a node connecting by host name verifies the certificate");
}

#[test]
fn a_node_that_trusts_another_ca_is_refused() {
    let pki = Pki::new();
    let mut ctl = Controller::tcp(&pki.controller_env(false));
    let e = fails_fast(
        "other CA",
        ctl.node(&unique("distrustful"))
            .tls_ca(pki.path("other-ca.pem")),
    );
    match &e {
        Error::Tls { message, .. } => {
            assert!(
                message.contains("not signed by a CA this node trusts"),
                "{e}"
            )
        }
        other => panic!("expected Error::Tls, got {other:?}"),
    }
    ctl.log_line(&["TLS handshake failed", "peer=127.0.0.1:"]);

    // The name checked is the host, or tls_server_name.
    let e = fails_fast(
        "wrong name",
        ctl.node(&unique("wrong-name"))
            .tls_ca(pki.path("ca.pem"))
            .tls_server_name("elsewhere.example"),
    );
    assert!(
        matches!(&e, Error::Tls { message, .. } if message.contains("not valid for `elsewhere.example`")),
        "{e}"
    );
}

#[test]
fn plaintext_against_tls_is_refused_cleanly_on_both_sides() {
    let pki = Pki::new();
    let mut ctl = Controller::tcp(&pki.controller_env(false));

    // A daffi node without TLS is told what to do.
    let e = fails_fast("plaintext node", ctl.node(&unique("plain")));
    match &e {
        Error::Tls { message, .. } => assert!(message.contains("requires TLS"), "{e}"),
        other => panic!("expected Error::Tls, got {other:?}"),
    }

    // The same on a raw socket: a Refused frame, then the connection closes; the
    // controller logs the refusal with this socket's address.
    let mut raw = TcpStream::connect(("127.0.0.1", tcp_port(&ctl.address))).expect("connect");
    let me = raw.local_addr().expect("local address").to_string();
    raw.write_all(&common::wire::opening("plain-raw", None, &[]))
        .expect("write");
    let answer = refused(&read_frame_then_close(&mut raw));
    assert_eq!(answer.code, RefuseCode::TlsRequired);
    ctl.log_line(&[
        "refused a connection",
        &format!("peer={me}"),
        "requires TLS",
    ]);

    // The other way round: a TLS node against a plaintext controller.
    let mut plain = Controller::tcp(&Env::new());
    let e = fails_fast(
        "TLS node, plaintext controller",
        plain.node(&unique("tls-node")).tls_ca(pki.path("ca.pem")),
    );
    assert!(
        matches!(e, Error::Tls { .. }),
        "expected Error::Tls, got {e:?}"
    );
    plain.log_line(&[
        "refused a connection",
        "peer=127.0.0.1:",
        "began a TLS handshake",
    ]);
}

#[test]
fn a_silent_peer_is_dropped_after_the_handshake_timeout() {
    let pki = Pki::new();
    let mut ctl = Controller::tcp(&pki.controller_env(false));
    let mut raw = TcpStream::connect(("127.0.0.1", tcp_port(&ctl.address))).expect("connect");
    let me = raw.local_addr().expect("local address").to_string();
    // The first byte of a TLS handshake, then nothing.
    raw.write_all(&[0x16]).expect("write");
    raw.set_read_timeout(Some(WAIT)).expect("read timeout");
    let began = Instant::now();
    let mut buf = [0u8; 64];
    match raw.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the controller to close, got {other:?}"),
    }
    assert!(began.elapsed() < WAIT);
    ctl.log_line(&[
        "did not complete its TLS handshake in time",
        &format!("peer={me}"),
    ]);
}

#[test]
fn mutual_tls_refuses_a_node_without_a_client_certificate() {
    let pki = Pki::new();
    let mut ctl = Controller::tcp(&pki.controller_env(true));
    let worker = unique("mtls-worker");
    let _w = ctl.worker(&worker, &pki.worker_env(true));
    let caller = ctl
        .node(&unique("mtls-caller"))
        .tls_ca(pki.path("ca.pem"))
        .tls_client_cert(pki.path("client.pem"))
        .tls_client_key(pki.path("client.key"))
        .start()
        .expect("a node with a client certificate gets in");
    caller
        .wait_process_timeout(&worker, WAIT)
        .expect("worker known");
    let sum: i64 = caller.call("sec_add").args((1, 1)).fg().expect("call");
    assert_eq!(sum, 2);

    let e = fails_fast(
        "no client certificate",
        ctl.node(&unique("anonymous")).tls_ca(pki.path("ca.pem")),
    );
    match &e {
        Error::Tls { message, .. } => {
            assert!(message.contains("requires a client certificate"), "{e}")
        }
        other => panic!("expected Error::Tls, got {other:?}"),
    }
    ctl.log_line(&["TLS handshake failed", "peer=127.0.0.1:", "no certificates"]);

    let e = fails_fast(
        "client certificate from another CA",
        ctl.node(&unique("forged"))
            .tls_ca(pki.path("ca.pem"))
            .tls_client_cert(pki.path("other-client.pem"))
            .tls_client_key(pki.path("other-client.key")),
    );
    match &e {
        Error::Tls { message, .. } => {
            assert!(
                message.contains("rejected this node's client certificate"),
                "{e}"
            )
        }
        other => panic!("expected Error::Tls, got {other:?}"),
    }
    // Whoever got in still works.
    let sum: i64 = caller.call("sec_add").args((2, 2)).fg().expect("call");
    assert_eq!(sum, 4);
}

#[test]
fn tls_options_are_checked_at_start() {
    let pki = Pki::new();
    let config_error = |b: GlobalBuilder| match b.start() {
        Err(Error::Config(m)) => m,
        other => panic!("expected Error::Config, got {other:?}"),
    };
    let m = config_error(
        Global::builder()
            .host("127.0.0.1")
            .init_controller(true)
            .tls_cert(pki.path("server.pem")),
    );
    assert!(m.contains("tls_key"), "{m}");
    let m = config_error(
        Global::builder()
            .host("127.0.0.1")
            .init_controller(true)
            .init_node(false)
            .tls_cert(pki.path("missing.pem"))
            .tls_key(pki.path("server.key")),
    );
    assert!(m.contains("missing.pem"), "{m}");
    let m = config_error(
        Global::builder()
            .unix_sock_path(pki.path("x.sock"))
            .init_controller(true)
            .tls_cert(pki.path("server.pem"))
            .tls_key(pki.path("server.key")),
    );
    assert!(m.contains("TLS is for TCP"), "{m}");
    let m = config_error(
        Global::builder()
            .host("127.0.0.1")
            .port(1)
            .tls_cert(pki.path("server.pem"))
            .tls_key(pki.path("server.key")),
    );
    assert!(m.contains("tls_client_cert"), "{m}");
    // A controller in a node takes node options for the other nodes: they must fit.
    let m = config_error(
        Global::builder()
            .host("127.0.0.1")
            .init_controller(true)
            .tls_ca(pki.path("ca.pem")),
    );
    assert!(m.contains("no tls_cert and tls_key"), "{m}");
    let m = config_error(
        Global::builder()
            .host("127.0.0.1")
            .init_controller(true)
            .tls_cert(pki.path("server.pem"))
            .tls_key(pki.path("server.key"))
            .tls_client_cert(pki.path("client.pem")),
    );
    assert!(m.contains("both tls_client_cert and tls_client_key"), "{m}");
    let m = config_error(Global::builder().host("127.0.0.1").port(1).auth_token(""));
    assert!(m.contains("empty"), "{m}");
}

// ---- a controller inside a node ------------------------------------------------------

/// A controller inside a node (`init_controller(true)`, as the README's first example
/// starts), in a child process that reads its settings from its environment.
struct Hub {
    process: Child,
    /// Its node's process name.
    name: String,
    address: Address,
}

impl Hub {
    /// Starts a hub on `address` (`tcp:127.0.0.1:0` for a free TCP port,
    /// [`DEFAULT_ADDRESS`] for the default Unix socket) and checks from its log that
    /// its own node joined in-process, under its name.
    fn start(address: &str, env: &Env) -> Hub {
        let name = unique("hub");
        let mut process = Child::spawn("hub", &name, address, env);
        let bound = process
            .ready()
            .unwrap_or_else(|e| panic!("the hub failed to start: {e}"));
        process.log_line(&["node joined", "peer=in-process", &format!("process={name}")]);
        process.log_line(&["connected to the controller", "controller=in-process"]);
        Hub {
            process,
            name,
            address: parse_address(&bound),
        }
    }

    /// A node builder aimed at this hub.
    fn node(&self, name: &str) -> GlobalBuilder {
        common::builder_for(&self.address).process_name(unique(name))
    }
}

/// Calls between `node` (this process) and the hub's own node, both ways: the hub's
/// node serves `sec_add`, and calls this node's `sec_add` from its `sec_relay`.
fn calls_both_ways(node: &Global, hub: &str) {
    node.wait_process_timeout(hub, WAIT)
        .expect("the hub's node is known");
    node.wait_function_timeout("sec_relay", WAIT)
        .expect("sec_relay announced");
    let sum: i64 = node
        .call("sec_add")
        .args((40, 2))
        .on(hub)
        .fg()
        .expect("a call to the hub's node");
    assert_eq!(sum, 42);
    let sum: i64 = node
        .call("sec_relay")
        .args((node.process_name(), 20, 22))
        .on(hub)
        .fg()
        .expect("the hub's node calls this node");
    assert_eq!(sum, 42);
}

#[test]
fn a_controller_in_a_node_with_tls_needs_no_ca_for_its_own_node() {
    let pki = Pki::new();
    // Only the controller's certificate and key: nothing its own node could verify
    // them with (they are not signed by a CA of the system's).
    let mut hub = Hub::start("tcp:127.0.0.1:0", &pki.controller_env(false));
    let node = hub
        .node("tls-worker")
        .tls_ca(pki.path("ca.pem"))
        .start()
        .expect("a node with the CA connects over TLS");
    hub.process.log_line(&[
        "node joined",
        "peer=127.0.0.1:",
        &format!("process={}", node.process_name()),
    ]);
    calls_both_ways(&node, &hub.name);
}

#[test]
fn a_controller_in_a_node_with_mutual_tls_and_a_token_lets_its_own_node_in_without_them() {
    let pki = Pki::new();
    let mut env = pki.controller_env(true);
    env.extend(with_token());
    // The hub's node has neither a client certificate nor, for its own use, the token.
    let hub = Hub::start("tcp:127.0.0.1:0", &env);
    let node = |name: &str| hub.node(name).tls_ca(pki.path("ca.pem"));
    let certified = |b: GlobalBuilder| {
        b.tls_client_cert(pki.path("client.pem"))
            .tls_client_key(pki.path("client.key"))
    };

    // Other nodes need both.
    let e = fails_fast("no client certificate", node("anonymous").auth_token(TOKEN));
    assert!(
        matches!(&e, Error::Tls { message, .. } if message.contains("requires a client certificate")),
        "{e}"
    );
    let e = fails_fast(
        "wrong token",
        certified(node("guesser")).auth_token("guess"),
    );
    assert!(matches!(e, Error::AuthenticationFailed { .. }), "{e:?}");
    if std::env::var(ENV_TOKEN).is_err() {
        let e = fails_fast("no token", certified(node("tokenless")));
        assert!(e.to_string().contains("sent none"), "{e}");
    }
    let member = certified(node("member"))
        .auth_token(TOKEN)
        .start()
        .expect("a node with a client certificate and the token gets in");
    calls_both_ways(&member, &hub.name);
}

#[test]
fn the_readme_start_runs_a_controller_in_a_node_on_the_default_unix_socket() {
    // The hub's temp directory, so that its default socket is this test's own.
    let tmp = FreshDir::new("tmpdir");
    std::fs::create_dir_all(&*tmp).expect("dir");
    let hub = Hub::start(DEFAULT_ADDRESS, &vec![("TMPDIR", tmp.as_os_str().into())]);
    assert_eq!(
        hub.address,
        Address::Unix(tmp.join("daffi").join(".sock")),
        "the default socket"
    );
    let node = hub.node("client").start().expect("a node connects");
    calls_both_ways(&node, &hub.name);
    // Others know the hub's node by its process name, with its callbacks.
    let members = node.members();
    let hub_node = members
        .iter()
        .find(|m| m.name == hub.name)
        .unwrap_or_else(|| panic!("the hub's node is not among {members:?}"));
    assert!(
        ["sec_add", "sec_relay", "stop_self"]
            .iter()
            .all(|c| hub_node.callbacks.iter().any(|have| have == c)),
        "{hub_node:?}"
    );
    assert!(node.registered_callbacks()["sec_add"].contains(&hub.name));
}

#[test]
fn stopping_a_controller_in_a_node_lets_its_running_callback_finish_and_reconnects_nothing() {
    let mut hub = Hub::start("tcp:127.0.0.1:0", &Env::new());
    let node = hub.node("caller").start().expect("a node connects");
    node.wait_function_timeout("stop_self", WAIT)
        .expect("stop_self announced");
    let running = node
        .call("sec_sleep")
        .args((500u64,))
        .on(&hub.name)
        .bg::<u64>()
        .expect("bg");
    let sleeping: usize = node
        .call("sec_sleeping")
        .args((WAIT.as_millis() as u64,))
        .on(&hub.name)
        .fg()
        .expect("sec_sleeping");
    assert_eq!(sleeping, 1, "sec_sleep runs on the hub");
    node.call("stop_self")
        .on(&hub.name)
        .no_return()
        .expect("stop the hub");

    // The callback finishes, and its result is routed before the controller stops.
    assert_eq!(
        running
            .get_timeout(WAIT)
            .expect("the running call finishes"),
        500
    );
    // `join` returns, and the process ends by itself.
    hub.process.stdout_line("joined");
    let log = hub.process.log_until_exit();
    let at = |part: &str| {
        log.iter()
            .position(|l| l.contains(part))
            .unwrap_or_else(|| panic!("no line with {part:?} in:\n{}", log.join("\n")))
    };
    // Its node stopped and said goodbye to its controller: the link closed cleanly.
    at("node stopped");
    let left = &log[at("node left")];
    assert!(
        left.contains(&format!("process={}", hub.name)) && left.contains("said goodbye"),
        "{left}"
    );
    let reconnects: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("reconnecting") || l.contains("lost the controller"))
        .collect();
    assert!(reconnects.is_empty(), "{reconnects:?}");
}

// ---- the auth token ------------------------------------------------------------------

const TOKEN: &str = "correct horse battery staple";

/// Children with the token in `DAFFI_AUTH_TOKEN`, as in production.
fn with_token() -> Env {
    vec![(ENV_TOKEN, TOKEN.into())]
}

#[test]
fn a_wrong_token_is_refused_and_nothing_else_from_the_connection_is_processed() {
    let mut ctl = Controller::tcp(&with_token());
    let worker = unique("token-worker");
    let _w = ctl.worker(&worker, &with_token());
    let caller = ctl
        .node(&unique("token-caller"))
        .auth_token(TOKEN)
        .start()
        .expect("a caller with the token gets in");
    caller
        .wait_process_timeout(&worker, WAIT)
        .expect("worker known");

    // A Hello with a wrong token, followed at once by a request to the worker and a
    // claim to serve a callback.
    let mut raw = TcpStream::connect(("127.0.0.1", tcp_port(&ctl.address))).expect("connect");
    let me = raw.local_addr().expect("local address").to_string();
    let mut bytes = common::wire::opening("intruder", Some("guess"), &["stolen"]);
    bytes.extend(request("intruder", &worker, "probe", &(1u64,)));
    raw.write_all(&bytes).expect("write");
    let answer = refused(&read_frame_then_close(&mut raw));
    assert_eq!(answer.code, RefuseCode::Auth);
    ctl.log_line(&[
        "refused a connection",
        &format!("peer={me}"),
        "wrong auth token",
    ]);

    // Nothing of it was acted on. A call made now reaches the worker after anything the
    // refused connection could have sent, and the membership events it would have
    // caused reach the caller before this call's reply.
    caller
        .call("probe")
        .args((2u64,))
        .on(&worker)
        .fg::<()>()
        .expect("probe");
    let seen: Vec<u64> = caller.call("probes").on(&worker).fg().expect("probes");
    assert_eq!(
        seen,
        vec![2],
        "the refused connection's request was delivered"
    );
    assert!(
        !caller.registered_callbacks().contains_key("stolen"),
        "the refused connection joined"
    );

    // The same without any token.
    let mut raw = TcpStream::connect(("127.0.0.1", tcp_port(&ctl.address))).expect("connect");
    let me = raw.local_addr().expect("local address").to_string();
    raw.write_all(&common::wire::opening("anonymous", None, &[]))
        .expect("write");
    assert_eq!(
        refused(&read_frame_then_close(&mut raw)).code,
        RefuseCode::Auth
    );
    ctl.log_line(&["refused a connection", &format!("peer={me}"), "sent none"]);
}

#[test]
fn wrong_and_missing_tokens_fail_the_node_with_authentication_failed() {
    let ctl = Controller::tcp(&with_token());
    let worker = unique("holder");
    let _w = ctl.worker(&worker, &with_token());

    let e = fails_fast(
        "wrong token",
        ctl.node(&unique("wrong")).auth_token("guess"),
    );
    assert!(matches!(e, Error::AuthenticationFailed { .. }), "{e:?}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    assert!(e.to_string().contains("wrong auth token"), "{e}");

    if std::env::var(ENV_TOKEN).is_err() {
        let e = fails_fast("missing token", ctl.node(&unique("missing")));
        assert!(matches!(e, Error::AuthenticationFailed { .. }), "{e:?}");
        assert!(e.to_string().contains("sent none"), "{e}");
    }

    // A token variable that is set but empty is an error, never "no token".
    let mut empty = Child::spawn(
        "worker",
        &unique("empty"),
        &ctl.encoded(),
        &vec![(ENV_TOKEN, OsString::new())],
    );
    match empty.ready() {
        Err(e) => assert!(e.contains("DAFFI_AUTH_TOKEN is set but empty"), "{e}"),
        Ok(_) => panic!("a node with an empty DAFFI_AUTH_TOKEN started"),
    }

    // Without the token, a connected name can be neither taken nor probed: the answer
    // is the same as for a free name.
    let e = fails_fast(
        "taken name, wrong token",
        ctl.node(&worker).auth_token("guess"),
    );
    assert!(matches!(e, Error::AuthenticationFailed { .. }), "{e:?}");
    let holder = ctl
        .node(&unique("checker"))
        .auth_token(TOKEN)
        .start()
        .expect("checker gets in");
    holder
        .wait_process_timeout(&worker, WAIT)
        .expect("worker known");
    let sum: i64 = holder
        .call("sec_add")
        .args((3, 4))
        .on(&worker)
        .fg()
        .expect("holder unaffected");
    assert_eq!(sum, 7);
}

// ---- file descriptors ------------------------------------------------------------------

#[test]
fn a_controller_out_of_file_descriptors_backs_off_and_logs_boundedly() {
    let mut ctl = Controller::start("tcp:127.0.0.1:0", &vec![(ENV_NOFILE, "64".into())]);
    let port = tcp_port(&ctl.address);
    // More idle connections than the controller has descriptors left: the kernel
    // completes them all, and the controller's accepts begin to fail.
    let flood: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    ctl.log_line(&["accept failed"]);
    // Failing all along, it logs at most one more line in a 3 s window (it used to
    // log about 20 a second).
    let window = std::time::Duration::from_secs(3);
    let end = Instant::now() + window;
    let mut lines = 1;
    while let Ok(line) = ctl
        .process
        .stderr
        .recv_timeout(end.saturating_duration_since(Instant::now()))
    {
        lines += usize::from(line.contains("accept failed"));
        ctl.process.seen.push(line);
    }
    assert!(
        lines <= 2,
        "{lines} `accept failed` lines in {window:?}:\n{}",
        ctl.process.seen.join("\n")
    );
    // Once descriptors are free again, it accepts again.
    drop(flood);
    let _node = ctl
        .node(&unique("after-flood"))
        .start()
        .expect("a node gets in once descriptors are free");
    ctl.log_line(&["accepting connections again"]);
}

// ---- names -----------------------------------------------------------------------------

#[test]
fn names_with_control_characters_are_refused_by_the_builder_and_the_controller() {
    const FORGED: &str = "FORGED controller: node joined";
    let mut ctl = Controller::tcp(&Env::new());
    let port = tcp_port(&ctl.address);

    // The builder and `register` refuse them before anything is sent.
    let e = fails_fast(
        "newline in process_name",
        ctl.node(&format!("evil\n{FORGED}")),
    );
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    assert!(e.to_string().contains("control character"), "{e}");
    let node = ctl.node(&unique("names")).start().expect("node");
    match node.register(&format!("cb\r\n{FORGED}"), || 1) {
        Err(e @ Error::Config(_)) => assert!(e.to_string().contains("control character"), "{e}"),
        other => panic!("expected Error::Config, got {other:?}"),
    }

    // A raw client: the controller refuses such a process name, or callback name, in
    // the Hello, and logs the name escaped, on one line.
    for (name, callbacks) in [
        (format!("evil\n{FORGED}"), vec![]),
        (unique("raw"), vec![format!("cb\n{FORGED}")]),
    ] {
        let mut raw = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let me = raw.local_addr().expect("local address").to_string();
        let callbacks: Vec<&str> = callbacks.iter().map(String::as_str).collect();
        raw.write_all(&common::wire::opening(&name, None, &callbacks))
            .expect("write");
        let answer = refused(&read_frame_then_close(&mut raw));
        assert_eq!(answer.code, RefuseCode::InvalidName, "{}", answer.message);
        assert!(
            answer.message.contains("control character"),
            "{}",
            answer.message
        );
        ctl.log_line(&["refused a connection", &format!("peer={me}"), "\\n"]);
    }

    // A joined raw client whose Announce holds such a name is disconnected, with the
    // reason logged.
    let mut raw = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let rogue = unique("announcer");
    raw.write_all(&common::wire::opening(&rogue, None, &["fine"]))
        .expect("write");
    assert_eq!(read_frame(&mut raw).kind(), Kind::Welcome);
    let body = wire::encode(&Announce {
        callbacks: vec!["fine".into(), format!("cb\n{FORGED}")],
    });
    let mut announce = Header::control(Kind::Announce).encode(body.len()).to_vec();
    announce.extend_from_slice(&body);
    raw.write_all(&announce).expect("write");
    expect_closed(&mut raw);
    ctl.log_line(&[
        "node left",
        &rogue,
        "refused its Announce",
        "control character",
    ]);

    // No line of the controller's log begins with the forged text.
    let forged: Vec<&String> = ctl
        .process
        .seen
        .iter()
        .filter(|l| l.starts_with("FORGED"))
        .collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
}

// ---- Unix sockets --------------------------------------------------------------------

/// A directory that does not exist yet, removed (with what is in it) when dropped.
/// Declare it before the processes that use it, so that it is dropped after them.
struct FreshDir(PathBuf);

impl FreshDir {
    fn new(prefix: &str) -> FreshDir {
        FreshDir(
            std::env::temp_dir()
                .join("daffi-tests")
                .join(unique(prefix)),
        )
    }
}

impl std::ops::Deref for FreshDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for FreshDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn a_second_controller_on_a_live_unix_socket_fails_while_the_first_keeps_serving() {
    let dir = FreshDir::new("live");
    let sock = dir.join("ctl.sock");
    let address = format!("unix:{}", sock.display());
    let mut first = Controller::start(&address, &Env::new());
    let worker = unique("unix-worker");
    let _w = first.worker(&worker, &Env::new());

    // In this process, and as another process.
    let second = Global::builder()
        .unix_sock_path(&sock)
        .init_controller(true)
        .init_node(false)
        .start();
    match second {
        Err(Error::Bind { source, .. }) => {
            assert!(source.to_string().contains("already listens"), "{source}")
        }
        other => panic!("expected Error::Bind, got {other:?}"),
    }
    match Controller::try_start(&address, &Env::new()) {
        Err(e) => assert!(e.contains("already listens"), "{e}"),
        Ok(_) => panic!("a second controller process took a live socket"),
    }

    // The first still serves: its node is reachable, and new nodes get in.
    let caller = first
        .node(&unique("after"))
        .start()
        .expect("a new node connects to the first controller");
    caller
        .wait_process_timeout(&worker, WAIT)
        .expect("worker known");
    let sum: i64 = caller
        .call("sec_add")
        .args((5, 6))
        .on(&worker)
        .fg()
        .expect("call");
    assert_eq!(sum, 11);
    assert_eq!(mode(&sock) & 0o777, 0o600);
    drop(caller);

    // A crashed controller leaves its socket file: the next one replaces it.
    first.process.kill();
    assert!(
        std::fs::symlink_metadata(&sock).is_ok(),
        "a killed controller leaves its socket"
    );
    let mut next = Controller::start(&address, &Env::new());
    next.log_line(&["replacing a stale socket file"]);
    let _again = next
        .node(&unique("next"))
        .start()
        .expect("a node connects to the new controller");
}

#[test]
fn unix_socket_directory_and_file_are_owner_only() {
    let root = FreshDir::new("perm");
    let sock = root.join("a").join("b").join("ctl.sock");
    let g = Global::builder()
        .unix_sock_path(&sock)
        .init_controller(true)
        .init_node(false)
        .start()
        .expect("controller starts");
    assert!(std::fs::symlink_metadata(&sock)
        .expect("socket exists")
        .file_type()
        .is_socket());
    assert_eq!(mode(&sock) & 0o777, 0o600, "socket file mode");
    assert_eq!(
        mode(&root.join("a").join("b")),
        0o700,
        "socket directory mode"
    );
    assert_eq!(mode(&root.join("a")), 0o700, "created parent mode");
    let entries: Vec<_> = std::fs::read_dir(root.join("a").join("b"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("ctl.sock")],
        "leftovers"
    );
    g.stop();
}

#[test]
fn unsafe_socket_directories_and_paths_are_refused() {
    let start = |sock: &Path| {
        Global::builder()
            .unix_sock_path(sock)
            .init_controller(true)
            .init_node(false)
            .start()
    };
    // Writable by everyone and not sticky: another user could replace the socket.
    let open = FreshDir::new("open");
    std::fs::create_dir_all(&*open).expect("dir");
    std::fs::set_permissions(&*open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    match start(&open.join("ctl.sock")) {
        Err(e @ Error::Bind { .. }) => {
            assert!(e.to_string().contains("writable by every user"), "{e}")
        }
        other => panic!("expected Error::Bind, got {other:?}"),
    }
    // Sticky, like /tmp: fine.
    std::fs::set_permissions(&*open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let g = start(&open.join("ctl.sock")).expect("a sticky directory is accepted");
    assert_eq!(mode(&open.join("ctl.sock")) & 0o777, 0o600);
    g.stop();

    // Something that is not a socket is never removed.
    let dir = FreshDir::new("notsock");
    std::fs::create_dir_all(&*dir).expect("dir");
    let file = dir.join("ctl.sock");
    std::fs::write(&file, b"precious").expect("write");
    match start(&file) {
        Err(e @ Error::Bind { .. }) => assert!(e.to_string().contains("not a socket"), "{e}"),
        other => panic!("expected Error::Bind, got {other:?}"),
    }
    assert_eq!(std::fs::read(&file).expect("still there"), b"precious");
}

// ---- Unix sockets of another user ------------------------------------------------------

/// Whether this test runs as root (needed to hand files to another user); says so when not.
fn running_as_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("{test}: skipped, it needs root to hand files to another user");
    }
    root
}

fn give_to_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
}

fn controller_at(sock: &Path) -> Result<Global, Error> {
    Global::builder()
        .unix_sock_path(sock)
        .init_controller(true)
        .init_node(false)
        .start()
}

/// Asserts that `outcome` is `Error::UnsafeSocket` whose message has every one of `parts`.
fn assert_unsafe_socket<T: std::fmt::Debug>(outcome: Result<T, Error>, parts: &[&str]) {
    match outcome {
        Err(e @ Error::UnsafeSocket { .. }) => {
            let text = e.to_string();
            for part in parts {
                assert!(text.contains(part), "{part:?} not in: {text}");
            }
            assert!(text.contains("in a directory you own"), "{text}");
        }
        other => panic!("expected Error::UnsafeSocket, got {other:?}"),
    }
}

#[test]
fn a_controller_refuses_a_socket_directory_of_another_user_or_a_symlink() {
    if !running_as_root("a_controller_refuses_a_socket_directory_of_another_user") {
        return;
    }
    let foreign = FreshDir::new("foreign");
    std::fs::create_dir_all(&*foreign).expect("dir");
    std::fs::set_permissions(&*foreign, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    give_to_nobody(&foreign);
    let sock = foreign.join("ctl.sock");
    assert_unsafe_socket(controller_at(&sock), &["belongs to uid 65534"]);
    assert!(
        std::fs::symlink_metadata(&sock).is_err(),
        "nothing was bound"
    );

    // A link to a directory of one's own is refused too: whoever can change the link
    // decides where the socket is.
    let real = FreshDir::new("real");
    std::fs::create_dir_all(&*real).expect("dir");
    let link = FreshDir::new("link");
    std::os::unix::fs::symlink(&*real, &*link).expect("symlink");
    assert_unsafe_socket(controller_at(&link.join("ctl.sock")), &["symbolic link"]);
    // The real directory is fine.
    controller_at(&real.join("ctl.sock"))
        .expect("a directory of one's own")
        .stop();
}

#[test]
fn a_node_refuses_a_socket_of_another_user_at_once_and_sends_nothing() {
    if !running_as_root("a_node_refuses_a_socket_of_another_user") {
        return;
    }
    // Someone else's socket in someone else's directory (the listener is this test's,
    // handed over): `<tmp>/daffi/.sock` squatted on a shared /tmp.
    let dir = FreshDir::new("squatted");
    std::fs::create_dir_all(&*dir).expect("dir");
    let sock = dir.join(".sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    give_to_nobody(&sock);
    give_to_nobody(&dir);
    let node = || {
        Global::builder()
            .process_name(unique("victim"))
            .unix_sock_path(&sock)
    };
    let e = fails_fast("a foreign directory", node());
    assert_unsafe_socket(Err::<(), _>(e), &["its directory", "belongs to uid 65534"]);

    // The directory handed back, the socket still someone else's.
    std::os::unix::fs::chown(&*dir, Some(0), Some(0)).expect("chown back");
    let e = fails_fast("a foreign socket", node());
    assert_unsafe_socket(Err::<(), _>(e), &["the socket belongs to uid 65534"]);
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the node connected to the foreign socket: {other:?}"),
    }

    // A link to the directory: refused before looking further.
    let link = FreshDir::new("squat-link");
    std::os::unix::fs::symlink(&*dir, &*link).expect("symlink");
    let e = fails_fast(
        "a symlinked directory",
        Global::builder()
            .process_name(unique("victim"))
            .unix_sock_path(link.join(".sock")),
    );
    assert_unsafe_socket(Err::<(), _>(e), &["symbolic link"]);
}

#[test]
fn a_node_refuses_a_listener_of_another_user_behind_a_socket_file_of_its_own() {
    if !running_as_root("a_node_refuses_a_listener_of_another_user") {
        return;
    }
    // A sticky directory everyone may write to, like /tmp: another user listens there,
    // and the socket file is then made to look like one's own. Only the peer's
    // credentials give it away.
    // Straight in the temp directory: the other user must be able to reach it.
    let dir = FreshDir(std::env::temp_dir().join(unique("daffi-shared")));
    std::fs::create_dir_all(&*dir).expect("dir");
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let sock = dir.join(".sock");
    let mut squatter = Child::spawn(
        "squatter",
        "squatter",
        &format!("unix:{}", sock.display()),
        &Env::new(),
    );
    squatter.ready().expect("the squatter listens");
    std::os::unix::fs::chown(&sock, Some(0), Some(0)).expect("chown the socket to root");
    let e = fails_fast(
        "a foreign listener",
        Global::builder()
            .process_name(unique("victim"))
            .unix_sock_path(&sock),
    );
    assert_unsafe_socket(
        Err::<(), _>(e),
        &[
            &format!("the process listening on it (pid {})", squatter.child.id()),
            "belongs to uid 65534",
        ],
    );
}
