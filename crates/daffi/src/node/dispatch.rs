//! Running the callbacks other nodes ask for: a request is checked (known callback,
//! room, caller still waiting), then run, async ones as tasks and sync ones through the
//! node's [`SyncRunner`](super::sync_runner::SyncRunner); the outcome becomes the reply.
//! A panic becomes an error reply; the node keeps serving.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::sync_runner::SyncRunner;
use super::{CallbackKind, NodeCore, ServingGuard};
use crate::callback::{CallbackFailure, Handler, Outcome};
use crate::protocol::message::{self, RemoteError, RemoteErrorKind};
use daffi_wire::frame::{FLAG_ERROR, FLAG_NO_REPLY};
use daffi_wire::{Frame, FrameSender, Header, Kind, Outgoing};

/// NO_RETURN requests have their own allowance of callbacks waiting or running: this
/// many times `max_concurrent_callbacks` (async) or `max_sync_callbacks` (sync). Their
/// callers cannot be told "overloaded", so a burst of them is queued rather than
/// dropped, and it does not crowd out calls that want a reply. Beyond it they are
/// dropped, and logged.
pub const NO_RETURN_BACKLOG_FACTOR: usize = 64;

/// Sync callbacks a reader took from one read, handed to the runner together: a burst of
/// requests costs the runner's threads one wake-up, not one each.
#[derive(Default)]
pub struct SyncBatch(Vec<SyncJob>);

impl SyncBatch {
    /// Hands the jobs to the runner. Call it before the reader waits for more bytes.
    pub fn submit(&mut self, core: &Arc<NodeCore>) {
        if !self.0.is_empty() {
            SyncRunner::submit(core, &mut self.0);
        }
    }
}

/// Starts serving a request frame. Never blocks the reader. A sync callback joins
/// `batch`, which the reader submits before it waits for more bytes.
pub fn serve(core: &Arc<NodeCore>, frame: Frame, batch: &mut SyncBatch) {
    let wants_reply = frame.flags() & FLAG_NO_REPLY == 0;
    let Some(handler) = core.handler(frame.name()) else {
        let message = format!("process `{}` does not serve `{}`", core.name, frame.name());
        refuse(
            core,
            &frame,
            wants_reply,
            RemoteErrorKind::NotFound,
            message,
        );
        return;
    };
    let kind = CallbackKind {
        sync: matches!(handler, Handler::Sync(_)),
        one_way: !wants_reply,
    };
    let Some(running) = admit(core, kind) else {
        let limit = core.config.callback_limit(kind);
        if wants_reply {
            let message = if kind.sync {
                format!(
                    "process `{}` runs as many sync callbacks as it allows (max_sync_callbacks = {limit})",
                    core.name
                )
            } else {
                format!(
                    "process `{}` runs as many async callbacks as it allows (max_concurrent_callbacks = {limit})",
                    core.name
                )
            };
            refuse(
                core,
                &frame,
                wants_reply,
                RemoteErrorKind::Overloaded,
                message,
            );
        } else {
            core.sync_runner
                .note_dropped(&core.name, frame.name(), limit);
        }
        return;
    };
    // The caller's timeout travels with the request: work that would start after the
    // caller gave up is skipped.
    let deadline = (frame.timeout_ms() > 0)
        .then(|| Instant::now() + Duration::from_millis(u64::from(frame.timeout_ms())));
    match handler {
        Handler::Sync(f) => batch.0.push(SyncJob {
            f,
            frame,
            wants_reply,
            deadline,
            _running: running,
        }),
        Handler::Async(f) => {
            let core = core.clone();
            let payload = frame.payload();
            tokio::spawn(async move {
                let _running = running;
                if too_late(&frame, deadline) {
                    return;
                }
                let outcome = CatchUnwind(f(payload)).await;
                if let Some((reply, queue)) = finish(&core, &frame, wants_reply, outcome, false) {
                    let _ = queue.send(reply).await;
                }
            });
        }
    }
}

/// Counts a callback of `kind` as running, if its limit allows. Queued sync calls whose
/// callers already gave up hold places for nothing: when sync callbacks are at their
/// limit, those are dropped first, and the place looked for again.
fn admit(core: &Arc<NodeCore>, kind: CallbackKind) -> Option<ServingGuard> {
    core.admit_callback(kind).or_else(|| {
        (kind.sync && core.sync_runner.drop_expired() > 0)
            .then(|| core.admit_callback(kind))
            .flatten()
    })
}

/// Whether the caller has given up on `frame` already (it then gets `Timeout` itself).
fn too_late(frame: &Frame, deadline: Option<Instant>) -> bool {
    let late = deadline.is_some_and(|d| Instant::now() >= d);
    if late {
        note_skipped(frame);
    }
    late
}

fn note_skipped(frame: &Frame) {
    tracing::debug!(
        callback = frame.name(),
        caller = frame.src(),
        "skipped a call whose caller already timed out"
    );
}

/// Answers a request that will not run, if its caller wants an answer.
fn refuse(
    core: &Arc<NodeCore>,
    frame: &Frame,
    wants_reply: bool,
    kind: RemoteErrorKind,
    message: String,
) {
    if wants_reply {
        let reply = encode_reply(core, frame, Err(CallbackFailure { kind, message }));
        let core = core.clone();
        tokio::spawn(async move { core.send_quietly(reply).await });
    }
}

/// One sync callback to run.
pub(super) struct SyncJob {
    f: Arc<dyn Fn(bytes::Bytes) -> Outcome + Send + Sync>,
    frame: Frame,
    wants_reply: bool,
    /// When the caller gives up, if it said.
    deadline: Option<Instant>,
    /// Counts the callback as running until its reply is queued.
    _running: ServingGuard,
}

impl SyncJob {
    /// Whether its caller has given up by `now`.
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Answers that the node is overloaded (no thread could take the job).
    pub(super) fn overloaded(&self, core: &Arc<NodeCore>, message: String) {
        let kind = RemoteErrorKind::Overloaded;
        refuse(core, &self.frame, self.wants_reply, kind, message);
    }

    /// Logs that the job is dropped because its caller gave up.
    pub(super) fn note_skipped(&self) {
        note_skipped(&self.frame);
    }

    pub(super) fn run(self, core: &NodeCore) {
        if too_late(&self.frame, self.deadline) {
            return;
        }
        let f = &self.f;
        let payload = self.frame.payload();
        let outcome =
            catch_unwind(AssertUnwindSafe(|| f(payload))).unwrap_or_else(|p| Err(panic_failure(p)));
        // More jobs queued: their replies follow at once, and leave with this one.
        let more_follow = core.sync_runner.queued() > 0;
        if let Some((reply, queue)) =
            finish(core, &self.frame, self.wants_reply, outcome, more_follow)
        {
            // The queue is full: wait for room on this thread (not a runtime's).
            let _ = crate::blocking::park(queue.send(reply));
        }
    }
}

/// Queues the reply, if the caller wants one and the node is connected. If the queue is
/// full, returns the reply and the queue, to wait for room outside the lock.
fn finish(
    core: &NodeCore,
    frame: &Frame,
    wants_reply: bool,
    outcome: Outcome,
    more_follow: bool,
) -> Option<(Outgoing, FrameSender)> {
    if !wants_reply {
        if let Err(f) = &outcome {
            tracing::warn!(callback = frame.name(), caller = frame.src(), error = %f.message, "no-return callback failed");
        }
        return None;
    }
    let reply = encode_reply(core, frame, outcome);
    core.push_reply(reply, frame.name(), more_follow)
}

fn encode_reply(core: &NodeCore, request: &Frame, outcome: Outcome) -> Outgoing {
    let (flags, body) = match outcome {
        Ok(value) => (0, value),
        Err(failure) => (
            FLAG_ERROR,
            message::encode(&RemoteError {
                kind: failure.kind,
                message: failure.message,
            })
            .into(),
        ),
    };
    let header = Header {
        kind: Kind::Reply,
        flags,
        call_id: request.call_id(),
        timeout_ms: 0,
        src: &core.name,
        dst: request.src(),
        name: "",
    };
    Outgoing::new(&header, body)
}

fn panic_failure(panic: Box<dyn std::any::Any + Send>) -> CallbackFailure {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string());
    CallbackFailure::panicked(message)
}

/// Polls a future, turning a panic into a failure.
struct CatchUnwind<F>(F);

impl<F: Future<Output = Outcome> + Unpin> Future for CatchUnwind<F> {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let inner = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *inner).poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(panic_failure(panic))),
        }
    }
}
