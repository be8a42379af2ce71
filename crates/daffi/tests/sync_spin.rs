//! A thread blocked in a lone sync call spins for its reply only while that pays
//! (`GlobalBuilder::sync_spin`): it spins through waits that end within the limit,
//! stops once such calls take longer, and sleeps through a callee that is paused. The
//! processor time the calling thread uses, and how often it blocked, say which. Real
//! processes over real sockets.

mod common;

use std::time::Duration;

use common::{Cluster, ThreadUsage, Transport, WAIT};
use daffi::{Error, Global};

const ENTRY: &str = "sync_spin_process";

#[test]
#[ignore = "helper: tests start it as a child process"]
fn sync_spin_process() {
    common::run_role(&[("worker", worker)]);
}

/// Serves `nap(ms)`: a sync callback that sleeps that long and returns it.
fn worker() {
    let g = common::builder_for(&common::address_from_env())
        .process_name(std::env::var(common::ENV_NAME).expect("name"))
        .start()
        .expect("worker starts");
    g.register("nap", |ms: u64| {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    })
    .expect("register nap");
    g.join().expect("join");
}

/// What this thread did for `calls` lone calls of `nap(ms)` on `worker`.
fn usage_for_naps(g: &Global, worker: &str, ms: u64, calls: usize) -> ThreadUsage {
    let before = ThreadUsage::now();
    for _ in 0..calls {
        let slept: u64 = g
            .call("nap")
            .on(worker)
            .args((ms,))
            .timeout(WAIT)
            .fg()
            .expect("nap answers");
        assert_eq!(slept, ms);
    }
    ThreadUsage::since(before)
}

/// A controller, a worker serving `nap` (called `prefix` and a unique part), and a
/// caller known to it that spins for up to `spin`.
fn spinning_caller(prefix: &str, spin: Duration) -> (Cluster, String, Global) {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique(prefix);
    cluster.spawn_worker(&worker);
    let g = common::builder_for(&cluster.address)
        .process_name(common::unique("caller"))
        .sync_spin(spin)
        .start()
        .expect("the caller connects");
    g.wait_process_timeout(&worker, WAIT).expect("worker known");
    (cluster, worker, g)
}

/// Every rule of the policy in one test: at most one thread per two processors of a
/// process spins, and the tests of one binary share the process (the other tests here
/// spin only for moments, well inside this one's margins).
#[test]
fn a_lone_sync_call_spins_only_while_its_waits_end_within_the_limit() {
    if !common::two_processors_or_more() {
        eprintln!("one processor: nothing ever spins here");
        return;
    }
    let spin = Duration::from_millis(40);
    let (cluster, worker, g) = spinning_caller("napper", spin);

    // Naps of 10 ms end within the 40 ms limit: the thread spins through each.
    let naps = 20;
    let spun = usage_for_naps(&g, &worker, 10, naps);
    assert!(
        spun.spun(Duration::from_millis(10) * naps as u32 / 4, naps),
        "{naps} naps of 10 ms within a 40 ms spin: {spun:?} of this thread (no spin)"
    );

    // Naps of 80 ms do not: after a few (each spinning 40 ms at most), it stops.
    usage_for_naps(&g, &worker, 80, 8);
    let slept = usage_for_naps(&g, &worker, 80, 10).cpu;
    assert!(
        slept < spin * 10 / 4,
        "10 naps of 80 ms, past a 40 ms spin, still used {slept:?} of this thread's time"
    );

    // `Duration::ZERO` never spins, however quick the calls.
    let still = common::builder_for(&cluster.address)
        .process_name(common::unique("still"))
        .sync_spin(Duration::ZERO)
        .start()
        .expect("the caller that never spins connects");
    still
        .wait_process_timeout(&worker, WAIT)
        .expect("worker known");
    let parked = usage_for_naps(&still, &worker, 10, naps).cpu;
    assert!(
        parked < Duration::from_millis(10) * naps as u32 / 4,
        "{naps} naps of 10 ms without spinning used {parked:?} of this thread's time"
    );
    g.stop();
    still.stop();
}

/// A callee paused with SIGSTOP mid-call: the caller spins for its limit at most, then
/// sleeps until its timeout; the callee, resumed, answers the next call.
#[test]
fn a_lone_call_to_a_paused_callee_sleeps_until_its_timeout() {
    let (mut cluster, worker, g) = spinning_caller("paused", Duration::from_millis(5));
    let pid = cluster.worker(&worker).pid().expect("worker pid");
    // Quick calls first: the node spins for its lone calls from here on.
    usage_for_naps(&g, &worker, 0, 20);

    common::pause(pid);
    let before = common::thread_cpu();
    let outcome = g
        .call("nap")
        .on(&worker)
        .args((0u64,))
        .timeout(Duration::from_millis(500))
        .fg::<u64>();
    let used = common::thread_cpu() - before;
    common::resume(pid);
    assert!(
        matches!(outcome, Err(Error::Timeout { .. })),
        "a paused callee: {outcome:?}"
    );
    assert!(
        used < Duration::from_millis(100),
        "waiting 500 ms for a paused callee used {used:?} of the caller's thread"
    );
    // The resumed callee answers again (`usage_for_naps` checks each answer).
    usage_for_naps(&g, &worker, 0, 1);
    g.stop();
}

/// A limit too long for the clock to add (`Duration::MAX`: "spin for as long as it
/// takes") is taken as given: the lone call spins until its reply, and neither panics
/// nor fails.
#[test]
fn a_lone_call_with_the_longest_spin_limit_gets_its_reply() {
    let (_cluster, worker, g) = spinning_caller("answering", Duration::MAX);
    let slept: u64 = g
        .call("nap")
        .on(&worker)
        .args((0u64,))
        .timeout(WAIT)
        .fg()
        .expect("nap answers");
    assert_eq!(slept, 0);
    let later = g
        .call("nap")
        .on(&worker)
        .args((0u64,))
        .timeout(WAIT)
        .bg::<u64>()
        .expect("nap sent");
    assert_eq!(later.get().expect("nap answers"), 0);
    g.stop();
}

/// A broadcast with an eta waits that long before anything is sent: a wait that no
/// spin shortens. Its thread sleeps through it (as an `fg` with an eta does) rather than
/// spinning for its limit first.
#[test]
fn a_broadcast_with_an_eta_does_not_spin_through_it() {
    if !common::two_processors_or_more() {
        eprintln!("one processor: nothing ever spins here");
        return;
    }
    let spin = Duration::from_millis(200);
    let (_cluster, worker, g) = spinning_caller("later", spin);
    // Several: another test of this binary may hold the one spinner for a moment.
    let mut used = Vec::new();
    for _ in 0..5 {
        let before = common::thread_cpu();
        let answers = g
            .call("nap")
            .args((0u64,))
            .eta(Duration::from_millis(400))
            .timeout(WAIT)
            .broadcast::<u64>()
            .expect("the broadcast answers");
        used.push(common::thread_cpu() - before);
        assert_eq!(answers.get(&worker), Some(&0), "{answers:?}");
    }
    assert!(
        used.iter().all(|&u| u < spin / 2),
        "broadcasts with an eta of 400 ms used {used:?} of the caller's thread"
    );
    g.stop();
}
