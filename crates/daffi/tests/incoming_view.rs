//! A node whose only stream is a caller's arguments (no stream callbacks, no member
//! hooks) knows no other node at first; it must still hear when its feeder dies, so the
//! callback's `Incoming` ends with `PeerDisconnected` rather than waiting forever.

mod common;
#[path = "common/watch.rs"]
mod watch;

use common::{Cluster, Transport, WAIT};

const ENTRY: &str = "child_process";

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[("worker", worker), ("feeder", watch::feeder)]);
}

/// A node serving only `watch` and its two probes.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    g.join().expect("join");
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
    watch::a_killed_feeder_ends_the_watch(&cluster, &worker, ENTRY);
}
