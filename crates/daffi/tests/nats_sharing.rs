//! The nodes of one process share its NATS connection (`mesh/nats/connection.rs`):
//! nodes started on one tokio runtime with the same settings use one connection, each
//! keeps its own life on it, and a node that is flooded costs only itself. Over a real
//! nats-server; a worker in a child process calls in from its own connection.
//!
//! Run with `cargo test -p daffi --features nats --test nats_sharing`.

mod common;

use std::time::Duration;

use common::nats::{NatsServer, ENV_NAMESPACE, ENV_NATS};
use common::{run_role, spawn_role_child, unique, Worker, WAIT};
use daffi::{callback, Error, Global, GlobalBuilder};

/// The name of the ignored test that runs the roles below.
const ENTRY: &str = "sharing_role";

/// Answers after `ms` milliseconds.
#[callback]
async fn sleep_ms(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// A worker in a child process: serves the callbacks above until killed.
fn worker_role() {
    let g = common::nats_child_builder().start().expect("worker starts");
    answer_whoami(&g);
    g.join().expect("join");
}

#[test]
#[ignore = "a child role started by the other tests"]
fn sharing_role() {
    run_role(&[("worker", worker_role)]);
}

/// A fresh server, a namespace of the test's own, and a runtime for its nodes, as a
/// user's `#[tokio::main]` would have.
struct Setup {
    server: NatsServer,
    url: String,
    namespace: String,
    runtime: tokio::runtime::Runtime,
}

impl Setup {
    fn new() -> Setup {
        let server = NatsServer::start();
        Setup {
            url: server.url(),
            server,
            namespace: unique("ns").replace('-', "_"),
            runtime: tokio::runtime::Runtime::new().expect("runtime"),
        }
    }
}

fn builder(url: &str, namespace: &str, name: &str) -> GlobalBuilder {
    Global::builder()
        .nats(url)
        .namespace(namespace)
        .process_name(name)
        .connect_timeout(WAIT)
}

/// Starts a worker called `name` in a child process (it calls nothing; it answers).
fn spawn_worker(url: &str, namespace: &str, name: &str) -> Worker {
    spawn_role_child(
        ENTRY,
        "worker",
        name,
        &[(ENV_NATS, url), (ENV_NAMESPACE, namespace)],
    )
}

/// Starts the node `name` from sync code, so on a runtime of its own (on a thread of
/// its own: `start` blocks, and must not block the test's runtime).
fn start_sync(url: &str, namespace: &str, name: &str) -> Global {
    let (url, namespace, name) = (url.to_string(), namespace.to_string(), name.to_string());
    std::thread::spawn(move || builder(&url, &namespace, &name).start())
        .join()
        .expect("the thread returns")
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until `events` brought each of `wanted` (in any order), for at most [`WAIT`]
/// each.
async fn all_of(events: &mut tokio::sync::mpsc::UnboundedReceiver<String>, wanted: &[&str]) {
    let mut seen = Vec::new();
    while !wanted.iter().all(|w| seen.iter().any(|s| s == w)) {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap_or_else(|_| panic!("waited for {wanted:?}; seen {seen:?}"))
            .expect("the nodes live");
        seen.push(event);
    }
}

/// Calls `whoami` on `to` from `from`, which must answer with its name (`what` says
/// what the call shows, in the failure).
async fn assert_answers(from: &Global, to: &str, what: &str) {
    let who: String = from
        .call("whoami")
        .on(to)
        .timeout(WAIT)
        .fg_async()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(who, to, "{what}");
}

/// Registers `whoami` on `node`: its own name (the nodes of one process tell
/// themselves apart).
fn answer_whoami(node: &Global) {
    let name = node.process_name().to_string();
    node.register("whoami", move || name.clone())
        .expect("register whoami");
}

/// Whether subscription `subject` is a connection's inbox for its nodes' replies
/// (`<inbox>.<node>.<name>.<call>`).
fn is_reply_inbox(subject: &str) -> bool {
    subject.starts_with("_INBOX.") && subject.ends_with(".*.*.*")
}

/// Starts the nodes `names` at once from async code, as a user's `#[tokio::main]` would.
async fn start_all(url: &str, namespace: &str, names: &[&str]) -> Vec<Global> {
    let starts = names
        .iter()
        .map(|name| builder(url, namespace, name).start_async());
    let nodes = futures_util::future::try_join_all(starts)
        .await
        .expect("the nodes start");
    nodes.iter().for_each(answer_whoami);
    nodes
}

#[test]
fn nodes_on_one_runtime_share_a_connection_and_each_lives_on_its_own() {
    let Setup {
        server,
        url,
        namespace,
        runtime,
    } = Setup::new();
    let mut worker = spawn_worker(&url, &namespace, "w1");
    runtime.block_on(async {
        let nodes = start_all(&url, &namespace, &["s0", "s1", "s2"]).await;
        for node in &nodes {
            node.wait_process_timeout_async("w1", WAIT)
                .await
                .expect("w1 joins");
        }
        // Three nodes, one connection (named after the node that opened it), beside
        // the worker's own.
        let opened_by = server.only_connection_besides(&["w1"]);
        assert!(
            ["s0", "s1", "s2"].contains(&opened_by.as_str()),
            "the shared connection is named after one of its nodes, not {opened_by:?}"
        );
        // The lease's announcements, which every node follows, and the replies to the
        // nodes' calls take one subscription per connection: the worker's and this
        // process's.
        let lease = format!("{namespace}.lease");
        server.wait_subscriptions(&lease, 2, |s| s == lease);
        server.wait_subscriptions("the connections' reply inboxes", 2, is_reply_inbox);

        // Each node answers under its own name, from this process and from the worker's.
        for (i, node) in nodes.iter().enumerate() {
            let other = format!("s{}", (i + 1) % 3);
            assert_answers(node, &other, "a node on the same connection answers").await;
            assert_answers(node, "w1", "the worker answers").await;
        }

        // A node refused on the connection (its name is taken) leaves it to the others.
        match builder(&url, &namespace, "s2").start_async().await {
            Err(Error::DuplicateProcessName { process }) => assert_eq!(process, "s2"),
            other => panic!(
                "a second s2: {:?}",
                other.map(|g| g.process_name().to_string())
            ),
        }
        assert_answers(&nodes[0], "s2", "the first s2 still answers").await;

        // Stopping one node leaves the others (and the connection) as they were.
        let (removed_tx, mut removed) = tokio::sync::mpsc::unbounded_channel();
        let watcher = builder(&url, &namespace, "s3")
            .on_member_removed(move |_, name| {
                let _ = removed_tx.send(name.to_string());
            })
            .start_async()
            .await
            .expect("s3 starts");
        watcher
            .wait_process_timeout_async("s1", WAIT)
            .await
            .expect("s3 sees s1");
        nodes[1].stop();
        let left = tokio::time::timeout(WAIT, removed.recv())
            .await
            .expect("s1's leaving is announced in time");
        assert_eq!(left.as_deref(), Some("s1"));
        assert_answers(&nodes[0], "s2", "s2 still answers").await;
        match watcher
            .call("whoami")
            .on("s1")
            .timeout(WAIT)
            .fg_async::<String>()
            .await
        {
            Err(Error::UnknownProcess { process } | Error::PeerStopped { process, .. }) => {
                assert_eq!(process, "s1")
            }
            other => panic!("a call to the stopped s1: {other:?}"),
        }
        assert_eq!(server.only_connection_besides(&["w1"]), opened_by);

        // A node started from sync code runs its own runtime, so its own connection.
        let own = start_sync(&url, &namespace, "sync");
        server.wait_connection_names(&["w1", &opened_by, "sync"]);
        own.stop();

        // The connection closes with the last node that uses it.
        watcher.stop();
        for node in &nodes {
            node.stop();
        }
        drop((watcher, nodes));
    });
    drop(runtime);
    server.wait_connection_names(&["w1"]);
    worker.kill();
}

#[test]
fn every_node_on_a_shared_connection_comes_back_when_its_server_does() {
    let Setup {
        mut server,
        url,
        namespace,
        runtime,
    } = Setup::new();
    let mut worker = spawn_worker(&url, &namespace, "w1");
    runtime.block_on(async {
        // Each node tells when it loses the server and when it has it again.
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let mut nodes = Vec::new();
        for name in ["r0", "r1"] {
            let (lost, back) = (events_tx.clone(), events_tx.clone());
            let node = builder(&url, &namespace, name)
                .on_node_disconnect(move |_, me| {
                    let _ = lost.send(format!("{me} lost"));
                })
                .on_node_connect(move |_, me| {
                    let _ = back.send(format!("{me} back"));
                })
                .start_async()
                .await
                .expect("starts");
            answer_whoami(&node);
            node.wait_process_timeout_async("w1", WAIT)
                .await
                .expect("w1 joins");
            nodes.push(node);
        }
        server.only_connection_besides(&["w1"]);
        all_of(&mut events, &["r0 back", "r1 back"]).await;

        // The server dies and comes back on the same port and store.
        tokio::task::block_in_place(|| server.restart());
        all_of(&mut events, &["r0 lost", "r1 lost", "r0 back", "r1 back"]).await;
        // The worker reconnects on its own schedule, over its own connection: until it
        // has subscribed again, the server answers "no responders" for it.
        let w1_requests = format!("{namespace}.node.w1.*");
        tokio::task::block_in_place(|| {
            server.wait_subscriptions(&w1_requests, 1, |s| s == w1_requests);
            server.wait_subscriptions("both connections' reply inboxes", 2, is_reply_inbox);
        });
        for (from, to) in [(0, "r1"), (1, "r0"), (0, "w1"), (1, "w1")] {
            assert_answers(
                &nodes[from],
                to,
                "calls work again over the shared connection",
            )
            .await;
        }
        for node in &nodes {
            node.stop();
        }
    });
    worker.kill();
}

#[test]
fn a_flooded_node_costs_only_itself_on_a_shared_connection() {
    let Setup {
        server: _server,
        url,
        namespace,
        runtime,
    } = Setup::new();
    runtime.block_on(async {
        let nodes = start_all(&url, &namespace, &["busy", "calm"]).await;
        // The flooding caller has a connection of its own: it starts from sync code, so
        // on its own runtime (a worker in a child process could not be told what to
        // call).
        let caller = start_sync(&url, &namespace, "flooder");
        caller
            .wait_process_timeout_async("busy", WAIT)
            .await
            .expect("busy joins");
        // 2,000 calls that each hold `busy` for a minute, more than its flow control
        // lets through: the rest wait at the caller, and none of it reaches `calm`.
        let mut flood = Vec::new();
        for _ in 0..2_000 {
            match caller
                .call("sleep_ms")
                .on("busy")
                .args((60_000u64,))
                .bg::<u64>()
            {
                Ok(call) => flood.push(call),
                Err(Error::Overloaded { .. }) => break,
                Err(e) => panic!("a flooding call: {e}"),
            }
        }
        assert!(!flood.is_empty(), "some flooding calls were sent");
        for i in 0..20u64 {
            let slept: u64 = nodes[0]
                .call("sleep_ms")
                .on("calm")
                .args((i,))
                .timeout(WAIT)
                .fg_async()
                .await
                .expect("calm answers while busy is flooded");
            assert_eq!(slept, i);
        }
        caller.stop();
        for node in &nodes {
            node.stop();
        }
    });
}

#[test]
fn nodes_started_against_a_silent_server_give_up_at_their_connect_timeout() {
    // A "server" that never says a word (no INFO): the kernel completes each TCP
    // handshake into the listener's backlog, and nobody accepts or writes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("nats://{}", silent.local_addr().expect("address"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let namespace = unique("ns").replace('-', "_");
    runtime.block_on(async {
        // Three nodes at once: the first tries to connect, the other two wait for it;
        // each gives up at its own connect timeout with a named error.
        let starts = ["q0", "q1", "q2"].map(|name| {
            builder(&url, &namespace, name)
                .connect_timeout(Duration::from_secs(1))
                .start_async()
        });
        let results = tokio::time::timeout(WAIT, futures_util::future::join_all(starts))
            .await
            .expect("every start returns");
        for result in results {
            match result {
                Err(Error::ControllerUnreachable { address, .. }) => {
                    assert!(address.contains(&url), "{address}")
                }
                Err(other) => panic!("a start against a silent server: {other}"),
                Ok(_) => panic!("a node started against a silent server"),
            }
        }
    });
    drop(silent);
}

#[test]
fn garbage_on_the_shared_reply_inbox_is_dropped() {
    let Setup {
        server,
        url,
        namespace,
        runtime,
    } = Setup::new();
    runtime.block_on(async {
        let nodes = start_all(&url, &namespace, &["g0", "g1"]).await;
        server.wait_subscriptions("the reply inbox", 1, is_reply_inbox);
        let connections = server.connections();
        let inbox = common::nats::json_strings(&connections, "subscriptions_list")
            .into_iter()
            .find_map(|s| s.strip_suffix(".*.*.*"))
            .expect("the reply inbox")
            .to_string();
        // Another client writes to the inbox what no node sent: unknown node tokens,
        // a real node's token with made-up calls and streams, and bytes that are no
        // reply at all.
        let mut raw = std::net::TcpStream::connect(url.trim_start_matches("nats://"))
            .expect("a raw client connects");
        raw.set_read_timeout(Some(WAIT)).expect("read timeout");
        let mut junk = b"CONNECT {\"verbose\":false}\r\n".to_vec();
        for subject in [
            format!("{inbox}.x.g0.1"),
            format!("{inbox}.99999.g0.1"),
            format!("{inbox}.0.g0.1"),
            format!("{inbox}.0.g0.s17"),
            format!("{inbox}.0.g0.w3"),
            format!("{inbox}.1.g1.18446744073709551615"),
            format!("{inbox}.1.g1.-1"),
        ] {
            junk.extend_from_slice(format!("PUB {subject} 5\r\n").as_bytes());
            junk.extend_from_slice(b"\xff\x00abc\r\n");
        }
        junk.extend_from_slice(b"PING\r\n");
        std::io::Write::write_all(&mut raw, &junk).expect("junk sent");
        // The server has taken all of it once it answers the PING (it reads in order).
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(raw));
        loop {
            let line = lines.next().expect("the server answers").expect("a line");
            assert!(!line.starts_with("-ERR"), "the server refused: {line}");
            if line.starts_with("PONG") {
                break;
            }
        }
        // Both nodes still call each other.
        for (from, to) in [(0, "g1"), (1, "g0")] {
            assert_answers(&nodes[from], to, "calls still work").await;
        }
        for node in &nodes {
            node.stop();
        }
    });
}
