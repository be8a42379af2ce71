//! Streams over NATS, both ways: a callback's results to its caller, and a caller's
//! arguments to its callee's `Incoming`; the sending side waits on the credit the
//! receiving side grants.
//!
//! Every message of a stream names it by a subject of its caller's inbox (the one that
//! takes replies), above all its *items subject* `<caller's inbox>.s<call id>`:
//!
//! - **the request** goes as a call's does (to the callee's subject, arguments in chunks
//!   when large). A stream request has the items subject as its reply subject (a call
//!   keeps `<inbox>.<call id>`); it grants the first window,
//!   [`Credit::WINDOW`] (items and bytes). A request with the header `Daffi-Incoming`
//!   is fed arguments; the callee grants the same window of them.
//! - **items** go as the controller link sends them (docs/PROTOCOL.md, "Streams"): a
//!   lone item is one message, the encoded item; the items ready together go in one
//!   message with the header `Daffi-Batch: 1`, whose body is the batch layout of a
//!   `StreamItem` frame with the `BATCH` flag (each item as its length, a big-endian
//!   `u32`, then its bytes; up to 64 KiB, two items at least). Every message of items
//!   (or of a part of one, below) and the end carry `Daffi-Seq: <n>`, the number of
//!   such messages of the stream before it: a receiver that finds one missing (lost
//!   with a NATS server, where the sender may not notice in time) ends the stream
//!   with `Error::Remote` and tells the sender to stop.
//! - **credit** is `Daffi-Credit: <items> <bytes>` (two decimal numbers: a [`Grant`]);
//!   the receiver counts every item against it as it arrives, and a sender past its
//!   credit (or a malformed batch) ends the stream with `Error::Protocol` and is told
//!   to stop with a cancel.
//! - **to the caller**, on the items subject: its results, then the end: an empty
//!   message with the header `Daffi-End`, or an error reply (header `Daffi-Error`, an
//!   encoded `RemoteError`), which is also how a refused request (unknown callback, not
//!   a stream, overloaded, stopping) ends it. And for the arguments, the callee's
//!   credit and cancel (`Daffi-Cancel`: it stopped reading).
//! - **to the callee**, on its `<ns>.node.<callee>.~streams` with the reply subject
//!   `<caller's inbox>.c<call id>` (which names the call): the caller's credit and
//!   cancel (it dropped its stream or gave up the call: the producer is dropped, the
//!   `Incoming` ends with `Cancelled`), and each argument and their end, as above. When
//!   the callee is gone, NATS answers "no responders" there: the call ends with
//!   `PeerDisconnected` (on the items subject, the request found nobody:
//!   `UnknownProcess`, as for a call).
//! - **probes** (requests with the header `Daffi-Probe`), every [`PROBE_EVERY`]: a caller
//!   probes the callee's `~streams` subject while its results stream is open, or while
//!   its arguments wait for credit (naming the call in the probe); a callee probes the
//!   items subject while it waits for credit or for its next result, and while its
//!   `Incoming` is read. NATS answers "no responders" at once when nobody listens (the
//!   process died): a reader's stream then ends with `PeerDisconnected`, a sender stops.
//!   A peer answers `0` for a call it no longer awaits or reads (a cancel was lost, or
//!   overtook the request), which stops the sender too.
//!
//! So both directions are the same messages with the roles swapped. Arguments wait for
//! their stream request to be published (it goes from a task), never overtaking it.
//!
//! An item larger than one NATS message (the server's `max_payload`, less room for
//! headers) goes in parts, one message each with the header `Daffi-Part: <the item's
//! size>`, in order and with nothing between them; the receiver joins them (up to its
//! `max_frame_size`) and counts the item against the credit once whole. A batch that
//! would be larger than a message goes item by item. A stream whose sender lost its
//! NATS connection meanwhile ends with an error (items may have been lost).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, Message, Subject};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::caller::is_failure;
use super::chunks::{self, PROBE};
use super::incoming::failure_reply;
use super::subjects::{Subjects, STREAMS_TOKEN};
use super::NatsMesh;
use crate::callback::CallbackFailure;
use crate::error::{Error, Result};
use crate::executor::ItemSink;
use crate::mesh::pending::{Delivery, Misfit, Received};
use crate::mesh::streams::StreamGate;
use crate::mesh::{
    remote_failure, Arrived, BatchItems, BoxFuture, CallRequest, Credit, Feed, Grant, ItemBatch,
    OpenStream, Pending, ReplyPayload, StreamControl,
};
use crate::protocol::message::RemoteErrorKind;

/// Header of a stream's last message: the items ran out.
const END: &str = "Daffi-End";
/// Header of a credit message: how many more items and bytes the producer may send
/// (`<items> <bytes>`).
const CREDIT: &str = "Daffi-Credit";
/// Header of a message of several items (the batch layout of a `StreamItem` frame).
const BATCH: &str = "Daffi-Batch";
/// Header of a part of an item too large for one message: the whole item's size.
const PART: &str = "Daffi-Part";
/// Header of every message of items (or a part) and of the end: how many such
/// messages of the stream went before it, so that the receiver notices lost ones.
const SEQ: &str = "Daffi-Seq";
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

/// The value of a `Daffi-Credit` header.
fn credit_header(grant: Grant) -> String {
    format!("{} {}", grant.items, grant.bytes)
}

/// The grant a `Daffi-Credit` header carries; `None` if it is unreadable.
fn parse_credit(value: &str) -> Option<Grant> {
    let (items, bytes) = value.split_once(' ')?;
    Some(Grant {
        items: items.parse().ok()?,
        bytes: bytes.parse().ok()?,
    })
}

/// What a stream message carries, and its sequence number: items, a part of an item of
/// at most `limit` bytes, or the end; `Err` says why it is malformed.
fn received(message: &Message, limit: usize) -> std::result::Result<(u64, Received), String> {
    let seq = header(message, SEQ)
        .and_then(|seq| seq.parse().ok())
        .ok_or("a stream message without a readable `Daffi-Seq`")?;
    if header(message, END).is_some() {
        return Ok((seq, Received::End));
    }
    let payload = message.payload.clone();
    if let Some(size) = header(message, PART) {
        let size: usize = size
            .parse()
            .map_err(|_| format!("an item's part gives an unreadable size `{size}`"))?;
        if size > limit {
            return Err(format!(
                "an item of {size} bytes, sent in parts, is larger than this node's max_frame_size ({limit} bytes)"
            ));
        }
        return Ok((
            seq,
            Received::Part {
                part: payload,
                size,
            },
        ));
    }
    let batched = header(message, BATCH).is_some();
    let items = Arrived::new(ReplyPayload::from(payload), batched)?;
    Ok((seq, Received::Items(items)))
}

/// The error that ends a stream whose message from `process` (for `callback`) does
/// not follow the one before.
fn misfit_error(misfit: Misfit, process: &str, callback: &str) -> Error {
    match misfit {
        Misfit::Malformed(why) => Error::protocol(process, why),
        Misfit::Lost { messages } => Error::Remote {
            process: process.to_string(),
            callback: callback.to_string(),
            message: format!("{messages} messages of its stream were lost on the way (a NATS server was lost meanwhile), so the stream ends here"),
            panicked: false,
        },
    }
}

/// Whether anybody listens on `subject` and still awaits the stream (named in the probe
/// for a callee, by `subject` for a caller): "no responders" or [`NOT_AWAITED`] say
/// no; no answer says yes.
async fn listens(client: &async_nats::Client, subject: Subject, named: Bytes) -> bool {
    let mut headers = HeaderMap::new();
    headers.insert(PROBE, "1");
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(named)
        .timeout(Some(PROBE_TIMEOUT));
    match client.send_request(subject, request).await {
        Ok(answer) => answer.payload.as_ref() != NOT_AWAITED,
        Err(e) => e.kind() != RequestErrorKind::NoResponders,
    }
}

// ---- the caller ------------------------------------------------------------------------

/// What a stream's reader asks of its task.
enum Command {
    Grant(Grant),
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
    fn grant(&self, grant: Grant) {
        self.pending.grant_stream(self.call_id, grant);
        let _ = self.commands.send(Command::Grant(grant));
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
            items_to: items_subject(self.inbox(), call_id),
            control_to: self.subjects.node_streams(&target).into(),
            control_reply: control_subject(self.inbox(), call_id),
        };
        let request = (self.request_headers(req), req.args.to_bytes());
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let unsent = req.incoming.then(|| {
            let (unsent, request_sent) = oneshot::channel();
            crate::sync::lock(&self.unsent).insert(call_id, request_sent);
            unsent
        });
        tokio::spawn(drive(mesh, call, request, unsent, commands_rx));
        let control = NatsStreamControl {
            pending: self.pending.clone(),
            call_id,
            commands,
        };
        Ok(OpenStream {
            target,
            call_id,
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
            let awaited = self.pending.target_of(call_id).is_some();
            return self.answer_probe(message.reply, awaited);
        }
        if self.take_feed_control(call_id, &message) {
            return;
        }
        let no_responders = message.status == Some(async_nats::StatusCode::NO_RESPONDERS);
        if no_responders && via == Via::Control {
            return self.callee_gone(call_id);
        }
        if no_responders || is_failure(&message) {
            self.pending.end_stream(call_id, |s| {
                let (process, callback) = (s.target.to_string(), s.callback.to_string());
                Some(if no_responders {
                    // In the view, but nobody took the request: it died or stopped.
                    Error::UnknownProcess { process }
                } else {
                    remote_failure(&message.payload, &process, &callback)
                })
            });
        } else {
            self.take_results(call_id, message);
        }
    }

    /// Hands the results in `message` (or their end) to this node's stream call
    /// `call_id`. Items of a stream nobody awaits any more (its cancel is on its way)
    /// are dropped; a callee past its credit, or a malformed message, ends the stream
    /// with a protocol error, and lost messages with `Remote`: either way the callee is
    /// told to stop.
    fn take_results(&self, call_id: u64, message: Message) {
        // Known before the stream may leave the table: where its cancel goes.
        let Some(target) = self.pending.target_of(call_id) else {
            return;
        };
        let taken = received(&message, self.size_limit)
            .map_err(Misfit::Malformed)
            .and_then(|(seq, received)| {
                let end = matches!(received, Received::End);
                let taken = self.pending.take_stream_message(call_id, seq, received)?;
                Ok((taken, end))
            });
        let delivery = match taken {
            Ok((Some(arrived), _)) => self.pending.stream_items(call_id, arrived),
            Ok((None, end)) => {
                if end {
                    self.pending.end_stream(call_id, |_| None);
                }
                Delivery::Delivered
            }
            Err(misfit) => {
                self.pending.end_stream(call_id, |s| {
                    Some(misfit_error(misfit, &target, &s.callback))
                });
                Delivery::Overrun
            }
        };
        if delivery == Delivery::Overrun {
            tracing::warn!(callee = %target, call_id, "a callee sent stream items past the credit it was granted, or a malformed batch (a protocol violation), or some were lost on the way; the stream is ended");
            let mut headers = HeaderMap::new();
            headers.insert(CANCEL, "1");
            let (client, to) = (self.client.clone(), self.subjects.node_streams(&target));
            let reply = control_subject(self.inbox(), call_id);
            tokio::spawn(async move {
                let _ = client
                    .publish_with_reply_and_headers(to, reply, headers, Bytes::new())
                    .await;
            });
        }
    }

    /// Nobody took a message this node sent for its call `call_id` (credit, a cancel,
    /// an argument): the callee died mid-call. The call (its results stream, or its
    /// reply) fails with `PeerDisconnected`; its arguments stop.
    fn callee_gone(&self, call_id: u64) {
        let gone = |target: &str, callback: &str| Error::PeerDisconnected {
            process: target.to_string(),
            callback: callback.to_string(),
        };
        self.feeds.cancel(self.inbox(), call_id);
        if !self
            .pending
            .end_stream(call_id, |s| Some(gone(&s.target, &s.callback)))
        {
            if let Some(call) = self.pending.take(call_id) {
                let _ = call.done.send(Err(gone(&call.target, &call.callback)));
            }
        }
    }

    /// Answers a probe of a call's peer: whether the call is still `awaited`.
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
    unsent: Option<oneshot::Sender<()>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let sent = mesh.send_stream_request(&call, request).await;
    // Its arguments (if fed) may go now.
    crate::sync::lock(&mesh.unsent).remove(&call.call_id);
    drop(unsent);
    if let Err(error) = sent {
        mesh.pending.end_stream(call.call_id, |_| Some(error));
        return;
    }
    let mut probes = tokio::time::interval_at(Instant::now() + PROBE_EVERY, PROBE_EVERY);
    // A probe that waited for its answer is not followed by a burst of others.
    probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Grant(grant)) => {
                    mesh.send_control(&call, CREDIT, &credit_header(grant)).await;
                }
                Some(Command::Cancel) => return mesh.send_control(&call, CANCEL, "1").await,
                None => return, // read to its end, and dropped
            },
            _ = probes.tick() => {
                if !mesh.pending.has_stream(call.call_id) {
                    return;
                }
                if !listens(&mesh.client, call.control_to.clone(), Bytes::new()).await {
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

// ---- the callee, and a caller's arguments -------------------------------------------

/// Takes a message on this node's `~streams` subject, for a call made to it (named by
/// the reply subject): credit for or a cancel of the results it streams; an item or the
/// end of the arguments its caller streams; or a probe.
pub async fn take_control(mesh: &NatsMesh, message: Message) {
    if chunks::is_probe(&message) {
        return answer_callers_probe(mesh, message).await;
    }
    let Some(reply) = message.reply.as_deref() else {
        return;
    };
    let Some((caller, call_id)) = stream_key(reply) else {
        return;
    };
    if let Some(value) = header(&message, CREDIT) {
        match parse_credit(value) {
            Some(grant) => mesh.served.grant(caller, call_id, grant),
            None => tracing::debug!(caller, value, "ignored an unreadable stream credit"),
        }
    } else if header(&message, CANCEL).is_some() {
        mesh.served.cancel(caller, call_id);
        mesh.incoming.cancel(caller, call_id);
    } else if is_failure(&message) {
        mesh.incoming.end(caller, call_id, |process, callback| {
            Some(remote_failure(&message.payload, process, callback))
        });
    } else {
        take_arguments(mesh, caller, call_id, &message);
    }
}

/// Hands the arguments in `message` (or their end) to the `Incoming` of `caller`'s call
/// `call_id`. Items nobody reads any more are dropped; a caller past its credit, or a
/// malformed message, ends the stream with a protocol error, and lost messages with
/// `Remote`: either way the caller is told to stop.
fn take_arguments(mesh: &NatsMesh, caller: &str, call_id: u64, message: &Message) {
    let taken = received(message, mesh.size_limit)
        .map_err(Misfit::Malformed)
        .and_then(|(seq, received)| {
            let end = matches!(received, Received::End);
            let taken = mesh.incoming.take_message(caller, call_id, seq, received)?;
            Ok((taken, end))
        });
    let delivery = match taken {
        Ok((Some(arrived), _)) => mesh.incoming.items(caller, call_id, arrived),
        Ok((None, end)) => {
            if end {
                mesh.incoming.end(caller, call_id, |_, _| None);
            }
            Delivery::Delivered
        }
        Err(misfit) => {
            mesh.incoming.end(caller, call_id, |process, callback| {
                Some(misfit_error(misfit, process, callback))
            });
            Delivery::Overrun
        }
    };
    if delivery == Delivery::Overrun {
        tracing::warn!(caller, call_id, "a caller sent stream arguments past the credit it was granted, or a malformed batch (a protocol violation), or some were lost on the way; the stream is ended");
        IncomingControl::send_to(
            &mesh.client,
            items_subject(caller, call_id),
            CANCEL,
            "1".into(),
        );
    }
}

/// Answers a probe from a caller: empty (this node listens), or [`NOT_AWAITED`] when it
/// names (in its payload) an arguments stream this node no longer reads.
async fn answer_callers_probe(mesh: &NatsMesh, probe: Message) {
    let Some(reply) = probe.reply else { return };
    let named = std::str::from_utf8(&probe.payload)
        .ok()
        .and_then(stream_key);
    let read = named.map_or(true, |(caller, call_id)| {
        mesh.incoming.is_read(caller, call_id)
    });
    let answer = if read {
        Bytes::new()
    } else {
        Bytes::from_static(NOT_AWAITED)
    };
    let _ = mesh.client.publish(reply, answer).await;
}

/// Which way a stream this node sends goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// A callee's results, to its caller's items subject.
    Results,
    /// A caller's arguments, to its callee's `~streams` subject.
    Arguments,
}

/// The items of one stream on their way out over NATS: a callee's results (to the
/// items subject) or a caller's arguments (to the callee's `~streams` subject, the
/// reply subject naming the call).
pub struct NatsItemSink {
    mesh: Arc<NatsMesh>,
    gate: Arc<StreamGate>,
    direction: Direction,
    /// Its key in its table: the peer's inbox (the caller's for results, this node's
    /// own for arguments) and the call id.
    key: (Box<str>, u64),
    /// Where items and the end go.
    to: Subject,
    /// Their reply subject: `<inbox>.c<call id>` for arguments, none for results.
    reply: Option<Subject>,
    /// The mesh's connection losses when the stream began.
    losses: u64,
    /// Messages of items (or parts) published so far: the next one's `Daffi-Seq`.
    sent: AtomicU64,
    /// Arguments of a stream call whose request is still to be published: they wait
    /// for it (this ends once it is), so that they do not overtake it.
    request_sent: Mutex<Option<oneshot::Receiver<()>>>,
}

impl NatsItemSink {
    /// Opens the stream of results whose items go to `items_to` (before the next
    /// message is taken, so that its credit finds it); `None` if that is no items
    /// subject.
    pub fn results(mesh: &Arc<NatsMesh>, items_to: &Subject) -> Option<Box<Self>> {
        let (caller, call_id) = stream_key(items_to)?;
        let key = (Box::from(caller), call_id);
        let sink = Self::open(mesh, Direction::Results, key, items_to.clone(), None);
        Some(Box::new(sink))
    }

    fn open(
        mesh: &Arc<NatsMesh>,
        direction: Direction,
        key: (Box<str>, u64),
        to: Subject,
        reply: Option<Subject>,
    ) -> Self {
        let table = match direction {
            Direction::Results => &mesh.served,
            Direction::Arguments => &mesh.feeds,
        };
        NatsItemSink {
            gate: table.open(&key.0, key.1),
            mesh: mesh.clone(),
            direction,
            key,
            to,
            reply,
            losses: mesh.losses.load(Ordering::Relaxed),
            sent: AtomicU64::new(0),
            request_sent: Mutex::default(),
        }
    }

    /// Publishes `batch`, as one message if it fits (with the header `Daffi-Batch`
    /// when it holds several items), else item by item; `false` once the client is
    /// closed.
    async fn publish_batch(&self, batch: ItemBatch) -> bool {
        let (payload, batched) = batch.into_payload();
        let fits = payload.len() <= self.mesh.chunk_size;
        match (fits, batched) {
            (true, false) => {
                self.publish_next(HeaderMap::new(), payload.into_bytes())
                    .await
            }
            (true, true) => {
                let mut headers = HeaderMap::new();
                headers.insert(BATCH, "1");
                self.publish_next(headers, payload.into_bytes()).await
            }
            (false, false) => self.publish_item(payload.into_bytes()).await,
            (false, true) => self.publish_one_by_one(payload.into_bytes()).await,
        }
    }

    /// Publishes the items of a batch too large for one message, each alone.
    async fn publish_one_by_one(&self, batch: Bytes) -> bool {
        // Built by `ItemBatch`: well formed.
        for item in BatchItems::new(batch).unwrap_or_default() {
            if !self.publish_item(item).await {
                return false;
            }
        }
        true
    }

    /// Publishes one item: as one message if it fits, else in parts, one message each
    /// with the header `Daffi-Part` (the item's size).
    async fn publish_item(&self, item: Bytes) -> bool {
        if item.len() <= self.mesh.chunk_size {
            return self.publish_next(HeaderMap::new(), item).await;
        }
        let size = item.len().to_string();
        let mut at = 0;
        while at < item.len() {
            let end = item.len().min(at + self.mesh.chunk_size);
            let mut headers = HeaderMap::new();
            headers.insert(PART, size.as_str());
            if !self.publish_next(headers, item.slice(at..end)).await {
                return false;
            }
            at = end;
        }
        true
    }

    /// Resolves once the receiver no longer listens or reads the stream, or this node
    /// lost its connection (its credit may be lost); the stream is then cancelled.
    /// Checks every [`PROBE_EVERY`].
    async fn receiver_gone(&self) {
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            let lost = self.connection_lost().is_some();
            if lost || !self.receiver_reads().await {
                tracing::debug!(to = %self.to, lost, "a stream's receiver is gone, or the connection was lost; its sending stops");
                self.gate.cancel();
                return;
            }
        }
    }

    /// Probes the receiver: whether it listens and still reads this stream.
    async fn receiver_reads(&self) -> bool {
        // A caller's items subject names the stream; a callee's `~streams` subject is
        // told which one in the probe.
        let named = match &self.reply {
            Some(reply) => Bytes::copy_from_slice(reply.as_bytes()),
            None => Bytes::new(),
        };
        listens(&self.mesh.client, self.to.clone(), named).await
    }

    /// Publishes the stream's next message of items (or a part, or the end), numbered
    /// in `Daffi-Seq`.
    async fn publish_next(&self, mut headers: HeaderMap, body: Bytes) -> bool {
        let seq = self.sent.fetch_add(1, Ordering::Relaxed);
        headers.insert(SEQ, seq.to_string().as_str());
        self.publish(headers, body).await
    }

    /// Publishes `body` (with `headers`) to the receiver.
    async fn publish(&self, headers: HeaderMap, body: Bytes) -> bool {
        let client = &self.mesh.client;
        let to = self.to.clone();
        let sent = match (&self.reply, headers.is_empty()) {
            (None, true) => client.publish(to, body).await,
            (None, false) => client.publish_with_headers(to, headers, body).await,
            (Some(reply), _) => {
                client
                    .publish_with_reply_and_headers(to, reply.clone(), headers, body)
                    .await
            }
        };
        sent.is_ok()
    }

    /// Ends the stream: its items ran out, or (`failure`) it ends with an error reply.
    async fn finish(&self, failure: Option<CallbackFailure>) {
        let published = match failure {
            Some(failure) => {
                let (headers, body) = failure_reply(failure);
                self.publish(headers, body).await
            }
            None => {
                let mut headers = HeaderMap::new();
                headers.insert(END, "1");
                self.publish_next(headers, Bytes::new()).await
            }
        };
        if !published {
            tracing::debug!(to = %self.to, "a stream's end dropped: the NATS client is closed");
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
}

impl ItemSink for NatsItemSink {
    fn credit(&self, unused: Credit) -> BoxFuture<'_, Option<Credit>> {
        Box::pin(async move {
            tokio::select! {
                // Credit at hand is taken without starting the probes' timer.
                biased;
                taken = self.gate.credit(unused) => taken,
                () = self.receiver_gone() => {
                    // A lost connection ends the stream with its failure, never a gap.
                    self.end_if_connection_lost().await;
                    None
                }
            }
        })
    }

    fn send(&self, batch: ItemBatch) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let request_sent = crate::sync::lock(&self.request_sent).take();
            if let Some(request_sent) = request_sent {
                // Its sender is dropped once the request is out.
                let _ = request_sent.await;
            }
            if self.end_if_connection_lost().await {
                return false;
            }
            self.publish_batch(batch).await
        })
    }

    fn cancelled(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            tokio::select! {
                biased;
                () = self.gate.cancelled() => {}
                () = self.receiver_gone() => {
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
        let table = match self.direction {
            Direction::Results => &self.mesh.served,
            Direction::Arguments => &self.mesh.feeds,
        };
        table.close(&self.key.0, self.key.1);
    }
}

/// The caller's cancel of a call whose arguments it streams (a feed's credit comes
/// from the callee, and is taken by [`NatsMesh::take_stream_message`]).
struct FeedControl {
    client: async_nats::Client,
    control_to: Subject,
    control_reply: Subject,
}

impl StreamControl for FeedControl {
    fn grant(&self, _grant: Grant) {
        // The callee grants a feed its credit; the caller never does.
    }

    fn cancel(&self) {
        let (client, to, reply) = (
            self.client.clone(),
            self.control_to.clone(),
            self.control_reply.clone(),
        );
        tokio::spawn(async move {
            let mut headers = HeaderMap::new();
            headers.insert(CANCEL, "1");
            let _ = client
                .publish_with_reply_and_headers(to, reply, headers, Bytes::new())
                .await;
        });
    }
}

/// The callee's credit and cancel of the arguments its caller streams, to the caller's
/// items subject of the call.
struct IncomingControl {
    mesh: Arc<NatsMesh>,
    /// The caller's inbox and the call id: the stream's key.
    key: (Arc<str>, u64),
    credit_to: Subject,
}

impl IncomingControl {
    /// Publishes `name: value` to the caller (from a task: these are called from a
    /// reader's poll).
    fn send(&self, name: &'static str, value: String) {
        Self::send_to(&self.mesh.client, self.credit_to.clone(), name, value);
    }

    /// Publishes `name: value` to a caller's items subject `to`, from a task.
    fn send_to(client: &async_nats::Client, to: Subject, name: &'static str, value: String) {
        let client = client.clone();
        tokio::spawn(async move {
            let mut headers = HeaderMap::new();
            headers.insert(name, value.as_str());
            let _ = client.publish_with_headers(to, headers, Bytes::new()).await;
        });
    }
}

impl StreamControl for IncomingControl {
    fn grant(&self, grant: Grant) {
        self.mesh.incoming.grant(&self.key.0, self.key.1, grant);
        self.send(CREDIT, credit_header(grant));
    }

    fn cancel(&self) {
        self.mesh.incoming.forget(&self.key.0, self.key.1);
        self.send(CANCEL, "1".into());
    }
}

impl NatsMesh {
    /// See [`Mesh::open_feed`](crate::mesh::Mesh::open_feed): the items go to the
    /// callee's `~streams` subject, with `<inbox>.c<call id>` as reply subject.
    pub(super) fn start_feed(&self, call_id: u64) -> Result<Feed> {
        let target = self.pending.target_of(call_id).ok_or_else(|| {
            Error::Config("the call ended before its arguments stream started".into())
        })?;
        let mesh = self.me.upgrade().ok_or(Error::Stopped)?;
        let control_to: Subject = self.subjects.node_streams(&target).into();
        let control_reply = control_subject(self.inbox(), call_id);
        let key = (Box::from(self.inbox()), call_id);
        let mut items = NatsItemSink::open(
            &mesh,
            Direction::Arguments,
            key,
            control_to.clone(),
            Some(control_reply.clone()),
        );
        *items
            .request_sent
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) =
            crate::sync::lock(&self.unsent).remove(&call_id);
        let control = FeedControl {
            client: self.client.clone(),
            control_to,
            control_reply,
        };
        Ok(Feed {
            items: Box::new(items),
            control: Box::new(control),
        })
    }

    /// Takes the callee's credit or cancel of the arguments this node streams with its
    /// call `call_id`; `false` if `message` is neither.
    fn take_feed_control(&self, call_id: u64, message: &Message) -> bool {
        if let Some(value) = header(message, CREDIT) {
            if let Some(grant) = parse_credit(value) {
                self.feeds.grant(self.inbox(), call_id, grant);
            }
            return true;
        }
        if header(message, CANCEL).is_some() {
            self.feeds.cancel(self.inbox(), call_id);
            return true;
        }
        false
    }
}

/// The arguments the caller of the request whose reply subject is `reply` streams to
/// `callback` (registered before the next message is taken, so that its items find
/// it); `None` if `reply` names no call.
pub fn receive_arguments(mesh: &Arc<NatsMesh>, reply: &str, callback: &str) -> Option<OpenStream> {
    let (inbox, token) = reply.rsplit_once('.')?;
    let call_id = match stream_of(token) {
        Some((call_id, Via::Items)) => call_id,
        _ => token.parse().ok()?,
    };
    let caller = Subjects::caller_of(reply)?;
    let key: (Arc<str>, u64) = (Arc::from(inbox), call_id);
    let items = mesh.incoming.open(&key.0, &caller, call_id, callback);
    let control = IncomingControl {
        mesh: mesh.clone(),
        key: key.clone(),
        credit_to: items_subject(inbox, call_id),
    };
    tokio::spawn(watch_feeder(mesh.clone(), key, control.credit_to.clone()));
    Some(OpenStream {
        target: Arc::from(caller),
        call_id,
        items,
        control: Box::new(control),
    })
}

/// Probes the caller feeding the arguments stream `key` every [`PROBE_EVERY`] while it
/// is read; a caller gone (or a connection lost, items with it) ends it with
/// `PeerDisconnected`.
async fn watch_feeder(mesh: Arc<NatsMesh>, key: (Arc<str>, u64), caller_at: Subject) {
    let losses = mesh.losses.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        if !mesh.incoming.is_read(&key.0, key.1) {
            return;
        }
        let lost = mesh.losses.load(Ordering::Relaxed) != losses;
        if lost || !listens(&mesh.client, caller_at.clone(), Bytes::new()).await {
            tracing::debug!(caller = %caller_at, lost, "the caller feeding a stream of arguments is gone");
            mesh.incoming.disconnect(&key.0, key.1);
            return;
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
