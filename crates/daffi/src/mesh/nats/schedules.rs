//! PERIOD over NATS: the schedules live in the replicated JetStream KV bucket
//! `<ns>-schedules` (one key per task id), so that they outlive every process, and one
//! node at a time fires them: the holder of the lease `leader` in the bucket
//! `<ns>-scheduler`. The schedules bucket is opened on its first use (a schedule, a
//! cancel, a listing), not at the node's start: a node that never schedules costs the
//! servers no JetStream API request for it, which at a mass start of 10,000 nodes
//! halves the requests the joins queue. The lease bucket is never opened: its writes
//! are daffi's own requests (see `kv`), and its first write creates it if missing.
//!
//! - **the lease** is created atomically by a node that finds none, and renewed by its
//!   holder every [`LEASE_RENEW`] with a revision-checked update; the bucket's age limit
//!   ([`LEASE_TTL`]) drops it when its holder dies. A holder whose renewal is refused
//!   (the lease changed) stops firing; one whose renewal goes unanswered (the bucket
//!   electing a leader) fires on, since runs are claimed one by one (below). A node that
//!   stops deletes its lease, so that another takes over at once.
//! - **the others** do not ask the bucket: the holder announces the lease, and its
//!   release, with a core message on `<ns>.lease`, which every node hears (no consumer,
//!   no request): after each renewal in a mesh of up to [`ANNOUNCED_PER_SECOND`] nodes,
//!   and less often in a larger one (every `n / ANNOUNCED_PER_SECOND` seconds, at most
//!   every [`ANNOUNCE_AT_MOST_EVERY`]: each announcement is one message to every node,
//!   10,000 messages a second at 10,000 nodes when it went every second). The
//!   announcement says how often they come. While it holds the lease, the holder also
//!   answers probes on `<ns>.lease.holder`, where nobody else listens.
//! - **taking over**: a node that heard no announcement for `LEASE_TTL`, or for the
//!   announced period and a renewal's more if that is longer (plus up to one period, at
//!   random), or at once when the holder released it, first probes the holder: an
//!   answer (the holder lives, its announcement was late) means waiting again; "no
//!   responders" (NATS answers at once when nobody listens: the holder is gone), or no
//!   answer to two probes in a row (a holder busy with a mass start answers late; one
//!   that hangs must still be replaced), means trying to take the lease. When that try
//!   fails, it waits a lease's life (not every second or two: at a mass start the busy
//!   servers delay the renewals, and 10,000 nodes' tries would add to their queue, and
//!   to the chance that one takes a lease whose renewal came late). A node that joins
//!   waits a lease's life (3-4 s) for an announcement before its first probe. So a mesh
//!   with a leader costs the servers one lease write a second and at most about
//!   [`ANNOUNCED_PER_SECOND`] messages a second, whatever its size, an idle node at
//!   most one message a second, and a join at most one probe of the holder and its
//!   answer (about half of the joins at a mass start of 10,000 nodes).
//! - **a run** is claimed before it is sent: the leader writes the task's next run (or
//!   deletes a task whose last run this is) with a revision-checked update, and sends
//!   the run only if that write won. A run is so never sent twice, even by two nodes that
//!   both believe they lead; a run due while no node leads is sent late, at takeover
//!   (a repeating task skips the runs it missed, as with the controller).
//! - **times** are stored as wall-clock times (milliseconds since the Unix epoch), read
//!   from the clock of the node that schedules, and compared with the leader's: runs
//!   shift by the skew between their clocks.
//! - A run is a NO_RETURN request to the pinned node or to a provider chosen at random
//!   (this node included: the leader is any node); with none, the run is skipped and
//!   logged, and the schedule goes on.
//!
//! Takeover bound: the leader's death stops the runs for at most `LEASE_TTL` (its last
//! renewal's age limit) plus `LEASE_RENEW` (the others' next try, spread at random),
//! about 4 s, in a mesh of up to `ANNOUNCED_PER_SECOND` nodes, or another `LEASE_TTL`
//! and `LEASE_RENEW` when the first try comes before the server has dropped the lease;
//! in a larger mesh, up to twice the announced period plus a renewal's (11 s at 5,000
//! nodes and more). The loss
//! of the server that leads the buckets' streams pauses them while its replicas elect a
//! new leader (NATS's election timeout, 4-9 s; measured 0.2-6.5 s over 10 runs, was up
//! to 11.6 s when each KV request waited 10 s and the lease lapsed meanwhile; on a
//! loaded 2-core machine 0.2-8.4 s, and 13.1 s once, when JetStream itself answered
//! "temporarily unavailable" for 12 s); nothing is lost. A holder keeps its lease
//! through the election (see `hold_or_take`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, Store};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, OnceCell};
use tokio::time::Instant;

use super::caller::CALLER;
use super::kv::{Bucket, KvError};
use super::members::{open_or_create, replicas, start_watch};
use super::NatsMesh;
use crate::error::{Error, Result};
use crate::protocol::message::{self, ControlAnswer, ControlRequest, TaskInfo, Timing};
use crate::protocol::MAX_TASK_ID;

/// How long the lease lives without a renewal: a leader that dies stops the runs for at
/// most this plus [`LEASE_RENEW`].
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// How often the leader renews its lease (and a node that found it held, but hears no
/// renewal, tries again).
pub const LEASE_RENEW: Duration = Duration::from_secs(1);

/// The most messages a second the holder's announcements of the lease cost (one to every
/// node each): a mesh of more nodes hears them less often (see [`announce_every`]).
pub const ANNOUNCED_PER_SECOND: usize = 1000;

/// The longest time between two announcements of the lease, however large the mesh: a
/// node that hears none for about twice this tries to take over.
pub const ANNOUNCE_AT_MOST_EVERY: Duration = Duration::from_secs(5);

/// How long a probe of the lease's holder waits for its answer; NATS answers "no
/// responders" at once when nobody holds the lease (or its holder is gone). A holder
/// busy with a mass start may answer later: one probe without an answer is followed by
/// another after a lease's life, two in a row lead to a try.
const HOLDER_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a cancel reads the task again when its delete lost to a run's write.
const CANCEL_TRIES: usize = 5;

/// How long the leader waits before it tries again a run whose claim failed.
const CLAIM_RETRY: Duration = Duration::from_millis(100);

/// The key of the lease in the scheduler bucket.
const LEASE_KEY: &str = "leader";

/// A task as the schedules bucket holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredTask {
    callback: String,
    #[serde(with = "serde_bytes")]
    args: Vec<u8>,
    on: Option<String>,
    created_by: String,
    /// The interval, for repeating tasks.
    interval_ms: Option<u64>,
    /// The next run, in milliseconds since the Unix epoch.
    next_run_ms: u64,
    /// For `at` tasks: the runs still to come (the next one first), in the same clock.
    upcoming_ms: Vec<u64>,
    /// Runs sent so far, by any leader.
    runs: u64,
}

impl StoredTask {
    /// The task for `timing`, read at `now_ms`; why it cannot be kept otherwise.
    fn plan(timing: &Timing, now_ms: u64) -> Result<(Option<u64>, u64, Vec<u64>)> {
        let invalid = |why: &str| Err(Error::Config(why.to_string()));
        match timing {
            Timing::Every { interval_ms: 0, .. } => {
                invalid("the interval must be longer than zero")
            }
            Timing::Every {
                interval_ms,
                first_ms,
            } => Ok((
                Some(*interval_ms),
                now_ms.saturating_add(first_ms.unwrap_or(*interval_ms)),
                Vec::new(),
            )),
            Timing::At { delays_ms } if delays_ms.is_empty() => {
                invalid("the list of times is empty")
            }
            Timing::At { delays_ms } => {
                let mut upcoming: Vec<u64> = delays_ms
                    .iter()
                    .map(|d| now_ms.saturating_add(*d))
                    .collect();
                upcoming.sort_unstable();
                Ok((None, upcoming[0], upcoming))
            }
        }
    }

    /// Moves past the run due at `now_ms`; `false` when that was the last.
    fn advance(&mut self, now_ms: u64) -> bool {
        self.runs += 1;
        match self.interval_ms {
            Some(interval) => {
                // Keep the cadence; after a stall (or a takeover), skip the missed runs.
                let behind = now_ms.saturating_sub(self.next_run_ms) / interval;
                self.next_run_ms += (behind + 1) * interval;
                true
            }
            None => {
                if !self.upcoming_ms.is_empty() {
                    self.upcoming_ms.remove(0);
                }
                match self.upcoming_ms.first() {
                    Some(next) => {
                        self.next_run_ms = *next;
                        true
                    }
                    None => false,
                }
            }
        }
    }

    fn info(&self, task_id: u64, now_ms: u64) -> TaskInfo {
        TaskInfo {
            task_id,
            callback: self.callback.clone(),
            on: self.on.clone(),
            created_by: self.created_by.clone(),
            next_run_in_ms: self.next_run_ms.saturating_sub(now_ms),
            interval_ms: self.interval_ms,
            remaining_runs: self
                .interval_ms
                .is_none()
                .then_some(self.upcoming_ms.len() as u64),
            runs: self.runs,
            restored_by: None,
        }
    }
}

/// A task read from the bucket, with the revision a write to it must name.
struct Held {
    task_id: u64,
    revision: u64,
    task: StoredTask,
}

/// The two buckets of PERIOD on one mesh: the tasks bucket opened on its first use (a
/// node that never schedules never asks the cluster for it: opening one is a JetStream
/// API request, and at a mass start those queue at the servers), the lease written
/// with daffi's own requests, which open nothing.
pub struct Schedules {
    client: async_nats::Client,
    namespace: String,
    urls: String,
    /// How long a request of the user's waits for a bucket to open (`connect_timeout`).
    open_timeout: Duration,
    tasks: OnceCell<Store>,
    /// The lease, written with daffi's own requests (see `kv`): no stream info at a
    /// node's first try, the bucket created by the first write if missing.
    lease: Bucket,
    /// Whether this node holds the lease now (it also removes the nodes that died:
    /// see `members`).
    leading: watch::Sender<bool>,
    /// How many nodes the mesh had at this node's last look for dead ones (while it
    /// leads): how often it announces the lease.
    mesh_size: AtomicUsize,
}

impl Schedules {
    /// The buckets of `namespace`, not opened yet; a request of the user's tries to
    /// open them for up to `open_timeout`.
    pub fn new(
        client: &async_nats::Client,
        namespace: &str,
        urls: &str,
        open_timeout: Duration,
    ) -> Schedules {
        Schedules {
            client: client.clone(),
            namespace: namespace.to_string(),
            urls: urls.to_string(),
            open_timeout,
            tasks: OnceCell::new(),
            lease: Bucket::new(
                client,
                lease_config(client, namespace),
                urls,
                "scheduler lease",
            ),
            leading: watch::channel(false).0,
            mesh_size: AtomicUsize::new(0),
        }
    }

    /// The tasks bucket, opened (or created) now if it is not yet.
    async fn tasks(&self) -> Result<&Store> {
        self.tasks.get_or_try_init(|| self.open_tasks()).await
    }

    /// Opens (or creates) the tasks bucket, tried again while the cluster is
    /// unreachable for up to `open_timeout` (a fresh cluster answers "no responders"
    /// until the bucket has a leader).
    async fn open_tasks(&self) -> Result<Store> {
        let config = kv::Config {
            bucket: format!("{}-schedules", self.namespace),
            description: "daffi: the PERIOD tasks of this mesh".into(),
            history: 1,
            num_replicas: replicas(&self.client),
            ..Default::default()
        };
        let give_up_at = Instant::now() + self.open_timeout;
        super::retrying(give_up_at, "opening the schedules bucket", || async {
            let tasks =
                open_or_create(&self.client, config.clone(), &self.urls, "schedules").await?;
            // A bucket just created answers once its replicas have a leader: a read of
            // a key no task has (ids start at 1) tells.
            tasks.entry("0").await.map_err(|e| {
                super::unreachable_by(&self.urls, "the schedules bucket does not answer yet: ", e)
            })?;
            Ok(tasks)
        })
        .await
    }

    /// Flips with whether this node holds the lease.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// The holder of the lease found `nodes` nodes in the mesh (see `members`).
    pub fn note_mesh_size(&self, nodes: usize) {
        self.mesh_size.store(nodes, Ordering::Relaxed);
    }

    /// How often the holder announces the lease, for the mesh it last saw.
    fn announce_every(&self) -> Duration {
        announce_every(self.mesh_size.load(Ordering::Relaxed))
    }

    /// Every task in the bucket.
    async fn read_all(&self) -> std::result::Result<Vec<Held>, String> {
        let tasks = self.tasks().await.map_err(|e| e.to_string())?;
        let mut keys = tasks.keys().await.map_err(|e| e.to_string())?;
        let mut held = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            if let Some(task) = self.read(&key).await? {
                held.push(task);
            }
        }
        Ok(held)
    }

    /// The task under `key`, if there is one.
    async fn read(&self, key: &str) -> std::result::Result<Option<Held>, String> {
        let Some(task_id) = key.parse().ok() else {
            return Ok(None);
        };
        let tasks = self.tasks().await.map_err(|e| e.to_string())?;
        let entry = tasks.entry(key).await.map_err(|e| e.to_string())?;
        Ok(entry.and_then(|entry| held_of(task_id, &entry)))
    }
}

/// The lease bucket of `namespace`.
fn lease_config(client: &async_nats::Client, namespace: &str) -> kv::Config {
    kv::Config {
        bucket: format!("{namespace}-scheduler"),
        description: "daffi: the node that fires the PERIOD tasks (a lease)".into(),
        history: 1,
        max_age: LEASE_TTL,
        num_replicas: replicas(client),
        ..Default::default()
    }
}

/// How often the holder announces the lease to a mesh of `nodes` nodes: every renewal
/// up to [`ANNOUNCED_PER_SECOND`] nodes, every `nodes / ANNOUNCED_PER_SECOND` seconds
/// above, and at least every [`ANNOUNCE_AT_MOST_EVERY`].
fn announce_every(nodes: usize) -> Duration {
    Duration::from_secs_f64(nodes as f64 / ANNOUNCED_PER_SECOND as f64)
        .clamp(LEASE_RENEW, ANNOUNCE_AT_MOST_EVERY)
}

/// The task `entry` holds; `None` for a deleted one, or a value no node wrote.
fn held_of(task_id: u64, entry: &kv::Entry) -> Option<Held> {
    if entry.operation != Operation::Put {
        return None;
    }
    match message::decode::<StoredTask>(&entry.value) {
        Ok(task) => Some(Held {
            task_id,
            revision: entry.revision,
            task,
        }),
        Err(e) => {
            tracing::warn!(key = %entry.key, error = %e, "ignored an undecodable scheduled task");
            None
        }
    }
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NatsMesh {
    /// Carries out a control request: the schedule requests in the bucket; the
    /// counters are not available over NATS.
    pub(super) async fn answer_control(
        &self,
        request: ControlRequest,
        what: &str,
    ) -> Result<ControlAnswer> {
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        if !self.is_connected() {
            return Err(self.unreachable("not connected (reconnecting)"));
        }
        match request {
            ControlRequest::Schedule {
                callback,
                args,
                on,
                timing,
            } => self.schedule(callback, args, on, timing).await,
            ControlRequest::Cancel { task_id } => self.cancel(task_id).await,
            ControlRequest::ListTasks { after } => self.list_tasks(after).await,
            // Over NATS every node keeps the whole membership already.
            ControlRequest::Subscribe { .. } => Ok(ControlAnswer::Subscribed),
            ControlRequest::Stats | ControlRequest::Restore { .. } => Err(Error::Unsupported {
                what: format!("`{what}`"),
                reason: "over NATS: calls go from node to node through no process that could count them; count them in your callbacks, or use the built-in controller".into(),
            }),
        }
    }

    fn schedules_failed(&self, e: impl std::fmt::Display) -> Error {
        self.unreachable(&format!("the schedules bucket failed: {e}"))
    }

    async fn schedule(
        &self,
        callback: String,
        args: Bytes,
        on: Option<String>,
        timing: Timing,
    ) -> Result<ControlAnswer> {
        let (interval_ms, next_run_ms, upcoming_ms) = StoredTask::plan(&timing, now_ms())?;
        let task = StoredTask {
            callback,
            args: args.to_vec(),
            on,
            created_by: self.name.to_string(),
            interval_ms,
            next_run_ms,
            upcoming_ms,
            runs: 0,
        };
        let value = message::encode(&task);
        let limit = self.schedule_limit();
        if value.len() > limit {
            return Err(Error::PayloadTooLarge {
                callback: task.callback,
                size: value.len(),
                limit,
            });
        }
        let tasks = self.schedules.tasks().await?;
        loop {
            let task_id = fastrand::u64(1..=MAX_TASK_ID);
            match tasks.create(task_id.to_string(), value.clone()).await {
                Ok(_) => {
                    tracing::info!(task_id, callback = %task.callback, "scheduled a task");
                    return Ok(ControlAnswer::Scheduled { task_id });
                }
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.schedules_failed(e)),
            }
        }
    }

    /// The largest task the bucket stores: one message of the servers.
    fn schedule_limit(&self) -> usize {
        self.client
            .server_info()
            .max_payload
            .saturating_sub(super::HEADER_ROOM)
    }

    async fn cancel(&self, task_id: u64) -> Result<ControlAnswer> {
        let key = task_id.to_string();
        for _ in 0..CANCEL_TRIES {
            let held = self
                .schedules
                .read(&key)
                .await
                .map_err(|e| self.schedules_failed(e))?
                .ok_or(Error::TaskNotFound { task_id })?;
            // The leader may have written the next run meanwhile: read it again.
            if self
                .schedules
                .tasks()
                .await?
                .delete_expect_revision(&key, Some(held.revision))
                .await
                .is_ok()
            {
                tracing::info!(task_id, "cancelled a task");
                return Ok(ControlAnswer::Cancelled);
            }
        }
        Err(self.schedules_failed(format!(
            "task {task_id} kept changing while being cancelled; try again"
        )))
    }

    async fn list_tasks(&self, after: u64) -> Result<ControlAnswer> {
        let now = now_ms();
        let mut tasks: Vec<TaskInfo> = self
            .schedules
            .read_all()
            .await
            .map_err(|e| self.schedules_failed(e))?
            .into_iter()
            .filter(|held| held.task_id > after)
            .map(|held| held.task.info(held.task_id, now))
            .collect();
        tasks.sort_by_key(|t| t.task_id);
        // The answer never crosses the network: one page holds every task.
        Ok(ControlAnswer::Tasks {
            tasks,
            omitted_tasks: 0,
        })
    }

    /// Sends the runs in `book` that are due (this node holds the lease); `false` if
    /// a claim failed (the task may still look due).
    async fn fire_due(&self, book: &mut Book) -> bool {
        let mut all_claimed = true;
        let now = now_ms();
        let due: Vec<u64> = book
            .tasks
            .values()
            .filter(|held| held.task.next_run_ms <= now)
            .map(|held| held.task_id)
            .collect();
        for task_id in due {
            let Some(held) = book.tasks.get(&task_id) else {
                continue;
            };
            // A view of providers holds those of the names asked for: this one's too.
            let scope = crate::mesh::Scope::Callback(&held.task.callback);
            if let Err(e) = super::members::want(self, scope).await {
                tracing::debug!(task_id, error = %e, "could not learn the providers of a scheduled callback");
            }
            let Some(held) = book.tasks.get(&task_id) else {
                continue;
            };
            let mut next = held.task.clone();
            let goes_on = next.advance(now);
            match self.claim(held, &next, goes_on).await {
                Ok(revision) => {
                    self.fire(task_id, &next);
                    match revision {
                        Some(revision) => {
                            let held = Held {
                                task_id,
                                revision,
                                task: next,
                            };
                            book.tasks.insert(task_id, held);
                        }
                        None => {
                            book.tasks.remove(&task_id);
                            tracing::info!(
                                task_id,
                                "a scheduled task finished (its last time passed)"
                            );
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(task_id, error = %e, "did not claim a scheduled run (changed meanwhile)");
                    all_claimed = false;
                    self.refresh(book, task_id).await;
                }
            }
        }
        all_claimed
    }

    /// Writes the task's next run (`next`), or deletes it after its last, at the
    /// revision `held` was read at: the write wins only if no other node changed or
    /// cancelled the task meanwhile. The task's new revision (`None`: deleted).
    async fn claim(
        &self,
        held: &Held,
        next: &StoredTask,
        goes_on: bool,
    ) -> std::result::Result<Option<u64>, String> {
        let key = held.task_id.to_string();
        let tasks = self.schedules.tasks().await.map_err(|e| e.to_string())?;
        if goes_on {
            tasks
                .update(&key, message::encode(next), held.revision)
                .await
                .map(Some)
                .map_err(|e| e.to_string())
        } else {
            tasks
                .delete_expect_revision(&key, Some(held.revision))
                .await
                .map(|()| None)
                .map_err(|e| e.to_string())
        }
    }

    /// Reads the task `task_id` into `book` again, after a claim lost; when that fails
    /// too, `book` starts over from a new watch.
    async fn refresh(&self, book: &mut Book, task_id: u64) {
        match self.schedules.read(&task_id.to_string()).await {
            Ok(Some(held)) => {
                book.tasks.insert(task_id, held);
            }
            Ok(None) => {
                book.tasks.remove(&task_id);
            }
            Err(e) => {
                tracing::debug!(task_id, error = %e, "could not read a scheduled task; reading them all again");
                book.forget();
            }
        }
    }

    /// Sends one run of `task`, never waiting for it.
    fn fire(&self, task_id: u64, task: &StoredTask) {
        let Some(target) = self.pick_run_target(&task.callback, task.on.as_deref()) else {
            tracing::warn!(task_id, callback = %task.callback, on = ?task.on, "skipped a scheduled run: no node serves it now");
            return;
        };
        let subject = self.subjects.node_call(&target, &task.callback);
        let mut headers = HeaderMap::new();
        headers.insert(CALLER, &*self.name);
        let payload = Bytes::copy_from_slice(&task.args);
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.publish_with_headers(subject, headers, payload).await {
                tracing::warn!(task_id, error = %e, "skipped a scheduled run: it could not be sent");
            }
        });
    }

    /// The node a run goes to: `on`, or a provider chosen at random; this node too.
    fn pick_run_target(&self, callback: &str, on: Option<&str>) -> Option<Arc<str>> {
        let here = self.executor.callback_names().iter().any(|n| n == callback);
        match on {
            Some(process) if process == &*self.name => here.then(|| self.name.clone()),
            Some(process) => match self.membership.serves(process, callback) {
                Some((node, true)) => Some(node),
                _ => None,
            },
            None => {
                let mut nodes = self.membership.providers_of(callback);
                if here {
                    nodes.push(self.name.clone());
                }
                (!nodes.is_empty()).then(|| nodes.swap_remove(fastrand::usize(..nodes.len())))
            }
        }
    }
}

/// The lease, as one node sees it.
struct Lease {
    /// The revision of the lease this node holds.
    revision: Option<u64>,
    /// Until when this node may fire: its last renewal's start, plus the lease's life,
    /// less one renewal period.
    valid_until: Instant,
    /// When this node last announced the lease it holds.
    announced_at: Option<Instant>,
    /// While this node holds the lease: the probes of its holder (see [`probe_holder`]).
    probes: Option<async_nats::Subscriber>,
}

impl Lease {
    fn holds(&self) -> bool {
        self.revision.is_some() && Instant::now() < self.valid_until
    }

    /// This node took the lease: it answers the probes of the holder from now on.
    async fn taken(&mut self, mesh: &NatsMesh) {
        tracing::info!(process = %mesh.name, "took the scheduler lease: this node fires the PERIOD tasks");
        match mesh.client.subscribe(mesh.subjects.lease_holder()).await {
            Ok(probes) => self.probes = Some(probes),
            Err(e) => {
                tracing::warn!(process = %mesh.name, error = %e, "could not answer the probes of the lease's holder; the others may try to take it")
            }
        }
    }

    /// This node no longer holds the lease: it stops answering for it.
    fn lost(&mut self) {
        self.revision = None;
        self.announced_at = None;
        self.probes = None;
    }

    /// Whether the renewal that just landed is to be announced: the first one, then
    /// one every `every`, the renewals' pace less half a renewal (so that the renewals'
    /// jitter never skips one).
    fn announce_due(&mut self, every: Duration) -> bool {
        let due = self
            .announced_at
            .map_or(true, |at| at.elapsed() + LEASE_RENEW / 2 >= every);
        if due {
            self.announced_at = Some(Instant::now());
        }
        due
    }
}

/// Renews the lease this node holds, or takes it if nobody does. A holder whose renewal
/// goes unanswered (the lease bucket electing a leader) fires on, even when its last
/// renewal is older than the lease's life (its turns came late: while the buckets
/// elect, their requests and watches time out one after the other): nobody can take
/// the lease while the bucket elects, and a node that took it meanwhile (the bucket
/// answered others) only fires beside this one until this one's next renewal is
/// refused; each run is claimed on its own, so never sent twice. Only a refusal ends a
/// hold, and only if the lease is held elsewhere: one that just lapsed is taken again
/// at once. Giving up on a lease that nobody else held stopped the runs until the next
/// turn of some node, 3-4 s later.
async fn hold_or_take(mesh: &NatsMesh, lease: &mut Lease) {
    let mut started = Instant::now();
    let value = Bytes::copy_from_slice(mesh.name.as_bytes());
    let bucket = &mesh.schedules.lease;
    let mut written = match lease.revision {
        Some(revision) => bucket
            .update(LEASE_KEY, value.clone(), revision)
            .await
            .map_err(|e| (e != KvError::WrongRevision, e.to_string())),
        None => bucket
            .create(LEASE_KEY, value.clone())
            .await
            .map_err(|e| (false, e.to_string())),
    };
    if lease.revision.is_some() && matches!(written, Err((false, _))) {
        // Refused: the lease changed, or it only lapsed (its age limit passed while the
        // bucket elected a leader). A create takes it again at once if nobody holds it
        // (and fails if anybody does), instead of leaving the runs to a turn 3-4 s on.
        started = Instant::now();
        if let Ok(revision) = bucket.create(LEASE_KEY, value).await {
            tracing::info!(process = %mesh.name, "the scheduler lease had lapsed; this node took it again");
            written = Ok(revision);
        }
    }
    match written {
        Ok(revision) => {
            if lease.revision.is_none() {
                lease.taken(mesh).await;
            }
            lease.revision = Some(revision);
            lease.valid_until = started + LEASE_TTL - LEASE_RENEW;
            let every = mesh.schedules.announce_every();
            if lease.announce_due(every) {
                announce(mesh, LeaseNews::Renewed { every }).await;
            }
        }
        Err((true, e)) if lease.revision.is_some() => {
            tracing::debug!(process = %mesh.name, error = %e, "the scheduler lease could not be renewed (no answer); firing on");
            lease.valid_until = Instant::now() + LEASE_TTL - LEASE_RENEW;
        }
        Err((_, e)) if lease.revision.is_some() => {
            tracing::warn!(process = %mesh.name, error = %e, "lost the scheduler lease; another node fires the PERIOD tasks");
            lease.lost();
        }
        Err((_, e)) => {
            tracing::trace!(process = %mesh.name, error = %e, "the scheduler lease is held elsewhere")
        }
    }
}

/// The leader's view of the tasks, kept current by a watch of the bucket while this
/// node leads: a run costs one write, not a read of every task.
#[derive(Default)]
struct Book {
    watch: Option<kv::Watch>,
    tasks: HashMap<u64, Held>,
}

impl Book {
    /// Starts following the bucket (from an empty view), unless it does already.
    async fn follow(&mut self, schedules: &Schedules) -> std::result::Result<(), String> {
        if self.watch.is_none() {
            let bucket = schedules.tasks().await.map_err(|e| e.to_string())?;
            self.tasks.clear();
            // Every task's current value first, then the changes (`watch_all` would
            // give only the changes).
            self.watch = Some(start_watch(bucket.watch_with_history(">")).await?);
        }
        Ok(())
    }

    /// Stops following (this node no longer leads, or lost the connection).
    fn forget(&mut self) {
        self.watch = None;
        self.tasks.clear();
    }

    /// The next change of the bucket; never, when not following.
    async fn next_change(&mut self) -> std::result::Result<kv::Entry, String> {
        let Some(watch) = &mut self.watch else {
            return std::future::pending().await;
        };
        match watch.next().await {
            Some(Ok(entry)) => Ok(entry),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("the watch ended".into()),
        }
    }

    /// Applies one change, unless the view holds a later revision (a write of this
    /// node's own, coming back).
    fn apply(&mut self, entry: &kv::Entry) {
        let Ok(task_id) = entry.key.parse::<u64>() else {
            return;
        };
        if self
            .tasks
            .get(&task_id)
            .is_some_and(|held| held.revision >= entry.revision)
        {
            return;
        }
        match held_of(task_id, entry) {
            Some(held) => self.tasks.insert(task_id, held),
            None => self.tasks.remove(&task_id),
        };
    }

    /// When the next run is due, if any.
    fn soonest(&self) -> Option<u64> {
        self.tasks.values().map(|held| held.task.next_run_ms).min()
    }
}

/// When this node next writes the lease: the holder renews it every [`LEASE_RENEW`];
/// the others probe its holder, and try to take it, only when it seems gone (see
/// [`Turn::heard`]).
struct Turn {
    at: Instant,
    /// The last probe of the holder got no answer in time.
    unanswered: bool,
}

impl Turn {
    /// A node that just started waits for an announcement before it tries, as long as
    /// after one heard: on a mesh with a leader it never tries, even while a mass start
    /// delays the leader's renewals (a wait of 1-2 s let each of 5,000 nodes joining
    /// at once open the lease bucket and try, 3 JetStream API requests per join instead
    /// of 2). A fresh mesh so has its first leader 3-4 s after its first node starts.
    fn first() -> Turn {
        Turn {
            at: Instant::now() + LEASE_TTL + jitter(LEASE_RENEW),
            unanswered: false,
        }
    }

    fn due(&self) -> bool {
        Instant::now() >= self.at
    }

    /// After this node's write: the holder renews after [`LEASE_RENEW`]; a node that
    /// could not take the lease (held, or no answer) tries again after the lease's
    /// life, unless it hears an announcement meanwhile. Not sooner: while a mass start
    /// keeps the servers busy, the holder's renewals come late, and every node trying
    /// every second or two would only add to the queue (its next try is after a probe
    /// of the holder, which costs no JetStream request).
    fn after_write(&mut self, holds: bool) {
        self.unanswered = false;
        self.at = Instant::now()
            + if holds {
                LEASE_RENEW
            } else {
                LEASE_TTL + jitter(LEASE_RENEW)
            };
    }

    /// After a message about the lease (an announcement, or the holder's answer to a
    /// probe), while this node does not hold it.
    fn heard(&mut self, news: LeaseNews) {
        self.unanswered = false;
        self.at = match news {
            // The holder lives: look again only if no announcement follows within the
            // lease's life, or within its period and a renewal's (spread over a period).
            LeaseNews::Renewed { every } => {
                Instant::now() + LEASE_TTL.max(every + LEASE_RENEW) + jitter(every)
            }
            // The holder stopped: take over at once (spread, so that not every node
            // asks in the same instant).
            LeaseNews::Released => Instant::now() + jitter(LEASE_RENEW / 4),
        };
    }
}

/// A random wait shorter than `up_to`.
fn jitter(up_to: Duration) -> Duration {
    up_to.mul_f64(fastrand::f64())
}

/// What the holder of the lease announces on the mesh's lease subject (and answers to
/// a probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseNews {
    /// It holds the lease, and announces it every `every` (`renewed <milliseconds>`).
    Renewed { every: Duration },
    /// It deleted the lease (it stopped).
    Released,
}

impl LeaseNews {
    const RENEWED: &'static str = "renewed ";
    const RELEASED: &'static str = "released";

    fn payload(self) -> Bytes {
        match self {
            LeaseNews::Renewed { every } => {
                Bytes::from(format!("{}{}", Self::RENEWED, every.as_millis()))
            }
            LeaseNews::Released => Bytes::from_static(Self::RELEASED.as_bytes()),
        }
    }

    /// The news `payload` tells; `None` for one no node sent.
    fn of(payload: &[u8]) -> Option<LeaseNews> {
        let text = std::str::from_utf8(payload).ok()?;
        if text == Self::RELEASED {
            return Some(LeaseNews::Released);
        }
        let every_ms: u64 = text.strip_prefix(Self::RENEWED)?.parse().ok()?;
        Some(LeaseNews::Renewed {
            every: Duration::from_millis(every_ms).clamp(LEASE_RENEW, ANNOUNCE_AT_MOST_EVERY),
        })
    }
}

/// Tells the other nodes what became of the lease (a core message: no JetStream
/// request); a failure is logged (they probe the holder, and try to take the lease).
async fn announce(mesh: &NatsMesh, news: LeaseNews) {
    if let Err(e) = mesh
        .client
        .publish(mesh.subjects.lease(), news.payload())
        .await
    {
        tracing::debug!(process = %mesh.name, error = %e, ?news, "could not announce the scheduler lease");
    }
}

/// What a probe of the lease's holder found.
enum Holder {
    /// It answered (it holds the lease, and says how often it announces it).
    Lives(LeaseNews),
    /// Nobody listens: nobody holds the lease, or its holder is gone.
    Gone,
    /// No answer in time (or the request failed).
    Silent,
}

/// Asks the holder of the lease whether it lives (a core request to the one node that
/// listens on the holder's subject).
async fn probe_holder(mesh: &NatsMesh) -> Holder {
    let request = mesh
        .client
        .request(mesh.subjects.lease_holder(), Bytes::new());
    match tokio::time::timeout(HOLDER_PROBE_TIMEOUT, request).await {
        Ok(Ok(answer)) => LeaseNews::of(&answer.payload).map_or(Holder::Silent, Holder::Lives),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Holder::Gone,
        Ok(Err(_)) | Err(_) => Holder::Silent,
    }
}

/// Answers a probe of the holder (this node): that it lives, and how often it
/// announces the lease.
async fn answer_probe(mesh: &NatsMesh, probe: async_nats::Message) {
    let Some(reply) = probe.reply else { return };
    let news = LeaseNews::Renewed {
        every: mesh.schedules.announce_every(),
    };
    if let Err(e) = mesh.client.publish(reply, news.payload()).await {
        tracing::debug!(process = %mesh.name, error = %e, "could not answer a probe of the lease's holder");
    }
}

/// Follows the holder's announcements, so that a node that does not hold the lease
/// learns of its renewals and release without asking the bucket. The nodes on one
/// connection share the subscription.
fn hear_lease(mesh: &NatsMesh) -> broadcast::Receiver<async_nats::Message> {
    mesh.connection.follow(&mesh.subjects.lease())
}

/// The next announcement of the lease; `Err` once they can no longer be heard (this
/// node then probes the holder every 3-4 s instead); never, without a receiver. One
/// missed because this node was behind is skipped: the next one says the same.
async fn next_news(
    news: &mut Option<broadcast::Receiver<async_nats::Message>>,
) -> Result<async_nats::Message, ()> {
    let Some(news) = news else {
        return std::future::pending().await;
    };
    loop {
        match news.recv().await {
            Ok(message) => return Ok(message),
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return Err(()),
        }
    }
}

/// The next message on `subscription` (`Err` when it ended); never, without one.
async fn next_message(
    subscription: &mut Option<async_nats::Subscriber>,
) -> Result<async_nats::Message, ()> {
    match subscription {
        Some(subscriber) => subscriber.next().await.ok_or(()),
        None => std::future::pending().await,
    }
}

/// Takes this node's turn at the lease: the holder renews it; another node first probes
/// the holder, and tries to take the lease when nobody listens there, or when two
/// probes in a row got no answer.
async fn take_turn(mesh: &NatsMesh, lease: &mut Lease, turn: &mut Turn) {
    if lease.revision.is_none() {
        match probe_holder(mesh).await {
            Holder::Lives(news) => {
                turn.heard(news);
                return;
            }
            Holder::Silent if !turn.unanswered => {
                tracing::debug!(process = %mesh.name, "the scheduler lease's holder did not answer; asking again later");
                turn.after_write(false);
                turn.unanswered = true;
                return;
            }
            Holder::Silent | Holder::Gone => {}
        }
    }
    hold_or_take(mesh, lease).await;
    turn.after_write(lease.revision.is_some());
    mesh.schedules.leading.send_if_modified(|l| {
        let changed = *l != lease.holds();
        *l = lease.holds();
        changed
    });
}

/// Competes for the lease, and fires the tasks while holding it, until the node stops.
pub async fn lead(mesh: Arc<NatsMesh>) {
    let mut closed = mesh.closed.subscribe();
    let mut connected = mesh.connected.subscribe();
    let mut lease = Lease {
        revision: None,
        valid_until: Instant::now(),
        announced_at: None,
        probes: None,
    };
    let mut news = Some(hear_lease(&mesh));
    let mut book = Book::default();
    let mut turn = Turn::first();
    loop {
        tokio::select! {
            _ = super::until(&mut connected, true) => {}
            _ = super::until(&mut closed, true) => break,
        }
        if turn.due() {
            take_turn(&mesh, &mut lease, &mut turn).await;
        }
        let mut wake = turn.at;
        if !lease.holds() {
            book.forget();
        } else if let Err(e) = book.follow(&mesh.schedules).await {
            tracing::debug!(process = %mesh.name, error = %e, "could not watch the schedules; trying again");
        } else {
            let all_claimed = mesh.fire_due(&mut book).await;
            if let Some(due_ms) = book.soonest() {
                let due_in = Duration::from_millis(due_ms.saturating_sub(now_ms()));
                wake = wake.min(Instant::now() + due_in);
            }
            if !all_claimed {
                // A write that failed for another reason than a change: not at once again.
                wake = wake.max(Instant::now() + CLAIM_RETRY);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            change = book.next_change() => match change {
                Ok(entry) => book.apply(&entry),
                Err(e) => {
                    tracing::debug!(process = %mesh.name, error = %e, "the schedules watch ended; starting it again");
                    book.forget();
                }
            },
            heard = next_news(&mut news) => match heard {
                // The holder hears its own announcements: nothing to learn.
                Ok(message) if lease.revision.is_none() => {
                    if let Some(heard) = LeaseNews::of(&message.payload) {
                        turn.heard(heard);
                    }
                }
                Ok(_) => {}
                Err(()) => {
                    tracing::warn!(process = %mesh.name, "could not follow the scheduler lease; probing its holder every 3-4 s instead");
                    news = None;
                }
            },
            probe = next_message(&mut lease.probes) => match probe {
                Ok(probe) => answer_probe(&mesh, probe).await,
                Err(()) => lease.probes = None,
            },
            _ = super::until(&mut connected, false) => book.forget(),
            _ = super::until(&mut closed, true) => break,
        }
    }
    mesh.schedules.leading.send_replace(false);
    if let Some(revision) = lease.revision {
        // Nobody answers for the lease from now on; another node takes over at once (it
        // hears the release), not after the lease's age limit.
        lease.lost();
        let _ = mesh.schedules.lease.delete(LEASE_KEY, Some(revision)).await;
        announce(&mesh, LeaseNews::Released).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(timing: &Timing, now: u64) -> StoredTask {
        let (interval_ms, next_run_ms, upcoming_ms) = StoredTask::plan(timing, now).expect("valid");
        StoredTask {
            callback: "tick".into(),
            args: Vec::new(),
            on: None,
            created_by: "maker".into(),
            interval_ms,
            next_run_ms,
            upcoming_ms,
            runs: 0,
        }
    }

    #[test]
    fn a_repeating_task_keeps_its_cadence_and_skips_the_runs_it_missed() {
        let every = Timing::Every {
            interval_ms: 100,
            first_ms: Some(10),
        };
        let mut t = task(&every, 1_000);
        assert_eq!(t.next_run_ms, 1_010);
        assert!(t.advance(1_010));
        assert_eq!(t.next_run_ms, 1_110);
        // Taken over 350 ms late: the next run is the next one on the cadence.
        assert!(t.advance(1_460));
        assert_eq!((t.next_run_ms, t.runs), (1_510, 2));
    }

    #[test]
    fn times_run_soonest_first_and_the_last_ends_the_task() {
        let at = Timing::At {
            delays_ms: vec![300, 100, 200],
        };
        let mut t = task(&at, 0);
        let mut due = vec![t.next_run_ms];
        while t.advance(t.next_run_ms) {
            due.push(t.next_run_ms);
        }
        assert_eq!(due, [100, 200, 300]);
        assert_eq!(t.info(1, 0).remaining_runs, Some(0));
    }

    #[test]
    fn the_lease_is_announced_less_often_in_a_larger_mesh_and_says_how_often() {
        assert_eq!(announce_every(0), LEASE_RENEW);
        assert_eq!(announce_every(ANNOUNCED_PER_SECOND), LEASE_RENEW);
        assert_eq!(announce_every(2_500), Duration::from_millis(2_500));
        assert_eq!(announce_every(1_000_000), ANNOUNCE_AT_MOST_EVERY);
        for news in [
            LeaseNews::Renewed {
                every: Duration::from_millis(2_500),
            },
            LeaseNews::Released,
        ] {
            assert_eq!(LeaseNews::of(&news.payload()), Some(news));
        }
        // A period out of bounds is held to them; what no node sends is ignored.
        let long = LeaseNews::of(b"renewed 3600000");
        assert_eq!(
            long,
            Some(LeaseNews::Renewed {
                every: ANNOUNCE_AT_MOST_EVERY
            })
        );
        for garbage in [&b"renewed"[..], b"renewed x", b"", b"\xff"] {
            assert_eq!(LeaseNews::of(garbage), None);
        }
    }

    #[test]
    fn a_node_that_hears_the_holder_waits_a_lease_and_a_period_before_it_looks() {
        let mut turn = Turn::first();
        for every in [LEASE_RENEW, ANNOUNCE_AT_MOST_EVERY] {
            let heard_at = Instant::now();
            turn.heard(LeaseNews::Renewed { every });
            let wait = turn.at - heard_at;
            let least = LEASE_TTL.max(every + LEASE_RENEW);
            assert!(
                wait >= least && wait <= least + every,
                "{every:?}: {wait:?}"
            );
        }
        turn.heard(LeaseNews::Released);
        assert!(turn.at <= Instant::now() + LEASE_RENEW / 4);
    }

    #[test]
    fn a_schedule_that_cannot_be_kept_is_refused() {
        let zero = Timing::Every {
            interval_ms: 0,
            first_ms: None,
        };
        let empty = Timing::At { delays_ms: vec![] };
        for timing in [zero, empty] {
            assert!(StoredTask::plan(&timing, 0).is_err(), "{timing:?}");
        }
    }
}
