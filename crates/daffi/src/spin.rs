//! Spinning before parking: a thread blocked in a sync call that is its node's only
//! call in flight polls for the reply for a moment before it sleeps.
//!
//! A round trip between processes on one machine takes tens of microseconds. A thread
//! that parks at once is woken by the runtime worker that read the reply: one more
//! wake-up on the way back, and on a virtual machine waking an idle processor is slow.
//! A thread that keeps polling for a moment sees the reply as soon as the worker hands
//! it over. That costs processor time, so a node spins only where it pays:
//!
//! - for a lone call (nothing else of the node in flight): with many calls in flight
//!   the processors are better left to the work;
//! - while at least half of such waits lately ended within the spin limit (a moving
//!   average): a node whose callees take milliseconds never spins;
//! - one thread per two processors at most, and never on a single processor, where
//!   the spinner would hold up the thread it waits for;
//! - after a few turns, yielding its processor between looks, so that a thread woken
//!   onto it (the callee, the controller, the worker that reads the reply) runs at once.
//!
//! Over a plaintext socket the spinning thread also looks at the socket, and reads its
//! reply there itself (`transport::SharedReads`): the runtime is not woken for it.
//!
//! An awaited call spins the same way on a thread that runs no tasks
//! ([`AsyncSpin`]). The limit is
//! [`GlobalBuilder::sync_spin`](crate::GlobalBuilder::sync_spin); zero turns spinning
//! off.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::mesh::pending::OwnReply;

/// The default spin limit: about twice a small call's round trip on one machine, and
/// enough for a broadcast to a few nodes.
pub const DEFAULT_SYNC_SPIN: Duration = Duration::from_micros(200);

/// Turns of pure spinning (16 pause instructions each, well under a microsecond) before
/// a spinning thread yields its processor between looks.
const SPIN_TURNS: u32 = 16;

/// Threads spinning now, in every node of the process.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// Whether a node whose spin limit is `limit` ever spins: not with a zero limit, nor on
/// a single processor.
pub fn may_spin(limit: Duration) -> bool {
    !limit.is_zero() && most_spinning() > 0
}

/// At most this many threads of the process spin at once: one per two processors.
fn most_spinning() -> usize {
    static MOST: OnceLock<usize> = OnceLock::new();
    *MOST.get_or_init(|| std::thread::available_parallelism().map_or(0, |n| n.get() / 2))
}

/// [`SpinPolicy::within`] when every recent lone wait ended within the limit.
const ALL_WITHIN: u32 = 1 << 10;

/// A node's spin policy: its limit, and how many of its lone waits lately ended within
/// it.
#[derive(Debug)]
pub struct SpinPolicy {
    /// The longest spin; zero: never.
    limit: Duration,
    /// The share of the last lone waits that ended within the limit, from 0 to
    /// [`ALL_WITHIN`]: a moving average, 1/8 weight to the newest.
    within: AtomicU32,
}

impl SpinPolicy {
    /// Spins of at most `limit` (none if zero).
    pub fn new(limit: Duration) -> Self {
        SpinPolicy {
            limit,
            within: AtomicU32::new(ALL_WITHIN),
        }
    }

    /// How a thread should wait for a call while `others_in_flight` other calls of its
    /// node are in flight: `None` (park at once, not timed) unless it is the only one.
    /// A lone wait is timed, for the average, and spins first if that pays.
    pub fn plan(&self, others_in_flight: usize) -> Option<LoneWait<'_>> {
        if self.limit.is_zero() || others_in_flight > 0 {
            return None;
        }
        let started = Instant::now();
        let spinner = self.pays().then(Spinner::enter).flatten();
        // A span from `started`, not an instant: any limit the builder takes (up to
        // `Duration::MAX`) is one, where `started + limit` could overflow and panic.
        let spin_for = spinner.as_ref().map(|_| self.limit);
        Some(LoneWait {
            policy: self,
            started,
            spin_for,
            spinner,
            own_reply: None,
        })
    }

    /// Whether at least half of the lone waits lately ended within the limit (the
    /// median, not the mean: a few slow calls do not stop the spinning).
    fn pays(&self) -> bool {
        pays_at(self.within.load(Ordering::Relaxed))
    }

    /// Counts a lone wait that took `waited` into the average. Racing threads may lose
    /// an update: an estimate.
    fn record(&self, waited: Duration) {
        let hit = if waited <= self.limit {
            ALL_WITHIN / 8
        } else {
            0
        };
        let within = self.within.load(Ordering::Relaxed);
        let next = within - within / 8 + hit;
        self.within.store(next, Ordering::Relaxed);
        let spins = pays_at(next);
        if pays_at(within) != spins {
            let (ended, now) = if spins {
                ("within", "spin again")
            } else {
                ("past", "no longer spin")
            };
            tracing::debug!(
                limit = ?self.limit,
                spins,
                "lone sync calls lately ended {ended} the spin limit: their threads {now} before they park",
            );
        }
    }
}

/// Whether spinning pays with `within` of [`ALL_WITHIN`] lone waits lately ending within
/// the limit: at least half.
fn pays_at(within: u32) -> bool {
    within >= ALL_WITHIN / 2
}

/// One lone wait: timed for the average, and spinning for `spin_for` from its start if
/// it may.
#[derive(Debug)]
pub struct LoneWait<'a> {
    policy: &'a SpinPolicy,
    started: Instant,
    spin_for: Option<Duration>,
    spinner: Option<Spinner>,
    /// The call whose reply the spinning thread may read itself.
    own_reply: Option<OwnReply>,
}

impl LoneWait<'_> {
    /// While it spins, the thread also looks for the reply on the connection, and
    /// reads it itself if it is there (`reply`, made only if the wait spins): the
    /// runtime worker the reply wakes is then not on its way (see
    /// `transport::SharedReads`).
    pub fn reading(mut self, reply: impl FnOnce() -> Option<OwnReply>) -> Self {
        if self.spin_for.is_some() {
            self.own_reply = reply();
        }
        self
    }

    /// Spins until `ready` holds (`true`) or the spin is over (`false`; also when this
    /// wait may not spin). Once over, the thread no longer counts as spinning.
    pub fn spin_until(&mut self, ready: impl Fn() -> bool) -> bool {
        let Some(spin_for) = self.spin_for else {
            return false;
        };
        let mut turns = 0u32;
        loop {
            // The clock first: a `ready` that always holds still ends the spin.
            if self.started.elapsed() >= spin_for {
                // One last look: a thread kept off its processor past the limit (the
                // scheduler ran something else) often finds its reply there, and
                // parking would cost two wake-ups more (the runtime's, then its own).
                let found = self.looked(&ready);
                self.spin_for = None;
                self.spinner = None;
                // The runtime reads the reply again: this thread parks.
                self.own_reply = None;
                return found;
            }
            if self.looked(&ready) {
                return true;
            }
            // A few turns of pure spinning, then each turn offers the processor to
            // whatever else is ready to run on it (the thread that will answer, often):
            // a spinner never holds up runnable work for its whole spin.
            if turns < SPIN_TURNS {
                turns += 1;
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Whether the reply is in: `ready` holds, or the thread read it itself.
    fn looked(&self, ready: &impl Fn() -> bool) -> bool {
        ready() || self.own_reply.as_ref().is_some_and(OwnReply::read)
    }

    /// The wait is over: counts it into the average.
    pub fn finish(self) {
        self.policy.record(self.started.elapsed());
    }
}

/// How a future awaiting its node's only call spins for the reply, as a sync wait does,
/// on a thread that runs no tasks: outside any task, on a thread that polls the
/// future itself (the body of `#[tokio::main]` or another `block_on` on a
/// multi-threaded runtime, or a plain executor's), never inside a task (its worker
/// runs other tasks) nor where the thread drives a current-thread runtime (the reply
/// could not be read while it spins).
///
/// The first time the reply is not in, the future wakes itself and returns: futures
/// polled beside it (a `join!`) then send their calls, and the node's call is no longer
/// lone. The spin happens on the next poll, if the call is still lone and spinning pays
/// ([`SpinPolicy`]).
///
/// That is as much as a future can see of its thread: the spin does hold up what the
/// same thread polls around or beside this future and does not send a call
/// (a `tokio::time::timeout` or `select!` wrapping it, a `join!` sibling waiting on
/// something else, a `LocalSet`'s tasks when its `run_until` drives the future), for
/// up to the limit. The call's own deadline does end the spin.
#[derive(Debug, Default)]
pub struct AsyncSpin(AsyncStep);

#[derive(Debug, Default)]
enum AsyncStep {
    /// The call is sent; its reply was not yet looked for.
    #[default]
    Sent,
    /// The future woke itself, to spin at the next poll.
    Offered,
    /// A lone wait, begun then: timed into the average when the reply arrives.
    Timed(Instant),
    /// Nothing more to do.
    Over,
}

impl AsyncSpin {
    /// The reply is not in (its poll returned `Pending`, with `cx` registered). Spins
    /// for it if this wait may, planned by `plan` (the node's
    /// [`lone_wait`](crate::node::Node::lone_wait)); whether `ready` holds now (poll
    /// the reply again).
    pub fn wait<'a>(
        &mut self,
        cx: &std::task::Context<'_>,
        plan: impl Fn() -> Option<LoneWait<'a>>,
        ready: impl Fn() -> bool,
    ) -> bool {
        // The thread first, at every look (the future may have moved into a task or a
        // sync wait): a lone wait planned takes a spinner's place, if only for a
        // moment.
        let plan_here = || if may_spin_in_async() { plan() } else { None };
        match self.0 {
            AsyncStep::Sent => {
                // With other calls in flight (many awaited in turn), nothing changes.
                self.0 = match plan_here() {
                    Some(lone) if lone.spin_for.is_some() => {
                        cx.waker().wake_by_ref();
                        AsyncStep::Offered
                    }
                    // Timed all the same, as a sync wait that does not spin: quick
                    // replies bring the spinning back.
                    Some(lone) => AsyncStep::Timed(lone.started),
                    None => AsyncStep::Over,
                };
                false
            }
            AsyncStep::Offered => {
                let Some(mut lone) = plan_here() else {
                    self.0 = AsyncStep::Over;
                    return false;
                };
                let arrived = lone.spin_until(ready);
                self.0 = AsyncStep::Timed(lone.started);
                arrived
            }
            // Polled again before the wait is over (a broadcast's next reply, a wake-up
            // for something else): what is left of the limit, counted from the start.
            AsyncStep::Timed(began) => match plan_here() {
                Some(mut lone) => {
                    lone.started = began;
                    lone.spin_until(ready)
                }
                None => false,
            },
            AsyncStep::Over => false,
        }
    }

    /// The reply is in: a timed wait counts into `policy`'s average.
    pub fn arrived(&mut self, policy: &SpinPolicy) {
        if let AsyncStep::Timed(began) = std::mem::replace(&mut self.0, AsyncStep::Over) {
            // Collected by a sync wait (`get` of a result polled before): that wait
            // times it too, and counts it once.
            if !crate::blocking::in_sync_wait() {
                policy.record(began.elapsed());
            }
        }
    }

    /// The future was dropped before its reply came (a `select!`, a
    /// `tokio::time::timeout` around it). A timed wait that lasted past the limit
    /// counts as a wait past it, as a sync wait that times out does; a shorter one says
    /// nothing of how long the reply would have taken. Without this, callers that
    /// keep giving up on slow callees would spin for the whole limit every time.
    pub fn abandoned(&mut self, policy: &SpinPolicy) {
        if let AsyncStep::Timed(began) = std::mem::replace(&mut self.0, AsyncStep::Over) {
            let waited = began.elapsed();
            // Dropped inside a sync wait (`get_timeout`): that wait counts it.
            if waited > policy.limit && !crate::blocking::in_sync_wait() {
                policy.record(waited);
            }
        }
    }
}

/// Whether a future polled on this thread may spin for its reply (see [`AsyncSpin`]).
fn may_spin_in_async() -> bool {
    use tokio::runtime::{Handle, RuntimeFlavor};
    !crate::blocking::in_sync_wait()
        && tokio::task::try_id().is_none()
        && Handle::try_current()
            .map_or(true, |h| h.runtime_flavor() != RuntimeFlavor::CurrentThread)
}

/// A thread counted among those spinning, until dropped.
#[derive(Debug)]
struct Spinner;

impl Spinner {
    /// Counts this thread as spinning, if fewer than the most are.
    fn enter() -> Option<Spinner> {
        let most = most_spinning();
        SPINNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now < most).then_some(now + 1)
            })
            .ok()
            .map(|_| Spinner)
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        SPINNING.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_in_flight_or_a_zero_limit_never_spin() {
        let policy = SpinPolicy::new(DEFAULT_SYNC_SPIN);
        assert!(policy.plan(1).is_none());
        assert!(SpinPolicy::new(Duration::ZERO).plan(0).is_none());
    }

    #[test]
    fn slow_waits_stop_the_spinning_and_quick_ones_bring_it_back() {
        let policy = SpinPolicy::new(Duration::from_micros(200));
        for _ in 0..40 {
            policy.record(Duration::from_millis(5));
        }
        assert!(!policy.pays(), "waits of 5 ms do not spin");
        let mut wait = policy.plan(0).expect("a lone wait is timed");
        assert!(wait.spin_for.is_none() && wait.spinner.is_none());
        assert!(!wait.spin_until(|| true));
        wait.finish();
        for _ in 0..80 {
            policy.record(Duration::from_micros(50));
        }
        assert!(policy.pays(), "waits of 50 µs spin again");
    }

    #[test]
    fn a_spin_ends_at_its_limit_or_when_ready() {
        // Long enough that a test thread preempted on a loaded machine between `plan`
        // and `spin_until` (a scheduler slice: milliseconds) still finds its spin on.
        let policy = SpinPolicy::new(Duration::from_millis(20));
        let Some(mut wait) = policy.plan(0).filter(|w| w.spin_for.is_some()) else {
            eprintln!("a single processor (or other spinners): nothing spins here");
            return;
        };
        assert!(wait.spin_until(|| true));
        assert!(!wait.spin_until(|| false), "over at its limit");
        assert!(wait.spinner.is_none(), "no longer counted as spinning");
        assert!(!wait.spin_until(|| true), "a spin that is over stays over");
        wait.finish();
    }

    #[test]
    fn a_spin_kept_off_its_processor_past_its_limit_still_takes_its_reply() {
        let limit = Duration::from_millis(1);
        let policy = SpinPolicy::new(limit);
        let Some(mut wait) = policy.plan(0).filter(|w| w.spin_for.is_some()) else {
            eprintln!("a single processor (or other spinners): nothing spins here");
            return;
        };
        // As if the scheduler ran another thread for longer than the limit, while the
        // reply came in.
        while wait.started.elapsed() < limit {
            std::hint::spin_loop();
        }
        assert!(wait.spin_until(|| true), "the reply there is taken");
        assert!(wait.spinner.is_none(), "the spin is over all the same");
        assert!(!wait.spin_until(|| true), "and stays over");
        wait.finish();
    }

    #[test]
    fn the_longest_limit_spins_until_ready() {
        let policy = SpinPolicy::new(Duration::MAX);
        let Some(mut wait) = policy.plan(0).filter(|w| w.spin_for.is_some()) else {
            eprintln!("a single processor (or other spinners): nothing spins here");
            return;
        };
        assert!(wait.spin_until(|| true));
        wait.finish();
        assert!(policy.pays(), "every wait is within the longest limit");
    }
}
