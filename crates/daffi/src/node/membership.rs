//! This node's view of the other nodes and the callbacks each serves.
//!
//! It is fed by the controller's `Welcome` and `Membership` frames, and every change
//! bumps a version that `wait_process` / `wait_function` wait on.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::protocol::message::{Member, MembershipEvent};

/// Nodes that appeared in or disappeared from the view.
#[derive(Debug, Default)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Changes {
    fn added(name: String) -> Self {
        Changes {
            added: vec![name],
            removed: Vec::new(),
        }
    }

    fn removed(name: String) -> Self {
        Changes {
            added: Vec::new(),
            removed: vec![name],
        }
    }
}

/// Other nodes, and which of them serve each callback.
pub struct Membership {
    state: RwLock<State>,
    version: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    nodes: HashMap<Arc<str>, Vec<String>>,
    providers: HashMap<String, Vec<Arc<str>>>,
}

impl State {
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
}

impl Default for Membership {
    fn default() -> Self {
        Membership {
            state: RwLock::default(),
            version: watch::channel(0).0,
        }
    }
}

impl Membership {
    /// Replaces the whole view (on `Welcome`, or with nothing when the link drops).
    /// Returns the nodes that appeared and those that disappeared.
    pub fn reset(&self, members: Vec<Member>) -> Changes {
        let changes = {
            let mut s = self.write();
            let before = std::mem::take(&mut s.nodes);
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
            }
        };
        self.bump();
        changes
    }

    /// Applies one event; returns who appeared or disappeared.
    pub fn apply(&self, event: MembershipEvent) -> Changes {
        let changes = {
            let mut s = self.write();
            let changes = match event {
                MembershipEvent::Joined(m) | MembershipEvent::Updated(m) => {
                    let name = Arc::from(m.name.as_str());
                    match s.nodes.insert(name, m.callbacks) {
                        None => Changes::added(m.name),
                        Some(_) => Changes::default(),
                    }
                }
                MembershipEvent::Left { name } => match s.nodes.remove(name.as_str()) {
                    Some(_) => Changes::removed(name),
                    None => Changes::default(),
                },
            };
            s.reindex();
            changes
        };
        self.bump();
        changes
    }

    /// A node serving `callback`, chosen at random.
    pub fn pick(&self, callback: &str) -> Option<Arc<str>> {
        let s = self.read();
        let nodes = s.providers.get(callback)?;
        nodes.get(fastrand::usize(..nodes.len())).cloned()
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
        crate::sync::write(&self.state)
    }
}
