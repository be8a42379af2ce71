//! BROADCAST, PERIOD, callback groups and lifecycle hooks, with a standalone controller,
//! workers and callers in separate processes.

mod common;
#[path = "common/ticks.rs"]
mod ticks;

use std::collections::HashMap;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, SystemTime};

use common::{Cluster, Log, StandaloneController, WAIT};
use daffi::{callback, parse_duration, Error, Global, Period};

const ENTRY: &str = "child_process";

// ---- callbacks served by every process of this binary --------------------------------

fn own_name() -> String {
    std::env::var(common::ENV_NAME).unwrap_or_else(|_| "the test process".into())
}

#[callback]
fn whoami() -> String {
    own_name()
}

#[callback]
fn square(x: i64) -> i64 {
    x * x
}

static HANGING: Log<()> = Log::new();

/// Fails on the node named `fail_on`, hangs on `hang_on`, answers its name elsewhere.
#[callback]
fn probe(fail_on: String, hang_on: String) -> Result<String, String> {
    let me = own_name();
    if me == fail_on {
        return Err("failing on purpose".into());
    }
    if me == hang_on {
        HANGING.push(());
        std::thread::sleep(Duration::from_secs(120));
    }
    Ok(me)
}

#[callback]
fn wait_hanging(timeout_ms: u64) -> usize {
    HANGING.wait_until(timeout_ms, |h| !h.is_empty()).len()
}

/// A callback group: an associated function, instance methods, a private method.
struct Calc {
    k: i64,
}

#[callback]
impl Calc {
    pub fn mul(&self, a: i64) -> i64 {
        a * self.k
    }

    pub async fn add_k(&self, a: i64) -> i64 {
        a + self.k
    }

    pub fn calc_version() -> String {
        "calc-1".into()
    }

    #[allow(dead_code)]
    fn private_helper(&self) -> i64 {
        self.k
    }
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[
        ("controller", common::run_controller_role),
        ("worker", worker),
        ("scheduler", scheduler),
    ]);
}

/// A node serving the `Calc` group.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(own_name())
        .start()
        .expect("worker starts");
    g.register_instance(Calc { k: 3 }).expect("instance");
    g.join().expect("join");
}

/// Makes a schedule on the pinned target, then exits.
fn scheduler() {
    common::schedule_tick_and_stop("outlive", Duration::from_millis(50));
}

// ---- BROADCAST -----------------------------------------------------------------------

/// How many ticks tagged `tag` the node `on` has counted.
fn remote_ticks(g: &Global, tag: &str, on: &str) -> usize {
    g.call("tick_count")
        .args((tag,))
        .on(on)
        .fg()
        .expect("count")
}

fn four_workers(cluster: &mut Cluster) -> Vec<String> {
    let names: Vec<String> = (0..4).map(|i| common::unique(&format!("bw{i}"))).collect();
    for name in &names {
        cluster.spawn_worker(name);
    }
    names
}

#[test]
fn broadcast_returns_every_worker_by_name() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = Cluster::with_standalone(&controller);
    let mut names = four_workers(&mut cluster);
    let g = &cluster.caller;

    let all: HashMap<String, String> = g.call("whoami").broadcast().expect("broadcast");
    let mut keys: Vec<String> = all.keys().cloned().collect();
    keys.sort();
    names.sort();
    assert_eq!(keys, names, "exactly the four workers, never the caller");
    for (node, value) in &all {
        assert_eq!(node, value);
    }

    let squares: HashMap<String, i64> = g
        .call("square")
        .args((7,))
        .timeout(WAIT)
        .eta(Duration::from_millis(50))
        .broadcast()
        .expect("broadcast with timeout and eta");
    assert_eq!(squares.len(), 4);
    assert!(squares.values().all(|v| *v == 49));

    g.call("tick")
        .args(("broadcast",))
        .broadcast_no_return()
        .expect("broadcast without results");
    for name in &names {
        let seen: usize = g
            .call("wait_ticks")
            .args(("broadcast", 1usize, WAIT.as_millis() as u64))
            .on(name)
            .fg()
            .expect("wait_ticks");
        assert_eq!(seen, 1, "{name} got the no-result broadcast once");
    }

    assert!(matches!(
        g.call("nobody_serves_this").broadcast::<i64>(),
        Err(Error::NoProvider { .. })
    ));
}

#[test]
fn broadcast_reports_a_failing_and_a_killed_worker_by_name() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = Cluster::with_standalone(&controller);
    let mut names = four_workers(&mut cluster);
    names.sort();
    let (failing, killed) = (names[0].clone(), names[1].clone());
    let caller = cluster.caller.clone();

    let (fail_on, hang_on) = (failing.clone(), killed.clone());
    let broadcast = std::thread::spawn(move || {
        caller
            .call("probe")
            .args((fail_on, hang_on))
            .timeout(WAIT)
            .broadcast::<String>()
    });
    let hanging: usize = cluster
        .caller
        .call("wait_hanging")
        .args((WAIT.as_millis() as u64,))
        .on(&killed)
        .fg()
        .expect("the victim is inside its callback");
    assert_eq!(hanging, 1);
    cluster.worker(&killed).kill();

    match broadcast.join().expect("thread") {
        Err(Error::Broadcast {
            callback,
            succeeded,
            failed,
        }) => {
            assert_eq!(callback, "probe");
            assert_eq!(succeeded, names[2..].to_vec());
            assert_eq!(failed.len(), 2, "{failed:?}");
            assert_eq!(failed[0].0, failing);
            assert!(
                matches!(&failed[0].1, Error::Remote { message, .. } if message == "failing on purpose"),
                "{:?}",
                failed[0].1
            );
            assert_eq!(failed[1].0, killed);
            assert!(
                matches!(&failed[1].1, Error::PeerDisconnected { .. }),
                "{:?}",
                failed[1].1
            );
        }
        other => panic!("expected Error::Broadcast, got {other:?}"),
    }
}

// ---- PERIOD --------------------------------------------------------------------------

#[test]
fn a_pinned_periodic_task_fires_about_ten_times_a_second_and_stops_on_cancel() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = Cluster::with_standalone(&controller);
    let names = four_workers(&mut cluster);
    let target = &names[2];
    let g = &cluster.caller;

    let task = g
        .call("tick")
        .args(("every",))
        .on(target)
        .period(Period::every(parse_duration("100ms").expect("duration")))
        .expect("schedule");
    let listed = g.scheduled_tasks().expect("list");
    let info = listed.iter().find(|t| t.id == task.id()).expect("listed");
    assert_eq!(info.callback, "tick");
    assert_eq!(info.on.as_deref(), Some(target.as_str()));
    assert_eq!(info.interval, Some(Duration::from_millis(100)));
    assert!(info.next_run > SystemTime::now() - Duration::from_secs(1));

    // A rate is measured over a window of time: one second.
    std::thread::sleep(Duration::from_secs(1));
    task.cancel().expect("cancel");
    let fired = remote_ticks(g, "every", target);
    assert!(
        (6..=14).contains(&fired),
        "fired {fired} times in about a second"
    );
    for other in names.iter().filter(|n| *n != target) {
        let elsewhere = remote_ticks(g, "every", other);
        assert_eq!(elsewhere, 0, "a pinned task ran on {other}");
    }
    assert!(g
        .scheduled_tasks()
        .expect("list")
        .iter()
        .all(|t| t.id != task.id()));
    // No run after the cancel, beyond one that was already on its way.
    std::thread::sleep(Duration::from_millis(400));
    let later = remote_ticks(g, "every", target);
    assert!(
        later <= fired + 1,
        "kept firing after cancel: {fired} -> {later}"
    );
    assert!(matches!(task.cancel(), Err(Error::TaskNotFound { task_id }) if task_id == task.id()));
}

#[test]
fn two_at_times_fire_exactly_twice() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = Cluster::with_standalone(&controller);
    let worker = common::unique("at");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    let now = SystemTime::now();
    // Pinned: unpinned runs may land on any provider, this test process included.
    let task = g
        .call("tick")
        .args(("at",))
        .on(&worker)
        .period(Period::at(vec![
            now + Duration::from_millis(300),
            now + Duration::from_millis(150),
        ]))
        .expect("schedule");
    let seen: usize = g
        .call("wait_ticks")
        .args(("at", 2usize, WAIT.as_millis() as u64))
        .on(&worker)
        .fg()
        .expect("two runs");
    assert_eq!(seen, 2);
    // The task ended with its last time: nothing is left to fire a third run.
    assert!(g
        .scheduled_tasks()
        .expect("list")
        .iter()
        .all(|t| t.id != task.id()));
    assert_eq!(remote_ticks(g, "at", &worker), 2);
}

#[test]
fn a_schedule_outlives_the_node_that_made_it() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = Cluster::with_standalone(&controller);
    let worker = common::unique("target");
    cluster.spawn_worker(&worker);
    let mut scheduler = common::spawn_child_with(
        ENTRY,
        "scheduler",
        &common::unique("scheduler"),
        &cluster.address,
        &[("DAFFI_TEST_TARGET", worker.as_str())],
    );
    scheduler.wait_success();

    let g = &cluster.caller;
    let at_exit = remote_ticks(g, "outlive", &worker);
    let later: usize = g
        .call("wait_ticks")
        .args(("outlive", at_exit + 5, WAIT.as_millis() as u64))
        .on(&worker)
        .fg()
        .expect("more runs");
    assert!(
        later >= at_exit + 5,
        "the schedule stopped with its creator: {at_exit} -> {later}"
    );
    let tasks = g.scheduled_tasks().expect("list");
    let task = tasks
        .iter()
        .find(|t| t.callback == "tick")
        .expect("still scheduled");
    assert!(task.created_by.starts_with("scheduler"));
    g.cancel_scheduled_task(task.id)
        .expect("anyone may cancel it");
}

#[test]
fn schedules_that_cannot_be_kept_fail_at_the_call() {
    let controller = StandaloneController::start(ENTRY);
    let cluster = Cluster::with_standalone(&controller);
    let g = &cluster.caller;
    let past = SystemTime::now() - Duration::from_secs(1);
    for period in [
        Period::at(vec![past]),
        Period::at(Vec::new()),
        Period::every(Duration::ZERO),
    ] {
        match g.call("tick").args(("never",)).period(period.clone()) {
            Err(Error::InvalidPeriod(message)) => assert!(!message.is_empty()),
            other => panic!("{period:?}: expected InvalidPeriod, got {other:?}"),
        }
    }
    assert!(matches!(
        g.cancel_scheduled_task(987_654),
        Err(Error::TaskNotFound { task_id: 987_654 })
    ));
}

// ---- callback groups -----------------------------------------------------------------

#[test]
fn a_callback_group_serves_its_public_methods_once() {
    let controller = StandaloneController::start(ENTRY);
    let mut cluster = Cluster::with_standalone(&controller);
    let worker = common::unique("group");
    cluster.spawn_worker(&worker);
    let g = &cluster.caller;
    g.wait_function_timeout("mul", WAIT)
        .expect("instance methods announced");

    assert_eq!(
        g.call("mul")
            .args((5,))
            .on(&worker)
            .fg::<i64>()
            .expect("mul"),
        15
    );
    assert_eq!(
        g.call("add_k")
            .args((5,))
            .on(&worker)
            .timeout(WAIT)
            .fg::<i64>()
            .expect("async method"),
        8
    );
    assert_eq!(
        g.call("calc_version")
            .on(&worker)
            .fg::<String>()
            .expect("associated fn"),
        "calc-1"
    );
    assert!(matches!(
        g.call("private_helper").on(&worker).fg::<i64>(),
        Err(Error::NoProvider { .. })
    ));

    // The singleton rule, here in the test process.
    g.register_instance(Calc { k: 1 }).expect("first instance");
    match g.register_instance(Calc { k: 2 }) {
        Err(Error::DuplicateInstance { type_name }) => assert!(type_name.ends_with("Calc")),
        other => panic!("expected DuplicateInstance, got {other:?}"),
    }
}

// ---- lifecycle -----------------------------------------------------------------------

#[test]
fn lifecycle_hooks_fire_on_connect_restart_members_and_stop() {
    let mut controller = StandaloneController::start(ENTRY);
    let (tx, rx) = mpsc::channel::<(String, String)>();
    let hook = |kind: &'static str, tx: &mpsc::Sender<(String, String)>| {
        let tx = Mutex::new(tx.clone());
        move |_: &Global, name: &str| {
            let _ = tx
                .lock()
                .expect("lock")
                .send((kind.to_string(), name.to_string()));
        }
    };
    let name = common::unique("hooked");
    let node = common::builder_for(&controller.address)
        .process_name(name.clone())
        .on_init(hook("init", &tx))
        .on_node_connect(hook("connect", &tx))
        .on_node_disconnect(hook("disconnect", &tx))
        .on_member_added(hook("added", &tx))
        .on_member_removed(hook("removed", &tx))
        .start()
        .expect("node starts");
    let next = || rx.recv_timeout(WAIT).expect("a hook fired");
    let own = |kind: &str| (kind.to_string(), name.clone());

    assert_eq!(next(), own("connect"));
    assert_eq!(next(), own("init"));

    let worker = common::unique("member");
    let mut w = common::spawn_child(ENTRY, "worker", &worker, &controller.address);
    assert_eq!(next(), ("added".to_string(), worker.clone()));
    w.kill();
    assert_eq!(next(), ("removed".to_string(), worker.clone()));

    controller.kill();
    assert_eq!(next(), own("disconnect"));
    controller.restart();
    assert_eq!(next(), own("connect"));

    node.stop();
    assert_eq!(next(), own("disconnect"));
}
