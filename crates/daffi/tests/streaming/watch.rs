//! A callback reading a stream of arguments until it ends, a feeder to be killed, and
//! the check that its death ends the callee's `Incoming`: shared by
//! `tests/client_streams.rs`, `tests/nats_streams.rs` and `tests/incoming_view.rs` (whose
//! callee serves nothing else, so it knows no other node at first).

// Each binary that includes this module uses a part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use crate::common::{Log, WAIT};
use daffi::{callback, Global, Incoming};
use futures_util::StreamExt;

/// What ended the stream `watch` reads (the error's debug form), and when.
static WATCH_ENDED: Log<(String, Instant)> = Log::new();
/// Items `watch` has read.
static WATCHED: Log<u64> = Log::new();

/// Reads until the stream ends, and logs how it ended.
#[callback]
fn watch(numbers: Incoming<u64>) -> u64 {
    let ending = numbers.into_iter().find_map(|item| match item {
        Ok(n) => {
            WATCHED.push(n);
            None
        }
        Err(e) => Some(format!("{e:?}")),
    });
    WATCH_ENDED.push((ending.unwrap_or_else(|| "the end".into()), Instant::now()));
    WATCHED.wait_until(0, |_| true).len() as u64
}

/// Waits until `watch` has read an item (or `timeout_ms` passed): how many it has.
#[callback]
fn watched(timeout_ms: u64) -> u64 {
    WATCHED.wait_until(timeout_ms, |w| !w.is_empty()).len() as u64
}

/// Once `watch`'s stream ended (or after `timeout_ms`): how, and how many ms ago.
#[callback]
fn watch_ended(timeout_ms: u64) -> Option<(String, u64)> {
    let ended = WATCH_ENDED.wait_until(timeout_ms, |e| !e.is_empty());
    ended
        .first()
        .map(|(how, at)| (how.clone(), at.elapsed().as_millis() as u64))
}

/// The environment variable naming the node a [`feeder`] feeds.
pub const ENV_TARGET: &str = "DAFFI_TEST_TARGET";

/// A feeder process over the built-in controller: feeds `watch` on the node named by
/// [`ENV_TARGET`] and waits to be killed.
pub fn feeder() {
    let g = crate::common::builder_for(&crate::common::address_from_env())
        .process_name(std::env::var(crate::common::ENV_NAME).expect("name"))
        .start()
        .expect("feeder starts");
    feed_watch_until_killed(&g, &std::env::var(ENV_TARGET).expect("target"));
}

/// A feeder's part: feeds `watch` on `target` three items, then waits for ever (to be
/// killed).
pub fn feed_watch_until_killed(g: &Global, target: &str) {
    g.wait_process_timeout(target, WAIT)
        .expect("the worker is known");
    let items = futures_util::stream::iter(1..=3u64).chain(futures_util::stream::pending());
    let outcome = g.call("watch").on(target).stream_from(items).fg::<u64>();
    panic!("the feeder was to be killed, not to end: {outcome:?}");
}

/// The `feeder` (feeding `watch` on `worker`) killed by `kill` once `watch` reads: the
/// callee's `Incoming` ends with `PeerDisconnected` naming it within `bound`, and the
/// callee serves on. Returns how long it took.
pub fn killed_feeder_ends_the_callees_incoming(
    g: &Global,
    worker: &str,
    feeder: &str,
    kill: impl FnOnce(),
    bound: Duration,
) -> Duration {
    let watched: u64 = g
        .call("watched")
        .args((WAIT.as_millis() as u64,))
        .on(worker)
        .timeout(WAIT * 2)
        .fg()
        .expect("watched");
    assert!(watched >= 1, "the callee reads the feeder's items");
    let killed = Instant::now();
    kill();
    let (how, ms_ago): (String, u64) = g
        .call("watch_ended")
        .args((WAIT.as_millis() as u64,))
        .on(worker)
        .timeout(WAIT * 2)
        .fg::<Option<(String, u64)>>()
        .expect("watch_ended")
        .expect("the callee's Incoming ended");
    assert!(
        how.starts_with("PeerDisconnected") && how.contains(feeder),
        "ended with {how}"
    );
    let after = killed
        .elapsed()
        .saturating_sub(Duration::from_millis(ms_ago));
    assert!(after < bound, "ended {after:?} after the kill");
    // The callee serves other calls as before.
    let read: u64 = g
        .call("watched")
        .args((0u64,))
        .on(worker)
        .timeout(WAIT)
        .fg()
        .expect("the callee still answers");
    assert!(read >= 1);
    after
}
