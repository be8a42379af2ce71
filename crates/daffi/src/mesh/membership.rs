//! This node's view of the other nodes and the callbacks each serves.
//!
//! Every change bumps a version that `wait_process` / `wait_function` wait on.
//!
//! It is fed by the controller's `Welcome` and `Membership` frames, or by the NATS
//! backend's watch. A view holds every other node (`whole`: what older controllers
//! keep, and what a node asks for once it needs it), or only the providers of the
//! callback names this node subscribed to, each with just those names: what a node
//! that never asked for more keeps (see "What a node knows, and when" in the crate
//! docs).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::protocol::message::{Member, MembershipEvent};

/// What a membership update changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Nodes that appeared in the view.
    pub added: Vec<String>,
    /// Nodes that disappeared from the view (left, or began stopping).
    pub removed: Vec<String>,
    /// Nodes whose connection is gone, with `true` if they had announced they were
    /// stopping: calls still waiting on them have failed.
    pub gone: Vec<(String, bool)>,
}

/// Other nodes, and which of them serve each callback.
pub struct Membership {
    state: RwLock<State>,
    version: watch::Sender<u64>,
    /// Counts the times `state` was taken to be changed (bumped as the write lock is
    /// taken): what [`LastPick`] was read under.
    writes: AtomicU64,
    /// The providers of the callback last picked for, as they were at a count of
    /// `writes`: a node calling one name over and over finds them without hashing it.
    last_pick: Mutex<Option<LastPick>>,
}

/// The providers of one callback name, as read when [`Membership::writes`] was `writes`.
struct LastPick {
    callback: String,
    writes: u64,
    providers: Vec<Arc<str>>,
}

/// What a view must hold.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every other node.
    Everything,
    /// The providers of one callback name.
    Callback(&'a str),
}

struct State {
    nodes: HashMap<Arc<str>, Vec<String>>,
    providers: HashMap<String, Vec<Arc<str>>>,
    /// Nodes stopping: out of the view, but calls in flight to them may still finish.
    leaving: HashSet<String>,
    /// The view holds every other node, kept current.
    whole: bool,
    /// Every other node was asked for: what arrives is kept whole.
    everything_asked: bool,
    /// Callback names subscribed to: `true` once their providers are held, kept current.
    names: HashMap<String, bool>,
    /// Counts the views replaced: a subscription answered for an older one holds nothing.
    generation: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            nodes: HashMap::new(),
            providers: HashMap::new(),
            leaving: HashSet::new(),
            whole: true,
            everything_asked: true,
            names: HashMap::new(),
            generation: 0,
        }
    }
}

impl State {
    /// Rebuilds the provider index from scratch (after replacing the whole view).
    fn reindex(&mut self) {
        self.providers.clear();
        for (node, callbacks) in &self.nodes {
            for cb in callbacks {
                self.providers
                    .entry(cb.clone())
                    .or_default()
                    .push(node.clone());
            }
        }
    }

    /// Adds or replaces one node; updates the index for it alone. Returns whether it is
    /// new.
    fn upsert(&mut self, name: &str, callbacks: Vec<String>) -> bool {
        let (node, existed) = match self.nodes.remove_entry(name) {
            Some((node, old)) => {
                self.unindex(&node, &old);
                (node, true)
            }
            None => (Arc::from(name), false),
        };
        for cb in &callbacks {
            match self.providers.get_mut(cb.as_str()) {
                Some(nodes) => nodes.push(node.clone()),
                None => {
                    self.providers.insert(cb.clone(), vec![node.clone()]);
                }
            }
        }
        self.nodes.insert(node, callbacks);
        !existed
    }

    /// Removes one node and its entries in the index. Returns whether it was there.
    fn remove(&mut self, name: &str) -> bool {
        match self.nodes.remove_entry(name) {
            Some((node, callbacks)) => {
                self.unindex(&node, &callbacks);
                true
            }
            None => false,
        }
    }

    /// Keeps of `callbacks` what this view holds.
    fn keep(&self, mut callbacks: Vec<String>) -> Vec<String> {
        if !self.everything_asked {
            callbacks.retain(|c| self.names.contains_key(c));
        }
        callbacks
    }

    /// Whether the view holds, kept current, what `scope` asks.
    fn covers(&self, scope: Scope<'_>) -> bool {
        self.whole
            || match scope {
                Scope::Everything => false,
                Scope::Callback(name) => self.names.get(name) == Some(&true),
            }
    }

    fn unindex(&mut self, node: &Arc<str>, callbacks: &[String]) {
        for cb in callbacks {
            if let Some(nodes) = self.providers.get_mut(cb.as_str()) {
                nodes.retain(|n| n != node);
                if nodes.is_empty() {
                    self.providers.remove(cb.as_str());
                }
            }
        }
    }
}

impl Default for Membership {
    fn default() -> Self {
        Membership {
            state: RwLock::default(),
            version: watch::channel(0).0,
            writes: AtomicU64::new(0),
            last_pick: Mutex::new(None),
        }
    }
}

impl Membership {
    /// An empty view that will hold every other node (`whole`), or only what this node
    /// subscribes to.
    pub fn new(whole: bool) -> Self {
        let view = Membership::default();
        {
            let mut s = view.write();
            s.whole = whole;
            s.everything_asked = whole;
        }
        view
    }

    /// Replaces the view of a node connected to a controller with `members`: every
    /// other node (`whole`), or, until it subscribes, nothing.
    pub fn welcome(&self, members: Vec<Member>, whole: bool) -> Changes {
        {
            let mut s = self.write();
            s.whole = whole;
            s.everything_asked = whole;
        }
        self.reset(members)
    }

    /// Replaces the whole view (on `Welcome`, or with nothing when the link drops).
    /// Subscriptions end with it.
    pub fn reset(&self, members: Vec<Member>) -> Changes {
        let changes = {
            let mut s = self.write();
            let before = std::mem::take(&mut s.nodes);
            s.leaving.clear();
            s.names.clear();
            s.generation += 1;
            s.nodes = members
                .into_iter()
                .map(|m| (Arc::from(m.name.as_str()), m.callbacks))
                .collect();
            s.reindex();
            Changes {
                added: s
                    .nodes
                    .keys()
                    .filter(|n| !before.contains_key(*n))
                    .map(|n| n.to_string())
                    .collect(),
                removed: before
                    .keys()
                    .filter(|n| !s.nodes.contains_key(*n))
                    .map(|n| n.to_string())
                    .collect(),
                gone: Vec::new(),
            }
        };
        self.bump();
        changes
    }

    /// Applies one event.
    pub fn apply(&self, event: MembershipEvent) -> Changes {
        let mut changes = Changes::default();
        {
            let mut s = self.write();
            match event {
                MembershipEvent::Joined(m) | MembershipEvent::Updated(m) => {
                    s.leaving.remove(&m.name);
                    let callbacks = s.keep(m.callbacks);
                    if callbacks.is_empty() && !s.everything_asked {
                        // It serves nothing this view holds (any more).
                        if s.remove(&m.name) {
                            changes.removed.push(m.name);
                        }
                    } else if s.upsert(&m.name, callbacks) {
                        changes.added.push(m.name);
                    }
                }
                MembershipEvent::Leaving { name } => {
                    if s.remove(&name) {
                        changes.removed.push(name.clone());
                    }
                    s.leaving.insert(name);
                }
                MembershipEvent::Left { name } => {
                    let stopped = s.leaving.remove(&name);
                    if s.remove(&name) {
                        changes.removed.push(name.clone());
                    }
                    changes.gone.push((name, stopped));
                }
            }
        }
        self.bump();
        changes
    }

    /// Chooses the node a call from `own_name` goes to: `on`, the pinned one, or a
    /// provider chosen at random; the error a caller should see if there is none.
    pub fn route(&self, own_name: &str, callback: &str, on: Option<&str>) -> Result<Arc<str>> {
        match on {
            Some(process) => match self.serves(process, callback) {
                Some((node, true)) => Ok(node),
                Some((_, false)) => Err(Error::NoProvider {
                    callback: callback.to_string(),
                    on: Some(process.to_string()),
                }),
                None if process == own_name => Err(Error::Config(format!(
                    "a node cannot call itself (`.on(\"{process}\")` names this node); call the function directly"
                ))),
                None if self.is_leaving(process) => Err(Error::PeerStopped {
                    process: process.to_string(),
                    callback: callback.to_string(),
                }),
                // A view of providers holds only those of the names subscribed to: a
                // node outside it may still be connected; the controller (or the node)
                // answers for it.
                None if self.holds_names_only(callback) => Ok(Arc::from(process)),
                None => Err(Error::UnknownProcess {
                    process: process.to_string(),
                }),
            },
            None => self.pick(callback).ok_or_else(|| Error::NoProvider {
                callback: callback.to_string(),
                on: None,
            }),
        }
    }

    /// A node serving `callback`, chosen at random.
    ///
    /// The providers of the name last picked for are kept beside the view, with the
    /// count of changes they were read at: while the view is unchanged, calls to that
    /// name take them from there (no lock on the view, no hash of the name).
    pub fn pick(&self, callback: &str) -> Option<Arc<str>> {
        // Read before the view: a change from here on makes what is kept stale.
        let writes = self.writes.load(Ordering::Acquire);
        let mut last = self.last_pick.try_lock().ok();
        if let Some(Some(kept)) = last.as_deref() {
            if kept.writes == writes && kept.callback == callback {
                return choose(&kept.providers);
            }
        }
        let providers = {
            let s = self.read();
            s.providers.get(callback).cloned().unwrap_or_default()
        };
        let node = choose(&providers);
        if let Some(last) = last.as_deref_mut() {
            *last = Some(LastPick {
                callback: callback.to_string(),
                writes,
                providers,
            });
        }
        node
    }

    /// Every node serving `callback`.
    pub fn providers_of(&self, callback: &str) -> Vec<Arc<str>> {
        self.read()
            .providers
            .get(callback)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `node` is connected, and if so whether it serves `callback`.
    pub fn serves(&self, node: &str, callback: &str) -> Option<(Arc<str>, bool)> {
        let s = self.read();
        let (name, callbacks) = s.nodes.get_key_value(node)?;
        Some((name.clone(), callbacks.iter().any(|c| c == callback)))
    }

    /// Whether the view holds, kept current, what `scope` asks.
    pub fn covers(&self, scope: Scope<'_>) -> bool {
        self.read().covers(scope)
    }

    /// Whether the view holds only providers, among them those of `callback`.
    fn holds_names_only(&self, callback: &str) -> bool {
        let s = self.read();
        !s.whole && s.covers(Scope::Callback(callback))
    }

    /// Whether every other node was asked for (so a reconnect asks for it again).
    pub fn everything_asked(&self) -> bool {
        self.read().everything_asked
    }

    /// Begins a subscription to `scope`: what arrives for it is kept from now on.
    /// Returns the view's generation, for [`Membership::subscribed`].
    pub fn subscribing(&self, scope: Scope<'_>) -> u64 {
        let mut s = self.write();
        match scope {
            Scope::Everything => s.everything_asked = true,
            Scope::Callback(name) => {
                s.names.entry(name.to_string()).or_insert(false);
            }
        }
        s.generation
    }

    /// The subscription to `scope` begun in `generation` is answered: its part of the
    /// view is held (unless the view was replaced since).
    pub fn subscribed(&self, scope: Scope<'_>, generation: u64) {
        {
            let mut s = self.write();
            if s.generation != generation {
                return;
            }
            match scope {
                Scope::Everything => s.whole = true,
                Scope::Callback(name) => {
                    s.names.insert(name.to_string(), true);
                }
            }
        }
        self.bump();
    }

    /// Whether `node` announced that it is stopping.
    pub fn is_leaving(&self, node: &str) -> bool {
        self.read().leaving.contains(node)
    }

    /// Whether `node` is in the view with exactly `callbacks` (so an update that says
    /// so again changes nothing).
    #[cfg(feature = "nats")]
    pub fn is_current(&self, node: &str, callbacks: &[String]) -> bool {
        self.read()
            .nodes
            .get(node)
            .is_some_and(|known| known == callbacks)
    }

    /// Whether `node` is connected.
    pub fn has_node(&self, node: &str) -> bool {
        self.read().nodes.contains_key(node)
    }

    /// Whether some node serves `callback`.
    pub fn has_provider(&self, callback: &str) -> bool {
        self.read().providers.contains_key(callback)
    }

    /// Every node with its callbacks, both sorted by name.
    pub fn members(&self) -> Vec<(String, Vec<String>)> {
        let mut members: Vec<(String, Vec<String>)> = self
            .read()
            .nodes
            .iter()
            .map(|(name, callbacks)| {
                let mut callbacks = callbacks.clone();
                callbacks.sort();
                (name.to_string(), callbacks)
            })
            .collect();
        members.sort();
        members
    }

    /// Callback name -> names of the nodes serving it.
    pub fn providers(&self) -> HashMap<String, Vec<String>> {
        self.read()
            .providers
            .iter()
            .map(|(cb, nodes)| (cb.clone(), nodes.iter().map(|n| n.to_string()).collect()))
            .collect()
    }

    /// A receiver that changes whenever the view does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        crate::sync::read(&self.state)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        let state = crate::sync::write(&self.state);
        // Under the write lock: a `pick` that reads this count reads the view after
        // this change (its read lock waits for this one).
        self.writes.fetch_add(1, Ordering::AcqRel);
        state
    }
}

/// One of `nodes`, at random (the one there is without a random number).
fn choose(nodes: &[Arc<str>]) -> Option<Arc<str>> {
    match nodes {
        [] => None,
        [node] => Some(node.clone()),
        _ => Some(nodes[fastrand::usize(..nodes.len())].clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(name: &str, callbacks: &[&str]) -> MembershipEvent {
        MembershipEvent::Joined(Member {
            name: name.into(),
            callbacks: callbacks.iter().map(|c| c.to_string()).collect(),
        })
    }

    /// The index kept up to date event by event equals one rebuilt from scratch.
    fn assert_index_consistent(view: &Membership) {
        let sorted = |s: &State| {
            let mut index: Vec<(String, Vec<String>)> = s
                .providers
                .iter()
                .map(|(cb, nodes)| {
                    let mut n: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
                    n.sort();
                    (cb.clone(), n)
                })
                .collect();
            index.sort();
            index
        };
        let mut s = view.write();
        let kept = sorted(&s);
        s.reindex();
        assert_eq!(kept, sorted(&s));
    }

    #[test]
    fn picks_follow_every_change_to_the_view() {
        let view = Membership::default();
        assert_eq!(view.pick("f"), None);
        view.apply(joined("a", &["f"]));
        assert_eq!(view.pick("f").as_deref(), Some("a"));
        assert_eq!(view.pick("g"), None, "another name, looked up afresh");
        assert_eq!(view.pick("f").as_deref(), Some("a"));
        view.apply(joined("b", &["f"]));
        let picked: HashSet<Arc<str>> = (0..200).filter_map(|_| view.pick("f")).collect();
        assert_eq!(picked.len(), 2, "both providers, at random: {picked:?}");
        view.apply(MembershipEvent::Leaving { name: "a".into() });
        assert!((0..50).all(|_| view.pick("f").as_deref() == Some("b")));
        view.apply(MembershipEvent::Left { name: "b".into() });
        assert_eq!(view.pick("f"), None, "never a provider that left");
    }

    #[test]
    fn the_provider_index_follows_every_event() {
        let view = Membership::default();
        let added = view.apply(joined("a", &["f", "g"])).added;
        assert_eq!(added, vec!["a".to_string()]);
        view.apply(joined("b", &["f"]));
        assert_index_consistent(&view);
        assert_eq!(view.providers_of("f").len(), 2);
        // An update replaces the list: `g` moves from a to b.
        let changes = view.apply(MembershipEvent::Updated(Member {
            name: "a".into(),
            callbacks: vec!["f".into()],
        }));
        assert!(changes.added.is_empty());
        view.apply(MembershipEvent::Updated(Member {
            name: "b".into(),
            callbacks: vec!["f".into(), "g".into()],
        }));
        assert_index_consistent(&view);
        assert_eq!(view.providers_of("g"), vec![Arc::<str>::from("b")]);
        view.apply(MembershipEvent::Leaving { name: "b".into() });
        assert!(!view.has_provider("g"));
        assert!(view.is_leaving("b"));
        assert_index_consistent(&view);
        let changes = view.apply(MembershipEvent::Left { name: "b".into() });
        assert_eq!(changes.gone, vec![("b".to_string(), true)]);
        view.apply(MembershipEvent::Left { name: "a".into() });
        assert!(!view.has_provider("f"));
        assert_index_consistent(&view);
    }

    #[test]
    fn a_call_is_routed_to_its_pinned_node_or_a_random_provider_or_fails_by_name() {
        let view = Membership::default();
        view.apply(joined("a", &["f"]));
        view.apply(joined("b", &["f", "g"]));
        let route = |callback: &str, on: Option<&str>| view.route("me", callback, on);
        let mut chosen = HashSet::new();
        for _ in 0..200 {
            chosen.insert(route("f", None).expect("served").to_string());
        }
        assert_eq!(chosen, HashSet::from(["a".to_string(), "b".to_string()]));
        assert_eq!(&*route("g", None).expect("served"), "b");
        assert_eq!(&*route("f", Some("a")).expect("served"), "a");
        assert!(matches!(
            route("g", Some("a")),
            Err(Error::NoProvider { on: Some(p), .. }) if p == "a"
        ));
        assert!(matches!(
            route("h", None),
            Err(Error::NoProvider { on: None, .. })
        ));
        assert!(matches!(
            route("f", Some("nobody")),
            Err(Error::UnknownProcess { process }) if process == "nobody"
        ));
        assert!(
            matches!(route("f", Some("me")), Err(Error::Config(_))),
            "never itself"
        );
    }

    #[test]
    fn a_view_of_providers_holds_only_the_names_subscribed_to() {
        let view = Membership::new(false);
        view.welcome(Vec::new(), false);
        assert!(!view.covers(Scope::Callback("f")) && !view.covers(Scope::Everything));
        // Nothing is kept before a subscription.
        view.apply(joined("a", &["f", "g"]));
        assert!(!view.has_node("a"));

        let generation = view.subscribing(Scope::Callback("f"));
        assert!(!view.covers(Scope::Callback("f")), "not before the answer");
        view.apply(joined("a", &["f", "g"]));
        view.apply(joined("b", &["g"]));
        view.subscribed(Scope::Callback("f"), generation);
        assert!(view.covers(Scope::Callback("f")));
        assert_eq!(view.members(), [("a".to_string(), vec!["f".to_string()])]);
        assert_index_consistent(&view);
        // A pinned node outside the view is left to the controller to answer for.
        assert_eq!(&*view.route("me", "f", Some("c")).expect("sent"), "c");
        // `a` drops `f`: out of the view; its leave is heard all the same.
        view.apply(MembershipEvent::Updated(Member {
            name: "a".into(),
            callbacks: vec!["g".into()],
        }));
        assert!(!view.has_provider("f") && !view.has_node("a"));
        view.apply(joined("a", &["f"]));
        let changes = view.apply(MembershipEvent::Left { name: "a".into() });
        assert_eq!(changes.gone, vec![("a".to_string(), false)]);
        assert!(!view.has_provider("f"));

        // An answer for a view replaced since (a reconnect) holds nothing.
        let stale = view.subscribing(Scope::Callback("h"));
        view.reset(Vec::new());
        view.subscribed(Scope::Callback("h"), stale);
        assert!(!view.covers(Scope::Callback("h")) && !view.covers(Scope::Callback("f")));

        // Asking for everything keeps every list whole.
        let generation = view.subscribing(Scope::Everything);
        view.apply(joined("b", &["g", "k"]));
        view.subscribed(Scope::Everything, generation);
        assert!(view.covers(Scope::Everything) && view.everything_asked());
        assert_eq!(view.providers_of("k"), vec![Arc::<str>::from("b")]);
    }
}
