//! The NATS backend (`.nats(urls)`), over real nats-server processes: workers are
//! child processes (this binary in a role), the caller is this process.
//!
//! Run with `cargo test -p daffi --features nats --test nats`.

mod common;

use std::collections::HashSet;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::nats::{NatsCluster, NatsServer, ENV_NAMESPACE, ENV_NATS};
use common::{run_role, spawn_role_child, unique, Log, Worker, ENV_NAME, WAIT};
use daffi::{callback, Address, Error, Global, GlobalBuilder};

/// The name of the ignored test that runs the roles below.
const ENTRY: &str = "nats_role";

/// The worker's `Global`, for the callbacks that call back (set once `start` returned;
/// a call may come before).
static WORKER: Log<Global> = Log::new();

// Every node of this binary serves these (`#[callback]` functions are announced with
// the node's first membership entry): the test process's callers too, which shows
// that a node never answers its own calls.

/// The name of the process that runs it.
#[callback]
fn whoami() -> String {
    std::env::var(ENV_NAME).unwrap_or_else(|_| "the test process".into())
}

#[callback]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// The `sleep_ms` calls this process began (their `ms`).
static SLEEPS: Log<u64> = Log::new();

#[callback]
async fn sleep_ms(ms: u64) -> u64 {
    SLEEPS.push(ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

/// Waits (bounded) until this process began `n` calls of `sleep_ms`; how many it began.
#[callback]
fn sleeps_begun(n: usize) -> usize {
    SLEEPS
        .wait_until(WAIT.as_millis() as u64, |s| s.len() >= n)
        .len()
}

#[callback]
fn fail() -> Result<(), String> {
    Err("failed on purpose".into())
}

/// Calls `noted(n)` back on `caller`, to show that a NO_RETURN call ran.
#[callback]
fn note(caller: String, n: i64) -> Result<(), String> {
    let started = WORKER.wait_until(WAIT.as_millis() as u64, |g| !g.is_empty());
    let g = started.first().ok_or("not a worker")?;
    // The caller's `noted` may not have reached this node's view yet.
    g.wait_function_timeout("noted", WAIT)
        .map_err(|e| e.to_string())?;
    g.call("noted")
        .args((n,))
        .on(&caller)
        .no_return()
        .map_err(|e| e.to_string())
}

/// A name with every character a subject token cannot hold.
#[callback(name = "odd.name with space*>")]
fn odd_name() -> String {
    whoami()
}

/// A worker: serves the callbacks above until killed.
fn worker_role() {
    let g = common::nats_child_builder().start().expect("worker starts");
    WORKER.push(g.clone());
    g.join().expect("join");
}

#[test]
#[ignore = "a child role started by the other tests"]
fn nats_role() {
    run_role(&[("worker", worker_role)]);
}

/// A mesh on NATS in one namespace: the caller here, workers in child processes.
struct Mesh {
    urls: String,
    namespace: String,
    workers: Vec<Worker>,
}

impl Mesh {
    fn new(urls: impl Into<String>) -> Mesh {
        Mesh {
            urls: urls.into(),
            namespace: unique("ns").replace('-', "_"),
            workers: Vec::new(),
        }
    }

    fn builder(&self, name: &str) -> GlobalBuilder {
        self.builder_on(&self.urls, name)
    }

    fn builder_on(&self, urls: &str, name: &str) -> GlobalBuilder {
        Global::builder()
            .nats(urls)
            .namespace(&self.namespace)
            .process_name(name)
            .connect_timeout(WAIT)
    }

    /// Starts a worker called `name` on the servers `urls`; returns once `caller` sees it.
    fn spawn_worker_on(&mut self, caller: &Global, urls: &str, name: &str) -> &mut Worker {
        let worker = spawn_role_child(
            ENTRY,
            "worker",
            name,
            &[(ENV_NATS, urls), (ENV_NAMESPACE, &self.namespace)],
        );
        self.workers.push(worker);
        caller
            .wait_process_timeout(name, WAIT)
            .expect("worker joins");
        self.workers.last_mut().expect("just pushed")
    }

    fn spawn_worker(&mut self, caller: &Global, name: &str) -> &mut Worker {
        let urls = self.urls.clone();
        self.spawn_worker_on(caller, &urls, name)
    }
}

/// Registers `noted(n)` on `caller`: the workers call it back; the receiver gets each `n`.
fn serve_noted(caller: &Global) -> mpsc::Receiver<i64> {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    caller
        .register("noted", move |n: i64| {
            let _ = tx.lock().expect("lock").send(n);
        })
        .expect("register");
    rx
}

#[test]
fn fg_bg_and_no_return_calls_with_timeout_and_eta() {
    let server = NatsServer::start();
    let mut mesh = Mesh::new(server.url());
    let caller = mesh
        .builder(&unique("caller"))
        .start()
        .expect("caller starts");
    let noted = serve_noted(&caller);
    mesh.spawn_worker(&caller, "w1");

    // FG, and its named errors.
    let sum: i64 = caller.call("add").args((2, 3)).fg().expect("add");
    assert_eq!(sum, 5);
    assert!(matches!(
        caller.call("fail").fg::<()>(),
        Err(Error::Remote { process, message, .. }) if process == "w1" && message.contains("on purpose")
    ));
    assert!(matches!(
        caller.call("add").args(("two", 3)).fg::<i64>(),
        Err(Error::BadArguments { process, .. }) if process == "w1"
    ));
    assert!(matches!(
        caller.call("nobody_serves_this").fg::<()>(),
        Err(Error::NoProvider { on: None, .. })
    ));
    assert!(matches!(
        caller.call("add").args((1, 1)).on("nobody").fg::<i64>(),
        Err(Error::UnknownProcess { process }) if process == "nobody"
    ));
    let timeout = Duration::from_millis(200);
    let started = Instant::now();
    assert!(matches!(
        caller.call("sleep_ms").args((5_000u64,)).timeout(timeout).fg::<u64>(),
        Err(Error::Timeout { after, .. }) if after == timeout
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout cut the wait"
    );

    // BG with an eta: sent no earlier than the eta.
    let eta = Duration::from_millis(300);
    let started = Instant::now();
    let result = caller
        .call("add")
        .args((20, 22))
        .eta(eta)
        .bg::<i64>()
        .expect("bg");
    assert_eq!(result.get().expect("bg result"), 42);
    assert!(started.elapsed() >= eta, "sent before its eta");

    // NO_RETURN: the worker runs it (and calls back).
    let me = caller.process_name().to_string();
    caller
        .call("note")
        .args((me.clone(), 6i64))
        .fg::<()>()
        .expect("note");
    assert_eq!(noted.recv_timeout(WAIT).expect("note ran"), 6);
    caller
        .call("note")
        .args((me, 7i64))
        .no_return()
        .expect("no_return");
    assert_eq!(noted.recv_timeout(WAIT).expect("note ran"), 7);
    caller.stop();
}

#[test]
fn random_choice_spreads_over_providers_on_pins_and_a_node_never_calls_itself() {
    let server = NatsServer::start();
    let mut mesh = Mesh::new(server.url());
    let caller = mesh
        .builder(&unique("caller"))
        .start()
        .expect("caller starts");
    // The caller serves `whoami` too: its own calls must never come back to it.
    let me = caller.process_name().to_string();
    assert!(
        matches!(
            caller.call("whoami").fg::<String>(),
            Err(Error::NoProvider { on: None, .. })
        ),
        "the only provider is the caller itself"
    );
    mesh.spawn_worker(&caller, "w1");
    mesh.spawn_worker(&caller, "w2");

    let mut chosen = HashSet::new();
    for _ in 0..100 {
        let who: String = caller.call("whoami").fg().expect("whoami");
        assert_ne!(who, me, "a node never answers its own call");
        chosen.insert(who);
    }
    assert_eq!(chosen, HashSet::from(["w1".to_string(), "w2".to_string()]));
    for _ in 0..20 {
        let who: String = caller.call("whoami").on("w2").fg().expect("pinned");
        assert_eq!(who, "w2");
    }
    assert!(matches!(
        caller.call("whoami").on(&me).fg::<String>(),
        Err(Error::Config(_))
    ));
    caller.stop();
}

#[test]
fn a_node_that_starts_sees_every_node_already_there() {
    let server = NatsServer::start();
    let mut mesh = Mesh::new(server.url());
    let first = mesh
        .builder(&unique("first"))
        .start()
        .expect("first starts");
    mesh.spawn_worker(&first, "there1");
    mesh.spawn_worker(&first, "there2");
    // `start` returns with the whole view: no waiting for the others' heartbeats.
    let started = Instant::now();
    let late = mesh.builder(&unique("late")).start().expect("late starts");
    eprintln!(
        "a node joining two others started in {:?}",
        started.elapsed()
    );
    let members: HashSet<String> = late.members().into_iter().map(|m| m.name).collect();
    for name in ["there1", "there2", first.process_name()] {
        assert!(members.contains(name), "{name} missing from {members:?}");
    }
    late.stop();
    first.stop();
}

#[test]
fn broadcast_gives_results_by_node_and_names_the_failing_ones() {
    let server = NatsServer::start();
    let mut mesh = Mesh::new(server.url());
    let caller = mesh
        .builder(&unique("caller"))
        .start()
        .expect("caller starts");
    let rx = serve_noted(&caller);
    mesh.spawn_worker(&caller, "b1");
    mesh.spawn_worker(&caller, "b2");

    let names: std::collections::HashMap<String, String> =
        caller.call("whoami").broadcast().expect("broadcast");
    assert_eq!(names.len(), 2);
    for (node, answer) in &names {
        assert_eq!(node, answer);
    }
    let results = caller
        .call("fail")
        .broadcast_results::<()>()
        .expect("broadcast_results");
    assert_eq!(results.len(), 2);
    for (node, result) in &results {
        assert!(
            matches!(result, Err(Error::Remote { process, .. }) if process == node),
            "{node}: {result:?}"
        );
    }
    match caller.call("fail").broadcast::<()>() {
        Err(Error::Broadcast { failed, .. }) => {
            let failed: HashSet<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(failed, HashSet::from(["b1", "b2"]));
        }
        other => panic!("expected Broadcast, got {other:?}"),
    }
    let me = caller.process_name().to_string();
    caller
        .call("note")
        .args((me, 1i64))
        .broadcast_no_return()
        .expect("broadcast_no_return");
    for _ in 0..2 {
        assert_eq!(rx.recv_timeout(WAIT).expect("each worker ran it"), 1);
    }
    caller.stop();
}

#[test]
fn names_with_dots_spaces_and_wildcards_are_carried_whole() {
    let server = NatsServer::start();
    let mut mesh = Mesh::new(server.url());
    let caller = mesh
        .builder("caller.one two")
        .start()
        .expect("caller starts");
    let odd = "w.1 x*>";
    mesh.spawn_worker(&caller, odd);
    let who: String = caller
        .call("odd.name with space*>")
        .on(odd)
        .fg()
        .expect("odd names");
    assert_eq!(who, odd);
    let members = caller.registered_callbacks();
    assert!(members["odd.name with space*>"].contains(&odd.to_string()));
    caller.stop();
}

#[test]
fn a_process_name_is_unique_across_the_servers_of_a_cluster() {
    let cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let mesh = Mesh::new(urls.join(","));
    let first = mesh
        .builder_on(&urls[0], "dup")
        .start()
        .expect("first starts");
    let second = mesh.builder_on(&urls[1], "dup").start();
    assert!(
        matches!(&second, Err(Error::DuplicateProcessName { process }) if process == "dup"),
        "{second:?}"
    );
    // Once the first says goodbye, the name is free again.
    first.stop();
    first.join().expect("join");
    let again = mesh
        .builder_on(&urls[2], "dup")
        .start()
        .expect("name freed");
    again.stop();
}

#[test]
fn a_killed_worker_leaves_within_the_bound_and_broadcasts_stop_waiting_for_it() {
    let server = NatsServer::start();
    let mut mesh = Mesh::new(server.url());
    let (removed_tx, removed) = mpsc::channel();
    let removed_tx = std::sync::Mutex::new(removed_tx);
    let caller = mesh
        .builder(&unique("caller"))
        .on_member_removed(move |_, name| {
            let _ = removed_tx
                .lock()
                .expect("lock")
                .send((name.to_string(), Instant::now()));
        })
        .start()
        .expect("caller starts");
    mesh.spawn_worker(&caller, "k1");
    mesh.spawn_worker(&caller, "k2");

    // A broadcast with no timeout, in flight on both when k1 dies.
    let broadcaster = caller.clone();
    let broadcast = std::thread::spawn(move || {
        broadcaster
            .call("sleep_ms")
            .args((20_000u64,))
            .broadcast_results::<u64>()
    });
    // k1 is running it once it says so. (A quick call answered first is no sign: the
    // broadcast, in its own thread, may not have sent its request yet, and one sent
    // after the kill finds nobody on k1's subject: `UnknownProcess`.)
    let begun: usize = caller
        .call("sleeps_begun")
        .args((1usize,))
        .on("k1")
        .fg()
        .expect("k1 answers");
    assert_eq!(begun, 1, "k1 runs the broadcast's sleep_ms");
    let killed_at = Instant::now();
    mesh.workers[0].kill();

    let (name, at) = removed.recv_timeout(WAIT).expect("k1 leaves the view");
    assert_eq!(name, "k1");
    let left_after = at - killed_at;
    eprintln!("a SIGKILLed node left the view after {left_after:?}");
    assert!(
        left_after < Duration::from_secs(15),
        "left after {left_after:?}, beyond the stated bound (12 s TTL after its last 1 s heartbeat)"
    );
    let results = broadcast
        .join()
        .expect("broadcast thread")
        .expect("broadcast");
    assert!(
        matches!(&results["k1"], Err(Error::PeerDisconnected { process, .. }) if process == "k1"),
        "{:?}",
        results["k1"]
    );
    assert_eq!(*results["k2"].as_ref().expect("k2 answered"), 20_000);
    assert!(matches!(
        caller.call("whoami").on("k1").fg::<String>(),
        Err(Error::UnknownProcess { .. })
    ));
    caller.stop();
}

/// How long after a server of three is killed calls may fail (with named errors): the
/// client's reconnect to a server it learned. Measured: see the NATS module's docs.
const FAILOVER_BOUND: Duration = Duration::from_secs(3);

#[test]
fn calls_fail_over_when_the_only_server_given_is_killed() {
    common::logs_from_env();
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let mut mesh = Mesh::new(urls[0].clone());
    let caller = mesh
        .builder(&unique("caller"))
        .start()
        .expect("caller starts");
    mesh.spawn_worker(&caller, "f1");
    let call = || {
        caller
            .call("add")
            .args((1, 2))
            .timeout(Duration::from_secs(2))
            .fg::<i64>()
    };
    assert_eq!(call().expect("before"), 3);

    let killed_at = Instant::now();
    cluster.kill(0);
    // Calls for longer than a membership entry lives (so that an entry expired by the
    // bucket's leader election would show), and until 50 in a row succeed: each failure
    // is a named error, none waits past its timeout, and the last one comes within the
    // bound.
    let mut failures = Vec::new();
    let mut last_failure = None;
    let mut in_a_row = 0;
    while in_a_row < 50 || killed_at.elapsed() < Duration::from_secs(15) {
        let attempt = Instant::now();
        match call() {
            Ok(sum) => {
                assert_eq!(sum, 3);
                in_a_row += 1;
            }
            Err(e) => {
                assert!(
                    attempt.elapsed() < Duration::from_secs(3),
                    "a call hung past its timeout: {e}"
                );
                in_a_row = 0;
                last_failure = Some(killed_at.elapsed());
                failures.push(format!("{:?} {e}", killed_at.elapsed()));
                // Calls fail fast while the cluster recovers: pace the retries.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        assert!(
            killed_at.elapsed() < WAIT,
            "no recovery within {WAIT:?}: {failures:?}"
        );
    }
    eprintln!(
        "failover: the last failed call came {last_failure:?} after the server was killed ({} failed calls)",
        failures.len()
    );
    for f in failures.iter().step_by(20) {
        eprintln!("  {f}");
    }
    assert!(
        last_failure.map_or(true, |at| at < FAILOVER_BOUND),
        "calls failed until {last_failure:?} after the kill, beyond {FAILOVER_BOUND:?}: {failures:?}"
    );
    assert!(caller.registered_callbacks()["add"].contains(&"f1".to_string()));
    caller.stop();
}

#[test]
fn nodes_started_at_once_on_a_fresh_cluster_all_join() {
    let cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let mut mesh = Mesh::new(urls.join(","));
    // Six nodes at the same moment, two on each server, while no bucket exists yet:
    // JetStream answers "no responders" until the buckets elect their leaders.
    let names: Vec<String> = (0..6).map(|i| format!("fresh{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let worker = spawn_role_child(
            ENTRY,
            "worker",
            name,
            &[(ENV_NATS, &urls[i % 3]), (ENV_NAMESPACE, &mesh.namespace)],
        );
        mesh.workers.push(worker);
    }
    let caller = mesh
        .builder(&unique("caller"))
        .start()
        .expect("caller starts");
    // What a node on NATS says of its address: the servers it was given.
    assert_eq!(caller.address(), &Address::Nats(urls.join(",")));
    assert_eq!(caller.address().to_string(), urls.join(","));
    assert_eq!(caller.port(), None);
    for name in &names {
        caller
            .wait_process_timeout(name, WAIT)
            .unwrap_or_else(|e| panic!("{name} did not join: {e}"));
        let who: String = caller.call("whoami").on(name).fg().expect("answers");
        assert_eq!(&who, name);
    }
    caller.stop();
}

/// A plain NATS client that listens on every subject (`>`, as `nats sub '>'` does) and
/// never answers; it stops listening when dropped.
struct ListenerEverywhere(std::net::TcpStream);

impl ListenerEverywhere {
    fn connect(url: &str) -> ListenerEverywhere {
        use std::io::{BufRead, BufReader, Write};
        let address = url.trim_start_matches("nats://");
        let mut stream = std::net::TcpStream::connect(address).expect("listener connects");
        stream
            .write_all(b"CONNECT {\"verbose\":false,\"name\":\"listener\"}\r\nSUB > 1\r\nPING\r\n")
            .expect("listener subscribes");
        let mut lines = BufReader::new(stream.try_clone().expect("clone"));
        // Subscribed once the server answers the PING (it reads in order).
        let mut line = String::new();
        while !line.starts_with("PONG") {
            line.clear();
            if lines.read_line(&mut line).expect("server answers") == 0 {
                panic!("the server closed the listener");
            }
        }
        let mut writer = stream.try_clone().expect("clone");
        // Reads what it gets (and answers the server's PINGs) until closed.
        std::thread::spawn(move || {
            let mut line = Vec::new();
            while lines.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                if line.starts_with(b"PING") {
                    let _ = writer.write_all(b"PONG\r\n");
                }
                line.clear();
            }
        });
        ListenerEverywhere(stream)
    }
}

impl Drop for ListenerEverywhere {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

#[test]
fn a_fresh_mesh_creates_its_buckets_while_another_client_listens_everywhere() {
    // The servers tell that a bucket is missing by "no responders" to its writes and
    // reads, which a client listening on every subject (and answering nothing) hides:
    // the first nodes must still create the buckets, join and see each other.
    let server = NatsServer::start();
    let _listener = ListenerEverywhere::connect(&server.url());
    let mut mesh = Mesh::new(server.url());
    let first = mesh
        .builder(&unique("first"))
        .start()
        .expect("the first node starts and creates the buckets");
    mesh.spawn_worker(&first, "beside_listener");
    let who: String = first
        .call("whoami")
        .on("beside_listener")
        .fg()
        .expect("answers");
    assert_eq!(who, "beside_listener");
    first.stop();
}

#[test]
fn a_node_restarted_under_its_name_takes_it_at_once_but_a_live_one_keeps_it() {
    let server = NatsServer::start();
    let mut mesh = Mesh::new(server.url());
    let caller = mesh
        .builder(&unique("caller"))
        .start()
        .expect("caller starts");
    mesh.spawn_worker(&caller, "again");
    // Its owner is alive: the name stays taken.
    let duplicate = mesh.builder("again").start();
    assert!(
        matches!(&duplicate, Err(Error::DuplicateProcessName { process }) if process == "again"),
        "{duplicate:?}"
    );

    mesh.workers[0].kill();
    let killed_at = Instant::now();
    // Restarted at once (here, in this process): it takes the name although the old
    // entry has not expired yet, and the calls to the name reach it.
    let restarted = mesh
        .builder("again")
        .start()
        .expect("restart takes the name");
    let took = killed_at.elapsed();
    eprintln!("a node restarted under its name took it {took:?} after the old run was killed");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}: it waited for the old entry to expire (12 s)"
    );
    let who: String = caller.call("whoami").on("again").fg().expect("answers");
    assert_eq!(who, "the test process", "the new run answers");
    restarted.stop();
    caller.stop();
}
