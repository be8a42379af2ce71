//! Payloads larger than one NATS message (the server's `max_payload`, 1 MiB by default),
//! split into chunks and joined, with flow control; the caller drives both directions:
//!
//! - **arguments are pushed**: every chunk but the last is a request to the callee's
//!   subject, answered once stored, with at most [`WINDOW`] unanswered; the last chunk
//!   goes as the call itself (with its reply subject), after every answer. The callee
//!   joins the chunks in its [`Assemblies`], which drop what stays idle for [`STALE`].
//! - **results are pulled**: the reply carries the first chunk and a subject where the
//!   callee serves the rest, one request per chunk, [`WINDOW`] in flight; the callee
//!   stops serving once all were taken, or after [`STALE`] without a request.
//!
//! So a callee that dies mid-transfer fails the call within [`PROBE_AFTER`] (a probe
//! then finds no responders: `PeerDisconnected`), and a caller that dies holds the callee's
//! memory for at most [`STALE`].

use std::collections::HashMap;
use std::time::Duration;

use async_nats::client::{RequestError, RequestErrorKind};
use async_nats::{Client, HeaderMap, Message, Subscriber};
use bytes::{Bytes, BytesMut};
use futures_util::{stream, Stream, StreamExt};
use tokio::time::Instant;

use crate::error::Error;

/// Header of a chunk: the transfer it belongs to (arguments), or the subject that
/// serves the other chunks (a result).
pub const STREAM: &str = "Daffi-Stream";
/// Header of a chunk: the size of the whole payload.
pub const SIZE: &str = "Daffi-Size";
/// Header of an argument chunk: where it goes in the whole payload.
const OFFSET: &str = "Daffi-Offset";
/// Header of a probe: a request that only asks whether the peer still listens.
pub const PROBE: &str = "Daffi-Probe";
/// How long a transfer waits for a chunk (or its answer) before it checks that the peer
/// still listens: a peer that dies with chunks in flight never answers them.
const PROBE_AFTER: Duration = Duration::from_millis(250);
/// Chunks in flight per transfer: enough to keep the link busy, few enough that a
/// transfer holds at most this many chunks in the servers' and the peer's buffers.
const WINDOW: usize = 4;
/// How long a transfer may wait for its next chunk (or chunk request) before it is
/// given up and its memory freed.
pub const STALE: Duration = Duration::from_secs(10);

/// Why a transfer failed.
#[derive(Debug)]
pub enum ChunkError {
    /// The peer no longer listens: it died or stopped.
    Gone,
    /// The peer did not answer a chunk within [`STALE`].
    Slow,
    /// The peer refused a chunk (an encoded `RemoteError`).
    Refused(Bytes),
    /// The whole payload would be larger than this node's `max_frame_size`.
    TooLarge(usize),
    /// The connection failed, or the peer sent chunks that do not fit together.
    Broken(String),
}

impl From<RequestError> for ChunkError {
    fn from(e: RequestError) -> Self {
        match e.kind() {
            RequestErrorKind::NoResponders => ChunkError::Gone,
            RequestErrorKind::TimedOut => ChunkError::Slow,
            RequestErrorKind::Other => ChunkError::Broken(e.to_string()),
        }
    }
}

impl ChunkError {
    /// The error of the call to `callback` on `process` that this transfer was part of.
    pub fn into_error(self, process: &str, callback: &str, limit: usize) -> Error {
        let (process, callback) = (process.to_string(), callback.to_string());
        match self {
            ChunkError::Gone => Error::PeerDisconnected { process, callback },
            ChunkError::Slow => Error::SlowConsumer { process, callback },
            ChunkError::Refused(body) => super::super::remote_failure(&body, &process, &callback),
            ChunkError::TooLarge(size) => Error::PayloadTooLarge {
                callback,
                size,
                limit,
            },
            ChunkError::Broken(reason) => Error::unreachable(
                format!("NATS (transfer from `{process}`)"),
                format!("a large payload could not be moved: {reason}"),
            ),
        }
    }
}

/// Whether `message` is (a chunk of) a payload split in chunks.
pub fn is_chunked(message: &Message) -> bool {
    header(message, STREAM).is_some()
}

fn header<'m>(message: &'m Message, name: &str) -> Option<&'m str> {
    Some(message.headers.as_ref()?.get(name)?.as_str())
}

fn number(message: &Message, name: &str) -> Option<usize> {
    header(message, name)?.parse().ok()
}

/// The headers of argument chunk at `offset` of a payload of `size` bytes.
pub fn chunk_headers(headers: &mut HeaderMap, stream: &str, size: usize, offset: usize) {
    headers.insert(STREAM, stream);
    headers.insert(SIZE, size.to_string().as_str());
    headers.insert(OFFSET, offset.to_string().as_str());
}

/// Pushes every chunk of `payload` but the last to `subject` as transfer `stream`;
/// returns the offset of the last, which goes with the call.
pub async fn push_leading(
    client: &Client,
    subject: &str,
    stream: &str,
    payload: &Bytes,
    chunk: usize,
) -> Result<usize, ChunkError> {
    let size = payload.len();
    let last = (size - 1) / chunk * chunk;
    let mut answers = stream::iter((0..last).step_by(chunk))
        .map(|offset| {
            let mut headers = HeaderMap::new();
            chunk_headers(&mut headers, stream, size, offset);
            let request = async_nats::Request::new()
                .headers(headers)
                .payload(payload.slice(offset..offset + chunk))
                .timeout(Some(STALE));
            client.send_request(subject.to_string(), request)
        })
        .buffer_unordered(WINDOW);
    while let Some(answer) = next_answer(&mut answers, client, subject).await? {
        if super::caller::is_failure(&answer) {
            return Err(ChunkError::Refused(answer.payload));
        }
    }
    Ok(last)
}

/// The next answer of `answers` (requests to the peer listening on `subject`); after
/// each [`PROBE_AFTER`] without one, probes that the peer still listens.
async fn next_answer<S>(
    answers: &mut S,
    client: &Client,
    subject: &str,
) -> Result<Option<Message>, ChunkError>
where
    S: Stream<Item = Result<Message, RequestError>> + Unpin,
{
    loop {
        tokio::select! {
            answer = answers.next() => return Ok(answer.transpose()?),
            _ = tokio::time::sleep(PROBE_AFTER) => probe(client, subject).await?,
        }
    }
}

/// Checks that a peer listens on `subject`, and answers.
async fn probe(client: &Client, subject: &str) -> Result<(), ChunkError> {
    let mut headers = HeaderMap::new();
    headers.insert(STREAM, "probe");
    headers.insert(PROBE, "1");
    let request = async_nats::Request::new()
        .headers(headers)
        .timeout(Some(STALE));
    client.send_request(subject.to_string(), request).await?;
    Ok(())
}

/// Whether `message` is a probe; it is answered (empty) and otherwise ignored.
pub fn is_probe(message: &Message) -> bool {
    header(message, PROBE).is_some()
}

/// Argument payloads being joined on the callee, by transfer.
#[derive(Default)]
pub struct Assemblies {
    open: HashMap<String, Assembly>,
}

struct Assembly {
    /// The chunks received so far, joined.
    whole: BytesMut,
    /// The size of the whole payload.
    size: usize,
    touched: Instant,
}

/// What one chunk did to its transfer.
pub enum Joined {
    /// The payload is whole: the message of the call, carrying it.
    Whole(Message),
    /// More chunks are to come: answer the sender on this subject.
    Stored(Option<async_nats::Subject>),
}

impl Assemblies {
    /// Adds the chunk in `message` to its transfer (of at most `limit` bytes); an error
    /// (the transfer is dropped) if it does not fit.
    pub fn add(&mut self, mut message: Message, limit: usize) -> Result<Joined, String> {
        let stream = header(&message, STREAM).unwrap_or_default().to_string();
        let (Some(size), Some(offset)) = (number(&message, SIZE), number(&message, OFFSET)) else {
            self.open.remove(&stream);
            return Err("a chunk without its size or offset".into());
        };
        if size > limit {
            return Err(format!(
                "the arguments are {size} bytes, more than this node's max_frame_size ({limit})"
            ));
        }
        // Chunks come in order (NATS keeps the order of one publisher's messages), and
        // memory grows only with the bytes received.
        let assembly = self.open.entry(stream.clone()).or_insert_with(|| Assembly {
            whole: BytesMut::new(),
            size,
            touched: Instant::now(),
        });
        let end = offset.saturating_add(message.payload.len());
        if assembly.size != size || offset != assembly.whole.len() || end > size {
            let received = assembly.whole.len();
            self.open.remove(&stream);
            return Err(format!(
                "a chunk at {offset}..{end} of a {size}-byte payload after {received} bytes"
            ));
        }
        assembly.whole.extend_from_slice(&message.payload);
        assembly.touched = Instant::now();
        if assembly.whole.len() < size {
            return Ok(Joined::Stored(message.reply));
        }
        let whole = self.open.remove(&stream).map(|a| a.whole.freeze());
        message.payload = whole.unwrap_or_default();
        Ok(Joined::Whole(message))
    }

    /// Drops the transfers idle for [`STALE`] (their callers died or gave up).
    pub fn drop_stale(&mut self) {
        let before = self.open.len();
        self.open.retain(|_, a| a.touched.elapsed() < STALE);
        if self.open.len() < before {
            tracing::debug!(
                dropped = before - self.open.len(),
                "dropped arguments whose chunks stopped coming"
            );
        }
    }
}

/// Sends a result larger than `chunk` to `reply`: the first chunk, and the others to
/// whoever asks for them on a new subject, until all were taken or none is asked for
/// within [`STALE`].
pub async fn offer(
    client: &Client,
    reply: async_nats::Subject,
    payload: Bytes,
    chunk: usize,
) -> Result<(), String> {
    let stream = client.new_inbox();
    let pulls = client
        .subscribe(stream.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    headers.insert(STREAM, stream.as_str());
    headers.insert(SIZE, payload.len().to_string().as_str());
    client
        .publish_with_headers(reply, headers, payload.slice(..chunk))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(serve_pulls(client.clone(), pulls, payload, chunk));
    Ok(())
}

/// Answers the requests for the chunks of `payload` after the first.
async fn serve_pulls(client: Client, mut pulls: Subscriber, payload: Bytes, chunk: usize) {
    let mut left = payload.len().div_ceil(chunk) - 1;
    while left > 0 {
        let Ok(Some(pull)) = tokio::time::timeout(STALE, pulls.next()).await else {
            tracing::debug!("a large result was not fetched to its end; dropped");
            return;
        };
        if is_probe(&pull) {
            if let Some(reply) = pull.reply {
                let _ = client.publish(reply, Bytes::new()).await;
            }
            continue;
        }
        let offset = std::str::from_utf8(&pull.payload)
            .ok()
            .and_then(|o| o.parse::<usize>().ok())
            .filter(|o| o % chunk == 0 && *o < payload.len());
        let (Some(reply), Some(offset)) = (pull.reply, offset) else {
            continue;
        };
        let end = (offset + chunk).min(payload.len());
        if client
            .publish(reply, payload.slice(offset..end))
            .await
            .is_err()
        {
            return;
        }
        left -= 1;
    }
}

/// The whole result whose first chunk is `first` (with the headers of [`offer`]),
/// fetched from the callee; at most `limit` bytes.
pub async fn fetch_rest(
    client: &Client,
    first: &Message,
    limit: usize,
) -> Result<Bytes, ChunkError> {
    let size = number(first, SIZE).ok_or_else(|| ChunkError::Broken("no size".into()))?;
    let stream = header(first, STREAM).unwrap_or_default().to_string();
    let step = first.payload.len();
    if size > limit {
        return Err(ChunkError::TooLarge(size));
    }
    if step == 0 || step > size {
        return Err(ChunkError::Broken(format!(
            "a {step}-byte first chunk of {size} bytes"
        )));
    }
    let mut whole = BytesMut::with_capacity(size);
    whole.extend_from_slice(&first.payload);
    let mut chunks = stream::iter((step..size).step_by(step))
        .map(|offset| {
            let request = async_nats::Request::new()
                .payload(offset.to_string().into())
                .timeout(Some(STALE));
            client.send_request(stream.clone(), request)
        })
        .buffered(WINDOW);
    while let Some(chunk) = next_answer(&mut chunks, client, &stream).await? {
        if whole.len() + chunk.payload.len() > size {
            return Err(ChunkError::Broken("chunks larger than announced".into()));
        }
        whole.extend_from_slice(&chunk.payload);
    }
    if whole.len() != size {
        return Err(ChunkError::Broken("chunks smaller than announced".into()));
    }
    Ok(whole.freeze())
}
