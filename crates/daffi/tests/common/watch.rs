//! A callback reading a stream of arguments until it ends, and a feeder process the
//! test kills: shared by the test binaries that check a killed caller ends the callee's
//! `Incoming` (with or without stream callbacks on the callee).

use std::time::{Duration, Instant};

use crate::common::{self, Cluster, Log, WAIT};
use daffi::{callback, Incoming};
use futures_util::StreamExt;

/// What ended the stream `watch` reads (the error's debug form), and when.
static WATCH_ENDED: Log<(String, Instant)> = Log::new();
/// Items `watch` has read.
static WATCHED: Log<u64> = Log::new();

/// Reads until the stream ends, and logs how it ended.
#[callback]
pub fn watch(numbers: Incoming<u64>) -> u64 {
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
pub fn watched(timeout_ms: u64) -> u64 {
    WATCHED.wait_until(timeout_ms, |w| !w.is_empty()).len() as u64
}

/// Once `watch`'s stream ended (or after `timeout_ms`): how, and how many ms ago.
#[callback]
pub fn watch_ended(timeout_ms: u64) -> Option<(String, u64)> {
    let ended = WATCH_ENDED.wait_until(timeout_ms, |e| !e.is_empty());
    ended
        .first()
        .map(|(how, at)| (how.clone(), at.elapsed().as_millis() as u64))
}

/// A caller that feeds `watch` a few items and then an endless wait: killed by the test.
pub fn feeder() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("feeder starts");
    let target = std::env::var("DAFFI_TEST_TARGET").expect("target");
    g.wait_process_timeout(&target, WAIT)
        .expect("the worker is known");
    let items = futures_util::stream::iter(1..=3u64).chain(futures_util::stream::pending());
    let outcome = g.call("watch").on(target).stream_from(items).fg::<u64>();
    panic!("the feeder was to be killed, not to end: {outcome:?}");
}

/// Starts a feeder of `watch` on `worker`, kills it once `watch` reads, and checks the
/// callee's `Incoming` ended with `PeerDisconnected` naming it, within a second.
pub fn a_killed_feeder_ends_the_watch(cluster: &Cluster, worker: &str, entry: &str) {
    let feeder = common::unique("feeder");
    let env = [("DAFFI_TEST_TARGET", worker)];
    let mut feeding =
        common::spawn_child_with(entry, "feeder", &feeder, cluster.caller.address(), &env);
    let g = &cluster.caller;
    let watched: u64 = g
        .call("watched")
        .args((WAIT.as_millis() as u64,))
        .on(worker)
        .timeout(WAIT * 2)
        .fg()
        .expect("watched");
    assert!(watched >= 1, "the callee reads the feeder's items");
    let killed = Instant::now();
    feeding.kill();
    let (how, ms_ago): (String, u64) = g
        .call("watch_ended")
        .args((WAIT.as_millis() as u64,))
        .on(worker)
        .timeout(WAIT * 2)
        .fg::<Option<(String, u64)>>()
        .expect("watch_ended")
        .expect("the callee's Incoming ended");
    assert!(
        how.starts_with("PeerDisconnected") && how.contains(&feeder),
        "ended with {how}"
    );
    let after = killed
        .elapsed()
        .saturating_sub(Duration::from_millis(ms_ago));
    assert!(
        after < Duration::from_secs(1),
        "ended {after:?} after the kill"
    );
    // The callee serves other calls as before.
    let watched: u64 = g
        .call("watched")
        .args((0u64,))
        .on(worker)
        .timeout(WAIT)
        .fg()
        .expect("the callee still answers");
    assert!(watched >= 1);
}
