//! Requests a thread holds while it collects results already in: written together when
//! it next waits.
//!
//! A loop that keeps many BG calls in flight collects a result, makes a new call,
//! collects the next... With the replies arriving in batches, most results are in when
//! it collects them, and each new request would otherwise wake the connection's writer
//! task, which writes the few queued by then: many small writes, each read and
//! forwarded alone by the controller and the callee. Instead, such a thread holds its
//! requests ([`FrameSender::push_held`]) and writes them itself, in one write call, when
//! a result is not in yet and it is about to wait, as a client that reads every reply at
//! hand before it writes does. A thread that goes off to other work instead delays its
//! held requests by at most [`daffi_wire::channel::HOLD_AT_MOST`]: the writer task
//! sends them then.
//!
//! Only a thread outside any task holds (the user's own thread, or the main future of
//! the user's runtime), only a BG call's request, and only while many calls are in
//! flight on the connection.

use std::cell::RefCell;

use daffi_wire::{FrameSender, HeldFrames};

thread_local! {
    static THREAD: RefCell<Holding> = RefCell::default();
}

#[derive(Default)]
struct Holding {
    /// A result was taken since this thread last began to wait: it collects results,
    /// and more of them are likely in (they come in batches).
    collecting: bool,
    /// The connection this thread holds requests on.
    held: Option<HeldFrames>,
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            held.flush();
        }
    }
}

/// A result was taken on this thread: the requests it makes next may be held, until it
/// waits again. (Taken after a wait counts too: replies arrive in batches, so the
/// results after it are likely in.) Nothing inside a task, whose worker other tasks
/// share.
pub fn collected() {
    if tokio::task::try_id().is_some() {
        return;
    }
    let _ = THREAD.try_with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            t.collecting = true;
        }
    });
}

/// Whether a BG request made now on this thread may be held.
pub fn may_hold() -> bool {
    // A task on the thread of a current-thread runtime's main future holds nothing.
    tokio::task::try_id().is_none()
        && THREAD
            .try_with(|t| t.try_borrow().is_ok_and(|t| t.collecting))
            .unwrap_or(false)
}

/// Records that this thread held a request on `sender`'s connection: flushed when it
/// next waits. Requests held on another connection are flushed now.
pub fn held_on(sender: &FrameSender) {
    let earlier = THREAD.try_with(|t| {
        let mut t = t.try_borrow_mut().ok()?;
        match &t.held {
            Some(held) if held.are_for(sender) => None,
            _ => t.held.replace(sender.held_frames()),
        }
    });
    if let Ok(Some(earlier)) = earlier {
        earlier.flush();
    }
}

/// This thread is about to wait: what it holds is written now.
pub fn flush() {
    let held = THREAD.try_with(|t| {
        let mut t = t.try_borrow_mut().ok()?;
        t.collecting = false;
        t.held.take()
    });
    if let Ok(Some(held)) = held {
        held.flush();
    }
}
