//! Per-callback counts of the requests the controller forwards (for `daffi watch`).
//!
//! Counting sits on the controller's hot path, so each connection counts in its own
//! table behind its own lock, which nothing else takes but an occasional stats request;
//! that request sums the live tables and the totals of the connections that ended. Only
//! the callback name from the routing header is used: payloads are never looked at.
//!
//! What the counters hold is bounded: each table keeps at most [`MAX_NAMES`] names of
//! [`MAX_NAME_BYTES`] together, and the counts of names no connected node serves (any
//! more) are folded into [`Counts::other`], when their caller's connection ends and at
//! each stats request. The answer to a stats request fits a byte budget
//! ([`Counts::report`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sync::lock;

/// Distinct callback names one table keeps; requests for further names are counted
/// together in [`Counts::other`], so that a node sending many made-up names cannot grow
/// the controller's memory without bound.
pub const MAX_NAMES: usize = 4096;

/// Bytes of callback names one table keeps (see [`MAX_NAMES`]): 1 MiB, so that a table
/// holds 4,096 names of up to 256 bytes, or fewer longer ones.
pub const MAX_NAME_BYTES: usize = 1024 * 1024;

/// What one name and its count add to an encoded `stats` answer, besides the name's
/// bytes: a string header and an integer (3 + 9 bytes, rounded up).
const ENTRY_COST: usize = 16;

/// The table id the scheduler counts its runs in (connection ids start at 1).
pub const SCHEDULER: u64 = 0;

/// Whether some connected node serves a callback name.
pub type Served<'a> = &'a dyn Fn(&str) -> bool;

/// Requests forwarded, by callback name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Requests per callback name.
    pub by_name: HashMap<Box<str>, u64>,
    /// Bytes of the names in `by_name`.
    name_bytes: usize,
    /// Requests for names not in `by_name`: beyond the limits, or no longer served.
    pub other: u64,
}

impl Counts {
    fn add(&mut self, name: &str, n: u64) {
        if let Some(count) = self.by_name.get_mut(name) {
            *count = count.saturating_add(n);
        } else if self.by_name.len() < MAX_NAMES && self.name_bytes + name.len() <= MAX_NAME_BYTES {
            self.by_name.insert(name.into(), n);
            self.name_bytes += name.len();
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

    /// Folds the counts of the names no connected node serves into `other`.
    fn retire_unserved(&mut self, served: Served<'_>) {
        let (other, bytes) = (&mut self.other, &mut self.name_bytes);
        self.by_name.retain(|name, n| {
            if served(name) {
                return true;
            }
            *other = other.saturating_add(*n);
            *bytes -= name.len();
            false
        });
    }

    /// The counts as an answer of at most `budget` bytes of names (each counting 16
    /// bytes more): the most called names, as many as fit; the others' requests are
    /// added to `other`.
    pub fn report(self, budget: usize) -> Report {
        let mut names: Vec<(Box<str>, u64)> = self.by_name.into_iter().collect();
        names.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut report = Report {
            calls: HashMap::new(),
            other_calls: self.other,
            omitted_names: 0,
        };
        let mut left = budget;
        let mut names = names.into_iter();
        for (name, n) in names.by_ref() {
            let Some(rest) = left.checked_sub(name.len() + ENTRY_COST) else {
                report.add_omitted(n);
                break;
            };
            left = rest;
            report.calls.insert(name.into(), n);
        }
        for (_, n) in names {
            report.add_omitted(n);
        }
        report
    }
}

/// A `stats` answer: the counts of the most called names, and the rest summed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Requests per callback name, for the names that fit the answer.
    pub calls: HashMap<String, u64>,
    /// Requests for every other name.
    pub other_calls: u64,
    /// Names left out for the budget (their requests are in `other_calls`).
    pub omitted_names: u64,
}

impl Report {
    fn add_omitted(&mut self, n: u64) {
        self.other_calls = self.other_calls.saturating_add(n);
        self.omitted_names += 1;
    }
}

/// One connection's table.
#[derive(Debug, Default)]
pub struct Tally {
    table: Mutex<Table>,
    /// Calls for the table's `running` name not yet added to it: counted by [`Runs`]
    /// without the lock, added at the next name change, stats request or close.
    running_calls: AtomicU64,
}

/// A table of counts, and the name its tally counts calls of without the lock.
#[derive(Debug, Default)]
struct Table {
    counts: Counts,
    running: String,
}

impl Tally {
    /// Counts one forwarded request for `callback`.
    pub fn count(&self, callback: &str) {
        lock(&self.table).counts.add(callback, 1);
    }

    /// The table, with the calls counted without the lock added in.
    fn settled(&self) -> MutexGuard<'_, Table> {
        let mut table = lock(&self.table);
        let running = self.running_calls.swap(0, Ordering::AcqRel);
        if running > 0 {
            let Table {
                counts,
                running: name,
            } = &mut *table;
            counts.add(name, running);
        }
        table
    }
}

/// Counts a session's requests in runs: consecutive requests for the same name are
/// added to one atomic of the [`Tally`], without a lock or a hash; the name goes into
/// the tally's table when it changes, and a stats request or the connection's close
/// adds the run so far. A stats request thus sees every request forwarded before it.
pub struct Runs {
    tally: Arc<Tally>,
    /// The tally's running name, as last set by this session.
    name: String,
}

impl Runs {
    /// Runs counted into `tally`.
    pub fn new(tally: Arc<Tally>) -> Self {
        let name = lock(&tally.table).running.clone();
        Runs { tally, name }
    }

    /// Counts `calls` forwarded calls for `callback` (a batch of NO_RETURN calls).
    pub fn count_calls(&mut self, callback: &str, calls: u64) {
        if self.name != callback {
            // The calls so far go to the old name, under the lock that changes it.
            let mut table = self.tally.settled();
            table.running.clear();
            table.running.push_str(callback);
            drop(table);
            self.name.clear();
            self.name.push_str(callback);
        }
        self.tally.running_calls.fetch_add(calls, Ordering::Relaxed);
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

    /// Folds the table of connection `id` into the totals; the connection ended. The
    /// names no connected node serves go into `other`: a node that called made-up
    /// names, or names whose last provider left, leaves no trace but a count.
    pub fn close(&self, id: u64, served: Served<'_>) {
        // Holding `live` while folding: a snapshot never sees the counts twice or not at all.
        let mut live = lock(&self.live);
        if let Some(tally) = live.remove(&id) {
            let mut table = tally.settled();
            table.counts.retire_unserved(served);
            lock(&self.ended).merge(&table.counts);
        }
    }

    /// Every request forwarded since the controller started. First folds, in every
    /// table, the names no connected node serves (any more) into `other`.
    pub fn snapshot(&self, served: Served<'_>) -> Counts {
        let live = lock(&self.live);
        let mut ended = lock(&self.ended);
        ended.retire_unserved(served);
        let mut total = ended.clone();
        drop(ended);
        for tally in live.values() {
            let mut table = tally.settled();
            table.counts.retire_unserved(served);
            total.merge(&table.counts);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name is served.
    fn all(_: &str) -> bool {
        true
    }

    #[test]
    fn sums_live_and_ended_connections() {
        let counts = CallCounts::default();
        let a = counts.open(1);
        let b = counts.open(2);
        a.count("add");
        a.count("add");
        b.count("add");
        b.count("greet");
        counts.close(2, &all);
        let snap = counts.snapshot(&all);
        assert_eq!(snap.by_name.get("add"), Some(&3));
        assert_eq!(snap.by_name.get("greet"), Some(&1));
        assert_eq!(snap.other, 0);
    }

    #[test]
    fn runs_are_in_every_snapshot_and_in_the_totals_when_the_connection_closes() {
        let counts = CallCounts::default();
        let mut runs = Runs::new(counts.open(1));
        for name in ["add", "add", "add", "greet", "add"] {
            runs.count_calls(name, 1);
        }
        let snap = counts.snapshot(&all);
        assert_eq!(
            snap.by_name.get("add"),
            Some(&4),
            "the running name's calls are in"
        );
        assert_eq!(snap.by_name.get("greet"), Some(&1));
        runs.count_calls("add", 2);
        assert_eq!(
            counts.snapshot(&all).by_name.get("add"),
            Some(&6),
            "counted once each"
        );
        runs.count_calls("add", 1);
        drop(runs);
        counts.close(1, &all);
        let totals = counts.snapshot(&all);
        assert_eq!(
            totals.by_name.get("add"),
            Some(&7),
            "the close adds the run"
        );
        assert_eq!(totals.by_name.get("greet"), Some(&1));
    }

    #[test]
    fn a_snapshot_taken_while_a_run_counts_loses_and_doubles_nothing() {
        let counts = Arc::new(CallCounts::default());
        let tally = counts.open(1);
        let counting = std::thread::spawn(move || {
            let mut runs = Runs::new(tally);
            for i in 0..20_000u64 {
                runs.count_calls(if i % 1000 < 500 { "a" } else { "b" }, 1);
            }
        });
        let mut last = 0;
        while !counting.is_finished() {
            let snap = counts.snapshot(&all);
            let seen: u64 = snap.by_name.values().sum();
            assert!(seen >= last, "counts only grow: {seen} after {last}");
            last = seen;
        }
        counting.join().unwrap();
        let snap = counts.snapshot(&all);
        assert_eq!(snap.by_name.get("a"), Some(&10_000));
        assert_eq!(snap.by_name.get("b"), Some(&10_000));
    }

    #[test]
    fn names_beyond_the_limits_count_as_other() {
        let counts = CallCounts::default();
        let t = counts.open(1);
        for i in 0..MAX_NAMES + 10 {
            t.count(&format!("f{i}"));
        }
        t.count("f0");
        let snap = counts.snapshot(&all);
        assert_eq!(snap.by_name.len(), MAX_NAMES);
        assert_eq!(snap.by_name.get("f0"), Some(&2));
        assert_eq!(snap.other, 10);

        // Long names: the bytes run out before the count does.
        let t = counts.open(2);
        let long = |i: usize| format!("{i:0>65535}");
        for i in 0..20 {
            t.count(&long(i));
        }
        let table = &lock(&t.table).counts;
        assert_eq!(table.by_name.len(), MAX_NAME_BYTES / 65535);
        assert_eq!(table.other, 20 - (MAX_NAME_BYTES / 65535) as u64);
    }

    #[test]
    fn names_nobody_serves_fold_into_other_when_their_caller_leaves_or_at_a_snapshot() {
        let counts = CallCounts::default();
        let served = |name: &str| name == "live";
        let a = counts.open(1);
        let b = counts.open(2);
        a.count("live");
        a.count("made-up");
        b.count("gone");
        b.count("gone");
        counts.close(1, &served);
        let ended = lock(&counts.ended).clone();
        assert_eq!(ended.by_name.keys().collect::<Vec<_>>(), [&"live".into()]);
        assert_eq!(ended.other, 1);
        let snap = counts.snapshot(&served);
        assert_eq!(snap.by_name.len(), 1);
        assert_eq!(snap.other, 3);
        // The tables themselves were trimmed: the names are gone from memory.
        assert!(lock(&b.table).counts.by_name.is_empty());
        assert_eq!(lock(&b.table).counts.name_bytes, 0);
    }

    #[test]
    fn a_report_keeps_the_most_called_names_within_its_budget() {
        let mut counts = Counts::default();
        for (name, n) in [("a", 5), ("bb", 9), ("ccc", 1), ("dddd", 7)] {
            counts.add(name, n);
        }
        counts.other = 2;
        let everything = counts.clone().report(usize::MAX);
        assert_eq!(everything.calls.len(), 4);
        assert_eq!((everything.other_calls, everything.omitted_names), (2, 0));
        // Room for "bb" and "dddd" (2 + 4 bytes, 16 more each), not for "a" too.
        let two = counts.report(2 + 4 + 2 * ENTRY_COST + ENTRY_COST);
        let mut kept: Vec<&str> = two.calls.keys().map(String::as_str).collect();
        kept.sort();
        assert_eq!(kept, ["bb", "dddd"]);
        assert_eq!((two.other_calls, two.omitted_names), (2 + 5 + 1, 2));
    }
}
