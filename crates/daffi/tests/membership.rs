//! What a node knows of the others after mass joins and leaves, with real processes:
//! 300 nodes in 3 child processes, then half of them leaving. A node that only calls
//! knows the providers of what it calls; a node that asks for the members (or has
//! membership hooks) knows every node; neither is ever offered a node whose leave was
//! announced. The same over NATS (with `--features nats`), where a third of the nodes
//! die instead (SIGKILL) and leave within the stated bound.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
#[cfg(feature = "nats")]
use std::time::Instant;

use common::wire::{self, read_frame};
use common::{Cluster, Log, Transport, WAIT};
use daffi::{callback, Address, Global};
use daffi_wire::Kind;
use serde::Deserialize;

/// The ignored test that runs worker processes (see `common`).
const ENTRY: &str = "worker_process";

/// Child processes, and nodes in each.
const PROCESSES: usize = 3;
const NODES_EACH: usize = 100;

/// Served by every node of this test binary (from its first connection): the process
/// that answered.
#[callback]
fn scale_work() -> u32 {
    std::process::id()
}

/// The name of node `i` of the child process called `process`.
fn node_name(process: &str, i: usize) -> String {
    format!("{process}-{i}")
}

/// The callback that makes the odd nodes of the child `process` leave.
fn leave_callback(process: &str) -> String {
    format!("leave_odd_{process}")
}

#[test]
#[ignore = "run by the other tests as a worker process"]
fn worker_process() {
    common::run_role(&[("swarm", swarm)]);
}

/// `NODES_EACH` nodes on one runtime; node 0 serves the callback that stops the odd
/// ones (and answers once they have left).
fn swarm() {
    let process = std::env::var(common::ENV_NAME).expect("a name");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let nodes: Vec<Global> = runtime.block_on(async {
        let mut starting = tokio::task::JoinSet::new();
        for i in 0..NODES_EACH {
            let builder = swarm_builder().process_name(node_name(&process, i));
            starting.spawn(async move { (i, builder.start_async().await.expect("a node starts")) });
        }
        let mut nodes: Vec<(usize, Global)> = starting.join_all().await;
        nodes.sort_by_key(|(i, _)| *i);
        nodes.into_iter().map(|(_, g)| g).collect()
    });
    let odd: Vec<Global> = nodes.iter().skip(1).step_by(2).cloned().collect();
    nodes[0]
        .register(&leave_callback(&process), move || {
            for g in &odd {
                g.stop();
            }
            odd.len()
        })
        .expect("register");
    nodes[0].join().expect("join");
}

/// A swarm node's builder: on the NATS servers of its environment, if any, else on the
/// controller's address.
fn swarm_builder() -> daffi::GlobalBuilder {
    #[cfg(feature = "nats")]
    if std::env::var(common::nats::ENV_NATS).is_ok() {
        return common::nats_child_builder();
    }
    common::builder_for(&common::address_from_env())
}

/// The nodes a broadcast of `scale_work` from `g` reaches.
fn providers(g: &Global) -> BTreeSet<String> {
    let answers: HashMap<String, u32> = g
        .call("scale_work")
        .timeout(WAIT)
        .broadcast()
        .expect("a broadcast to every provider");
    answers.into_keys().collect()
}

/// Waits until a broadcast of `scale_work` from `g` reaches exactly `expected`
/// (bounded): over NATS, `g`'s watch of the providers hears of joins and leaves a
/// moment after the servers stored them (a node's `c` keys follow its `n` entry).
#[cfg(feature = "nats")]
fn wait_for_providers(g: &Global, expected: &BTreeSet<String>, what: &str) {
    let reached = || -> BTreeSet<String> {
        let answers = g
            .call("scale_work")
            .timeout(WAIT)
            .broadcast_results::<u32>()
            .expect("a broadcast");
        answers.into_keys().collect()
    };
    let deadline = Instant::now() + WAIT;
    while reached() != *expected {
        assert!(Instant::now() < deadline, "{what}");
    }
}

/// Asks node 0 of each of `processes` to stop its odd nodes, and checks that they left.
fn odd_nodes_leave(caller: &Global, processes: &[String]) {
    for process in processes {
        let left: usize = caller
            .call(&leave_callback(process))
            .on(node_name(process, 0))
            .timeout(WAIT)
            .fg()
            .expect("the odd nodes leave");
        assert_eq!(left, NODES_EACH / 2);
    }
}

/// Checks that no node of `gone` is offered any more: calls from `caller` all succeed,
/// a broadcast reaches exactly `staying` (and the watcher), and the members the watcher
/// and (once it asks) the caller know hold `staying` and none of `gone`.
fn knows_only(caller: &Global, watcher: &Global, staying: &[String], gone: &BTreeSet<String>) {
    for _ in 0..3 * staying.len() {
        caller
            .call("scale_work")
            .timeout(WAIT)
            .fg::<u32>()
            .expect("a call never goes to a node that left");
    }
    let expected = serving(staying, watcher);
    assert_eq!(providers(caller), expected);
    let now = members(watcher);
    assert!(now.is_superset(&staying.iter().cloned().collect()) && now.is_disjoint(gone));
    // A node that asks for the members now knows them all too.
    let late = members(caller);
    assert!(late.is_superset(&expected) && late.is_disjoint(gone));
    assert!(!late.contains(caller.process_name()), "never itself");
}

/// The nodes that serve `scale_work`: `nodes`, and the watcher (which serves it too).
fn serving(nodes: &[String], watcher: &Global) -> BTreeSet<String> {
    nodes
        .iter()
        .cloned()
        .chain([watcher.process_name().to_string()])
        .collect()
}

/// Waits until `watcher` knows every node of `all`.
fn wait_for_all(watcher: &Global, all: &[String]) {
    for name in all {
        watcher
            .wait_process_timeout(name, WAIT)
            .expect("the watcher hears of every node");
    }
}

/// The names in `g.members()`.
fn members(g: &Global) -> BTreeSet<String> {
    g.members().into_iter().map(|m| m.name).collect()
}

/// The nodes `NODES_EACH` nodes of each of `processes` are called, those with an index
/// that `keep` keeps.
fn names_of(processes: &[String], keep: impl Fn(usize) -> bool + Copy) -> Vec<String> {
    processes
        .iter()
        .flat_map(|p| {
            (0..NODES_EACH)
                .filter(move |i| keep(*i))
                .map(move |i| node_name(p, i))
        })
        .collect()
}

#[test]
fn after_mass_joins_and_leaves_a_node_knows_what_the_docs_say() {
    let cluster = Cluster::start(Transport::Unix, ENTRY);
    // The membership hooks keep this node's view whole from the start.
    let removed: Arc<Log<String>> = Arc::new(Log::new());
    let on_removed = removed.clone();
    let watcher = common::builder_for(&cluster.address)
        .process_name(common::unique("watcher"))
        .on_member_removed(move |_, name| on_removed.push(name.to_string()))
        .start()
        .expect("the watcher starts");
    // This one only calls: it learns the providers of what it calls.
    let caller = &cluster.caller;
    let processes: Vec<String> = (0..PROCESSES).map(|_| common::unique("swarm")).collect();
    let mut children = Vec::new();
    for process in &processes {
        children.push(common::spawn_child(
            ENTRY,
            "swarm",
            process,
            &cluster.address,
        ));
    }
    let all = names_of(&processes, |_| true);
    wait_for_all(&watcher, &all);
    for process in &processes {
        caller
            .wait_function_timeout(&leave_callback(process), WAIT)
            .expect("a child is ready");
    }

    // Every node that joined, and only those, serves `scale_work` to the caller.
    let expected = |nodes: &[String]| serving(nodes, &watcher);
    assert_eq!(providers(caller), expected(&all));
    let set = |nodes: &[String]| -> BTreeSet<String> { nodes.iter().cloned().collect() };
    assert!(members(&watcher).is_superset(&set(&all)));

    // Half of every child's nodes leave.
    odd_nodes_leave(caller, &processes);
    let staying = names_of(&processes, |i| i % 2 == 0);
    let gone: BTreeSet<String> = all
        .iter()
        .filter(|n| !staying.contains(n))
        .cloned()
        .collect();
    let seen = removed.wait_until(WAIT.as_millis() as u64, |names| {
        gone.iter().all(|n| names.contains(n))
    });
    let seen: BTreeSet<String> = seen.into_iter().collect();
    assert_eq!(
        seen, gone,
        "the watcher hears of every leave, and of no other"
    );
    // Every leave is announced to the watcher by now, and to the caller in the same
    // batch: a round trip to the controller makes sure the caller has read it.
    caller.controller_stats().expect("a round trip");

    // No node that left is offered any more: calls all succeed, and a broadcast
    // reaches exactly the nodes that stay.
    knows_only(caller, &watcher, &staying, &gone);
    drop(children);
}

/// How long after a SIGKILL a node may take to leave every view over NATS: its claim
/// lives 12 s after its last heartbeat (1 s before), then the reaper's next round
/// (every 1 s) probes and removes it; 4 s of slack for a loaded machine.
#[cfg(feature = "nats")]
const DEATH_BOUND: std::time::Duration = std::time::Duration::from_secs(18);

#[cfg(feature = "nats")]
#[test]
fn over_nats_a_node_knows_what_the_docs_say_after_mass_joins_leaves_and_deaths() {
    use common::nats::{NatsServer, ENV_NAMESPACE, ENV_NATS};

    let server = NatsServer::start();
    let url = server.url();
    let namespace = common::unique("ns").replace('-', "_");
    let builder = |name: &str| {
        Global::builder()
            .nats(&url)
            .namespace(&namespace)
            .process_name(common::unique(name))
            .connect_timeout(WAIT)
    };
    // The membership hooks keep this node's view whole from the start.
    let removed: Arc<Log<(String, Instant)>> = Arc::new(Log::new());
    let on_removed = removed.clone();
    let watcher = builder("watcher")
        .on_member_removed(move |_, name| on_removed.push((name.to_string(), Instant::now())))
        .start()
        .expect("the watcher starts");
    // This one only calls: it watches the providers of what it calls.
    let caller = builder("caller").start().expect("the caller starts");
    let processes: Vec<String> = (0..PROCESSES).map(|_| common::unique("swarm")).collect();
    let env = [
        (ENV_NATS, url.as_str()),
        (ENV_NAMESPACE, namespace.as_str()),
    ];
    let mut children: Vec<common::Worker> = processes
        .iter()
        .map(|p| common::spawn_role_child(ENTRY, "swarm", p, &env))
        .collect();
    let all = names_of(&processes, |_| true);
    wait_for_all(&watcher, &all);
    let (leaving, dying) = processes.split_at(PROCESSES - 1);
    for process in leaving {
        caller
            .wait_function_timeout(&leave_callback(process), WAIT)
            .expect("a child is ready");
    }
    let expected = |nodes: &[String]| serving(nodes, &watcher);
    wait_for_providers(
        &caller,
        &expected(&all),
        "the caller never offered every node",
    );
    assert_eq!(providers(&caller), expected(&all));

    // Half of the nodes of two children leave; the third child dies.
    odd_nodes_leave(&caller, leaving);
    let killed_at = Instant::now();
    children[PROCESSES - 1].kill();
    let dead: BTreeSet<String> = names_of(dying, |_| true).into_iter().collect();
    let gone: BTreeSet<String> = names_of(leaving, |i| i % 2 == 1)
        .into_iter()
        .chain(dead.iter().cloned())
        .collect();
    let seen = removed.wait_until(DEATH_BOUND.as_millis() as u64, |heard| {
        gone.iter().all(|n| heard.iter().any(|(h, _)| h == n))
    });
    let heard: BTreeSet<String> = seen.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        heard, gone,
        "the watcher hears of every leave and death, and of no other"
    );
    let last_death = seen
        .iter()
        .filter(|(n, _)| dead.contains(n))
        .map(|(_, at)| *at - killed_at)
        .max()
        .expect("deaths heard");
    eprintln!(
        "{} SIGKILLed nodes all left the watcher's view {last_death:?} after the kill",
        dead.len()
    );
    assert!(last_death < DEATH_BOUND, "{last_death:?}");

    // The caller's own watch hears of the same removals: once it has (bounded), every
    // call reaches a live node, and a broadcast exactly the nodes that stay.
    let staying = names_of(leaving, |i| i % 2 == 0);
    wait_for_providers(
        &caller,
        &expected(&staying),
        "the caller still offers nodes that left",
    );
    knows_only(&caller, &watcher, &staying, &gone);
    drop(children);
}

/// A `Membership` event as a client written from `docs/PROTOCOL.md` reads it.
#[derive(Debug, Deserialize, PartialEq)]
struct Event {
    event: String,
    name: String,
}

/// The part of a `Welcome` this test reads.
#[derive(Debug, Deserialize)]
struct Welcome {
    #[serde(default)]
    views: bool,
}

#[test]
fn a_node_that_asks_for_no_view_is_told_every_change_one_event_a_frame() {
    let cluster = Cluster::start(Transport::Tcp, ENTRY);
    let Address::Tcp { port, .. } = cluster.address else {
        panic!("a TCP controller")
    };
    let mut old = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    old.write_all(&wire::opening(&common::unique("old"), None, &["old_cb"]))
        .expect("write");
    let welcome = read_frame(&mut old);
    assert_eq!(welcome.kind(), Kind::Welcome);
    let welcome: Welcome = wire::decode(&welcome.payload());
    assert!(
        !welcome.views,
        "a node that predates views is not told of them"
    );

    let joining: Vec<Global> = (0..3)
        .map(|_| {
            common::builder_for(&cluster.address)
                .process_name(common::unique("new"))
                .start()
                .expect("a node starts")
        })
        .collect();
    let stopping = joining[0].process_name().to_string();
    joining[0].stop();
    let mut events = Vec::new();
    while !events.contains(&("left".to_string(), stopping.clone())) {
        let frame = read_frame(&mut old);
        assert_eq!(frame.kind(), Kind::Membership);
        // One event, a map: what such a node reads.
        let event: Event = wire::decode(&frame.payload());
        events.push((event.event, event.name));
    }
    let joined: BTreeSet<&str> = events
        .iter()
        .filter(|(event, _)| event == "joined")
        .map(|(_, name)| name.as_str())
        .collect();
    let expected: BTreeSet<&str> = joining.iter().map(|g| g.process_name()).collect();
    assert_eq!(joined, expected);
    let of_stopping: Vec<&str> = events
        .iter()
        .filter(|(_, name)| *name == stopping)
        .map(|(event, _)| event.as_str())
        .collect();
    assert_eq!(of_stopping, ["joined", "leaving", "left"]);
}
