//! Callbacks that count "ticks" by tag, for the tests of PERIOD and schedules: a
//! schedule calls `tick(tag)`, the test asks `tick_count` or waits with `wait_ticks`.
//! Included only by the test files that schedule ticks (`#[path]`), so that other test
//! binaries do not serve these callbacks.

use daffi::callback;

use super::common::Log;

static TICKS: Log<String> = Log::new();

#[callback]
fn tick(tag: String) {
    TICKS.push(tag);
}

fn count(ticks: &[String], tag: &str) -> usize {
    ticks.iter().filter(|t| *t == tag).count()
}

/// How many ticks with `tag` arrived here.
#[callback]
fn tick_count(tag: String) -> usize {
    count(&TICKS.wait_until(0, |_| true), &tag)
}

/// Waits until `n` ticks with `tag` arrived (or `timeout_ms` passed); returns the count.
#[callback]
fn wait_ticks(tag: String, n: usize, timeout_ms: u64) -> usize {
    count(&TICKS.wait_until(timeout_ms, |t| count(t, &tag) >= n), &tag)
}
