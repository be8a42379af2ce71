//! One node's connection to the controller: handshake, then routing its frames.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::timeout;

use super::members::{Destination, Members};
use super::scheduler::Scheduler;
use super::ControllerConfig;
use crate::protocol::frame::{Frame, Header, Kind, FLAG_ERROR, FLAG_NO_REPLY};
use crate::protocol::io::{frame_channel, FrameReader, FrameSender, Outgoing, ReadError};
use crate::protocol::message::{
    self, Announce, ControlAnswer, ControlError, ControlErrorCode, ControlRequest, Hello,
    RefuseCode, Refused, Undeliverable, UndeliverableCode,
};
use crate::protocol::{MAGIC, MAX_PROCESS_NAME, PROTOCOL_VERSION};
use crate::transport::{BoxRead, BoxWrite};

/// Frames queued for one connection before forwarding to it waits.
pub const QUEUE_CAPACITY: usize = 4096;

/// State shared by every session of one controller.
pub struct Shared {
    pub config: ControllerConfig,
    pub members: Arc<Members>,
    pub scheduler: Arc<Scheduler>,
}

/// Serves one connection until it closes, fails, or the controller shuts down.
pub async fn serve(
    shared: Arc<Shared>,
    conn_id: u64,
    (read, write, peer): (BoxRead, BoxWrite, String),
    mut shutdown: watch::Receiver<bool>,
) {
    let (queue, writer) = frame_channel(write, QUEUE_CAPACITY);
    let writer = tokio::spawn(writer);
    let mut reader = FrameReader::new(read, shared.config.max_frame_size);

    let hello = match timeout(shared.config.handshake_timeout, handshake(&mut reader)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(refusal)) => {
            tracing::warn!(%peer, reason = %refusal.message, "refused a connection");
            if refusal.code != RefuseCode::BadHello {
                let _ = queue.send(Outgoing::control(Kind::Refused, &refusal)).await;
            }
            drop(queue);
            let _ = writer.await;
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, "closed a connection that did not complete its handshake in time");
            return;
        }
    };

    let name = hello.process_name;
    let joined = shared
        .members
        .join(
            &name,
            conn_id,
            queue.clone(),
            hello.callbacks.clone(),
            shared.config.max_frame_size,
        )
        .await;
    if !joined {
        let refusal = Refused {
            code: RefuseCode::DuplicateName,
            message: format!("process name `{name}` is already connected"),
        };
        tracing::warn!(%peer, process = %name, "refused a duplicate process name");
        let _ = queue.send(Outgoing::control(Kind::Refused, &refusal)).await;
        drop(queue);
        let _ = writer.await;
        return;
    }
    tracing::info!(%peer, process = %name, callbacks = hello.callbacks.len(), "node joined");

    let mut stopping = false;
    // One wait for the shutdown signal for the whole session, not one per frame.
    let stop_flag = shutdown.clone();
    let stop_signal = shutdown.changed();
    tokio::pin!(stop_signal);
    let reason = loop {
        let next = tokio::select! {
            next = reader.next() => next,
            _ = &mut stop_signal => {
                stopping = true;
                break "controller stopping".to_string();
            }
        };
        match next {
            Ok(Some(frame)) => {
                // A stopping controller answers nothing more: its nodes are about to
                // learn that the controller is gone, which is the true reason.
                if *stop_flag.borrow() {
                    stopping = true;
                    break "controller stopping".to_string();
                }
                if let Err(reason) = route(&shared, &name, conn_id, &queue, frame).await {
                    break reason;
                }
            }
            Ok(None) => break "connection closed".to_string(),
            Err(e) => break format!("bad input: {e}"),
        }
    };
    shared.members.leave(&name, conn_id, !stopping).await;
    tracing::info!(process = %name, %reason, "node left");
    drop(queue);
    // Let queued frames go out, but never wait on a peer that stopped reading.
    let abort = writer.abort_handle();
    if timeout(WRITER_DRAIN, writer).await.is_err() {
        abort.abort();
    }
}

/// How long a closing connection may take to flush what was queued for it.
const WRITER_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads the preamble and the `Hello`, and checks them.
async fn handshake(reader: &mut FrameReader<BoxRead>) -> Result<Hello, Refused> {
    let bad = |message: String| Refused {
        code: RefuseCode::BadHello,
        message,
    };
    let preamble = reader
        .read_exact_bytes(MAGIC.len() + 2)
        .await
        .map_err(|e| bad(format!("no preamble: {e}")))?;
    if preamble[..4] != MAGIC {
        return Err(bad("not a daffi client (wrong magic bytes)".into()));
    }
    let version = u16::from_be_bytes([preamble[4], preamble[5]]);
    if version != PROTOCOL_VERSION {
        return Err(Refused {
            code: RefuseCode::Version,
            message: format!(
                "protocol version {version} is not supported; this controller speaks version {PROTOCOL_VERSION}"
            ),
        });
    }
    let frame = match reader.next().await {
        Ok(Some(f)) if f.kind() == Kind::Hello => f,
        Ok(Some(f)) => return Err(bad(format!("expected Hello, got {:?}", f.kind()))),
        Ok(None) | Err(ReadError::Eof) => return Err(bad("closed during the handshake".into())),
        Err(e) => return Err(bad(format!("bad Hello frame: {e}"))),
    };
    let hello: Hello =
        message::decode(&frame.payload()).map_err(|e| bad(format!("undecodable Hello: {e}")))?;
    if hello.process_name.is_empty() || hello.process_name.len() > MAX_PROCESS_NAME {
        return Err(Refused {
            code: RefuseCode::InvalidName,
            message: format!(
                "process names must be 1 to {MAX_PROCESS_NAME} bytes, got {}",
                hello.process_name.len()
            ),
        });
    }
    Ok(hello)
}

/// Handles one frame from a joined node. `Err` closes the connection with that reason.
async fn route(
    shared: &Shared,
    name: &str,
    conn_id: u64,
    own_queue: &FrameSender,
    frame: Frame,
) -> Result<(), String> {
    match frame.kind() {
        Kind::Request | Kind::Reply => {
            if frame.src() != name {
                return Err(format!(
                    "frame claims to come from `{}` (protocol violation)",
                    frame.src()
                ));
            }
            let destination = if frame.kind() == Kind::Reply {
                // Replies go to leaving nodes too: they finish what they started.
                match shared.members.route(frame.dst()) {
                    Some(queue) => Destination::Open(queue),
                    None => Destination::Unknown,
                }
            } else {
                shared.members.destination(frame.dst())
            };
            let code = match destination {
                Destination::Open(queue) => {
                    // The frame goes out exactly as it came in: no re-encoding.
                    match queue.send(Outgoing::raw(frame.raw().clone())).await {
                        Ok(()) => return Ok(()),
                        Err(_) => UndeliverableCode::UnknownProcess,
                    }
                }
                Destination::Leaving => UndeliverableCode::Stopping,
                Destination::Unknown => UndeliverableCode::UnknownProcess,
            };
            undeliverable(own_queue, &frame, code).await;
            Ok(())
        }
        Kind::Leaving => {
            shared.members.mark_leaving(name, conn_id).await;
            Ok(())
        }
        Kind::Announce => {
            let announce: Announce = message::decode(&frame.payload())
                .map_err(|e| format!("undecodable Announce: {e}"))?;
            shared
                .members
                .update(name, conn_id, announce.callbacks)
                .await;
            Ok(())
        }
        Kind::ControlRequest => {
            let request: ControlRequest = message::decode(&frame.payload())
                .map_err(|e| format!("undecodable ControlRequest: {e}"))?;
            let answer = control(shared, name, request);
            let (flags, body) = match answer {
                Ok(answer) => (0, message::encode(&answer)),
                Err(error) => (FLAG_ERROR, message::encode(&error)),
            };
            let header = Header {
                kind: Kind::ControlReply,
                flags,
                call_id: frame.call_id(),
                timeout_ms: 0,
                src: "",
                dst: name,
                name: "",
            };
            let reply = Outgoing {
                head: header.encode(body.len()),
                body,
            };
            let _ = own_queue.send(reply).await;
            Ok(())
        }
        Kind::Goodbye => Err("said goodbye".into()),
        other => Err(format!("unexpected {other:?} frame from a node")),
    }
}

/// Tells a caller that its request's destination is gone. Replies to gone callers are
/// dropped: nobody waits for them.
async fn undeliverable(own_queue: &FrameSender, frame: &Frame, code: UndeliverableCode) {
    if frame.kind() != Kind::Request || frame.flags() & FLAG_NO_REPLY != 0 {
        tracing::debug!(dst = frame.dst(), kind = ?frame.kind(), "dropped a frame for a gone node");
        return;
    }
    let body = message::encode(&Undeliverable { code });
    let header = Header {
        kind: Kind::Undeliverable,
        flags: 0,
        call_id: frame.call_id(),
        timeout_ms: 0,
        src: "",
        dst: frame.src(),
        name: frame.dst(),
    };
    let out = Outgoing {
        head: header.encode(body.len()),
        body,
    };
    let _ = own_queue.send(out).await;
}

/// Carries out a request the controller answers itself.
fn control(
    shared: &Shared,
    from: &str,
    request: ControlRequest,
) -> Result<ControlAnswer, ControlError> {
    match request {
        ControlRequest::Schedule {
            callback,
            args,
            on,
            timing,
        } => shared
            .scheduler
            .schedule(from, callback, args, on, timing)
            .map(|task_id| ControlAnswer::Scheduled { task_id })
            .map_err(|e| ControlError {
                code: ControlErrorCode::Invalid,
                task_id: None,
                message: e.0,
            }),
        ControlRequest::Cancel { task_id } => {
            if shared.scheduler.cancel(task_id) {
                Ok(ControlAnswer::Cancelled)
            } else {
                Err(ControlError {
                    code: ControlErrorCode::TaskNotFound,
                    task_id: Some(task_id),
                    message: format!("no scheduled task {task_id} (it finished or was cancelled)"),
                })
            }
        }
        ControlRequest::ListTasks => Ok(ControlAnswer::Tasks {
            tasks: shared.scheduler.list(),
        }),
    }
}
