//! A shard stays awake a moment after it forwarded the last reply of the calls it had
//! in flight, rather than going to sleep at once.
//!
//! A caller that makes one call after another sends its next request a few
//! microseconds after it read the last reply. A shard asleep by then is woken by that
//! request, and on a machine whose idle processors halt (as virtual machines often do)
//! waking it costs an interrupt to the other processor and its return from halt: the
//! largest part of what a round trip through the controller costs over a bare relay (see
//! BENCHMARKS.md, "A controller thread lingers after a reply"). So once a reply leaves
//! and no call is left waiting for one, the shard keeps polling its sockets for up to
//! [`ControllerConfig::linger`](super::ControllerConfig::linger), yielding its processor
//! between looks. Once a yield ran another thread, it stops: that thread (often the
//! very caller it waits for, spinning for its own reply) needs the processor, and the
//! two would only take turns with it.
//!
//! It never lingers while calls it forwarded are running: their callees need the
//! processors, and their replies wake the shard anyway. How many are running is counted
//! from the frames it forwards (requests that want a reply in, replies out); a count
//! that lost a reply (a callee gone mid-call) is forgotten after [`FORGET_AFTER`]
//! without a frame.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A yield of the processor that took this long ran another thread meanwhile (a
/// yield alone takes about a microsecond).
const GAVE_WAY: Duration = Duration::from_micros(4);

/// How long without a frame before the count of calls in flight starts over at zero.
const FORGET_AFTER: Duration = Duration::from_millis(50);

thread_local! {
    /// The lingering of the shard this thread runs, if it lingers at all.
    static SHARD: RefCell<Option<Rc<Linger>>> = const { RefCell::new(None) };
}

/// One shard's lingering.
pub struct Linger {
    limit: Duration,
    /// Calls forwarded here that want a reply not forwarded yet.
    in_flight: Cell<u64>,
    /// When the last counted frame was forwarded.
    last_frame: Cell<Instant>,
    /// Until when the shard stays awake; `None` while it may sleep.
    until: Cell<Option<Instant>>,
    start: Notify,
}

impl Linger {
    /// Sets up lingering for up to `limit` on this thread (a shard's), and returns the
    /// task that does it, to be run on this thread's runtime. `None` if `limit` is zero.
    pub fn here(limit: Duration) -> Option<impl std::future::Future<Output = ()>> {
        if limit.is_zero() {
            return None;
        }
        let linger = Rc::new(Linger::new(limit));
        SHARD.with(|s| *s.borrow_mut() = Some(linger.clone()));
        Some(linger.keep_polling())
    }

    /// A shard's lingering of up to `limit`, with no call in flight.
    fn new(limit: Duration) -> Linger {
        Linger {
            limit,
            in_flight: Cell::new(0),
            last_frame: Cell::new(Instant::now()),
            until: Cell::new(None),
            start: Notify::new(),
        }
    }

    /// Polls (through the runtime's zero-timeout look at its sockets, which a yielding
    /// task causes) while `until` lies ahead.
    async fn keep_polling(self: Rc<Self>) {
        loop {
            self.start.notified().await;
            while let Some(until) = self.until.get() {
                if Instant::now() >= until {
                    self.until.set(None);
                    break;
                }
                tokio::task::yield_now().await;
                // Whatever else is runnable on this processor goes first, and once
                // something did, this thread stops: it would only take turns with it.
                let yielded = Instant::now();
                std::thread::yield_now();
                if yielded.elapsed() >= GAVE_WAY {
                    self.until.set(None);
                    break;
                }
            }
        }
    }

    /// `calls` requests that want a reply were forwarded at `now`.
    fn calls_at(&self, calls: u64, now: Instant) {
        self.counted(now);
        self.in_flight
            .set(self.in_flight.get().saturating_add(calls));
        self.until.set(None);
    }

    /// `replies` replies were forwarded at `now`: lingers if no call is left waiting.
    fn replies_at(&self, replies: u64, now: Instant) {
        self.counted(now);
        let left = self.in_flight.get().saturating_sub(replies);
        self.in_flight.set(left);
        if left == 0 && self.until.replace(Some(now + self.limit)).is_none() {
            self.start.notify_one();
        }
    }

    fn counted(&self, now: Instant) {
        if now.saturating_duration_since(self.last_frame.get()) > FORGET_AFTER {
            self.in_flight.set(0);
        }
        self.last_frame.set(now);
    }
}

/// `calls` requests that want a reply were forwarded from this thread: no lingering
/// while they run.
pub fn calls_forwarded(calls: u64) {
    on_this_shard(|linger, now| linger.calls_at(calls, now));
}

/// `replies` replies were forwarded from this thread: if no call is left waiting for
/// one, linger.
pub fn replies_forwarded(replies: u64) {
    on_this_shard(|linger, now| linger.replies_at(replies, now));
}

/// Runs `counted` with this thread's lingering, if its shard lingers at all.
fn on_this_shard(counted: impl FnOnce(&Linger, Instant)) {
    SHARD.with(|s| {
        if let Some(linger) = &*s.borrow() {
            counted(linger, Instant::now());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linger() -> Linger {
        Linger::new(Duration::from_micros(20))
    }

    #[test]
    fn lingers_once_the_last_reply_of_the_calls_in_flight_left() {
        let l = linger();
        let t = Instant::now();
        l.calls_at(2, t);
        assert_eq!(l.until.get(), None);
        l.replies_at(1, t);
        assert_eq!(l.until.get(), None, "one call still runs");
        l.replies_at(1, t);
        assert_eq!(l.until.get(), Some(t + l.limit));
    }

    #[test]
    fn a_request_forwarded_ends_the_lingering() {
        let l = linger();
        let t = Instant::now();
        l.calls_at(1, t);
        l.replies_at(1, t);
        assert!(l.until.get().is_some());
        l.calls_at(1, t);
        assert_eq!(l.until.get(), None);
    }

    #[test]
    fn a_batch_of_replies_counts_each() {
        let l = linger();
        let t = Instant::now();
        l.calls_at(8, t);
        l.replies_at(7, t);
        assert_eq!(l.until.get(), None);
        l.replies_at(1, t);
        assert!(l.until.get().is_some());
    }

    #[test]
    fn a_lost_reply_is_forgotten_after_a_quiet_spell() {
        let l = linger();
        let t = Instant::now();
        l.calls_at(2, t);
        l.replies_at(1, t); // the other callee died mid-call: its reply never comes
        assert_eq!(l.until.get(), None);
        let later = t + FORGET_AFTER + Duration::from_millis(1);
        l.calls_at(1, later);
        l.replies_at(1, later);
        assert_eq!(l.until.get(), Some(later + l.limit));
    }

    #[test]
    fn more_replies_than_calls_count_from_zero() {
        let l = linger();
        let t = Instant::now();
        l.replies_at(3, t);
        assert!(l.until.get().is_some());
        l.calls_at(1, t);
        l.replies_at(1, t);
        assert!(l.until.get().is_some());
    }
}
