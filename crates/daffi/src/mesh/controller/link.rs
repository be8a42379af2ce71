//! The node's connection to the controller: handshake, then dispatching incoming frames.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use super::incoming::{FrameBatch, FrameRequest};
use super::streams::Addressed;
use super::{Connection, ControllerMesh, Route};
use crate::error::Error;
use crate::executor::{self, SyncBatch};
use crate::mesh::pending::Delivery;
use crate::mesh::pending::{Completion, Pending};
use crate::mesh::{
    batch_calls, batch_replies, batch_requests, remote_failure, Arrived, Grant, ReplyPayload,
};
use crate::protocol;
use crate::protocol::message::{
    self, ControlError, ControlErrorCode, Hello, RefuseCode, Refused, ScheduleEvent, Undeliverable,
    UndeliverableCode, View, Welcome,
};
use crate::transport::{self, BoxRead, ConnectError, Halves, SharedReads};
use daffi_wire::channel::CloseReason;
use daffi_wire::connection::DRAIN_TIMEOUT;
use daffi_wire::frame::{
    FLAG_ARGUMENTS, FLAG_BATCH, FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY_BATCH, FLAG_REQUEST_BATCH,
};
use daffi_wire::reader::KEEP_LARGE_BUFFERS;
use daffi_wire::{
    frame_channel, read_frames, Ended, Frame, FrameHandler, FrameReader, FrameSender, Handled,
    Kind, QueueLimits, ReadError, WriterTask,
};

/// An established connection.
pub struct Link {
    reader: FrameReader<BoxRead>,
    /// The reader's reads, as a thread waiting for its reply may share them (plaintext
    /// sockets only).
    pub shared_reads: Option<Arc<SharedReads>>,
    pub queue: FrameSender,
    writer: WriterTask,
    pub welcome: Welcome,
    /// The controller runs in this process, and stops as soon as this link is done: a
    /// graceful end waits for it to close the link, so that it has taken everything
    /// sent on it (the last replies) before it stops.
    controller_in_process: bool,
}

/// Connects (over the node's [`Route`]) and completes the handshake.
pub async fn connect(core: &ControllerMesh, callbacks: Vec<String>) -> Result<Link, Error> {
    let address = &core.config.address;
    let unreachable = |reason: String| Error::unreachable(address, reason);
    let handshake_failed =
        |cause: ReadError| Error::unreachable_by(address, "handshake failed: ", cause);
    let tls_failed = |message: String, cause: Option<std::io::Error>| Error::Tls {
        address: address.to_string(),
        message,
        source: cause.map(Into::into),
    };
    let tls = core.config.route.tls();
    let limit = core.config.handshake_timeout;
    let Halves {
        read,
        mut write,
        shared_reads,
    } = match &core.config.route {
        Route::InProcess(door) => door.open(core.config.own_replies)?,
        Route::Socket { .. } => match timeout(
            limit,
            transport::connect(address, tls, core.config.own_replies),
        )
        .await
        {
            Ok(Ok(halves)) => halves,
            Ok(Err(ConnectError::Unreachable(e))) => {
                return Err(Error::unreachable_by(address, "", e))
            }
            Ok(Err(ConnectError::Tls(message, cause))) => return Err(tls_failed(message, cause)),
            Ok(Err(ConnectError::Unsafe(e))) => return Err(e),
            Err(_) => return Err(unreachable(format!("no connection within {limit:?}"))),
        },
    };

    let hello = Hello {
        process_name: core.name.to_string(),
        auth_token: core
            .config
            .auth_token
            .as_ref()
            .map(|t| t.expose().to_string()),
        max_frame_size: core.config.max_frame_size as u64,
        view: Some(if core.asks_everything() {
            View::All
        } else {
            View::Subscribed
        }),
    };
    // A failed write is reported only if no answer can be read: a controller that
    // refused the TLS session may have closed before the write, and its alert is the
    // better explanation.
    let sent = write.write_all(&protocol::opening(&hello, callbacks)).await;

    let mut reader =
        FrameReader::new(read, core.config.max_frame_size).keep_large_buffers(KEEP_LARGE_BUFFERS);
    let first = match timeout(limit, reader.next()).await {
        Ok(Ok(Some(frame))) => frame,
        Ok(Err(ReadError::Io(e))) => {
            return Err(match tls.and_then(|t| t.explain(&e)) {
                Some(message) => tls_failed(message, Some(e)),
                None => handshake_failed(ReadError::Io(e)),
            })
        }
        Ok(Err(e)) => return Err(handshake_failed(e)),
        Ok(Ok(None)) => {
            return Err(match sent {
                Err(e) => handshake_failed(ReadError::Io(e)),
                Ok(()) => unreachable("closed during the handshake".into()),
            })
        }
        Err(_) => return Err(unreachable("no answer to the handshake".into())),
    };
    match first.kind() {
        Kind::Welcome => {
            let welcome = read_welcome(&mut reader, &first, limit, &address.to_string()).await?;
            let limits = QueueLimits::new(
                core.config.max_queue_bytes,
                core.config.max_frame_size,
                core.config.stall_timeout,
            );
            let (queue, writer) = frame_channel(write, limits);
            let writer = WriterTask::spawn(writer);
            Ok(Link {
                reader,
                shared_reads,
                queue,
                writer,
                welcome,
                controller_in_process: matches!(core.config.route, Route::InProcess(_)),
            })
        }
        Kind::Refused => {
            let refused: Refused = message::decode(&first.payload())
                .map_err(|e| Error::undecodable(address.to_string(), "Refused", e))?;
            Err(match refused.code {
                RefuseCode::DuplicateName => Error::DuplicateProcessName {
                    process: core.name.to_string(),
                },
                RefuseCode::Auth => Error::AuthenticationFailed {
                    address: address.to_string(),
                    reason: refused.message,
                    remedy: crate::error::TOKEN_REMEDY.to_string(),
                },
                RefuseCode::TlsRequired => tls_failed(refused.message, None),
                _ => Error::Refused {
                    reason: refused.message,
                },
            })
        }
        other => Err(Error::protocol(
            address.to_string(),
            format!("expected Welcome, got {other:?}"),
        )),
    }
}

/// Puts together the `Welcome` whose first page is `first`: reads the pages that
/// follow it (each within `limit`) until the last, so that the node's view is whole
/// before it counts as connected.
async fn read_welcome(
    reader: &mut FrameReader<BoxRead>,
    first: &Frame,
    limit: std::time::Duration,
    address: &str,
) -> Result<Welcome, Error> {
    let unreachable = |reason: &str| Error::unreachable(address, reason);
    let decode = |frame: &Frame| {
        message::decode::<Welcome>(&frame.payload())
            .map_err(|e| Error::undecodable(address, "Welcome", e))
    };
    let mut welcome = decode(first)?;
    while welcome.more {
        let page = match timeout(limit, reader.next()).await {
            Ok(Ok(Some(page))) if page.kind() == Kind::Welcome => decode(&page)?,
            Ok(Ok(Some(other))) => {
                let kind = other.kind();
                return Err(Error::protocol(
                    address,
                    format!("expected more of the Welcome, got {kind:?}"),
                ));
            }
            Ok(Ok(None)) => return Err(unreachable("closed during the handshake")),
            Ok(Err(e)) => return Err(Error::unreachable_by(address, "handshake failed: ", e)),
            Err(_) => return Err(unreachable("the rest of the Welcome did not come")),
        };
        welcome.members.extend(page.members);
        welcome.tasks.extend(page.tasks);
        welcome.more = page.more;
    }
    Ok(welcome)
}

impl Link {
    /// Dispatches frames until the connection ends or `closed` is set; returns why it
    /// ended. Then [`Link::drain`] (a graceful stop) or [`Link::abort`] (a failure).
    pub async fn run(
        &mut self,
        core: &Arc<ControllerMesh>,
        conn: &Connection,
        closed: &watch::Receiver<bool>,
    ) -> String {
        let mut dispatching = Dispatching {
            core,
            conn,
            batch: SyncBatch::default(),
        };
        let ended = read_frames(&mut self.reader, &self.queue, closed, &mut dispatching).await;
        // Requests already admitted still run; their replies go out if they can.
        dispatching.batch.submit(&core.executor);
        match ended {
            Ended::Stopped => "node stopped".to_string(),
            Ended::WriterClosed(reason) => writer_failure(reason),
            Ended::PeerClosed => "the controller closed the connection".to_string(),
            Ended::ReadFailed(e) => format!("connection failed: {e}"),
            Ended::Refused(reason) => reason,
        }
    }

    /// Lets what is queued (a goodbye, last replies) go out, but never waits long on a
    /// controller that stopped reading. A controller in this process is also given
    /// that time to close the link after the goodbye.
    pub async fn drain(mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        if !self.writer.drain(self.queue, deadline).await {
            return;
        }
        if self.controller_in_process {
            // What it still sends meanwhile finds no taker: this node has stopped.
            let closed = async { while let Ok(Some(_)) = self.reader.next().await {} };
            let _ = timeout_at(deadline, closed).await;
        }
    }

    /// Drops the connection and whatever was queued on it: it failed.
    pub fn abort(self) {
        self.writer.abort();
    }
}

/// Why the writer closed the connection.
fn writer_failure(reason: Option<CloseReason>) -> String {
    match reason {
        Some(reason) => format!("connection closed: {reason}"),
        None => "the connection closed".to_string(),
    }
}

/// The controller's frames, as the link dispatches them.
struct Dispatching<'a> {
    core: &'a Arc<ControllerMesh>,
    conn: &'a Connection,
    /// The sync callbacks among a burst of frames, to go to the runner together.
    batch: SyncBatch,
}

impl FrameHandler for Dispatching<'_> {
    type Refusal = String;

    fn frame(&mut self, frame: Frame, _next_dst: Option<&[u8]>) -> Handled<String> {
        match dispatch(self.core, self.conn, frame, &mut self.batch) {
            Ok(()) => Handled::Done,
            Err(refusal) => Handled::Refused(refusal),
        }
    }

    fn caught_up(&mut self) {
        // Everything read so far is dispatched: the sync callbacks among it go to the
        // runner together.
        self.batch.submit(&self.core.executor);
    }
}

/// Handles one frame from the controller. `Err` drops the connection.
fn dispatch(
    core: &Arc<ControllerMesh>,
    conn: &Connection,
    frame: Frame,
    batch: &mut SyncBatch,
) -> Result<(), String> {
    match frame.kind() {
        Kind::Request if frame.flags() & FLAG_REQUEST_BATCH != 0 => {
            serve_batch(core, frame, batch);
        }
        Kind::Request => executor::serve(&core.executor, FrameRequest::new(frame, core), batch),
        Kind::Reply if frame.flags() & FLAG_REPLY_BATCH != 0 => complete_replies(conn, frame),
        Kind::Reply => complete_reply(&conn.pending, frame),
        Kind::Undeliverable => {
            let code = message::decode::<Undeliverable>(&frame.payload()).map(|u| u.code);
            let error = |process: &str, callback: &str| {
                let (process, callback) = (process.to_string(), callback.to_string());
                match code {
                    Ok(UndeliverableCode::Stopping) => Error::PeerStopped { process, callback },
                    Ok(UndeliverableCode::SlowConsumer) => {
                        Error::SlowConsumer { process, callback }
                    }
                    // The controller dropped a node this one still knows: it left after
                    // the call was sent, and its departure is on its way here.
                    _ if core.membership.has_node(&process) => {
                        Error::PeerDisconnected { process, callback }
                    }
                    _ => Error::UnknownProcess { process },
                }
            };
            if let Some(entry) = conn.pending.take(frame.call_id()) {
                let _ = entry.done.send(Err(error(&entry.target, &entry.callback)));
            } else {
                conn.pending
                    .end_stream(frame.call_id(), |s| Some(error(&s.target, &s.callback)));
            }
        }
        kind @ (Kind::StreamItem | Kind::StreamEnd | Kind::StreamCredit | Kind::StreamCancel) => {
            stream_frame(core, conn, kind, frame);
        }
        Kind::ControlReply => {
            if let Some(entry) = conn.pending.take(frame.call_id()) {
                let _ = entry.done.send(control_reply(&frame));
            }
        }
        Kind::Membership => {
            let events = message::decode_membership(&frame.payload())
                .map_err(|e| format!("undecodable Membership: {e}"))?;
            for event in events.into_iter().filter(|e| e.about() != &*core.name) {
                let changes = core.membership.apply(event);
                for (gone, stopped) in &changes.gone {
                    conn.pending.fail_target(gone, *stopped);
                    core.served.cancel_peer(gone);
                    core.feeds.cancel_peer(gone);
                    core.incoming.fail_caller(gone);
                }
                core.report(changes);
            }
        }
        Kind::Schedule => {
            let event: ScheduleEvent = message::decode(&frame.payload())
                .map_err(|e| format!("undecodable Schedule: {e}"))?;
            core.book.apply(event, std::time::Instant::now());
        }
        other => return Err(format!("unexpected {other:?} frame from the controller")),
    }
    Ok(())
}

/// Serves the calls of a batch, in order, their arguments slices of the frame: a batch
/// of NO_RETURN calls (each admitted and counted against the NO_RETURN allowance as a
/// lone one), or of calls that want replies (each with its own call id, answered
/// once); a quick sync callback takes them as one job ([`executor::serve_batch`]). A
/// malformed batch is dropped whole, with a warning naming its caller: it costs only
/// that caller's calls.
fn serve_batch(core: &Arc<ControllerMesh>, frame: Frame, batch: &mut SyncBatch) {
    if frame.flags() & FLAG_NO_REPLY == 0 {
        let calls = match batch_requests(frame.flags(), frame.call_id(), frame.payload()) {
            Ok(calls) => calls,
            Err(why) => return dropped_batch(&frame, "calls", &why),
        };
        let calls = FrameBatch::with_replies(frame, calls, core);
        executor::serve_batch(&core.executor, calls, batch);
        return;
    }
    let calls = match batch_calls(frame.flags(), frame.call_id(), frame.payload()) {
        Ok(calls) => calls,
        Err(why) => return dropped_batch(&frame, "NO_RETURN calls", &why),
    };
    executor::serve_batch(
        &core.executor,
        FrameBatch::one_way(frame, calls, core),
        batch,
    );
}

/// Logs a malformed batch of `what` in `frame`, dropped.
fn dropped_batch(frame: &Frame, what: &str, why: &str) {
    tracing::warn!(
        caller = frame.src(),
        callback = frame.name(),
        "dropped a malformed batch of {what}: {why}"
    );
}

/// Handles a stream frame. Without `FLAG_ARGUMENTS` it belongs to a results stream:
/// items and end of this node's own call, credit and cancel of a call made to it (a
/// cancel ends that call's arguments stream too). With it, to an arguments stream: items
/// and end of a call made to this node, credit and cancel of this node's own call.
fn stream_frame(core: &ControllerMesh, conn: &Connection, kind: Kind, frame: Frame) {
    let arguments = frame.flags() & FLAG_ARGUMENTS != 0;
    if kind == Kind::StreamItem {
        return stream_items(core, conn, arguments, frame);
    }
    let (peer, call_id) = (frame.src(), frame.call_id());
    let error_end = |process: &str, callback: &str| {
        (frame.flags() & FLAG_ERROR != 0)
            .then(|| remote_failure(&frame.payload(), process, callback))
    };
    match (kind, arguments) {
        (Kind::StreamEnd, false) => {
            conn.pending
                .end_stream(call_id, |s| error_end(peer, &s.callback));
        }
        (Kind::StreamEnd, true) => core
            .incoming
            .end(peer, call_id, |_, callback| error_end(peer, callback)),
        (Kind::StreamCredit, arguments) => match message::decode::<Grant>(&frame.payload()) {
            Ok(grant) if arguments => core.feeds.grant(peer, call_id, grant),
            Ok(grant) => core.served.grant(peer, call_id, grant),
            Err(e) => {
                tracing::debug!(peer, error = %e, "ignored an undecodable stream credit");
            }
        },
        (Kind::StreamCancel, true) => core.feeds.cancel(peer, call_id),
        (Kind::StreamCancel, false) => {
            core.served.cancel(peer, call_id);
            core.incoming.cancel(peer, call_id);
        }
        _ => {} // items above; only stream kinds come here
    }
}

/// Hands the items of a `StreamItem` frame to their stream: a stream of this node's own
/// call, or (`arguments`) one fed to a call made to it. Items of a stream nobody awaits
/// any more (its cancel is on its way) are dropped; a sender past its credit, or a
/// malformed batch, ends the stream with a protocol error and is told to stop.
fn stream_items(core: &ControllerMesh, conn: &Connection, arguments: bool, frame: Frame) {
    let (peer, call_id) = (frame.src(), frame.call_id());
    let batched = frame.flags() & FLAG_BATCH != 0;
    // A lone item keeps the reader's hold on its buffer (see `ReplyPayload`).
    let payload = if batched {
        ReplyPayload::from(frame.payload())
    } else {
        ReplyPayload::from(frame.clone())
    };
    let delivery = match Arrived::new(payload, batched) {
        Ok(arrived) if arguments => core.incoming.items(peer, call_id, arrived),
        Ok(arrived) => conn.pending.stream_items(call_id, arrived),
        Err(why) => {
            let error = Error::protocol(peer, why);
            if arguments {
                core.incoming.end(peer, call_id, |_, _| Some(error));
            } else {
                conn.pending.end_stream(call_id, |_| Some(error));
            }
            Delivery::Overrun
        }
    };
    if delivery == Delivery::Overrun {
        let to = Addressed {
            conn,
            src: &core.name,
            dst: peer,
            call_id,
            // The cancel goes the other way: from the receiver of arguments, it carries
            // the flag; from the receiver of results, not.
            flags: if arguments { FLAG_ARGUMENTS } else { 0 },
        };
        to.cancel_overrun();
    }
}

/// The answer to a control request: its payload, or the controller's error.
fn control_reply(frame: &Frame) -> Completion {
    if frame.flags() & FLAG_ERROR == 0 {
        return Ok(frame.payload().into());
    }
    match message::decode::<ControlError>(&frame.payload()) {
        Ok(ControlError {
            code: ControlErrorCode::TaskNotFound,
            task_id: Some(task_id),
            ..
        }) => Err(Error::TaskNotFound { task_id }),
        Ok(e) => Err(Error::Config(e.message)),
        Err(e) => Err(Error::undecodable(
            "the controller",
            "ControlReply error",
            e,
        )),
    }
}

/// Completes the call `frame` answers. The frame is handed over whole: its payload may
/// then be the buffer's only holder (see [`ReplyPayload`]).
///
/// A reply to a call made to another node is not the sender's to give: it is ignored
/// (logged), and the call waits for its own.
///
/// Also what a thread that spins for its reply does with the reply it read itself
/// (see `OwnReply::read`).
pub fn complete_reply(pending: &Pending, frame: Frame) {
    let entry = match pending.take_from(frame.call_id(), frame.src()) {
        Ok(entry) => entry,
        Err(true) => {
            tracing::warn!(
                peer = frame.src(),
                call_id = frame.call_id(),
                "ignored a reply to a call made to another node"
            );
            return;
        }
        Err(false) => {
            reply_without_call(pending, frame.src(), frame.call_id(), frame.flags(), || {
                frame.payload()
            });
            return;
        }
    };
    let completion = if frame.flags() & FLAG_ERROR == 0 {
        Ok(frame.into())
    } else {
        Err(remote_failure(
            &frame.payload(),
            frame.src(),
            &entry.callback,
        ))
    };
    let _ = entry.done.send(completion);
}

/// A reply from `peer` to call `call_id`, which waits for no reply: a stream call
/// answered with one reply (a refusal, or a plain callback) ends; otherwise the caller
/// gave up (timeout) before the reply came, and it is dropped.
fn reply_without_call(
    pending: &Pending,
    peer: &str,
    call_id: u64,
    flags: u8,
    payload: impl FnOnce() -> bytes::Bytes,
) {
    pending.end_stream(call_id, |s| {
        Some(if flags & FLAG_ERROR == 0 {
            Error::NotAStream {
                process: peer.to_string(),
                callback: s.callback.to_string(),
                reason: "as a plain callback, with one result (or runs a daffi too old to stream): call it with fg, bg or no_return".to_string(),
            }
        } else {
            remote_failure(&payload(), peer, &s.callback)
        })
    });
}

/// Completes the calls a batch reply (docs/PROTOCOL.md, "Batches of replies") answers,
/// each with its own result, their entries taken under one lock. A reply to a call made
/// to another node is not the sender's to give: ignored (logged), the call waits for
/// its own. A malformed batch cannot be matched to its calls: it is dropped with a WARN
/// naming its sender, and every call in flight to that node fails with a protocol error
/// naming it (rather than wait for replies it may have lost); the connection, shared
/// with every other node, stays open.
fn complete_replies(conn: &Connection, frame: Frame) {
    let peer = frame.src();
    let items = match batch_replies(frame.flags(), frame.call_id(), frame.payload()) {
        Ok(items) => items,
        Err(why) => {
            tracing::warn!(
                peer,
                "dropped a malformed batch of replies; failing the calls in flight to it: {why}"
            );
            conn.pending.fail_target_with(peer, |target, callback| {
                Error::protocol(
                    target.to_string(),
                    format!(
                        "its node sent a malformed batch of replies while `{callback}` waited on it ({why})"
                    ),
                )
            });
            return;
        }
    };
    let (taken, missed) = conn
        .pending
        .take_replies(peer, items.map(|item| (item.call_id, item)));
    for (entry, item) in taken {
        let completion = if item.error {
            Err(remote_failure(&item.payload, peer, &entry.callback))
        } else {
            Ok(ReplyPayload::from(item.payload))
        };
        let _ = entry.done.send(completion);
    }
    for (call_id, item) in missed {
        match item {
            Some(item) => {
                let flags = if item.error { FLAG_ERROR } else { 0 };
                reply_without_call(&conn.pending, peer, call_id, flags, || item.payload);
            }
            None => tracing::warn!(
                peer,
                call_id,
                "ignored a reply to a call made to another node"
            ),
        }
    }
}
