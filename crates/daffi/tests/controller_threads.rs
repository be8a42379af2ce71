//! The controller serves on threads of its own: a controller inside a node keeps
//! accepting and forwarding for the other nodes while its host's runtime is blocked,
//! and its threads end when it stops.

mod common;

use std::time::Duration;

use common::{Worker, WAIT};
use daffi::{callback, Global};

/// The ignored test that runs child processes (see `common`).
const ENTRY: &str = "child_process";
/// Calls the caller child makes.
const CALLS: i64 = 200;

/// `a + b`.
#[callback]
fn sync_add(a: i64, b: i64) -> i64 {
    a + b
}

/// Runs a child process in the role the test gave it; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn child_process() {
    common::run_role(&[("worker", common::run_worker_role), ("caller", caller)]);
}

/// A node that calls `sync_add` on its target [`CALLS`] times, checks every answer and
/// exits (with a failure status if any call failed).
fn caller() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("caller starts");
    let target = std::env::var(common::ENV_TARGET).expect("target");
    g.wait_process_timeout(&target, WAIT).expect("target joins");
    for i in 0..CALLS {
        let sum: i64 = g
            .call("sync_add")
            .on(&target)
            .args((i, 1))
            .timeout(WAIT)
            .fg()
            .expect("the controller forwards");
        assert_eq!(sum, i + 1);
    }
    g.stop();
}

/// A socket path of its own in the temp directory.
fn socket() -> std::path::PathBuf {
    std::env::temp_dir()
        .join("daffi-tests")
        .join(format!("{}.sock", common::unique("threads")))
}

/// The `/proc/self/task` entries of this process's threads whose name starts with
/// `prefix`.
fn tasks_named(prefix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| Some(task.ok()?.path()))
        .filter(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|name| name.starts_with(prefix))
        })
        .collect()
}

/// The threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    tasks_named(prefix).len()
}

/// Waits (bounded) until no thread of this process is named `prefix`.
fn wait_no_threads(prefix: &str) {
    common::poll::poll_until(
        &format!("no `{prefix}` thread after the stop"),
        || match threads_named(prefix) {
            0 => Ok(()),
            n => Err(format!("{n} still run")),
        },
    );
}

#[test]
fn a_controller_inside_a_node_serves_others_while_its_runtime_is_blocked() {
    // As a user's `#[tokio::main(flavor = "current_thread")]`: one thread runs
    // everything of the host, its node and (before) its controller.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let host = Global::builder()
            .unix_sock_path(socket())
            .process_name(common::unique("host"))
            .init_controller(true)
            .start_async()
            .await
            .expect("the host starts with its controller");
        let address = host.address().clone();
        let callee = common::unique("callee");
        let _worker: Worker = common::spawn_child(ENTRY, "worker", &callee, &address);
        host.wait_process_timeout_async(&callee, WAIT)
            .await
            .expect("the callee joins");

        // The host's only thread now blocks until the caller is done: the caller
        // joins, and its calls reach the callee, through the controller alone.
        let env = [(common::ENV_TARGET, callee.as_str())];
        let mut caller =
            common::spawn_child_with(ENTRY, "caller", &common::unique("caller"), &address, &env);
        caller.wait_success();

        // The host's node, unblocked, still calls through its controller.
        let sum: i64 = host
            .call("sync_add")
            .on(&callee)
            .args((40, 2))
            .timeout(WAIT)
            .fg_async()
            .await
            .expect("the host calls the callee");
        assert_eq!(sum, 42);
        host.stop();
    });
}

#[test]
fn a_stopped_controller_leaves_no_thread_behind() {
    for _ in 0..3 {
        let path = socket();
        let host = Global::builder()
            .unix_sock_path(&path)
            .process_name(common::unique("host"))
            .init_controller(true)
            .start()
            .expect("the host starts with its controller");
        let guest = Global::builder()
            .unix_sock_path(&path)
            .process_name(common::unique("guest"))
            .start()
            .expect("a second node joins");
        let sum: i64 = guest
            .call("sync_add")
            .args((1, 2))
            .timeout(WAIT)
            .fg()
            .expect("the guest calls the host");
        assert_eq!(sum, 3);
        assert!(
            threads_named("daffi-ctl") > 0,
            "the controller has its threads"
        );
        // The controller stops with its host, the guest still connected.
        host.stop();
        wait_no_threads("daffi-ctl");
        guest.stop();
    }
}

/// The processor time, in clock ticks, that the threads of this process named `prefix`
/// have used (`utime` + `stime` of `/proc/self/task/*/stat`).
fn ticks_of_threads(prefix: &str) -> u64 {
    tasks_named(prefix)
        .into_iter()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.join("stat")).ok()?;
            // Fields after the command (which may hold spaces) end with `)`.
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
        })
        .sum()
}

/// A controller thread keeps polling a moment after the last reply of a burst of calls
/// (`ControllerConfig::linger`), and no longer: once the calls stop it sleeps, and an
/// idle mesh costs its controller no processor time.
#[test]
fn an_idle_controller_uses_no_processor_after_a_burst_of_calls() {
    let host = Global::builder()
        .unix_sock_path(socket())
        .process_name(common::unique("host"))
        .init_controller(true)
        .start()
        .expect("the host starts with its controller");
    let address = host.address().clone();
    let callee = common::unique("callee");
    let _worker: Worker = common::spawn_child(ENTRY, "worker", &callee, &address);
    host.wait_process_timeout(&callee, WAIT)
        .expect("the callee joins");
    let env = [(common::ENV_TARGET, callee.as_str())];
    let mut caller =
        common::spawn_child_with(ENTRY, "caller", &common::unique("caller"), &address, &env);
    caller.wait_success();

    // Half a second of an idle mesh: a thread that polled on would use all of it
    // (50 ticks at the usual 100 a second); a sleeping one, next to nothing.
    let before = ticks_of_threads("daffi-ctl-");
    std::thread::sleep(Duration::from_millis(500));
    let used = ticks_of_threads("daffi-ctl-") - before;
    assert!(
        used <= 5,
        "the controller's threads used {used} ticks of 500 ms while the mesh was idle"
    );
    host.stop();
}
