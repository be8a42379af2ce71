//! The task of an ended run on a worker, kept for the next run: [`IdleRun`].
//!
//! A quick sync callback runs on the runtime worker that read its request, in a task of
//! its own (see [`SyncRunner`](super::sync_runner::SyncRunner)). Spawning that task for
//! each lone call cost about 1,400 instructions (its cell, aligned to a cache line, goes
//! through `posix_memalign`; then its completion and release), some 13 % of what a
//! callee does per call. The task of a run that ended waits here instead, and the next
//! run wakes it: from a worker, it is scheduled in that worker's LIFO slot, exactly
//! where a task spawned there would be.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use super::sync_runner::RunStep;

/// A parked run task's end of the hand-over: what it is given, and its waker.
#[derive(Default)]
pub(super) struct IdleRun(Mutex<Handover>);

#[derive(Default)]
struct Handover {
    /// `Some(Some(run))`: the next run to take; `Some(None)`: end (the node closed).
    given: Option<Option<RunStep>>,
    waker: Option<Waker>,
}

impl IdleRun {
    /// Gives the parked task `run` to take, or (`None`) tells it to end.
    pub(super) fn give(&self, run: Option<RunStep>) {
        let waker = {
            let mut handover = crate::sync::lock(&self.0);
            handover.given = Some(run);
            handover.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Waits until given a run (`Some`) or told to end (`None`).
    pub(super) fn taken(&self) -> impl Future<Output = Option<RunStep>> + '_ {
        std::future::poll_fn(move |cx| {
            let mut handover = crate::sync::lock(&self.0);
            if let Some(given) = handover.given.take() {
                return Poll::Ready(given);
            }
            if !handover
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                handover.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

/// The node's parked run task, if one waits.
#[derive(Default)]
pub(super) struct IdleRuns(Mutex<Option<Arc<IdleRun>>>);

impl IdleRuns {
    /// The parked task, taken: the caller gives it its next run.
    pub(super) fn take(&self) -> Option<Arc<IdleRun>> {
        crate::sync::lock(&self.0).take()
    }

    /// Parks `idle` unless a task is parked already, or `retired` (asked under the
    /// lock, so that a [`take`](Self::take) after the retirement never misses it).
    pub(super) fn park(&self, idle: &Arc<IdleRun>, retired: impl FnOnce() -> bool) -> bool {
        let mut parked = crate::sync::lock(&self.0);
        if parked.is_some() || retired() {
            return false;
        }
        *parked = Some(idle.clone());
        true
    }
}
