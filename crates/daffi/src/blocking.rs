//! Waiting for a future from synchronous code without a runtime per call.
//!
//! The future is polled on the calling thread, which parks between wake-ups; timers and
//! sockets stay with the node's runtime (its handle is entered while polling). Inside a
//! multi-threaded runtime the wait is wrapped in `block_in_place`, so the runtime moves
//! its other tasks elsewhere. On a thread that drives a current-thread runtime, blocking
//! would stall that runtime, so the sync method returns [`Error::BlockingInAsync`].

use std::cell::Cell;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use tokio::runtime::{Handle, RuntimeFlavor};

use crate::error::{Error, Result};

/// Runs `future` to completion on this thread. `method` names the sync API in the error.
// Inlined, like `park_on`: a call's future is large, and passing it down by value would
// copy it at each step.
#[inline(always)]
pub fn wait<F: Future>(runtime: &Handle, method: &'static str, future: F) -> Result<F::Output> {
    match runtime_here(method)? {
        Some(_) => {
            BLOCKED.with(|b| b.set(true));
            Ok(tokio::task::block_in_place(|| park_on(runtime, future)))
        }
        None => Ok(park_on(runtime, future)),
    }
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
        if self.in_runtime {
            BLOCKED.with(|b| b.set(true));
            tokio::task::block_in_place(|| park_on(runtime, future))
        } else {
            park_on(runtime, future)
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

/// Whether this thread waited through [`wait`] inside a runtime since the last call.
pub(crate) fn take_blocked() -> bool {
    BLOCKED.with(|b| b.replace(false))
}

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    /// The waker of this thread: a wake-up unparks it. Made once per thread rather than
    /// once per call (a stale wake-up from an earlier call only makes the loop below poll
    /// once more).
    static WAKER: Waker = Waker::from(Arc::new(Unpark(std::thread::current())));
}

#[inline(always)]
fn park_on<F: Future>(runtime: &Handle, future: F) -> F::Output {
    let _context = runtime.enter();
    park(future)
}

/// Polls `future` on this thread, parking it between wake-ups. For futures that need no
/// runtime context (or whose caller entered one).
pub(crate) fn park<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    WAKER.with(|waker| {
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park();
        }
    })
}
