//! PERIOD: the schedules the controller keeps and fires, so that they outlive the node
//! that made them, and that every node keeps a replica of, so that they outlive the
//! controller.
//!
//! Each task is one tokio task that sleeps until its next run, then sends a no-reply
//! request to the pinned node or to a provider chosen at that moment. A run with no
//! provider, or whose node reads too little to take it, is skipped (and logged); the
//! schedule goes on.
//!
//! Every change to the set of tasks (created, restored, ended) is made in the order of
//! membership changes and told to every node in a `Schedule` frame
//! ([`Members::change_schedule`]). Task ids are random (1 to [`MAX_TASK_ID`]), never
//! those of a live task or a tombstone, so that an id stays valid across a restart and
//! restored ids never clash with new ones.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::counters::Tally;
use super::members::Members;
use crate::protocol::message::{self, ScheduleEvent, TaskEntry, TaskInfo, Timing};
use crate::protocol::{check_name, NameKind, MAX_TASK_ID, TASK_OVERHEAD};
use crate::sync::lock;
use crate::tombstones::{Tombstones, CONTROLLER_TOMBSTONES};
use daffi_wire::frame::FLAG_NO_REPLY;
use daffi_wire::{Header, Kind, Outgoing, Push};

/// When a task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    /// The interval, for repeating tasks.
    interval: Option<Duration>,
    /// Runs still to come (for `at` tasks), soonest first.
    upcoming: Vec<Instant>,
    next_run: Instant,
}

impl Plan {
    /// The plan for `timing`, read at `now`; why it cannot be kept otherwise.
    fn new(timing: &Timing, now: Instant) -> Result<Plan, InvalidSchedule> {
        let later = |ms: u64| {
            now.checked_add(Duration::from_millis(ms))
                .ok_or_else(|| InvalidSchedule("a time is too far in the future".into()))
        };
        match timing {
            Timing::Every { interval_ms: 0, .. } => Err(InvalidSchedule(
                "the interval must be longer than zero".into(),
            )),
            Timing::Every {
                interval_ms,
                first_ms,
            } => Ok(Plan {
                interval: Some(Duration::from_millis(*interval_ms)),
                upcoming: Vec::new(),
                next_run: later(first_ms.unwrap_or(*interval_ms))?,
            }),
            Timing::At { delays_ms } if delays_ms.is_empty() => {
                Err(InvalidSchedule("the list of times is empty".into()))
            }
            Timing::At { delays_ms } => {
                let mut upcoming = delays_ms
                    .iter()
                    .map(|d| later(*d))
                    .collect::<Result<Vec<_>, _>>()?;
                upcoming.sort();
                Ok(Plan {
                    interval: None,
                    next_run: upcoming[0],
                    upcoming,
                })
            }
        }
    }

    /// The timing that gives this plan again, read at `now`.
    fn timing(&self, now: Instant) -> Timing {
        let ms = |t: Instant| t.saturating_duration_since(now).as_millis() as u64;
        match self.interval {
            Some(interval) => Timing::Every {
                interval_ms: interval.as_millis() as u64,
                first_ms: Some(ms(self.next_run)),
            },
            None => Timing::At {
                delays_ms: self.upcoming.iter().map(|t| ms(*t)).collect(),
            },
        }
    }

    /// Moves past the run due now; `true` when that was the last.
    fn advance(&mut self) -> bool {
        match self.interval {
            Some(interval) => {
                // Keep the cadence; after a stall, skip the runs that were missed.
                self.next_run += interval;
                let now = Instant::now();
                while self.next_run <= now {
                    self.next_run += interval;
                }
                false
            }
            None => {
                self.upcoming.remove(0);
                match self.upcoming.first() {
                    Some(t) => {
                        self.next_run = *t;
                        false
                    }
                    None => true,
                }
            }
        }
    }
}

/// A task the controller holds.
struct Task {
    callback: String,
    args: Bytes,
    on: Option<String>,
    created_by: String,
    /// The node that restored it after a restart, if one did.
    restored_by: Option<String>,
    plan: Plan,
    runs: u64,
    abort: Option<AbortHandle>,
}

impl Task {
    /// The entry every node's schedule book holds for this task, timed from `now`.
    fn entry(&self, id: u64, now: Instant) -> TaskEntry {
        TaskEntry {
            task_id: id,
            callback: self.callback.clone(),
            args: self.args.clone(),
            on: self.on.clone(),
            created_by: self.created_by.clone(),
            timing: self.plan.timing(now),
        }
    }

    fn info(&self, id: u64, now: Instant) -> TaskInfo {
        TaskInfo {
            task_id: id,
            callback: self.callback.clone(),
            on: self.on.clone(),
            created_by: self.created_by.clone(),
            next_run_in_ms: self
                .plan
                .next_run
                .saturating_duration_since(now)
                .as_millis() as u64,
            interval_ms: self.plan.interval.map(|i| i.as_millis() as u64),
            remaining_runs: self
                .plan
                .interval
                .is_none()
                .then_some(self.plan.upcoming.len() as u64),
            runs: self.runs,
            restored_by: self.restored_by.clone(),
        }
    }
}

/// The tasks, and the ids of the tasks that ended.
struct Book {
    tasks: HashMap<u64, Task>,
    tombstones: Tombstones,
}

impl Book {
    /// A fresh id: random, not a live task's, not a tombstone.
    fn draw_id(&self) -> u64 {
        self.draw_id_from(|| fastrand::u64(1..=MAX_TASK_ID))
    }

    /// The first id `draw` gives that is neither a live task's nor a tombstone.
    fn draw_id_from(&self, mut draw: impl FnMut() -> u64) -> u64 {
        loop {
            let id = draw();
            if !self.tasks.contains_key(&id) && !self.tombstones.contains(id) {
                return id;
            }
        }
    }

    /// Removes a task, stops its timer and keeps its tombstone; its `Ended` event, or
    /// `None` if no task has this id.
    fn end(&mut self, id: u64) -> Option<Outgoing> {
        let task = self.tasks.remove(&id)?;
        if let Some(abort) = task.abort {
            abort.abort();
        }
        self.tombstones.insert(id);
        Some(event(&ScheduleEvent::Ended { task_id: id }))
    }
}

/// Every scheduled task of one controller.
pub struct Scheduler {
    members: Arc<Members>,
    tally: Arc<Tally>,
    stop: watch::Receiver<bool>,
    /// The controller's frame limit: every frame that carries a task must fit it.
    max_frame_size: usize,
    book: Mutex<Book>,
}

/// A schedule that cannot be kept.
#[derive(Debug)]
pub struct InvalidSchedule(pub String);

/// What a `Restore` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Tasks added back.
    pub restored: u64,
    /// Tasks refused: they ended, or are invalid.
    pub refused: Vec<u64>,
}

/// A task to start.
struct NewTask {
    callback: String,
    args: Bytes,
    on: Option<String>,
    created_by: String,
    restored_by: Option<String>,
    plan: Plan,
}

impl Scheduler {
    /// A scheduler that routes through `members`, counts its runs in `tally`, ends its
    /// tasks when `stop` changes, and keeps every frame that carries a task within
    /// `max_frame_size`.
    pub fn new(
        members: Arc<Members>,
        tally: Arc<Tally>,
        stop: watch::Receiver<bool>,
        max_frame_size: usize,
    ) -> Self {
        Scheduler {
            members,
            tally,
            stop,
            max_frame_size,
            book: Mutex::new(Book {
                tasks: HashMap::new(),
                tombstones: Tombstones::new(CONTROLLER_TOMBSTONES),
            }),
        }
    }

    /// Starts a task for `created_by` and tells every node; returns its id.
    pub async fn schedule(
        self: &Arc<Self>,
        created_by: &str,
        callback: String,
        args: Bytes,
        on: Option<String>,
        timing: Timing,
    ) -> Result<u64, InvalidSchedule> {
        let task = NewTask {
            plan: Plan::new(&timing, Instant::now())?,
            callback,
            args,
            on,
            created_by: created_by.to_string(),
            restored_by: None,
        };
        self.check_size(&task)?;
        let id = self
            .members
            .change_schedule(|| {
                let mut book = lock(&self.book);
                let id = book.draw_id();
                let added = self.start(&mut book, id, task);
                (id, vec![added])
            })
            .await;
        tracing::info!(task_id = id, created_by, "scheduled a task");
        Ok(id)
    }

    /// Ends a task and tells every node; `false` if there is none with this id. The id
    /// is kept as a tombstone either way: after a restart, a task cancelled before any
    /// node gave it back is refused when one does.
    pub async fn cancel(&self, id: u64) -> bool {
        let cancelled = self.end(id).await;
        if cancelled {
            tracing::info!(task_id = id, "cancelled a task");
        } else {
            lock(&self.book).tombstones.insert(id);
        }
        cancelled
    }

    /// Takes back what the node `from` gives after a restart: keeps its tombstones and
    /// ends the tasks they name, then adds each task whose id is neither held nor a
    /// tombstone (several nodes restore the same task: the first one wins), and tells
    /// every node.
    pub async fn restore(
        self: &Arc<Self>,
        from: &str,
        tasks: Vec<TaskEntry>,
        tombstones: Vec<u64>,
    ) -> Restored {
        let now = Instant::now();
        let (restored, ended) = self
            .members
            .change_schedule(|| {
                let mut book = lock(&self.book);
                let mut events = Vec::new();
                let mut ended = Vec::new();
                for id in tombstones {
                    if let Some(event) = book.end(id) {
                        ended.push(id);
                        events.push(event);
                    }
                    book.tombstones.insert(id);
                }
                let mut restored = Restored::default();
                for entry in tasks {
                    let id = entry.task_id;
                    if book.tasks.contains_key(&id) {
                        continue;
                    }
                    if book.tombstones.contains(id) {
                        restored.refused.push(id);
                        continue;
                    }
                    match self.restorable(entry, from, now) {
                        Ok(task) => {
                            events.push(self.start(&mut book, id, task));
                            restored.restored += 1;
                        }
                        Err(e) => {
                            tracing::warn!(task_id = id, process = from, reason = %e.0, "refused to restore a task");
                            restored.refused.push(id);
                        }
                    }
                }
                ((restored, ended), events)
            })
            .await;
        if !ended.is_empty() {
            tracing::info!(process = from, tasks = ?ended, "ended tasks a node knew had ended (restored by a node that missed the end)");
        }
        if restored.restored > 0 || !restored.refused.is_empty() {
            tracing::info!(process = from, restored = restored.restored, refused = ?restored.refused, "restored tasks after a restart");
        }
        restored
    }

    /// Every task as the nodes' books hold it, timed from now.
    pub fn entries(&self) -> Vec<TaskEntry> {
        let now = Instant::now();
        lock(&self.book)
            .tasks
            .iter()
            .map(|(id, t)| t.entry(*id, now))
            .collect()
    }

    /// The tasks with an id above `after`, by id, as many as take `budget` bytes (at
    /// least one); and how many were left out.
    pub fn list(&self, after: u64, budget: usize) -> (Vec<TaskInfo>, u64) {
        let now = Instant::now();
        let book = lock(&self.book);
        let mut ids: Vec<u64> = book
            .tasks
            .keys()
            .copied()
            .filter(|id| *id > after)
            .collect();
        ids.sort_unstable();
        let mut page = Vec::new();
        let mut left = budget;
        for id in &ids {
            let info = book.tasks[id].info(*id, now);
            let size = info_size(&info);
            if !page.is_empty() && size > left {
                break;
            }
            left = left.saturating_sub(size);
            page.push(info);
        }
        let omitted = (ids.len() - page.len()) as u64;
        (page, omitted)
    }

    /// Checks a restored entry, and makes the task it gives back.
    fn restorable(
        &self,
        entry: TaskEntry,
        from: &str,
        now: Instant,
    ) -> Result<NewTask, InvalidSchedule> {
        if !(1..=MAX_TASK_ID).contains(&entry.task_id) {
            return Err(InvalidSchedule(format!(
                "the id is not within 1 to {MAX_TASK_ID}"
            )));
        }
        let names = [
            (NameKind::Callback, Some(entry.callback.as_str())),
            (NameKind::Process, entry.on.as_deref()),
            (NameKind::Process, Some(entry.created_by.as_str())),
        ];
        for (kind, name) in names {
            if let Some(name) = name {
                check_name(kind, name).map_err(InvalidSchedule)?;
            }
        }
        let task = NewTask {
            plan: Plan::new(&entry.timing, now)?,
            callback: entry.callback,
            args: entry.args,
            on: entry.on,
            created_by: entry.created_by,
            restored_by: Some(from.to_string()),
        };
        self.check_size(&task)?;
        Ok(task)
    }

    /// Refuses a task whose entry would not leave [`TASK_OVERHEAD`] of the frame limit:
    /// every frame that carries it must fit.
    fn check_size(&self, task: &NewTask) -> Result<(), InvalidSchedule> {
        let entry = TaskEntry {
            task_id: MAX_TASK_ID,
            callback: task.callback.clone(),
            args: task.args.clone(),
            on: task.on.clone(),
            created_by: task.created_by.clone(),
            timing: task.plan.timing(Instant::now()),
        };
        let size = entry.size_bound() + TASK_OVERHEAD;
        if size > self.max_frame_size {
            return Err(InvalidSchedule(format!(
                "the schedule takes {size} bytes with what every node keeps of it, over the frame limit of {} bytes; pass smaller arguments",
                self.max_frame_size
            )));
        }
        Ok(())
    }

    /// Adds a task under `id` and starts its timer; its `Added` event.
    fn start(self: &Arc<Self>, book: &mut Book, id: u64, task: NewTask) -> Outgoing {
        let task = Task {
            callback: task.callback,
            args: task.args,
            on: task.on,
            created_by: task.created_by,
            restored_by: task.restored_by,
            plan: task.plan,
            runs: 0,
            abort: None,
        };
        let added = event(&ScheduleEvent::Added(task.entry(id, Instant::now())));
        book.tasks.insert(id, task);
        let handle = tokio::spawn(run(self.clone(), id));
        if let Some(t) = book.tasks.get_mut(&id) {
            t.abort = Some(handle.abort_handle());
        }
        added
    }

    /// Ends a task and tells every node; `false` if there is none with this id.
    async fn end(&self, id: u64) -> bool {
        self.members
            .change_schedule(|| match lock(&self.book).end(id) {
                Some(ended) => (true, vec![ended]),
                None => (false, Vec::new()),
            })
            .await
    }
}

/// A `Schedule` frame.
fn event(event: &ScheduleEvent) -> Outgoing {
    message::control_frame(Kind::Schedule, event)
}

/// At least what a [`TaskInfo`] takes in a `tasks` answer.
fn info_size(info: &TaskInfo) -> usize {
    let names = [&info.on, &info.restored_by]
        .iter()
        .map(|n| n.as_ref().map_or(0, String::len))
        .sum::<usize>();
    info.callback.len() + info.created_by.len() + names + 192
}

/// The life of one task: sleep, fire, repeat.
async fn run(scheduler: Arc<Scheduler>, id: u64) {
    let mut stop = scheduler.stop.clone();
    loop {
        let Some(next) = lock(&scheduler.book)
            .tasks
            .get(&id)
            .map(|t| t.plan.next_run)
        else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => return,
        }
        let (callback, on, args, finished) = {
            let mut book = lock(&scheduler.book);
            let Some(task) = book.tasks.get_mut(&id) else {
                return;
            };
            task.runs += 1;
            let finished = task.plan.advance();
            (
                task.callback.clone(),
                task.on.clone(),
                task.args.clone(),
                finished,
            )
        };
        fire(&scheduler, id, &callback, on.as_deref(), &args);
        if finished {
            if scheduler.end(id).await {
                tracing::info!(
                    task_id = id,
                    "a scheduled task finished (its last time passed)"
                );
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::counters::{CallCounts, SCHEDULER};

    fn scheduler() -> (Arc<Scheduler>, watch::Sender<bool>) {
        let (stop, stop_rx) = watch::channel(false);
        let tally = CallCounts::default().open(SCHEDULER);
        let scheduler = Scheduler::new(Arc::new(Members::default()), tally, stop_rx, 1 << 20);
        (Arc::new(scheduler), stop)
    }

    fn every(id: u64, interval_ms: u64, first_ms: u64) -> TaskEntry {
        TaskEntry {
            task_id: id,
            callback: "tick".into(),
            args: Bytes::from_static(b"\x90"),
            on: None,
            created_by: "maker".into(),
            timing: Timing::Every {
                interval_ms,
                first_ms: Some(first_ms),
            },
        }
    }

    /// Every minute, the first run a minute from now.
    fn minutely() -> Timing {
        Timing::Every {
            interval_ms: 60_000,
            first_ms: None,
        }
    }

    fn ids(scheduler: &Scheduler) -> Vec<u64> {
        scheduler
            .list(0, usize::MAX)
            .0
            .iter()
            .map(|t| t.task_id)
            .collect()
    }

    #[test]
    fn a_period_runs_first_after_its_first_delay_then_every_interval() {
        let now = Instant::now();
        let every = Timing::Every {
            interval_ms: 1_000,
            first_ms: None,
        };
        let mut plan = Plan::new(&every, now).expect("valid");
        assert_eq!(plan.next_run, now + Duration::from_secs(1));
        // Runs missed during a stall are skipped: the next one is after now, on the cadence.
        plan.next_run = now - Duration::from_millis(3_500);
        assert!(!plan.advance(), "a repeating task never ends");
        let after = plan.next_run.saturating_duration_since(Instant::now());
        assert!(plan.next_run > Instant::now() && after <= Duration::from_secs(1));
        let first = Timing::Every {
            interval_ms: 1_000,
            first_ms: Some(10),
        };
        let plan = Plan::new(&first, now).expect("valid");
        assert_eq!(plan.next_run, now + Duration::from_millis(10));
        assert_eq!(
            plan.timing(now),
            first,
            "the timing read back gives the plan again"
        );
    }

    #[test]
    fn times_run_soonest_first_and_the_last_ends_the_task() {
        let now = Instant::now();
        let at = Timing::At {
            delays_ms: vec![300, 100, 200],
        };
        let mut plan = Plan::new(&at, now).expect("valid");
        let mut due = vec![plan.next_run];
        while !plan.advance() {
            due.push(plan.next_run);
        }
        let ms = [100, 200, 300].map(|ms| now + Duration::from_millis(ms));
        assert_eq!(due, ms);
    }

    #[test]
    fn a_period_that_cannot_be_kept_is_refused() {
        let now = Instant::now();
        let zero = Timing::Every {
            interval_ms: 0,
            first_ms: None,
        };
        let empty = Timing::At { delays_ms: vec![] };
        for timing in [zero, empty] {
            assert!(Plan::new(&timing, now).is_err(), "{timing:?}");
        }
    }

    #[tokio::test]
    async fn a_cancelled_task_leaves_the_list_and_is_not_cancelled_twice() {
        let (scheduler, _stop) = scheduler();
        let id = scheduler
            .schedule("maker", "tick".into(), Bytes::new(), None, minutely())
            .await
            .expect("scheduled");
        assert_eq!(ids(&scheduler), vec![id]);
        assert!(scheduler.cancel(id).await);
        assert!(ids(&scheduler).is_empty());
        assert!(!scheduler.cancel(id).await, "gone already");
        assert!(lock(&scheduler.book).tombstones.contains(id));
    }

    #[tokio::test]
    async fn task_ids_are_random_below_2_pow_53_and_never_a_live_task_or_a_tombstone() {
        let (scheduler, _stop) = scheduler();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let id = scheduler
                .schedule("maker", "tick".into(), Bytes::new(), None, minutely())
                .await
                .expect("scheduled");
            assert!((1..=MAX_TASK_ID).contains(&id) && id < 1 << 53);
            assert!(seen.insert(id), "{id} drawn twice");
        }
        // Drawn over the whole range, not counted up.
        assert!(seen.iter().any(|id| *id > 1 << 40));

        let mut book = lock(&scheduler.book);
        let live = *seen.iter().next().expect("a task");
        book.tombstones.insert(7);
        let mut draws = [live, 7, 8].into_iter();
        assert_eq!(book.draw_id_from(|| draws.next().expect("a draw")), 8);
    }

    #[tokio::test]
    async fn a_restore_adds_what_is_neither_held_nor_ended_and_ends_what_others_knew_ended() {
        let (scheduler, _stop) = scheduler();
        let held = scheduler
            .schedule("maker", "tick".into(), Bytes::new(), None, minutely())
            .await
            .expect("scheduled");
        let cancelled = scheduler
            .schedule("maker", "tick".into(), Bytes::new(), None, minutely())
            .await
            .expect("scheduled");
        assert!(scheduler.cancel(cancelled).await);

        let empty_at = TaskEntry {
            timing: Timing::At { delays_ms: vec![] },
            ..every(40, 1, 1)
        };
        let bad_name = TaskEntry {
            callback: "a\nb".into(),
            ..every(41, 1, 1)
        };
        let restored = scheduler
            .restore(
                "n1",
                vec![
                    every(held, 1000, 300),      // held: the controller's own stays
                    every(10, 1000, 300),        // new: added, cadence kept
                    every(11, 1000, 300),        // a tombstone in the same restore
                    every(cancelled, 1000, 300), // cancelled on this controller
                    every(0, 1000, 300),         // not a valid id
                    every(1 << 53, 1000, 300),
                    empty_at,
                    bad_name,
                ],
                vec![11, 12],
            )
            .await;
        assert_eq!(restored.restored, 1);
        assert_eq!(restored.refused, [11, cancelled, 0, 1 << 53, 40, 41]);
        let mut expected = vec![held, 10];
        expected.sort_unstable();
        assert_eq!(ids(&scheduler), expected);
        let (tasks, _) = scheduler.list(9, usize::MAX);
        let ten = tasks.iter().find(|t| t.task_id == 10).expect("restored");
        assert_eq!(ten.restored_by.as_deref(), Some("n1"));
        assert!(ten.next_run_in_ms <= 300 && ten.interval_ms == Some(1000));

        // Another node knew task 10 had ended: it ends, and nobody brings it back.
        let ends = scheduler.restore("n2", vec![], vec![10]).await;
        assert_eq!(ends, Restored::default());
        assert_eq!(ids(&scheduler), [held]);
        let again = scheduler
            .restore("n3", vec![every(10, 1000, 300)], vec![])
            .await;
        assert_eq!(again.refused, [10]);
        assert_eq!(ids(&scheduler), [held]);

        // A task cancelled before any node gave it back stays cancelled.
        assert!(!scheduler.cancel(20).await, "not held yet");
        let late = scheduler
            .restore("n4", vec![every(20, 1000, 300)], vec![])
            .await;
        assert_eq!(late.refused, [20]);
        assert_eq!(ids(&scheduler), [held]);
    }

    #[tokio::test]
    async fn a_task_list_comes_in_pages_that_fit_the_budget() {
        let (scheduler, _stop) = scheduler();
        let name = |i: usize| format!("{i:x>1000}");
        for i in 0..10 {
            scheduler
                .schedule("maker", name(i), Bytes::new(), None, minutely())
                .await
                .expect("scheduled");
        }
        let mut after = 0;
        let mut listed = Vec::new();
        loop {
            let (page, omitted) = scheduler.list(after, 2500);
            assert!((1..=2).contains(&page.len()), "{} on a page", page.len());
            listed.extend(page.iter().map(|t| t.task_id));
            after = page.last().expect("a task").task_id;
            assert_eq!(omitted as usize, 10 - listed.len());
            if omitted == 0 {
                break;
            }
        }
        assert_eq!(listed, ids(&scheduler));
        // A budget smaller than one task still lists one.
        assert_eq!(scheduler.list(0, 1).0.len(), 1);
    }
}
