//! Who is connected, what each node serves, and where to send its frames.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::protocol::message::{self, Member, MembershipEvent, UndeliverableCode};
use crate::sync::{lock, read, write};
use daffi_wire::frame::LEN_PREFIX;
use daffi_wire::{Cork, FrameSender, Kind, Outgoing, Push};

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
}

impl Route {
    /// Replies go to leaving nodes too (they finish what they started); new requests
    /// do not.
    fn takes(&self, request: bool) -> bool {
        !(request && self.leaving)
    }
}

/// The routing table. Lookups take a read lock; changes are serialized by an async lock
/// so that every node sees membership events in the same order, and a node's `Welcome`
/// is queued before anyone can route a frame to it.
#[derive(Default)]
pub struct Members {
    routes: RwLock<HashMap<Arc<str>, Route>>,
    /// How many connected nodes serve each callback name (changed with `routes`, under
    /// `changes`), for [`Members::with_served`].
    providers: Mutex<HashMap<Box<str>, usize>>,
    changes: tokio::sync::Mutex<()>,
}

impl Members {
    /// Queues `frame` for the node called `name`, without taking a handle on its queue
    /// (nothing to clone and drop per frame), and never waits. `request`: a new
    /// request, which a leaving node does not take, nor a node whose queue is full (it
    /// reads too little: `SlowConsumer`). Anything else (a reply) is queued past the
    /// byte limit; past the hard limit, the node is disconnected instead. A frame for an
    /// idle connection is written here, under the read lock (the write never waits),
    /// unless the connection is corked ([`cork`](Self::cork)). `Err`: not queued, and
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
        if !route.takes(request) {
            return Err(UndeliverableCode::Stopping);
        }
        if !request {
            return match deliver(&route.queue, frame) {
                true => Ok(()),
                false => Err(UndeliverableCode::UnknownProcess),
            };
        }
        match route.queue.push(frame) {
            Push::Sent => Ok(()),
            Push::Full(_) => Err(UndeliverableCode::SlowConsumer),
            Push::Closed => Err(UndeliverableCode::UnknownProcess),
        }
    }

    /// Corks the connection of the node called `name`, if it is connected: more frames
    /// for it are at hand, and leave together (see [`Cork`]).
    pub fn cork(&self, name: &str) -> Option<Cork> {
        read(&self.routes).get(name).map(|route| route.queue.cork())
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
    pub fn snapshot(&self) -> Vec<Member> {
        read(&self.routes)
            .iter()
            .filter(|(_, r)| !r.leaving)
            .map(|(name, r)| Member {
                name: name.to_string(),
                callbacks: r.callbacks.clone(),
            })
            .collect()
    }

    /// Adds a node that takes frames of up to `frame_limit` bytes: queues its
    /// `Welcome`, which `welcome` makes from the other members (in the order of every
    /// change, schedule changes included), makes it routable, then tells everyone else.
    /// Returns `false` (and changes nothing) when the name is taken.
    pub async fn join(
        &self,
        name: &str,
        conn_id: u64,
        queue: Queue,
        callbacks: Vec<String>,
        frame_limit: usize,
        welcome: impl FnOnce(Vec<Member>) -> Outgoing,
    ) -> bool {
        let _serialized = self.changes.lock().await;
        if read(&self.routes).contains_key(name) {
            return false;
        }
        // Every page at once, as one frame (which always passes when nothing is held):
        // nothing comes between the pages, and the queue's limit cannot cut them off.
        let welcome = welcome(self.snapshot());
        if !deliver(&queue, welcome) {
            return true; // the connection died already; the session will call `leave`
        }
        let member = Member {
            name: name.to_string(),
            callbacks: callbacks.clone(),
        };
        self.count_providers(&callbacks, true);
        write(&self.routes).insert(
            Arc::from(name),
            Route {
                conn_id,
                queue,
                callbacks,
                leaving: false,
                frame_limit,
            },
        );
        self.broadcast(name, &MembershipEvent::Joined(member));
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

    /// Replaces the callbacks a node serves and tells everyone else.
    pub async fn update(&self, name: &str, conn_id: u64, callbacks: Vec<String>) {
        let _serialized = self.changes.lock().await;
        let before = {
            let mut routes = write(&self.routes);
            match routes.get_mut(name) {
                Some(r) if r.conn_id == conn_id => {
                    std::mem::replace(&mut r.callbacks, callbacks.clone())
                }
                _ => return,
            }
        };
        self.count_providers(&before, false);
        self.count_providers(&callbacks, true);
        let event = MembershipEvent::Updated(Member {
            name: name.to_string(),
            callbacks,
        });
        self.broadcast(name, &event);
    }

    /// Marks a node as stopping and tells everyone else, so that nobody sends it new
    /// requests while it finishes the ones it has.
    pub async fn mark_leaving(&self, name: &str, conn_id: u64) {
        let _serialized = self.changes.lock().await;
        {
            let mut routes = write(&self.routes);
            match routes.get_mut(name) {
                Some(r) if r.conn_id == conn_id && !r.leaving => r.leaving = true,
                _ => return,
            }
        }
        let event = MembershipEvent::Leaving {
            name: name.to_string(),
        };
        self.broadcast(name, &event);
    }

    /// Removes a node (if this connection still owns the name) and, with `announce`,
    /// tells everyone else. A stopping controller does not announce: its nodes learn
    /// that the controller is gone, not that their peers left.
    pub async fn leave(&self, name: &str, conn_id: u64, announce: bool) {
        let _serialized = self.changes.lock().await;
        let gone = {
            let mut routes = write(&self.routes);
            match routes.get(name) {
                Some(r) if r.conn_id == conn_id => routes.remove(name),
                _ => return,
            }
        };
        if let Some(route) = gone {
            self.count_providers(&route.callbacks, false);
        }
        if !announce {
            return;
        }
        let event = MembershipEvent::Left {
            name: name.to_string(),
        };
        self.broadcast(name, &event);
    }

    /// Counts one provider more (`added`) or less of each of `callbacks`. Never called
    /// under the `routes` lock: a stats request holding `providers` must not stall
    /// routing.
    fn count_providers(&self, callbacks: &[String], added: bool) {
        let mut providers = lock(&self.providers);
        for name in callbacks {
            if added {
                *providers.entry(name.as_str().into()).or_default() += 1;
            } else if let Some(n) = providers.get_mut(name.as_str()) {
                *n -= 1;
                if *n == 0 {
                    providers.remove(name.as_str());
                }
            }
        }
    }

    /// Tells every member but `except` about `event`, without waiting on any of them:
    /// a member that cannot take it (past its hard limit) is disconnected, and the
    /// others hear of that in turn.
    fn broadcast(&self, except: &str, event: &MembershipEvent) {
        let frame = message::control_frame(Kind::Membership, event);
        for (name, route) in read(&self.routes).iter() {
            if &**name != except {
                // A closed queue belongs to a node that is leaving; its own `leave` follows.
                deliver(&route.queue, frame.clone());
            }
        }
    }
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

    #[tokio::test]
    async fn a_name_is_served_until_its_last_provider_leaves_or_drops_it() {
        use daffi_wire::{frame_channel, QueueLimits};
        let members = Members::default();
        let served = |name: &str| members.with_served(|served| served(name));
        for (id, node) in [(1, "a"), (2, "b")] {
            let (queue, _writer) = frame_channel(tokio::io::sink(), QueueLimits::default());
            let callbacks = vec!["f".to_string(), format!("only-{node}")];
            assert!(
                members
                    .join(node, id, queue, callbacks, 1 << 20, |_| Outgoing::default())
                    .await
            );
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
        use daffi_wire::{frame_channel, QueueLimits};
        let members = Members::default();
        let join = |name: &'static str, id: u64, callbacks: &[&str]| {
            let (queue, _writer) = frame_channel(tokio::io::sink(), QueueLimits::default());
            let callbacks = callbacks.iter().map(|c| c.to_string()).collect();
            members.join(name, id, queue, callbacks, 1 << 20, |_| Outgoing::default())
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
}
