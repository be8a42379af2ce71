//! Who is connected, what each node serves, and where to send its frames.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::protocol::callback_list_size;
use crate::protocol::frame::Kind;
use crate::protocol::io::{FrameSender, Outgoing, Push};
use crate::protocol::message::{Member, MembershipEvent, UndeliverableCode, Welcome};
use crate::sync::{read, write};

/// The writer queue of one connection.
pub type Queue = FrameSender;

struct Route {
    conn_id: u64,
    queue: Queue,
    callbacks: Vec<String>,
    /// The node is stopping: no new requests go to it.
    leaving: bool,
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
    /// Whether the node called `name` takes a frame now: it is connected, and for a new
    /// request (`request`) not leaving. The lookup [`Members::forward`] makes first.
    pub fn accepts(&self, name: &str, request: bool) -> bool {
        read(&self.routes)
            .get(name)
            .is_some_and(|r| r.takes(request))
    }

    /// Queues `frame` for the node called `name`, without taking a handle on its queue
    /// (nothing to clone and drop per frame), and never waits. `request`: a new
    /// request, which a leaving node does not take, nor a node whose queue is full (it
    /// reads too little: `SlowConsumer`). Anything else (a reply) is queued past the
    /// byte limit; past the hard limit, the node is disconnected instead. A frame for an
    /// idle connection is written here, under the read lock (the write never waits),
    /// unless `more_follow`: more frames are at hand, and the writer task sends them
    /// together. `Err`: not queued, and why.
    pub fn forward(
        &self,
        name: &str,
        request: bool,
        frame: Outgoing,
        more_follow: bool,
    ) -> Result<(), UndeliverableCode> {
        let routes = read(&self.routes);
        let Some(route) = routes.get(name) else {
            return Err(UndeliverableCode::UnknownProcess);
        };
        if !route.takes(request) {
            return Err(UndeliverableCode::Stopping);
        }
        if !request {
            return match deliver(&route.queue, frame, more_follow) {
                true => Ok(()),
                false => Err(UndeliverableCode::UnknownProcess),
            };
        }
        match route.queue.push_with(frame, more_follow) {
            Push::Sent => Ok(()),
            Push::Full(_) => Err(UndeliverableCode::SlowConsumer),
            Push::Closed => Err(UndeliverableCode::UnknownProcess),
        }
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

    /// Adds a node: queues its `Welcome` (in pages of at most `page_limit` bytes, the
    /// controller's `max_frame_size` in each), makes it routable, then tells everyone
    /// else. Returns `false` (and changes nothing) when the name is taken.
    pub async fn join(
        &self,
        name: &str,
        conn_id: u64,
        queue: Queue,
        callbacks: Vec<String>,
        max_frame_size: usize,
        page_limit: usize,
    ) -> bool {
        let _serialized = self.changes.lock().await;
        if read(&self.routes).contains_key(name) {
            return false;
        }
        // Every page at once, as one frame (which always passes when nothing is held):
        // nothing comes between the pages, and the queue's limit cannot cut them off.
        let welcome = welcome_pages(self.snapshot(), max_frame_size, page_limit);
        if !deliver(&queue, welcome, false) {
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
            },
        );
        self.broadcast(name, &MembershipEvent::Joined(member));
        true
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
        let frame = Outgoing::control(Kind::Membership, event);
        for (name, route) in read(&self.routes).iter() {
            if &**name != except {
                // A closed queue belongs to a node that is leaving; its own `leave` follows.
                deliver(&route.queue, frame.clone(), false);
            }
        }
    }
}

/// Queues a frame its node cannot refuse (a reply, a membership event), past the byte
/// limit if need be; past the hard limit, disconnects the node as a slow consumer (its
/// session sees the close, logs it with what was held, and leaves). Returns whether the frame was queued.
fn deliver(queue: &Queue, frame: Outgoing, more_follow: bool) -> bool {
    match queue.push_unrefused(frame, more_follow) {
        Push::Sent => true,
        Push::Closed => false,
        Push::Full(_) => {
            queue.close_as_slow_consumer();
            false
        }
    }
}

/// What a page of `Welcome` needs besides its members: frame header, keys, the limit,
/// the flag.
const PAGE_OVERHEAD: usize = 128;
/// What a member adds to a page besides its process name and callback list: keys and
/// headers.
const MEMBER_ENTRY: usize = 32;

/// The `Welcome` frames for a joining node, joined into one: `members` in pages of at
/// most `page_limit` bytes each (`more` on all but the last). A page holds at least one
/// member; one admitted under the same frame limit always fits (its callbacks are
/// within [`callback_list_limit`](crate::protocol::callback_list_limit)).
fn welcome_pages(members: Vec<Member>, max_frame_size: usize, page_limit: usize) -> Outgoing {
    let budget = page_limit.saturating_sub(PAGE_OVERHEAD);
    let mut pages = vec![Vec::new()];
    let mut used = 0;
    for member in members {
        let size = member.name.len() + callback_list_size(&member.callbacks) + MEMBER_ENTRY;
        let page = pages.last_mut().expect("one page at least");
        if !page.is_empty() && used + size > budget {
            pages.push(Vec::new());
            used = 0;
        }
        used += size;
        pages.last_mut().expect("one page at least").push(member);
    }
    let last = pages.len() - 1;
    let frames = pages
        .into_iter()
        .enumerate()
        .map(|(i, members)| {
            let page = Welcome {
                members,
                max_frame_size: max_frame_size as u64,
                more: i < last,
            };
            Outgoing::control(Kind::Welcome, &page)
        })
        .collect();
    Outgoing::joined(frames)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::Frame;
    use crate::protocol::{callback_list_limit, message, MAX_PROCESS_NAME};
    use bytes::{Buf, Bytes};

    /// Splits joined frames into their frames.
    fn frames(out: Outgoing) -> Vec<Frame> {
        let mut bytes: Vec<u8> = out.head.to_vec();
        for part in out.body.parts() {
            bytes.extend_from_slice(part);
        }
        let mut bytes = Bytes::from(bytes);
        let mut frames = Vec::new();
        while bytes.has_remaining() {
            let len = 4 + u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            frames.push(Frame::parse(bytes.split_to(len)).expect("a frame"));
        }
        frames
    }

    #[tokio::test]
    async fn a_name_is_served_until_its_last_provider_leaves_or_drops_it() {
        use crate::protocol::io::{frame_channel, QueueLimits};
        let members = Members::default();
        let served = |name: &str| members.with_served(|served| served(name));
        for (id, node) in [(1, "a"), (2, "b")] {
            let (queue, _writer) = frame_channel(tokio::io::sink(), QueueLimits::default());
            let callbacks = vec!["f".to_string(), format!("only-{node}")];
            assert!(
                members
                    .join(node, id, queue, callbacks, 1 << 20, 1 << 20)
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

    #[test]
    fn welcome_pages_fit_the_limit_and_hold_every_member_once() {
        let limit = 64 * 1024;
        // Members as large as one may be, and small ones between them.
        let big = |i: usize| Member {
            name: format!("{i:p>width$}", width = MAX_PROCESS_NAME),
            callbacks: (0..)
                .map(|j| format!("{i}-{j:x>1000}"))
                .scan(0, |size, name| {
                    *size += name.len() + 4;
                    (*size <= callback_list_limit(limit)).then_some(name)
                })
                .collect(),
        };
        let small = |i: usize| Member {
            name: format!("small-{i}"),
            callbacks: vec!["f".into()],
        };
        let members: Vec<Member> = (0..10).flat_map(|i| [big(i), small(i)]).collect();
        let pages = frames(welcome_pages(members.clone(), limit * 2, limit));
        assert!(pages.len() >= 10, "{} pages", pages.len());
        let mut seen = Vec::new();
        for (i, page) in pages.iter().enumerate() {
            assert_eq!(page.kind(), Kind::Welcome);
            assert!(
                page.raw().len() - 4 <= limit,
                "page {i}: {}",
                page.raw().len()
            );
            let welcome: Welcome = message::decode(&page.payload()).expect("a Welcome");
            assert_eq!(welcome.more, i + 1 < pages.len());
            assert_eq!(welcome.max_frame_size, limit as u64 * 2);
            seen.extend(welcome.members);
        }
        assert_eq!(seen, members);

        // Nobody else connected: one page, empty, the last.
        let pages = frames(welcome_pages(Vec::new(), limit, limit));
        let welcome: Welcome = message::decode(&pages[0].payload()).expect("a Welcome");
        assert_eq!(
            (pages.len(), welcome.members.len(), welcome.more),
            (1, 0, false)
        );
    }
}
