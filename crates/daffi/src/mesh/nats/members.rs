//! Membership in the JetStream KV bucket `<ns>-members`: this node's entry (created
//! atomically, renewed by a heartbeat, deleted at goodbye), and the watch that keeps
//! the view of the others current.
//!
//! Bound: an entry not renewed for [`MEMBER_TTL`] expires (the bucket's age limit), and
//! the server writes a marker every watcher sees. A node that dies without a goodbye
//! so leaves every view within `MEMBER_TTL` of its last heartbeat.
//!
//! Gaps never empty the view: a node leaves it only on its goodbye (a delete), or on
//! an expiry marker or a missing entry once a probe confirms that its run no longer
//! listens (see [`is_alive`]); a watch that ends or stalls starts again after the last
//! revision it saw. So the loss of the server that leads the bucket (whose replicas
//! then take 4-9 s to elect a new leader, with heartbeats unanswered meanwhile) costs
//! no member. The same probe lets a node restarted after a crash take its name at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, Store, UpdateErrorKind};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::subjects::{escape, unescape, Subjects};
use super::{unreachable_by, NatsMesh};
use crate::error::{Error, Result};
use crate::protocol::message::{self, Member, MembershipEvent};

/// How long an entry lives without a heartbeat: a node that dies leaves every view
/// within this (after its last heartbeat). Long enough to ride out the loss of the
/// server that leads the bucket: its replicas elect a new leader within NATS's
/// election timeout (at most 9 s), which then expires what is older than this at
/// once, before the heartbeats held up meanwhile land.
pub const MEMBER_TTL: Duration = Duration::from_secs(12);

/// How often a node renews its entry.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long one request to a KV bucket (a heartbeat, the lease, a claim) waits for
/// the server, for sending and again for its acknowledgment: while the replicas of a
/// bucket elect a leader (after the loss of the server that led it), requests go
/// unanswered; short waits keep the heartbeats and the lease trying every second or
/// two, so that they land as soon as there is a leader again.
pub const KV_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the membership watch may deliver nothing before it is started again: each
/// node's own heartbeat comes through it every [`HEARTBEAT`], so silence means the
/// watch lost its server (the async-nats ordered consumer itself notices only after
/// 10 s).
const WATCH_STALL: Duration = Duration::from_secs(3);

/// How long a node that resumes its watch after a gap may have missed changes and
/// still resume from the last one it saw: deletes and expiry markers stay in the
/// bucket for [`MEMBER_TTL`]; after a longer gap the view is read whole again.
const RESUME_WITHIN: Duration = Duration::from_secs(6);

/// How long starting a watch may take (creating its consumer on the bucket's leader).
const WATCH_SETUP: Duration = Duration::from_secs(2);

/// How long a node waits before starting a watch that ended again.
const WATCH_RETRY: Duration = Duration::from_millis(250);

/// How long a probe of a node waits for its answer; NATS answers "no responders" at
/// once when nobody listens.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a watch may deliver nothing of a bucket that holds values before the node
/// stops waiting for a whole first view (the values were expiry markers that expired
/// meanwhile, or the cluster is electing a leader).
const SNAPSHOT_QUIET: Duration = Duration::from_secs(2);

/// This node's entry: what the others know of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Tells this run of the node from an earlier one with the same name.
    pub instance: u64,
    /// The callbacks it serves.
    callbacks: Vec<String>,
    /// It began stopping: route nothing new to it.
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

    fn encode(&self) -> bytes::Bytes {
        message::encode(self)
    }
}

/// What the task that owns this node's entry is asked to do.
#[derive(Debug)]
pub enum RecordCommand {
    /// The callbacks changed, or the connection is back: write the entry now.
    Renew,
    /// Stopping began: mark the entry, so that the others route nothing new here.
    Leaving,
    /// Delete the entry and end.
    Goodbye,
}

/// The membership bucket of the mesh, created if it is not there yet (replicated on up
/// to three servers of the cluster).
pub async fn open_bucket(
    client: &async_nats::Client,
    subjects: &Subjects,
    urls: &str,
) -> Result<Store> {
    let config = kv::Config {
        bucket: subjects.members_bucket(),
        description: "daffi: the nodes of this mesh and their callbacks".into(),
        history: 1,
        max_age: MEMBER_TTL,
        // Expiry writes a marker, so that watchers see a node that died leave.
        limit_markers: Some(MEMBER_TTL),
        num_replicas: replicas(client),
        ..Default::default()
    };
    open_or_create(client, config, urls, "membership").await
}

/// How many servers keep a copy of a bucket: up to three of the cluster's.
pub fn replicas(client: &async_nats::Client) -> usize {
    client.server_info().connect_urls.len().clamp(1, 3)
}

/// The KV bucket `config` names, created with `config` if it is not there yet; `what`
/// names it in errors. Requests through the returned store wait [`KV_TIMEOUT`].
pub async fn open_or_create(
    client: &async_nats::Client,
    config: kv::Config,
    urls: &str,
    what: &str,
) -> Result<Store> {
    let requests = async_nats::jetstream::ContextBuilder::new()
        .timeout(KV_TIMEOUT)
        .build(client.clone());
    let bucket = config.bucket.clone();
    if let Ok(store) = requests.get_key_value(&bucket).await {
        return Ok(store);
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

/// Takes `name` in the bucket with `record`; its revision. A name held by a node that
/// still listens on its subject fails with [`Error::DuplicateProcessName`]; one whose
/// holder no longer does (it crashed, and its entry has not expired yet) is taken
/// over at once, so that a node restarted after a crash keeps its name.
pub async fn take_name(
    client: &async_nats::Client,
    subjects: &Subjects,
    bucket: &Store,
    name: &str,
    record: &MemberRecord,
    urls: &str,
) -> Result<u64> {
    let key = escape(name);
    let unreachable = |e: &dyn std::fmt::Display| {
        unreachable_by(urls, "could not join the membership bucket: ", e)
    };
    let duplicate = || Error::DuplicateProcessName {
        process: name.to_string(),
    };
    match bucket.create(&key, record.encode()).await {
        Ok(revision) => return Ok(revision),
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(unreachable(&e)),
    }
    let held = match bucket.entry(&key).await {
        Ok(Some(entry)) if entry.operation == Operation::Put => entry,
        // Deleted or expired meanwhile: the next try creates it.
        Ok(_) => return Err(unreachable(&"the name's entry changed meanwhile")),
        Err(e) => return Err(unreachable(&e)),
    };
    let holder = match message::decode::<MemberRecord>(&held.value) {
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
    bucket
        .update(&key, record.encode(), held.revision)
        .await
        .map_err(|e| match e.kind() {
            // Another node took it first.
            UpdateErrorKind::WrongLastRevision => duplicate(),
            _ => unreachable(&e),
        })
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

/// Owns this node's entry: renews it every [`HEARTBEAT`] and when asked, marks it at
/// stop, deletes it at goodbye.
pub async fn keep_record(
    mesh: Arc<NatsMesh>,
    bucket: Store,
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
            _ = heartbeat.tick() => RecordCommand::Renew,
        };
        match command {
            RecordCommand::Renew => {}
            RecordCommand::Leaving => record.leaving = true,
            RecordCommand::Goodbye => break,
        }
        record.callbacks = mesh.executor.callback_names();
        if let Some(new) = renew(&mesh, &bucket, &key, &record, revision).await {
            revision = new;
        }
    }
    if let Err(e) = bucket.delete_expect_revision(&key, Some(revision)).await {
        tracing::debug!(process = %mesh.name, error = %e, "could not delete this node's membership entry; it expires by itself");
    }
    mesh.finished.send_replace(true);
}

/// Writes `record` over this node's entry at `revision`; the new revision. When the
/// entry is not at `revision`, it is looked at: this node's own (a write that timed
/// out had landed) is written over at its revision; one that expired meanwhile (the
/// node was cut off longer than [`MEMBER_TTL`]) is created again, unless another node
/// has taken the name since.
async fn renew(
    mesh: &NatsMesh,
    bucket: &Store,
    key: &str,
    record: &MemberRecord,
    revision: u64,
) -> Option<u64> {
    let failed = |e: &dyn std::fmt::Display| {
        tracing::debug!(process = %mesh.name, error = %e, "could not renew this node's membership entry; trying again at the next heartbeat");
        None
    };
    let e = match bucket.update(key, record.encode(), revision).await {
        Ok(revision) => return Some(revision),
        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => e,
        Err(e) => return failed(&e),
    };
    let current = match bucket.entry(key).await {
        Ok(current) => current,
        Err(_) => return failed(&e),
    };
    let result = match current {
        Some(entry) if entry.operation == Operation::Put => {
            match message::decode::<MemberRecord>(&entry.value) {
                Ok(theirs) if theirs.instance == record.instance => bucket
                    .update(key, record.encode(), entry.revision)
                    .await
                    .map_err(|e| e.to_string()),
                _ => {
                    tracing::error!(process = %mesh.name, "another node took this node's process name while this one was cut off; the others now route this name there");
                    return None;
                }
            }
        }
        _ => {
            tracing::info!(process = %mesh.name, "this node's membership entry had expired; joining again");
            bucket
                .create(key, record.encode())
                .await
                .map_err(|e| e.to_string())
        }
    };
    result.map_or_else(|e| failed(&e), Some)
}

/// Where a watch that ended left off: the last revision applied to the view, and when;
/// and the run (instance) of each node seen, to probe one whose entry expired.
#[derive(Default)]
struct Position {
    last: Option<(u64, tokio::time::Instant)>,
    instances: HashMap<String, u64>,
}

impl Position {
    /// Notes `entry` as applied.
    fn saw(&mut self, entry: &kv::Entry) {
        self.last = Some((entry.revision, tokio::time::Instant::now()));
        if entry.operation == Operation::Put {
            if let Ok(record) = message::decode::<MemberRecord>(&entry.value) {
                self.instances.insert(entry.key.clone(), record.instance);
            }
        }
    }

    /// The revision to resume after, if the gap is short enough to have missed no
    /// delete (see [`RESUME_WITHIN`]).
    fn resume_after(&self) -> Option<u64> {
        self.last
            .filter(|(_, at)| at.elapsed() < RESUME_WITHIN)
            .map(|(revision, _)| revision)
    }
}

/// Keeps the view current: a watch of the bucket while connected, started again when
/// it ends, stalls or the connection comes back. The view is never cleared by a gap: a
/// new watch resumes after the last change seen (or reads the bucket whole after a
/// long gap). `first` gets the first view's outcome.
pub async fn watch_members(mesh: Arc<NatsMesh>, bucket: Store, first: oneshot::Sender<Result<()>>) {
    let mut first = Some(first);
    let mut position = Position::default();
    let mut connected = mesh.connected.subscribe();
    let mut closed = mesh.closed.subscribe();
    loop {
        tokio::select! {
            _ = super::until(&mut connected, true) => {}
            _ = super::until(&mut closed, true) => return,
        }
        let session = follow_bucket(&mesh, &bucket, &mut first, &mut position);
        tokio::select! {
            reason = session => {
                tracing::debug!(process = %mesh.name, %reason, "the membership watch ended; starting it again");
                tokio::time::sleep(WATCH_RETRY).await;
            }
            _ = super::until(&mut connected, false) => {}
            _ = super::until(&mut closed, true) => return,
        }
    }
}

/// One watch of the bucket: after a short gap, the changes since `position`; else its
/// current state as the view, then every change. Returns why it ended.
async fn follow_bucket(
    mesh: &Arc<NatsMesh>,
    bucket: &Store,
    first: &mut Option<oneshot::Sender<Result<()>>>,
    position: &mut Position,
) -> String {
    let resume_after = position.resume_after();
    tracing::debug!(process = %mesh.name, ?resume_after, "membership watch starting");
    let mut watch = match resume_after {
        Some(revision) => match start_watch(bucket.watch_all_from_revision(revision + 1)).await {
            Ok(watch) => watch,
            Err(e) => return e,
        },
        None => match read_whole(mesh, bucket, position).await {
            Ok(watch) => watch,
            Err(reason) => return reason,
        },
    };
    if let Some(first) = first.take() {
        let _ = first.send(Ok(()));
    }
    loop {
        match tokio::time::timeout(WATCH_STALL, watch.next()).await {
            Ok(Some(Ok(entry))) => apply(mesh, &entry, position),
            Ok(Some(Err(e))) => return format!("watch: {e}"),
            Ok(None) => return "the watch ended".into(),
            Err(_) => {
                return format!(
                    "no change came for {WATCH_STALL:?}, not even this node's heartbeat"
                )
            }
        }
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

/// Starts a watch with the bucket's current state and makes that the view; the watch,
/// for the changes after it.
async fn read_whole(
    mesh: &Arc<NatsMesh>,
    bucket: &Store,
    position: &mut Position,
) -> std::result::Result<kv::Watch, String> {
    let values = match bucket.status().await {
        Ok(status) => status.values(),
        Err(e) => return Err(format!("bucket status: {e}")),
    };
    // Each entry's current value first, then the changes (`watch_all` gives only the
    // changes: the view would wait for the others' heartbeats).
    let mut watch = start_watch(bucket.watch_with_history(">")).await?;
    let mut snapshot = Vec::new();
    let mut complete = values == 0;
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
    tracing::debug!(process = %mesh.name, values, read = snapshot.len(), complete, "membership read whole");
    for entry in &snapshot {
        apply(mesh, entry, position);
    }
    if complete {
        // A node in the view with no entry left: it expired while no watch ran (or the
        // bucket answered from a replica that lags). Removed only once confirmed.
        let listed: HashSet<&str> = snapshot.iter().map(|e| e.key.as_str()).collect();
        for (name, _) in mesh.membership.members() {
            let key = escape(&name);
            if !listed.contains(key.as_str()) {
                let instance = position.instances.get(&key).copied();
                tokio::spawn(confirm_gone(mesh.clone(), name, instance));
            }
        }
    }
    Ok(watch)
}

/// Applies one change of the bucket to the view. An entry that expired is first
/// confirmed: its node is removed only if nobody listens on its subject (a live node
/// whose heartbeats were held up while the bucket elected a leader stays, and writes
/// its entry again at its next heartbeat).
fn apply(mesh: &Arc<NatsMesh>, entry: &kv::Entry, position: &mut Position) {
    position.saw(entry);
    let Some(event) = event_of(mesh, entry) else {
        return;
    };
    let expired = match entry.operation {
        // Kept: the node may be alive, and its entry written again.
        Operation::Purge => position.instances.get(&entry.key).copied(),
        Operation::Delete => {
            position.instances.remove(&entry.key);
            None
        }
        Operation::Put => None,
    };
    match (event, expired) {
        (MembershipEvent::Left { name }, Some(instance)) => {
            tokio::spawn(confirm_gone(mesh.clone(), name, Some(instance)));
        }
        (event, _) => mesh.report(mesh.membership.apply(event)),
    }
}

/// Removes `name`, whose entry expired or is missing, from the view unless its run
/// `instance` is still alive.
async fn confirm_gone(mesh: Arc<NatsMesh>, name: String, instance: Option<u64>) {
    if let Some(instance) = instance {
        if is_alive(&mesh.client, &mesh.subjects, &name, instance).await {
            tracing::info!(process = %mesh.name, node = %name, "a node's membership entry expired or is missing, but the node is alive: kept");
            return;
        }
    }
    mesh.report(mesh.membership.apply(MembershipEvent::Left { name }));
}

/// What an entry of the bucket means for the view; `None` for this node's own entry
/// and for entries no node wrote.
fn event_of(mesh: &NatsMesh, entry: &kv::Entry) -> Option<MembershipEvent> {
    let name = unescape(&entry.key)?;
    if name == *mesh.name {
        return None;
    }
    match entry.operation {
        Operation::Delete | Operation::Purge => Some(MembershipEvent::Left { name }),
        Operation::Put => match message::decode::<MemberRecord>(&entry.value) {
            Ok(record) if record.leaving => Some(MembershipEvent::Leaving { name }),
            // A heartbeat: nothing changed.
            Ok(record) if mesh.membership.is_current(&name, &record.callbacks) => None,
            Ok(record) => Some(MembershipEvent::Joined(Member {
                name,
                callbacks: record.callbacks,
            })),
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "ignored an undecodable membership entry");
                None
            }
        },
    }
}
