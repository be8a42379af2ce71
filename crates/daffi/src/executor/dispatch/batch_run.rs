//! A sync job for the calls of a batch frame: the callback runs for each in order, on
//! one thread, each answer kept with the others' (they leave together). The calls not
//! run yet stay where the node's watch can take them: should one call turn slow (or
//! wait for the others), they go to the callback threads as lone jobs, and the answers
//! kept so far leave, as if the calls had come alone.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::pace::Pace;
use super::super::sync_runner::SyncRunner;
use super::super::{CallBatch, Executor, ServingGuard};
use super::{
    call_sync, note_no_return_failure, note_skipped, wait, Calls, RunUsage, SyncFn, SyncJob,
    SyncWork,
};
use crate::mesh::BoxFuture;

/// How long the replies of a batch's calls wait for the others', at most (then those
/// answered so far leave): ten quick runs. (A job of `BATCH_JOB_CALLS` takes a few
/// hundred µs at most when its callbacks take a few µs; shorter, its replies left in
/// several frames.) Also how long one call may run before the watch takes the calls
/// behind it ([`BatchShare::release_if_slow`]).
pub(super) const REPLIES_WAIT_AT_MOST: Duration = Duration::from_millis(1);

/// A batch's sync job, as run by the thread that took it.
pub(in crate::executor) struct BatchRun {
    share: Arc<BatchShare>,
    on_worker: bool,
    /// Its node's executor (the watch and the threads are its).
    executor: Arc<Executor>,
    /// More than one call: the watch may take the calls behind a slow one.
    watched: bool,
}

/// What a batch's job shares with the node's watch.
pub(in crate::executor) struct BatchShare {
    f: SyncFn,
    pace: Arc<Pace>,
    state: Mutex<BatchState>,
}

struct BatchState {
    calls: Box<dyn CallBatch>,
    /// Counts the calls not handed over as running.
    running: ServingGuard,
    /// When the call being run began (`None` between calls).
    call_began: Option<Instant>,
}

/// Calls not run yet taken from a batch as lone jobs, and the wait for room for the
/// answers kept so far, if the way back is full.
pub(in crate::executor) type Released = (Vec<SyncJob>, Option<BoxFuture<'static, ()>>);

impl BatchRun {
    pub(super) fn new(
        f: SyncFn,
        pace: Arc<Pace>,
        calls: Box<dyn CallBatch>,
        running: ServingGuard,
        on_worker: bool,
    ) -> BatchRun {
        let executor = running.executor.clone();
        // A lone call leaves nothing behind it to take.
        let watched = calls.remaining() > 1;
        let state = Mutex::new(BatchState {
            calls,
            running,
            call_began: None,
        });
        BatchRun {
            share: Arc::new(BatchShare { f, pace, state }),
            on_worker,
            executor,
            watched,
        }
    }

    /// Runs the calls (see [`SyncJob::run`]). Calls whose caller gave up by the time
    /// they would start are skipped (it gets `Timeout` itself). If the callback turns
    /// slow meanwhile, the calls not run yet go to the callback threads as lone jobs
    /// (each still counted as running), as they would have if they had come alone.
    pub(super) fn run(
        self,
        started: Instant,
        usage: &mut RunUsage,
        progress: Option<&dyn Fn(Instant)>,
    ) -> Instant {
        let (share, executor) = (&self.share, &self.executor);
        if self.watched {
            SyncRunner::batch_begins(executor, share);
        }
        let mut state = share.lock();
        let callback: Box<str> = state.calls.callback().into();
        let deadline = state.calls.deadline();
        let one_way = !state.calls.wants_reply();
        let mut started = started;
        let mut first = true;
        // When the replies kept have waited long enough for the others.
        let mut send_at = started + REPLIES_WAIT_AT_MOST;
        while state.calls.remaining() > 0 {
            if deadline.is_some_and(|d| started >= d) {
                let calls = &state.calls;
                note_skipped(calls.callback(), calls.caller(), calls.remaining());
                break;
            }
            if !first {
                if !share.pace.is_quick() {
                    let mut jobs = share.lone_jobs(&mut state);
                    drop(state);
                    SyncRunner::submit(executor, &mut jobs);
                    state = share.lock();
                    break;
                }
                usage.before_job();
                if let Some(progress) = progress {
                    progress(started);
                }
            }
            first = false;
            let Some(payload) = state.calls.next_call() else {
                break;
            };
            state.call_began = Some(started);
            drop(state);
            let (outcome, mut finished) = call_sync(
                &share.f,
                payload,
                None,
                None,
                &share.pace,
                started,
                self.on_worker,
                usage,
                &callback,
            );
            state = share.lock();
            state.call_began = None;
            if one_way {
                if let Err(f) = &outcome {
                    note_no_return_failure(&callback, state.calls.caller(), &f.message);
                }
            } else {
                state.calls.answer(outcome);
                // Replies wait for their batch's others only as long as a quick
                // callback may run: a batch of slower ones answers as it goes.
                if finished >= send_at {
                    if let Some(wait_for_room) = state.calls.flush() {
                        drop(state);
                        if let Some(waited) = wait(wait_for_room, self.on_worker) {
                            finished = waited;
                        }
                        state = share.lock();
                    }
                    send_at = finished + REPLIES_WAIT_AT_MOST;
                }
            }
            started = finished;
        }
        let finished = started;
        let flushed = state.calls.flush();
        // The calls count as running until their replies are queued.
        let running = std::mem::replace(&mut state.running, ServingGuard::none(executor));
        drop(state);
        if self.watched {
            SyncRunner::batch_ends(executor, share);
        }
        let Some(wait_for_room) = flushed else {
            return finished;
        };
        let waited = wait(wait_for_room, self.on_worker);
        drop(running);
        waited.unwrap_or(finished)
    }
}

impl BatchShare {
    fn lock(&self) -> std::sync::MutexGuard<'_, BatchState> {
        crate::sync::lock(&self.state)
    }

    /// If the call being run began at least [`REPLIES_WAIT_AT_MOST`] before `now`: the
    /// calls not run yet, as lone jobs for the threads (the job answers only the call
    /// it runs, then ends), and the answers kept so far, sent.
    pub(in crate::executor) fn release_if_slow(&self, now: Instant) -> Option<Released> {
        let mut state = self.lock();
        let began = state.call_began?;
        if now.saturating_duration_since(began) < REPLIES_WAIT_AT_MOST {
            return None;
        }
        let jobs = self.lone_jobs(&mut state);
        let flushed = state.calls.flush();
        (!jobs.is_empty() || flushed.is_some()).then_some((jobs, flushed))
    }

    /// The calls of the batch not run yet, as lone jobs, each with its count of one
    /// running callback.
    fn lone_jobs(&self, state: &mut BatchState) -> Vec<SyncJob> {
        let requests = state.calls.split_off(0);
        requests
            .into_iter()
            .filter_map(|request| {
                Some(SyncJob {
                    work: SyncWork::Call(self.f.clone()),
                    calls: Calls::One(request),
                    offer: None,
                    pace: self.pace.clone(),
                    _running: state.running.take_one()?,
                })
            })
            .collect()
    }
}
