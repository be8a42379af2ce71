//! This node's schedule book: a replica of the controller's scheduled tasks, so that a
//! controller that restarts gets them back.
//!
//! The controller is the authority while it runs: its `Welcome` and `Schedule` frames
//! keep the book current. A `Welcome` from the same controller instance as before (a
//! plain reconnect) replaces the book. One from another instance (the controller
//! restarted) makes the node give back, in a `Restore`, the tasks the new controller
//! does not list, timed by this node's own clock, with the ids of the tasks it knows
//! ended (its tombstones).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::message::{ControlRequest, ScheduleEvent, TaskEntry, Timing};
use crate::protocol::TASK_OVERHEAD;
use crate::sync::lock;
use crate::tombstones::{Tombstones, NODE_TOMBSTONES};

/// When a task runs, by this node's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// Every `interval` from `next` on.
    Every { next: Instant, interval: Duration },
    /// At each of these times.
    At { times: Vec<Instant> },
}

impl Plan {
    /// The plan of a timing read at `now`; `None` for one this clock cannot hold.
    fn new(timing: &Timing, now: Instant) -> Option<Plan> {
        let later = |ms: u64| now.checked_add(Duration::from_millis(ms));
        match timing {
            Timing::Every {
                interval_ms,
                first_ms,
            } => Some(Plan::Every {
                next: later(first_ms.unwrap_or(*interval_ms))?,
                interval: Duration::from_millis(*interval_ms),
            }),
            Timing::At { delays_ms } => Some(Plan::At {
                times: delays_ms.iter().map(|d| later(*d)).collect::<Option<_>>()?,
            }),
        }
    }

    /// The timing of the runs after `now`: an interval task keeps its cadence and skips
    /// the runs it missed; an `at` task keeps the times still to come. `None` when no run
    /// is left.
    fn timing_after(&self, now: Instant) -> Option<Timing> {
        let ms = |t: Instant| t.duration_since(now).as_millis().max(1) as u64;
        match self {
            Plan::Every { next, interval } => {
                let mut next = *next;
                if next <= now && !interval.is_zero() {
                    let missed = (now - next).as_nanos() / interval.as_nanos() + 1;
                    let missed = u32::try_from(missed).ok()?;
                    next = next.checked_add(interval.checked_mul(missed)?)?;
                }
                Some(Timing::Every {
                    interval_ms: interval.as_millis() as u64,
                    first_ms: Some(ms(next)),
                })
            }
            Plan::At { times } => {
                let delays_ms: Vec<u64> =
                    times.iter().filter(|t| **t > now).map(|t| ms(*t)).collect();
                (!delays_ms.is_empty()).then_some(Timing::At { delays_ms })
            }
        }
    }
}

/// A task as the book holds it.
#[derive(Debug, Clone)]
struct Entry {
    callback: String,
    args: Bytes,
    on: Option<String>,
    created_by: String,
    plan: Plan,
}

impl Entry {
    fn new(entry: TaskEntry, now: Instant) -> Option<(u64, Entry)> {
        let plan = Plan::new(&entry.timing, now)?;
        Some((
            entry.task_id,
            Entry {
                callback: entry.callback,
                args: entry.args,
                on: entry.on,
                created_by: entry.created_by,
                plan,
            },
        ))
    }

    /// The entry to restore, timed from `now`; `None` when no run is left.
    fn restorable(&self, id: u64, now: Instant) -> Option<TaskEntry> {
        Some(TaskEntry {
            task_id: id,
            callback: self.callback.clone(),
            args: self.args.clone(),
            on: self.on.clone(),
            created_by: self.created_by.clone(),
            timing: self.plan.timing_after(now)?,
        })
    }
}

/// What to give back to a restarted controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    /// Which `Welcome` of this node it answers.
    generation: u64,
    /// The restarted controller's instance.
    instance: u64,
    /// The tasks it does not list, timed from when the restore was made.
    tasks: Vec<TaskEntry>,
    /// The ids of the tasks this node knows ended, oldest first.
    tombstones: Vec<u64>,
}

/// What one tombstone takes in a `Restore` at most (a MessagePack integer).
const TOMBSTONE_SIZE: usize = 9;

impl Restore {
    /// The `Restore` requests that carry it, each within `frame_limit` bytes: the
    /// tombstones first, so that the controller knows them all before it takes any task.
    pub fn requests(&self, frame_limit: usize) -> Vec<ControlRequest> {
        let budget = frame_limit
            .saturating_sub(TASK_OVERHEAD)
            .max(TOMBSTONE_SIZE);
        let mut pages: Vec<(Vec<TaskEntry>, Vec<u64>)> = Vec::new();
        let mut used = budget; // no page open yet
        let mut open_page = |size: usize, used: &mut usize| {
            if *used + size > budget {
                pages.push(Default::default());
                *used = 0;
            }
            *used += size;
            pages.len() - 1
        };
        let mut placed = Vec::new();
        for id in &self.tombstones {
            placed.push((open_page(TOMBSTONE_SIZE, &mut used), Err(*id)));
        }
        for task in &self.tasks {
            let size = task.size_bound();
            if size > budget {
                tracing::warn!(
                    task_id = task.task_id,
                    size,
                    frame_limit,
                    "a scheduled task is too large for the controller's frame limit; not restored"
                );
                continue;
            }
            placed.push((open_page(size, &mut used), Ok(task.clone())));
        }
        for (page, item) in placed {
            match item {
                Ok(task) => pages[page].0.push(task),
                Err(id) => pages[page].1.push(id),
            }
        }
        pages
            .into_iter()
            .map(|(tasks, tombstones)| ControlRequest::Restore { tasks, tombstones })
            .collect()
    }

    /// The controller instance it is for.
    pub fn instance(&self) -> u64 {
        self.instance
    }
}

/// A replica of the controller's scheduled tasks, and the ids of those that ended.
pub struct ScheduleBook {
    state: Mutex<State>,
}

struct State {
    /// The controller instance whose list the book mirrors; `None` before the first
    /// `Welcome`. It changes to a restarted controller's once the restore is done.
    instance: Option<u64>,
    /// Counts the `Welcome`s: a restore answered for an older one changes nothing.
    generation: u64,
    tasks: HashMap<u64, Entry>,
    tombstones: Tombstones,
}

impl Default for ScheduleBook {
    fn default() -> Self {
        ScheduleBook {
            state: Mutex::new(State {
                instance: None,
                generation: 0,
                tasks: HashMap::new(),
                tombstones: Tombstones::new(NODE_TOMBSTONES),
            }),
        }
    }
}

impl ScheduleBook {
    /// Takes in the `Welcome` of controller `instance`, which lists `tasks`, read at
    /// `now`. The same controller as before (or the first): the book becomes its list,
    /// and the tasks it no longer lists ended while this node was away. Another
    /// (restarted) controller: the book keeps what that controller does not list, and
    /// what to give back is returned.
    pub fn welcome(&self, instance: u64, tasks: Vec<TaskEntry>, now: Instant) -> Option<Restore> {
        let mut s = lock(&self.state);
        s.generation += 1;
        let listed: HashMap<u64, Entry> = tasks
            .into_iter()
            .filter_map(|t| Entry::new(t, now))
            .collect();
        let old = std::mem::replace(&mut s.tasks, listed);
        if s.instance.is_none() || s.instance == Some(instance) {
            s.instance = Some(instance);
            // By id: tasks that ended together go in a known order, not the map's.
            let mut ended: Vec<u64> = old
                .into_keys()
                .filter(|id| !s.tasks.contains_key(id))
                .collect();
            ended.sort_unstable();
            for id in ended {
                s.tombstones.insert(id);
            }
            return None;
        }
        let mut missing = Vec::new();
        for (id, entry) in old {
            if s.tasks.contains_key(&id) {
                continue;
            }
            // An `at` task whose times all passed while the controller was away is
            // over: nothing to give back.
            if let Some(task) = entry.restorable(id, now) {
                missing.push(task);
                s.tasks.insert(id, entry);
            }
        }
        let tombstones = s.tombstones.ids();
        if missing.is_empty() && tombstones.is_empty() {
            s.instance = Some(instance);
            return None;
        }
        missing.sort_by_key(|t| t.task_id);
        Some(Restore {
            generation: s.generation,
            instance,
            tasks: missing,
            tombstones,
        })
    }

    /// Applies a `Schedule` event read at `now`.
    pub fn apply(&self, event: ScheduleEvent, now: Instant) {
        let mut s = lock(&self.state);
        match event {
            ScheduleEvent::Added(entry) => {
                if let Some((id, entry)) = Entry::new(entry, now) {
                    s.tasks.insert(id, entry);
                }
            }
            ScheduleEvent::Ended { task_id } => {
                s.tasks.remove(&task_id);
                s.tombstones.insert(task_id);
            }
        }
    }

    /// The controller refused to restore these tasks: they ended.
    pub fn refused(&self, ids: &[u64]) {
        let mut s = lock(&self.state);
        for id in ids {
            s.tasks.remove(id);
            s.tombstones.insert(*id);
        }
    }

    /// Every part of `restore` was answered: from now on the book mirrors its
    /// controller (unless another `Welcome` came since).
    pub fn restored(&self, restore: &Restore) {
        let mut s = lock(&self.state);
        if s.generation == restore.generation {
            s.instance = Some(restore.instance);
        }
    }

    /// The ids of the tasks held, sorted.
    #[cfg(test)]
    fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = lock(&self.state).tasks.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

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

    fn at(id: u64, delays_ms: &[u64]) -> TaskEntry {
        TaskEntry {
            timing: Timing::At {
                delays_ms: delays_ms.to_vec(),
            },
            ..every(id, 1, 1)
        }
    }

    fn restore_of(request: &ControlRequest) -> (&[TaskEntry], &[u64]) {
        match request {
            ControlRequest::Restore { tasks, tombstones } => (tasks, tombstones),
            other => panic!("not a Restore: {other:?}"),
        }
    }

    #[test]
    fn a_reconnect_to_the_same_controller_mirrors_its_list_and_remembers_what_ended() {
        let book = ScheduleBook::default();
        let t0 = Instant::now();
        assert_eq!(
            book.welcome(7, vec![every(1, 100, 50), every(2, 100, 50)], t0),
            None
        );
        book.apply(ScheduleEvent::Added(every(3, 100, 50)), t0);
        assert_eq!(book.ids(), [1, 2, 3]);
        // Task 2 and 3 ended while this node was away; 4 is new.
        assert_eq!(
            book.welcome(7, vec![every(1, 100, 50), every(4, 100, 50)], t0),
            None
        );
        assert_eq!(book.ids(), [1, 4]);
        // The controller restarts and lists nothing: 1 and 4 go back, 2 and 3 are
        // tombstones.
        let restore = book.welcome(8, vec![], t0).expect("a restore");
        let ids: Vec<u64> = restore.tasks.iter().map(|t| t.task_id).collect();
        assert_eq!((ids, restore.tombstones.clone()), (vec![1, 4], vec![2, 3]));
    }

    #[test]
    fn a_restarted_controller_gets_what_it_does_not_list_timed_by_this_clock() {
        let book = ScheduleBook::default();
        let t0 = Instant::now();
        let tasks = vec![
            every(1, 200, 150),      // next runs at 150, 350, 550 ...
            at(2, &[100, 500, 900]), // 100 passes during the outage
            at(3, &[300]),           // passes during the outage: over
            every(4, 1000, 1000),    // the new controller lists it
        ];
        assert_eq!(book.welcome(7, tasks, t0), None);
        book.apply(ScheduleEvent::Ended { task_id: 9 }, t0);

        let t1 = t0 + 400 * MS;
        let restore = book
            .welcome(8, vec![every(4, 1000, 600)], t1)
            .expect("a restore");
        assert_eq!(restore.instance(), 8);
        assert_eq!(restore.tombstones, [9]);
        let timings: Vec<(u64, Timing)> = restore
            .tasks
            .iter()
            .map(|t| (t.task_id, t.timing.clone()))
            .collect();
        assert_eq!(
            timings,
            [
                // The cadence is kept: the run at 350 was missed (skipped), the next is at 550.
                (
                    1,
                    Timing::Every {
                        interval_ms: 200,
                        first_ms: Some(150)
                    }
                ),
                // Only the times still to come.
                (
                    2,
                    Timing::At {
                        delays_ms: vec![100, 500]
                    }
                ),
            ]
        );
        // Until the restore is done, the book keeps them; task 3 is gone.
        assert_eq!(book.ids(), [1, 2, 4]);
        // The controller refuses 2 (another node knew it ended): it becomes a tombstone.
        book.refused(&[2]);
        book.restored(&restore);
        assert_eq!(book.ids(), [1, 4]);
        // From now on this controller's list is the book: a reconnect to it restores nothing.
        assert_eq!(book.welcome(8, vec![every(1, 200, 100)], t1), None);
        let again = book.welcome(9, vec![], t1).expect("another restart");
        assert_eq!(again.tombstones, [9, 2, 4]);
    }

    #[test]
    fn a_restore_that_was_not_answered_is_made_again() {
        let book = ScheduleBook::default();
        let t0 = Instant::now();
        book.welcome(7, vec![every(1, 100, 100)], t0);
        let first = book.welcome(8, vec![], t0).expect("a restore");
        // The connection dropped before the answer; the answer of an older Welcome
        // changes nothing.
        let second = book.welcome(8, vec![], t0).expect("the same restore again");
        book.restored(&first);
        assert_eq!(second.tasks, first.tasks);
        assert!(book.welcome(8, vec![], t0).is_some(), "still not restored");
        let third = book.welcome(8, vec![every(1, 100, 100)], t0);
        assert_eq!(
            third, None,
            "the controller lists it: nothing left to give back"
        );
    }

    #[test]
    fn an_event_from_the_controller_adds_or_ends_a_task() {
        let book = ScheduleBook::default();
        let t0 = Instant::now();
        book.welcome(7, vec![], t0);
        book.apply(ScheduleEvent::Added(every(5, 100, 100)), t0);
        book.apply(ScheduleEvent::Ended { task_id: 5 }, t0);
        book.apply(ScheduleEvent::Ended { task_id: 6 }, t0);
        assert!(book.ids().is_empty());
        let restore = book.welcome(8, vec![], t0).expect("tombstones to give");
        assert!(restore.tasks.is_empty());
        assert_eq!(restore.tombstones, [5, 6]);
    }

    #[test]
    fn restore_requests_fit_the_frame_limit_tombstones_first() {
        let limit = 8 * 1024;
        let big = |id| TaskEntry {
            args: Bytes::from(vec![0; limit - TASK_OVERHEAD - 300]),
            ..every(id, 100, 100)
        };
        let restore = Restore {
            generation: 1,
            instance: 2,
            tasks: vec![big(1), every(2, 1, 1), big(3), every(4, 1, 1)],
            tombstones: (100..1000).collect(),
        };
        let requests = restore.requests(limit);
        let mut tasks = Vec::new();
        let mut tombstones = Vec::new();
        for request in &requests {
            let (t, ids) = restore_of(request);
            assert!(
                tasks.is_empty() || ids.is_empty(),
                "a tombstone after a task"
            );
            tasks.extend(t.iter().map(|t| t.task_id));
            tombstones.extend_from_slice(ids);
            let size = crate::protocol::message::encode(request).len();
            assert!(size + TASK_OVERHEAD / 2 <= limit, "{size} bytes");
        }
        assert_eq!(tasks, [1, 2, 3, 4]);
        assert_eq!(tombstones, restore.tombstones);
        assert!(requests.len() >= 3);
        let nothing = Restore {
            tasks: vec![],
            tombstones: vec![],
            ..restore
        };
        assert!(nothing.requests(limit).is_empty());
    }
}
