//! PERIOD across a controller restart: a standalone controller killed with SIGKILL and
//! started again on the same socket, nodes in separate processes that keep a copy of
//! the schedule and give it back, tombstones that keep cancelled tasks cancelled.

mod common;
#[path = "common/ticks.rs"]
mod ticks;

use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{StandaloneController, Worker, WAIT};
use daffi::{callback, Address, Global, Period, ScheduledTaskInfo};

const ENTRY: &str = "child_process";

/// The interval of the repeating tasks here.
const PERIOD: Duration = Duration::from_millis(200);

/// How long a test watches for a run that must not come: five periods, in which a task
/// still scheduled would run four times at least.
const QUIET: Duration = Duration::from_millis(1000);

// ---- callbacks served by every node process of this binary ----------------------------

/// Answers once every frame the controller sent this node before the call is handled,
/// and reaches the controller behind every frame this node sent before it.
#[callback]
fn ping() -> bool {
    true
}

fn own_name() -> String {
    std::env::var(common::ENV_NAME).unwrap_or_else(|_| "the test process".into())
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[
        ("controller", common::run_controller_role),
        ("node", node),
        ("scheduler", scheduler),
    ]);
}

/// A node serving the `#[callback]` functions of this file.
fn node() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(own_name())
        .start()
        .expect("node starts");
    g.join().expect("join");
}

/// Makes a schedule on the pinned target, then exits.
fn scheduler() {
    common::schedule_tick_and_stop("orphan", PERIOD);
}

// ---- helpers --------------------------------------------------------------------------

/// A node in the test process that hears each (re)connection to the controller.
struct Caller {
    g: Global,
    connected: mpsc::Receiver<()>,
}

impl Caller {
    fn start(address: &Address) -> Caller {
        let (tx, connected) = mpsc::channel();
        let tx = Mutex::new(tx);
        let g = common::builder_for(address)
            .process_name(common::unique("caller"))
            .on_node_connect(move |_, _| {
                let _ = tx.lock().expect("lock").send(());
            })
            .start()
            .expect("caller connects");
        connected.recv_timeout(WAIT).expect("first connection");
        Caller { g, connected }
    }

    /// Waits until the caller is connected again, and knows `node`.
    fn wait_reconnect(&self, node: &str) {
        self.connected
            .recv_timeout(WAIT)
            .expect("the caller reconnects");
        self.g
            .wait_process_timeout(node, WAIT)
            .expect("the node is back");
    }
}

/// Starts a node process called `name` that serves this binary's callbacks.
fn spawn_node(address: &Address, name: &str) -> Worker {
    common::spawn_child(ENTRY, "node", name, address)
}

/// How many ticks tagged `tag` the node `on` has counted.
fn ticks(g: &Global, on: &str, tag: &str) -> usize {
    g.call("tick_count")
        .args((tag,))
        .on(on)
        .timeout(WAIT)
        .fg()
        .expect("tick_count")
}

/// Waits (up to `within`) until the node `on` counted `n` ticks tagged `tag`; returns
/// its count.
fn ticks_reaching(g: &Global, on: &str, tag: &str, n: usize, within: Duration) -> usize {
    g.call("wait_ticks")
        .args((tag, n, within.as_millis() as u64))
        .on(on)
        .timeout(within + WAIT)
        .fg()
        .expect("wait_ticks")
}

/// Asserts that no more than one run (one already on its way) reaches `on` in
/// [`QUIET`]: the task is not scheduled.
fn assert_no_more_ticks(g: &Global, on: &str, tag: &str) {
    let now = ticks(g, on, tag);
    let later = ticks_reaching(g, on, tag, now + 2, QUIET);
    assert!(
        later <= now + 1,
        "runs went on: {now} ticks, then {later} within {QUIET:?}"
    );
}

/// Calls `ping` on `node`: once it answers, the controller has handled every frame the
/// node sent before (its `Restore` comes before anything else).
fn ping_node(g: &Global, node: &str) {
    g.wait_process_timeout(node, WAIT).expect("node known");
    let pong: bool = g.call("ping").on(node).timeout(WAIT).fg().expect("ping");
    assert!(pong);
}

fn listed(g: &Global, id: u64) -> Option<ScheduledTaskInfo> {
    g.scheduled_tasks()
        .expect("list")
        .into_iter()
        .find(|t| t.id == id)
}

// ---- tests ----------------------------------------------------------------------------

#[test]
fn a_schedule_survives_a_controller_kill_and_its_handle_still_cancels_it() {
    let mut controller = StandaloneController::start(ENTRY);
    let caller = Caller::start(&controller.address);
    let g = &caller.g;
    let worker = common::unique("ticker");
    let _worker = spawn_node(&controller.address, &worker);
    g.wait_process_timeout(&worker, WAIT).expect("worker joins");

    let task = g
        .call("tick")
        .args(("survive",))
        .on(&worker)
        .period(Period::every(PERIOD))
        .expect("schedule");
    assert!((1..1 << 53).contains(&task.id()), "id {}", task.id());
    ticks_reaching(g, &worker, "survive", 2, WAIT);

    controller.kill();
    controller.restart();
    let restarted = Instant::now();
    caller.wait_reconnect(&worker);
    let before = ticks(g, &worker, "survive");
    ticks_reaching(g, &worker, "survive", before + 1, WAIT);
    eprintln!(
        "the first run after the restart came {:?} after it",
        restarted.elapsed()
    );
    let after = ticks_reaching(g, &worker, "survive", before + 3, WAIT);
    assert!(
        after >= before + 3,
        "no runs after the restart: {before} -> {after}"
    );

    let info = listed(g, task.id()).expect("listed under the same id");
    assert_eq!(info.callback, "tick");
    assert_eq!(info.on.as_deref(), Some(worker.as_str()));
    assert_eq!(info.interval, Some(PERIOD));
    assert!(info.created_by.starts_with("caller"));
    let restorer = info.restored_by.expect("restored by a node");
    assert!(
        restorer == worker || restorer == g.process_name(),
        "restored by {restorer}"
    );
    assert_eq!(
        g.scheduled_tasks().expect("list").len(),
        1,
        "one task, however many nodes gave it back"
    );

    task.cancel()
        .expect("the handle made before the restart cancels it");
    assert!(listed(g, task.id()).is_none());
    assert_no_more_ticks(g, &worker, "survive");
}

#[test]
fn a_schedule_whose_creator_exited_is_restored_by_the_nodes_that_knew_it() {
    let mut controller = StandaloneController::start(ENTRY);
    let caller = Caller::start(&controller.address);
    let g = &caller.g;
    let worker = common::unique("ticker");
    let _worker = spawn_node(&controller.address, &worker);
    g.wait_process_timeout(&worker, WAIT).expect("worker joins");
    let creator = common::unique("scheduler");
    let mut scheduler = common::spawn_child_with(
        ENTRY,
        "scheduler",
        &creator,
        &controller.address,
        &[("DAFFI_TEST_TARGET", worker.as_str())],
    );
    scheduler.wait_success();
    let tasks = g.scheduled_tasks().expect("list");
    let [task] = tasks.as_slice() else {
        panic!("one task expected: {tasks:?}")
    };
    ticks_reaching(g, &worker, "orphan", 2, WAIT);

    controller.kill();
    controller.restart();
    caller.wait_reconnect(&worker);
    let before = ticks(g, &worker, "orphan");
    let after = ticks_reaching(g, &worker, "orphan", before + 3, WAIT);
    assert!(
        after >= before + 3,
        "no runs after the restart: {before} -> {after}"
    );
    let info = listed(g, task.id).expect("listed under the same id");
    assert_eq!(info.created_by, creator);
    assert!(info.restored_by.is_some_and(|by| by != creator));

    g.cancel_scheduled_task(task.id).expect("cancel");
    assert_no_more_ticks(g, &worker, "orphan");
}

/// Which node reaches the restarted controller first in
/// [`cancelled_while_a_node_was_away`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum First {
    /// The node that saw the cancel: its tombstone comes first, the stale copy is
    /// refused.
    KnewTheCancel,
    /// The node that missed the cancel: its stale copy runs again until the tombstone
    /// comes, which ends it.
    MissedTheCancel,
}

/// A task cancelled on a controller while the node that runs it was stopped (SIGSTOP),
/// then that controller restarts: the stale copy of the stopped node does not bring the
/// task back for good, whichever node reaches the new controller first.
fn cancelled_while_a_node_was_away(first: First) {
    let tag = format!("{first:?}");
    let mut controller = StandaloneController::start(ENTRY);
    let caller = Caller::start(&controller.address);
    let g = &caller.g;
    // `stale` runs the task and misses the cancel; `knew` sees it.
    let stale = common::unique("stale");
    let knew = common::unique("knew");
    let stale_node = spawn_node(&controller.address, &stale);
    let knew_node = spawn_node(&controller.address, &knew);
    g.wait_process_timeout(&stale, WAIT).expect("stale joins");
    g.wait_process_timeout(&knew, WAIT).expect("knew joins");
    let task = g
        .call("tick")
        .args((tag.as_str(),))
        .on(&stale)
        .period(Period::every(PERIOD))
        .expect("schedule");
    ticks_reaching(g, &stale, &tag, 2, WAIT);

    // A first restart while `stale` is stopped: the others give the task back, and it
    // is cancelled on that controller; `knew` hears of it, `stale` does not.
    common::pause(stale_node.pid().expect("running"));
    controller.kill();
    controller.restart();
    caller.wait_reconnect(&knew);
    assert!(
        listed(g, task.id()).is_some(),
        "given back after the first restart"
    );
    task.cancel().expect("cancel on the second controller");
    ping_node(g, &knew); // `knew` has handled the end before it answers
                         // Only `knew` and `stale` hold anything about the task from now on.
    g.stop();

    match first {
        First::KnewTheCancel => {
            controller.kill();
            controller.restart();
            let probe = fresh_probe(&controller.address);
            ping_node(&probe, &knew); // its restore (the tombstone) came first
            common::resume(stale_node.pid().expect("running"));
            ping_node(&probe, &stale); // its restore came, and was refused
            assert!(
                listed(&probe, task.id()).is_none(),
                "the stale copy came back"
            );
            assert_no_more_ticks(&probe, &stale, &tag);
        }
        First::MissedTheCancel => {
            common::pause(knew_node.pid().expect("running"));
            controller.kill();
            controller.restart();
            common::resume(stale_node.pid().expect("running"));
            let probe = fresh_probe(&controller.address);
            ping_node(&probe, &stale);
            // Nobody told this controller the task ended: the stale copy runs again.
            let info = listed(&probe, task.id()).expect("the stale copy is back, for now");
            assert_eq!(info.restored_by.as_deref(), Some(stale.as_str()));
            let now = ticks(&probe, &stale, &tag);
            ticks_reaching(&probe, &stale, &tag, now + 1, WAIT);
            common::resume(knew_node.pid().expect("running"));
            ping_node(&probe, &knew); // its restore (the tombstone) ended the task
            assert!(
                listed(&probe, task.id()).is_none(),
                "the tombstone did not end it"
            );
            assert_no_more_ticks(&probe, &stale, &tag);
        }
    }
}

/// A node that never knew any controller before this one: it gives nothing back.
fn fresh_probe(address: &Address) -> Global {
    common::builder_for(address)
        .process_name(common::unique("probe"))
        .start()
        .expect("probe connects")
}

#[test]
fn a_cancel_is_not_undone_by_a_node_that_missed_it_when_the_knowing_node_comes_first() {
    cancelled_while_a_node_was_away(First::KnewTheCancel);
}

#[test]
fn a_cancel_is_not_undone_by_a_node_that_missed_it_when_that_node_comes_first() {
    cancelled_while_a_node_was_away(First::MissedTheCancel);
}

#[test]
fn an_at_time_that_passed_while_the_controller_was_down_is_not_run_late() {
    let mut controller = StandaloneController::start(ENTRY);
    let caller = Caller::start(&controller.address);
    let g = &caller.g;
    let worker = common::unique("ticker");
    let _worker = spawn_node(&controller.address, &worker);
    g.wait_process_timeout(&worker, WAIT).expect("worker joins");

    let start = SystemTime::now();
    // The last time leaves the nodes five seconds to rejoin (their backoff is up to
    // 2.5 s between attempts).
    let [first, missed, last] = [300, 600, 6000].map(|ms| start + Duration::from_millis(ms));
    let task = g
        .call("tick")
        .args(("at",))
        .on(&worker)
        .period(Period::at(vec![first, missed, last]))
        .expect("schedule");
    ticks_reaching(g, &worker, "at", 1, WAIT);
    controller.kill();
    // The outage itself: the second time passes while no controller runs.
    let outage = missed.duration_since(SystemTime::now()).unwrap_or_default();
    std::thread::sleep(outage + PERIOD);
    controller.restart();
    caller.wait_reconnect(&worker);
    assert!(
        SystemTime::now() < last,
        "the nodes came back after the last time; the test needs a later one"
    );

    let info = listed(g, task.id()).expect("given back");
    assert_eq!(info.remaining_runs, Some(1), "only the last time is left");
    let off = info
        .next_run
        .duration_since(last)
        .unwrap_or_else(|e| e.duration());
    assert!(
        off < Duration::from_millis(500),
        "next run {off:?} off the last time"
    );
    assert_eq!(ticks(g, &worker, "at"), 1, "the missed time ran late");
    assert_eq!(ticks_reaching(g, &worker, "at", 2, WAIT), 2);
    // The task ended with its last time: no third run, ever.
    assert_eq!(ticks_reaching(g, &worker, "at", 3, QUIET), 2);
}
