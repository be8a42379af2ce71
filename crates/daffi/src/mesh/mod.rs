//! The seam between a node and "the mesh": whatever carries calls between processes.
//!
//! [`Node`](crate::node::Node) (and through it `Global`, `Call` and `AsyncResult`) and
//! the [`Executor`](crate::executor::Executor) know the mesh only as an
//! `Arc<dyn Mesh>`. The built-in controller link, [`controller::ControllerMesh`], is one
//! implementation; a second backend (a NATS cluster) implements the same trait, in the
//! terms of DESIGN.md section 2, never of frames:
//!
//! - **outgoing calls** ([`Mesh::send_call`], [`Mesh::send_broadcast`]): send a request
//!   to one provider chosen at random (a queue group), to the process named by `.on`
//!   (a per-node subject), or to every provider; register it first in a [`Pending`]
//!   table, and hand back a [`Waiter`] that the reply (or a failure) completes. Waiting
//!   for room to send never goes past the call's deadline. Never the calling node itself.
//! - **streams** ([`Mesh::open_stream`]): a request for items rather than one reply;
//!   the items arrive on an [`OpenStream`], and its [`StreamControl`] grants credit
//!   and cancels. [`Mesh::open_feed`] streams a call's arguments the other way, to the
//!   callee's `Incoming` (the callee grants credit; the request hands it over as
//!   [`Request::open_incoming`](crate::executor::Request::open_incoming)). The tables of
//!   the streams a node sends and receives are the backends' common part ([`streams`]).
//! - **control requests** ([`Mesh::control`]): listing, scheduling and cancelling
//!   PERIOD tasks, counters; whatever stores them (the controller, a KV bucket).
//! - **incoming calls**: the mesh hands each request to the executor as a
//!   [`Request`](crate::executor::Request), which carries the way back for the reply.
//! - **membership** ([`Mesh::membership`]): a [`Membership`] view kept current (a
//!   snapshot, then changes; it notifies `wait_*`), and [`NodeEvent`]s for the hooks.
//!   A backend may keep only part of it until asked for more ([`Mesh::want`]).
//! - **lifecycle**: connecting and reconnecting are the mesh's own business;
//!   [`Mesh::begin_stop`], [`Mesh::close`] and [`Mesh::finished`] end it.

mod batch;
pub mod controller;
pub(crate) mod held;
mod membership;
#[cfg(feature = "nats")]
pub mod nats;
pub(crate) mod pending;
pub(crate) mod streams;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::protocol::message::{self, ControlAnswer, ControlRequest, RemoteError, RemoteErrorKind};
#[cfg(feature = "nats")]
pub use batch::Joining;
pub use batch::{
    batch_calls, batch_replies, batch_requests, join_call, join_call_with_reply, join_reply,
    put_call_head, put_reply_head, readable_call_ids, BatchItems, Credit, Grant, ItemBatch,
    ReplyItem, CALL_ITEM_HEAD, JOINED_CALL, JOINED_REPLY, REPLY_ITEM_HEAD,
};
pub use membership::{Changes, Membership, Scope};
pub use pending::{sleep_until, Arrived, Pending, ReplyPayload, Slot, Slots, StreamItems, Waiter};

/// A stream call as sent: where its items arrive (the channel closes after the last;
/// an `Err` ends it), and how to grant credit or cancel.
pub struct OpenStream {
    /// The node producing the items.
    pub target: Arc<str>,
    /// The call's id (what a [`Feed`] of its arguments names).
    pub call_id: u64,
    /// The items, in order.
    pub items: StreamItems,
    /// Credit and cancel, to the producer.
    pub control: Box<dyn StreamControl>,
}

/// The receiver's half of a stream's flow control.
pub trait StreamControl: Send + Sync {
    /// Lets the producer send `grant` more (items and bytes); the receiver then accepts
    /// that much more.
    fn grant(&self, grant: Grant);
    /// Tells the producer to stop; the stream's items are no longer awaited.
    fn cancel(&self);
}

/// The caller's half of the arguments a call streams to its callee (the callee's
/// [`Incoming`](crate::Incoming)): `items` sends them as the callee grants credit;
/// `control.cancel()` tells the callee that the caller gave up on the call.
pub struct Feed {
    /// The items, each sent once the callee granted room for it.
    pub items: Box<dyn crate::executor::ItemSink>,
    /// Cancels the call at the callee (its `Incoming` ends with `Cancelled`).
    pub control: Box<dyn StreamControl>,
}

/// A boxed future, so that [`Mesh`] stays usable as `dyn Mesh`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The outcome of one node's part in a broadcast.
pub type NodeOutcome = (Arc<str>, Result<ReplyPayload>);

/// A broadcast's requests as sent: for each node, what waits on its reply (`None` for
/// NO_RETURN), or why its request was not sent.
pub type SentBroadcast = Vec<(Arc<str>, Result<Option<Waiter>>)>;

/// One call to make.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub callback: Arc<str>,
    pub args: daffi_wire::Payload,
    pub on: Option<String>,
    pub timeout: Option<Duration>,
    pub eta: Option<Duration>,
    pub no_reply: bool,
    /// The caller feeds the callee a stream of arguments (see [`Mesh::open_feed`]).
    pub incoming: bool,
    /// A BG call: its request may wait for the calling thread's next wait, to leave
    /// with the others it makes until then (see [`held`]).
    pub may_hold: bool,
}

/// Something that happened to a node, for the lifecycle hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// This node connected (or reconnected) to the mesh.
    Connected,
    /// This node lost the mesh (it will reconnect).
    Disconnected,
    /// Another node appeared in this node's view.
    MemberAdded(String),
    /// Another node left this node's view.
    MemberRemoved(String),
}

/// Checks that a node may announce `names` through a mesh whose messages hold at most
/// `limit` bytes.
pub fn check_callback_list<S: AsRef<str>>(names: &[S], limit: usize) -> Result<()> {
    crate::protocol::check_callback_list(names, limit).map_err(|e| Error::CallbackListTooLarge {
        size: e.size,
        limit: e.limit,
    })
}

/// The error of a call that `process` answered with an error reply (`payload`, an
/// encoded [`RemoteError`]): the same named error whatever the mesh.
pub fn remote_failure(payload: &[u8], process: &str, callback: &str) -> Error {
    let (kind, message) = match message::decode::<RemoteError>(payload) {
        Ok(e) => (e.kind, e.message),
        Err(e) => (
            RemoteErrorKind::Failed,
            format!("undecodable error reply: {e}"),
        ),
    };
    let (process, callback) = (process.to_string(), callback.to_string());
    match kind {
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
        RemoteErrorKind::NotAStream => Error::NotAStream {
            process,
            callback,
            reason: message,
        },
        RemoteErrorKind::Failed | RemoteErrorKind::Panicked => Error::Remote {
            process,
            callback,
            message,
            panicked: kind == RemoteErrorKind::Panicked,
        },
    }
}

/// What a node needs from the mesh. See the module doc for what each part means.
pub trait Mesh: Send + Sync {
    /// Sends `req` to one node: `req.on`, or a provider chosen at random. Waits for room
    /// to send no later than `deadline`. `None` for NO_RETURN (sent, nothing to wait on).
    fn send_call<'a>(
        &'a self,
        req: &'a CallRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, Result<Option<Waiter>>>;

    /// Sends `req` as [`send_call`](Mesh::send_call) does, from the calling thread, if
    /// that needs no waiting: no future, no allocation for the common case. The arguments
    /// move out of `req` into the request once it is sent. `None`: it would have to wait
    /// (nothing was sent, `req` is whole; use `send_call`).
    fn try_send_call(&self, _req: &mut CallRequest) -> Option<Result<Option<Waiter>>> {
        None
    }

    /// Sends `req` to every node serving its callback (never this one); `NoProvider` if
    /// there is none.
    fn send_broadcast<'a>(
        &'a self,
        req: &'a CallRequest,
        deadline: Option<Instant>,
    ) -> BoxFuture<'a, Result<SentBroadcast>>;

    /// Sends `req` as a stream call to one node (as [`send_call`](Mesh::send_call)
    /// picks it), granting it [`Credit::WINDOW`]; never waits.
    fn open_stream(&self, req: &CallRequest) -> Result<OpenStream>;

    /// Starts feeding the arguments stream of call `call_id` (sent with
    /// `CallRequest::incoming`, as a call or a stream), which the callee granted
    /// [`Credit::WINDOW`] with the request.
    fn open_feed(&self, call_id: u64) -> Result<Feed>;

    /// Asks the mesh itself (schedules, counters) and waits for the answer.
    fn control<'a>(
        &'a self,
        request: ControlRequest,
        what: &'a str,
    ) -> BoxFuture<'a, Result<ControlAnswer>>;

    /// Tells the other nodes the callbacks this node serves now (read when sent, so the
    /// last announce carries the latest list).
    fn announce(self: Arc<Self>);

    /// The largest message (arguments with their envelope) the mesh carries now.
    fn size_limit(&self) -> usize;

    /// This node's view of the other nodes and their callbacks.
    fn membership(&self) -> &Membership;

    /// Makes the view hold `scope`, kept current from then on (one round trip the
    /// first time). The default: the view holds everything already.
    fn want<'a>(&'a self, _scope: Scope<'a>) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the node is connected to the mesh now.
    fn is_connected(&self) -> bool;

    /// Whether stopping has begun.
    fn is_stopped(&self) -> bool;

    /// Flips to `true` when stopping begins: no new calls from here or to here.
    fn stopping(&self) -> watch::Receiver<bool>;

    /// Begins stopping: calls waiting fail with `Stopped`, and the other nodes route no
    /// new requests here. Returns `false` if already stopping.
    fn begin_stop(&self) -> bool;

    /// Says goodbye and leaves the mesh for good.
    fn close(&self);

    /// Resolves (within about a second) once what was queued after [`Mesh::close`] has gone out.
    fn finished(&self) -> BoxFuture<'_, ()>;
}
