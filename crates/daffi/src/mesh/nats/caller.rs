//! The calling half of the seam over NATS: a request is published to the chosen node's
//! subject with this node's reply inbox; the reply (or the server's "no responders")
//! completes it through the [`Pending`](crate::mesh::Pending) table.

use std::sync::Arc;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{chunks, members, streams, NatsMesh};
use crate::error::{Error, Result};
use crate::mesh::{
    remote_failure, sleep_until, BoxFuture, CallRequest, Feed, Membership, Mesh, OpenStream, Scope,
    SentBroadcast, Waiter,
};
use crate::protocol::message::{ControlAnswer, ControlRequest};

/// Header: the calling process, on a request without a reply subject (a scheduled
/// run); the others name it in their reply subject.
pub const CALLER: &str = "Daffi-Caller";
/// Header: how long the caller waits, in milliseconds.
pub const TIMEOUT_MS: &str = "Daffi-Timeout-Ms";
/// Header of a reply: the payload is an encoded `RemoteError`.
pub const FAILED: &str = "Daffi-Error";
/// Header of a request whose caller streams arguments to the callback's `Incoming`
/// (see `streams`).
pub const INCOMING: &str = "Daffi-Incoming";

impl Mesh for NatsMesh {
    fn send_call<'a>(
        &'a self,
        req: &'a CallRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, Result<Option<Waiter>>> {
        Box::pin(async move {
            self.check_ready()?;
            let target = match self.route(req) {
                Ok(target) => target,
                Err(_) => {
                    if self.must_learn(req) {
                        members::want(self, Scope::Callback(&req.callback)).await?;
                    }
                    // Learned, or the providers arrived since the first look.
                    self.route(req)?
                }
            };
            self.request(&target, req, deadline).await
        })
    }

    fn send_broadcast<'a>(
        &'a self,
        req: &'a CallRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, Result<SentBroadcast>> {
        Box::pin(async move {
            self.check_ready()?;
            members::want(self, Scope::Callback(&req.callback)).await?;
            let targets = self.membership.providers_of(&req.callback);
            if targets.is_empty() {
                return Err(Error::NoProvider {
                    callback: req.callback.to_string(),
                    on: None,
                });
            }
            let mut sent = Vec::with_capacity(targets.len());
            for target in targets {
                let outcome = self.request(&target, req, deadline).await;
                sent.push((target, outcome));
            }
            Ok(sent)
        })
    }

    fn open_stream(&self, req: &CallRequest) -> Result<OpenStream> {
        match self.start_stream(req) {
            Err(_) if self.must_learn(req) => {
                // A stream call returns at once: its first one waits here for the
                // providers (inside the node's runtime, from the calling thread).
                let runtime = tokio::runtime::Handle::current();
                let scope = Scope::Callback(&req.callback);
                crate::blocking::wait(&runtime, "stream", members::want(self, scope))??;
                self.start_stream(req)
            }
            // Learned, or the providers arrived since the first look.
            Err(_) => self.start_stream(req),
            opened => opened,
        }
    }

    fn open_feed(&self, call_id: u64) -> Result<Feed> {
        self.start_feed(call_id)
    }

    fn control<'a>(
        &'a self,
        request: ControlRequest,
        what: &'a str,
    ) -> BoxFuture<'a, Result<ControlAnswer>> {
        Box::pin(self.answer_control(request, what))
    }

    fn announce(self: Arc<Self>) {
        let _ = self.record.send(super::RecordCommand::Renew);
    }

    fn size_limit(&self) -> usize {
        self.size_limit
    }

    fn membership(&self) -> &Membership {
        &self.membership
    }

    fn want<'a>(&'a self, scope: Scope<'a>) -> BoxFuture<'a, Result<()>> {
        Box::pin(members::want(self, scope))
    }

    fn is_connected(&self) -> bool {
        NatsMesh::is_connected(self)
    }

    fn is_stopped(&self) -> bool {
        NatsMesh::is_stopped(self)
    }

    fn stopping(&self) -> watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    fn begin_stop(&self) -> bool {
        self.stop_calls()
    }

    fn close(&self) {
        self.say_goodbye();
    }

    fn finished(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.goodbye_sent())
    }
}

impl NatsMesh {
    /// The node `req` goes to, from the view as it is.
    fn route(&self, req: &CallRequest) -> Result<Arc<str>> {
        self.membership
            .route(&self.name, &req.callback, req.on.as_deref())
    }

    /// Whether a call to `req` that found no node must first learn the providers of its
    /// callback (and then try again).
    fn must_learn(&self, req: &CallRequest) -> bool {
        !self.membership.covers(Scope::Callback(&req.callback)) && self.is_connected()
    }

    /// The error a call should see now, if it cannot be sent.
    pub(super) fn check_ready(&self) -> Result<()> {
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        if !self.is_connected() {
            return Err(self.unreachable("not connected (reconnecting)"));
        }
        Ok(())
    }

    /// Publishes `req` to `target`; what waits on the reply (`None` for NO_RETURN).
    /// Waits for room in the client's queue no later than `deadline`.
    async fn request(
        &self,
        target: &Arc<str>,
        req: &CallRequest,
        deadline: Option<Instant>,
    ) -> Result<Option<Waiter>> {
        self.check_args(req)?;
        let window = self.windows.towards(target);
        let credit = window
            .take(target, &req.callback, deadline, self.config.stall_timeout)
            .await?;
        let subject = window.call_subject(&req.callback, || {
            self.subjects.node_call(target, &req.callback)
        });
        let mut headers = self.request_headers(req);
        let mut payload = req.args.to_bytes();
        if payload.len() > self.chunk_size {
            let pushed = self.push_leading(target, &req.callback, &subject, &payload, &mut headers);
            let last = tokio::select! {
                pushed = pushed => pushed?,
                _ = sleep_until(deadline) => return Err(self.timed_out(req)),
            };
            payload = payload.slice(last..);
        }
        let reply = if req.no_reply {
            // The callee's ack gives the credit back.
            credit.forget();
            None
        } else {
            let waiter = self
                .pending
                .wait(target.clone(), req.callback.clone(), req.timeout)
                .ok_or(Error::Stopped)?
                .hold_credit(credit);
            Some(waiter)
        };
        let reply_to = match &reply {
            Some(waiter) => reply_subject(self.inbox(), waiter.call_id()),
            None => window.acks_to().clone(),
        };
        let publish = self
            .client
            .publish_with_reply_and_headers(subject, reply_to, headers, payload);
        tokio::select! {
            sent = publish => sent.map_err(|e| self.unreachable(&format!("publishing failed: {e}")))?,
            _ = sleep_until(deadline) => return Err(self.timed_out(req)),
        }
        Ok(reply)
    }

    /// `PayloadTooLarge` if the arguments of `req` are larger than `max_frame_size`.
    pub(super) fn check_args(&self, req: &CallRequest) -> Result<()> {
        let size = req.args.len();
        if size > self.size_limit {
            return Err(Error::PayloadTooLarge {
                callback: req.callback.to_string(),
                size,
                limit: self.size_limit,
            });
        }
        Ok(())
    }

    fn timed_out(&self, req: &CallRequest) -> Error {
        Error::timeout(req.callback.to_string(), req.timeout.unwrap_or_default())
    }

    /// Pushes all chunks of `payload` but the last to `target`, and marks `headers` as
    /// those of the last chunk; returns where the last chunk begins.
    pub(super) async fn push_leading(
        &self,
        target: &str,
        callback: &str,
        subject: &str,
        payload: &Bytes,
        headers: &mut HeaderMap,
    ) -> Result<usize> {
        let stream = self.client.new_inbox();
        let last = chunks::push_leading(&self.client, subject, &stream, payload, self.chunk_size)
            .await
            .map_err(|e| e.into_error(target, callback, self.size_limit))?;
        chunks::chunk_headers(headers, &stream, payload.len(), last);
        Ok(last)
    }

    /// The headers of a request: none (the fast `PUB`) unless it has a timeout, or its
    /// caller streams arguments.
    pub(super) fn request_headers(&self, req: &CallRequest) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if req.incoming {
            headers.insert(INCOMING, "1");
        }
        if let Some(timeout) = req.timeout {
            let ms = timeout.as_millis().clamp(1, u128::from(u32::MAX));
            headers.insert(TIMEOUT_MS, ms.to_string().as_str());
        }
        headers
    }

    /// Completes the call a reply on `subject` answers, or takes an ack of NO_RETURN
    /// calls (credit back), or a message of a stream call.
    pub(super) fn complete(&self, message: async_nats::Message) {
        let last_token = message.subject.rsplit('.').next().unwrap_or_default();
        if self.windows.take_ack(last_token, &message.payload) {
            return;
        }
        if let Some((stream, via)) = streams::stream_of(last_token) {
            return self.take_stream_message(stream, via, message);
        }
        let Ok(call_id) = last_token.parse() else {
            return;
        };
        let Some(entry) = self.pending.take(call_id) else {
            return; // the caller gave up (timeout) before the reply came
        };
        if chunks::is_chunked(&message) && !is_failure(&message) {
            let (client, limit) = (self.client.clone(), self.size_limit);
            tokio::spawn(async move {
                let mut entry = entry;
                let whole = tokio::select! {
                    whole = chunks::fetch_rest(&client, &message, limit) => whole,
                    _ = entry.done.closed() => return, // the caller gave up
                };
                let completion = whole
                    .map(Into::into)
                    .map_err(|e| e.into_error(&entry.target, &entry.callback, limit));
                let _ = entry.done.send(completion);
            });
            return;
        }
        let completion = if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            // In the view, but nobody listens on its subject: it died (its entry has not
            // expired yet) or it just stopped.
            Err(Error::UnknownProcess {
                process: entry.target.to_string(),
            })
        } else if is_failure(&message) {
            Err(remote_failure(
                &message.payload,
                &entry.target,
                &entry.callback,
            ))
        } else {
            Ok(message.payload.into())
        };
        let _ = entry.done.send(completion);
    }
}

/// Where the reply to the call `call_id` comes: `<inbox>.<call id>`, built in one
/// allocation of the exact size (so that its `Bytes` need no second one), without the
/// formatting machinery (a `format!` here was 4% of a call's instructions).
fn reply_subject(inbox: &str, call_id: u64) -> Subject {
    let mut digits = [0u8; 20];
    let mut first = digits.len();
    let mut rest = call_id;
    loop {
        first -= 1;
        digits[first] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let digits = &digits[first..];
    let mut reply = String::with_capacity(inbox.len() + 1 + digits.len());
    reply.push_str(inbox);
    reply.push('.');
    reply.extend(digits.iter().map(|&d| char::from(d)));
    reply.into()
}

/// Whether `message` is a reply that carries an encoded `RemoteError`.
pub fn is_failure(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .is_some_and(|h| h.get(FAILED).is_some())
}

#[cfg(test)]
mod tests {
    use super::reply_subject;

    #[test]
    fn a_reply_subject_ends_with_the_call_id() {
        for id in [0, 7, 10, 999, u64::MAX] {
            let subject = reply_subject("_INBOX.abc.node", id);
            assert_eq!(subject.as_str(), format!("_INBOX.abc.node.{id}"));
        }
    }
}
