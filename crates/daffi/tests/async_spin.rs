//! An awaited call spins for its reply as a sync one does, where that holds up nothing:
//! in the future a `block_on` drives (the body of `#[tokio::main]`), never inside a
//! task. Futures awaited beside it (a `join!`) send their calls before it spins. The
//! processor time the awaiting thread uses, and how often it blocked, say whether it
//! spun. Real processes over real sockets; the callers run in the test's own runtime,
//! as a user's program does.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::{Cluster, ThreadUsage, Transport, WAIT};
use daffi::Global;
use tokio::runtime::Runtime;
use tokio::sync::watch;

const ENTRY: &str = "async_spin_process";

#[test]
#[ignore = "helper: tests start it as a child process"]
fn async_spin_process() {
    common::run_role(&[("worker", worker)]);
}

/// Serves `nap(ms)` (sleeps that long, returns it), `stagger(ms)` (the same, twice as
/// long on a worker called `slow...`), and `meet()`: true once two calls of `meet` are
/// in at the same time, false if the other does not come within 2 s.
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
    // Twice as long on a worker whose name says `slow`: a broadcast's replies come
    // one after the other.
    let slow = std::env::var(common::ENV_NAME).is_ok_and(|name| name.contains("slow"));
    g.register("stagger", move |ms: u64| {
        let ms = if slow { 2 * ms } else { ms };
        std::thread::sleep(Duration::from_millis(ms));
        ms
    })
    .expect("register stagger");
    g.register("meet", || async {
        static MET: OnceLock<watch::Sender<usize>> = OnceLock::new();
        let met = MET.get_or_init(|| watch::channel(0).0);
        met.send_modify(|n| *n += 1);
        let mut arrived = met.subscribe();
        let both = async { arrived.wait_for(|n| *n >= 2).await.is_ok() };
        let met = tokio::time::timeout(Duration::from_secs(2), both).await;
        met == Ok(true)
    })
    .expect("register meet");
    g.join().expect("join");
}

/// A runtime as `#[tokio::main]` builds it.
fn users_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A controller and a worker (called `prefix` and a unique part), in processes of their
/// own.
fn cluster_with_worker(prefix: &str) -> (Cluster, String) {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique(prefix);
    cluster.spawn_worker(&worker);
    (cluster, worker)
}

/// A caller started in the current runtime, spinning for up to `spin`, that knows
/// `worker`.
async fn caller(cluster: &Cluster, worker: &str, spin: Duration) -> Global {
    let g = common::builder_for(&cluster.address)
        .process_name(common::unique("caller"))
        .sync_spin(spin)
        .start_async()
        .await
        .expect("the caller connects");
    g.wait_process_timeout_async(worker, WAIT)
        .await
        .expect("worker known");
    // The worker registers its functions after it joins: `meet`, its last, is known
    // once both are (a call sooner may find no provider).
    g.wait_function_timeout_async("meet", WAIT)
        .await
        .expect("meet known");
    g
}

/// What this thread did awaiting `calls` lone calls of `nap(ms)`, half with
/// `fg_async`, half with `bg` and `.await`.
async fn usage_for_naps(g: &Global, worker: &str, ms: u64, calls: usize) -> ThreadUsage {
    let before = ThreadUsage::now();
    for i in 0..calls {
        let call = g.call("nap").on(worker).args((ms,)).timeout(WAIT);
        let slept: u64 = if i % 2 == 0 {
            call.fg_async().await
        } else {
            call.bg().expect("nap sent").await
        }
        .expect("nap answers");
        assert_eq!(slept, ms);
    }
    ThreadUsage::since(before)
}

/// Held by each test that spins: a process spins on one thread per two processors at
/// most, so on two processors a test spinning beside another may find no room and
/// not spin (its assertions that it did would then fail).
fn spinning_alone() -> std::sync::MutexGuard<'static, ()> {
    static SPINNING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SPINNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// For a test that spins: the lock that keeps it alone, a controller and a worker
/// (`cluster_with_worker`); `None` on one processor, where nothing spins.
fn spinning_cluster(prefix: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Cluster, String)> {
    let alone = spinning_alone();
    if !common::two_processors_or_more() {
        eprintln!("one processor: nothing ever spins here");
        return None;
    }
    let (cluster, worker) = cluster_with_worker(prefix);
    Some((alone, cluster, worker))
}

/// The future `block_on` drives spins through lone waits that end within the limit,
/// stops once they take longer, and never spins with a limit of zero; two calls awaited
/// together with `join!` are both sent before either spins. One test: a process spins
/// on one thread per two processors at most (the other tests here never spin).
#[test]
fn a_lone_call_awaited_in_the_main_future_spins_while_that_pays() {
    let Some((_alone, cluster, worker)) = spinning_cluster("napper") else {
        return;
    };
    users_runtime().block_on(async {
        // The callee answers `meet` only once it has both calls, and waits 2 s at most:
        // far less than this caller would spin for the first before it sent the second.
        let g = caller(&cluster, &worker, Duration::from_secs(10)).await;
        let meet = || g.call("meet").on(&worker).timeout(WAIT).fg_async::<bool>();
        let (first, second) = tokio::join!(meet(), meet());
        assert_eq!(
            (first.expect("meet answers"), second.expect("meet answers")),
            (true, true),
            "the second call was sent only after the first one's spin"
        );
        g.stop();

        let spin = Duration::from_millis(40);
        let g = caller(&cluster, &worker, spin).await;
        let naps = 20;
        let spun = usage_for_naps(&g, &worker, 10, naps).await;
        assert!(
            spun.spun(Duration::from_millis(10) * naps as u32 / 4, naps),
            "{naps} awaited naps of 10 ms within a 40 ms spin: {spun:?} of this thread (no spin)"
        );

        // A broadcast's replies are spun for too (here to one worker).
        let before = ThreadUsage::now();
        for _ in 0..naps {
            let answers = g
                .call("nap")
                .args((10u64,))
                .timeout(WAIT)
                .broadcast_async::<u64>()
                .await
                .expect("the broadcast answers");
            assert_eq!(answers.get(&worker), Some(&10), "{answers:?}");
        }
        let spun = ThreadUsage::since(before);
        assert!(
            spun.spun(Duration::from_millis(10) * naps as u32 / 4, naps),
            "{naps} awaited broadcasts of naps of 10 ms: {spun:?} of this thread (no spin)"
        );

        // Naps of 80 ms end past the limit: after a few, the awaits stop spinning.
        usage_for_naps(&g, &worker, 80, 8).await;
        let slept = usage_for_naps(&g, &worker, 80, 10).await.cpu;
        assert!(
            slept < spin * 10 / 4,
            "10 awaited naps of 80 ms, past a 40 ms spin, still used {slept:?} of this thread's time"
        );
        // Quick again: the spinning comes back (lone waits that do not spin are timed).
        usage_for_naps(&g, &worker, 0, 40).await;
        let spun = usage_for_naps(&g, &worker, 10, naps).await;
        assert!(
            spun.spun(Duration::from_millis(10) * naps as u32 / 4, naps),
            "after quick calls, {naps} awaited naps of 10 ms: {spun:?} of this thread (no spin)"
        );
        g.stop();

        let still = caller(&cluster, &worker, Duration::ZERO).await;
        let parked = usage_for_naps(&still, &worker, 10, naps).await.cpu;
        assert!(
            parked < Duration::from_millis(10) * naps as u32 / 4,
            "{naps} awaited naps of 10 ms without spinning used {parked:?} of this thread's time"
        );
        still.stop();
    });
}

/// Inside a task, an await never spins: its worker thread runs other tasks. The task
/// runs on a runtime of one worker, so that its thread's time can be read across awaits.
#[test]
fn a_call_awaited_inside_a_task_never_spins() {
    let (cluster, worker) = cluster_with_worker("tasked");
    let node_runtime = users_runtime();
    let g = node_runtime.block_on(caller(&cluster, &worker, Duration::from_millis(40)));
    let one_worker = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let naps = 20;
    let task = {
        let (g, worker) = (g.clone(), worker.clone());
        one_worker.spawn(async move { usage_for_naps(&g, &worker, 10, naps).await.cpu })
    };
    let used = one_worker.block_on(task).expect("the task ends");
    assert!(
        used < Duration::from_millis(10) * naps as u32 / 4,
        "{naps} naps of 10 ms awaited in a task used {used:?} of its worker's time"
    );
    g.stop();
}

/// On a current-thread runtime the thread that awaits also reads the replies: an await
/// there never spins (the reply could not come in while it did).
#[test]
fn a_call_awaited_on_a_current_thread_runtime_never_spins() {
    let (cluster, worker) = cluster_with_worker("current");
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    current.block_on(async {
        let g = caller(&cluster, &worker, Duration::from_millis(40)).await;
        let naps = 20;
        let used = usage_for_naps(&g, &worker, 10, naps).await.cpu;
        assert!(
            used < Duration::from_millis(10) * naps as u32 / 4,
            "{naps} naps of 10 ms awaited on a current-thread runtime used {used:?} of its thread"
        );
        g.stop();
    });
}

/// Awaits a call to `worker`, paused with SIGSTOP mid-call, from a caller spinning for
/// up to `spin` that spun for its quick calls before: the call's outcome (checked to be
/// its `timeout`), and the processor time the awaiting thread used. The callee,
/// resumed, answers again.
fn await_paused_callee(
    cluster: &mut Cluster,
    worker: &str,
    spin: Duration,
    timeout: Duration,
) -> Duration {
    let pid = cluster.worker(worker).pid().expect("worker pid");
    let cluster = &*cluster;
    users_runtime().block_on(async {
        let g = caller(cluster, worker, spin).await;
        // Quick calls first: the node spins for its lone calls from here on.
        usage_for_naps(&g, worker, 0, 20).await;

        common::pause(pid);
        let before = common::thread_cpu();
        let outcome = g
            .call("nap")
            .on(worker)
            .args((0u64,))
            .timeout(timeout)
            .fg_async::<u64>()
            .await;
        let used = common::thread_cpu() - before;
        common::resume(pid);
        assert!(
            matches!(outcome, Err(daffi::Error::Timeout { .. })),
            "a paused callee: {outcome:?}"
        );
        usage_for_naps(&g, worker, 0, 1).await;
        g.stop();
        used
    })
}

/// A callee paused with SIGSTOP mid-call: the awaiting thread spins for its limit at
/// most, then sleeps until the call's timeout; the callee, resumed, answers again.
#[test]
fn a_call_awaited_from_a_paused_callee_sleeps_until_its_timeout() {
    let _alone = spinning_alone();
    let (mut cluster, worker) = cluster_with_worker("paused");
    let (spin, timeout) = (Duration::from_millis(5), Duration::from_millis(500));
    let used = await_paused_callee(&mut cluster, &worker, spin, timeout);
    assert!(
        used < Duration::from_millis(100),
        "awaiting a paused callee for 500 ms used {used:?} of the caller's thread"
    );
}

/// A call's own timeout ends an awaited spin, as it ends a sync one: with a spin limit
/// far past the timeout, awaiting a paused callee returns `Timeout` without spinning
/// for the whole limit.
#[test]
fn an_awaited_spin_ends_at_the_calls_timeout() {
    let Some((_alone, mut cluster, worker)) = spinning_cluster("deadline") else {
        return;
    };
    let (spin, timeout) = (Duration::from_secs(3), Duration::from_millis(50));
    let used = await_paused_callee(&mut cluster, &worker, spin, timeout);
    assert!(
        used < spin / 3,
        "a call timing out after 50 ms used {used:?} of the caller's thread (spin limit {spin:?})"
    );
}

/// An awaited call dropped unfinished (a `tokio::time::timeout` around it) after it
/// waited past the spin limit counts as a wait past it: a node whose callers keep
/// giving up on slow callees stops spinning, as it does for calls that time out.
#[test]
fn awaits_given_up_past_the_limit_stop_the_spinning() {
    let Some((_alone, cluster, worker)) = spinning_cluster("givenup") else {
        return;
    };
    users_runtime().block_on(async {
        let spin = Duration::from_millis(40);
        let g = caller(&cluster, &worker, spin).await;
        let give_up = || async {
            let call = g.call("nap").on(&worker).args((200u64,)).timeout(WAIT);
            let outcome = tokio::time::timeout(Duration::from_millis(60), call.fg_async::<u64>());
            assert!(outcome.await.is_err(), "a nap of 200 ms within 60 ms");
        };
        for _ in 0..10 {
            give_up().await;
        }
        let before = common::thread_cpu();
        let tries = 10;
        for _ in 0..tries {
            give_up().await;
        }
        let used = common::thread_cpu() - before;
        assert!(
            used < spin * tries / 4,
            "{tries} awaits given up after 60 ms, past a 40 ms spin, still used {used:?}"
        );
        g.stop();
    });
}

/// What holds its thread while an await spins: a `tokio::time::timeout` (or any
/// `select!` branch, `join!` sibling or `LocalSet` task) polled on the same thread
/// waits for the spin. Here a 50 ms timeout around a nap of 500 ms, with a spin limit
/// of 3 s, gets the nap's value instead of `Elapsed`. Known, not fixed: a future cannot
/// see what else its thread polls. Run with `--ignored` to see it.
#[test]
#[ignore = "known: an await's spin holds up what its thread also polls (up to sync_spin)"]
fn a_timeout_around_an_awaited_spin_fires() {
    let Some((_alone, cluster, worker)) = spinning_cluster("wrapped") else {
        return;
    };
    users_runtime().block_on(async {
        let g = caller(&cluster, &worker, Duration::from_secs(3)).await;
        let call = g.call("nap").on(&worker).args((500u64,)).timeout(WAIT);
        let outcome = tokio::time::timeout(Duration::from_millis(50), call.fg_async::<u64>()).await;
        assert!(
            outcome.is_err(),
            "a 50 ms timeout around a nap of 500 ms: {outcome:?}"
        );
        g.stop();
    });
}

/// A bg result polled in the main future (so its wait is timed there) and then
/// collected with the sync `get` counts once into the spin average, not twice: three
/// such waits past the limit leave a node still spinning (it takes six to stop it), so
/// an awaited nap well within the limit after them still spins.
#[test]
fn a_wait_polled_then_collected_with_get_counts_once() {
    let Some((_alone, cluster, worker)) = spinning_cluster("twice") else {
        return;
    };
    users_runtime().block_on(async {
        let spin = Duration::from_millis(40);
        let g = caller(&cluster, &worker, spin).await;
        for _ in 0..3 {
            let call = g.call("nap").on(&worker).args((120u64,)).timeout(WAIT);
            let mut pending = call.bg::<u64>().expect("nap sent");
            // Polled twice here (the second poll spins, then times the wait)...
            for _ in 0..2 {
                tokio::select! {
                    biased;
                    _ = &mut pending => panic!("a nap of 120 ms answered at once"),
                    () = std::future::ready(()) => {}
                }
            }
            // ...then collected from sync code, which times the wait too.
            assert_eq!(pending.get().expect("nap answers"), 120);
        }
        let spun = usage_for_naps(&g, &worker, 20, 1).await;
        assert!(
            spun.spun(Duration::from_millis(5), 1),
            "after three slow waits (six counted?), an awaited nap of 20 ms: {spun:?} (no spin)"
        );
        g.stop();
    });
}

/// An awaited broadcast spins within one limit for all its replies, as a sync one does:
/// replies that come one after the other, each within the limit of the one before, do
/// not each get a spin of their own.
#[test]
fn an_awaited_broadcast_spins_within_one_limit() {
    let Some((_alone, mut cluster, quick)) = spinning_cluster("stagger") else {
        return;
    };
    let slow = common::unique("slow");
    cluster.spawn_worker(&slow);
    users_runtime().block_on(async {
        let spin = Duration::from_millis(40);
        let g = caller(&cluster, &quick, spin).await;
        g.wait_process_timeout_async(&slow, WAIT)
            .await
            .expect("slow worker known");
        // Replies at about 30 and 60 ms: one limit is 40 ms of spinning; a limit per
        // reply would be 30 + 30.
        let broadcasts = 3;
        let before = ThreadUsage::now();
        for _ in 0..broadcasts {
            let answers = g
                .call("stagger")
                .args((30u64,))
                .timeout(WAIT)
                .broadcast_async::<u64>()
                .await
                .expect("the broadcast answers");
            assert_eq!(
                (answers.get(&quick), answers.get(&slow)),
                (Some(&30), Some(&60))
            );
        }
        let used = ThreadUsage::since(before);
        // Without a spin, the thread parks for each of the two replies of each broadcast;
        // spinning for one limit, only for the second.
        assert!(
            used.cpu >= Duration::from_millis(10) * broadcasts
                || used.blocks < 2 * broadcasts as u64,
            "{broadcasts} broadcasts: {used:?} of this thread: no spin"
        );
        let used = used.cpu;
        assert!(
            used < Duration::from_millis(50) * broadcasts,
            "{broadcasts} broadcasts with a 40 ms spin limit used {used:?} of this thread's time"
        );
        g.stop();
    });
}
