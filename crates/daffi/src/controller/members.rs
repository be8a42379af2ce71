//! Who is connected, what each node serves, and where to send its frames.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{watch, Notify};

use super::changes::{frames_for, snapshot_frames, Change, NodeView, COALESCE_WINDOW};
use crate::mesh::{put_call_head, put_reply_head, ReplyItem, CALL_ITEM_HEAD, REPLY_ITEM_HEAD};
use crate::protocol::message::{Member, MembershipEvent, UndeliverableCode};
use crate::sync::{lock, read, write};
use bytes::{Bytes, BytesMut};
use daffi_wire::frame::{
    FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY_BATCH, FLAG_REQUEST_BATCH, LEN_PREFIX,
};
use daffi_wire::{Batch, Frame, FrameSender, Header, Kind, Outgoing, Push};

/// The writer queue of one connection.
pub type Queue = FrameSender;

struct Route {
    conn_id: u64,
    queue: Queue,
    callbacks: Vec<String>,
    /// The node is stopping: no new requests go to it.
    leaving: bool,
    /// The largest frame the node takes.
    frame_limit: usize,
    /// What the node is told of the others.
    view: NodeView,
    /// The last change (by `seq`) the node was told of, or that its snapshot held.
    synced: AtomicU64,
}

impl Route {
    /// Queues what the node called `name` is owed of `changes` (those after its
    /// `synced`), and marks it told up to `last`.
    fn tell(&self, name: &str, changes: &[Arc<Change>], last: u64) {
        let from = self.synced.swap(last, Ordering::Relaxed);
        let owed = &changes[changes.partition_point(|c| c.seq <= from)..];
        if let Some(frames) = frames_for(name, &self.view, self.frame_limit, owed) {
            deliver(&self.queue, frames);
        }
    }
}

/// The membership changes not yet sent.
#[derive(Default)]
struct Unsent {
    changes: Vec<Arc<Change>>,
    /// The `seq` of the last change recorded.
    last: u64,
}

/// Routes by node name, hashed by a seeded fast hash (names come from the network).
type RouteTable = HashMap<Arc<str>, Route, foldhash::fast::RandomState>;

/// How many nodes serve each callback name, hashed the same way: a join or leave counts
/// every name of its node, so a node with thousands of names makes thousands of lookups.
type ProviderCounts = HashMap<Box<str>, usize, foldhash::fast::RandomState>;

/// The routing table. Lookups take a read lock; changes are serialized by an async lock
/// so that every node sees membership events in the same order, and a node's `Welcome`
/// is queued before anyone can route a frame to it.
#[derive(Default)]
pub struct Members {
    routes: RwLock<RouteTable>,
    /// Counts the times `routes` was taken to be changed (bumped under its write lock):
    /// a [`LastRoute`] made at another count may be stale.
    writes: AtomicU64,
    /// How many connected nodes serve each callback name (changed with `routes`, under
    /// `changes`), for [`Members::with_served`].
    providers: Mutex<ProviderCounts>,
    changes: tokio::sync::Mutex<()>,
    /// Changes recorded and not yet sent (changed under `changes`).
    unsent: Mutex<Unsent>,
    /// Wakes [`Members::send_changes`] when a change is recorded.
    due: Notify,
}

/// A session's handle on the route of a run of frames read one after the other for
/// the same node: while the routes are unchanged, they find it without a hash of the
/// name. Dropped when the run ends (it holds the node's queue open meanwhile).
pub struct LastRoute {
    name: Arc<str>,
    writes: u64,
    queue: Queue,
    leaving: bool,
    frame_limit: usize,
}

impl Members {
    /// Queues `frame` for the node called `name`, as [`forward`](Self::forward) does,
    /// finding its route through `last` when that is the route of `name` and the routes
    /// did not change since it was made; `last` then holds the route found.
    pub fn forward_via(
        &self,
        last: &mut Option<LastRoute>,
        name: &str,
        request: bool,
        frame: Outgoing,
    ) -> Result<(), UndeliverableCode> {
        let routes = read(&self.routes);
        let Some(route) = self.route_via(&routes, last, name) else {
            return Err(UndeliverableCode::UnknownProcess);
        };
        queue_for(
            &route.queue,
            route.leaving,
            route.frame_limit,
            request,
            frame,
        )
    }

    /// Opens a [`Batch`] on the connection of the node called `name`, if it is
    /// connected: more frames for it are at hand, and leave together, written when the
    /// batch is dropped. Finds the route through `last`, as
    /// [`forward_via`](Self::forward_via) does.
    pub fn batch_via(&self, last: &mut Option<LastRoute>, name: &str) -> Option<Batch> {
        let routes = read(&self.routes);
        self.route_via(&routes, last, name)
            .map(|route| route.queue.batch())
    }

    /// The route of `name`: `last` if it is that route and the routes are as they were
    /// when it was made (the count of changes cannot move under the read lock held),
    /// else looked up and kept in `last`.
    fn route_via<'a>(
        &self,
        routes: &RouteTable,
        last: &'a mut Option<LastRoute>,
        name: &str,
    ) -> Option<&'a LastRoute> {
        let writes = self.writes.load(Ordering::Acquire);
        let current = matches!(last, Some(l) if l.writes == writes && *l.name == *name);
        if !current {
            *last = routes.get_key_value(name).map(|(key, route)| LastRoute {
                name: key.clone(),
                writes,
                queue: route.queue.clone(),
                leaving: route.leaving,
                frame_limit: route.frame_limit,
            });
        }
        last.as_ref()
    }

    /// The routing table, to change it: every change counts (see [`LastRoute`]).
    fn routes_mut(&self) -> std::sync::RwLockWriteGuard<'_, RouteTable> {
        let routes = write(&self.routes);
        self.writes.fetch_add(1, Ordering::AcqRel);
        routes
    }

    /// Queues `frame` for the node called `name`, without taking a handle on its queue
    /// (nothing to clone and drop per frame), and never waits. `request`: a new
    /// request, which a leaving node does not take, nor a node whose queue is full (it
    /// reads too little: `SlowConsumer`). Anything else (a reply) is queued past the
    /// byte limit; past the hard limit, the node is disconnected instead. A frame for an
    /// idle connection is written here, under the read lock (the write never waits),
    /// unless a batch is open on it ([`batch_via`](Self::batch_via)). `Err`: not queued, and
    /// why.
    pub fn forward(
        &self,
        name: &str,
        request: bool,
        frame: Outgoing,
    ) -> Result<(), UndeliverableCode> {
        let routes = read(&self.routes);
        let Some(route) = routes.get(name) else {
            return Err(UndeliverableCode::UnknownProcess);
        };
        queue_for(
            &route.queue,
            route.leaving,
            route.frame_limit,
            request,
            frame,
        )
    }

    /// A node to run `callback` on: `on` if it is connected and serves it, otherwise a
    /// random provider. Returns its name and queue.
    pub fn pick_provider(&self, callback: &str, on: Option<&str>) -> Option<(Arc<str>, Queue)> {
        let routes = read(&self.routes);
        let serves = |r: &Route| !r.leaving && r.callbacks.iter().any(|c| c == callback);
        if let Some(on) = on {
            let (name, route) = routes.get_key_value(on)?;
            return serves(route).then(|| (name.clone(), route.queue.clone()));
        }
        let providers: Vec<(&Arc<str>, &Route)> =
            routes.iter().filter(|(_, r)| serves(r)).collect();
        if providers.is_empty() {
            return None;
        }
        let (name, route) = providers[fastrand::usize(..providers.len())];
        Some((name.clone(), route.queue.clone()))
    }

    /// Runs `f` with a test of whether some connected node (stopping ones included)
    /// serves a callback name. Joins and leaves wait while it runs; routing does not.
    pub fn with_served<R>(&self, f: impl FnOnce(&dyn Fn(&str) -> bool) -> R) -> R {
        let providers = lock(&self.providers);
        f(&|name| providers.contains_key(name))
    }

    /// A snapshot of every member that takes requests.
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<Member> {
        self.members_in(&NodeView::All, "")
    }

    /// The members that take requests in `view`, but `except`.
    fn members_in(&self, view: &NodeView, except: &str) -> Vec<Member> {
        read(&self.routes)
            .iter()
            .filter(|(name, r)| !r.leaving && &***name != except && view.holds(&r.callbacks))
            .map(|(name, r)| Member {
                name: name.to_string(),
                callbacks: r.callbacks.clone(),
            })
            .collect()
    }

    /// Sends the changes recorded, batched, every [`COALESCE_WINDOW`] at most, until
    /// `stop` flips.
    pub async fn send_changes(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.due.notified() => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() {
                    return;
                },
            }
            tokio::time::sleep(COALESCE_WINDOW).await;
            let _serialized = self.changes.lock().await;
            self.flush();
        }
    }

    /// Tells every node the changes recorded since it was last told that concern it, in
    /// one batch (per page) each. Called under `changes`.
    fn flush(&self) {
        let (changes, last) = {
            let mut unsent = lock(&self.unsent);
            (std::mem::take(&mut unsent.changes), unsent.last)
        };
        if changes.is_empty() {
            return;
        }
        for (name, route) in read(&self.routes).iter() {
            route.tell(name, &changes, last);
        }
    }

    /// Records a change about `about` (whose callbacks are `names`) for every node
    /// whose view it concerns. Called under `changes`.
    fn record(&self, about: &Arc<str>, names: Vec<String>, event: &MembershipEvent) {
        let mut unsent = lock(&self.unsent);
        unsent.last += 1;
        let change = Change::new(unsent.last, about.clone(), names, event);
        unsent.changes.push(Arc::new(change));
        self.due.notify_one();
    }

    /// Widens the view of the node called `name` (if this connection still owns it):
    /// queues what it is owed so far, then the members in the part added (`all`, or
    /// the providers of `names`). Whatever it is sent later keeps that part current.
    pub async fn subscribe(&self, name: &str, conn_id: u64, all: bool, names: Vec<String>) {
        let _serialized = self.changes.lock().await;
        let added = {
            let mut routes = self.routes_mut();
            let Some(route) = routes.get_mut(name).filter(|r| r.conn_id == conn_id) else {
                return;
            };
            let unsent = lock(&self.unsent);
            route.tell(name, &unsent.changes, unsent.last);
            route.view.widen(all, names)
        };
        let Some(added) = added else { return };
        let members = self.members_in(&added, name);
        let routes = read(&self.routes);
        if let Some(route) = routes.get(name) {
            if let Some(frames) = snapshot_frames(members, route.frame_limit) {
                deliver(&route.queue, frames);
            }
        }
    }

    /// Adds a node: queues its `Welcome`, which `welcome` makes from the other members
    /// in its view (in the order of every change, schedule changes included), makes it
    /// routable, then records its joining for the others. Returns `false` (and changes
    /// nothing) when the name is taken.
    pub async fn join(
        &self,
        node: Joining<'_>,
        welcome: impl FnOnce(Vec<Member>) -> Outgoing,
    ) -> bool {
        let Joining {
            name,
            conn_id,
            queue,
            callbacks,
            frame_limit,
            view,
        } = node;
        let _serialized = self.changes.lock().await;
        if read(&self.routes).contains_key(name) {
            return false;
        }
        // Every page at once, as one frame (which always passes when nothing is held):
        // nothing comes between the pages, and the queue's limit cannot cut them off.
        // The snapshot holds every change recorded so far: the node is owed none of them.
        let welcome = welcome(self.members_in(&view, name));
        let synced = lock(&self.unsent).last;
        if !deliver(&queue, welcome) {
            return true; // the connection died already; the session will call `leave`
        }
        let member = Member {
            name: name.to_string(),
            callbacks: callbacks.clone(),
        };
        self.count_providers(&callbacks, true);
        let name: Arc<str> = Arc::from(name);
        self.routes_mut().insert(
            name.clone(),
            Route {
                conn_id,
                queue,
                callbacks: callbacks.clone(),
                leaving: false,
                frame_limit,
                view,
                synced: AtomicU64::new(synced),
            },
        );
        self.record(&name, callbacks, &MembershipEvent::Joined(member));
        true
    }

    /// Makes a change to the scheduled tasks in the order of membership changes, then
    /// tells every member (the one that asked too) each `Schedule` frame it returns. A
    /// node joining meanwhile gets either the frames or the change in its `Welcome`,
    /// never neither. A member whose frame limit is under a frame does not get it (and
    /// misses that task in its book).
    pub async fn change_schedule<R>(&self, change: impl FnOnce() -> (R, Vec<Outgoing>)) -> R {
        let _serialized = self.changes.lock().await;
        let (result, frames) = change();
        let routes = read(&self.routes);
        for frame in frames {
            let size = frame.len() - LEN_PREFIX;
            for (name, route) in routes.iter() {
                if size > route.frame_limit {
                    tracing::warn!(process = %name, size, limit = route.frame_limit, "a scheduled task is larger than a node's frame limit: it is left out of its schedule book (use the same max_frame_size everywhere)");
                    continue;
                }
                deliver(&route.queue, frame.clone());
            }
        }
        result
    }

    /// Replaces the callbacks a node serves and records the change for the others.
    pub async fn update(&self, name: &str, conn_id: u64, callbacks: Vec<String>) {
        let _serialized = self.changes.lock().await;
        let before = {
            let mut routes = self.routes_mut();
            match routes.get_mut(name) {
                // The same list again (a node says it once connected): nothing changed.
                Some(r) if r.conn_id == conn_id && r.callbacks != callbacks => {
                    std::mem::replace(&mut r.callbacks, callbacks.clone())
                }
                _ => return,
            }
        };
        self.count_providers(&before, false);
        self.count_providers(&callbacks, true);
        let event = MembershipEvent::Updated(Member {
            name: name.to_string(),
            callbacks: callbacks.clone(),
        });
        // Nodes that knew it as a provider of a name it dropped are told too.
        let mut names = before;
        names.extend(callbacks);
        self.record(&Arc::from(name), names, &event);
    }

    /// Marks a node as stopping and tells everyone else, so that nobody sends it new
    /// requests while it finishes the ones it has.
    pub async fn mark_leaving(&self, name: &str, conn_id: u64) {
        let _serialized = self.changes.lock().await;
        let callbacks = {
            let mut routes = self.routes_mut();
            match routes.get_mut(name) {
                Some(r) if r.conn_id == conn_id && !r.leaving => {
                    r.leaving = true;
                    r.callbacks.clone()
                }
                _ => return,
            }
        };
        let event = MembershipEvent::Leaving {
            name: name.to_string(),
        };
        self.record(&Arc::from(name), callbacks, &event);
    }

    /// Removes a node (if this connection still owns the name) and, with `announce`,
    /// tells everyone else. A stopping controller does not announce: its nodes learn
    /// that the controller is gone, not that their peers left.
    pub async fn leave(&self, name: &str, conn_id: u64, announce: bool) {
        let _serialized = self.changes.lock().await;
        let (name, route) = {
            let mut routes = self.routes_mut();
            match routes.get(name) {
                Some(r) if r.conn_id == conn_id => match routes.remove_entry(name) {
                    Some(gone) => gone,
                    None => return,
                },
                _ => return,
            }
        };
        self.count_providers(&route.callbacks, false);
        if !announce {
            return;
        }
        let event = MembershipEvent::Left {
            name: name.to_string(),
        };
        self.record(&name, route.callbacks, &event);
    }

    /// Counts one provider more (`added`) or less of each of `callbacks`. Never called
    /// under the `routes` lock: a stats request holding `providers` must not stall
    /// routing.
    fn count_providers(&self, callbacks: &[String], added: bool) {
        let mut providers = lock(&self.providers);
        for name in callbacks {
            if added {
                // A name already served is only counted: no key allocated for it.
                match providers.get_mut(name.as_str()) {
                    Some(n) => *n += 1,
                    None => {
                        providers.insert(name.as_str().into(), 1);
                    }
                }
            } else if let Some(n) = providers.get_mut(name.as_str()) {
                *n -= 1;
                if *n == 0 {
                    providers.remove(name.as_str());
                }
            }
        }
    }
}

/// A node about to join, as its session knows it.
pub struct Joining<'a> {
    pub name: &'a str,
    pub conn_id: u64,
    pub queue: Queue,
    pub callbacks: Vec<String>,
    /// The largest frame the node takes.
    pub frame_limit: usize,
    /// What it asked to be told of the others.
    pub view: NodeView,
}

/// Queues `frame` on a node's `queue` (`leaving`: the node is stopping), as
/// [`Members::forward`] says: a request only if the node is not leaving and its queue
/// has room; anything else (replies go to leaving nodes too: they finish what they
/// started) past the byte limit (see [`deliver`]).
#[inline(always)]
fn queue_for(
    queue: &Queue,
    leaving: bool,
    frame_limit: usize,
    request: bool,
    frame: Outgoing,
) -> Result<(), UndeliverableCode> {
    if request && leaving {
        return Err(UndeliverableCode::Stopping);
    }
    if !request {
        if frame.head().len() > frame_limit.saturating_add(LEN_PREFIX) {
            return deliver_over_limit(queue, frame_limit, frame);
        }
        return match deliver(queue, frame) {
            true => Ok(()),
            false => Err(UndeliverableCode::UnknownProcess),
        };
    }
    // A forwarded frame is all in its head (`Outgoing::raw`).
    if frame.head().len() > frame_limit.saturating_add(LEN_PREFIX) {
        return queue_over_limit(queue, frame_limit, frame);
    }
    push_request(queue, frame)
}

/// Queues the request `frame`.
fn push_request(queue: &Queue, frame: Outgoing) -> Result<(), UndeliverableCode> {
    match queue.push(frame) {
        Push::Sent => Ok(()),
        Push::Full(_) => Err(UndeliverableCode::SlowConsumer),
        Push::Closed => Err(UndeliverableCode::UnknownProcess),
    }
}

/// Queues the request `frame`, larger than `frame_limit`, the limit of its node: split
/// to fit if it is a batch ([`split_to_fit`]), as it is otherwise. Out of the way of
/// the requests that fit (all of them, when every process has the same limit).
#[cold]
#[inline(never)]
fn queue_over_limit(
    queue: &Queue,
    frame_limit: usize,
    frame: Outgoing,
) -> Result<(), UndeliverableCode> {
    match split_to_fit(&frame, frame_limit) {
        Some(pieces) => queue_pieces(queue, pieces),
        None => push_request(queue, frame),
    }
}

/// The batch request `frame` (docs/PROTOCOL.md, "Batches of NO_RETURN calls" and
/// "Batches of calls that want replies"), larger than `frame_limit`, the limit of the
/// node it goes to, as batches and lone requests within it, the calls in order: its
/// caller joined the calls up to its own limit, and the node's reader would refuse the
/// frame and lose its connection (every caller's calls in flight to it). A NO_RETURN
/// call larger than the limit on its own (which a caller never joins) and a malformed
/// batch of NO_RETURN calls (which the node would drop whole) are dropped here, with a
/// WARN; a call that wants a reply larger than the limit goes alone, as it would have
/// without batches, and a malformed batch of them goes as it is (its node drops it).
/// `None` when `frame` is not a batch: it goes as it is.
fn split_to_fit(frame: &Outgoing, frame_limit: usize) -> Option<Vec<Outgoing>> {
    // A forwarded frame is all in its head (`Outgoing::raw`).
    let frame = Frame::parse(frame.head().clone()).ok()?;
    if frame.kind() != Kind::Request || frame.flags() & FLAG_REQUEST_BATCH == 0 {
        return None;
    }
    let one_way = frame.flags() & FLAG_NO_REPLY != 0;
    let calls: Vec<(u64, Bytes)> = if one_way {
        match crate::mesh::batch_calls(frame.flags(), frame.call_id(), frame.payload()) {
            Ok(calls) => calls.map(|args| (0, args)).collect(),
            Err(why) => {
                tracing::warn!(
                    caller = frame.src(),
                    process = frame.dst(),
                    callback = frame.name(),
                    "dropped a malformed batch of NO_RETURN calls: {why}"
                );
                return Some(Vec::new());
            }
        }
    } else {
        crate::mesh::batch_requests(frame.flags(), frame.call_id(), frame.payload())
            .ok()?
            .collect()
    };
    let header = |flags: u8, call_id: u64| Header {
        kind: Kind::Request,
        flags,
        call_id,
        timeout_ms: frame.timeout_ms(),
        src: frame.src(),
        dst: frame.dst(),
        name: frame.name(),
    };
    // Each call of a batch takes its head too: a length, and a call id if it wants a
    // reply.
    let (item_head, lone_flags) = match one_way {
        true => (4, FLAG_NO_REPLY),
        false => (CALL_ITEM_HEAD, 0),
    };
    let room = frame_limit.saturating_sub(header(0, 0).frame_len(0) - LEN_PREFIX);
    let mut pieces = Vec::new();
    let mut group: Vec<(u64, Bytes)> = Vec::new();
    let mut group_len = 0;
    let mut too_large = 0u64;
    let close = |group: &mut Vec<(u64, Bytes)>, pieces: &mut Vec<Outgoing>| match group.len() {
        0 => {}
        1 => {
            let (call_id, args) = group.remove(0);
            pieces.push(Outgoing::new(&header(lone_flags, call_id), args));
        }
        n => {
            let mut payload = BytesMut::new();
            for (call_id, args) in group.drain(..) {
                if one_way {
                    payload.extend_from_slice(&(args.len() as u32).to_be_bytes());
                } else {
                    put_call_head(&mut payload, call_id, 0, args.len());
                }
                payload.extend_from_slice(&args);
            }
            let flags = lone_flags | FLAG_REQUEST_BATCH;
            pieces.push(Outgoing::new(&header(flags, n as u64), payload.freeze()));
        }
    };
    for (call_id, args) in calls {
        if args.len() > room && one_way {
            too_large += 1;
            continue;
        }
        if !group.is_empty() && group_len + item_head + args.len() > room {
            close(&mut group, &mut pieces);
            group_len = 0;
        }
        group_len += item_head + args.len();
        group.push((call_id, args));
    }
    close(&mut group, &mut pieces);
    if too_large > 0 {
        tracing::warn!(
            caller = frame.src(),
            process = frame.dst(),
            callback = frame.name(),
            calls = too_large,
            limit = frame_limit,
            "dropped NO_RETURN calls larger than the frame limit of their node (use the same max_frame_size everywhere)"
        );
    }
    Some(pieces)
}

/// Queues the `pieces` of a batch split by [`split_to_fit`], in order, all or none:
/// `Err` when none was queued (the node reads too little, or left), and the caller is
/// told for every call, as for the batch whole.
fn queue_pieces(queue: &Queue, pieces: Vec<Outgoing>) -> Result<(), UndeliverableCode> {
    if pieces.is_empty() {
        return Ok(());
    }
    match queue.push_all(pieces) {
        Push::Sent => Ok(()),
        Push::Full(_) => Err(UndeliverableCode::SlowConsumer),
        Push::Closed => Err(UndeliverableCode::UnknownProcess),
    }
}

/// Queues a frame its node cannot refuse, larger than `frame_limit`, the limit of that
/// node: a batch of replies split to fit ([`split_replies_to_fit`]), anything else as
/// it is (its node's reader refuses it, as it would have without batches).
#[cold]
#[inline(never)]
fn deliver_over_limit(
    queue: &Queue,
    frame_limit: usize,
    frame: Outgoing,
) -> Result<(), UndeliverableCode> {
    let pieces = split_replies_to_fit(&frame, frame_limit).unwrap_or_else(|| vec![frame]);
    for piece in pieces {
        if !deliver(queue, piece) {
            return Err(UndeliverableCode::UnknownProcess);
        }
    }
    Ok(())
}

/// The batch of replies `frame` (docs/PROTOCOL.md, "Batches of replies"), larger than
/// `frame_limit`, the limit of the caller it goes to, as batches and lone replies
/// within it, in order: its callee joined the replies up to its own limit. A reply too
/// large for the limit on its own goes alone, as it would have without batches. A
/// malformed batch goes as it is: its caller drops it, and fails its calls to that
/// node, by name. `None` when `frame` is not a batch of replies.
fn split_replies_to_fit(frame: &Outgoing, frame_limit: usize) -> Option<Vec<Outgoing>> {
    // A forwarded frame is all in its head (`Outgoing::raw`).
    let frame = Frame::parse(frame.head().clone()).ok()?;
    if frame.kind() != Kind::Reply || frame.flags() != FLAG_REPLY_BATCH {
        return None;
    }
    let replies =
        crate::mesh::batch_replies(frame.flags(), frame.call_id(), frame.payload()).ok()?;
    let header = |flags: u8, call_id: u64| Header {
        kind: Kind::Reply,
        flags,
        call_id,
        timeout_ms: 0,
        src: frame.src(),
        dst: frame.dst(),
        name: "",
    };
    let room = frame_limit.saturating_sub(header(0, 0).frame_len(0) - LEN_PREFIX);
    let mut pieces = Vec::new();
    let mut group: Vec<ReplyItem> = Vec::new();
    let mut group_len = 0;
    let close = |group: &mut Vec<ReplyItem>, pieces: &mut Vec<Outgoing>| match group.len() {
        0 => {}
        1 => {
            let reply = group.remove(0);
            let flags = if reply.error { FLAG_ERROR } else { 0 };
            pieces.push(Outgoing::new(&header(flags, reply.call_id), reply.payload));
        }
        n => {
            let mut payload = BytesMut::new();
            for reply in group.drain(..) {
                let flags = if reply.error { FLAG_ERROR } else { 0 };
                put_reply_head(&mut payload, reply.call_id, flags, reply.payload.len());
                payload.extend_from_slice(&reply.payload);
            }
            pieces.push(Outgoing::new(
                &header(FLAG_REPLY_BATCH, n as u64),
                payload.freeze(),
            ));
        }
    };
    for reply in replies {
        let len = REPLY_ITEM_HEAD + reply.payload.len();
        if !group.is_empty() && group_len + len > room {
            close(&mut group, &mut pieces);
            group_len = 0;
        }
        group_len += len;
        group.push(reply);
    }
    close(&mut group, &mut pieces);
    Some(pieces)
}

/// Queues a frame its node cannot refuse (a reply, a membership event), past the byte
/// limit if need be; past the hard limit, disconnects the node as a slow consumer (its
/// session sees the close, logs it with what was held, and leaves). Returns whether the frame was queued.
fn deliver(queue: &Queue, frame: Outgoing) -> bool {
    match queue.push_unrefused(frame) {
        Push::Sent => true,
        Push::Closed => false,
        Push::Full(_) => {
            queue.close_as_slow_consumer();
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daffi_wire::{frame_channel, QueueLimits};

    /// A node called `name` joining on connection `conn_id`, serving `callbacks`, whose
    /// frames go nowhere.
    fn joining<'a>(name: &'a str, conn_id: u64, callbacks: &[&str]) -> Joining<'a> {
        let (queue, _writer) = frame_channel(tokio::io::sink(), QueueLimits::default());
        Joining {
            name,
            conn_id,
            queue,
            callbacks: callbacks.iter().map(|c| c.to_string()).collect(),
            frame_limit: 1 << 20,
            view: NodeView::All,
        }
    }

    #[tokio::test]
    async fn a_name_is_served_until_its_last_provider_leaves_or_drops_it() {
        let members = Members::default();
        let served = |name: &str| members.with_served(|served| served(name));
        for (id, node, only) in [(1, "a", "only-a"), (2, "b", "only-b")] {
            let node = joining(node, id, &["f", only]);
            assert!(members.join(node, |_| Outgoing::default()).await);
        }
        assert!(served("f") && served("only-a") && served("only-b"));
        members.update("b", 2, vec!["g".into()]).await;
        assert!(served("f") && served("g") && !served("only-b"));
        members.leave("a", 1, true).await;
        assert!(!served("f") && !served("only-a") && served("g"));
        members.leave("b", 2, true).await;
        assert!(!served("g"));
    }

    #[tokio::test]
    async fn a_second_node_with_a_name_is_refused_and_lookups_find_the_first() {
        let members = Members::default();
        let join = |name: &'static str, id: u64, callbacks: &[&str]| {
            members.join(joining(name, id, callbacks), |_| Outgoing::default())
        };
        assert!(join("a", 1, &["f"]).await);
        assert!(!join("a", 2, &["g"]).await, "the name is taken");
        assert!(join("b", 3, &["f", "g"]).await);
        let names: Vec<String> = members.snapshot().into_iter().map(|m| m.name).collect();
        assert_eq!(names.len(), 2);
        assert!(names.contains(&"a".into()) && names.contains(&"b".into()));
        // `g` is b's only: the refused second `a` announced nothing.
        let pick = |callback: &str, on: Option<&str>| {
            members
                .pick_provider(callback, on)
                .map(|(name, _)| name.to_string())
        };
        assert_eq!(pick("g", None).as_deref(), Some("b"));
        assert_eq!(pick("f", Some("a")).as_deref(), Some("a"));
        assert_eq!(pick("g", Some("a")), None, "a does not serve g");
        assert_eq!(pick("f", Some("nobody")), None);
        let mut chosen = std::collections::HashSet::new();
        for _ in 0..200 {
            chosen.insert(pick("f", None).expect("f is served"));
        }
        assert_eq!(chosen.len(), 2, "random among the providers: {chosen:?}");
        // A leaving node takes no new requests, and is no longer picked.
        members.leave("a", 1, false).await;
        assert_eq!(pick("f", Some("a")), None);
        assert_eq!(pick("f", None).as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn a_route_kept_by_a_session_follows_leaves_and_stops() {
        let members = Members::default();
        assert!(
            members
                .join(joining("a", 1, &["f"]), |_| Outgoing::default())
                .await
        );
        let mut last = None;
        let frame = || Outgoing::raw(bytes::Bytes::from_static(b"frame"));
        assert_eq!(members.forward_via(&mut last, "a", true, frame()), Ok(()));
        assert!(last.is_some(), "the route is kept for the next frame");
        assert_eq!(members.forward_via(&mut last, "a", true, frame()), Ok(()));
        assert_eq!(
            members.forward_via(&mut last, "b", true, frame()),
            Err(UndeliverableCode::UnknownProcess)
        );
        assert_eq!(members.forward_via(&mut last, "a", true, frame()), Ok(()));
        // Stopping: the route kept is stale, and new requests no longer go.
        members.mark_leaving("a", 1).await;
        assert_eq!(
            members.forward_via(&mut last, "a", true, frame()),
            Err(UndeliverableCode::Stopping)
        );
        assert_eq!(members.forward_via(&mut last, "a", false, frame()), Ok(()));
        // Gone, then back on another connection: the kept route is never used again.
        members.leave("a", 1, true).await;
        assert_eq!(
            members.forward_via(&mut last, "a", false, frame()),
            Err(UndeliverableCode::UnknownProcess)
        );
        assert!(members.batch_via(&mut last, "a").is_none());
        assert!(
            members
                .join(joining("a", 2, &["f"]), |_| Outgoing::default())
                .await
        );
        assert_eq!(members.forward_via(&mut last, "a", true, frame()), Ok(()));
        assert!(last.as_ref().is_some_and(|kept| !kept.leaving));
    }

    /// A forwarded batch request from `a` to `b` of `calls` (each a call's arguments)
    /// claiming `count` calls.
    fn batch_frame(calls: &[&[u8]], count: u64) -> Outgoing {
        let mut payload = Vec::new();
        for call in calls {
            payload.extend_from_slice(&(call.len() as u32).to_be_bytes());
            payload.extend_from_slice(call);
        }
        let header = Header {
            kind: Kind::Request,
            flags: FLAG_NO_REPLY | FLAG_REQUEST_BATCH,
            call_id: count,
            timeout_ms: 7,
            src: "a",
            dst: "b",
            name: "f",
        };
        let mut raw = header.encode(payload.len()).to_vec();
        raw.extend_from_slice(&payload);
        Outgoing::raw(Bytes::from(raw))
    }

    /// The (flags, call_id, payload) of each piece.
    fn pieces_of(pieces: Vec<Outgoing>) -> Vec<(u8, u64, Vec<u8>)> {
        pieces
            .into_iter()
            .map(|piece| {
                let mut raw = Vec::new();
                piece.copy_to(&mut raw);
                let frame = Frame::parse(Bytes::from(raw)).expect("a whole frame");
                assert_eq!((frame.src(), frame.dst(), frame.name()), ("a", "b", "f"));
                assert_eq!(frame.timeout_ms(), 7);
                (frame.flags(), frame.call_id(), frame.payload().to_vec())
            })
            .collect()
    }

    #[test]
    fn a_batch_over_its_nodes_limit_is_split_into_frames_within_it() {
        let calls: [&[u8]; 4] = [&[1; 10], &[2; 10], &[3; 10], &[4; 30]];
        let whole = batch_frame(&calls, 4);
        let fixed = whole.len() - LEN_PREFIX - (4 * 4 + 60);
        // Room for two calls of 10 bytes (and their lengths); the others go alone.
        let limit = fixed + 30;
        let pieces = split_to_fit(&whole, limit).expect("a batch");
        for piece in &pieces {
            assert!(piece.len() - LEN_PREFIX <= limit);
        }
        let batch = FLAG_NO_REPLY | FLAG_REQUEST_BATCH;
        let mut two = vec![0, 0, 0, 10];
        two.extend_from_slice(&[1; 10]);
        two.extend_from_slice(&[0, 0, 0, 10]);
        two.extend_from_slice(&[2; 10]);
        assert_eq!(
            pieces_of(pieces),
            vec![
                (batch, 2, two),
                (FLAG_NO_REPLY, 0, vec![3; 10]),
                (FLAG_NO_REPLY, 0, vec![4; 30]),
            ]
        );
        // A call larger than the limit alone is dropped; the others go.
        let pieces = split_to_fit(&whole, fixed + 20).expect("a batch");
        assert_eq!(pieces_of(pieces).len(), 3);
        // A batch whose count lies is dropped whole, as its node would.
        assert!(split_to_fit(&batch_frame(&calls, 9), limit)
            .expect("a batch")
            .is_empty());
        // Anything else goes as it is.
        let lone = Outgoing::new(
            &Header {
                kind: Kind::Request,
                flags: FLAG_NO_REPLY,
                call_id: 0,
                timeout_ms: 0,
                src: "a",
                dst: "b",
                name: "f",
            },
            Bytes::from_static(&[1; 100]),
        );
        let mut raw = Vec::new();
        lone.copy_to(&mut raw);
        assert!(split_to_fit(&Outgoing::raw(Bytes::from(raw)), 10).is_none());
    }

    #[test]
    fn a_batch_of_replies_over_its_callers_limit_is_split_into_frames_within_it() {
        // Three replies to caller "b": two small ones and one larger, one an error.
        let mut callee_side = Outgoing::new(
            &Header {
                kind: Kind::Reply,
                flags: 0,
                call_id: 11,
                timeout_ms: 0,
                src: "a",
                dst: "b",
                name: "",
            },
            Bytes::from_static(&[1; 10]),
        );
        for (id, flags, len) in [(12, FLAG_ERROR, 10), (13, 0, 30)] {
            let header = Header {
                kind: Kind::Reply,
                flags,
                call_id: id,
                timeout_ms: 0,
                src: "a",
                dst: "b",
                name: "",
            };
            let body = daffi_wire::Payload::from(Bytes::from(vec![id as u8; len]));
            assert!(crate::mesh::join_reply(
                &mut callee_side,
                &header,
                &body,
                1 << 20
            ));
        }
        let mut raw = Vec::new();
        callee_side.copy_to(&mut raw);
        let whole = Outgoing::raw(Bytes::from(raw));
        let fixed = whole.len() - LEN_PREFIX - (3 * REPLY_ITEM_HEAD + 50);
        let limit = fixed + 2 * REPLY_ITEM_HEAD + 20;
        let pieces = split_replies_to_fit(&whole, limit).expect("a batch of replies");
        let pieces: Vec<(u8, u64, Vec<u8>)> = pieces
            .into_iter()
            .map(|piece| {
                assert!(piece.len() - LEN_PREFIX <= limit, "within the limit");
                let mut raw = Vec::new();
                piece.copy_to(&mut raw);
                let frame = Frame::parse(Bytes::from(raw)).expect("a whole frame");
                assert_eq!(
                    (frame.kind(), frame.src(), frame.dst()),
                    (Kind::Reply, "a", "b")
                );
                (frame.flags(), frame.call_id(), frame.payload().to_vec())
            })
            .collect();
        let mut two = Vec::new();
        for (id, flags) in [(11u64, 0u8), (12, FLAG_ERROR)] {
            two.extend_from_slice(&id.to_be_bytes());
            two.push(flags);
            two.extend_from_slice(&10u32.to_be_bytes());
            two.extend_from_slice(&[id as u8; 10]);
        }
        two[8 + 1 + 4..8 + 1 + 4 + 10].copy_from_slice(&[1; 10]);
        assert_eq!(
            pieces,
            vec![(FLAG_REPLY_BATCH, 2, two), (0, 13, vec![13; 30])],
            "the first two together, the third alone, in order"
        );
        // A lone reply is not a batch: it goes as it is.
        assert!(split_replies_to_fit(&whole, 1 << 20).is_some());
        let lone = Outgoing::new(
            &Header {
                kind: Kind::Reply,
                flags: 0,
                call_id: 1,
                timeout_ms: 0,
                src: "a",
                dst: "b",
                name: "",
            },
            Bytes::from_static(&[1; 100]),
        );
        let mut raw = Vec::new();
        lone.copy_to(&mut raw);
        assert!(split_replies_to_fit(&Outgoing::raw(Bytes::from(raw)), 10).is_none());
    }

    #[test]
    fn a_batch_of_calls_that_want_replies_over_its_nodes_limit_is_split_with_its_ids() {
        let mut whole = Outgoing::new(
            &Header {
                kind: Kind::Request,
                flags: 0,
                call_id: 21,
                timeout_ms: 7,
                src: "a",
                dst: "b",
                name: "f",
            },
            Bytes::from_static(&[1; 10]),
        );
        for (id, len) in [(22u64, 10usize), (23, 30)] {
            let header = Header {
                kind: Kind::Request,
                flags: 0,
                call_id: id,
                timeout_ms: 7,
                src: "a",
                dst: "b",
                name: "f",
            };
            let args = daffi_wire::Payload::from(Bytes::from(vec![id as u8; len]));
            assert!(crate::mesh::join_call_with_reply(
                &mut whole,
                &header,
                &args,
                1 << 20
            ));
        }
        let mut raw = Vec::new();
        whole.copy_to(&mut raw);
        let whole = Outgoing::raw(Bytes::from(raw));
        let fixed = whole.len() - LEN_PREFIX - (3 * CALL_ITEM_HEAD + 50);
        // Room for the first two; the third, larger than the room, goes alone anyway.
        let limit = fixed + 2 * CALL_ITEM_HEAD + 20;
        let pieces = pieces_of(split_to_fit(&whole, limit).expect("a batch"));
        let mut two = Vec::new();
        for (id, byte) in [(21u64, 1u8), (22, 22)] {
            two.extend_from_slice(&id.to_be_bytes());
            two.extend_from_slice(&10u32.to_be_bytes());
            two.extend_from_slice(&[byte; 10]);
        }
        assert_eq!(
            pieces,
            vec![(FLAG_REQUEST_BATCH, 2, two), (0, 23, vec![23; 30])],
            "every call kept, with its id, in order"
        );
    }
}
