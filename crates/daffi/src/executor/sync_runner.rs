//! The node's own threads for sync callbacks: a per-node queue, the [`SyncRunner`].
//!
//! Sync callbacks go through a per-node queue, the [`SyncRunner`]: a thread that
//! finishes a callback takes the next queued one, and a new thread is started only when
//! every thread of the node is busy in a callback. A slow callback therefore never
//! delays another (as with one `spawn_blocking` per call), while a stream of quick ones
//! runs on one or two threads without a thread wake-up per call. The threads are not
//! tokio's blocking pool: sync callbacks that fill them never hold up what needs that
//! pool (the user's own `spawn_blocking`, tokio's file and name lookups), and the
//! user's blocking work never holds up sync callbacks.
//!
//! A callback seen to finish quickly (its [`Pace`](super::pace::Pace)) skips the
//! hand-off: the runtime worker that read its request runs it, in a task of its own (so
//! that the connection is read meanwhile, by the other worker; the task of a run that
//! ended waits for the next, see [`IdleRun`]), with the queue's other jobs of the
//! moment (a burst is answered where it was read, and its replies leave together).
//! Such a run counts as one of the runner's threads, busy: if its callback turns slow,
//! no new run starts on a worker until it ends (its callback, now known as slow, goes
//! to the threads next time), and the node's watch thread (which looks
//! `HANDOFF_AFTER` after a run's progress, once a millisecond between runs while they
//! happen, and sleeps otherwise) starts the watchdog on
//! another worker once a run made no progress for `HANDOFF_AFTER` of time its thread
//! could use (time the OS left it waiting for a processor, on a loaded machine, does not
//! count: see [`thread_clock`]): it starts threads for the jobs
//! queued behind, and the runtime's I/O is polled again (a worker parked aside does not
//! poll it while another is busy). A run whose next step waited that long behind other
//! tasks on its worker (the reader of a flood, in the worker's LIFO slot, which other
//! workers cannot take) is moved instead: its next step goes where another worker takes
//! it. A callback that waits on daffi's sync API meanwhile (a nested
//! call) is moved off the worker by `block_in_place`, as any sync wait inside a runtime.
//! A run slow by the wall clock is asked whether its thread only waited for a processor
//! (see `RunUsage`): a descheduled worker does not send a flood to threads. Behind a
//! backlog of quick calls, the reader that queues more runs some itself before it reads
//! on ([`SyncRunner::help_with_backlog`]). Only on a multi-threaded runtime with two
//! workers or more. The calls of a batch frame run one after another in one job; the
//! watch also looks at those jobs, and once one call of a batch ran for a millisecond,
//! the calls behind it go to threads as lone jobs (see [`BatchShare`]).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::dispatch::{BatchShare, RunUsage, SyncJob};
use super::idle_run::{IdleRun, IdleRuns};
use super::thread_clock::{self, ThreadId};
use super::Executor;

/// The name of the threads that run sync callbacks.
const THREAD_NAME: &str = "daffi-callback";

/// How long a queued sync callback may wait for a thread that is busy in another
/// callback. A thread that started its callback (or was started) more recently than this
/// is taken to be getting through quick ones, and will take the queued one next; when no
/// thread did, new threads start at once. A watchdog looks again after this long, so a
/// callback queued behind one that turns out to be slow waits at most about this long.
const HANDOFF_AFTER: Duration = Duration::from_micros(500);

/// After its last job, a thread watches for a new one this long (yielding the processor
/// between looks, so it only uses time nobody else wants): a job arriving meanwhile is
/// taken without any thread being woken. Unless watching stopped paying (see
/// [`MISSES_BEFORE_SLEEPING_AT_ONCE`]).
const SPIN: Duration = Duration::from_micros(60);
/// Then it waits this long for a job (woken by the submitter) before it ends, as long as
/// tokio keeps an idle blocking thread: waking a thread costs far less than starting one
/// (on some sandboxes, milliseconds), and an idle one costs only its stack's address
/// space. Threads end at once when the node closes (see [`SyncRunner::retire`]).
const LINGER: Duration = Duration::from_secs(10);
/// Watches in a row that saw no job, after which threads go to sleep at once: jobs come
/// further apart than a watch lasts, and watching would only take processor time from
/// the others. Watching starts again once a job is queued within `SPIN` of a thread
/// going to sleep (a watch would have caught it).
const MISSES_BEFORE_SLEEPING_AT_ONCE: u32 = 8;

/// The sync callbacks of one node waiting for a thread, and the threads running them.
#[derive(Default)]
pub struct SyncRunner {
    state: Mutex<RunnerState>,
    /// Wakes threads waiting for a job.
    wake: Condvar,
    /// Calls in the queue's jobs (a batch's count each), readable without the lock.
    queued: AtomicUsize,
    /// Watches in a row that ended without a job (see [`MISSES_BEFORE_SLEEPING_AT_ONCE`]).
    watch_misses: AtomicU32,
    dropped: AtomicU64,
    /// Whether quick callbacks may run on the runtime's workers: it has two or more.
    on_workers: OnceLock<bool>,
    /// Looks for runs on a worker stuck in a callback (see [`RunWatch`]); `None` if
    /// its thread could not start.
    run_watch: OnceLock<Option<RunWatch>>,
    /// The batches whose calls jobs are running one after another: the watch takes the
    /// calls behind one that runs slow (see [`BatchShare`]).
    batches: Mutex<Vec<Arc<BatchShare>>>,
    /// The task of a run on a worker that ended, waiting to run the next one.
    idle_runs: IdleRuns,
}

/// The node's watch thread for runs on a worker, and what it looks at without a lock.
struct RunWatch {
    thread: std::thread::Thread,
    /// When the run on a worker last made progress (its job began, or its next step
    /// was queued), in µs since `epoch` (0: none runs).
    job_began: AtomicU64,
    /// The kernel's id of the thread that run is on.
    worker: AtomicI32,
    /// The run's next step waits for a worker (it is not inside a job).
    waiting: std::sync::atomic::AtomicBool,
    /// The `job_began` of a run the watch found stuck: later jobs go to threads while
    /// it still is.
    stuck: AtomicU64,
    /// Runs begun so far: the thread sleeps once none began for a while.
    runs: AtomicU64,
    /// The thread sleeps until a run begins.
    sleeping: std::sync::atomic::AtomicBool,
    epoch: Instant,
}

/// NO_RETURN calls (jobs, or the calls of batches) a run on a worker takes in one task
/// (see [`SyncRunner::run_one_on_worker`]).
const ONE_WAY_JOBS_PER_TASK: usize = 64;

/// Jobs queued past which the reader that queues more runs quick ones itself (see
/// [`SyncRunner::help_with_backlog`]).
const HELP_ABOVE: usize = 4_096;

/// Looks without a run beginning after which the watch thread sleeps (about 20 ms: such
/// looks are `2 * HANDOFF_AFTER` apart, see [`next_look`]).
const WATCH_LOOKS_BEFORE_SLEEPING: u32 = 20;

/// A step of the run on a worker: its slot, and which step (see [`Slot::OnWorker`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct RunStep {
    slot: usize,
    step: u64,
}

/// What a step of the run on a worker does next.
enum Next<J> {
    /// Runs a job (`J`: the job, or `()` when one is known to be queued).
    Job(J),
    /// Nothing is left for it: the run ended.
    Ended,
    /// The watch moved the run to another step: this one ends, touching nothing.
    Moved,
}

#[derive(Default)]
struct RunnerState {
    jobs: VecDeque<SyncJob>,
    /// One slot per blocking-pool thread working for this node; vacant slots are reused.
    slots: Vec<Slot>,
    /// Threads working for this node (non-vacant slots).
    threads: usize,
    /// Those of them inside a callback.
    busy: usize,
    /// Those of them waiting on `wake`.
    parked: usize,
    /// A watchdog task will look at the queue again.
    watched: bool,
    /// When jobs were last queued: whether a thread that went to sleep at once would
    /// have caught them by watching.
    last_submit: Option<Instant>,
    /// When the queue was last searched for jobs whose callers gave up.
    last_expiry_sweep: Option<Instant>,
    /// The node closed: threads with nothing to do end instead of waiting.
    retired: bool,
}

#[derive(Clone, Copy)]
enum Slot {
    Vacant,
    /// Started at this time, not yet inside a callback.
    Starting(Instant),
    /// Inside a callback since this time.
    Busy(Instant),
    /// A run on a runtime worker (its progress is the watch's `job_began`), at this
    /// step: a task of an earlier step (the watch moved the run on) ends at once.
    OnWorker(u64),
    /// Between jobs: watching for one, or waiting on `wake`.
    Idle,
}

impl RunnerState {
    /// Whether a thread started, or started a callback, less than `HANDOFF_AFTER` ago:
    /// threads are getting through quick callbacks.
    /// A run on a worker does not count: it takes only quick calls, so the other jobs
    /// need threads of their own.
    fn recent(&self, now: Instant) -> bool {
        self.slots.iter().any(|s| match s {
            Slot::Starting(t) | Slot::Busy(t) => now.duration_since(*t) < HANDOFF_AFTER,
            Slot::OnWorker(_) | Slot::Vacant | Slot::Idle => false,
        })
    }

    /// Where the first queued job a run on a worker may take is: a quick call. Jobs
    /// queued for threads (stream producers, callbacks not seen to be quick) stay for
    /// them; a stream producer waiting for credit on a worker would hold, in that
    /// worker's LIFO slot, the very task that sends its items.
    fn next_quick(&self) -> Option<usize> {
        self.jobs.iter().position(SyncJob::is_quick_call)
    }

    /// Claims slots for the threads to start for queued jobs that no thread will take
    /// soon. Returns their indexes, and whether jobs still wait for a busy thread (so
    /// that a watchdog should look again). `submitting`: jobs were just queued, and
    /// nobody knows yet whether they are quick: one new thread is enough to start them,
    /// and the watchdog starts more if it makes no progress.
    fn plan_threads(&mut self, max_threads: usize, submitting: bool) -> (Vec<usize>, bool) {
        let mut start = Vec::new();
        if self.jobs.len() <= self.threads - self.busy || self.threads >= max_threads {
            // The common case under load, decided without reading the clock.
            return (start, false);
        }
        let now = Instant::now();
        let recent = self.recent(now);
        loop {
            let idle = self.threads - self.busy;
            if self.jobs.len() <= idle || self.threads >= max_threads {
                // Each job has a thread that will take it, or every allowed thread exists
                // and the first to finish takes the next job.
                return (start, false);
            }
            if recent || (submitting && !start.is_empty()) {
                // Threads are getting through quick callbacks: leave it to them.
                return (start, true);
            }
            // The watchdog's threads are for jobs already waiting too long, and must not
            // make the next one wait: they do not count as recent.
            let index = self.claim_slot(if submitting {
                Slot::Starting(now)
            } else {
                Slot::Starting(now.checked_sub(HANDOFF_AFTER).unwrap_or(now))
            });
            self.threads += 1;
            start.push(index);
        }
    }
}

impl RunnerState {
    /// A vacant slot (one more if none is), taken as `slot`.
    fn claim_slot(&mut self, slot: Slot) -> usize {
        let index = match self.slots.iter().position(|s| matches!(s, Slot::Vacant)) {
            Some(i) => i,
            None => {
                self.slots.push(Slot::Vacant);
                self.slots.len() - 1
            }
        };
        self.slots[index] = slot;
        index
    }

    /// Whether `run` is the current step of the run on a worker.
    fn is_current(&self, run: RunStep) -> bool {
        matches!(self.slots.get(run.slot), Some(Slot::OnWorker(step)) if *step == run.step)
    }

    /// The next job a thread takes, if any: while a run on a worker takes the quick
    /// calls (`run_takes_quick_calls`), the first that is not one; else the first.
    fn job_for_threads(&mut self, run_takes_quick_calls: bool) -> Option<SyncJob> {
        let at = if run_takes_quick_calls {
            self.jobs.iter().position(|job| !job.is_quick_call())?
        } else {
            0
        };
        self.jobs.remove(at)
    }

    /// Whether a run on a worker is going.
    fn run_on_worker(&self) -> bool {
        self.slots.iter().any(|s| matches!(s, Slot::OnWorker(_)))
    }
}

/// The two tasks of a run on a worker: each waits for its turn, which the other gives
/// it; `ended` once the run ended (or moved on), for the task that waits to end too.
/// (Lighter than a `Notify` each: one waiter, one waker, turns strictly alternating.)
#[derive(Default)]
struct Turns {
    /// Each task's turn, given (`true`) by the other, taken by the task.
    given: [std::sync::atomic::AtomicBool; 2],
    /// Each task's waker while it waits for its turn.
    wakers: [Mutex<Option<std::task::Waker>>; 2],
    ended: std::sync::atomic::AtomicBool,
}

impl Turns {
    /// Gives task `to` its turn, waking it if it waits: from a worker, it is scheduled
    /// in that worker's LIFO slot.
    fn give(&self, to: usize) {
        self.given[to].store(true, Ordering::Release);
        let waker = crate::sync::lock(&self.wakers[to]).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Waits for task `me`'s turn.
    fn wait(&self, me: usize) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.given[me].swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            *crate::sync::lock(&self.wakers[me]) = Some(cx.waker().clone());
            // Given between the look above and the waker's store: `give` found no waker.
            if self.given[me].swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            std::task::Poll::Pending
        })
    }
}

impl SyncRunner {
    /// Runs `jobs` (all of callbacks seen to finish quickly) on this runtime worker, in a
    /// task of its own, or leaves them to a run on a worker that is going; `false`
    /// (the jobs left in the vector) if they must go to threads: the runtime has one
    /// worker, or a run on a worker is stuck in a callback that turned slow.
    pub(super) fn run_on_worker(core: &Arc<Executor>, jobs: &mut Vec<SyncJob>) -> bool {
        let runner = &core.sync_runner;
        if !*runner.on_workers.get_or_init(workers_can_run) {
            return false;
        }
        let Some(watch) = RunWatch::get(core) else {
            return false;
        };
        let now = Instant::now();
        let start = {
            let mut s = runner.lock();
            let going = s.run_on_worker();
            if going && watch.is_stuck() {
                return false;
            }
            let added = jobs.iter().map(SyncJob::calls).sum();
            s.jobs.extend(jobs.drain(..));
            runner.queued.fetch_add(added, Ordering::Release);
            (!going).then(|| {
                s.threads += 1;
                s.busy += 1;
                let slot = s.claim_slot(Slot::OnWorker(0));
                runner.mark_on_worker(now, true);
                RunStep { slot, step: 0 }
            })
        };
        if let Some(run) = start {
            watch.run_begins();
            Self::spawn_on_worker(core.clone(), run);
        }
        true
    }

    /// A job begins to run the calls of `batch` one after another: the watch looks at
    /// it until [`batch_ends`](Self::batch_ends).
    pub(super) fn batch_begins(core: &Arc<Executor>, batch: &Arc<BatchShare>) {
        crate::sync::lock(&core.sync_runner.batches).push(batch.clone());
        if let Some(watch) = RunWatch::get(core) {
            watch.run_begins();
        }
    }

    /// The job running the calls of `batch` ended.
    pub(super) fn batch_ends(core: &Arc<Executor>, batch: &Arc<BatchShare>) {
        let mut batches = crate::sync::lock(&core.sync_runner.batches);
        if let Some(at) = batches.iter().position(|b| Arc::ptr_eq(b, batch)) {
            batches.swap_remove(at);
        }
    }

    /// Takes the calls not run yet out of the batches whose call being run is slow, and
    /// queues them for threads as lone jobs (the answers kept so far leave too): a call
    /// that turns slow, or that waits for others of its batch, holds up no other.
    /// Returns whether jobs run the calls of batches (the watch keeps looking).
    /// Called from the watch thread.
    fn release_slow_batches(core: &Arc<Executor>, runtime: &tokio::runtime::Handle) -> bool {
        let now = Instant::now();
        let (running, released): (bool, Vec<_>) = {
            let batches = crate::sync::lock(&core.sync_runner.batches);
            let released = batches
                .iter()
                .filter_map(|batch| batch.release_if_slow(now))
                .collect();
            (!batches.is_empty(), released)
        };
        if released.is_empty() {
            return running;
        }
        let calls: usize = released.iter().map(|(jobs, _)| jobs.len()).sum();
        tracing::debug!(process = %core.name, calls, "a call of a batch ran slow: the calls behind it go to threads");
        let core = core.clone();
        runtime.spawn(async move {
            let mut waits = Vec::new();
            for (mut jobs, wait_for_room) in released {
                SyncRunner::submit(&core, &mut jobs);
                waits.extend(wait_for_room);
            }
            for wait_for_room in waits {
                wait_for_room.await;
            }
        });
        running
    }

    /// Runs queued quick calls on this thread (the reader's, which queued them) while
    /// more than `HELP_ABOVE` jobs (or a quarter of the NO_RETURN allowance) wait,
    /// down to half of that: a flood that outruns the run on a worker is read no
    /// faster than its callbacks run. Not while the run is stuck in a callback that
    /// turned slow (its jobs go to threads).
    pub(super) fn help_with_backlog(core: &Arc<Executor>) {
        let runner = &core.sync_runner;
        let limit = core.limits.callback_limit(super::CallbackKind {
            sync: true,
            one_way: true,
        });
        let above = HELP_ABOVE.min(limit / 4);
        if runner.queued() <= above || !runner.on_workers.get().copied().unwrap_or(false) {
            return;
        }
        let mut usage = RunUsage::default();
        while runner.queued() > above / 2 {
            let job = {
                let mut s = runner.lock();
                if runner.watch().is_some_and(RunWatch::is_stuck) {
                    return;
                }
                let Some(job) = s.next_quick().and_then(|at| s.jobs.remove(at)) else {
                    return;
                };
                runner.queued.fetch_sub(job.calls(), Ordering::AcqRel);
                job
            };
            if !job.wants_reply() {
                usage.before_job();
            }
            let started = Instant::now();
            // `run` catches the callback's panics; this guards the counts against a bug.
            if catch_unwind(AssertUnwindSafe(|| {
                job.run(started, true, &mut usage, None)
            }))
            .is_err()
            {
                tracing::error!("a sync callback job panicked outside its callback");
            }
        }
    }

    /// The steps of the run on a worker from `run` on, in two tasks that take turns
    /// (see [`SyncRunner::take_turns`]): the task of a run that ended, if one is
    /// parked (see [`IdleRun`]), else a new one.
    fn spawn_on_worker(core: Arc<Executor>, run: RunStep) {
        match core.sync_runner.idle_runs.take() {
            Some(idle) => idle.give(Some(run)),
            None => {
                tokio::spawn(Self::run_task(core, run));
            }
        }
    }

    /// The task of runs on a worker: runs `run`, then parks until given the next run;
    /// ends when not needed (a task is parked already) or once the node closed.
    async fn run_task(core: Arc<Executor>, mut run: RunStep) {
        let idle = Arc::new(IdleRun::default());
        loop {
            Self::take_turns(core.clone(), run, None).await;
            let runner = &core.sync_runner;
            if !runner.idle_runs.park(&idle, || runner.lock().retired) {
                return;
            }
            match idle.taken().await {
                Some(next) => run = next,
                None => return,
            }
        }
    }

    /// Runs every other step of the run on a worker: the first of two tasks (`turns`
    /// `None`: made, with the second task, once a second step is due), or the second.
    /// A step ends by starting the other task (spawned after the first step, woken
    /// later): idle, it is scheduled in this worker's LIFO slot, as a task spawned for
    /// the next step would be, and whatever the step woke moves to the worker's queue,
    /// where the other worker can take it; but no task is spawned (allocated,
    /// scheduled and freed) per step.
    async fn take_turns(core: Arc<Executor>, run: RunStep, turns: Option<(Arc<Turns>, usize)>) {
        let mut turns = turns;
        loop {
            let ended = turns
                .as_ref()
                .is_some_and(|(turns, _)| turns.ended.load(Ordering::Acquire));
            if ended || !Self::run_one_on_worker(&core, run) {
                if let Some((turns, me)) = turns {
                    turns.ended.store(true, Ordering::Release);
                    turns.give(1 - me);
                }
                return;
            }
            let first_turn = turns.is_none();
            let (shared, me) = turns.get_or_insert_with(|| (Arc::default(), 0));
            let me = *me;
            if first_turn {
                Self::spawn_second(core.clone(), run, shared.clone());
            } else {
                shared.give(1 - me);
            }
            shared.wait(me).await;
        }
    }

    /// Spawns the second task of a run on a worker; it runs a step at once.
    fn spawn_second(core: Arc<Executor>, run: RunStep, turns: Arc<Turns>) {
        tokio::spawn(Self::take_turns(core, run, Some((turns, 1))));
    }

    /// The watch found the run on a worker waiting for its worker (busy with other
    /// tasks, such as the reader of a flood): its next step goes to the runtime's
    /// shared queue, where another worker takes it; the step left waiting ends when it
    /// runs. Called from the watch thread, outside the runtime's workers.
    fn move_run(core: &Arc<Executor>, runtime: &tokio::runtime::Handle) {
        let runner = &core.sync_runner;
        let moved = {
            let mut s = runner.lock();
            s.slots
                .iter_mut()
                .enumerate()
                .find_map(|(slot, state)| match state {
                    Slot::OnWorker(step) => {
                        *step += 1;
                        Some(RunStep { slot, step: *step })
                    }
                    _ => None,
                })
        };
        if let Some(run) = moved {
            // Progress, on the same thread as far as the watch knows (this one is not the
            // run's): the new step marks its own when it begins.
            if let Some(watch) = runner.watch() {
                watch.waiting.store(true, Ordering::Relaxed);
                let now = watch.micros(Instant::now());
                watch.job_began.store(now, Ordering::Release);
            }
            let core = core.clone();
            runtime.spawn(async move {
                if SyncRunner::run_one_on_worker(&core, run) {
                    SyncRunner::spawn_on_worker(core, run);
                }
            });
        }
    }

    /// Runs the next queued job, if any; a new task runs the one after it. Whatever the
    /// job woke (its reply's writer, tasks of its callback) waits in this worker's LIFO
    /// slot, which other workers cannot take: the new task takes that place, and moves
    /// what it held where the other worker can take it, should the next job turn slow.
    /// NO_RETURN jobs wake nothing of their own: up to `ONE_WAY_JOBS_PER_TASK` of them
    /// run in one task, which reads its thread's usage every few (a callback slow by
    /// the wall clock is asked whether it only waited for a processor: under a flood on
    /// a loaded machine, a descheduled worker would otherwise send the flood to
    /// threads).
    /// Returns whether a next step is due (the run goes on).
    fn run_one_on_worker(core: &Arc<Executor>, run: RunStep) -> bool {
        let runner = &core.sync_runner;
        let mut usage = RunUsage::default();
        // Two clock reads per job: its start (after the lock, whose wait is not the
        // callback's) and its end, which also marks the next job's progress for the
        // watch.
        let mut now = Instant::now();
        let mut job = match runner.next_on_worker(run, now) {
            Next::Job(job) => job,
            Next::Ended => {
                Self::leave_to_threads(core);
                return false;
            }
            Next::Moved => return false,
        };
        // Calls run in this task (a batch's count each).
        let mut ran = 0;
        loop {
            ran += job.calls();
            let replies = job.wants_reply();
            if !replies {
                // A reply's job runs alone in its task: a reading for each would cost
                // a system call per call.
                usage.before_job();
            }
            let started = Instant::now();
            // `run` catches the callback's panics; this guards the counts against a bug.
            let progress = |at: Instant| runner.progress_on_worker(at);
            now = catch_unwind(AssertUnwindSafe(|| {
                job.run(started, true, &mut usage, Some(&progress))
            }))
            .unwrap_or_else(|_| {
                tracing::error!("a sync callback job panicked outside its callback");
                Instant::now()
            });
            if replies || ran >= ONE_WAY_JOBS_PER_TASK {
                break;
            }
            // The next job, under the same lock that finds it (one lock per job).
            job = match runner.next_on_worker(run, now) {
                Next::Job(job) => job,
                Next::Ended => {
                    Self::leave_to_threads(core);
                    return false;
                }
                Next::Moved => return false,
            };
        }
        match runner.more_on_worker(run, now) {
            Next::Job(()) => true,
            Next::Ended => {
                Self::leave_to_threads(core);
                false
            }
            Next::Moved => false,
        }
    }

    /// A run on a worker ended: the jobs it left (none a quick call now: a callback that
    /// turned slow meanwhile) get threads, as if just submitted.
    fn leave_to_threads(core: &Arc<Executor>) {
        if core.sync_runner.queued() > 0 {
            Self::submit(core, &mut Vec::new());
        }
    }

    /// Whether quick calls are queued for the step `run` of the run on a worker; if
    /// not, the run ends. Its next step waits for the worker from now: a wait of
    /// `HANDOFF_AFTER` of the worker's time from here (the worker busy elsewhere) makes
    /// the watch move the run to another worker; the time its last callback took does
    /// not count.
    fn more_on_worker(&self, run: RunStep, now: Instant) -> Next<()> {
        let mut s = self.lock();
        if !s.is_current(run) {
            return Next::Moved;
        }
        if s.next_quick().is_none() {
            self.end_on_worker(&mut s, run.slot);
            return Next::Ended;
        }
        self.mark_on_worker(now, true);
        Next::Job(())
    }

    /// The run on a worker makes progress at `now`, on this thread: a job begins, or
    /// (`waiting`) its next step waits for a worker.
    fn mark_on_worker(&self, now: Instant, waiting: bool) {
        if let Some(watch) = self.watch() {
            watch
                .worker
                .store(thread_clock::current(), Ordering::Relaxed);
            watch.waiting.store(waiting, Ordering::Relaxed);
            watch.job_began.store(watch.micros(now), Ordering::Release);
        }
    }

    /// The run on a worker, inside a job (the calls of a batch), began its next call
    /// at `now`: progress for the watch, as a job beginning is.
    fn progress_on_worker(&self, now: Instant) {
        if let Some(watch) = self.watch() {
            watch.job_began.store(watch.micros(now), Ordering::Release);
        }
    }

    /// Ends the run on a worker in `slot`.
    fn end_on_worker(&self, s: &mut RunnerState, slot: usize) {
        s.slots[slot] = Slot::Vacant;
        s.threads -= 1;
        s.busy -= 1;
        if let Some(watch) = self.watch() {
            watch.job_began.store(0, Ordering::Release);
        }
    }

    /// The next job for the run on a worker, which made progress at `now` (its last
    /// job ended).
    fn next_on_worker(&self, run: RunStep, now: Instant) -> Next<SyncJob> {
        let mut s = self.lock();
        if !s.is_current(run) {
            return Next::Moved;
        }
        let Some(job) = s.next_quick().and_then(|at| s.jobs.remove(at)) else {
            self.end_on_worker(&mut s, run.slot);
            return Next::Ended;
        };
        self.queued.fetch_sub(job.calls(), Ordering::AcqRel);
        self.mark_on_worker(now, false);
        Next::Job(job)
    }

    /// Queues `jobs` (leaving the vector empty) and makes sure threads will run them.
    pub(super) fn submit(core: &Arc<Executor>, jobs: &mut Vec<SyncJob>) {
        let (start, watch, wake) = {
            let mut s = core.sync_runner.lock();
            s.last_submit = Some(Instant::now());
            let added = jobs.iter().map(SyncJob::calls).sum();
            s.jobs.extend(jobs.drain(..));
            core.sync_runner.queued.fetch_add(added, Ordering::Release);
            // Wake a waiting thread only if no thread is starting or watching for jobs:
            // one thread gets through a burst of quick callbacks, and the watchdog wakes
            // the others if it makes no progress. (Waking one per job kept a dozen
            // threads trading every burst, each woken for a few jobs.)
            let watching = s.threads - s.busy - s.parked;
            let wake = s.parked > 0 && s.jobs.len() > watching;
            // Jobs left for waiting threads that were not woken: the watchdog wakes them
            // if the woken one turns out to be slow, as it starts threads for busy ones.
            let left_to_sleepers =
                s.parked > usize::from(wake) && s.jobs.len() > watching + usize::from(wake);
            let (start, mut watch) = if s.threads == 0 {
                // Nothing runs here: one thread, presumed quick until proven otherwise.
                if s.slots.is_empty() {
                    s.slots.push(Slot::Vacant);
                }
                s.slots[0] = Slot::Starting(Instant::now());
                s.threads = 1;
                (vec![0], s.jobs.len() > 1)
            } else {
                s.plan_threads(core.limits.max_sync_callbacks, true)
            };
            watch = (watch || left_to_sleepers) && !s.watched;
            s.watched |= watch;
            (start, watch, wake)
        };
        // After the lock is released: the woken thread must not block on it at once.
        if wake {
            core.sync_runner.wake.notify_one();
        }
        Self::start_threads(core, start);
        if watch {
            let core = core.clone();
            tokio::spawn(async move { SyncRunner::watchdog(core).await });
        }
    }

    /// Looks at the queue every `HANDOFF_AFTER` while jobs wait for busy or sleeping
    /// threads; once no thread made progress, wakes the sleeping ones and starts more.
    async fn watchdog(core: Arc<Executor>) {
        loop {
            tokio::time::sleep(HANDOFF_AFTER).await;
            let (start, again, wake) = {
                let mut s = core.sync_runner.lock();
                let (start, again) = s.plan_threads(core.limits.max_sync_callbacks, false);
                // No thread made progress for a while: every waiting thread takes a job.
                let stalled = !s.jobs.is_empty() && !s.recent(Instant::now());
                let wake = if stalled {
                    s.parked.min(s.jobs.len())
                } else {
                    0
                };
                // Jobs wait for sleeping threads while others still get through theirs.
                let again = again || (!stalled && !s.jobs.is_empty() && s.parked > 0);
                s.watched = again;
                (start, again, wake)
            };
            for _ in 0..wake {
                core.sync_runner.wake.notify_one();
            }
            Self::start_threads(&core, start);
            if !again {
                return;
            }
        }
    }

    /// Starts a thread for each slot. Called from the node's runtime, whose context the
    /// threads enter (as tokio's blocking threads would): callbacks may spawn tasks.
    fn start_threads(core: &Arc<Executor>, slots: Vec<usize>) {
        let runtime = tokio::runtime::Handle::try_current().ok();
        for slot in slots {
            let thread_core = core.clone();
            let runtime = runtime.clone();
            let started = std::thread::Builder::new()
                .name(THREAD_NAME.into())
                .spawn(move || {
                    let _context = runtime.as_ref().map(tokio::runtime::Handle::enter);
                    thread_core.sync_runner.work(slot);
                });
            if let Err(e) = started {
                core.sync_runner.thread_failed(core, slot, &e);
            }
        }
    }

    /// A thread could not be started (the system is out of threads or memory): its slot
    /// is freed, and if no thread is left to run the queued jobs, their callers are told.
    #[cold]
    fn thread_failed(&self, core: &Arc<Executor>, slot: usize, error: &std::io::Error) {
        tracing::error!(process = %core.name, %error, "could not start a thread for sync callbacks");
        let orphans: Vec<SyncJob> = {
            let mut s = self.lock();
            s.slots[slot] = Slot::Vacant;
            s.threads -= 1;
            if s.threads > 0 {
                return;
            }
            let orphans: Vec<SyncJob> = s.jobs.drain(..).collect();
            let calls = orphans.iter().map(SyncJob::calls).sum();
            self.queued.fetch_sub(calls, Ordering::AcqRel);
            orphans
        };
        for job in orphans {
            let message = format!(
                "process `{}` could not start a thread for sync callbacks ({error})",
                core.name
            );
            job.overloaded(message);
        }
    }

    /// Drops the queued jobs whose callers already gave up, so that they no longer count
    /// against the limit; returns how many. The queue is searched at most once per
    /// `HANDOFF_AFTER`, so that a flood of refused calls does not search it each time.
    pub(super) fn drop_expired(&self) -> usize {
        let now = Instant::now();
        let expired: VecDeque<SyncJob> = {
            let mut s = self.lock();
            if s.last_expiry_sweep
                .is_some_and(|t| now.duration_since(t) < HANDOFF_AFTER)
            {
                return 0;
            }
            s.last_expiry_sweep = Some(now);
            let (expired, waiting) = std::mem::take(&mut s.jobs)
                .into_iter()
                .partition(|job| job.expired(now));
            s.jobs = waiting;
            let calls = expired.iter().map(SyncJob::calls).sum();
            self.queued.fetch_sub(calls, Ordering::AcqRel);
            expired
        };
        for job in &expired {
            job.note_skipped();
        }
        expired.len()
    }

    /// A thread's life: run queued jobs; when there are none, watch for one a moment,
    /// then wait for one a while; end when none came.
    fn work(&self, slot: usize) {
        let mut finished_one = false;
        let mut usage = RunUsage::default();
        // When the last job finished: a clock read fewer per job.
        let mut finished = None;
        loop {
            // Read before taking the lock, which the reader needs too: short holds.
            let now = finished.take().unwrap_or_else(Instant::now);
            let job = {
                let mut s = self.lock();
                if finished_one {
                    s.busy -= 1;
                    finished_one = false;
                }
                match s.job_for_threads(self.run_takes_quick_calls()) {
                    Some(job) => {
                        self.queued.fetch_sub(job.calls(), Ordering::AcqRel);
                        s.busy += 1;
                        s.slots[slot] = Slot::Busy(now);
                        Some(job)
                    }
                    None => {
                        s.slots[slot] = Slot::Idle;
                        None
                    }
                }
            };
            let Some(job) = job else {
                usage.forget();
                if self.wait_for_job() {
                    continue;
                }
                let mut s = self.lock();
                if self.has_job_for_threads(&s) {
                    continue;
                }
                s.slots[slot] = Slot::Vacant;
                s.threads -= 1;
                return;
            };
            // `run` catches the callback's panics; this guards the counts against a bug.
            usage.before_job();
            // Read after the lock, whose wait is not the callback's.
            let started = Instant::now();
            match catch_unwind(AssertUnwindSafe(|| {
                job.run(started, false, &mut usage, None)
            })) {
                Ok(at) => finished = Some(at),
                Err(_) => tracing::error!("a sync callback job panicked outside its callback"),
            }
            finished_one = true;
        }
    }

    /// Watches for a job for `SPIN` (unless recent watches found none), then waits for
    /// one up to `LINGER`. Returns whether one is queued.
    fn wait_for_job(&self) -> bool {
        // Watching goes on even when yields are slow (other threads wanted the
        // processor): it was given away meanwhile, and in a back-and-forth exchange the
        // next job arrives about then. Stopping early put the thread to sleep before it.
        let started = Instant::now();
        let watching = self.watch_misses.load(Ordering::Relaxed) < MISSES_BEFORE_SLEEPING_AT_ONCE;
        if watching {
            while started.elapsed() < SPIN {
                if self.queued.load(Ordering::Acquire) > 0 && !self.run_takes_quick_calls() {
                    self.watch_misses.store(0, Ordering::Relaxed);
                    return true;
                }
                std::thread::yield_now();
            }
            self.watch_misses.fetch_add(1, Ordering::Relaxed);
        }
        let mut s = self.lock();
        if self.has_job_for_threads(&s) {
            return true;
        }
        s.parked += 1;
        let (mut s, _) = self
            .wake
            .wait_timeout_while(s, LINGER, |s| !self.has_job_for_threads(s) && !s.retired)
            .unwrap_or_else(|p| p.into_inner());
        s.parked -= 1;
        let found = self.has_job_for_threads(&s);
        // Queued within a watch's length of this thread going to sleep: a watch would
        // have caught it, so watch again. (When it was queued, not when this thread woke:
        // on a busy machine the wake-up alone can take longer than a watch.)
        let caught = s
            .last_submit
            .is_some_and(|t| t.saturating_duration_since(started) < SPIN);
        if found && !watching && caught {
            self.watch_misses.store(0, Ordering::Relaxed);
        }
        found
    }

    /// Whether a queued job is for the threads (see [`RunnerState::job_for_threads`]).
    fn has_job_for_threads(&self, s: &RunnerState) -> bool {
        if self.run_takes_quick_calls() {
            s.jobs.iter().any(|job| !job.is_quick_call())
        } else {
            !s.jobs.is_empty()
        }
    }

    /// Whether a run on a worker takes the quick calls queued: one is going, and the
    /// watch did not find it stuck. Threads then leave them to it.
    fn run_takes_quick_calls(&self) -> bool {
        self.watch()
            .is_some_and(|watch| watch.job_began.load(Ordering::Acquire) != 0 && !watch.is_stuck())
    }

    /// The node closed: threads waiting for a job end now, and the others once they
    /// find no more (rather than after `LINGER`, holding the node).
    pub fn retire(&self) {
        self.lock().retired = true;
        if let Some(idle) = self.idle_runs.take() {
            idle.give(None);
        }
        self.wake.notify_all();
        if let Some(watch) = self.watch() {
            watch.thread.unpark();
        }
    }

    pub(super) fn note_dropped(&self, node: &str, callback: &str, limit: usize) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // The first one, then one line per thousand: a flood must not flood the log.
        if dropped == 1 || dropped % 1000 == 0 {
            tracing::warn!(
                process = node,
                callback,
                dropped,
                limit,
                "dropped NO_RETURN calls: this many callbacks already wait or run here"
            );
        }
    }

    /// The node's watch, once started.
    fn watch(&self) -> Option<&RunWatch> {
        self.run_watch.get().and_then(Option::as_ref)
    }

    /// Calls waiting for a thread (without the lock).
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunnerState> {
        crate::sync::lock(&self.state)
    }
}

impl RunWatch {
    /// The node's watch, its thread started on first use; `None` if it could not start.
    fn get(core: &Arc<Executor>) -> Option<&RunWatch> {
        core.sync_runner
            .run_watch
            .get_or_init(|| RunWatch::start(core))
            .as_ref()
    }

    fn start(core: &Arc<Executor>) -> Option<RunWatch> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let weak = Arc::downgrade(core);
        let started = std::thread::Builder::new()
            .name("daffi-watch".into())
            .spawn(move || watch_runs(&weak, &runtime));
        match started {
            Ok(handle) => Some(RunWatch {
                thread: handle.thread().clone(),
                job_began: AtomicU64::new(0),
                worker: AtomicI32::new(0),
                waiting: std::sync::atomic::AtomicBool::new(false),
                stuck: AtomicU64::new(0),
                runs: AtomicU64::new(0),
                sleeping: std::sync::atomic::AtomicBool::new(false),
                epoch: Instant::now(),
            }),
            Err(error) => {
                tracing::warn!(%error, "could not start a watch thread: sync callbacks all run on threads");
                None
            }
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        // Never 0 (that means none runs).
        at.duration_since(self.epoch).as_micros() as u64 + 1
    }

    /// Whether the run on a worker is stuck in a callback (the watch found it so, and it
    /// made no progress since).
    fn is_stuck(&self) -> bool {
        let began = self.job_began.load(Ordering::Acquire);
        began != 0 && self.stuck.load(Ordering::Acquire) == began
    }

    /// A run begins: the thread watches (woken if it slept).
    fn run_begins(&self) {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.thread.unpark();
        }
    }
}

/// The watch thread of a node: while runs on a worker happen, looks whether one is stuck
/// in a callback (when, see [`next_look`]); if so, starts the runner's watchdog on the
/// runtime (waking another worker). Sleeps once no run began for a while; ends with the
/// node.
fn watch_runs(core: &std::sync::Weak<Executor>, runtime: &tokio::runtime::Handle) {
    let (mut idle_looks, mut runs_seen, mut rescued) = (0u32, 0u64, 0u64);
    let mut stall = None;
    loop {
        let Some(core) = core.upgrade() else { return };
        let runner = &core.sync_runner;
        if runner.lock().retired {
            return;
        }
        let Some(watch) = runner.watch() else {
            // Set just after this thread started.
            drop(core);
            std::thread::sleep(HANDOFF_AFTER);
            continue;
        };
        let began = watch.job_began.load(Ordering::Acquire);
        let now = watch.micros(Instant::now());
        let stuck =
            (began != 0 && began != rescued && now.saturating_sub(began) >= HANDOFF_AFTER_US)
                .then(|| Stall::stuck(&mut stall, began, watch.worker.load(Ordering::Relaxed), now))
                .flatten();
        if let Some(usable) = stuck {
            rescued = began;
            rescue(&core, watch, runtime, began, usable);
        }
        let batches = SyncRunner::release_slow_batches(&core, runtime);
        let runs = watch.runs.load(Ordering::SeqCst);
        idle_looks = if runs != runs_seen || began != 0 || batches {
            0
        } else {
            idle_looks + 1
        };
        runs_seen = runs;
        if idle_looks < WATCH_LOOKS_BEFORE_SLEEPING {
            drop(core);
            std::thread::sleep(next_look(began, now, batches));
            continue;
        }
        watch.sleeping.store(true, Ordering::SeqCst);
        // Looked at again after saying so: a run that began meanwhile is not missed.
        if watch.runs.load(Ordering::SeqCst) != runs_seen {
            watch.sleeping.store(false, Ordering::SeqCst);
            continue;
        }
        drop(core);
        // Bounded: the node may be gone without retiring (it is then found gone).
        std::thread::park_timeout(LINGER);
        idle_looks = 0;
    }
}

/// How long the watch sleeps before its next look, having seen at `now` the run on a
/// worker that made progress at `began` (0: none runs) and jobs running the calls of
/// batches or not. A stall is seen `HANDOFF_AFTER` after its progress, and stuck
/// `HANDOFF_AFTER` of usable time after that. With no run to watch, one look in twice
/// that: a run that begins just after the look is first seen as late as with looks
/// every `HANDOFF_AFTER` (then stalled for as long), and a stream of quick callbacks,
/// which is mostly between runs, wakes the watch half as often.
fn next_look(began: u64, now: u64, batches: bool) -> Duration {
    if began == 0 {
        return if batches {
            HANDOFF_AFTER
        } else {
            2 * HANDOFF_AFTER
        };
    }
    let age = now.saturating_sub(began);
    if age >= HANDOFF_AFTER_US || batches {
        return HANDOFF_AFTER;
    }
    Duration::from_micros(HANDOFF_AFTER_US - age)
}

/// What the watch does for a run on a worker found stuck (its job began at `began`, and
/// its thread had `usable_us` since): a run whose next step waits for its busy worker
/// moves to another; a run inside a callback that turned slow leaves the node's later
/// jobs to threads.
fn rescue(
    core: &Arc<Executor>,
    watch: &RunWatch,
    runtime: &tokio::runtime::Handle,
    began: u64,
    usable_us: u64,
) {
    if watch.waiting.load(Ordering::Relaxed) {
        tracing::debug!(process = %core.name, usable_us, "quick sync callbacks waited for a busy runtime worker; moved to another");
        SyncRunner::move_run(core, runtime);
        return;
    }
    watch.stuck.store(began, Ordering::Release);
    tracing::debug!(process = %core.name, usable_us, "a sync callback turned slow on a runtime worker; later ones go to threads");
    core.sync_runner.lock().watched = true;
    runtime.spawn(SyncRunner::watchdog(core.clone()));
}

/// `HANDOFF_AFTER` in the watch's unit.
const HANDOFF_AFTER_US: u64 = HANDOFF_AFTER.as_micros() as u64;

/// A run on a worker that made no progress for `HANDOFF_AFTER`, as the watch first saw
/// it: when (µs since the watch's epoch), and the processor time its thread had used.
#[derive(Debug, Clone, Copy)]
struct Stall {
    began: u64,
    thread: ThreadId,
    at: u64,
    cpu_us: u64,
}

impl Stall {
    /// Whether the run whose job began at `began`, on `thread`, is stuck at `now`: since
    /// the watch first saw it stall (`stall`, kept between looks), its thread had
    /// `HANDOFF_AFTER` of time it could use; `Some` of that time if so. Time the OS left
    /// it waiting for a processor (a loaded machine) does not count: a flood of quick
    /// calls then stays on the worker. Time it ran (a callback that turned slow, or
    /// other tasks holding the worker) does, and so does all of it if it is blocked (a
    /// callback asleep). Where threads cannot be looked at, any stall is stuck.
    fn stuck(stall: &mut Option<Stall>, began: u64, thread: ThreadId, now: u64) -> Option<u64> {
        let Some(seen) = thread_clock::look(thread) else {
            return Some(now.saturating_sub(began));
        };
        match *stall {
            Some(first) if first.began == began && first.thread == thread => {
                let usable = first.usable_us(seen, now);
                (usable >= HANDOFF_AFTER_US).then_some(usable)
            }
            _ => {
                *stall = Some(Stall {
                    began,
                    thread,
                    at: now,
                    cpu_us: seen.cpu_us,
                });
                None
            }
        }
    }

    /// The time since it was first seen that its thread could use, `seen` at `now`: all
    /// of it if the thread is blocked now, else the processor time it used meanwhile.
    fn usable_us(&self, seen: thread_clock::Seen, now: u64) -> u64 {
        if seen.blocked {
            now.saturating_sub(self.at)
        } else {
            seen.cpu_us.saturating_sub(self.cpu_us)
        }
    }
}

/// Whether this runtime has a worker to spare while another runs a callback.
fn workers_can_run() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            && runtime.metrics().num_workers() >= 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner state with `threads` threads, `busy` of them in a callback since
    /// `busy_for`, and `jobs` queued jobs.
    fn state(threads: usize, busy: usize, busy_for: Duration, jobs: usize) -> RunnerState {
        let since = Instant::now()
            .checked_sub(busy_for)
            .expect("a past instant");
        let mut slots = vec![Slot::Busy(since); busy];
        slots.resize(threads, Slot::Idle);
        RunnerState {
            jobs: (0..jobs).map(|_| SyncJob::placeholder()).collect(),
            slots,
            threads,
            busy,
            ..RunnerState::default()
        }
    }

    #[test]
    fn idle_threads_take_the_jobs_and_none_start() {
        let mut s = state(3, 1, Duration::from_secs(1), 2);
        assert_eq!(s.plan_threads(8, true), (vec![], false));
    }

    #[test]
    fn a_submit_starts_one_thread_and_leaves_the_rest_to_the_watchdog() {
        // Every thread is stuck in a slow callback: one new thread, then watch.
        let mut s = state(2, 2, Duration::from_secs(1), 5);
        assert_eq!(s.plan_threads(8, true), (vec![2], true));
        assert_eq!(s.threads, 3);
    }

    #[test]
    fn the_watchdog_starts_a_thread_per_waiting_job_up_to_the_limit() {
        let mut s = state(2, 2, Duration::from_secs(1), 5);
        let (started, again) = s.plan_threads(4, false);
        assert_eq!((started, again), (vec![2, 3], false), "capped at 4 threads");
        let mut s = state(1, 1, Duration::from_secs(1), 2);
        assert_eq!(s.plan_threads(8, false), (vec![1, 2], false), "one per job");
    }

    #[test]
    fn threads_busy_with_quick_callbacks_get_the_queued_jobs() {
        // A callback started a moment ago: the thread will soon take the next job.
        let mut s = state(2, 2, Duration::ZERO, 5);
        assert_eq!(s.plan_threads(8, true), (vec![], true));
    }

    #[test]
    fn a_run_on_a_worker_takes_only_quick_calls_and_threads_start_for_the_rest() {
        // A run on a worker is going; a job not seen to be quick (or a stream's
        // producer) is queued ahead of a quick one.
        let mut s = state(0, 0, Duration::ZERO, 1);
        s.jobs.push_back(SyncJob::quick_placeholder());
        s.claim_slot(Slot::OnWorker(0));
        (s.threads, s.busy) = (1, 1);
        assert_eq!(s.next_quick(), Some(1), "the run skips the job for threads");
        assert_eq!(s.plan_threads(8, true), (vec![1], true), "a thread for it");
    }

    #[test]
    fn a_stall_counts_the_time_its_thread_ran_or_all_of_it_if_blocked() {
        let first = Stall {
            began: 1,
            thread: 7,
            at: 1_000,
            cpu_us: 5_000,
        };
        let seen = |cpu_us, blocked| thread_clock::Seen { cpu_us, blocked };
        assert_eq!(first.usable_us(seen(5_550, false), 1_600), 550, "ran");
        assert_eq!(
            first.usable_us(seen(5_050, false), 1_600),
            50,
            "descheduled"
        );
        assert_eq!(first.usable_us(seen(5_000, true), 1_600), 600, "asleep");
    }

    #[test]
    fn a_run_whose_thread_sleeps_is_stuck_at_a_later_look_and_a_new_job_is_seen_afresh() {
        let (tell, told) = std::sync::mpsc::channel();
        let (done, finish) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            tell.send(thread_clock::current()).expect("tell");
            let _ = finish.recv();
        });
        let id = told.recv().expect("its id");
        // The looks' clock is given, 10 ms apart; the thread blocks on the channel.
        let mut stall = None;
        assert_eq!(Stall::stuck(&mut stall, 1, id, 1_000), None, "first look");
        let stuck = (0..1_000).find_map(|_| {
            std::thread::sleep(Duration::from_millis(1));
            Stall::stuck(&mut stall, 1, id, 11_000)
        });
        assert_eq!(stuck, Some(10_000), "blocked: all of its time counts");
        assert_eq!(Stall::stuck(&mut stall, 2, id, 12_000), None, "a new job");
        drop(done);
        sleeper.join().expect("the sleeper");
    }

    #[test]
    fn a_step_of_a_run_moved_on_is_no_longer_current() {
        let mut s = state(0, 0, Duration::ZERO, 0);
        let slot = s.claim_slot(Slot::OnWorker(0));
        let first = RunStep { slot, step: 0 };
        assert!(s.is_current(first));
        s.slots[slot] = Slot::OnWorker(1);
        assert!(!s.is_current(first), "the watch moved the run on");
        assert!(s.is_current(RunStep { slot, step: 1 }));
        s.slots[slot] = Slot::Vacant;
        assert!(!s.is_current(RunStep { slot, step: 1 }), "the run ended");
    }

    #[test]
    fn threads_leave_quick_calls_to_a_run_on_a_worker() {
        let mut s = state(1, 0, Duration::ZERO, 0);
        s.jobs.push_back(SyncJob::quick_placeholder());
        s.jobs.push_back(SyncJob::placeholder());
        let job = s
            .job_for_threads(true)
            .expect("the job not seen to be quick");
        assert!(!job.is_quick_call());
        assert!(
            s.job_for_threads(true).is_none(),
            "the quick call is the run's"
        );
        assert!(
            s.job_for_threads(false).is_some(),
            "no run: threads take it"
        );
    }

    #[test]
    fn a_reader_behind_a_backlog_runs_quick_calls_down_to_half_of_it() {
        // An allowance of 4 x 64 NO_RETURN calls: the reader helps above 64 queued.
        let limits = super::super::Limits {
            max_concurrent_callbacks: 1,
            max_sync_callbacks: 4,
            stop_timeout: Duration::ZERO,
        };
        let core = Executor::new("test".into(), limits, Default::default());
        let runner = &core.sync_runner;
        runner.on_workers.set(true).expect("unset");
        let queue = |jobs: Vec<SyncJob>| {
            runner.queued.fetch_add(jobs.len(), Ordering::Release);
            runner.lock().jobs.extend(jobs);
        };
        queue((0..60).map(|_| SyncJob::quick_placeholder()).collect());
        SyncRunner::help_with_backlog(&core);
        assert_eq!(runner.queued(), 60, "no backlog: the reader reads on");
        queue((0..40).map(|_| SyncJob::quick_placeholder()).collect());
        SyncRunner::help_with_backlog(&core);
        assert_eq!(runner.queued(), 32, "run down to half of 64");
        assert_eq!(runner.lock().jobs.len(), 32);
        queue((0..100).map(|_| SyncJob::placeholder()).collect());
        SyncRunner::help_with_backlog(&core);
        assert_eq!(runner.queued(), 100, "the quick calls ran, not the others");
        assert!(
            runner.lock().jobs.iter().all(|job| !job.is_quick_call()),
            "jobs not seen to be quick are the threads'"
        );
    }

    #[test]
    fn vacant_slots_are_reused() {
        let mut s = state(2, 2, Duration::from_secs(1), 1);
        s.slots.insert(0, Slot::Vacant);
        assert_eq!(s.plan_threads(8, false).0, vec![0]);
    }

    #[test]
    fn a_stall_is_seen_as_soon_as_before_and_idle_looks_are_twice_as_far_apart() {
        let handoff = HANDOFF_AFTER_US;
        // No run: the next look in twice `HANDOFF_AFTER`, so that a run that begins
        // right after this look is seen stalled at that next look, as with two.
        assert_eq!(next_look(0, 10_000, false), 2 * HANDOFF_AFTER);
        // A run made progress 100 us ago: looked at again once it is `HANDOFF_AFTER` old.
        let began = 10_000;
        assert_eq!(
            next_look(began, began + 100, false),
            Duration::from_micros(handoff - 100)
        );
        // Seen stalled: looked at again after `HANDOFF_AFTER` (of which its thread must
        // have used enough to be stuck).
        assert_eq!(next_look(began, began + handoff, false), HANDOFF_AFTER);
        assert_eq!(next_look(began, began + 5 * handoff, false), HANDOFF_AFTER);
        // Batches running: looked at every `HANDOFF_AFTER`, as before.
        assert_eq!(next_look(0, 10_000, true), HANDOFF_AFTER);
        assert_eq!(next_look(began, began + 100, true), HANDOFF_AFTER);
    }
}
