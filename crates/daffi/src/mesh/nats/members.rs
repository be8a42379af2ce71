//! Membership over NATS, in two JetStream KV buckets, so that what a node hears grows
//! with what it uses, not with the mesh:
//!
//! - `<ns>-alive`: one key per node (its escaped name), its claim on the name: created
//!   atomically (unique names), renewed by a heartbeat every [`HEARTBEAT`], dropped by
//!   the bucket's age limit ([`MEMBER_TTL`]) when the node dies. No node watches it.
//! - `<ns>-nodes`: `n.<node>` (the node, its callbacks, whether it is stopping) and
//!   `c.<callback>.<node>` (one provider of a callback), written only when a node joins,
//!   adds callbacks, begins stopping or leaves: a node's entries are its own to write,
//!   and written in an order that keeps every `c` key listed in its `n` entry.
//!
//! **What a node watches**: nothing, until it needs the providers of a callback name
//! (its first call, broadcast, stream or `wait_function` of it): then the keys
//! `c.<name>.*` of every name it asked for (one watch, restarted with each new name);
//! every `n.*` once it asks for every node (`members`, `wait_process`, the hooks, a
//! stream callback). A change costs a message to the nodes that watch it; heartbeats
//! cost none.
//!
//! **Who removes a node that dies without a goodbye**: the holder of the scheduler
//! lease (one node, see `schedules`), every [`REAP_EVERY`]: a node with an `n` entry
//! and no claim left is probed (see [`is_alive`]) and, if its run no longer listens,
//! its entries are deleted (revision-checked, so a node that came back keeps them). A
//! node that dies so leaves every view within `MEMBER_TTL` of its last heartbeat, plus
//! `REAP_EVERY`.
//!
//! Gaps never empty the view: a node leaves it only when its entries are deleted (its
//! goodbye, or the reaper after a probe), or when a whole read after a gap lacks it and
//! a probe confirms that its run no longer listens. A watch that ends, or a connection
//! that comes back, reads what the node watches whole again. So the loss of the server
//! that leads the buckets (whose replicas then take 4-9 s to elect a new leader, with
//! heartbeats unanswered meanwhile, so claims may expire) costs no member: the probe
//! finds the node alive, and its next heartbeat claims its name again. The same probe
//! lets a node restarted after a crash take its name at once.
//!
//! Earlier builds of daffi 0.1 kept everything, heartbeats included, in one bucket
//! `<ns>-members` that every node watched (n² messages a second): they and these nodes
//! do not see each other; upgrade every node of a mesh together. The old bucket is
//! left as it is (`nats kv rm <ns>-members` removes it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation, Store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::kv::{Bucket, KvError};
use super::subjects::{
    self, escape, node_key, parse_nodes_key, provider_key, NodesKey, Subjects, EVERY_NODE,
};
use super::{unreachable_by, NatsMesh};
use crate::error::{Error, Result};
use crate::mesh::Scope;
use crate::protocol::message::{self, Member, MembershipEvent};

/// How long a claim lives without a heartbeat: a node that dies leaves every view
/// within this (after its last heartbeat) plus [`REAP_EVERY`]. Long enough to ride out
/// the loss of the server that leads the bucket: its replicas elect a new leader within
/// NATS's election timeout (at most 9 s), which then expires what is older than this
/// at once, before the heartbeats held up meanwhile land.
pub const MEMBER_TTL: Duration = Duration::from_secs(12);

/// How often a node renews its claim: a quarter of [`MEMBER_TTL`], so that a claim
/// outlives two heartbeats lost in a row; a longer gap (a leader election) is covered
/// by the probe before a node is removed.
pub const HEARTBEAT: Duration = Duration::from_secs(3);

/// How often the holder of the scheduler lease looks for nodes whose claim expired.
pub const REAP_EVERY: Duration = Duration::from_secs(1);

/// How long one request to a KV bucket (a heartbeat, the lease, a claim) waits for
/// the server, for sending and again for its acknowledgment: while the replicas of a
/// bucket elect a leader (after the loss of the server that led it), requests go
/// unanswered; short waits keep the heartbeats and the lease trying at their pace, so
/// that they land soon after there is a leader again.
pub const KV_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the marker of a deleted entry stays in the nodes bucket: long enough for
/// every watch to see it; then it goes, so that names used once cost nothing forever.
const MARKER_TTL: Duration = Duration::from_secs(60);

/// How long starting a watch may take (creating its consumer on the bucket's leader).
const WATCH_SETUP: Duration = Duration::from_secs(2);

/// How long a node waits before starting a watch that ended again.
const WATCH_RETRY: Duration = Duration::from_millis(250);

/// How long a probe of a node waits for its answer; NATS answers "no responders" at
/// once when nobody listens.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a watch may deliver nothing of keys that hold values before the node stops
/// waiting for a whole first view (the cluster is electing a leader).
const SNAPSHOT_QUIET: Duration = Duration::from_secs(2);

/// How long asking for a part of the view waits for the watch to hold it.
const WANT_TIMEOUT: Duration = Duration::from_secs(10);

/// How many buckets the nodes of one process open at once. Opening one is a JetStream
/// API request, which the servers answer one after another: when 10,000 nodes start at
/// once, a request waits in their queue longer than [`KV_TIMEOUT`], times out, and is
/// sent again while the first is still queued (2.3 requests per open at 10,000 nodes
/// in five processes). A process's nodes so take turns, and their requests are answered
/// in time; one node opening alone does not wait.
const OPENING_AT_ONCE: usize = 64;

/// The turns of [`OPENING_AT_ONCE`], shared by the nodes of this process.
static OPENING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(OPENING_AT_ONCE);

/// This node's claim on its name, in the alive bucket.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Claim {
    instance: u64,
}

/// This node's entry `n.<node>`: what the others know of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Tells this run of the node from an earlier one with the same name.
    pub instance: u64,
    /// The callbacks it serves.
    callbacks: Vec<String>,
    /// It began stopping: route nothing new to it.
    leaving: bool,
}

/// The entry `c.<callback>.<node>`: the node serves the callback.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Provider {
    instance: u64,
    leaving: bool,
}

impl MemberRecord {
    /// The entry of a node (a new run of it) serving `callbacks`.
    pub fn new(callbacks: Vec<String>) -> MemberRecord {
        MemberRecord {
            instance: fastrand::u64(..),
            callbacks,
            leaving: false,
        }
    }

    fn claim(&self) -> bytes::Bytes {
        message::encode(&Claim {
            instance: self.instance,
        })
    }

    fn provider(&self) -> bytes::Bytes {
        message::encode(&Provider {
            instance: self.instance,
            leaving: self.leaving,
        })
    }
}

/// The two membership buckets, for daffi's own requests (see `kv`): a join opens
/// neither (no stream info); each opens async-nats's `Store` only where it is needed
/// (the nodes bucket to watch it, both for the lease holder's look for dead nodes).
#[derive(Clone)]
pub struct Buckets {
    /// Claims and heartbeats.
    pub alive: Arc<Bucket>,
    /// Nodes and providers.
    pub nodes: Arc<Bucket>,
}

/// What the task that owns this node's entries is asked to do.
#[derive(Debug)]
pub enum RecordCommand {
    /// The callbacks changed, or the connection is back: write the entries now.
    Renew,
    /// Stopping began: mark the entries, so that the others route nothing new here.
    Leaving,
    /// Delete the entries and end.
    Goodbye,
}

/// What this node's watch covers: every node, or the providers of these names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wants {
    everything: bool,
    names: BTreeSet<String>,
}

impl Wants {
    /// Everything from the start (`whole`), or nothing until asked.
    pub fn new(whole: bool) -> Wants {
        Wants {
            everything: whole,
            names: BTreeSet::new(),
        }
    }

    /// Adds `scope`; whether that changed anything.
    fn add(&mut self, scope: Scope<'_>) -> bool {
        match scope {
            Scope::Everything => !std::mem::replace(&mut self.everything, true),
            Scope::Callback(name) => !self.everything && self.names.insert(name.to_string()),
        }
    }

    /// The keys of the nodes bucket to watch.
    fn filters(&self) -> Vec<String> {
        if self.everything {
            vec![EVERY_NODE.to_string()]
        } else {
            self.names
                .iter()
                .map(|n| subjects::providers_of(n))
                .collect()
        }
    }
}

/// The membership buckets of the mesh, created at their first request if they are not
/// there yet (replicated on up to three servers of the cluster). Sends nothing.
pub fn buckets(client: &async_nats::Client, subjects: &Subjects, urls: &str) -> Buckets {
    let alive = kv::Config {
        bucket: subjects.alive_bucket(),
        description: "daffi: the claims of the nodes of this mesh on their names".into(),
        history: 1,
        max_age: MEMBER_TTL,
        num_replicas: replicas(client),
        ..Default::default()
    };
    let nodes = kv::Config {
        bucket: subjects.nodes_bucket(),
        description: "daffi: the nodes of this mesh and the providers of each callback".into(),
        history: 1,
        // Allows markers that expire (see MARKER_TTL).
        limit_markers: Some(MARKER_TTL),
        num_replicas: replicas(client),
        ..Default::default()
    };
    Buckets {
        alive: Arc::new(Bucket::new(client, alive, urls, "alive")),
        nodes: Arc::new(Bucket::new(client, nodes, urls, "nodes")),
    }
}

/// How many servers keep a copy of a bucket: up to three of the cluster's.
pub fn replicas(client: &async_nats::Client) -> usize {
    client.server_info().connect_urls.len().clamp(1, 3)
}

/// The KV bucket `config` names, created with `config` if the servers say it is not
/// there yet; `what` names it in errors. Requests through the returned store wait
/// [`KV_TIMEOUT`]. Only an answer "not found" leads to a create: a request that got no
/// answer in time (servers busy with a mass start) fails as it is, for the caller to
/// try again later, rather than adding two more requests to the servers' queue.
pub async fn open_or_create(
    client: &async_nats::Client,
    config: kv::Config,
    urls: &str,
    what: &str,
) -> Result<Store> {
    let _turn = OPENING.acquire().await.map_err(|_| Error::Stopped)?;
    let requests = async_nats::jetstream::ContextBuilder::new()
        .timeout(KV_TIMEOUT)
        .build(client.clone());
    let bucket = config.bucket.clone();
    match requests.get_key_value(&bucket).await {
        Ok(store) => return Ok(store),
        Err(e) if !is_not_found(&e) => {
            return Err(unreachable_by(
                urls,
                &format!("the {what} bucket could not be opened: "),
                e,
            ))
        }
        Err(_) => {}
    }
    tracing::debug!(bucket = %bucket, "creating the bucket");
    let created = requests.create_key_value(config).await;
    // Created here, or by another node meanwhile.
    requests.get_key_value(&bucket).await.map_err(|open| {
        let cause = created.err().map_or_else(|| open.to_string(), |e| e.to_string());
        unreachable_by(
            urls,
            &format!("the {what} bucket could not be opened or created (JetStream enabled on the servers?): "),
            cause,
        )
    })
}

/// Whether opening a bucket failed because the servers have no such bucket.
fn is_not_found(error: &async_nats::jetstream::context::KeyValueError) -> bool {
    use async_nats::jetstream::context::{GetStreamError, GetStreamErrorKind};
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(get) = e.downcast_ref::<GetStreamError>() {
            return matches!(get.kind(), GetStreamErrorKind::JetStream(js)
                if js.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND);
        }
        cause = e.source();
    }
    false
}

/// Takes `name` in the alive bucket for the run `record`; the claim's revision. A name
/// held by a node that still listens on its subject fails with
/// [`Error::DuplicateProcessName`]; one whose holder no longer does (it crashed, and its
/// claim has not expired yet) is taken over at once, so that a node restarted after a
/// crash keeps its name.
pub async fn take_name(
    client: &async_nats::Client,
    subjects: &Subjects,
    alive: &Bucket,
    name: &str,
    record: &MemberRecord,
    urls: &str,
) -> Result<u64> {
    let key = escape(name);
    let unreachable =
        |e: &dyn std::fmt::Display| unreachable_by(urls, "could not claim the process name: ", e);
    let duplicate = || Error::DuplicateProcessName {
        process: name.to_string(),
    };
    match alive.create(&key, record.claim()).await {
        Ok(revision) => return Ok(revision),
        Err(KvError::Exists) => {}
        Err(e) => return Err(unreachable(&e)),
    }
    let held = match alive.get(&key).await {
        Ok(Some(entry)) => entry,
        // Deleted or expired meanwhile: the next try creates it.
        Ok(None) => return Err(unreachable(&"the name's claim changed meanwhile")),
        Err(e) => return Err(unreachable(&e)),
    };
    let holder = match message::decode::<Claim>(&held.value) {
        Ok(holder) => holder,
        Err(_) => return Err(duplicate()),
    };
    if holder.instance == record.instance {
        // This node's own create, which had landed although its answer was lost.
        return Ok(held.revision);
    }
    if is_alive(client, subjects, name, holder.instance).await {
        return Err(duplicate());
    }
    tracing::info!(process = %name, "the process name was held by a node that no longer listens (it crashed); taking it over");
    alive
        .update(&key, record.claim(), held.revision)
        .await
        .map_err(|e| match e {
            // Another node took it first.
            KvError::WrongRevision => duplicate(),
            e => unreachable(&e),
        })
}

/// Writes this node's entries in the nodes bucket: `n.<node>` first, then one
/// `c.<callback>.<node>` per callback, sent together (so every `c` key is listed in the
/// `n` entry when it exists, and a node's callbacks appear together). The `c` keys of an earlier run of the name that this run does not serve
/// are deleted. Fails with why a write failed.
pub async fn publish(
    nodes: &Bucket,
    name: &str,
    record: &MemberRecord,
) -> std::result::Result<(), String> {
    let failed = |e: &dyn std::fmt::Display| e.to_string();
    let key = node_key(name);
    let earlier = match nodes.get(&key).await {
        Ok(Some(entry)) => message::decode::<MemberRecord>(&entry.value).ok(),
        Ok(None) => None,
        Err(e) => return Err(failed(&e)),
    };
    nodes
        .put(&key, message::encode(record))
        .await
        .map_err(|e| failed(&e))?;
    // All at once: a watcher that sees one of them finds the others stored with it,
    // even if this process is paused or dies between the acknowledgments.
    let provider = record.provider();
    let puts = record.callbacks.iter().map(|callback| {
        let key = provider_key(callback, name);
        let provider = provider.clone();
        async move { nodes.put(&key, provider).await }
    });
    futures_util::future::try_join_all(puts)
        .await
        .map_err(|e| failed(&e))?;
    if let Some(earlier) = earlier.filter(|e| e.instance != record.instance) {
        for callback in earlier.callbacks {
            if !record.callbacks.contains(&callback) {
                remove_entry(nodes, &provider_key(&callback, name), None).await;
            }
        }
    }
    Ok(())
}

/// Deletes `key` (at `revision`, if given), leaving a marker that every watch sees and
/// that expires after [`MARKER_TTL`]; a failure is logged (the entry stays).
async fn remove_entry(nodes: &Bucket, key: &str, revision: Option<u64>) {
    if let Err(e) = nodes.purge(key, revision, MARKER_TTL).await {
        tracing::debug!(key, error = %e, "could not delete a membership entry");
    }
}

/// The entries the run `record` of `name` holds now, each with its revision: its `c`
/// keys, then its `n` entry (entries of another run are not its own).
async fn entries_of(nodes: &Bucket, name: &str, record: &MemberRecord) -> Vec<(String, u64)> {
    let mut held = Vec::with_capacity(record.callbacks.len() + 1);
    for callback in &record.callbacks {
        let key = provider_key(callback, name);
        if let Some(revision) = revision_of::<Provider>(nodes, &key, |p| p.instance, record).await {
            held.push((key, revision));
        }
    }
    let key = node_key(name);
    if let Some(revision) = revision_of::<MemberRecord>(nodes, &key, |r| r.instance, record).await {
        held.push((key, revision));
    }
    held
}

/// The revision of `key` if it holds a value of the run `record` (`instance` reads it).
async fn revision_of<T: serde::de::DeserializeOwned>(
    nodes: &Bucket,
    key: &str,
    instance: impl Fn(&T) -> u64,
    record: &MemberRecord,
) -> Option<u64> {
    match nodes.get(key).await {
        Ok(Some(entry)) => message::decode::<T>(&entry.value)
            .ok()
            .filter(|value| instance(value) == record.instance)
            .map(|_| entry.revision),
        _ => None,
    }
}

/// Deletes `entries`, each at its revision: one written again since (its node came
/// back) stays.
async fn remove_entries(nodes: &Bucket, entries: &[(String, u64)]) {
    for (key, revision) in entries {
        remove_entry(nodes, key, Some(*revision)).await;
    }
}

/// Whether the run `instance` of the node `name` is alive: it answers probes on its
/// `alive` subject, and NATS answers "no responders" at once when nobody listens
/// there. No answer within [`PROBE_TIMEOUT`] counts as alive.
pub async fn is_alive(
    client: &async_nats::Client,
    subjects: &Subjects,
    name: &str,
    instance: u64,
) -> bool {
    let request = client.request(subjects.node_alive(name, instance), bytes::Bytes::new());
    match tokio::time::timeout(PROBE_TIMEOUT, request).await {
        Ok(Err(e)) => e.kind() != async_nats::RequestErrorKind::NoResponders,
        Ok(Ok(_)) | Err(_) => true,
    }
}

/// Answers the probes of this node's liveness (see [`is_alive`]) until it closes.
pub async fn answer_probes(mesh: Arc<NatsMesh>, mut probes: async_nats::Subscriber) {
    let mut closed = mesh.closed.subscribe();
    loop {
        let probe = tokio::select! {
            probe = probes.next() => probe,
            _ = super::until(&mut closed, true) => None,
        };
        let Some(probe) = probe else { return };
        if let Some(reply) = probe.reply {
            let _ = mesh.client.publish(reply, bytes::Bytes::new()).await;
        }
    }
}

/// Owns this node's claim and entries: renews the claim every [`HEARTBEAT`], writes the
/// entries again when asked (and when the claim had expired), marks them at stop,
/// deletes them at goodbye.
pub async fn keep_record(
    mesh: Arc<NatsMesh>,
    buckets: Buckets,
    mut record: MemberRecord,
    mut revision: u64,
    mut commands: mpsc::UnboundedReceiver<RecordCommand>,
) {
    let key = escape(&mesh.name);
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    loop {
        let command = tokio::select! {
            command = commands.recv() => command.unwrap_or(RecordCommand::Goodbye),
            _ = heartbeat.tick() => {
                if let Some((new, claimed_again)) = renew(&mesh, &buckets.alive, &key, &record, revision).await {
                    revision = new;
                    if claimed_again {
                        write_entries(&mesh, &buckets.nodes, &record).await;
                    }
                }
                continue;
            }
        };
        match command {
            RecordCommand::Renew => {}
            RecordCommand::Leaving => record.leaving = true,
            RecordCommand::Goodbye => break,
        }
        record.callbacks = mesh.executor.callback_names();
        write_entries(&mesh, &buckets.nodes, &record).await;
    }
    let entries = entries_of(&buckets.nodes, &mesh.name, &record).await;
    remove_entries(&buckets.nodes, &entries).await;
    if let Err(e) = buckets.alive.delete(&key, Some(revision)).await {
        tracing::debug!(process = %mesh.name, error = %e, "could not delete this node's claim; it expires by itself");
    }
    mesh.finished.send_replace(true);
}

/// Writes this node's entries; a failure is logged (the next renewal writes them).
async fn write_entries(mesh: &NatsMesh, nodes: &Bucket, record: &MemberRecord) {
    if let Err(e) = publish(nodes, &mesh.name, record).await {
        tracing::debug!(process = %mesh.name, error = %e, "could not write this node's membership entries; trying again at the next renewal");
        let _ = mesh.record.send(RecordCommand::Renew);
    }
}

/// Writes the claim over its revision `revision`; the new revision, and whether the
/// claim had to be made again (it had expired: the node was cut off longer than
/// [`MEMBER_TTL`], and its entries may have been removed). When the claim is not at
/// `revision`, it is looked at: this node's own (a write that timed out had landed) is
/// written over at its revision; one that expired is created again, unless another
/// node has taken the name since.
async fn renew(
    mesh: &NatsMesh,
    alive: &Bucket,
    key: &str,
    record: &MemberRecord,
    revision: u64,
) -> Option<(u64, bool)> {
    let failed = |e: &dyn std::fmt::Display| {
        tracing::debug!(process = %mesh.name, error = %e, "could not renew this node's claim; trying again at the next heartbeat");
        None
    };
    let e = match alive.update(key, record.claim(), revision).await {
        Ok(revision) => return Some((revision, false)),
        Err(e @ KvError::WrongRevision) => e,
        Err(e) => return failed(&e),
    };
    let current = match alive.get(key).await {
        Ok(current) => current,
        Err(_) => return failed(&e),
    };
    match current {
        Some(entry) => match message::decode::<Claim>(&entry.value) {
            Ok(theirs) if theirs.instance == record.instance => alive
                .update(key, record.claim(), entry.revision)
                .await
                .map_or_else(|e| failed(&e), |r| Some((r, false))),
            _ => {
                tracing::error!(process = %mesh.name, "another node took this node's process name while this one was cut off; the others now route this name there");
                None
            }
        },
        None => {
            tracing::info!(process = %mesh.name, "this node's claim had expired; joining again");
            alive
                .create(key, record.claim())
                .await
                .map_or_else(|e| failed(&e), |r| Some((r, true)))
        }
    }
}

/// While this node holds the scheduler lease: every [`REAP_EVERY`], removes the nodes
/// whose claim expired and whose run no longer listens.
pub async fn reap_dead(mesh: Arc<NatsMesh>, buckets: Buckets) {
    let mut leading = mesh.schedules.leading();
    let mut closed = mesh.closed.subscribe();
    let mut removed = HashSet::new();
    loop {
        if !*leading.borrow() {
            // Another node swept meanwhile: what this one saw is stale.
            removed.clear();
        }
        tokio::select! {
            _ = super::until(&mut leading, true) => {}
            _ = super::until(&mut closed, true) => return,
        }
        if let Err(e) = reap_once(&mesh, &buckets, &mut removed).await {
            tracing::debug!(process = %mesh.name, error = %e, "could not look for dead nodes; trying again");
        }
        tokio::select! {
            _ = tokio::time::sleep(REAP_EVERY) => {}
            _ = super::until(&mut closed, true) => return,
        }
    }
}

/// One look for dead nodes: the nodes with an `n` entry and no claim. `removed` holds
/// the keys seen deleted (their markers stay listed for [`MARKER_TTL`]): not read
/// again while they are.
async fn reap_once(
    mesh: &Arc<NatsMesh>,
    buckets: &Buckets,
    removed: &mut HashSet<String>,
) -> std::result::Result<(), String> {
    let claimed: HashSet<String> = keys_in(&buckets.alive, ">").await?;
    let listed = keys_in(&buckets.nodes, EVERY_NODE).await?;
    mesh.schedules.note_mesh_size(listed.len());
    removed.retain(|key| listed.contains(key));
    for key in listed {
        let Some(NodesKey::Node(name)) = parse_nodes_key(&key) else {
            continue;
        };
        if claimed.contains(&escape(&name)) {
            removed.remove(&key);
            continue;
        }
        if removed.contains(&key) {
            continue;
        }
        let entry = match buckets.nodes.get(&key).await {
            Ok(Some(entry)) => entry,
            Ok(None) => {
                removed.insert(key);
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        let Ok(record) = message::decode::<MemberRecord>(&entry.value) else {
            continue;
        };
        // Read before the probe: what the node writes if it comes back meanwhile stays.
        let entries = entries_of(&buckets.nodes, &name, &record).await;
        if is_alive(&mesh.client, &mesh.subjects, &name, record.instance).await {
            tracing::debug!(node = %name, "a node's claim expired, but it is alive: kept");
            continue;
        }
        tracing::info!(process = %mesh.name, node = %name, "a node died without a goodbye; removing it from the mesh");
        remove_entries(&buckets.nodes, &entries).await;
    }
    Ok(())
}

/// The keys of `bucket` under `filter` that hold a message (a value, or a marker not
/// expired yet): read from the stream's subjects, with no consumer (the bucket's
/// `Store` opened on first use: only the lease's holder looks).
async fn keys_in(bucket: &Bucket, filter: &str) -> std::result::Result<HashSet<String>, String> {
    let store = bucket.store().await.map_err(|e| e.to_string())?;
    let mut subjects = store
        .stream
        .info_with_subjects(format!("{}{filter}", store.prefix))
        .await
        .map_err(|e| e.to_string())?;
    let mut keys = HashSet::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.map_err(|e| e.to_string())?;
        if let Some(key) = subject.strip_prefix(store.prefix.as_str()) {
            keys.insert(key.to_string());
        }
    }
    Ok(keys)
}

/// Asks the watch to hold `scope` and waits until it does (a whole read of it).
pub async fn want(mesh: &NatsMesh, scope: Scope<'_>) -> Result<()> {
    let membership = &mesh.membership;
    let mut version = membership.subscribe();
    if membership.covers(scope) {
        return Ok(());
    }
    mesh.check_ready()?;
    membership.subscribing(scope);
    mesh.wants.send_if_modified(|w| w.add(scope));
    let mut stopped = mesh.stopped.subscribe();
    let deadline = tokio::time::Instant::now() + WANT_TIMEOUT;
    while !membership.covers(scope) {
        tokio::select! {
            _ = version.changed() => {}
            _ = super::until(&mut stopped, true) => return Err(Error::Stopped),
            _ = tokio::time::sleep_until(deadline) => {
                return Err(Error::timeout("learning the providers from the NATS cluster", WANT_TIMEOUT));
            }
        }
    }
    Ok(())
}

/// What this node's watch has seen of each node: the run, the callbacks (all of them,
/// or those watched), and whether it is stopping.
#[derive(Default)]
struct Table {
    nodes: HashMap<String, Known>,
}

struct Known {
    instance: u64,
    callbacks: BTreeSet<String>,
    leaving: bool,
}

/// Keeps the view current: a watch of what this node wants, while connected, started
/// again when it ends, when the connection comes back, or when this node wants more.
/// Each start reads what it watches whole. `first` gets the first view's outcome.
pub async fn watch_members(
    mesh: Arc<NatsMesh>,
    nodes: Arc<Bucket>,
    first: oneshot::Sender<Result<()>>,
) {
    let mut first = Some(first);
    let mut table = Table::default();
    let mut connected = mesh.connected.subscribe();
    let mut closed = mesh.closed.subscribe();
    let mut wants = mesh.wants.subscribe();
    loop {
        tokio::select! {
            _ = super::until(&mut connected, true) => {}
            _ = super::until(&mut closed, true) => return,
        }
        let wanted = wants.borrow_and_update().clone();
        let session = follow_bucket(&mesh, &nodes, &wanted, &mut first, &mut table);
        tokio::select! {
            reason = session => {
                tracing::debug!(process = %mesh.name, %reason, "the membership watch ended; starting it again");
                tokio::time::sleep(WATCH_RETRY).await;
            }
            _ = wants.changed() => {}
            _ = super::until(&mut connected, false) => {}
            _ = super::until(&mut closed, true) => return,
        }
    }
}

/// One watch of the keys `wanted` names: their current state as the view, then every
/// change. Returns why it ended.
async fn follow_bucket(
    mesh: &Arc<NatsMesh>,
    nodes: &Bucket,
    wanted: &Wants,
    first: &mut Option<oneshot::Sender<Result<()>>>,
    table: &mut Table,
) -> String {
    let filters = wanted.filters();
    tracing::debug!(process = %mesh.name, ?filters, "membership watch starting");
    let mut watch = if filters.is_empty() {
        None
    } else {
        // The bucket's `Store`, opened at the first watch (a stream info): a node that
        // watches nothing never asks for it.
        let nodes = match nodes.store().await {
            Ok(store) => store,
            Err(e) => return format!("opening the nodes bucket: {e}"),
        };
        match read_whole(mesh, nodes, &filters, table).await {
            Ok(watch) => Some(watch),
            Err(reason) => return reason,
        }
    };
    mark_covered(mesh, wanted);
    if let Some(first) = first.take() {
        let _ = first.send(Ok(()));
    }
    let Some(watch) = &mut watch else {
        return std::future::pending().await;
    };
    loop {
        match watch.next().await {
            Some(Ok(entry)) => apply(mesh, &entry, table),
            Some(Err(e)) => return format!("watch: {e}"),
            None => return "the watch ended".into(),
        }
    }
}

/// Tells the view that it holds what `wanted` names, kept current.
fn mark_covered(mesh: &NatsMesh, wanted: &Wants) {
    let membership = &mesh.membership;
    let mut scopes: Vec<Scope<'_>> = wanted.names.iter().map(|n| Scope::Callback(n)).collect();
    if wanted.everything {
        scopes.push(Scope::Everything);
    }
    for scope in scopes {
        let generation = membership.subscribing(scope);
        membership.subscribed(scope, generation);
    }
}

/// The watch `starting` makes, waiting no longer than [`WATCH_SETUP`] (async-nats may
/// wait 10 s while the bucket has no leader).
pub async fn start_watch(
    starting: impl std::future::Future<Output = std::result::Result<kv::Watch, kv::WatchError>>,
) -> std::result::Result<kv::Watch, String> {
    match tokio::time::timeout(WATCH_SETUP, starting).await {
        Ok(Ok(watch)) => Ok(watch),
        Ok(Err(e)) => Err(format!("watch: {e}")),
        Err(_) => Err(format!("the watch did not start within {WATCH_SETUP:?}")),
    }
}

/// Whether any key under `filters` holds a message (so a watch of them delivers some).
async fn any_key(nodes: &Store, filters: &[String]) -> std::result::Result<bool, String> {
    for filter in filters {
        let mut subjects = nodes
            .stream
            .info_with_subjects(format!("{}{filter}", nodes.prefix))
            .await
            .map_err(|e| format!("bucket info: {e}"))?;
        if let Some(found) = subjects.next().await {
            found.map_err(|e| format!("bucket info: {e}"))?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Starts a watch of `filters` with their current state and makes that the view (a
/// node in the view that is no longer there is removed once a probe confirms that it
/// is gone); the watch, for the changes after it.
async fn read_whole(
    mesh: &Arc<NatsMesh>,
    nodes: &Store,
    filters: &[String],
    table: &mut Table,
) -> std::result::Result<kv::Watch, String> {
    let any = any_key(nodes, filters).await?;
    let mut watch = start_watch(nodes.watch_many_with_history(filters)).await?;
    let mut snapshot = Vec::new();
    let mut complete = !any;
    while !complete {
        let entry = match tokio::time::timeout(SNAPSHOT_QUIET, watch.next()).await {
            Err(_) => break,
            Ok(Some(Ok(entry))) => entry,
            Ok(Some(Err(e))) => return Err(format!("watch: {e}")),
            Ok(None) => return Err("the watch ended".into()),
        };
        complete = entry.delta == 0;
        snapshot.push(entry);
    }
    tracing::debug!(process = %mesh.name, read = snapshot.len(), complete, "membership read whole");
    let before = std::mem::take(&mut table.nodes);
    for entry in snapshot.iter().filter(|e| e.operation == Operation::Put) {
        apply(mesh, entry, table);
    }
    if complete {
        let listed = &table.nodes;
        for (name, _) in mesh.membership.members() {
            if !listed.contains_key(&name) {
                let instance = before.get(&name).map(|k| k.instance);
                tokio::spawn(confirm_gone(mesh.clone(), name, instance));
            }
        }
    }
    Ok(watch)
}

/// Applies one change of the nodes bucket to the table and the view.
fn apply(mesh: &Arc<NatsMesh>, entry: &kv::Entry, table: &mut Table) {
    let Some(key) = parse_nodes_key(&entry.key) else {
        return;
    };
    let (name, callback) = match key {
        NodesKey::Node(name) => (name, None),
        NodesKey::Provider { callback, process } => (process, Some(callback)),
    };
    if name == *mesh.name {
        return;
    }
    let event = match entry.operation {
        Operation::Put => table.put(name, callback, &entry.value),
        Operation::Delete | Operation::Purge => table.remove(name, callback),
    };
    if let Some(event) = event {
        if !matches!(&event, MembershipEvent::Joined(m) if mesh.membership.is_current(&m.name, &m.callbacks))
        {
            mesh.report(mesh.membership.apply(event));
        }
    }
}

impl Table {
    /// An entry of `name` was written (its `n` entry, or its `c` key of `callback`);
    /// what that changes in the view.
    fn put(
        &mut self,
        name: String,
        callback: Option<String>,
        value: &[u8],
    ) -> Option<MembershipEvent> {
        let (instance, callbacks, leaving) = match callback {
            None => {
                let record = decoded::<MemberRecord>(&name, value)?;
                let callbacks = record.callbacks.into_iter().collect();
                (record.instance, callbacks, record.leaving)
            }
            Some(callback) => {
                let provider = decoded::<Provider>(&name, value)?;
                let mut callbacks = match self.nodes.get(&name) {
                    Some(known) if known.instance == provider.instance => known.callbacks.clone(),
                    _ => BTreeSet::new(),
                };
                callbacks.insert(callback);
                (provider.instance, callbacks, provider.leaving)
            }
        };
        let was_leaving = self
            .nodes
            .get(&name)
            .is_some_and(|k| k.instance == instance && k.leaving);
        let member = Member {
            name: name.clone(),
            callbacks: callbacks.iter().cloned().collect(),
        };
        self.nodes.insert(
            name.clone(),
            Known {
                instance,
                callbacks,
                leaving: leaving || was_leaving,
            },
        );
        match (leaving, was_leaving) {
            (false, false) => Some(MembershipEvent::Joined(member)),
            (true, false) => Some(MembershipEvent::Leaving { name }),
            (_, true) => None,
        }
    }

    /// An entry of `name` was deleted; what that changes in the view.
    fn remove(&mut self, name: String, callback: Option<String>) -> Option<MembershipEvent> {
        let known = self.nodes.get_mut(&name)?;
        if let Some(callback) = callback {
            known.callbacks.remove(&callback);
            if !known.callbacks.is_empty() {
                return (!known.leaving).then(|| {
                    MembershipEvent::Updated(Member {
                        name,
                        callbacks: known.callbacks.iter().cloned().collect(),
                    })
                });
            }
        }
        self.nodes.remove(&name);
        Some(MembershipEvent::Left { name })
    }
}

/// `value` decoded, or `None` (logged).
fn decoded<T: serde::de::DeserializeOwned>(name: &str, value: &[u8]) -> Option<T> {
    message::decode::<T>(value)
        .map_err(
            |e| tracing::warn!(node = %name, error = %e, "ignored an undecodable membership entry"),
        )
        .ok()
}

/// Removes `name`, whose entries are missing from a whole read, from the view unless
/// its run `instance` is still alive.
async fn confirm_gone(mesh: Arc<NatsMesh>, name: String, instance: Option<u64>) {
    if let Some(instance) = instance {
        if is_alive(&mesh.client, &mesh.subjects, &name, instance).await {
            tracing::info!(process = %mesh.name, node = %name, "a node's membership entries are missing, but the node is alive: kept");
            return;
        }
    }
    mesh.report(mesh.membership.apply(MembershipEvent::Left { name }));
}
