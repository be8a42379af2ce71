//! How a sync callback's recent runs went, to decide where its next run goes: a
//! callback seen to finish quickly runs on the runtime worker that read its request
//! (no hand-off to a thread, no wake-up); any other on the node's callback threads.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A run shorter than this counts as quick.
const QUICK_RUN: Duration = Duration::from_micros(100);
/// Quick runs in a row after which the callback runs where its request was read. A slow
/// run (or one that waited on daffi's sync API) starts the count again.
const QUICK_STREAK: u32 = 3;

/// The recent runs of one sync callback.
#[derive(Debug, Default)]
pub(super) struct Pace {
    quick_streak: AtomicU32,
}

impl Pace {
    /// Whether its recent runs were all quick.
    pub(super) fn is_quick(&self) -> bool {
        self.quick_streak.load(Ordering::Relaxed) >= QUICK_STREAK
    }

    /// Notes a run that took `took`; `blocked`: it waited on daffi's sync API (a nested
    /// call), which must not hold a runtime worker.
    pub(super) fn record(&self, took: Duration, blocked: bool) {
        if took >= QUICK_RUN || blocked {
            self.quick_streak.store(0, Ordering::Relaxed);
            return;
        }
        // A load and a store, not a read-modify-write: a lost count between two threads
        // only delays the decision by a run.
        let streak = self.quick_streak.load(Ordering::Relaxed);
        if streak < QUICK_STREAK {
            self.quick_streak.store(streak + 1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_after_a_streak_and_slow_after_one_slow_run() {
        let pace = Pace::default();
        let quick = Duration::from_micros(5);
        for _ in 0..QUICK_STREAK {
            assert!(!pace.is_quick());
            pace.record(quick, false);
        }
        assert!(pace.is_quick());
        pace.record(Duration::from_millis(300), false);
        assert!(!pace.is_quick(), "a slow run ends it");
        for _ in 0..QUICK_STREAK {
            pace.record(quick, false);
        }
        pace.record(quick, true);
        assert!(
            !pace.is_quick(),
            "a run that blocked on a nested call ends it"
        );
    }
}
