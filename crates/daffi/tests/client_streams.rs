//! Client streams: a caller streams arguments to a callback's `Incoming` parameter
//! (`.stream_from(..)`), with credit-based flow control, and both ways at once. Real
//! processes over a real socket: the callee is a worker process of this binary, named
//! with `.on` (every node of this binary serves the same `#[callback]` fns), the caller a
//! node in the test process (or, to be killed, a child of its own).

#[path = "streaming/arguments.rs"]
mod arguments;
mod common;
#[path = "streaming/watch.rs"]
mod watch;

use std::sync::atomic::Ordering;
use std::time::Duration;

use arguments::{Counted, WINDOW};
use common::{Cluster, Transport, WAIT};
use daffi::{callback, Error, Incoming};
use futures_util::StreamExt;

const ENTRY: &str = "child_process";

// ---- the worker ---------------------------------------------------------------------

#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

/// A slow reader: `n` items, 10 ms each.
#[callback]
async fn read_slowly(n: usize, mut numbers: Incoming<u64>) -> daffi::Result<u64> {
    let mut read = 0;
    while let Some(item) = numbers.next().await {
        item?;
        read += 1;
        if read == n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(read)
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[("worker", worker), ("feeder", watch::feeder)]);
}

/// A node serving this file's `#[callback]` functions and a closure taking `Incoming`.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    g.register("count", |label: String, items: Incoming<String>| {
        let n = items.into_iter().map_while(Result::ok).count();
        format!("{label}: {n}")
    })
    .expect("register count");
    g.join().expect("join");
}

// ---- helpers ---------------------------------------------------------------------------

/// A controller and caller in this process, and one worker.
fn cluster_with_worker() -> (Cluster, String) {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("incoming");
    cluster.spawn_worker(&worker);
    cluster
        .caller
        .wait_function_timeout("count", WAIT)
        .expect("the worker's callbacks are announced");
    (cluster, worker)
}

// ---- tests -----------------------------------------------------------------------------

/// The user's own runtime, as `#[tokio::main]` makes it.
#[tokio::main]
async fn users_main(address: daffi::Address, worker: String) {
    let caller = common::builder_for(&address)
        .process_name(common::unique("async-caller"))
        .start_async()
        .await
        .expect("start_async");
    caller
        .wait_function_timeout_async("sum_async", WAIT)
        .await
        .expect("announced");
    let numbers = || futures_util::stream::iter(1..=10_000i64);
    let expected = 10_000 * 10_001 / 2;

    let by_async: i64 = caller
        .call("sum_async")
        .on(&worker)
        .args((2,))
        .stream_from(numbers())
        .timeout(WAIT)
        .fg_async()
        .await
        .expect("sum_async");
    assert_eq!(by_async, 2 * expected);

    let by_sync = caller
        .call("sum_sync")
        .on(&worker)
        .args((3,))
        .stream_from(numbers())
        .timeout(WAIT)
        .bg::<i64>()
        .expect("bg")
        .await
        .expect("sum_sync");
    assert_eq!(by_sync, 3 * expected);

    // A registered closure takes `Incoming` too.
    let words = futures_util::stream::iter(["a", "b", "c"]);
    let counted: String = caller
        .call("count")
        .on(&worker)
        .args(("words",))
        .stream_from(words)
        .fg_async()
        .await
        .expect("count");
    assert_eq!(counted, "words: 3");
    caller.stop();
}

#[test]
fn ten_thousand_items_are_streamed_in_and_summed_from_the_users_own_runtime() {
    let (cluster, worker) = cluster_with_worker();
    users_main(cluster.caller.address().clone(), worker.clone());
    // And from sync code, FG.
    let sum: i64 = cluster
        .caller
        .call("sum_sync")
        .on(&worker)
        .args((1,))
        .stream_from(futures_util::stream::iter(1..=10_000i64))
        .timeout(WAIT)
        .fg()
        .expect("fg");
    assert_eq!(sum, 10_000 * 10_001 / 2);
}

#[test]
fn both_ways_at_once_items_come_back_doubled_in_order() {
    let (cluster, worker) = cluster_with_worker();
    arguments::both_ways_doubled_in_order(&cluster.caller, &worker, 5_000);
}

#[test]
fn a_callee_that_returns_early_stops_the_feeding_within_its_credit() {
    let (cluster, worker) = cluster_with_worker();
    arguments::returning_early_stops_the_feeding(&cluster.caller, &worker);
}

#[test]
fn a_slow_callee_slows_the_feeding_to_its_credit() {
    let (cluster, worker) = cluster_with_worker();
    let (items, pulled, _dropped) = Counted::new();
    let read: u64 = cluster
        .caller
        .call("read_slowly")
        .on(&worker)
        .args((20,))
        .stream_from(items)
        .timeout(WAIT)
        .fg()
        .expect("read_slowly");
    assert_eq!(read, 20);
    // In the 200 ms the callee took, an endless stream would have been pulled for
    // millions of items; it was pulled only as far as the callee granted: the first
    // window (20 read is below the half that tops it up).
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(
        (20..=WINDOW).contains(&pulled),
        "pulled {pulled} items for a callee that read 20"
    );
}

#[test]
fn a_killed_caller_ends_the_callees_incoming_with_its_error_within_a_second() {
    let (cluster, worker) = cluster_with_worker();
    let feeder = common::unique("feeder");
    let env = [(watch::ENV_TARGET, worker.as_str())];
    let mut feeding =
        common::spawn_child_with(ENTRY, "feeder", &feeder, cluster.caller.address(), &env);
    watch::killed_feeder_ends_the_callees_incoming(
        &cluster.caller,
        &worker,
        &feeder,
        || feeding.kill(),
        Duration::from_secs(1),
    );
}

#[test]
fn the_wrong_call_for_an_incoming_parameter_is_a_named_error() {
    let (cluster, worker) = cluster_with_worker();
    let g = &cluster.caller;
    match g
        .call("sum_sync")
        .on(&worker)
        .args((1,))
        .timeout(WAIT)
        .fg::<i64>()
    {
        Err(Error::NotAStream {
            callback, reason, ..
        }) => {
            assert_eq!(callback, "sum_sync");
            assert!(reason.contains("stream_from"), "{reason}");
        }
        other => panic!("expected NotAStream, got {other:?}"),
    }
    let items = futures_util::stream::iter([1i64]);
    match g
        .call("sync_add")
        .on(&worker)
        .args((1, 2))
        .stream_from(items)
        .timeout(WAIT)
        .fg::<i64>()
    {
        Err(Error::NotAStream { callback, .. }) => assert_eq!(callback, "sync_add"),
        other => panic!("expected NotAStream, got {other:?}"),
    }
    let items = futures_util::stream::iter([1i64]);
    match g.call("sum_sync").stream_from(items).no_return() {
        Err(Error::Config(message)) => assert!(message.contains("fg"), "{message}"),
        other => panic!("expected Config, got {other:?}"),
    }
    // The callee goes on serving.
    let sum: i64 = g
        .call("sum_sync")
        .on(&worker)
        .args((1,))
        .stream_from(futures_util::stream::iter(1..=4i64))
        .timeout(WAIT)
        .fg()
        .expect("sum_sync");
    assert_eq!(sum, 10);
}

#[test]
fn a_caller_that_gives_up_cancels_the_callees_incoming() {
    let (cluster, worker) = cluster_with_worker();
    let g = &cluster.caller;
    let items = futures_util::stream::iter(1..=3u64).chain(futures_util::stream::pending());
    let timeout = Duration::from_millis(300);
    match g
        .call("watch")
        .on(&worker)
        .stream_from(items)
        .timeout(timeout)
        .fg::<u64>()
    {
        Err(Error::Timeout { after, .. }) => assert_eq!(after, timeout),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let (how, _): (String, u64) = g
        .call("watch_ended")
        .args((WAIT.as_millis() as u64,))
        .on(&worker)
        .timeout(WAIT * 2)
        .fg::<Option<(String, u64)>>()
        .expect("watch_ended")
        .expect("the callee's Incoming ended");
    assert!(how.starts_with("Cancelled"), "ended with {how}");
}
