//! What another thread of this process is doing, as Linux tells it: the processor time
//! it used so far, and whether it is blocked (asleep, not waiting for a processor). The
//! node's watch uses them to tell a runtime worker that the OS descheduled (a loaded
//! machine: runnable, its processor time standing still) from one held by a callback
//! that turned slow (running, or blocked): only the second is worth handing work to
//! threads for. The calling thread's own [`Usage`] gives a callback slow by the wall
//! clock a second opinion the same way.

use std::time::Duration;

/// A thread, by the kernel's id.
pub(super) type ThreadId = i32;

/// What a look at a thread saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    /// Processor time it used so far, in µs.
    pub cpu_us: u64,
    /// It is blocked: asleep (in a system call, a lock, a sleep), not running or waiting
    /// for a processor.
    pub blocked: bool,
}

/// What the calling thread had used so far: processor time, and the times it blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    /// Processor time, in µs.
    pub cpu_us: u64,
    /// Voluntary context switches: the times it blocked (asleep in a system call, a
    /// lock, a sleep). Time it lost to other threads (preempted, waiting for a
    /// processor) does not count.
    pub blocked: u64,
}

impl Usage {
    /// Whether, from `self` to `later` (of the same thread), it used less than `limit`
    /// of processor time and never blocked: work in between took less than `limit`, for
    /// however long the OS left it waiting for a processor.
    pub fn ran_under(self, later: Usage, limit: Duration) -> bool {
        later.blocked == self.blocked
            && later.cpu_us.saturating_sub(self.cpu_us) < limit.as_micros() as u64
    }
}

/// The calling thread's usage so far (two system calls: `getrusage`'s processor time
/// lags by up to a scheduler tick, its thread CPU clock does not); `None` where the
/// kernel does not say.
#[cfg(target_os = "linux")]
pub(super) fn usage() -> Option<Usage> {
    // SAFETY: `rusage` is plain data, valid when zeroed.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to write.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return None;
    }
    Some(Usage {
        cpu_us: clock_us(libc::CLOCK_THREAD_CPUTIME_ID)?,
        blocked: u64::try_from(ru.ru_nvcsw).ok()?,
    })
}

/// Elsewhere not known.
#[cfg(not(target_os = "linux"))]
pub(super) fn usage() -> Option<Usage> {
    None
}

/// The kernel's id of the calling thread (read once per thread).
#[cfg(target_os = "linux")]
pub(super) fn current() -> ThreadId {
    thread_local! {
        // SAFETY: `gettid` has no preconditions and cannot fail.
        static ID: ThreadId = unsafe { libc::gettid() };
    }
    ID.with(|id| *id)
}

/// Elsewhere threads are not looked at: 0 stands for every thread.
#[cfg(not(target_os = "linux"))]
pub(super) fn current() -> ThreadId {
    0
}

/// Looks at `thread` (of this process); `None` where the kernel does not say (no
/// `/proc`, a thread that ended).
#[cfg(target_os = "linux")]
pub(super) fn look(thread: ThreadId) -> Option<Seen> {
    Some(Seen {
        cpu_us: cpu_us(thread)?,
        blocked: blocked(thread)?,
    })
}

/// Elsewhere not known.
#[cfg(not(target_os = "linux"))]
pub(super) fn look(_thread: ThreadId) -> Option<Seen> {
    None
}

/// The processor time `thread` used, from its CPU clock (up to date even while it
/// runs, unlike `/proc`'s figures).
#[cfg(target_os = "linux")]
fn cpu_us(thread: ThreadId) -> Option<u64> {
    // The kernel's clock id of a thread's CPU time (`MAKE_THREAD_CPUCLOCK(tid,
    // CPUCLOCK_SCHED)`, what glibc's `pthread_getcpuclockid` returns).
    clock_us((!thread << 3) | 6)
}

/// The time of `clock`, in µs.
#[cfg(target_os = "linux")]
fn clock_us(clock: libc::clockid_t) -> Option<u64> {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec to write; an unknown clock fails with EINVAL.
    if unsafe { libc::clock_gettime(clock, &mut time) } != 0 {
        return None;
    }
    let seconds = u64::try_from(time.tv_sec).ok()?;
    let nanos = u64::try_from(time.tv_nsec).ok()?;
    Some(seconds * 1_000_000 + nanos / 1_000)
}

/// Whether `thread` is asleep (`S`) or in an uninterruptible wait (`D`), from its
/// `/proc` status: its state follows the command name, which ends with the last `)`.
#[cfg(target_os = "linux")]
fn blocked(thread: ThreadId) -> Option<bool> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{thread}/stat")).ok()?;
    let state = stat.rsplit(')').next()?.split_ascii_whitespace().next()?;
    Some(matches!(state, "S" | "D"))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_running_thread_uses_time_and_a_sleeping_one_is_blocked() {
        let me = current();
        let before = look(me).expect("a look at this thread");
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(5) {
            std::hint::spin_loop();
        }
        let after = look(me).expect("a look again");
        assert!(!after.blocked, "this thread runs");
        assert!(after.cpu_us > before.cpu_us, "{after:?} after {before:?}");

        let (tell, told) = mpsc::channel();
        let (done, finish) = mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            tell.send(current()).expect("tell");
            // Blocked until the test ends it.
            let _ = finish.recv();
        });
        let id = told.recv().expect("its id");
        let blocked = (0..1_000).any(|_| {
            std::thread::sleep(Duration::from_millis(1));
            look(id).is_some_and(|seen| seen.blocked)
        });
        drop(done);
        sleeper.join().expect("the sleeper");
        assert!(blocked, "a thread waiting on a channel is seen blocked");
        assert_eq!(look(-1), None, "no such thread");
    }

    #[test]
    fn usage_counts_processor_time_and_blocking() {
        let before = usage().expect("this thread's usage");
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(5) {
            std::hint::spin_loop();
        }
        let spun = usage().expect("again");
        assert!(spun.cpu_us > before.cpu_us, "{spun:?} after {before:?}");
        std::thread::sleep(Duration::from_millis(1));
        let slept = usage().expect("after a sleep");
        assert!(slept.blocked > spun.blocked, "{slept:?} after {spun:?}");
        let limit = Duration::from_micros(100);
        assert!(!spun.ran_under(slept, limit), "it blocked");
    }

    #[test]
    fn ran_under_needs_little_processor_time_and_no_blocking() {
        let at = |cpu_us, blocked| Usage { cpu_us, blocked };
        let limit = Duration::from_micros(100);
        assert!(at(1_000, 3).ran_under(at(1_040, 3), limit), "descheduled");
        assert!(
            !at(1_000, 3).ran_under(at(1_100, 3), limit),
            "ran its limit"
        );
        assert!(!at(1_000, 3).ran_under(at(1_001, 4), limit), "blocked");
    }
}
