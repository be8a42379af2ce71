//! Running the callbacks other nodes ask for: sync ones on the blocking pool, async ones
//! as tasks, many at once. A panic becomes an error reply; the node keeps serving.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::NodeCore;
use crate::callback::{CallbackFailure, Handler, Outcome};
use crate::protocol::frame::{Frame, Header, Kind, FLAG_ERROR, FLAG_NO_REPLY};
use crate::protocol::io::Outgoing;
use crate::protocol::message::{self, RemoteError, RemoteErrorKind};

/// Starts serving a request frame. Never blocks the reader.
pub fn serve(core: &Arc<NodeCore>, frame: Frame) {
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
    let Some(running) = core.admit_callback() else {
        let message = format!(
            "process `{}` runs as many callbacks as it allows",
            core.name
        );
        refuse(
            core,
            &frame,
            wants_reply,
            RemoteErrorKind::Overloaded,
            message,
        );
        return;
    };
    // The caller's timeout travels with the request: work that would start after the
    // caller gave up is skipped.
    let deadline = (frame.timeout_ms() > 0)
        .then(|| Instant::now() + Duration::from_millis(u64::from(frame.timeout_ms())));
    let core = core.clone();
    let payload = frame.payload();
    match handler {
        Handler::Sync(f) => {
            tokio::task::spawn_blocking(move || {
                let _running = running;
                if too_late(&frame, deadline) {
                    return;
                }
                let outcome = catch_unwind(AssertUnwindSafe(|| f(payload)))
                    .unwrap_or_else(|panic| Err(panic_failure(panic)));
                if let Some((reply, queue)) = finish(&core, &frame, wants_reply, outcome) {
                    let _ = queue.blocking_send(reply);
                }
            });
        }
        Handler::Async(f) => {
            tokio::spawn(async move {
                let _running = running;
                if too_late(&frame, deadline) {
                    return;
                }
                let outcome = CatchUnwind(f(payload)).await;
                if let Some((reply, queue)) = finish(&core, &frame, wants_reply, outcome) {
                    let _ = queue.send(reply).await;
                }
            });
        }
    }
}

/// Whether the caller has given up on `frame` already (it then gets `Timeout` itself).
fn too_late(frame: &Frame, deadline: Option<Instant>) -> bool {
    let late = deadline.is_some_and(|d| Instant::now() >= d);
    if late {
        tracing::debug!(
            callback = frame.name(),
            caller = frame.src(),
            "skipped a call whose caller already timed out"
        );
    }
    late
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

/// The reply to send and the queue to send it on, if the caller wants one and the node
/// is connected.
fn finish(
    core: &NodeCore,
    frame: &Frame,
    wants_reply: bool,
    outcome: Outcome,
) -> Option<(Outgoing, tokio::sync::mpsc::Sender<Outgoing>)> {
    if !wants_reply {
        if let Err(f) = &outcome {
            tracing::warn!(callback = frame.name(), caller = frame.src(), error = %f.message, "no-return callback failed");
        }
        return None;
    }
    let reply = encode_reply(core, frame, outcome);
    match core.queue() {
        Some(queue) => Some((reply, queue)),
        None => {
            tracing::debug!(callback = frame.name(), "reply dropped: not connected");
            None
        }
    }
}

fn encode_reply(core: &NodeCore, request: &Frame, outcome: Outcome) -> Outgoing {
    let (flags, body) = match outcome {
        Ok(value) => (0, value),
        Err(failure) => (
            FLAG_ERROR,
            message::encode(&RemoteError {
                kind: failure.kind,
                message: failure.message,
            }),
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
    Outgoing {
        head: header.encode(body.len()),
        body,
    }
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
