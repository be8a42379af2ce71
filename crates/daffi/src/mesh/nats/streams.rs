//! Streams over NATS: a callback's items flow to its caller as the caller grants credit.
//!
//! Every message of a stream names it by a subject of its caller's inbox (the one that
//! takes replies), above all its *items subject* `<caller's inbox>.s<call id>`:
//!
//! - **the request** goes as a call's does (to the callee's subject, arguments in chunks
//!   when large), with the items subject as its reply subject: that makes it a stream
//!   request. It grants the first [`STREAM_WINDOW`](crate::mesh::STREAM_WINDOW) items.
//! - **items and the end**, to the items subject: each item is a message of its own (the
//!   encoded item, no headers); the end is an empty message with the header `Daffi-End`,
//!   or an error reply (header `Daffi-Error`, an encoded `RemoteError`), which is also how
//!   a refused request (unknown callback, not a stream, overloaded, stopping) ends it.
//! - **credit and cancel**, to the callee's `<ns>.node.<callee>.~streams` with the reply
//!   subject `<caller's inbox>.c<call id>` (which names the stream too): the header
//!   `Daffi-Credit: <items>` grants more items, `Daffi-Cancel` stops the producer (its
//!   iterator or stream is dropped). When the callee is gone, NATS answers "no
//!   responders" there: the stream ends with `PeerDisconnected` (on the items subject,
//!   the request found nobody: `UnknownProcess`, as for a call).
//! - **probes** (requests with the header `Daffi-Probe`): the caller probes the callee's
//!   `~streams` subject every [`PROBE_EVERY`] while the stream is open; the callee probes
//!   the items subject once it has waited [`PROBE_EVERY`] for credit or for its next
//!   item. NATS answers "no responders" at once when nobody listens (the process died):
//!   the caller's stream then ends with `PeerDisconnected`, and the callee drops its
//!   producer. The caller answers `0` for a stream it no longer awaits (its cancel was
//!   lost, or overtook the request), which stops the producer too.
//!
//! The messages do not depend on which side produces: items from the caller to the
//! callee are meant to be the same, with the roles swapped (items and the end to the
//! `~streams` subject, credit and cancel to the items subject).
//!
//! An item larger than one NATS message (the server's `max_payload`, less room for
//! headers) is not split: the stream ends with an error that says so. So does a stream
//! whose producer lost its NATS connection meanwhile (items may have been lost).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, Message, Subject};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::caller::is_failure;
use super::chunks::{self, PROBE};
use super::incoming::failure_reply;
use super::subjects::STREAMS_TOKEN;
use super::NatsMesh;
use crate::callback::CallbackFailure;
use crate::error::{Error, Result};
use crate::executor::ItemSink;
use crate::mesh::served::StreamGate;
use crate::mesh::{remote_failure, BoxFuture, CallRequest, OpenStream, Pending, StreamControl};
use crate::protocol::message::RemoteErrorKind;

/// Header of a stream's last message: the items ran out.
const END: &str = "Daffi-End";
/// Header of a credit message: how many more items the producer may send.
const CREDIT: &str = "Daffi-Credit";
/// Header of a cancel message: the reader dropped the stream.
const CANCEL: &str = "Daffi-Cancel";
/// The first byte of the last token of an items subject (a call's reply subject ends
/// in digits, an ack's in `w`).
const ITEMS_TOKEN: char = 's';
/// The first byte of the last token of the reply subject of a caller's credit and cancel.
const CONTROL_TOKEN: char = 'c';
/// How often each side of a stream checks that the other still listens, while it waits.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long a probe waits for its answer; none counts as alive (a busy peer), since
/// NATS answers "no responders" at once for a dead one.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// A caller's answer to a probe of a stream it no longer awaits.
const NOT_AWAITED: &[u8] = b"0";

/// Which subject of a stream, in its caller's inbox, a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The items subject (`s<call id>`): items, the end, the producer's probes.
    Items,
    /// The reply subject of the caller's credit and cancel (`c<call id>`): NATS's "no
    /// responders" comes there when the callee is gone.
    Control,
}

/// Where the items of this node's stream call `call_id` come (`inbox` takes replies).
fn items_subject(inbox: &str, call_id: u64) -> Subject {
    format!("{inbox}.{ITEMS_TOKEN}{call_id}").into()
}

/// The reply subject of the credit and cancel of stream call `call_id`.
fn control_subject(inbox: &str, call_id: u64) -> Subject {
    format!("{inbox}.{CONTROL_TOKEN}{call_id}").into()
}

/// The stream call whose subject ends with `token`, and which of its subjects it is;
/// `None` for the other tokens of an inbox (a call's id, an ack's).
pub fn stream_of(token: &str) -> Option<(u64, Via)> {
    let via = match token.chars().next()? {
        ITEMS_TOKEN => Via::Items,
        CONTROL_TOKEN => Via::Control,
        _ => return None,
    };
    Some((token[1..].parse().ok()?, via))
}

/// The caller's inbox and the call id in a subject of a stream (either); `None` if
/// `subject` is not one.
fn stream_key(subject: &str) -> Option<(&str, u64)> {
    let (inbox, token) = subject.rsplit_once('.')?;
    Some((inbox, stream_of(token)?.0))
}

/// Whether `reply`, the reply subject of a request, makes it a stream request.
pub fn is_items_subject(reply: &str) -> bool {
    let token = reply.rsplit_once('.').map(|(_, token)| token);
    matches!(token.and_then(stream_of), Some((_, Via::Items)))
}

/// Whether `subject` is a node's `~streams` subject.
pub fn is_streams_subject(subject: &str) -> bool {
    subject.rsplit('.').next() == Some(STREAMS_TOKEN)
}

fn header<'m>(message: &'m Message, name: &str) -> Option<&'m str> {
    Some(message.headers.as_ref()?.get(name)?.as_str())
}

/// Whether anybody listens on `subject` and, if it is a caller, still awaits the
/// stream: "no responders" or [`NOT_AWAITED`] say no; no answer says yes.
async fn listens(client: &async_nats::Client, subject: Subject) -> bool {
    let mut headers = HeaderMap::new();
    headers.insert(PROBE, "1");
    let request = async_nats::Request::new()
        .headers(headers)
        .timeout(Some(PROBE_TIMEOUT));
    match client.send_request(subject, request).await {
        Ok(answer) => answer.payload.as_ref() != NOT_AWAITED,
        Err(e) => e.kind() != RequestErrorKind::NoResponders,
    }
}

// ---- the caller ------------------------------------------------------------------------

/// What a stream's reader asks of its task.
enum Command {
    Grant(u32),
    Cancel,
}

/// The caller's credit and cancel of one stream call, handed to the call's task, which
/// publishes them in order (publishing waits; these are called from a reader's poll).
struct NatsStreamControl {
    pending: Arc<Pending>,
    call_id: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl StreamControl for NatsStreamControl {
    fn grant(&self, items: u32) {
        let _ = self.commands.send(Command::Grant(items));
    }

    fn cancel(&self) {
        self.pending.remove_stream(self.call_id);
        let _ = self.commands.send(Command::Cancel);
    }
}

/// One stream call of this node.
struct StreamCall {
    call_id: u64,
    target: Arc<str>,
    callback: Arc<str>,
    /// Where its items come.
    items_to: Subject,
    /// The callee's `~streams` subject: credit, cancel and probes go there.
    control_to: Subject,
    /// The reply subject of credit and cancel (see [`Via::Control`]).
    control_reply: Subject,
}

impl NatsMesh {
    /// See [`Mesh::open_stream`](crate::mesh::Mesh::open_stream): the request is sent by
    /// the stream's own task, which then carries its credit and cancel.
    pub(super) fn start_stream(&self, req: &CallRequest) -> Result<OpenStream> {
        self.check_ready()?;
        let target = self
            .membership
            .route(&self.name, &req.callback, req.on.as_deref())?;
        self.check_args(req)?;
        let mesh = self.me.upgrade().ok_or(Error::Stopped)?;
        let (call_id, items) = self
            .pending
            .open_stream(target.clone(), req.callback.clone())
            .ok_or(Error::Stopped)?;
        let call = StreamCall {
            call_id,
            target: target.clone(),
            callback: req.callback.clone(),
            items_to: items_subject(&self.inbox, call_id),
            control_to: self.subjects.node_streams(&target).into(),
            control_reply: control_subject(&self.inbox, call_id),
        };
        let request = (self.request_headers(req), req.args.to_bytes());
        let (commands, commands_rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(mesh, call, request, commands_rx));
        let control = NatsStreamControl {
            pending: self.pending.clone(),
            call_id,
            commands,
        };
        Ok(OpenStream {
            target,
            items,
            control: Box::new(control),
        })
    }

    /// Publishes the request of `call` (its arguments in chunks when large).
    async fn send_stream_request(
        &self,
        call: &StreamCall,
        (mut headers, mut args): (HeaderMap, Bytes),
    ) -> Result<()> {
        let subject = self.subjects.node_call(&call.target, &call.callback);
        if args.len() > self.chunk_size {
            let last = self
                .push_leading(&call.target, &call.callback, &subject, &args, &mut headers)
                .await?;
            args = args.slice(last..);
        }
        self.client
            .publish_with_reply_and_headers(subject, call.items_to.clone(), headers, args)
            .await
            .map_err(|e| self.unreachable(&format!("publishing failed: {e}")))
    }

    /// Publishes a credit or cancel (`name: value`) of `call` to its callee.
    async fn send_control(&self, call: &StreamCall, name: &'static str, value: &str) {
        let mut headers = HeaderMap::new();
        headers.insert(name, value);
        let sent = self
            .client
            .publish_with_reply_and_headers(
                call.control_to.clone(),
                call.control_reply.clone(),
                headers,
                Bytes::new(),
            )
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, callee = %call.target, "stream control dropped: the NATS client is closed");
        }
    }

    /// Takes a message of this node's stream call `call_id` that came `via` one of its
    /// subjects: an item, its end, or a probe from its producer; or "no responders".
    pub(super) fn take_stream_message(&self, call_id: u64, via: Via, message: Message) {
        if chunks::is_probe(&message) {
            return self.answer_probe(message.reply, self.pending.has_stream(call_id));
        }
        let no_responders = message.status == Some(async_nats::StatusCode::NO_RESPONDERS);
        if no_responders || is_failure(&message) {
            self.pending.end_stream(call_id, |s| {
                let (process, callback) = (s.target.to_string(), s.callback.to_string());
                Some(match via {
                    // Nobody took the credit: the callee died mid-stream.
                    Via::Control => Error::PeerDisconnected { process, callback },
                    // In the view, but nobody took the request: it died or stopped.
                    Via::Items if no_responders => Error::UnknownProcess { process },
                    Via::Items => remote_failure(&message.payload, &process, &callback),
                })
            });
        } else if header(&message, END).is_some() {
            self.pending.end_stream(call_id, |_| None);
        } else {
            // An item of a stream nobody awaits any more (its cancel is on its way) is
            // dropped.
            self.pending.stream_item(call_id, message.payload.into());
        }
    }

    /// Answers a producer's probe of a stream: whether it is still `awaited`.
    fn answer_probe(&self, reply: Option<Subject>, awaited: bool) {
        let Some(reply) = reply else { return };
        let answer = if awaited {
            Bytes::new()
        } else {
            Bytes::from_static(NOT_AWAITED)
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            let _ = client.publish(reply, answer).await;
        });
    }
}

/// Runs one stream call: sends its request, then its credit and cancel in order, and
/// probes its callee every [`PROBE_EVERY`] while the stream is open (a callee that died
/// ends it with `PeerDisconnected`).
async fn drive(
    mesh: Arc<NatsMesh>,
    call: StreamCall,
    request: (HeaderMap, Bytes),
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    if let Err(error) = mesh.send_stream_request(&call, request).await {
        mesh.pending.end_stream(call.call_id, |_| Some(error));
        return;
    }
    let mut probes = tokio::time::interval_at(Instant::now() + PROBE_EVERY, PROBE_EVERY);
    // A probe that waited for its answer is not followed by a burst of others.
    probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Grant(items)) => {
                    mesh.send_control(&call, CREDIT, &items.to_string()).await;
                }
                Some(Command::Cancel) => return mesh.send_control(&call, CANCEL, "1").await,
                None => return, // read to its end, and dropped
            },
            _ = probes.tick() => {
                if !mesh.pending.has_stream(call.call_id) {
                    return;
                }
                if !listens(&mesh.client, call.control_to.clone()).await {
                    tracing::debug!(callee = %call.target, callback = %call.callback, "a stream's callee no longer listens");
                    mesh.pending.end_stream(call.call_id, |s| {
                        Some(Error::PeerDisconnected {
                            process: s.target.to_string(),
                            callback: s.callback.to_string(),
                        })
                    });
                    return;
                }
            }
        }
    }
}

// ---- the callee ------------------------------------------------------------------------

/// Takes a message on this node's `~streams` subject: credit or a cancel for a stream
/// it produces (named by the reply subject), or a probe.
pub async fn take_control(mesh: &NatsMesh, message: Message) {
    if chunks::is_probe(&message) {
        if let Some(reply) = message.reply {
            let _ = mesh.client.publish(reply, Bytes::new()).await;
        }
        return;
    }
    let Some((caller, call_id)) = message.reply.as_deref().and_then(stream_key) else {
        return;
    };
    if let Some(items) = header(&message, CREDIT) {
        match items.parse::<u32>() {
            Ok(items) => mesh.served.grant(caller, call_id, items),
            Err(e) => tracing::debug!(caller, error = %e, "ignored an unreadable stream credit"),
        }
    } else if header(&message, CANCEL).is_some() {
        mesh.served.cancel(caller, call_id);
    }
}

/// The way back for one stream's items, over NATS: its items subject.
pub struct NatsItemSink {
    mesh: Arc<NatsMesh>,
    gate: Arc<StreamGate>,
    items_to: Subject,
    /// The mesh's connection losses when the stream began.
    losses: u64,
}

impl NatsItemSink {
    /// Opens the stream whose items go to `items_to` (before the next message is taken,
    /// so that its credit finds it); `None` if that is no items subject.
    pub fn open(mesh: &Arc<NatsMesh>, items_to: &Subject) -> Option<Box<Self>> {
        let (caller, call_id) = stream_key(items_to)?;
        Some(Box::new(NatsItemSink {
            gate: mesh.served.open(caller, call_id),
            mesh: mesh.clone(),
            items_to: items_to.clone(),
            losses: mesh.losses.load(Ordering::Relaxed),
        }))
    }

    /// Uses credit for one item, waiting for it (and probing the caller meanwhile);
    /// `false` once the stream is cancelled or its caller gone.
    async fn credit(&self) -> bool {
        tokio::select! {
            // Credit at hand is taken without starting the probes' timer.
            biased;
            taken = self.gate.take_credit() => taken,
            () = self.caller_gone() => false,
        }
    }

    /// Resolves once the caller no longer listens or awaits the stream, or this node
    /// lost its connection (its credit may be lost); the stream is then cancelled.
    /// Checks every [`PROBE_EVERY`].
    async fn caller_gone(&self) {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let lost = self.connection_lost().is_some();
            if lost || !listens(&self.mesh.client, self.items_to.clone()).await {
                tracing::debug!(items = %self.items_to, lost, "a stream's caller is gone, or the connection was lost; its producer stops");
                self.gate.cancel();
                return;
            }
        }
    }

    /// Ends the stream: its items ran out, or (`failure`) it ends with an error reply.
    async fn finish(&self, failure: Option<CallbackFailure>) {
        let (headers, body) = match failure {
            Some(failure) => failure_reply(failure),
            None => {
                let mut headers = HeaderMap::new();
                headers.insert(END, "1");
                (headers, Bytes::new())
            }
        };
        let sent = self
            .mesh
            .client
            .publish_with_headers(self.items_to.clone(), headers, body)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "a stream's end dropped: the NATS client is closed");
        }
    }

    /// The failure that ends the stream if this node lost its connection since it
    /// began: items published meanwhile may be lost, and a reader must not miss one
    /// unknowingly.
    fn connection_lost(&self) -> Option<CallbackFailure> {
        (self.mesh.losses.load(Ordering::Relaxed) != self.losses).then(|| CallbackFailure {
            kind: RemoteErrorKind::Failed,
            message: format!(
                "process `{}` lost its NATS connection while streaming: items may have been lost, so the stream ends here",
                self.mesh.name
            ),
        })
    }

    /// Ends the stream with [`connection_lost`](Self::connection_lost)'s failure, if
    /// there is one; returns whether it did.
    async fn end_if_connection_lost(&self) -> bool {
        let Some(failure) = self.connection_lost() else {
            return false;
        };
        self.gate.cancel();
        self.finish(Some(failure)).await;
        true
    }

    /// Ends the stream: `item` is larger than one message holds.
    async fn refuse_item(&self, item: usize) {
        let message = format!(
            "a stream item of {item} bytes is larger than one NATS message holds ({} bytes: the server's max_payload less room for headers); items are not split over NATS: send smaller ones",
            self.mesh.chunk_size
        );
        tracing::warn!(items = %self.items_to, "{message}");
        self.gate.cancel();
        let failure = CallbackFailure {
            kind: RemoteErrorKind::Failed,
            message,
        };
        self.finish(Some(failure)).await;
    }
}

impl ItemSink for NatsItemSink {
    fn send(&mut self, item: daffi_wire::Payload) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            if item.len() > self.mesh.chunk_size {
                self.refuse_item(item.len()).await;
                return false;
            }
            let credited = self.credit().await;
            if self.end_if_connection_lost().await || !credited {
                return false;
            }
            let item = item.into_bytes();
            self.mesh
                .client
                .publish(self.items_to.clone(), item)
                .await
                .is_ok()
        })
    }

    fn cancelled(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            tokio::select! {
                biased;
                () = self.gate.cancelled() => {}
                () = self.caller_gone() => {
                    self.end_if_connection_lost().await;
                }
            }
        })
    }

    fn end(self: Box<Self>, failure: Option<CallbackFailure>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if !self.gate.is_cancelled() {
                self.finish(self.connection_lost().or(failure)).await;
            }
        })
    }
}

impl Drop for NatsItemSink {
    fn drop(&mut self) {
        if let Some((caller, call_id)) = stream_key(&self.items_to) {
            self.mesh.served.close(caller, call_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_items_subject_names_its_stream_and_nothing_else_does() {
        let subject = items_subject("_INBOX.abc.c=20a", 42);
        assert_eq!(subject.as_str(), "_INBOX.abc.c=20a.s42");
        assert_eq!(stream_key(&subject), Some(("_INBOX.abc.c=20a", 42)));
        let control = control_subject("_INBOX.abc.c=20a", 42);
        assert_eq!(stream_key(&control), Some(("_INBOX.abc.c=20a", 42)));
        assert_eq!(stream_of("c42"), Some((42, Via::Control)));
        assert!(!is_items_subject(&control));
        for other in ["_INBOX.abc.c.42", "_INBOX.abc.c.w3", "_INBOX.abc.c.s", "s1"] {
            assert!(!is_items_subject(other), "{other}");
        }
        assert!(is_streams_subject("daffi.node.w.~streams"));
        assert!(!is_streams_subject("daffi.node.w.streams"));
    }
}
