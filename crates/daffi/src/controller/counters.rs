//! Per-callback counts of the requests the controller forwards (for `daffi watch`).
//!
//! Counting sits on the controller's hot path, so each connection counts in its own
//! table behind its own lock, which nothing else takes but an occasional stats request;
//! that request sums the live tables and the totals of the connections that ended. Only
//! the callback name from the routing header is used: payloads are never looked at.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Distinct callback names one table keeps; requests for further names are counted
/// together in [`Counts::other`], so that a node sending many made-up names cannot grow
/// the controller's memory without bound.
pub const MAX_NAMES: usize = 4096;

/// The table id the scheduler counts its runs in (connection ids start at 1).
pub const SCHEDULER: u64 = 0;

/// Requests forwarded, by callback name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Requests per callback name.
    pub by_name: HashMap<Box<str>, u64>,
    /// Requests for names beyond [`MAX_NAMES`].
    pub other: u64,
}

impl Counts {
    fn add(&mut self, name: &str, n: u64) {
        if let Some(count) = self.by_name.get_mut(name) {
            *count = count.saturating_add(n);
        } else if self.by_name.len() < MAX_NAMES {
            self.by_name.insert(name.into(), n);
        } else {
            self.other = self.other.saturating_add(n);
        }
    }

    fn merge(&mut self, more: &Counts) {
        for (name, n) in &more.by_name {
            self.add(name, *n);
        }
        self.other = self.other.saturating_add(more.other);
    }
}

/// One connection's table.
#[derive(Debug, Default)]
pub struct Tally(Mutex<Counts>);

impl Tally {
    /// Counts one forwarded request for `callback`.
    pub fn count(&self, callback: &str) {
        lock(&self.0).add(callback, 1);
    }
}

/// Counts a session's requests in runs: consecutive requests for the same name are
/// added up without a lock or a hash, and the run goes into the [`Tally`] when the name
/// changes or the session flushes it (before it waits for more bytes, and before it
/// answers a stats request), so the counts lag by at most one read.
pub struct Runs {
    tally: Arc<Tally>,
    name: String,
    n: u64,
}

impl Runs {
    /// Runs counted into `tally`.
    pub fn new(tally: Arc<Tally>) -> Self {
        Runs {
            tally,
            name: String::new(),
            n: 0,
        }
    }

    /// Counts one forwarded request for `callback`.
    pub fn count(&mut self, callback: &str) {
        if self.n > 0 && self.name == callback {
            self.n += 1;
            return;
        }
        self.flush();
        self.name.clear();
        self.name.push_str(callback);
        self.n = 1;
    }

    /// Adds the current run to the tally.
    pub fn flush(&mut self) {
        if self.n > 0 {
            lock(&self.tally.0).add(&self.name, self.n);
            self.n = 0;
        }
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Every table of one controller.
#[derive(Debug, Default)]
pub struct CallCounts {
    live: Mutex<HashMap<u64, Arc<Tally>>>,
    ended: Mutex<Counts>,
}

impl CallCounts {
    /// The table of connection `id` (created on first use).
    pub fn open(&self, id: u64) -> Arc<Tally> {
        lock(&self.live).entry(id).or_default().clone()
    }

    /// Folds the table of connection `id` into the totals; the connection ended.
    pub fn close(&self, id: u64) {
        // Holding `live` while folding: a snapshot never sees the counts twice or not at all.
        let mut live = lock(&self.live);
        if let Some(tally) = live.remove(&id) {
            lock(&self.ended).merge(&lock(&tally.0));
        }
    }

    /// Every request forwarded since the controller started.
    pub fn snapshot(&self) -> Counts {
        let live = lock(&self.live);
        let mut total = lock(&self.ended).clone();
        for tally in live.values() {
            total.merge(&lock(&tally.0));
        }
        total
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_live_and_ended_connections() {
        let counts = CallCounts::default();
        let a = counts.open(1);
        let b = counts.open(2);
        a.count("add");
        a.count("add");
        b.count("add");
        b.count("greet");
        counts.close(2);
        let snap = counts.snapshot();
        assert_eq!(snap.by_name.get("add"), Some(&3));
        assert_eq!(snap.by_name.get("greet"), Some(&1));
        assert_eq!(snap.other, 0);
    }

    #[test]
    fn runs_reach_the_table_when_the_name_changes_or_they_are_flushed() {
        let counts = CallCounts::default();
        let mut runs = Runs::new(counts.open(1));
        for name in ["add", "add", "add", "greet", "add"] {
            runs.count(name);
        }
        let snap = counts.snapshot();
        assert_eq!(snap.by_name.get("add"), Some(&3), "the first run is in");
        assert_eq!(snap.by_name.get("greet"), Some(&1));
        runs.flush();
        assert_eq!(counts.snapshot().by_name.get("add"), Some(&4));
        runs.count("add");
        drop(runs);
        counts.close(1);
        assert_eq!(
            counts.snapshot().by_name.get("add"),
            Some(&5),
            "dropping flushes"
        );
    }

    #[test]
    fn names_beyond_the_limit_count_as_other() {
        let counts = CallCounts::default();
        let t = counts.open(1);
        for i in 0..MAX_NAMES + 10 {
            t.count(&format!("f{i}"));
        }
        t.count("f0");
        let snap = counts.snapshot();
        assert_eq!(snap.by_name.len(), MAX_NAMES);
        assert_eq!(snap.by_name.get("f0"), Some(&2));
        assert_eq!(snap.other, 10);
    }
}
