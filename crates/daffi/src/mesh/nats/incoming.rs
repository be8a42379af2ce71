//! Requests from other nodes, as the executor takes them: a message on this node's
//! subject, and its reply subject for the way back (or a stream's items subject, see
//! `streams`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Subscriber};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::caller::{CALLER, FAILED, INCOMING, TIMEOUT_MS};
use super::chunks::{self, Assemblies, Joined};
use super::flow::{self, Acks};
use super::streams::{self, NatsItemSink};
use super::subjects::Subjects;
use super::NatsMesh;
use crate::callback::{CallbackFailure, Outcome};
use crate::executor::{self, ItemSink, Request, SyncBatch};
use crate::mesh::{BoxFuture, OpenStream};
use crate::protocol::message::{self, RemoteError, RemoteErrorKind};

/// A request from another node.
pub struct NatsRequest {
    /// The request's subject: its last token names the callback.
    subject: async_nats::Subject,
    /// Where the callback's token begins in `subject`.
    token_at: usize,
    /// The callback's name, when its token has escapes (else it is the token itself).
    unescaped: Option<String>,
    /// The calling process: named by the reply subject (read when asked for: in logs),
    /// or by a header when there is none.
    caller: std::sync::OnceLock<String>,
    payload: Bytes,
    reply: Option<async_nats::Subject>,
    /// The caller wants a stream: `reply` is the stream's items subject.
    stream: bool,
    /// The caller streams arguments to the callback's `Incoming`.
    incoming: bool,
    /// NO_RETURN: where its caller awaits the ack that gives its credit back.
    acks_to: Option<async_nats::Subject>,
    /// When the caller gives up, from the timeout the request carries.
    deadline: Option<Instant>,
    /// The node that took it: its client sends the reply (shared, not cloned per
    /// request: a client's clone allocates).
    mesh: Arc<NatsMesh>,
}

impl NatsRequest {
    /// The request in `message`, received now; `None` if it names no callback.
    fn new(message: async_nats::Message, mesh: &Arc<NatsMesh>) -> Option<Box<Self>> {
        let subject = message.subject;
        let token_at = subject.rfind('.').map_or(0, |dot| dot + 1);
        let unescaped = match Subjects::name_of(&subject[token_at..])? {
            Cow::Borrowed(_) => None,
            Cow::Owned(name) => Some(name),
        };
        let header = |name: &str| message.headers.as_ref()?.get(name).map(|v| v.as_str());
        let deadline = header(TIMEOUT_MS)
            .and_then(|ms| ms.parse().ok())
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let caller = std::sync::OnceLock::new();
        if message.reply.is_none() {
            let _ = caller.set(header(CALLER).unwrap_or_default().to_string());
        }
        let (reply, acks_to) = match message.reply {
            Some(reply) if flow::is_ack_subject(&reply) => (None, Some(reply)),
            reply => (reply, None),
        };
        let stream = reply.as_deref().is_some_and(streams::is_items_subject);
        let incoming = header(INCOMING).is_some();
        Some(Box::new(NatsRequest {
            subject,
            token_at,
            unescaped,
            caller,
            payload: message.payload,
            reply,
            stream,
            incoming,
            acks_to,
            deadline,
            mesh: mesh.clone(),
        }))
    }
}

impl Request for NatsRequest {
    fn callback(&self) -> &str {
        match &self.unescaped {
            Some(name) => name,
            None => &self.subject[self.token_at..],
        }
    }

    fn caller(&self) -> &str {
        self.caller.get_or_init(|| {
            let reply = self.reply.as_ref().or(self.acks_to.as_ref());
            reply
                .and_then(|r| Subjects::caller_of(r))
                .unwrap_or_default()
        })
    }

    fn payload(&self) -> Bytes {
        self.payload.clone()
    }

    fn take_payload(&mut self) -> (Bytes, Option<daffi_wire::KeptBuffer>) {
        (std::mem::take(&mut self.payload), None)
    }

    fn wants_reply(&self) -> bool {
        self.reply.is_some()
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    fn wants_stream(&self) -> bool {
        self.stream
    }

    fn open_stream(&self) -> Option<Box<dyn ItemSink>> {
        let items_to = self.reply.as_ref().filter(|_| self.stream)?;
        Some(NatsItemSink::results(&self.mesh, items_to)?)
    }

    fn open_incoming(&self) -> Option<OpenStream> {
        let reply = self.reply.as_ref().filter(|_| self.incoming)?;
        streams::receive_arguments(&self.mesh, reply, self.callback())
    }

    /// Publishes the outcome to the caller's inbox (the client queues it; the returned
    /// future hands it over).
    fn reply(self: Box<Self>, outcome: Outcome) -> Option<BoxFuture<'static, ()>> {
        let reply = self.reply?;
        let mesh = self.mesh;
        Some(Box::pin(async move {
            let (client, chunk_size) = (&mesh.client, mesh.chunk_size);
            let sent = match outcome {
                Ok(value) => {
                    let value = value.into_bytes();
                    if value.len() > chunk_size {
                        if let Err(e) = chunks::offer(client, reply, value, chunk_size).await {
                            tracing::debug!(error = %e, "large reply dropped: the NATS client is closed");
                        }
                        return;
                    }
                    client.publish(reply, value).await
                }
                Err(failure) => {
                    let (headers, body) = failure_reply(failure);
                    client.publish_with_headers(reply, headers, body).await
                }
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "reply dropped: the NATS client is closed");
            }
        }))
    }
}

/// An error reply: the header that marks it, and the failure encoded.
pub(super) fn failure_reply(failure: CallbackFailure) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(FAILED, "1");
    let body = message::encode(&RemoteError {
        kind: failure.kind,
        message: failure.message,
    });
    (headers, body)
}

/// Hands the requests on this node's subject to the executor until the node closes;
/// once it is stopping, refuses them (their callers get `PeerStopped`). NO_RETURN
/// requests are acked once handed over (see [`flow`]).
pub async fn serve_requests(mesh: Arc<NatsMesh>, mut requests: Subscriber) {
    let mut batch = SyncBatch::default();
    let mut acks = Acks::default();
    let mut assemblies = Assemblies::default();
    let mut sweep = tokio::time::interval(chunks::STALE / 2);
    let mut closed = mesh.closed.subscribe();
    // Made once: a new one per wait would cost a registration with the channel.
    let closing = super::until(&mut closed, true);
    tokio::pin!(closing);
    loop {
        // Everything received so far is dispatched: the sync callbacks among it go to
        // the runner together.
        let next = match requests.next().now_or_never() {
            Some(next) => next,
            None => {
                batch.submit(&mesh.executor);
                for (acks_to, taken) in acks.drain() {
                    flow::send_ack(&mesh.client, acks_to, taken).await;
                }
                tokio::select! {
                    next = requests.next() => next,
                    _ = sweep.tick() => {
                        assemblies.drop_stale();
                        continue;
                    }
                    _ = &mut closing => break,
                }
            }
        };
        let Some(message) = next else { break };
        if streams::is_streams_subject(&message.subject) {
            streams::take_control(&mesh, message).await;
            continue;
        }
        let Some(message) = join_chunks(&mesh, &mut assemblies, message).await else {
            continue;
        };
        let Some(mut request) = NatsRequest::new(message, &mesh) else {
            continue;
        };
        let acks_to = request.acks_to.take();
        if mesh.is_stopped() {
            refuse_stopping(request, &mesh.name);
        } else {
            executor::serve(&mesh.executor, request, &mut batch);
        }
        if let Some((acks_to, taken)) = acks_to.and_then(|a| acks.taken(a)) {
            flow::send_ack(&mesh.client, acks_to, taken).await;
        }
    }
    batch.submit(&mesh.executor);
}

/// The message of a whole request: `message` itself, or the last chunk of a payload
/// that came in chunks (with the payload joined); `None` while chunks are to come
/// (each is answered, so that its sender sends more, as is a probe) or when a chunk is
/// refused.
async fn join_chunks(
    mesh: &NatsMesh,
    assemblies: &mut Assemblies,
    message: async_nats::Message,
) -> Option<async_nats::Message> {
    if !chunks::is_chunked(&message) {
        return Some(message);
    }
    let reply = message.reply.clone();
    let joined = if chunks::is_probe(&message) {
        Ok(Joined::Stored(reply.clone()))
    } else {
        assemblies.add(message, mesh.size_limit)
    };
    let answer = match joined {
        Ok(Joined::Whole(message)) => return Some(message),
        Ok(Joined::Stored(reply)) => reply.map(|r| (r, HeaderMap::new(), Bytes::new())),
        Err(reason) => {
            tracing::warn!(process = %mesh.name, %reason, "refused a chunk of arguments");
            let failure = CallbackFailure {
                kind: RemoteErrorKind::BadArguments,
                message: format!("arguments sent in chunks refused: {reason}"),
            };
            let (headers, body) = failure_reply(failure);
            reply.map(|r| (r, headers, body))
        }
    };
    if let Some((reply, headers, body)) = answer {
        let _ = mesh.client.publish_with_headers(reply, headers, body).await;
    }
    None
}

/// Answers a request that came after this node began stopping.
fn refuse_stopping(request: Box<NatsRequest>, name: &str) {
    let failure = CallbackFailure {
        kind: RemoteErrorKind::Stopping,
        message: format!("process `{name}` is stopping"),
    };
    if let Some(send) = request.reply(Err(failure)) {
        tokio::spawn(send);
    }
}
