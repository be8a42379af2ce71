//! Membership in the JetStream KV bucket `<ns>-members`: this node's entry (created
//! atomically, renewed by a heartbeat, deleted at goodbye), and the watch that keeps
//! the view of the others current.
//!
//! Bound: an entry not renewed for [`MEMBER_TTL`] expires (the bucket's age limit), and
//! the server writes a marker every watcher sees as a delete. A node that dies without
//! a goodbye so leaves every view within `MEMBER_TTL` of its last heartbeat.

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

/// How long a watch may deliver nothing of a bucket that holds values before the node
/// stops waiting for a whole first view (the values were expiry markers that expired
/// meanwhile, or the cluster is electing a leader).
const SNAPSHOT_QUIET: Duration = Duration::from_secs(2);

/// This node's entry: what the others know of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Tells this run of the node from an earlier one with the same name.
    instance: u64,
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
    let jetstream = async_nats::jetstream::new(client.clone());
    let bucket = subjects.members_bucket();
    if let Ok(store) = jetstream.get_key_value(&bucket).await {
        return Ok(store);
    }
    let servers = client.server_info().connect_urls.len().max(1);
    let config = kv::Config {
        bucket: bucket.clone(),
        description: "daffi: the nodes of this mesh and their callbacks".into(),
        history: 1,
        max_age: MEMBER_TTL,
        // Expiry writes a marker, so that watchers see a node that died leave.
        limit_markers: Some(MEMBER_TTL),
        num_replicas: servers.min(3),
        ..Default::default()
    };
    match jetstream.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another node created it meanwhile.
        Err(create) => jetstream.get_key_value(&bucket).await.map_err(|_| {
            unreachable_by(
                urls,
                "the membership bucket could not be created (JetStream enabled on the servers?): ",
                create,
            )
        }),
    }
}

/// Takes `name` in the bucket with `record`; its revision. A name that is taken fails
/// with [`Error::DuplicateProcessName`].
pub async fn take_name(
    bucket: &Store,
    name: &str,
    record: &MemberRecord,
    urls: &str,
) -> Result<u64> {
    bucket
        .create(escape(name), record.encode())
        .await
        .map_err(|e| match e.kind() {
            CreateErrorKind::AlreadyExists => Error::DuplicateProcessName {
                process: name.to_string(),
            },
            _ => unreachable_by(urls, "could not join the membership bucket: ", e),
        })
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

/// Keeps the view current: a watch of the bucket while connected, started again
/// (with a fresh view) after each reconnect. `first` gets the first view's outcome.
pub async fn watch_members(mesh: Arc<NatsMesh>, bucket: Store, first: oneshot::Sender<Result<()>>) {
    let mut first = Some(first);
    let mut connected = mesh.connected.subscribe();
    let mut closed = mesh.closed.subscribe();
    loop {
        tokio::select! {
            _ = super::until(&mut connected, true) => {}
            _ = super::until(&mut closed, true) => return,
        }
        let session = follow_bucket(&mesh, &bucket, &mut first);
        tokio::select! {
            reason = session => {
                tracing::debug!(process = %mesh.name, %reason, "the membership watch ended; starting it again");
                tokio::time::sleep(HEARTBEAT).await;
            }
            _ = super::until(&mut connected, false) => {}
            _ = super::until(&mut closed, true) => return,
        }
    }
}

/// One watch of the bucket: its current state as the view, then every change. Returns
/// why it ended.
async fn follow_bucket(
    mesh: &NatsMesh,
    bucket: &Store,
    first: &mut Option<oneshot::Sender<Result<()>>>,
) -> String {
    let values = match bucket.status().await {
        Ok(status) => status.values(),
        Err(e) => return format!("bucket status: {e}"),
    };
    let mut watch = match bucket.watch_with_history(">").await {
        Ok(watch) => watch,
        Err(e) => return format!("watch: {e}"),
    };
    let mut snapshot = Vec::new();
    let mut complete = values == 0;
    while !complete {
        let entry = match tokio::time::timeout(SNAPSHOT_QUIET, watch.next()).await {
            Err(_) => break,
            Ok(Some(Ok(entry))) => entry,
            Ok(Some(Err(e))) => return format!("watch: {e}"),
            Ok(None) => return "the watch ended".into(),
        };
        complete = entry.delta == 0;
        snapshot.push(entry);
    }
    if complete {
        let members = snapshot.iter().filter_map(|e| member_of(mesh, e)).collect();
        mesh.report(mesh.membership.reset(members));
    } else {
        // The watch is slow (a cluster electing a leader): keep the view, and apply
        // what came as changes.
        for entry in &snapshot {
            apply(mesh, entry);
        }
    }
    if let Some(first) = first.take() {
        let _ = first.send(Ok(()));
    }
    while let Some(entry) = watch.next().await {
        match entry {
            Ok(entry) => apply(mesh, &entry),
            Err(e) => return format!("watch: {e}"),
        }
    }
    "the watch ended".into()
}

/// Applies one change of the bucket to the view.
fn apply(mesh: &NatsMesh, entry: &kv::Entry) {
    if let Some(event) = event_of(mesh, entry) {
        mesh.report(mesh.membership.apply(event));
    }
}

/// The member an entry of the first view stands for (none for deleted or leaving
/// nodes, and for this node).
fn member_of(mesh: &NatsMesh, entry: &kv::Entry) -> Option<Member> {
    match event_of(mesh, entry)? {
        MembershipEvent::Joined(member) => Some(member),
        _ => None,
    }
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
