//! A NATS operator / account / user trust chain made in the test (what `nsc` would
//! make): nkeys sign JWTs whose claims follow NATS's JWT v2 format (a header
//! `{"typ":"JWT","alg":"ed25519-nkey"}`, base64url JSON claims, an ed25519 signature).
//! A server configured with [`Trust::server_config`] runs in operator mode and knows the
//! account through a memory resolver; [`Trust::user_creds`] writes a `.creds` file.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nkeys::KeyPair;
use serde_json::{json, Value};

/// An operator and one account it signed, with JetStream enabled (KV needs it), beside
/// the system account the server needs for JetStream in operator mode.
pub struct Trust {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
}

impl Trust {
    pub fn new() -> Trust {
        Trust {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
        }
    }

    /// Writes a server configuration file in `dir` that trusts this operator and
    /// preloads its accounts; returns its path (for `--config`).
    pub fn server_config(&self, dir: &Path) -> PathBuf {
        let operator = self.operator.public_key();
        let system = self.system.public_key();
        let operator_jwt = sign(
            &self.operator,
            claims(&operator, &operator, "daffi-test-operator", None),
            json!({ "type": "operator", "version": 2, "system_account": system }),
        );
        let config = format!(
            "operator: {operator_jwt}\nsystem_account: {system}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {system}: {}\n  {}: {}\n}}\n",
            self.account_jwt(&self.system, "SYS", false),
            self.account.public_key(),
            self.account_jwt(&self.account, "daffi-test", true),
        );
        let path = dir.join("operator.conf");
        std::fs::write(&path, config).expect("write the server's configuration");
        path
    }

    /// The JWT of `account`, signed by the operator; with `jetstream`, it may use it.
    fn account_jwt(&self, account: &KeyPair, name: &str, jetstream: bool) -> String {
        let operator = self.operator.public_key();
        let storage = if jetstream { -1 } else { 0 };
        sign(
            &self.operator,
            claims(&operator, &account.public_key(), name, None),
            json!({
                "type": "account",
                "version": 2,
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": storage, "disk_storage": storage,
                    "streams": storage, "consumer": storage,
                },
                "default_permissions": { "pub": {}, "sub": {} },
            }),
        )
    }

    /// Writes `<dir>/<name>.creds` for a new user of this account; `expires` (seconds
    /// since the epoch) puts an `exp` claim in its JWT.
    pub fn user_creds(&self, dir: &Path, name: &str, expires: Option<u64>) -> PathBuf {
        user_creds_signed_by(&self.account, dir, name, expires)
    }
}

/// Writes `<dir>/<name>.creds` for a new user of an account the server does not know.
pub fn stranger_creds(dir: &Path, name: &str) -> PathBuf {
    user_creds_signed_by(&KeyPair::new_account(), dir, name, None)
}

fn user_creds_signed_by(
    account: &KeyPair,
    dir: &Path,
    name: &str,
    expires: Option<u64>,
) -> PathBuf {
    let user = KeyPair::new_user();
    let jwt = sign(
        account,
        claims(&account.public_key(), &user.public_key(), name, expires),
        json!({
            "type": "user",
            "version": 2,
            "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
        }),
    );
    let seed = user.seed().expect("a new key has a seed");
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(&path, creds).expect("write the creds file");
    path
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// The claims common to every JWT: who signed it (`iss`), whom it is about (`sub`).
fn claims(issuer: &str, subject: &str, name: &str, expires: Option<u64>) -> Value {
    let mut claims = json!({
        "jti": super::unique("jti"),
        "iat": now(),
        "iss": issuer,
        "sub": subject,
        "name": name,
    });
    if let Some(exp) = expires {
        claims["exp"] = json!(exp);
    }
    claims
}

/// `claims` with `nats` as its NATS part, signed by `issuer`: a JWT.
fn sign(issuer: &KeyPair, mut claims: Value, nats: Value) -> String {
    claims["nats"] = nats;
    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let signed = format!(
        "{}.{}",
        encode(&json!({ "typ": "JWT", "alg": "ed25519-nkey" })),
        encode(&claims)
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign with a seed");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}
