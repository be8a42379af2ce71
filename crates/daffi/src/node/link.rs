//! The node's connection to the controller: handshake, then dispatching incoming frames.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::{executor, Connection, NodeCore};
use crate::error::Error;
use crate::protocol::frame::{Frame, Header, Kind, FLAG_ERROR};
use crate::protocol::io::{frame_channel, FrameReader, FrameSender};
use crate::protocol::message::{
    self, ControlError, ControlErrorCode, Hello, MembershipEvent, RefuseCode, Refused, RemoteError,
    RemoteErrorKind, Undeliverable, UndeliverableCode, Welcome,
};
use crate::protocol::{MAGIC, PROTOCOL_VERSION};
use crate::transport::{self, BoxRead};

/// How long a closing link may take to flush what was queued.
const WRITER_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Frames queued for the controller before a sender waits.
const QUEUE_CAPACITY: usize = 4096;

/// An established connection.
pub struct Link {
    reader: FrameReader<BoxRead>,
    pub queue: FrameSender,
    writer: JoinHandle<std::io::Result<()>>,
    pub welcome: Welcome,
}

/// Connects and completes the handshake.
pub async fn connect(core: &NodeCore, callbacks: Vec<String>) -> Result<Link, Error> {
    let address = &core.config.address;
    let unreachable = |reason: String| Error::ControllerUnreachable {
        address: address.to_string(),
        reason,
    };
    let (read, mut write) = transport::connect(address)
        .await
        .map_err(|e| unreachable(e.to_string()))?;

    let hello = message::encode(&Hello {
        process_name: core.name.to_string(),
        auth_token: core.config.auth_token.clone(),
        callbacks,
    });
    let mut opening = Vec::with_capacity(6 + 64 + hello.len());
    opening.extend_from_slice(&MAGIC);
    opening.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    opening.extend_from_slice(&Header::control(Kind::Hello).encode(hello.len()));
    opening.extend_from_slice(&hello);
    write
        .write_all(&opening)
        .await
        .map_err(|e| unreachable(e.to_string()))?;

    let mut reader = FrameReader::new(read, core.config.max_frame_size);
    let first = timeout(core.config.handshake_timeout, reader.next())
        .await
        .map_err(|_| unreachable("no answer to the handshake".into()))?
        .map_err(|e| unreachable(format!("handshake failed: {e}")))?
        .ok_or_else(|| unreachable("closed during the handshake".into()))?;
    let protocol = |message: String| Error::Protocol {
        peer: address.to_string(),
        message,
    };
    match first.kind() {
        Kind::Welcome => {
            let welcome: Welcome = message::decode(&first.payload())
                .map_err(|e| protocol(format!("undecodable Welcome: {e}")))?;
            let (queue, writer) = frame_channel(write, QUEUE_CAPACITY);
            let writer = tokio::spawn(writer);
            Ok(Link {
                reader,
                queue,
                writer,
                welcome,
            })
        }
        Kind::Refused => {
            let refused: Refused = message::decode(&first.payload())
                .map_err(|e| protocol(format!("undecodable Refused: {e}")))?;
            Err(match refused.code {
                RefuseCode::DuplicateName => Error::DuplicateProcessName {
                    process: core.name.to_string(),
                },
                _ => Error::Refused {
                    reason: refused.message,
                },
            })
        }
        other => Err(protocol(format!("expected Welcome, got {other:?}"))),
    }
}

impl Link {
    /// Dispatches frames until the connection ends or the node stops; returns why it ended.
    /// Dispatches frames until the connection ends or `closed` is set; returns why it ended.
    pub async fn run(
        mut self,
        core: &Arc<NodeCore>,
        conn: &Connection,
        closed: &mut watch::Receiver<bool>,
    ) -> String {
        let reason = loop {
            let next = tokio::select! {
                next = self.reader.next() => next,
                _ = closed.wait_for(|c| *c) => break "node stopped".to_string(),
            };
            match next {
                Ok(Some(frame)) => {
                    if let Err(reason) = dispatch(core, conn, frame) {
                        break reason;
                    }
                }
                Ok(None) => break "the controller closed the connection".to_string(),
                Err(e) => break format!("connection failed: {e}"),
            }
        };
        // Let what is queued (a goodbye, last replies) go out, but never wait long on a
        // controller that stopped reading.
        drop(self.queue);
        let abort = self.writer.abort_handle();
        if timeout(WRITER_DRAIN, self.writer).await.is_err() {
            abort.abort();
        }
        reason
    }
}

/// Handles one frame from the controller. `Err` drops the connection.
fn dispatch(core: &Arc<NodeCore>, conn: &Connection, frame: Frame) -> Result<(), String> {
    match frame.kind() {
        Kind::Request => executor::serve(core, frame),
        Kind::Reply => complete_reply(conn, &frame),
        Kind::Undeliverable => {
            if let Some(entry) = conn.pending.take(frame.call_id()) {
                let process = entry.target.to_string();
                let error = match message::decode::<Undeliverable>(&frame.payload()) {
                    Ok(Undeliverable {
                        code: UndeliverableCode::Stopping,
                    }) => Error::PeerStopped {
                        process,
                        callback: entry.callback.to_string(),
                    },
                    _ => Error::UnknownProcess { process },
                };
                let _ = entry.done.send(Err(error));
            }
        }
        Kind::ControlReply => {
            if let Some(entry) = conn.pending.take(frame.call_id()) {
                let _ = entry.done.send(control_reply(&frame));
            }
        }
        Kind::Membership => {
            let event: MembershipEvent = message::decode(&frame.payload())
                .map_err(|e| format!("undecodable Membership: {e}"))?;
            let changes = core.membership.apply(event);
            for (gone, stopped) in &changes.gone {
                conn.pending.fail_target(gone, *stopped);
            }
            core.report(changes);
        }
        other => return Err(format!("unexpected {other:?} frame from the controller")),
    }
    Ok(())
}

/// The answer to a control request: its payload, or the controller's error.
fn control_reply(frame: &Frame) -> Result<bytes::Bytes, Error> {
    if frame.flags() & FLAG_ERROR == 0 {
        return Ok(frame.payload());
    }
    match message::decode::<ControlError>(&frame.payload()) {
        Ok(ControlError {
            code: ControlErrorCode::TaskNotFound,
            task_id: Some(task_id),
            ..
        }) => Err(Error::TaskNotFound { task_id }),
        Ok(e) => Err(Error::Config(e.message)),
        Err(e) => Err(Error::Protocol {
            peer: "the controller".into(),
            message: format!("undecodable ControlReply error: {e}"),
        }),
    }
}

fn complete_reply(conn: &Connection, frame: &Frame) {
    let Some(entry) = conn.pending.take(frame.call_id()) else {
        return; // the caller gave up (timeout) before the reply came
    };
    let completion = if frame.flags() & FLAG_ERROR == 0 {
        Ok(frame.payload())
    } else {
        let (kind, message) = match message::decode::<RemoteError>(&frame.payload()) {
            Ok(e) => (e.kind, e.message),
            Err(e) => (
                RemoteErrorKind::Failed,
                format!("undecodable error reply: {e}"),
            ),
        };
        let process = frame.src().to_string();
        let callback = entry.callback.to_string();
        Err(match kind {
            RemoteErrorKind::BadArguments => Error::BadArguments {
                process,
                callback,
                message,
            },
            RemoteErrorKind::NotFound => Error::NoProvider {
                callback,
                on: Some(process),
            },
            RemoteErrorKind::Overloaded => Error::Overloaded { process, callback },
            RemoteErrorKind::Stopping => Error::PeerStopped { process, callback },
            RemoteErrorKind::Failed | RemoteErrorKind::Panicked => Error::Remote {
                process,
                callback,
                message,
                panicked: kind == RemoteErrorKind::Panicked,
            },
        })
    };
    let _ = entry.done.send(completion);
}
