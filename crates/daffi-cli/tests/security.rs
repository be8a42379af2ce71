//! `daffi controller` with TLS and an auth token, as a separate process; nodes in the
//! test process. Certificates are made here with rcgen.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use daffi::{Error, Global, GlobalBuilder};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "cli-test-token";

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir()
            .join("daffi-cli-tests")
            .join(unique("pki"));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem).expect("write");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "cli test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        write("ca.pem", ca.pem());
        let (cert, key) = leaf(&ca, "127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
        write("server.pem", cert);
        write("server.key", key);
        let (cert, key) = leaf(&ca, "node.daffi.test", ExtendedKeyUsagePurpose::ClientAuth);
        write("client.pem", cert);
        write("client.key", key);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// `daffi controller` on a free port; killed when dropped. Its stderr is read line by line.
struct Controller {
    child: Child,
    port: u16,
    stderr: Receiver<String>,
    seen: Vec<String>,
}

impl Controller {
    fn start(args: &[&Path], token_env: Option<&str>) -> Controller {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_daffi"));
        cmd.args(["controller", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env_remove("DAFFI_AUTH_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(token) = token_env {
            cmd.env("DAFFI_AUTH_TOKEN", token);
        }
        let mut child = cmd.spawn().expect("spawn daffi controller");
        let (tx, stderr) = channel();
        let err = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The listening line comes at once, or stdout closes when the process fails.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the listening line");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let logs: Vec<String> = stderr.try_iter().collect();
                panic!("no port in {line:?}; stderr: {logs:?}")
            });
        Controller {
            child,
            port,
            stderr,
            seen: Vec::new(),
        }
    }

    fn node(&self, name: &str) -> GlobalBuilder {
        Global::builder()
            .process_name(unique(name))
            .host("127.0.0.1")
            .port(self.port)
            .connect_timeout(WAIT)
    }

    /// Waits for a log line containing every one of `parts`.
    fn log_line(&mut self, parts: &[&str]) -> String {
        let matches = |line: &str| parts.iter().all(|p| line.contains(p));
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.seen.iter().find(|l| matches(l)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no log line with {parts:?}; got:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes built by `node` call each other through the controller.
fn calls_work(node: impl Fn(&str) -> GlobalBuilder) {
    let server = node("server").start().expect("server connects");
    server.register("double", |x: i64| x * 2).expect("register");
    let client = node("client").start().expect("client connects");
    client
        .wait_function_timeout("double", WAIT)
        .expect("double is announced");
    let doubled: i64 = client.call("double").args((21,)).fg().expect("call");
    assert_eq!(doubled, 42);
}

fn refused(builder: GlobalBuilder) -> Error {
    match builder.start() {
        Ok(_) => panic!("the node was let in"),
        Err(e) => e,
    }
}

#[test]
fn tls_and_token_flags_protect_the_controller() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let mut ctl = Controller::start(
        &[
            Path::new("--tls-cert"),
            &cert,
            Path::new("--tls-key"),
            &key,
            Path::new("--auth-token"),
            Path::new(TOKEN),
        ],
        None,
    );
    calls_work(|name| ctl.node(name).tls_ca(pki.path("ca.pem")).auth_token(TOKEN));

    let e = refused(
        ctl.node("wrong-token")
            .tls_ca(pki.path("ca.pem"))
            .auth_token("guess"),
    );
    assert!(matches!(e, Error::AuthenticationFailed { .. }), "{e:?}");
    ctl.log_line(&[
        "refused a connection",
        "peer=127.0.0.1:",
        "wrong auth token",
    ]);

    let e = refused(ctl.node("plaintext").auth_token(TOKEN));
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
    ctl.log_line(&["refused a connection", "requires TLS"]);
}

#[test]
fn the_token_comes_from_the_environment() {
    let ctl = Controller::start(&[], Some(TOKEN));
    calls_work(|name| ctl.node(name).auth_token(TOKEN));
    let e = refused(ctl.node("wrong").auth_token("guess"));
    assert!(e.to_string().contains("authentication failed"), "{e}");
}

#[test]
fn mutual_tls_flag_refuses_nodes_without_a_client_certificate() {
    let pki = Pki::new();
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let mut ctl = Controller::start(
        &[
            Path::new("--tls-cert"),
            &cert,
            Path::new("--tls-key"),
            &key,
            Path::new("--tls-client-ca"),
            &ca,
        ],
        None,
    );
    calls_work(|name| {
        ctl.node(name)
            .tls_ca(pki.path("ca.pem"))
            .tls_client_cert(pki.path("client.pem"))
            .tls_client_key(pki.path("client.key"))
    });
    let e = refused(ctl.node("anonymous").tls_ca(pki.path("ca.pem")));
    assert!(
        matches!(&e, Error::Tls { message, .. } if message.contains("client certificate")),
        "{e:?}"
    );
    ctl.log_line(&["TLS handshake failed", "peer=127.0.0.1:"]);
}

#[test]
fn tls_flags_are_checked() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_daffi"))
            .arg("controller")
            .args(args)
            .env_remove("DAFFI_AUTH_TOKEN")
            .envs(env.iter().copied())
            .output()
            .expect("run daffi controller")
    };
    let out = run(
        &["--host", "127.0.0.1", "--port", "0", "--tls-cert", "c.pem"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));

    let out = run(
        &[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--tls-cert",
            "missing.pem",
            "--tls-key",
            "k.pem",
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.pem"), "{stderr}");

    // An empty token never means "no authentication".
    let out = run(
        &["--host", "127.0.0.1", "--port", "0"],
        &[("DAFFI_AUTH_TOKEN", "")],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must not be empty"), "{stderr}");

    // Help never shows the token from the environment.
    let out = run(&["--help"], &[("DAFFI_AUTH_TOKEN", "do-not-print-me")]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("do-not-print-me"));
}

/// Runs `daffi ARGS` against `ctl` and returns its exit code and stdout.
fn daffi(ctl: &Controller, args: &[&str], token_env: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_daffi"));
    cmd.args(args)
        .args(["--host", "127.0.0.1", "--port", &ctl.port.to_string()])
        .env_remove("DAFFI_AUTH_TOKEN");
    if let Some(token) = token_env {
        cmd.env("DAFFI_AUTH_TOKEN", token);
    }
    let out = cmd.output().expect("run daffi");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn commands_reach_a_protected_controller_with_the_token_and_ca() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let ctl = Controller::start(
        &[Path::new("--tls-cert"), &cert, Path::new("--tls-key"), &key],
        Some(TOKEN),
    );
    let server = ctl
        .node("server")
        .tls_ca(pki.path("ca.pem"))
        .auth_token(TOKEN)
        .start()
        .expect("server connects");
    server.register("double", |x: i64| x * 2).expect("register");
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().expect("utf-8 path");
    let watcher = ctl
        .node("watcher")
        .tls_ca(pki.path("ca.pem"))
        .auth_token(TOKEN)
        .start()
        .expect("watcher");
    watcher
        .wait_function_timeout("double", WAIT)
        .expect("double announced");

    let (code, out) = daffi(&ctl, &["call", "double", "21", "--tls-ca", ca], Some(TOKEN));
    assert_eq!((code, out.trim()), (0, "42"));
    // Without the token, or without TLS: refused, with the documented exit code 10.
    let (code, _) = daffi(&ctl, &["call", "double", "21", "--tls-ca", ca], None);
    assert_eq!(code, 10);
    let (code, _) = daffi(&ctl, &["ls"], Some(TOKEN));
    assert_eq!(code, 10);
}
