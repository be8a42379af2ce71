//! Ids of scheduled tasks that ended, so that a restarted controller neither brings
//! back a cancelled task nor keeps one a node restored without knowing it was cancelled.
//!
//! Nodes and controllers keep the most recent ones, up to a count: 8 bytes each, so the
//! bound is on memory, and a task id is never reused (ids are drawn at random among 2^53,
//! and never among live tasks or tombstones).

use std::collections::{HashSet, VecDeque};

/// Tombstones a node keeps: the last 4,096 tasks that ended.
pub const NODE_TOMBSTONES: usize = 4096;

/// Tombstones a controller keeps: its own ends and those nodes gave it in `Restore`
/// (each node's oldest to newest), the last 16,384.
pub const CONTROLLER_TOMBSTONES: usize = 4 * NODE_TOMBSTONES;

/// The ids of the last `capacity` tasks that ended, oldest first.
#[derive(Debug, Clone)]
pub struct Tombstones {
    capacity: usize,
    order: VecDeque<u64>,
    ids: HashSet<u64>,
}

impl Tombstones {
    /// An empty set that keeps the last `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        Tombstones {
            capacity,
            order: VecDeque::new(),
            ids: HashSet::new(),
        }
    }

    /// Records that `id` ended. An id already kept keeps its place; past the capacity,
    /// the oldest is forgotten.
    pub fn insert(&mut self, id: u64) {
        if self.capacity == 0 || !self.ids.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }

    /// Whether `id` is known to have ended.
    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    /// Every id kept, oldest first.
    pub fn ids(&self) -> Vec<u64> {
        self.order.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_ids_up_to_its_capacity_oldest_first() {
        let mut t = Tombstones::new(3);
        for id in [10, 20, 10, 30] {
            t.insert(id);
        }
        assert_eq!(t.ids(), [10, 20, 30], "a repeated id keeps its place");
        t.insert(40);
        assert_eq!(t.ids(), [20, 30, 40]);
        assert!(!t.contains(10) && t.contains(20) && t.contains(40));

        let mut none = Tombstones::new(0);
        none.insert(1);
        assert!(!none.contains(1) && none.ids().is_empty());
    }
}
