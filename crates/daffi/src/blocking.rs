//! Waiting for a future from synchronous code without a runtime per call.
//!
//! The future is polled on the calling thread, which parks between wake-ups; timers and
//! sockets stay with the node's runtime (its handle is entered while polling). The
//! wait of a node's only call in flight may spin for a moment first (see `spin`). Inside a
//! multi-threaded runtime the wait is wrapped in `block_in_place`, so the runtime moves
//! its other tasks elsewhere. On a thread that drives a current-thread runtime, blocking
//! would stall that runtime, so the sync method returns [`Error::BlockingInAsync`].

use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use tokio::runtime::{Handle, RuntimeFlavor};

use crate::error::{Error, Result};
use crate::spin::LoneWait;

/// Runs `future` to completion on this thread. `method` names the sync API in the error.
// Inlined, like `park_lone`: a call's future is large, and passing it down by value would
// copy it at each step.
#[inline(always)]
pub fn wait<F: Future>(runtime: &Handle, method: &'static str, future: F) -> Result<F::Output> {
    wait_lone(runtime, method, future, None)
}

/// The error [`wait`] would give on this thread, for a sync method that found its
/// outcome without waiting: whether it may be called here does not depend on timing.
pub fn may_block(method: &'static str) -> Result<()> {
    runtime_here(method).map(drop)
}

/// Leave to wait on this thread, as [`wait`] checks it, for a sync method that checks
/// before it starts (so that it does not start what it may not wait for) and waits
/// later: one look at the thread's runtime per call.
pub struct MayWait {
    in_runtime: bool,
}

/// [`MayWait`] for this thread, or the error [`wait`] would give.
pub fn may_wait(method: &'static str) -> Result<MayWait> {
    Ok(MayWait {
        in_runtime: runtime_here(method)?.is_some(),
    })
}

impl MayWait {
    /// [`wait`], checked already.
    #[inline(always)]
    pub fn wait<F: Future>(self, runtime: &Handle, future: F) -> F::Output {
        self.wait_lone(runtime, future, None)
    }

    /// [`wait_lone`], checked already.
    #[inline(always)]
    pub fn wait_lone<F: Future>(
        self,
        runtime: &Handle,
        future: F,
        lone: Option<LoneWait<'_>>,
    ) -> F::Output {
        if self.in_runtime {
            BLOCKED.with(|b| b.set(true));
            tokio::task::block_in_place(|| park_lone_on(runtime, future, lone))
        } else {
            park_lone_on(runtime, future, lone)
        }
    }
}

/// The runtime this thread is in, if any; `BlockingInAsync` if it drives a
/// current-thread runtime, which blocking would stall.
fn runtime_here(method: &'static str) -> Result<Option<Handle>> {
    match Handle::try_current() {
        Ok(current) if current.runtime_flavor() == RuntimeFlavor::CurrentThread => {
            Err(Error::BlockingInAsync { method })
        }
        current => Ok(current.ok()),
    }
}

thread_local! {
    /// Set when this thread waited through [`wait`] inside a runtime: a sync callback
    /// that did is not run on a runtime worker again (see the executor's `Pace`).
    static BLOCKED: Cell<bool> = const { Cell::new(false) };
}

thread_local! {
    /// Set while this thread polls a future it waits for synchronously: the future
    /// does not spin itself (the wait does; see `spin::AsyncSpin`).
    static IN_SYNC_WAIT: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is polling a future it waits for synchronously ([`wait`]).
pub(crate) fn in_sync_wait() -> bool {
    IN_SYNC_WAIT.with(Cell::get)
}

/// Whether this thread waited through [`wait`] inside a runtime since the last call.
pub(crate) fn take_blocked() -> bool {
    BLOCKED.with(|b| b.replace(false))
}

/// Wakes a thread waiting in [`park`]: flags the wake-up (for a thread that spins) and
/// unparks it (for one that sleeps).
struct Unpark {
    thread: Thread,
    woken: AtomicBool,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// This thread's waker, and its wake-up flag.
struct ThreadWaker {
    unpark: Arc<Unpark>,
    waker: Waker,
}

thread_local! {
    /// The waker of this thread: a wake-up unparks it. Made once per thread rather than
    /// once per call (a stale wake-up from an earlier call only makes the loop below poll
    /// once more).
    static WAKER: ThreadWaker = {
        let unpark = Arc::new(Unpark {
            thread: std::thread::current(),
            woken: AtomicBool::new(false),
        });
        ThreadWaker {
            waker: Waker::from(unpark.clone()),
            unpark,
        }
    };
}

/// Like [`wait`], for the wait of a call that may spin before it parks ([`LoneWait`]).
#[inline(always)]
pub fn wait_lone<F: Future>(
    runtime: &Handle,
    method: &'static str,
    future: F,
    lone: Option<LoneWait<'_>>,
) -> Result<F::Output> {
    match runtime_here(method)? {
        Some(_) => {
            BLOCKED.with(|b| b.set(true));
            Ok(tokio::task::block_in_place(|| {
                park_lone_on(runtime, future, lone)
            }))
        }
        None => Ok(park_lone_on(runtime, future, lone)),
    }
}

#[inline(always)]
fn park_lone_on<F: Future>(runtime: &Handle, future: F, lone: Option<LoneWait<'_>>) -> F::Output {
    // Requests this thread held go before it waits (see `mesh::held`).
    crate::mesh::held::flush();
    let _context = runtime.enter();
    park_lone(future, lone)
}

/// Polls `future` on this thread, parking it between wake-ups. For futures that need no
/// runtime context (or whose caller entered one).
pub(crate) fn park<F: Future>(future: F) -> F::Output {
    park_lone(future, None)
}

/// [`park`], spinning first for a lone wait that may: the thread polls the flag its
/// waker sets instead of sleeping, until the spin is over.
#[inline(always)]
fn park_lone<F: Future>(future: F, mut lone: Option<LoneWait<'_>>) -> F::Output {
    /// Puts back what [`IN_SYNC_WAIT`] was (a sync wait may run inside another's poll).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_SYNC_WAIT.with(|on| on.set(self.0));
        }
    }
    let _restore = Restore(IN_SYNC_WAIT.with(|on| on.replace(true)));
    let mut future = pin!(future);
    WAKER.with(|this| {
        let mut cx = Context::from_waker(&this.waker);
        loop {
            // Cleared before polling: a wake-up from now on is seen by the spin below.
            this.unpark.woken.store(false, Ordering::Relaxed);
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                if let Some(lone) = lone {
                    lone.finish();
                }
                return out;
            }
            let woken = || this.unpark.woken.load(Ordering::Acquire);
            if !lone.as_mut().is_some_and(|lone| lone.spin_until(woken)) {
                std::thread::park();
            }
        }
    })
}
