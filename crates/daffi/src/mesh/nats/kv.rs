//! daffi's own requests to a JetStream KV bucket: a write is a JetStream publish to
//! `$KV.<bucket>.<key>` (a core request that the bucket's stream answers with its
//! acknowledgment), a read is a direct get of the key's last message
//! (`$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`, answered by any replica).
//! Revisions are the stream's sequences, as with async-nats's `Store`: a write that
//! names one (`Nats-Expected-Last-Subject-Sequence`, 0 for "no value yet") lands only
//! if the key is still there.
//!
//! Why not async-nats's `Store` for these: it is built only from a stream info (a
//! JetStream API request, which the servers answer one after another: at a mass start
//! of 10,000 nodes those queued, two per join), and it checks every bucket name and key
//! with regular expressions that it compiles at the first request (about 0.6 MiB of an
//! idle node's resident code, for a check these names do not need). These requests need
//! neither: the buckets' names and keys are daffi's own (a namespace checked at the
//! start, names escaped by `subjects::escape`), checked here by hand. A [`Bucket`]
//! opens a `Store` only where one is needed, once, on first use ([`Bucket::store`]): to
//! watch the nodes bucket, for the lease holder's look for dead nodes, or to create the
//! bucket when the servers say it is not there.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::header::{
    HeaderMap, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MARKER_REASON, NATS_MESSAGE_TTL,
    NATS_SEQUENCE,
};
use async_nats::jetstream::kv::{Config, Store};
use async_nats::{Message, Request, RequestErrorKind, StatusCode};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::OnceCell;

use super::members::{open_or_create, KV_TIMEOUT};

/// The header that tells a KV value from a deletion (`DEL`, `PURGE`).
const KV_OPERATION: &str = "KV-Operation";

/// The JetStream error code of a write whose expected revision is not the key's last.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// The JetStream error code of a stream info for a stream that does not exist.
const STREAM_NOT_FOUND: u64 = 10059;

/// The buckets (servers and name) whose requests were answered in this process.
static ANSWERED: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// The buckets (servers and name) that a node of this process is asking about (see
/// [`Bucket::create_if_missing`]).
static CHECKING: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// How many KV requests the nodes of one process have in flight at most. When 10,000
/// nodes start at once, each writing its claim and its entry, all of them sent at
/// once would wait in the servers' queue longer than [`KV_TIMEOUT`], time out, and be
/// sent again (with a read to learn whether the first landed) while the first is
/// still queued: measured, a 10,000-node start then took 16 s instead of 9.7, with 2.5
/// times the writes. A process's nodes so take turns, and their requests are answered
/// in time; one node alone does not wait.
const IN_FLIGHT_AT_ONCE: usize = 64;

/// How long a request waits for its turn among [`IN_FLIGHT_AT_ONCE`]: long enough for
/// a mass start's queue to drain (a turn wait of 1 s failed 21,000 requests unsent at
/// 10,000 nodes, each tried again after a backoff), well within a claim's life.
const TURN_TIMEOUT: Duration = Duration::from_secs(5);

/// The turns of [`IN_FLIGHT_AT_ONCE`], shared by the nodes of this process.
static IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(IN_FLIGHT_AT_ONCE);

/// A node's turn to ask whether a bucket exists; ends when dropped.
struct Checking(String);

impl Checking {
    /// The turn for `key`, unless another node of this process has it.
    fn take(key: String) -> Option<Checking> {
        // The lock is released before a `Checking` exists: its drop takes it again.
        let inserted = CHECKING.lock().ok()?.insert(key.clone());
        inserted.then(|| Checking(key))
    }
}

impl Drop for Checking {
    fn drop(&mut self) {
        if let Ok(mut checking) = CHECKING.lock() {
            checking.remove(&self.0);
        }
    }
}

/// Why a request to a bucket failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The key's last revision is not the one the write named (it was written since).
    WrongRevision,
    /// A create found the key holding a value.
    Exists,
    /// No answer in time, no bucket, a refusal: the reason.
    Failed(String),
}

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvError::WrongRevision => f.write_str("the key was written since its revision read"),
            KvError::Exists => f.write_str("the key exists already"),
            KvError::Failed(reason) => f.write_str(reason),
        }
    }
}

/// The last value of a key, with its revision.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The revision of the value: a write over it names it.
    pub revision: u64,
    /// The value.
    pub value: Bytes,
}

/// The last message of a key: a value, or a deletion's marker (`None`).
struct Last {
    revision: u64,
    value: Option<Bytes>,
}

/// One KV bucket, for daffi's own requests (see the module's docs).
pub struct Bucket {
    client: async_nats::Client,
    /// How to create the bucket, when the servers say it is not there.
    config: Config,
    /// The servers, for errors.
    urls: String,
    /// What the bucket holds, for errors.
    what: &'static str,
    /// `$KV.<bucket>.`: a key's subject without the key.
    keys: String,
    /// `$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.`: a direct get without the key.
    direct: String,
    /// async-nats's handle on the bucket, opened on first need.
    store: OnceCell<Store>,
    /// A request of this handle's was answered (see [`Bucket::request`]).
    answered: AtomicBool,
}

impl Bucket {
    /// The bucket `config` names (it is created with `config` when missing); `what` names
    /// it in errors. Sends nothing: each request goes when made.
    pub fn new(
        client: &async_nats::Client,
        config: Config,
        urls: &str,
        what: &'static str,
    ) -> Bucket {
        let bucket = &config.bucket;
        Bucket {
            client: client.clone(),
            keys: format!("$KV.{bucket}."),
            direct: format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}."),
            config,
            urls: urls.to_string(),
            what,
            store: OnceCell::new(),
            answered: AtomicBool::new(false),
        }
    }

    /// async-nats's `Store` of the bucket (to watch it, or to list its keys), opened now
    /// (a stream info; the bucket created if missing) unless it was before.
    pub async fn store(&self) -> crate::error::Result<&Store> {
        self.store
            .get_or_try_init(|| {
                open_or_create(&self.client, self.config.clone(), &self.urls, self.what)
            })
            .await
    }

    /// The value of `key`, if it holds one (not deleted, nor expired).
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        Ok(self.last(key).await?.and_then(|last| {
            last.value.map(|value| Entry {
                revision: last.revision,
                value,
            })
        }))
    }

    /// Writes `value` under `key`, whatever it held; the new revision.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.write(key, None, value).await
    }

    /// Writes `value` under `key` if its last revision is `revision`; the new revision.
    pub async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, KvError> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, revision.to_string());
        self.write(key, Some(headers), value).await
    }

    /// Writes `value` under `key` if it holds no value (never written, deleted or
    /// expired); the new revision. [`KvError::Exists`] if it holds one.
    pub async fn create(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        match self.update(key, value.clone(), 0).await {
            Err(KvError::WrongRevision) => {}
            done => return done,
        }
        // The key has messages: a value, or the marker of a deletion to write over.
        match self.last(key).await? {
            Some(Last {
                value: None,
                revision,
            }) => self
                .update(key, value, revision)
                .await
                .map_err(|e| match e {
                    KvError::WrongRevision => KvError::Exists,
                    e => e,
                }),
            Some(_) => Err(KvError::Exists),
            None => Err(KvError::Failed(format!(
                "the key {key} of the {} bucket changed meanwhile",
                self.what
            ))),
        }
    }

    /// Deletes `key` (if its last revision is `revision`, when given), leaving a marker.
    pub async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), KvError> {
        let mut headers = HeaderMap::new();
        headers.insert(KV_OPERATION, "DEL");
        if let Some(revision) = revision {
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, revision.to_string());
        }
        self.write(key, Some(headers), Bytes::new())
            .await
            .map(|_| ())
    }

    /// Purges `key` (if its last revision is `revision`, when given): one marker is left,
    /// which expires after `marker_ttl` (the bucket must allow per-message TTLs).
    pub async fn purge(
        &self,
        key: &str,
        revision: Option<u64>,
        marker_ttl: Duration,
    ) -> Result<(), KvError> {
        let mut headers = HeaderMap::new();
        headers.insert(KV_OPERATION, "PURGE");
        headers.insert("Nats-Rollup", "sub");
        headers.insert(NATS_MESSAGE_TTL, marker_ttl.as_secs().max(1).to_string());
        if let Some(revision) = revision {
            headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, revision.to_string());
        }
        self.write(key, Some(headers), Bytes::new())
            .await
            .map(|_| ())
    }

    /// The last message of `key`, if it has one.
    async fn last(&self, key: &str) -> Result<Option<Last>, KvError> {
        self.check_key(key)?;
        let answer = self
            .request(format!("{}{key}", self.direct), None, Bytes::new())
            .await?;
        match answer.status {
            Some(StatusCode::NOT_FOUND) => return Ok(None),
            Some(status) if status != StatusCode::OK => {
                return Err(self.failed(format!(
                    "a read was refused: {status} {}",
                    answer.description.as_deref().unwrap_or_default()
                )))
            }
            _ => {}
        }
        let headers = answer.headers.as_ref();
        let revision = headers
            .and_then(|h| h.get(NATS_SEQUENCE))
            .and_then(|s| s.as_str().parse().ok())
            .ok_or_else(|| self.failed("a read's answer had no sequence".into()))?;
        let marker = headers.is_some_and(|h| {
            h.get(KV_OPERATION)
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
                || h.get(NATS_MARKER_REASON).is_some()
        });
        Ok(Some(Last {
            revision,
            value: (!marker).then_some(answer.payload),
        }))
    }

    /// Publishes `value` under `key` with `headers`, and reads the acknowledgment: the
    /// message's revision.
    async fn write(
        &self,
        key: &str,
        headers: Option<HeaderMap>,
        value: Bytes,
    ) -> Result<u64, KvError> {
        self.check_key(key)?;
        let answer = self
            .request(format!("{}{key}", self.keys), headers, value)
            .await?;
        match serde_json::from_slice::<Ack>(&answer.payload) {
            Ok(Ack {
                seq: Some(revision),
                error: None,
            }) => Ok(revision),
            Ok(Ack {
                error: Some(error), ..
            }) if error.err_code == WRONG_LAST_SEQUENCE => Err(KvError::WrongRevision),
            Ok(Ack {
                error: Some(error), ..
            }) => Err(self.failed(format!(
                "a write was refused: {} (code {})",
                error.description, error.err_code
            ))),
            Ok(Ack { .. }) | Err(_) => Err(self.failed(format!(
                "a write's acknowledgment was not understood: {}",
                String::from_utf8_lossy(&answer.payload)
            ))),
        }
    }

    /// Sends a request to the bucket, waiting [`KV_TIMEOUT`] for its answer. "No
    /// responders" means that no stream takes it: the bucket may be missing (see
    /// [`Bucket::create_if_missing`]), and if it was created now, the request is sent
    /// again. So may a request without an answer while no request to the bucket was
    /// ever answered in this process: something else may listen on its subjects (a
    /// `nats sub '>'`), which hides the "no responders" of a missing bucket. Once one
    /// was answered, a timeout is only a failure (servers busy with a mass start).
    async fn request(
        &self,
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
    ) -> Result<Message, KvError> {
        let error = match self.send(&subject, headers.clone(), payload.clone()).await {
            Ok(answer) => {
                self.answered();
                return Ok(answer);
            }
            Err(error) => error,
        };
        let suspect = match error.kind() {
            RequestErrorKind::NoResponders => true,
            RequestErrorKind::TimedOut => !self.was_answered(),
            _ => false,
        };
        if !suspect || !self.create_if_missing().await? {
            return Err(self.failed(match error.kind() {
                RequestErrorKind::NoResponders => "no server answers for it (JetStream enabled on the servers? its replicas may be electing a leader)".into(),
                _ => error.to_string(),
            }));
        }
        let answer = self
            .send(&subject, headers, payload)
            .await
            .map_err(|e| self.failed(e.to_string()))?;
        self.answered();
        Ok(answer)
    }

    /// Asks the servers whether the bucket's stream exists (a stream info, as a plain
    /// request: no `Store`, no regular expression), and creates it if they say it does
    /// not; whether it was created now. One node of this process asks at a time for a
    /// bucket; the others fail as they are meanwhile (they try again at their pace).
    async fn create_if_missing(&self) -> Result<bool, KvError> {
        let Some(_turn) = Checking::take(self.answered_key()) else {
            return Ok(false);
        };
        let info = self
            .client
            .send_request(
                format!("$JS.API.STREAM.INFO.KV_{}", self.config.bucket),
                Request::new().timeout(Some(KV_TIMEOUT)),
            )
            .await;
        let Ok(info) = info else {
            return Ok(false);
        };
        match serde_json::from_slice::<Ack>(&info.payload) {
            Ok(Ack {
                error: Some(error), ..
            }) if error.err_code == STREAM_NOT_FOUND => {
                tracing::debug!(bucket = %self.config.bucket, "creating the bucket");
                self.store()
                    .await
                    .map_err(|e| KvError::Failed(e.to_string()))?;
                Ok(true)
            }
            Ok(Ack { error: None, .. }) => {
                // It exists: timeouts are the servers' load, no sign of a missing bucket.
                self.answered();
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// Notes that the servers answered a request to this bucket (see [`Bucket::request`]).
    fn answered(&self) {
        if !self.answered.swap(true, Ordering::Relaxed) {
            if let Ok(mut known) = ANSWERED.lock() {
                known.insert(self.answered_key());
            }
        }
    }

    /// Whether the servers answered a request to this bucket in this process.
    fn was_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
            || ANSWERED
                .lock()
                .is_ok_and(|known| known.contains(&self.answered_key()))
    }

    fn answered_key(&self) -> String {
        format!("{}\n{}", self.urls, self.config.bucket)
    }

    /// Sends one request, once this process has fewer than [`IN_FLIGHT_AT_ONCE`] in
    /// flight (its wait for the answer starts then). A request that gets no turn within
    /// [`TURN_TIMEOUT`] fails unsent (its caller tries again at its pace), so that no
    /// join or heartbeat waits without bound behind an overloaded server.
    async fn send(
        &self,
        subject: &str,
        headers: Option<HeaderMap>,
        payload: Bytes,
    ) -> Result<Message, async_nats::RequestError> {
        let not_sent = |reason: &'static str| {
            async_nats::RequestError::with_source(RequestErrorKind::Other, reason)
        };
        let _turn = match tokio::time::timeout(TURN_TIMEOUT, IN_FLIGHT.acquire()).await {
            Ok(Ok(turn)) => turn,
            Ok(Err(_)) => return Err(not_sent("stopping")),
            Err(_) => {
                return Err(not_sent(
                    "not sent: this process's requests are queued, the servers answer slowly",
                ))
            }
        };
        let mut request = Request::new().payload(payload).timeout(Some(KV_TIMEOUT));
        if let Some(headers) = headers {
            request = request.headers(headers);
        }
        self.client.send_request(subject.to_string(), request).await
    }

    /// Checks that `key` is one daffi makes: dot-separated tokens of ASCII letters,
    /// digits, `-`, `_`, `=` and `/` (what `subjects::escape` makes, and what NATS takes
    /// as a subject's tokens).
    fn check_key(&self, key: &str) -> Result<(), KvError> {
        let valid = !key.is_empty()
            && key.split('.').all(|token| {
                !token.is_empty()
                    && token.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'/')
                    })
            });
        if valid {
            Ok(())
        } else {
            Err(self.failed(format!("`{key}` is not a valid key")))
        }
    }

    fn failed(&self, reason: String) -> KvError {
        KvError::Failed(format!("the {} bucket: {reason}", self.what))
    }
}

/// A JetStream publish's acknowledgment, or an API answer's error (the other fields of
/// a stream info are not read).
#[derive(Deserialize)]
struct Ack {
    seq: Option<u64>,
    error: Option<ApiError>,
}

/// A JetStream refusal.
#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_and_refusals_are_read() {
        let ack: Ack = serde_json::from_slice(br#"{"stream":"KV_a","seq":42}"#).unwrap();
        assert_eq!((ack.seq, ack.error.is_none()), (Some(42), true));
        let refused: Ack = serde_json::from_slice(
            br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"},"stream":"KV_a","seq":0}"#,
        )
        .unwrap();
        assert_eq!(refused.error.map(|e| e.err_code), Some(WRONG_LAST_SEQUENCE));
    }
}
