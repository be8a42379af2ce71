//! PERIOD over NATS, with real nats-server and node processes: schedules that outlive
//! the node that made them and the node that fires them (SIGKILL), `scheduled_tasks`,
//! `cancel`, and the counters that are not available.
//!
//! Run with `cargo test -p daffi --features nats --test nats_schedules`.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::nats::{NatsCluster, NatsServer, ENV_NAMESPACE, ENV_NATS};
use common::{run_role, spawn_role_child, unique, Log, Worker, ENV_NAME, WAIT};
use daffi::{callback, Error, Global, GlobalBuilder, Period};

/// The name of the ignored test that runs the roles below.
const ENTRY: &str = "nats_schedules_role";
/// The node a `maker` pins its schedule to.
const ENV_TARGET: &str = "DAFFI_TEST_TARGET";

/// The interval of the repeating tasks here.
const PERIOD: Duration = Duration::from_millis(200);

/// How long a test watches for a run that must not come: five periods.
const QUIET: Duration = Duration::from_millis(1000);

/// When each `tick` arrived in this process, with its tag.
static TICKS: Log<(String, Instant)> = Log::new();

#[callback]
fn tick(tag: String) {
    TICKS.push((tag, Instant::now()));
}

fn ticks_of(tag: &str) -> Vec<Instant> {
    TICKS
        .wait_until(0, |_| true)
        .into_iter()
        .filter(|(t, _)| t == tag)
        .map(|(_, at)| at)
        .collect()
}

/// Waits (up to `WAIT`) for `n` ticks with `tag` in all; their times.
fn wait_ticks(tag: &str, n: usize) -> Vec<Instant> {
    let all = TICKS.wait_until(WAIT.as_millis() as u64, |t| {
        t.iter().filter(|(t, _)| t == tag).count() >= n
    });
    let ticks: Vec<Instant> = all
        .into_iter()
        .filter(|(t, _)| t == tag)
        .map(|(_, at)| at)
        .collect();
    assert!(
        ticks.len() >= n,
        "{} of {n} ticks `{tag}` came",
        ticks.len()
    );
    ticks
}

fn builder(urls: &str, namespace: &str, name: &str) -> GlobalBuilder {
    Global::builder()
        .nats(urls)
        .namespace(namespace)
        .process_name(name)
        .connect_timeout(WAIT)
}

fn child_builder() -> GlobalBuilder {
    let env = |key: &str| std::env::var(key).expect(key);
    builder(&env(ENV_NATS), &env(ENV_NAMESPACE), &env(ENV_NAME))
}

/// A node that only takes part (and may fire the schedules) until killed.
fn node_role() {
    common::logs_from_env();
    child_builder()
        .start()
        .expect("node starts")
        .join()
        .expect("join");
}

/// Schedules `tick("made")` every `PERIOD` on the target, then stays until killed.
fn maker_role() {
    let g = child_builder().start().expect("maker starts");
    let target = std::env::var(ENV_TARGET).expect("target");
    g.wait_process_timeout(&target, WAIT).expect("target known");
    let _task = g
        .call("tick")
        .args(("made",))
        .on(&target)
        .period(Period::every(PERIOD))
        .expect("schedule");
    g.join().expect("join");
}

#[test]
#[ignore = "a child role started by the other tests"]
fn nats_schedules_role() {
    run_role(&[("node", node_role), ("maker", maker_role)]);
}

/// The mesh of one test: its server and namespace.
struct Mesh {
    urls: String,
    namespace: String,
}

impl Mesh {
    fn new(urls: String) -> Mesh {
        Mesh {
            urls,
            namespace: unique("ns").replace('-', "_"),
        }
    }

    fn spawn(&self, role: &str, name: &str, target: &str) -> Worker {
        let env = [
            (ENV_NATS, self.urls.as_str()),
            (ENV_NAMESPACE, self.namespace.as_str()),
            (ENV_TARGET, target),
        ];
        spawn_role_child(ENTRY, role, name, &env)
    }

    /// The node that holds the scheduler lease now (it fires the schedules), read from
    /// the cluster with a plain NATS client.
    fn lease_holder(&self) -> Option<String> {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let client = async_nats::connect(&self.urls).await.ok()?;
            let js = async_nats::jetstream::new(client);
            let lease = js
                .get_key_value(format!("{}-scheduler", self.namespace))
                .await
                .ok()?;
            let holder = lease.get("leader").await.ok()??;
            Some(String::from_utf8_lossy(&holder).into_owned())
        })
    }

    /// Waits (up to `WAIT`) until some node holds the lease; its name.
    fn wait_lease_holder(&self) -> String {
        let give_up = Instant::now() + WAIT;
        loop {
            if let Some(holder) = self.lease_holder() {
                return holder;
            }
            assert!(Instant::now() < give_up, "no node took the scheduler lease");
            std::thread::sleep(Duration::from_millis(50)); // polling the cluster
        }
    }
}

#[test]
fn a_period_survives_its_maker_and_the_node_firing_it_being_killed() {
    let server = NatsServer::start();
    let mesh = Mesh::new(server.url());
    // Two nodes that may fire; the first to start takes the lease, before the
    // observer (this process) joins.
    let mut nodes = [mesh.spawn("node", "n1", ""), mesh.spawn("node", "n2", "")];
    let first_holder = mesh.wait_lease_holder();
    let observer_name = unique("observer");
    let observer = builder(&mesh.urls, &mesh.namespace, &observer_name)
        .start()
        .expect("observer starts");
    let mut maker = mesh.spawn("maker", "maker", &observer_name);
    wait_ticks("made", 3);

    let tasks = observer.scheduled_tasks().expect("scheduled_tasks");
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let task = &tasks[0];
    assert_eq!(
        (
            task.callback.as_str(),
            task.on.as_deref(),
            task.created_by.as_str()
        ),
        ("tick", Some(observer_name.as_str()), "maker")
    );
    assert_eq!((task.interval, task.remaining_runs), (Some(PERIOD), None));
    assert!(task.runs >= 3, "{task:?}");

    // The maker dies: the schedule lives in the cluster.
    maker.kill();
    let before = ticks_of("made").len();
    wait_ticks("made", before + 3);

    // The node firing it dies: another takes the lease and goes on.
    let holder = mesh.lease_holder().expect("a lease holder");
    assert_eq!(
        holder, first_holder,
        "the lease stays while its holder renews it"
    );
    let firing = nodes
        .iter_mut()
        .find(|n| n.name == holder)
        .expect("a node process fires");
    let killed_at = Instant::now();
    firing.kill();
    let before = ticks_of("made").len();
    let after = wait_ticks("made", before + 3);
    let takeover = after[before].saturating_duration_since(killed_at);
    eprintln!("runs resumed {takeover:?} after the firing node was SIGKILLed");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    let runs_after = observer.scheduled_tasks().expect("listed")[0].runs;
    assert!(runs_after > task.runs, "the count goes on across leaders");

    // Cancelled: no more runs (one sent as the cancel landed may still arrive).
    observer.cancel_scheduled_task(task.id).expect("cancel");
    let at_cancel = ticks_of("made").len();
    assert!(observer.scheduled_tasks().expect("listed").is_empty());
    let later = TICKS.wait_until(QUIET.as_millis() as u64, |_| false);
    let late = later.iter().filter(|(t, _)| t == "made").count() - at_cancel;
    assert!(late <= 1, "{late} runs after the cancel");
    assert!(matches!(
        observer.cancel_scheduled_task(task.id),
        Err(Error::TaskNotFound { task_id }) if task_id == task.id
    ));
    observer.stop();
}

#[test]
fn tasks_are_listed_run_at_their_times_and_end_and_counters_are_unavailable() {
    let server = NatsServer::start();
    let mesh = Mesh::new(server.url());
    let name = unique("alone");
    let g = builder(&mesh.urls, &mesh.namespace, &name)
        .start()
        .expect("node starts");
    let now = SystemTime::now();
    let later = g
        .call("tick")
        .args(("later",))
        .period(Period::at(vec![
            now + Duration::from_secs(120),
            now + Duration::from_secs(60),
        ]))
        .expect("schedule later");
    let every = g
        .call("tick")
        .args(("every",))
        .on(&name)
        .period(Period::every(Duration::from_secs(3600)))
        .expect("schedule every");
    // Runs twice on this node (the only provider: the one firing it), then ends.
    let soon = SystemTime::now();
    let _twice = g
        .call("tick")
        .args(("twice",))
        .period(Period::at(vec![
            soon + Duration::from_millis(100),
            soon + Duration::from_millis(300),
        ]))
        .expect("schedule twice");
    wait_ticks("twice", 2);

    let tasks = g.scheduled_tasks().expect("scheduled_tasks");
    let ids: Vec<u64> = tasks.iter().map(|t| t.id).collect();
    assert_eq!(
        ids,
        [later.id(), every.id()],
        "soonest first; the finished one gone"
    );
    let at = &tasks[0];
    assert_eq!(
        (at.remaining_runs, at.interval, at.on.as_deref()),
        (Some(2), None, None)
    );
    let next_in = at.next_run.duration_since(now).expect("in the future");
    assert!(
        next_in.abs_diff(Duration::from_secs(60)) < Duration::from_secs(5),
        "{next_in:?}"
    );
    assert_eq!(tasks[1].interval, Some(Duration::from_secs(3600)));
    assert_eq!(tasks[1].on.as_deref(), Some(name.as_str()));
    assert_eq!(tasks[1].created_by, name);

    later.cancel().expect("cancel");
    let ids: Vec<u64> = g
        .scheduled_tasks()
        .expect("listed")
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, [every.id()]);
    assert!(matches!(later.cancel(), Err(Error::TaskNotFound { .. })));

    assert!(matches!(
        g.controller_stats(),
        Err(Error::Unsupported { .. })
    ));
    every.cancel().expect("cancel");
    g.stop();
}

/// How long the runs of a schedule may pause when a server of three is killed: the
/// schedules bucket's replicas elect a new leader (NATS's election timeout, 4-9 s) when
/// the killed server led it, and when it led the JetStream meta group, JetStream
/// answers "temporarily unavailable" until that group elected one first. Measured
/// 0.2-8.4 s in 15 of 16 runs on a loaded 2-core machine, and 13.1 s once: the
/// holder's watch timed out and JetStream answered "temporarily unavailable" for 12 s,
/// its claims retried meanwhile (see the NATS module's docs).
const PAUSE_BOUND: Duration = Duration::from_secs(15);

#[test]
fn a_period_goes_on_when_a_server_of_three_is_killed() {
    common::logs_from_env();
    let mut cluster = NatsCluster::start(3);
    // Every process is given only the server that is killed: it fails over to the
    // others it learned.
    let mesh = Mesh::new(cluster.urls()[0].clone());
    let _node = mesh.spawn("node", "n1", "");
    mesh.wait_lease_holder();
    let name = unique("observer");
    let observer = builder(&mesh.urls, &mesh.namespace, &name)
        .start()
        .expect("observer starts");
    let task = observer
        .call("tick")
        .args(("cluster",))
        .on(&name)
        .period(Period::every(PERIOD))
        .expect("schedule");
    wait_ticks("cluster", 3);

    let killed_at = Instant::now();
    cluster.kill(0);
    let before = ticks_of("cluster").len();
    let ticks = wait_ticks("cluster", before + 10);
    let longest_gap = ticks[before - 1..]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .expect("ticks");
    eprintln!(
        "a server of three killed: the longest pause between runs was {longest_gap:?}; runs went on {:?} after the kill",
        ticks[before].saturating_duration_since(killed_at)
    );
    assert!(
        longest_gap < PAUSE_BOUND,
        "runs paused {longest_gap:?} when a server was killed, beyond {PAUSE_BOUND:?}"
    );
    // Asking the bucket may fail (a named error) while the cluster settles.
    let give_up = Instant::now() + WAIT;
    let tasks = loop {
        match observer.scheduled_tasks() {
            Ok(tasks) => break tasks,
            Err(e @ Error::ControllerUnreachable { .. }) if Instant::now() < give_up => {
                eprintln!(
                    "listing failed {:?} after the kill: {e}",
                    killed_at.elapsed()
                );
                std::thread::sleep(Duration::from_millis(100)); // pacing the retries
            }
            Err(e) => panic!("listing: {e}"),
        }
    };
    let ids: Vec<u64> = tasks.iter().map(|t| t.id).collect();
    assert_eq!(ids, [task.id()], "the schedule is kept");
    task.cancel().expect("cancel");
    observer.stop();
}
