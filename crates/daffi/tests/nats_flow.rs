//! Flow control over NATS: a caller that sends faster than its callee reads is slowed
//! down (or told `SlowConsumer`), and no NO_RETURN call is lost on the way. The callee
//! is a child process on a user's own single-threaded `#[tokio::main]` runtime whose
//! callback keeps that thread busy, so it reads its requests slowly.
//!
//! Run with `cargo test -p daffi --features nats --test nats_flow`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::nats::{NatsServer, ENV_NAMESPACE, ENV_NATS};
use common::{pause, resume, run_role, spawn_role_child, unique, Worker, ENV_NAME, WAIT};
use daffi::{Error, Global, GlobalBuilder};

/// The name of the ignored test that runs the roles below.
const ENTRY: &str = "nats_flow_role";

/// How long the slow callee's callback keeps its only thread busy, per call.
const BUSY: Duration = Duration::from_micros(50);

/// NO_RETURN calls the slow callee has run.
static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// The slow callee: one runtime thread, which each `sink` call keeps busy for [`BUSY`]
/// (so its requests wait in its subscription); `received(n, ms)` answers once it has
/// run `n` of them, or `ms` passed, with how many it has run.
fn slow_callee_role() {
    #[tokio::main(flavor = "current_thread")]
    async fn main() {
        let (count_tx, count_rx) = tokio::sync::watch::channel(0u64);
        let g = Global::builder()
            .nats(std::env::var(ENV_NATS).expect("servers"))
            .namespace(std::env::var(ENV_NAMESPACE).expect("namespace"))
            .process_name(std::env::var(ENV_NAME).expect("name"))
            .connect_timeout(WAIT)
            .start_async()
            .await
            .expect("callee starts");
        let count_tx = std::sync::Arc::new(count_tx);
        g.register("sink", move || {
            let count_tx = count_tx.clone();
            async move {
                // Busy on the runtime's only thread: the node reads nothing meanwhile.
                let busy_until = Instant::now() + BUSY;
                while Instant::now() < busy_until {
                    std::hint::spin_loop();
                }
                count_tx.send_replace(RECEIVED.fetch_add(1, Ordering::Relaxed) + 1);
            }
        })
        .expect("register sink");
        g.register("received", move |n: u64, ms: u64| {
            let mut count = count_rx.clone();
            async move {
                let wait = count.wait_for(|c| *c >= n);
                let _ = tokio::time::timeout(Duration::from_millis(ms), wait).await;
                let received = *count.borrow();
                received
            }
        })
        .expect("register received");
        g.join_async().await;
    }
    main()
}

#[test]
#[ignore = "a child role started by the other tests"]
fn nats_flow_role() {
    run_role(&[("slow-callee", slow_callee_role)]);
}

/// A namespace of its own on `server`, the slow callee in it, and a caller here.
struct Mesh {
    caller: Global,
    callee: Worker,
}

impl Mesh {
    fn start(server: &NatsServer, caller: impl FnOnce(GlobalBuilder) -> GlobalBuilder) -> Mesh {
        let namespace = unique("flow").replace('-', "_");
        let builder = Global::builder()
            .nats(server.url())
            .namespace(&namespace)
            .process_name(unique("caller"))
            .connect_timeout(WAIT);
        let caller = caller(builder).start().expect("caller starts");
        let callee = spawn_role_child(
            ENTRY,
            "slow-callee",
            "slow",
            &[(ENV_NATS, &server.url()), (ENV_NAMESPACE, &namespace)],
        );
        caller
            .wait_function_timeout("received", WAIT)
            .expect("callee joins");
        Mesh { caller, callee }
    }

    /// How many `sink` calls the callee has run, once it has run `n` (or after `WAIT`).
    fn received(&self, n: u64) -> u64 {
        self.caller
            .call("received")
            .args((n, WAIT.as_millis() as u64))
            .timeout(WAIT + Duration::from_secs(5))
            .fg()
            .expect("received")
    }
}

/// Sends `calls` NO_RETURN calls to `sink` from `tasks` tasks of a user's own runtime;
/// how many were sent, and how many failed with `SlowConsumer` naming the callee (any
/// other error fails the test).
fn flood(caller: &Global, tasks: u64, calls: u64, timeout: Option<Duration>) -> (u64, u64) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let caller = caller.clone();
            senders.spawn(async move {
                let (mut sent, mut slow) = (0, 0);
                for _ in 0..calls / tasks {
                    let mut call = caller.call("sink");
                    if let Some(timeout) = timeout {
                        call = call.timeout(timeout);
                    }
                    match call.no_return_async().await {
                        Ok(()) => sent += 1,
                        Err(Error::SlowConsumer { process, callback })
                            if process == "slow" && callback == "sink" =>
                        {
                            slow += 1
                        }
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
                (sent, slow)
            });
        }
        let (mut sent, mut slow) = (0, 0);
        while let Some(counts) = senders.join_next().await {
            let counts = counts.expect("sender");
            sent += counts.0;
            slow += counts.1;
        }
        (sent, slow)
    })
}

#[test]
fn a_fast_caller_is_slowed_down_and_no_no_return_call_is_lost() {
    let server = NatsServer::start();
    let mesh = Mesh::start(&server, |b| b);

    let calls = 200_000;
    let started = Instant::now();
    let (sent, slow) = flood(&mesh.caller, 4, calls, None);
    let sending = started.elapsed();
    let received = mesh.received(sent);
    eprintln!(
        "{calls} NO_RETURN calls: {sent} sent in {sending:?} ({slow} SlowConsumer), \
         {received} run by the callee after {:?}",
        started.elapsed()
    );
    assert_eq!(sent + slow, calls, "every call is sent or named as failed");
    assert_eq!(received, sent, "every call sent ran: none was lost");
}

#[test]
fn a_paused_callee_makes_calls_fail_with_slow_consumer_not_vanish() {
    let server = NatsServer::start();
    let stall = Duration::from_millis(300);
    let mut mesh = Mesh::start(&server, |b| b.stall_timeout(stall));
    let pid = mesh.callee.pid().expect("callee pid");
    pause(pid);

    // With the callee paused, its window (1,024 calls) fills; the calls after it wait
    // for credit up to their timeout (or `stall_timeout` without one), and fail.
    let window = 1_024;
    let timeout = Duration::from_millis(200);
    let (sent, slow_timed) = flood(&mesh.caller, 1, window + 3, Some(timeout));
    let started = Instant::now();
    let (sent_untimed, slow_untimed) = flood(&mesh.caller, 1, 3, None);
    let waited = started.elapsed();
    resume(pid);
    let received = mesh.received(sent);
    eprintln!(
        "paused callee: {sent} sent, then {slow_timed} + {slow_untimed} SlowConsumer \
         (3 untimed in {waited:?}), {received} run after the resume"
    );
    assert_eq!((sent, slow_timed), (window, 3), "a window's worth went out");
    assert_eq!((sent_untimed, slow_untimed), (0, 3));
    assert!(
        waited >= stall * 3 && waited < stall * 3 + Duration::from_secs(2),
        "a call without a timeout waits `stall_timeout`: {waited:?}"
    );
    assert_eq!(
        received, sent,
        "every call sent ran once the callee resumed"
    );
    mesh.callee.kill();
}
