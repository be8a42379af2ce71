//! Security over NATS, against real nats-server processes: a token (`--auth`), TLS
//! with the node trusting a CA (`tls_ca`), client certificates (`--tlsverify`), and
//! NATS credentials files (`.creds`, with a server in operator mode trusting an account
//! made by the test). Nodes here are `Global`s of this process; their calls go through
//! the server like any other.
//!
//! Run with `cargo test -p daffi --features nats --test nats_security`.

mod common;

use std::time::Duration;

use common::nats::NatsServer;
use common::nats_jwt::{self, Trust};
use common::pki::Pki;
use common::unique;
use daffi::{callback, Error, Global, GlobalBuilder};

#[callback]
fn secure_echo(text: String) -> String {
    text
}

/// A node called `name` on `url`, in a namespace of its own test.
fn node(url: &str, namespace: &str, name: &str) -> GlobalBuilder {
    Global::builder()
        .nats(url)
        .namespace(namespace)
        .process_name(name)
        .connect_timeout(Duration::from_secs(5))
}

/// Two nodes built by `configure` reach each other: a call from one to the other.
fn assert_calls_work(url: &str, configure: impl Fn(GlobalBuilder) -> GlobalBuilder) {
    let namespace = unique("sec").replace('-', "_");
    let server_side = configure(node(url, &namespace, "served"))
        .start()
        .expect("first node starts");
    let caller = configure(node(url, &namespace, &unique("caller")))
        .start()
        .expect("second node starts");
    caller
        .wait_process_timeout("served", common::WAIT)
        .expect("sees the other");
    let echoed: String = caller
        .call("secure_echo")
        .args(("over NATS",))
        .on("served")
        .fg()
        .expect("call");
    assert_eq!(echoed, "over NATS");
    caller.stop();
    server_side.stop();
}

fn start_err(builder: GlobalBuilder) -> Error {
    builder.start().expect_err("refused")
}

#[test]
fn a_token_is_required_and_a_wrong_one_is_named() {
    let server = NatsServer::start_with(&["--auth", "s3cret-token"]);
    let url = server.url();
    assert_calls_work(&url, |b| b.auth_token("s3cret-token"));
    for wrong in [Some("wrong-token"), None] {
        let mut b = node(&url, "sec", "intruder");
        if let Some(token) = wrong {
            b = b.auth_token(token);
        }
        let e = start_err(b);
        assert!(
            matches!(e, Error::AuthenticationFailed { .. }),
            "{wrong:?}: {e:?}"
        );
        assert!(e.to_string().contains(&url), "names the server: {e}");
    }
}

#[test]
fn tls_with_a_trusted_ca_works_and_a_wrong_ca_is_named() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let server = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        cert.to_str().expect("utf-8 path"),
        "--tlskey",
        key.to_str().expect("utf-8 path"),
    ]);
    let url = server.url();
    assert_calls_work(&url, |b| b.tls_ca(pki.path("ca.pem")));
    let e = start_err(node(&url, "sec", "mistrusting").tls_ca(pki.path("other-ca.pem")));
    assert!(matches!(e, Error::Tls { .. }), "{e:?}");
}

#[test]
fn a_server_that_verifies_clients_takes_only_certified_ones() {
    let pki = Pki::new();
    let path = |name: &str| pki.path(name).to_str().expect("utf-8 path").to_string();
    let server = NatsServer::start_with(&[
        "--tlsverify",
        "--tlscert",
        &path("server.pem"),
        "--tlskey",
        &path("server.key"),
        "--tlscacert",
        &path("ca.pem"),
    ]);
    let url = server.url();
    assert_calls_work(&url, |b| {
        b.tls_ca(pki.path("ca.pem"))
            .tls_client_cert(pki.path("client.pem"))
            .tls_client_key(pki.path("client.key"))
    });
    let uncertified = start_err(node(&url, "sec", "uncertified").tls_ca(pki.path("ca.pem")));
    let foreign = start_err(
        node(&url, "sec", "foreign")
            .tls_ca(pki.path("ca.pem"))
            .tls_client_cert(pki.path("other-client.pem"))
            .tls_client_key(pki.path("other-client.key")),
    );
    for e in [uncertified, foreign] {
        assert!(
            matches!(e, Error::Tls { .. } | Error::AuthenticationFailed { .. }),
            "{e:?}"
        );
    }
}

#[test]
fn a_credentials_file_that_is_missing_or_invalid_is_a_config_error() {
    let server = NatsServer::start();
    let dir = std::env::temp_dir()
        .join("daffi-tests")
        .join(unique("creds"));
    std::fs::create_dir_all(&dir).expect("dir");
    let garbage = dir.join("garbage.creds");
    std::fs::write(&garbage, "not a credentials file").expect("write");
    for path in [dir.join("missing.creds"), garbage] {
        let e = start_err(node(&server.url(), "sec", "creds").nats_credentials(&path));
        assert!(matches!(e, Error::Config(_)), "{e:?}");
        assert!(
            e.to_string().contains(&*path.to_string_lossy()),
            "names the file: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_valid_creds_file_joins_and_calls_and_other_users_are_refused() {
    let dir = std::env::temp_dir()
        .join("daffi-tests")
        .join(unique("operator"));
    std::fs::create_dir_all(&dir).expect("dir");
    let trust = Trust::new();
    let config = trust.server_config(&dir);
    let server = NatsServer::start_with(&["--config", config.to_str().expect("utf-8 path")]);
    let url = server.url();

    let creds = trust.user_creds(&dir, "member", None);
    assert_calls_work(&url, |b| b.nats_credentials(&creds));

    let expired = trust.user_creds(&dir, "expired", Some(nats_jwt::now() - 60));
    let stranger = nats_jwt::stranger_creds(&dir, "stranger");
    for refused in [expired, stranger] {
        let e = start_err(node(&url, "sec", "intruder").nats_credentials(&refused));
        assert!(
            matches!(e, Error::AuthenticationFailed { .. }),
            "{}: {e:?}",
            refused.display()
        );
        let message = e.to_string();
        assert!(message.contains(&url), "names the server: {e}");
        assert!(
            message.contains(&*refused.to_string_lossy()) && !message.contains("auth_token"),
            "points at the credentials, not a token: {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
