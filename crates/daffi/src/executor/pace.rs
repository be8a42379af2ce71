//! How a sync callback's recent runs went, to decide where its next run goes: a
//! callback seen to finish quickly runs on the runtime worker that read its request
//! (no hand-off to a thread, no wake-up); any other on the node's callback threads.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A run shorter than this counts as quick.
pub(super) const QUICK_RUN: Duration = Duration::from_micros(100);
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

    /// Notes a run that took `took` by the wall clock; `blocked`: it waited on daffi's
    /// sync API (a nested call), which must not hold a runtime worker. A run slow by
    /// the wall clock asks `descheduled` for a second opinion: whether its thread was
    /// only left waiting for a processor (a loaded machine), using less than
    /// `QUICK_RUN` and never blocking; such a run counts as quick. Returns whether this
    /// run ended a quick streak (the callback's next runs go to threads).
    pub(super) fn record(
        &self,
        took: Duration,
        blocked: bool,
        descheduled: impl FnOnce() -> bool,
    ) -> bool {
        if blocked || (took >= QUICK_RUN && !descheduled()) {
            return self.quick_streak.swap(0, Ordering::Relaxed) >= QUICK_STREAK;
        }
        // A load and a store, not a read-modify-write: a lost count between two threads
        // only delays the decision by a run.
        let streak = self.quick_streak.load(Ordering::Relaxed);
        if streak < QUICK_STREAK {
            self.quick_streak.store(streak + 1, Ordering::Relaxed);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_after_a_streak_and_slow_after_one_slow_run() {
        let pace = Pace::default();
        let quick = Duration::from_micros(5);
        let asked = std::cell::Cell::new(0);
        let ran = || {
            asked.set(asked.get() + 1);
            false
        };
        for _ in 0..QUICK_STREAK {
            assert!(!pace.is_quick());
            assert!(!pace.record(quick, false, ran));
        }
        assert!(pace.is_quick());
        assert_eq!(asked.get(), 0, "a quick run needs no second opinion");
        assert!(
            pace.record(Duration::from_millis(300), false, ran),
            "ends it"
        );
        assert!(!pace.is_quick(), "a slow run ends it");
        assert_eq!(asked.get(), 1);
        for _ in 0..QUICK_STREAK {
            pace.record(quick, false, ran);
        }
        assert!(pace.record(quick, true, ran));
        assert!(
            !pace.is_quick(),
            "a run that blocked on a nested call ends it"
        );
        assert!(!pace.record(quick, true, ran), "no streak left to end");
    }

    #[test]
    fn a_run_slow_only_because_its_thread_waited_for_a_processor_stays_quick() {
        let pace = Pace::default();
        for _ in 0..QUICK_STREAK {
            pace.record(Duration::from_micros(5), false, || false);
        }
        assert!(!pace.record(Duration::from_millis(3), false, || true));
        assert!(pace.is_quick(), "descheduled, not slow");
    }
}
