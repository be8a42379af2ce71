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
    /// Requests it could not deliver are not counted. At most 4,096 names are kept.
    pub calls: HashMap<String, u64>,
    /// Requests for callback names beyond those 4,096.
    pub other_calls: u64,
}
