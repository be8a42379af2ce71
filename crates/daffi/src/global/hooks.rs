//! Lifecycle hooks: user code run when this node connects or disconnects, and when other
//! nodes appear or disappear, run one at a time on a thread of their own.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Weak};

use super::{Global, Inner};
use crate::mesh::NodeEvent;

/// A lifecycle hook: gets the `Global` and a process name.
pub type Hook = Arc<dyn Fn(&Global, &str) + Send + Sync>;

/// The hooks set on a [`GlobalBuilder`](crate::GlobalBuilder).
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub on_init: Option<Hook>,
    pub on_node_connect: Option<Hook>,
    pub on_node_disconnect: Option<Hook>,
    pub on_member_added: Option<Hook>,
    pub on_member_removed: Option<Hook>,
}

impl Hooks {
    /// The hook for `event`, and the process name to give it.
    pub fn for_event<'a>(
        &'a self,
        event: &'a NodeEvent,
        own_name: &'a str,
    ) -> Option<(&'a Hook, &'a str)> {
        let (hook, name) = match event {
            NodeEvent::Connected => (&self.on_node_connect, own_name),
            NodeEvent::Disconnected => (&self.on_node_disconnect, own_name),
            NodeEvent::MemberAdded(n) => (&self.on_member_added, n.as_str()),
            NodeEvent::MemberRemoved(n) => (&self.on_member_removed, n.as_str()),
        };
        hook.as_ref().map(|h| (h, name))
    }

    pub fn is_empty(&self) -> bool {
        self.on_init.is_none()
            && self.on_node_connect.is_none()
            && self.on_node_disconnect.is_none()
            && self.on_member_added.is_none()
            && self.on_member_removed.is_none()
    }
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |h: &Option<Hook>| h.is_some();
        f.debug_struct("Hooks")
            .field("on_init", &set(&self.on_init))
            .field("on_node_connect", &set(&self.on_node_connect))
            .field("on_node_disconnect", &set(&self.on_node_disconnect))
            .field("on_member_added", &set(&self.on_member_added))
            .field("on_member_removed", &set(&self.on_member_removed))
            .finish()
    }
}

/// Runs the hooks for each node event, one at a time, on the calling thread. Ends when
/// the node is gone or the last `Global` clone is dropped.
pub(super) fn run_hooks(
    global: Weak<Inner>,
    hooks: Hooks,
    mut events: tokio::sync::mpsc::UnboundedReceiver<NodeEvent>,
) {
    let run = |hook: &Hook, name: &str| {
        let Some(inner) = global.upgrade() else {
            return false;
        };
        let g = Global { inner };
        if catch_unwind(AssertUnwindSafe(|| hook(&g, name))).is_err() {
            tracing::warn!("a lifecycle hook panicked");
        }
        true
    };
    let own_name = match global.upgrade() {
        Some(inner) => inner.name.clone(),
        None => return,
    };
    // The first connection happened before the Global existed: report it first.
    let first = events.blocking_recv();
    if let Some(event) = &first {
        if let Some((hook, name)) = hooks.for_event(event, &own_name) {
            if !run(hook, name) {
                return;
            }
        }
    }
    if let Some(hook) = &hooks.on_init {
        if !run(hook, &own_name) {
            return;
        }
    }
    while let Some(event) = events.blocking_recv() {
        if let Some((hook, name)) = hooks.for_event(&event, &own_name) {
            if !run(hook, name) {
                return;
            }
        }
    }
}
