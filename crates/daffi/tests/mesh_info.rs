//! What a node learns about the mesh: `Global::members` (its view of the other nodes) and
//! `Global::controller_stats` (the controller's per-callback call counts), with a worker
//! in a separate process.

mod common;

use common::{Cluster, Transport, WAIT};
use daffi::Global;

/// The ignored test that runs worker processes (see `common`).
const ENTRY: &str = "worker_process";

#[test]
#[ignore = "run by the other tests as a worker process"]
fn worker_process() {
    let Ok(role) = std::env::var(common::ENV_ROLE) else {
        eprintln!("worker_process is started by other tests; nothing to do alone");
        return;
    };
    common::exit_when_parent_dies();
    let name = std::env::var(common::ENV_NAME).expect("worker name");
    assert_eq!(role, "worker");
    let g = common::builder_for(&common::address_from_env())
        .process_name(name)
        .start()
        .expect("worker starts");
    g.register("mul", |a: i64, b: i64| a * b).expect("register");
    g.register("add", |a: i64, b: i64| a + b).expect("register");
    g.join().expect("join");
}

#[test]
fn members_lists_other_nodes_with_sorted_callbacks() {
    let mut cluster = Cluster::start(Transport::Tcp, ENTRY);
    let worker = common::unique("worker");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    g.wait_function_timeout("mul", WAIT).expect("mul announced");
    g.wait_function_timeout("add", WAIT).expect("add announced");
    let quiet = common::builder_for(&cluster.address)
        .process_name(common::unique("quiet"))
        .start()
        .expect("a node without callbacks");
    g.wait_process_timeout(quiet.process_name(), WAIT)
        .expect("quiet joins");

    let members = g.members();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "members come sorted by name");
    assert!(
        !names.contains(&g.process_name()),
        "a node is not its own member"
    );
    let w = members.iter().find(|m| m.name == worker).expect("worker");
    assert_eq!(w.callbacks, ["add", "mul"]);
    let q = members
        .iter()
        .find(|m| m.name == quiet.process_name())
        .expect("a node serving nothing is a member too");
    assert!(q.callbacks.is_empty());
}

#[test]
fn controller_counts_forwarded_requests_by_callback() {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("worker");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    g.wait_function_timeout("add", WAIT).expect("add announced");
    g.wait_function_timeout("mul", WAIT).expect("mul announced");
    assert!(g.controller_stats().expect("stats").calls.is_empty());

    for i in 0..3 {
        let sum: i64 = g.call("add").args((i, 1)).fg().expect("add");
        assert_eq!(sum, i + 1);
    }
    // Fire and forget counts too: the controller handles one node's frames in order, so
    // the stats request below is answered after this request was forwarded.
    g.call("mul").args((2, 3)).no_return().expect("no_return");
    // Not delivered (no such process): not counted.
    assert!(g.call("add").on("nobody").fg::<i64>().is_err());

    // Calls from a node that has left still count.
    let other = common::builder_for(&cluster.address)
        .process_name(common::unique("other"))
        .start()
        .expect("second caller");
    other
        .wait_function_timeout("add", WAIT)
        .expect("other sees add");
    let _: i64 = other.call("add").args((1, 1)).fg().expect("add");
    other.stop();

    let stats = g.controller_stats().expect("stats");
    assert_eq!(stats.calls.get("add"), Some(&4), "{stats:?}");
    assert_eq!(stats.calls.get("mul"), Some(&1), "{stats:?}");
    assert_eq!(stats.other_calls, 0);
}

#[test]
fn a_controller_only_global_has_no_members_and_no_stats() {
    let dir = std::env::temp_dir().join("daffi-tests");
    let g = Global::builder()
        .unix_sock_path(dir.join(format!("{}.sock", common::unique("bare"))))
        .init_controller(true)
        .init_node(false)
        .start()
        .expect("controller");
    assert!(g.members().is_empty());
    assert!(matches!(g.controller_stats(), Err(daffi::Error::NoNode)));
}
