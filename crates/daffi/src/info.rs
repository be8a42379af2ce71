//! What a node can learn about the mesh: the other nodes ([`Global::members`]) and the
//! controller's counters ([`Global::controller_stats`]).
//!
//! [`Global::members`]: crate::Global::members
//! [`Global::controller_stats`]: crate::Global::controller_stats

use std::collections::HashMap;

/// Another node, as this node knows it ([`Global::members`](crate::Global::members)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemberInfo {
    /// Its process name.
    pub name: String,
    /// The callbacks it serves, sorted by name.
    pub callbacks: Vec<String>,
}

/// The controller's counters ([`Global::controller_stats`](crate::Global::controller_stats)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ControllerStats {
    /// Requests the controller forwarded since it started, by callback name: one per
    /// call, per node of a broadcast, and per scheduled run, with or without a result.
    /// A request counts once it is queued for its callee; those it refused at once (no
    /// such node, a callee reading too slowly) are not counted, while those queued and
    /// then lost with their callee's connection still are. Only names some connected node
    /// serves are listed (once the last node serving a name is gone, its count moves to
    /// `other_calls`, and starts from zero if a node serves it again), at most 4,096
    /// names, and at most as many as fit the answer (256 KiB of names, less with a
    /// frame limit under 1 MiB): the most called ones.
    pub calls: HashMap<String, u64>,
    /// Requests for every name not in `calls`: names no connected node serves (any
    /// more), names beyond those the controller keeps, and the `omitted_names`.
    pub other_calls: u64,
    /// How many names were left out of `calls` to keep the answer within its size
    /// (the least called); their requests are in `other_calls`.
    pub omitted_names: u64,
}
