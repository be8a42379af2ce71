//! A node whose only stream is a caller's arguments (no stream callbacks, no member
//! hooks) knows no other node at first; it must still hear when its feeder dies, so the
//! callback's `Incoming` ends with `PeerDisconnected` rather than waiting forever.

mod common;
#[path = "streaming/watch.rs"]
mod watch;

use std::time::Duration;

use common::{Cluster, Transport, WAIT};

const ENTRY: &str = "child_process";

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[
        ("worker", common::run_worker_role),
        ("feeder", watch::feeder),
    ]);
}

#[test]
fn a_killed_feeder_ends_the_incoming_of_a_node_that_knew_no_one() {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("lean");
    cluster.spawn_worker(&worker);
    cluster
        .caller
        .wait_function_timeout("watch", WAIT)
        .expect("the worker's callbacks are announced");
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
