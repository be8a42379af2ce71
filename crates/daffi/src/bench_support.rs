//! Hooks for the micro-benchmarks in `benches/` (routing tables are not public API).
//! Not public API: no stability promise.

use std::sync::Arc;

use bytes::Bytes;

use crate::controller::members::Members;
use crate::node::Membership;
use crate::protocol::io::{frame_channel, Outgoing, QueueLimits};
use crate::protocol::message::{Member, MembershipEvent};
use crate::protocol::Payload;

/// The controller's routing table with `nodes` nodes `node0..`, each serving `add`.
pub struct ControllerRoutes(Members);

impl ControllerRoutes {
    /// Builds the table (its queues write to nowhere).
    pub fn with_nodes(nodes: usize) -> std::io::Result<ControllerRoutes> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let members = Members::default();
        runtime.block_on(async {
            for i in 0..nodes {
                let (queue, _writer) = frame_channel(tokio::io::sink(), QueueLimits::default());
                members
                    .join(
                        &format!("node{i}"),
                        i as u64,
                        queue,
                        vec!["add".into()],
                        1 << 20,
                        |_| Outgoing::default(),
                    )
                    .await;
            }
        });
        Ok(ControllerRoutes(members))
    }

    /// What forwarding a request does first: find the destination and whether it
    /// takes requests.
    pub fn route_request(&self, dst: &str) -> bool {
        self.0.accepts(dst, true)
    }
}

/// A node's view of the others, with `nodes` nodes `node0..`, each serving `add`.
pub struct NodeView(Membership);

impl NodeView {
    /// Builds the view from `Joined` events, as a node does.
    pub fn with_nodes(nodes: usize) -> NodeView {
        let view = Membership::default();
        for i in 0..nodes {
            view.apply(MembershipEvent::Joined(Member {
                name: format!("node{i}"),
                callbacks: vec!["add".into(), format!("own{i}")],
            }));
        }
        NodeView(view)
    }

    /// What a call does first: pick a node serving `callback`.
    pub fn pick(&self, callback: &str) -> Option<Arc<str>> {
        self.0.pick(callback)
    }

    /// Applies one more `Joined` event (what each of N joins costs every node).
    pub fn join(&self, name: &str) {
        self.0.apply(MembershipEvent::Joined(Member {
            name: name.to_string(),
            callbacks: vec!["add".into()],
        }));
    }
}

/// Encodes a value as arguments and results are encoded.
pub fn encode_value<T: serde::Serialize>(value: &T) -> Result<Bytes, String> {
    crate::codec::encode_value(value).map(Payload::into_bytes)
}

/// Decodes arguments as a closure registered with `Global::register` does.
pub fn decode_args<T: crate::callback::Params>(payload: &Bytes) -> Option<T> {
    let signature = crate::callback::Signature {
        callback: "bench",
        names: &[],
        types: &[],
    };
    crate::callback::decode_args(&signature, payload).ok()
}
