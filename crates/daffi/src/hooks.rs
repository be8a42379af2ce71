//! Lifecycle hooks: user code run when this node connects or disconnects, and when other
//! nodes appear or disappear.

use std::fmt;
use std::sync::Arc;

use crate::global::Global;
use crate::node::NodeEvent;

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
