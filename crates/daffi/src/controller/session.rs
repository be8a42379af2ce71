//! One node's connection to the controller: handshake, then routing its frames.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use super::changes::NodeView;
use super::counters::{CallCounts, Runs};
use super::linger;
use super::members::{self, Members};
use super::scheduler::Scheduler;
use super::shards::Membership;
use super::welcome::{welcome_pages, WelcomeContent};
use super::ControllerConfig;
use crate::protocol::message::{
    self, Announce, ControlAnswer, ControlError, ControlErrorCode, ControlRequest, Hello, Member,
    RefuseCode, Refused, Undeliverable, UndeliverableCode,
};
use crate::protocol::{
    callback_list_limit, check_callback_list, check_callback_names, check_name, NameKind,
    MAX_HELLO_SIZE, MEMBER_OVERHEAD,
};
use crate::transport::{BoxRead, Incoming, Opened, TLS_HANDSHAKE_RECORD};
use daffi_wire::channel::{Batch, CloseReason};
use daffi_wire::connection::DRAIN_TIMEOUT;
use daffi_wire::frame::{
    FLAG_ERROR, FLAG_INCOMING, FLAG_NO_REPLY, FLAG_REPLY_BATCH, FLAG_REQUEST_BATCH, FLAG_STREAM,
    LEN_PREFIX,
};
use daffi_wire::reader::KEEP_LARGE_BUFFERS;
use daffi_wire::{
    frame_channel, read_frames, Ended, Frame, FrameError, FrameHandler, FrameReader, FrameSender,
    Handled, Header, Kind, Outgoing, ReadError, WriterTask, MAGIC, PREAMBLE_LEN, PROTOCOL_VERSION,
};

/// State shared by every session of one controller.
pub struct Shared {
    /// Drawn at random when the controller starts, and sent in every `Welcome`: nodes
    /// tell a restart from a reconnect by it.
    pub instance: u64,
    pub config: ControllerConfig,
    pub members: Arc<Members>,
    /// Where joins, leaves and callback changes run (see `shards`).
    pub membership: Membership,
    pub scheduler: Arc<Scheduler>,
    pub calls: Arc<CallCounts>,
    /// NO_RETURN requests dropped because their node read too little (for the log).
    pub dropped_one_way: AtomicU64,
    /// The id of the next connection.
    pub next_conn_id: AtomicU64,
}

impl Shared {
    /// A fresh connection id.
    pub fn new_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The `Welcome` of a node that takes frames of up to `page_limit` bytes, with the
    /// other `members` in its view and every scheduled task; `views`: the node asked for
    /// a view.
    fn welcome(&self, members: Vec<Member>, page_limit: usize, views: bool) -> Outgoing {
        let content = WelcomeContent {
            members,
            tasks: self.scheduler.entries(),
            instance: self.instance,
            views,
        };
        welcome_pages(content, self.config.max_frame_size, page_limit)
    }

    /// Logs a NO_RETURN request dropped because its node reads too little of what is
    /// sent to it: the first, then one line per thousand (a flood must not flood the log).
    fn note_dropped_one_way(&self, frame: &Frame) {
        let calls = calls_in(frame);
        let dropped = self.dropped_one_way.fetch_add(calls, Ordering::Relaxed) + calls;
        if dropped == calls || dropped / 1000 != (dropped - calls) / 1000 {
            tracing::warn!(
                process = frame.dst(),
                callback = frame.name(),
                dropped,
                "dropped NO_RETURN calls to a node that reads too little of what is sent to it (slow consumer)"
            );
        }
    }
}

/// Serves one connection until it closes, fails, or the controller shuts down.
pub async fn serve(
    shared: Arc<Shared>,
    conn_id: u64,
    incoming: Incoming,
    shutdown: watch::Receiver<bool>,
) {
    let peer = incoming.peer().to_string();
    // Boxed: the opening's futures (a TLS handshake's among them) are larger than all
    // the rest of the session's, and would take room in its future for the connection's
    // life (2.8 KiB in all, 1.3 KiB without them and `route`'s).
    let Some((mut reader, queue, writer, node)) = Box::pin(open(&shared, incoming, &peer)).await
    else {
        return;
    };
    reader.set_max_frame_size(shared.config.max_frame_size);

    let Joining {
        name,
        callbacks,
        frame_limit,
        view,
    } = node;
    let served = callbacks.len();
    let views = view != NodeView::Legacy;
    let join = {
        let (shared, name, queue) = (shared.clone(), name.clone(), queue.clone());
        async move {
            let joining = members::Joining {
                name: &name,
                conn_id,
                queue,
                callbacks,
                frame_limit,
                view,
            };
            shared
                .members
                .join(joining, |members| {
                    shared.welcome(members, frame_limit, views)
                })
                .await
        }
    };
    let Some(joined) = shared.membership.run(join).await else {
        return; // the controller is stopping
    };
    if !joined {
        let refusal = Refused {
            code: RefuseCode::DuplicateName,
            message: format!("process name `{name}` is already connected"),
        };
        tracing::warn!(%peer, process = %name, "refused a duplicate process name");
        // Boxed, as rare: see `open`.
        Box::pin(refuse(reader, queue, writer, refusal)).await;
        return;
    }
    if is_command_node(&name) {
        tracing::debug!(%peer, process = %name, callbacks = served, "node joined");
    } else {
        tracing::info!(%peer, process = %name, callbacks = served, "node joined");
    }
    let mut runs = Runs::new(shared.calls.open(conn_id));

    let node = Joined {
        name: &name,
        conn_id,
        frame_limit,
    };
    let (reason, stopping) =
        route_frames(&shared, &node, &mut reader, &queue, &mut runs, shutdown).await;
    let leave = {
        let (members, name) = (shared.members.clone(), name.clone());
        async move { members.leave(&name, conn_id, !stopping).await }
    };
    shared.membership.run(leave).await;
    // After `leave`: the names only this node served count as no longer served.
    shared
        .members
        .with_served(|served| shared.calls.close(conn_id, served));
    if is_command_node(&name) {
        tracing::debug!(process = %name, %reason, "node left");
    } else {
        tracing::info!(process = %name, %reason, "node left");
    }
    // Let queued frames go out, but never wait on a peer that stopped reading.
    writer.drain(queue, Instant::now() + DRAIN_TIMEOUT).await;
}

/// Opens a connection: its TLS handshake if any, then the node's `Hello` and
/// `Announce`. `None` if it was refused or timed out (logged, and told to the node when
/// it is one).
async fn open(
    shared: &Shared,
    incoming: Incoming,
    peer: &str,
) -> Option<(FrameReader<BoxRead>, FrameSender, WriterTask, Joining)> {
    // The node of this very process: the controller's own, trusted without a token.
    let trusted = incoming.is_in_process();
    // One deadline for the whole opening: TLS handshake, preamble and Hello. A peer that
    // stays silent, or trickles bytes, is dropped when it passes.
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let (read, write, tls_required) = match timeout_at(
        deadline,
        incoming.open(shared.config.tls.as_deref()),
    )
    .await
    {
        Ok(Ok(Opened::Ready(r, w))) => (r, w, false),
        Ok(Ok(Opened::NotTls(r, w))) => (r, w, true),
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "refused a connection: TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::warn!(%peer, "closed a connection that did not complete its TLS handshake in time");
            return None;
        }
    };
    let (queue, writer) = frame_channel(write, shared.config.queue_limits());
    let writer = WriterTask::spawn(writer);
    // Until the peer is authenticated, it cannot make the controller buffer more than a
    // Hello's worth of bytes.
    let mut reader = FrameReader::with_buffer(
        read,
        shared.config.max_frame_size.min(MAX_HELLO_SIZE),
        HANDSHAKE_BUFFER,
    )
    .keep_large_buffers(KEEP_LARGE_BUFFERS);

    let opening = handshake(&mut reader, &shared.config, tls_required, trusted);
    match timeout_at(deadline, opening).await {
        Ok(Ok(node)) => Some((reader, queue, writer, node)),
        Ok(Err(refusal)) => {
            tracing::warn!(%peer, code = ?refusal.code, reason = %refusal.message, "refused a connection");
            if refusal.code == RefuseCode::BadHello {
                // Not a daffi node: no answer.
                return None;
            }
            refuse(reader, queue, writer, refusal).await;
            None
        }
        Err(_) => {
            tracing::warn!(%peer, "closed a connection that did not complete its handshake in time");
            None
        }
    }
}

/// A node that joined, as its session knows it.
struct Joined<'a> {
    name: &'a str,
    conn_id: u64,
    /// The largest frame both sides take: what the controller's answers to it must fit.
    frame_limit: usize,
}

/// Routes the frames of the joined `node` until its connection ends; returns why, and
/// whether because the controller is stopping.
async fn route_frames(
    shared: &Shared,
    node: &Joined<'_>,
    reader: &mut FrameReader<BoxRead>,
    queue: &FrameSender,
    runs: &mut Runs,
    shutdown: watch::Receiver<bool>,
) -> (String, bool) {
    let mut routing = Routing {
        shared,
        node,
        queue,
        runs,
        run_to_one_node: None,
        last_route: None,
    };
    // A stopping controller answers nothing more: its nodes are about to learn that the
    // controller is gone, which is the true reason.
    let reason = match read_frames(reader, queue, &shutdown, &mut routing).await {
        Ended::Stopped => return ("controller stopping".to_string(), true),
        Ended::WriterClosed(reason) => closed_reason(reason, node.name),
        Ended::PeerClosed => "connection closed".to_string(),
        // A TLS peer that closed without `close_notify` (a node that stopped or died)
        // closed like any other: every frame before it was complete.
        Ended::ReadFailed(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "connection closed".to_string()
        }
        Ended::ReadFailed(e) => format!("bad input: {e}"),
        Ended::Refused(reason) => reason,
    };
    (reason, false)
}

/// A joined node's frames, as its session routes them.
struct Routing<'a> {
    shared: &'a Shared,
    node: &'a Joined<'a>,
    queue: &'a FrameSender,
    runs: &'a mut Runs,
    /// Held while the frames read go to one node, one after the other: they leave that
    /// node's connection together, in one write, once the run's last frame is queued
    /// (written by this session when the connection is idle: no writer task woken).
    run_to_one_node: Option<Batch>,
    /// The route of the run of frames to one node being forwarded (see
    /// [`members::LastRoute`]); dropped when the run ends.
    last_route: Option<members::LastRoute>,
}

impl FrameHandler for Routing<'_> {
    type Refusal = String;

    fn frame(&mut self, frame: Frame, next_dst: Option<&[u8]>) -> Handled<String> {
        // The next frame read goes to the same node: open a batch on its connection,
        // and the frames of the run leave together when its last one is queued. (A
        // batch already open is for this very node: the frame before this one looked
        // ahead to it.) The route is kept for such a run only: a frame alone (a call
        // at a time) looks its route up without taking a handle on the node's queue.
        let run_goes_on = next_dst == Some(frame.dst().as_bytes());
        if run_goes_on && self.run_to_one_node.is_none() {
            self.run_to_one_node = self
                .shared
                .members
                .batch_via(&mut self.last_route, frame.dst());
        }
        let handled = match frame.kind() {
            kind if kind.is_node_to_node() => self.forward(frame, run_goes_on),
            _ => Handled::Wait(frame),
        };
        if !run_goes_on || !matches!(handled, Handled::Done) {
            // The run ends with this frame (or the session is about to wait: a batch
            // is never held across a wait): what it queued leaves now.
            self.run_to_one_node = None;
            self.last_route = None;
        }
        handled
    }

    fn frame_waiting(
        &mut self,
        frame: Frame,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send {
        // Boxed: such frames (control frames, and calls that cannot be forwarded at once)
        // are few, and `route`'s future (about 1.4 KiB) would otherwise take room in
        // every session's future for the session's life.
        Box::pin(route(self.shared, self.node, self.queue, self.runs, frame))
    }

    fn caught_up(&mut self) {
        self.last_route = None;
    }
}

impl Routing<'_> {
    /// Forwards a request or reply exactly as it came in, without waiting; one that
    /// cannot be delivered is given back, for [`route`] to tell its caller. In a run of
    /// frames to one node (`run_goes_on`), through the route kept for the run.
    fn forward(&mut self, frame: Frame, run_goes_on: bool) -> Handled<String> {
        if frame.src() != self.node.name {
            return Handled::Refused(spoofed(&frame));
        }
        let request = frame.kind() == Kind::Request;
        let out = Outgoing::raw(frame.raw().clone());
        let members = &self.shared.members;
        let forwarded = match run_goes_on {
            true => members.forward_via(&mut self.last_route, frame.dst(), request, out),
            false => members.forward(frame.dst(), request, out),
        };
        match forwarded {
            Ok(()) => {
                if request {
                    let calls = calls_in(&frame);
                    self.runs.count_calls(frame.name(), calls);
                    if frame.flags() & (FLAG_NO_REPLY | FLAG_STREAM | FLAG_INCOMING) == 0 {
                        linger::calls_forwarded(calls);
                    }
                } else if frame.kind() == Kind::Reply {
                    linger::replies_forwarded(replies_in(&frame));
                }
                Handled::Done
            }
            Err(_) => {
                // Handled while the session waits: it holds no node's queue meanwhile.
                self.last_route = None;
                Handled::Wait(frame)
            }
        }
    }
}

/// How many calls the request `frame` carries, read from its header: a batch of
/// NO_RETURN calls says how many in its `call_id` (never more than a quarter of the
/// frame's bytes: each call takes at least its 4-byte length); any other request is one. The
/// payload is not read: the callee checks it.
fn calls_in(frame: &Frame) -> u64 {
    if frame.flags() & FLAG_REQUEST_BATCH == 0 {
        return 1;
    }
    let most = (frame.raw().len() / 4) as u64;
    frame.call_id().clamp(1, most.max(1))
}

/// How many replies a `Reply` frame carries.
fn replies_in(frame: &Frame) -> u64 {
    match frame.flags() & FLAG_REPLY_BATCH {
        0 => 1,
        _ => frame.call_id().max(1),
    }
}

/// Why a frame whose sender is not the node it came from closes the connection.
fn spoofed(frame: &Frame) -> String {
    format!(
        "frame claims to come from `{}` (protocol violation)",
        frame.src()
    )
}

/// Whether `name` is the node of a `daffi` command (`daffi-cli-` and 8 hex digits, as
/// the CLI names them): one joins and leaves per command, so the controller logs that at
/// DEBUG, where a real node's join and leave are news at INFO.
fn is_command_node(name: &str) -> bool {
    name.strip_prefix("daffi-cli-")
        .is_some_and(|rest| rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Why the connection to `name` closed under its session; a slow consumer is logged.
fn closed_reason(reason: Option<CloseReason>, name: &str) -> String {
    let Some(reason) = reason else {
        return "connection closed".to_string();
    };
    if reason.is_slow_consumer() {
        tracing::warn!(process = %name, %reason, "disconnected a node that reads too little of what is sent to it");
    }
    reason.to_string()
}

/// After a refusal, how long, and how many bytes, the controller keeps reading (and
/// discarding) what the peer had already sent, so that closing does not reset the
/// connection before the peer has read the `Refused` frame.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: u64 = 256 * 1024;

/// Sends `refusal`, closes the writing side, then discards what the peer still sends
/// (bounded) until it closes too. Nothing read here is looked at.
async fn refuse(
    reader: FrameReader<BoxRead>,
    queue: FrameSender,
    writer: WriterTask,
    refusal: Refused,
) {
    let _ = queue
        .send(message::control_frame(Kind::Refused, &refusal))
        .await;
    if !writer.drain(queue, Instant::now() + DRAIN_TIMEOUT).await {
        return;
    }
    let mut rest = reader.into_inner().take(LINGER_BYTES);
    let _ = timeout(LINGER, tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
}

/// Room for the preamble and the largest `Hello`: all a reader holds for a peer that has
/// not authenticated.
const HANDSHAKE_BUFFER: usize = PREAMBLE_LEN + LEN_PREFIX + MAX_HELLO_SIZE;

/// A node whose opening checked out, about to join.
struct Joining {
    name: String,
    callbacks: Vec<String>,
    /// The largest frame both sides take: what the controller's answers to it must fit.
    frame_limit: usize,
    /// What it asked to be told of the others.
    view: NodeView,
}

/// Reads the preamble, the `Hello` and the `Announce` behind it, and checks them: the
/// token first, before anything in the `Hello` is acted on, and before the `Announce`
/// is read at all. `tls_required`: the listener requires TLS and this peer began in
/// plaintext; a daffi node is told so, anything else is dropped. `trusted`: the peer
/// is this process's own node, which needs no token.
async fn handshake(
    reader: &mut FrameReader<BoxRead>,
    config: &ControllerConfig,
    tls_required: bool,
    trusted: bool,
) -> Result<Joining, Refused> {
    let hello = read_hello(reader, tls_required).await?;
    // Before the name is even looked at: an unauthenticated peer can neither take nor
    // probe process names.
    if !trusted {
        authenticate(config, hello.auth_token.as_deref())?;
    }
    check_name(NameKind::Process, &hello.process_name).map_err(|message| Refused {
        code: RefuseCode::InvalidName,
        message,
    })?;
    let frame_limit = match usize::try_from(hello.max_frame_size) {
        Ok(0) | Err(_) => config.max_frame_size,
        Ok(limit) => limit.min(config.max_frame_size),
    };
    let callbacks = read_announce(reader, config.max_frame_size).await?;
    Ok(Joining {
        name: hello.process_name,
        callbacks,
        frame_limit,
        view: NodeView::asked(hello.view),
    })
}

/// Refuses a peer that is not a daffi node (it gets no answer).
fn bad_hello(message: String) -> Refused {
    Refused {
        code: RefuseCode::BadHello,
        message,
    }
}

/// Reads the preamble and the `Hello`, the reader still at its handshake size.
async fn read_hello(
    reader: &mut FrameReader<BoxRead>,
    tls_required: bool,
) -> Result<Hello, Refused> {
    let preamble = reader
        .read_exact_bytes(PREAMBLE_LEN)
        .await
        .map_err(|e| bad_hello(format!("no preamble: {e}")))?;
    if preamble[..4] != MAGIC {
        if preamble[0] == TLS_HANDSHAKE_RECORD {
            return Err(bad_hello(
                "the peer began a TLS handshake, but this controller has no certificate (tls_cert and tls_key)".into(),
            ));
        }
        return Err(bad_hello("not a daffi client (wrong magic bytes)".into()));
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
        Ok(Some(f)) => return Err(bad_hello(format!("expected Hello, got {:?}", f.kind()))),
        Ok(None) | Err(ReadError::Eof) => {
            return Err(bad_hello("closed during the handshake".into()))
        }
        Err(e) => return Err(bad_hello(format!("bad Hello frame: {e}"))),
    };
    if tls_required {
        return Err(Refused {
            code: RefuseCode::TlsRequired,
            message: "this controller requires TLS; give the node tls_ca (or tls(true) to trust the system's roots)".into(),
        });
    }
    message::decode(&frame.payload()).map_err(|e| bad_hello(format!("undecodable Hello: {e}")))
}

/// Checks the token a peer sent, when the controller has one.
fn authenticate(config: &ControllerConfig, token: Option<&str>) -> Result<(), Refused> {
    let Some(expected) = &config.auth_token else {
        return Ok(());
    };
    if expected.matches(token) {
        return Ok(());
    }
    let message = match token {
        None => "this controller requires an auth token, and the node sent none",
        Some(_) => "wrong auth token",
    };
    Err(Refused {
        code: RefuseCode::Auth,
        message: message.into(),
    })
}

/// Reads the `Announce` the node sent right behind its `Hello`, once it is
/// authenticated: the reader's buffer is set to grow once the node is busy, and it takes
/// no frame larger than a callback list may make one.
async fn read_announce(
    reader: &mut FrameReader<BoxRead>,
    max_frame_size: usize,
) -> Result<Vec<String>, Refused> {
    reader.grow_when_busy();
    reader.set_max_frame_size(announce_limit(max_frame_size));
    let frame = match reader.next().await {
        Ok(Some(f)) if f.kind() == Kind::Announce => f,
        Ok(Some(f)) => {
            return Err(bad_hello(format!(
                "expected Announce after Hello, got {:?}",
                f.kind()
            )))
        }
        Ok(None) | Err(ReadError::Eof) => {
            return Err(bad_hello("closed during the handshake".into()))
        }
        Err(ReadError::Frame(FrameError::TooLarge { size, .. })) => {
            return Err(announce_too_large(size, max_frame_size))
        }
        Err(e) => return Err(bad_hello(format!("bad Announce frame: {e}"))),
    };
    decode_announce(&frame, max_frame_size)
}

/// What a node whose callback names take too much can do.
const FEWER_NAMES: &str = "serve fewer or shorter names, or spread them over several processes";

/// The largest `Announce` frame a list within [`callback_list_limit`] makes.
fn announce_limit(max_frame_size: usize) -> usize {
    (callback_list_limit(max_frame_size) + MEMBER_OVERHEAD).min(max_frame_size)
}

/// Refuses an `Announce` frame of `size` bytes: larger than any callback list within
/// the limit makes one.
fn announce_too_large(size: usize, max_frame_size: usize) -> Refused {
    Refused {
        code: RefuseCode::CallbackListTooLarge,
        message: format!(
            "an Announce of {size} bytes, more than callback names may take (at most {} bytes, each name counting its length plus 4); {FEWER_NAMES}",
            callback_list_limit(max_frame_size)
        ),
    }
}

/// Decodes an `Announce` and checks its names and what they take together, without
/// decoding one larger than any valid list makes.
fn decode_announce(frame: &Frame, max_frame_size: usize) -> Result<Vec<String>, Refused> {
    let size = frame.raw().len() - LEN_PREFIX;
    if size > announce_limit(max_frame_size) {
        return Err(announce_too_large(size, max_frame_size));
    }
    let announce: Announce = message::decode(&frame.payload())
        .map_err(|e| bad_hello(format!("undecodable Announce: {e}")))?;
    check_callback_names(&announce.callbacks).map_err(|message| Refused {
        code: RefuseCode::InvalidName,
        message,
    })?;
    check_callback_list(&announce.callbacks, max_frame_size).map_err(|e| Refused {
        code: RefuseCode::CallbackListTooLarge,
        message: format!("{e}; {FEWER_NAMES}"),
    })?;
    Ok(announce.callbacks)
}

/// Handles one frame from a joined node. `Err` closes the connection with that reason.
async fn route(
    shared: &Shared,
    node: &Joined<'_>,
    own_queue: &FrameSender,
    runs: &mut Runs,
    frame: Frame,
) -> Result<(), String> {
    match frame.kind() {
        kind if kind.is_node_to_node() => {
            if frame.src() != node.name {
                return Err(spoofed(&frame));
            }
            // The frame goes out exactly as it came in: no re-encoding. Replies go to
            // leaving nodes too: they finish what they started.
            // Never waits for room: a destination that is full gets no request (its
            // caller hears `SlowConsumer`), and one past its hard limit is closed.
            let request = frame.kind() == Kind::Request;
            let out = Outgoing::raw(frame.raw().clone());
            match shared.members.forward(frame.dst(), request, out) {
                Ok(()) if request => runs.count_calls(frame.name(), calls_in(&frame)),
                Ok(()) => {}
                Err(code) => undeliverable(shared, own_queue, &frame, code).await,
            }
            Ok(())
        }
        Kind::Leaving => {
            let (members, name, conn_id) =
                (shared.members.clone(), node.name.to_string(), node.conn_id);
            let mark = async move { members.mark_leaving(&name, conn_id).await };
            shared.membership.run(mark).await;
            Ok(())
        }
        Kind::Announce => {
            let callbacks = decode_announce(&frame, shared.config.max_frame_size)
                .map_err(|refusal| format!("refused its Announce: {}", refusal.message))?;
            let (members, name, conn_id) =
                (shared.members.clone(), node.name.to_string(), node.conn_id);
            let update = async move { members.update(&name, conn_id, callbacks).await };
            shared.membership.run(update).await;
            Ok(())
        }
        Kind::ControlRequest => {
            // A stats request from this node counts its own requests so far: the
            // tally adds its running count to every snapshot.
            let request: ControlRequest = message::decode(&frame.payload())
                .map_err(|e| format!("undecodable ControlRequest: {e}"))?;
            let answer = control(shared, node, request).await;
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
                dst: node.name,
                name: "",
            };
            let reply = Outgoing::new(&header, body);
            let _ = own_queue.send(reply).await;
            Ok(())
        }
        Kind::Goodbye => Err("said goodbye".into()),
        other => Err(format!("unexpected {other:?} frame from a node")),
    }
}

/// Tells a caller that its request was not delivered (its destination is gone,
/// stopping, or not reading). Replies to gone callers are dropped: nobody waits for them.
async fn undeliverable(
    shared: &Shared,
    own_queue: &FrameSender,
    frame: &Frame,
    code: UndeliverableCode,
) {
    let request = frame.kind() == Kind::Request;
    if request && frame.flags() & FLAG_NO_REPLY != 0 && code == UndeliverableCode::SlowConsumer {
        shared.note_dropped_one_way(frame);
        return;
    }
    if !request || frame.flags() & FLAG_NO_REPLY != 0 {
        tracing::debug!(dst = frame.dst(), kind = ?frame.kind(), "dropped a frame for a gone node");
        return;
    }
    let body = message::encode(&Undeliverable { code });
    let answer = |call_id: u64| {
        let header = Header {
            kind: Kind::Undeliverable,
            flags: 0,
            call_id,
            timeout_ms: 0,
            src: "",
            dst: frame.src(),
            name: frame.dst(),
        };
        Outgoing::new(&header, body.clone())
    };
    if frame.flags() & FLAG_REQUEST_BATCH == 0 {
        let _ = own_queue.send(answer(frame.call_id())).await;
        return;
    }
    // A batch of calls that want replies: each call is answered, as it would have been
    // alone (as far as the batch can be read: a caller that sent a malformed one hears
    // about the calls it can tell), in one frame of answers.
    let answers: Vec<Outgoing> = crate::mesh::readable_call_ids(&frame.payload())
        .into_iter()
        .map(answer)
        .collect();
    if !answers.is_empty() {
        let _ = own_queue.send(Outgoing::joined(answers)).await;
    }
}

/// The most a `stats` or `tasks` answer spends on names: 256 KiB, and at most a
/// quarter of the largest frame its node takes.
fn answer_budget(frame_limit: usize) -> usize {
    ANSWER_BUDGET.min(frame_limit / 4)
}

/// See [`answer_budget`].
const ANSWER_BUDGET: usize = 256 * 1024;

/// Carries out a request the controller answers itself for the node `from`.
async fn control(
    shared: &Shared,
    from: &Joined<'_>,
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
            .schedule(from.name, callback, args, on, timing)
            .await
            .map(|task_id| ControlAnswer::Scheduled { task_id })
            .map_err(|e| ControlError {
                code: ControlErrorCode::Invalid,
                task_id: None,
                message: e.0,
            }),
        ControlRequest::Cancel { task_id } => {
            if shared.scheduler.cancel(task_id).await {
                Ok(ControlAnswer::Cancelled)
            } else {
                Err(ControlError {
                    code: ControlErrorCode::TaskNotFound,
                    task_id: Some(task_id),
                    message: format!("no scheduled task {task_id} (it finished or was cancelled)"),
                })
            }
        }
        ControlRequest::ListTasks { after } => {
            let (tasks, omitted_tasks) = shared
                .scheduler
                .list(after, answer_budget(from.frame_limit));
            Ok(ControlAnswer::Tasks {
                tasks,
                omitted_tasks,
            })
        }
        ControlRequest::Restore { tasks, tombstones } => {
            let restored = shared.scheduler.restore(from.name, tasks, tombstones).await;
            Ok(ControlAnswer::Restored {
                restored: restored.restored,
                refused: restored.refused,
            })
        }
        ControlRequest::Subscribe { all, names } => {
            shared
                .members
                .subscribe(from.name, from.conn_id, all, names)
                .await;
            Ok(ControlAnswer::Subscribed)
        }
        ControlRequest::Stats => {
            let counts = shared
                .members
                .with_served(|served| shared.calls.snapshot(served));
            let report = counts.report(answer_budget(from.frame_limit));
            Ok(ControlAnswer::Stats {
                calls: report.calls,
                other_calls: report.other_calls,
                omitted_names: report.omitted_names,
            })
        }
    }
}
