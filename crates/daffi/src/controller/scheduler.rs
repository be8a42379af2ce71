//! PERIOD: the schedules the controller keeps and fires, so that they outlive the node
//! that made them.
//!
//! Each task is one tokio task that sleeps until its next run, then sends a no-reply
//! request to the pinned node or to a provider chosen at that moment. A run with no
//! provider, or whose node reads too little to take it, is skipped (and logged); the
//! schedule goes on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::counters::Tally;
use super::members::Members;
use crate::protocol::frame::{Header, Kind, FLAG_NO_REPLY};
use crate::protocol::io::{Outgoing, Push};
use crate::protocol::message::{TaskInfo, Timing};

/// A task the controller holds.
struct Task {
    callback: String,
    on: Option<String>,
    created_by: String,
    interval: Option<Duration>,
    /// Runs still to come (for `at` tasks), soonest first.
    upcoming: Vec<Instant>,
    next_run: Instant,
    runs: u64,
    abort: Option<AbortHandle>,
}

/// Every scheduled task of one controller.
pub struct Scheduler {
    members: Arc<Members>,
    tally: Arc<Tally>,
    stop: watch::Receiver<bool>,
    next_id: AtomicU64,
    tasks: Mutex<HashMap<u64, Task>>,
}

/// A schedule that cannot be kept.
#[derive(Debug)]
pub struct InvalidSchedule(pub String);

impl Scheduler {
    /// A scheduler that routes through `members`, counts its runs in `tally`, and ends
    /// its tasks when `stop` changes.
    pub fn new(members: Arc<Members>, tally: Arc<Tally>, stop: watch::Receiver<bool>) -> Self {
        Scheduler {
            members,
            tally,
            stop,
            next_id: AtomicU64::new(0),
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// Starts a task for `created_by`; returns its id.
    pub fn schedule(
        self: &Arc<Self>,
        created_by: &str,
        callback: String,
        args: Bytes,
        on: Option<String>,
        timing: Timing,
    ) -> Result<u64, InvalidSchedule> {
        let now = Instant::now();
        let (interval, mut upcoming) = match timing {
            Timing::Every { interval_ms: 0 } => {
                return Err(InvalidSchedule(
                    "the interval must be longer than zero".into(),
                ))
            }
            Timing::Every { interval_ms } => (Some(Duration::from_millis(interval_ms)), Vec::new()),
            Timing::At { delays_ms } if delays_ms.is_empty() => {
                return Err(InvalidSchedule("the list of times is empty".into()))
            }
            Timing::At { delays_ms } => (
                None,
                delays_ms
                    .iter()
                    .map(|d| now + Duration::from_millis(*d))
                    .collect::<Vec<_>>(),
            ),
        };
        upcoming.sort();
        let next_run = match interval {
            Some(i) => now + i,
            None => upcoming[0],
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let task = Task {
            callback,
            on,
            created_by: created_by.to_string(),
            interval,
            upcoming,
            next_run,
            runs: 0,
            abort: None,
        };
        let mut tasks = lock(&self.tasks);
        tasks.insert(id, task);
        let handle = tokio::spawn(run(self.clone(), id, args));
        if let Some(t) = tasks.get_mut(&id) {
            t.abort = Some(handle.abort_handle());
        }
        tracing::info!(task_id = id, created_by, "scheduled a task");
        Ok(id)
    }

    /// Ends a task; `false` if there is none with this id.
    pub fn cancel(&self, id: u64) -> bool {
        match lock(&self.tasks).remove(&id) {
            Some(task) => {
                if let Some(abort) = task.abort {
                    abort.abort();
                }
                tracing::info!(task_id = id, "cancelled a task");
                true
            }
            None => false,
        }
    }

    /// Every task, soonest first.
    pub fn list(&self) -> Vec<TaskInfo> {
        let now = Instant::now();
        let mut list: Vec<TaskInfo> = lock(&self.tasks)
            .iter()
            .map(|(id, t)| TaskInfo {
                task_id: *id,
                callback: t.callback.clone(),
                on: t.on.clone(),
                created_by: t.created_by.clone(),
                next_run_in_ms: t.next_run.saturating_duration_since(now).as_millis() as u64,
                interval_ms: t.interval.map(|i| i.as_millis() as u64),
                remaining_runs: t.interval.is_none().then_some(t.upcoming.len() as u64),
                runs: t.runs,
            })
            .collect();
        list.sort_by_key(|t| t.next_run_in_ms);
        list
    }
}

/// The life of one task: sleep, fire, repeat.
async fn run(scheduler: Arc<Scheduler>, id: u64, args: Bytes) {
    let mut stop = scheduler.stop.clone();
    loop {
        let Some(next) = lock(&scheduler.tasks).get(&id).map(|t| t.next_run) else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => return,
        }
        let (callback, on) = {
            let mut tasks = lock(&scheduler.tasks);
            let Some(task) = tasks.get_mut(&id) else {
                return;
            };
            task.runs += 1;
            let finished = match task.interval {
                Some(interval) => {
                    // Keep the cadence; after a stall, skip the runs that were missed.
                    task.next_run += interval;
                    let now = Instant::now();
                    while task.next_run <= now {
                        task.next_run += interval;
                    }
                    false
                }
                None => {
                    task.upcoming.remove(0);
                    match task.upcoming.first() {
                        Some(t) => {
                            task.next_run = *t;
                            false
                        }
                        None => true,
                    }
                }
            };
            let fire = (task.callback.clone(), task.on.clone());
            if finished {
                tasks.remove(&id);
            }
            fire
        };
        fire(&scheduler, id, &callback, on.as_deref(), &args);
        if !lock(&scheduler.tasks).contains_key(&id) {
            return;
        }
    }
}

/// Sends one run, never waiting: a node that is not reading what is sent to it misses
/// the run, like a run with no provider.
fn fire(scheduler: &Scheduler, id: u64, callback: &str, on: Option<&str>, args: &Bytes) {
    let Some((node, queue)) = scheduler.members.pick_provider(callback, on) else {
        tracing::warn!(
            task_id = id,
            callback,
            on,
            "skipped a scheduled run: no node serves it now"
        );
        return;
    };
    let header = Header {
        kind: Kind::Request,
        flags: FLAG_NO_REPLY,
        call_id: 0,
        timeout_ms: 0,
        src: "",
        dst: &node,
        name: callback,
    };
    let frame = Outgoing::new(&header, args.clone());
    match queue.push(frame) {
        Push::Sent => scheduler.tally.count(callback),
        Push::Full(_) => {
            tracing::warn!(task_id = id, callback, node = %node, "skipped a scheduled run: the node reads too little of what is sent to it (slow consumer)")
        }
        Push::Closed => {
            tracing::warn!(task_id = id, callback, node = %node, "skipped a scheduled run: the node just left")
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
