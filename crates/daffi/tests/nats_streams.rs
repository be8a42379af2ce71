//! Streams over NATS (`.nats(urls)`), over a real nats-server: the cases of
//! `tests/streams.rs` (shared, `streaming`), and what is NATS's own: a caller that dies
//! mid-stream, arguments in chunks, items too large for one message.
//!
//! Run with `cargo test -p daffi --features nats --test nats_streams`.

#[path = "streaming/arguments.rs"]
mod arguments;
mod common;
mod streaming;
#[path = "streaming/watch.rs"]
mod watch;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::nats::{NatsCluster, NatsServer, ENV_NAMESPACE, ENV_NATS};
use common::{run_role, spawn_role_child, unique, Worker, WAIT};
use daffi::{Blob, Error, Global, Incoming};

/// The name of the ignored test that runs the roles below.
const ENTRY: &str = "nats_streams_role";
/// Environment of a child: the servers, the namespace of its mesh, and (for a reader)
/// the worker it reads from.
const ENV_WORKER: &str = "DAFFI_TEST_WORKER";

/// How soon a stream must end after its callee is killed: NATS tells "no responders"
/// at once, and the caller probes every 250 ms.
const KILL_BOUND: Duration = Duration::from_secs(2);

/// A node serving the shared streaming callbacks, and three of its own: `lengths` (the
/// size of its argument, `n` times), `blobs` (`n` blobs of `size` bytes, each byte 7)
/// and `sizes` (the size of each blob streamed to it, 0 for one whose bytes are not
/// all 7).
fn worker_role() {
    let g = common::nats_child_builder().start().expect("worker starts");
    g.register_stream("lengths", |data: Blob, n: u64| {
        std::iter::repeat(data.len() as u64).take(n as usize)
    })
    .expect("register lengths");
    g.register_stream("blobs", |size: u64, n: u64| {
        (0..n).map(move |_| Blob::from(vec![7u8; size as usize]))
    })
    .expect("register blobs");
    g.register(
        "sizes",
        |blobs: Incoming<Blob>| -> daffi::Result<Vec<u64>> {
            let size = |b: Blob| b.iter().all(|&x| x == 7).then_some(b.len() as u64);
            blobs
                .into_iter()
                .map(|b| Ok(size(b?).unwrap_or(0)))
                .collect()
        },
    )
    .expect("register sizes");
    streaming::serve(&g);
    g.join().expect("join");
}

/// A node that reads one item of the worker's `endless`, tells the test process
/// (`reading`), and then waits to be killed.
fn reader_role() {
    let g = common::nats_child_builder().start().expect("reader starts");
    let worker = std::env::var(ENV_WORKER).expect("worker");
    g.wait_function_timeout(streaming::LAST_REGISTERED, WAIT)
        .expect("the worker's streams are announced");
    let mut items = g
        .call("endless")
        .on(&worker)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    assert_eq!(items.next().expect("an item").expect("item"), 1);
    g.call("reading").no_return().expect("tell the test");
    g.join().expect("join");
}

/// A node that feeds the worker's `watch` (an `Incoming`) and waits to be killed.
fn feeder_role() {
    let g = common::nats_child_builder().start().expect("feeder starts");
    watch::feed_watch_until_killed(&g, &std::env::var(ENV_WORKER).expect("worker"));
}

#[test]
#[ignore = "a child role started by the other tests"]
fn nats_streams_role() {
    run_role(&[
        ("worker", worker_role),
        ("reader", reader_role),
        ("feeder", feeder_role),
    ]);
}

/// A server, a namespace of its own, a caller here and one worker.
struct Mesh {
    server: NatsServer,
    namespace: String,
    caller: Global,
    worker: Worker,
}

impl Mesh {
    fn start() -> Mesh {
        let server = NatsServer::start();
        let namespace = unique("streams").replace('-', "_");
        let caller = Global::builder()
            .nats(server.url())
            .namespace(&namespace)
            .process_name(unique("caller"))
            .connect_timeout(WAIT)
            .start()
            .expect("caller starts");
        let worker = spawn_worker(&server, &namespace);
        caller
            .wait_function_timeout(streaming::LAST_REGISTERED, WAIT)
            .expect("the worker's streams are announced");
        Mesh {
            server,
            namespace,
            caller,
            worker,
        }
    }

    fn spawn(&self, role: &str, name: &str) -> Worker {
        let env = [
            (ENV_NATS, self.server.url()),
            (ENV_NAMESPACE, self.namespace.clone()),
            (ENV_WORKER, self.worker.name.clone()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        spawn_role_child(ENTRY, role, name, &env)
    }
}

fn spawn_worker(server: &NatsServer, namespace: &str) -> Worker {
    spawn_worker_on(&server.url(), namespace)
}

/// A worker given only the server at `url` (its client learns the others).
fn spawn_worker_on(url: &str, namespace: &str) -> Worker {
    let env = [(ENV_NATS, url), (ENV_NAMESPACE, namespace)];
    spawn_role_child(ENTRY, "worker", &unique("streamer"), &env)
}

#[test]
fn ten_thousand_items_of_a_sync_iterator_are_summed_over_nats() {
    let mesh = Mesh::start();
    streaming::sync_iterator_summed(&mesh.caller);
}

#[test]
fn an_async_stream_over_nats_reaches_the_users_own_runtime() {
    let server = NatsServer::start();
    let namespace = unique("streams").replace('-', "_");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let caller = Global::builder()
            .nats(server.url())
            .namespace(&namespace)
            .process_name(unique("async-caller"))
            .connect_timeout(WAIT)
            .start_async()
            .await
            .expect("start_async");
        let _worker = spawn_worker(&server, &namespace);
        caller
            .wait_function_timeout_async(streaming::LAST_REGISTERED, WAIT)
            .await
            .expect("the worker's streams are announced");
        streaming::async_caller_reads_streams(&caller).await;
        caller.stop();
    });
}

#[test]
fn callback_fns_and_methods_stream_over_nats() {
    let mesh = Mesh::start();
    streaming::callback_fns_and_methods(&mesh.caller);
}

#[test]
fn a_dropped_stream_over_nats_stops_its_producer_which_stayed_within_its_credit() {
    let mesh = Mesh::start();
    streaming::dropped_stream_stops_its_producer(&mesh.caller, &mesh.worker.name);
}

#[test]
fn a_killed_callee_ends_the_stream_over_nats_with_peer_disconnected() {
    let mut mesh = Mesh::start();
    let (caller, worker) = (mesh.caller.clone(), mesh.worker.name.clone());
    let after = streaming::killed_callee_ends_the_stream(
        &caller,
        &worker,
        || mesh.worker.kill(),
        KILL_BOUND,
    );
    eprintln!("the stream ended {after:?} after the kill");
}

#[test]
fn a_killed_callee_ends_an_idle_stream_over_nats_too() {
    let mut mesh = Mesh::start();
    let mut idle = mesh
        .caller
        .call("then_nothing")
        .args((2u64,))
        .on(&mesh.worker.name)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    for expected in 1..=2u64 {
        assert_eq!(idle.next().expect("an item").expect("item"), expected);
    }
    // No item or credit moves now: only the caller's probes can tell.
    let killed = Instant::now();
    mesh.worker.kill();
    match idle.next() {
        Some(Err(Error::PeerDisconnected { process, callback })) => {
            assert_eq!(
                (process, callback.as_str()),
                (mesh.worker.name.clone(), "then_nothing")
            );
        }
        other => panic!("expected PeerDisconnected, got {other:?}"),
    }
    let after = killed.elapsed();
    assert!(after < KILL_BOUND, "ended {after:?} after the kill");
    eprintln!("the idle stream ended {after:?} after the kill");
}

#[test]
fn a_killed_caller_stops_the_producer_over_nats() {
    let mesh = Mesh::start();
    let (reading_tx, reading) = mpsc::channel();
    let reading_tx = std::sync::Mutex::new(reading_tx);
    mesh.caller
        .register("reading", move || {
            let _ = reading_tx.lock().expect("lock").send(());
        })
        .expect("register reading");
    let mut reader = mesh.spawn("reader", &unique("reader"));
    reading
        .recv_timeout(WAIT)
        .expect("the reader reads the worker's stream");
    let killed = Instant::now();
    reader.kill();
    let at_drop = streaming::dropped_on(&mesh.caller, &mesh.worker.name);
    let after = killed.elapsed();
    let at_drop = at_drop.expect("the producer was dropped");
    assert!(
        at_drop <= streaming::WINDOW,
        "produced {at_drop} items, beyond its credit"
    );
    assert!(after < KILL_BOUND, "dropped {after:?} after the kill");
    eprintln!("the producer was dropped {after:?} after the kill");
}

#[test]
fn a_stuck_stream_reader_over_nats_does_not_hold_up_other_calls() {
    let mesh = Mesh::start();
    streaming::stuck_reader_beside_other_calls(&mesh.caller, &mesh.worker.name);
}

#[test]
fn a_timeout_bounds_the_wait_for_each_item_over_nats() {
    let mesh = Mesh::start();
    streaming::timeout_bounds_the_wait_for_each_item(&mesh.caller);
}

#[test]
fn large_arguments_go_in_chunks_and_large_items_in_parts() {
    let mesh = Mesh::start();
    let g = &mesh.caller;
    // Three times the server's max_payload (1 MiB): sent in chunks.
    let size = 3 << 20;
    let lengths: Vec<u64> = g
        .call("lengths")
        .args((Blob::from(vec![1u8; size]), 3u64))
        .timeout(WAIT)
        .stream::<u64>()
        .expect("stream")
        .into_iter()
        .map(|item| item.expect("item"))
        .collect();
    assert_eq!(lengths, vec![size as u64; 3]);

    // Items of 512 KiB fit in one message each.
    let blobs: Vec<Blob> = g
        .call("blobs")
        .args((512u64 << 10, 40u64))
        .timeout(WAIT)
        .stream::<Blob>()
        .expect("stream")
        .into_iter()
        .map(|item| item.expect("item"))
        .collect();
    assert_eq!(blobs.len(), 40);
    assert!(blobs.iter().all(|b| b.len() == 512 << 10 && b[0] == 7));

    // Items of twice the server's max_payload go in parts, both ways, beside small
    // ones.
    let size = 2 << 20;
    let blobs: Vec<Blob> = g
        .call("blobs")
        .args((size as u64, 3u64))
        .timeout(WAIT)
        .stream::<Blob>()
        .expect("stream")
        .into_iter()
        .map(|item| item.expect("item"))
        .collect();
    assert_eq!(blobs.len(), 3);
    assert!(blobs
        .iter()
        .all(|b| b.len() == size && b.iter().all(|&x| x == 7)));
    let fed = [size, 1, size, 2].map(|n| Blob::from(vec![7u8; n]));
    let sizes: Vec<u64> = g
        .call("sizes")
        .stream_from(futures_util::stream::iter(fed))
        .timeout(WAIT)
        .fg()
        .expect("sizes");
    assert_eq!(sizes, vec![size as u64, 1, size as u64, 2]);
}

#[test]
fn a_callee_that_loses_its_server_ends_the_stream_with_an_error_never_a_gap() {
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let namespace = unique("streams").replace('-', "_");
    let caller = Global::builder()
        .nats(&urls[0])
        .namespace(&namespace)
        .process_name(unique("caller"))
        .connect_timeout(WAIT)
        .start()
        .expect("caller starts");
    let worker = spawn_worker_on(&urls[1], &namespace);
    caller
        .wait_function_timeout(streaming::LAST_REGISTERED, WAIT)
        .expect("the worker's streams are announced");
    let mut items = caller
        .call("endless")
        .on(&worker.name)
        .timeout(WAIT)
        .stream::<u64>()
        .expect("stream")
        .into_iter();
    for expected in 1..=100u64 {
        assert_eq!(items.next().expect("an item").expect("item"), expected);
    }
    // The worker's server dies; its client moves to another (the caller's stays).
    let killed = Instant::now();
    cluster.kill(1);
    let mut expected = 101;
    let error = loop {
        match items
            .next()
            .expect("the stream ends with an error, not silently")
        {
            Ok(item) => {
                assert_eq!(item, expected, "no item lost unknowingly");
                expected += 1;
            }
            Err(error) => break error,
        }
    };
    let after = killed.elapsed();
    match &error {
        Error::PeerDisconnected { process, .. } => assert_eq!(process, &worker.name),
        // Told by the worker, or noticed by the caller: a message missing.
        Error::Remote { message, .. } => assert!(
            message.contains("lost its NATS connection") || message.contains("lost on the way"),
            "{message}"
        ),
        other => panic!("expected PeerDisconnected or Remote, got {other:?}"),
    }
    assert!(after < WAIT, "ended {after:?} after the kill");
    assert!(items.next().is_none(), "nothing after the error");
    eprintln!(
        "{} more items, then {error} ({after:?} after the kill)",
        expected - 101
    );
}

// ---- arguments streamed to the callee (`Incoming`) ---------------------------------

/// The user's own runtime, as `#[tokio::main]` makes it: 10,000 items streamed to an
/// async callback over NATS and summed there.
#[tokio::main]
async fn users_main(url: String, namespace: String) {
    let caller = Global::builder()
        .nats(url)
        .namespace(namespace)
        .process_name(unique("async-caller"))
        .connect_timeout(WAIT)
        .start_async()
        .await
        .expect("start_async");
    caller
        .wait_function_timeout_async(streaming::LAST_REGISTERED, WAIT)
        .await
        .expect("announced");
    let sum: i64 = caller
        .call("sum_async")
        .args((2,))
        .stream_from(futures_util::stream::iter(1..=10_000i64))
        .timeout(WAIT)
        .fg_async()
        .await
        .expect("sum_async");
    assert_eq!(sum, 2 * 10_000 * 10_001 / 2);
    caller.stop();
}

#[test]
fn ten_thousand_items_are_streamed_in_over_nats_and_summed() {
    let mesh = Mesh::start();
    let expected = 10_000 * 10_001 / 2;
    let by_sync: i64 = mesh
        .caller
        .call("sum_sync")
        .on(&mesh.worker.name)
        .args((3,))
        .stream_from(futures_util::stream::iter(1..=10_000i64))
        .timeout(WAIT)
        .fg()
        .expect("sum_sync");
    assert_eq!(by_sync, 3 * expected);
    users_main(mesh.server.url(), mesh.namespace.clone());
}

#[test]
fn ten_thousand_items_both_ways_at_once_over_nats() {
    let mesh = Mesh::start();
    arguments::both_ways_doubled_in_order(&mesh.caller, &mesh.worker.name, 10_000);
}

#[test]
fn a_callee_that_returns_early_stops_the_feeding_over_nats() {
    let mesh = Mesh::start();
    arguments::returning_early_stops_the_feeding(&mesh.caller, &mesh.worker.name);
}

#[test]
fn a_killed_feeder_ends_the_callees_incoming_over_nats() {
    let mesh = Mesh::start();
    let feeder = unique("feeder");
    let mut feeding = mesh.spawn("feeder", &feeder);
    let after = watch::killed_feeder_ends_the_callees_incoming(
        &mesh.caller,
        &mesh.worker.name,
        &feeder,
        || feeding.kill(),
        KILL_BOUND,
    );
    eprintln!("the callee's Incoming ended {after:?} after the kill");
}

#[test]
fn a_callee_past_its_credit_over_nats_ends_the_stream_with_a_protocol_error() {
    use futures_util::StreamExt;

    let mesh = Mesh::start();
    let worker = &mesh.worker.name;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let node = format!("{}.node.{worker}", mesh.namespace);
    // A plain NATS client beside the worker: it sees the stream's request (so it knows
    // the caller's items subject) and the caller's messages to the worker.
    let (client, mut requests, mut to_worker) = runtime.block_on(async {
        let client = async_nats::connect(mesh.server.url())
            .await
            .expect("connect");
        let requests = client
            .subscribe(format!("{node}.then_nothing"))
            .await
            .expect("subscribe");
        let to_worker = client
            .subscribe(format!("{node}.~streams"))
            .await
            .expect("subscribe");
        // `flush` does not wait for the server: a message of its own, on a subject
        // subscribed last, comes back once it took all three subscriptions.
        let synced = format!("{}.synced.{}", mesh.namespace, unique("flooder"));
        let mut sync = client.subscribe(synced.clone()).await.expect("subscribe");
        client
            .publish(synced, bytes::Bytes::new())
            .await
            .expect("publish");
        tokio::time::timeout(WAIT, sync.next())
            .await
            .expect("the server took the subscriptions")
            .expect("a message");
        (client, requests, to_worker)
    });
    // The worker sends no item of `then_nothing(0)`: all come from the flooder.
    let mut items = mesh
        .caller
        .call("then_nothing")
        .args((0u64,))
        .on(worker)
        .timeout(WAIT)
        .stream::<u64>()
        .expect("stream");
    // (The subscriptions end in the runtime, where they were made.)
    runtime.block_on(async move {
        let request = tokio::time::timeout(WAIT, requests.next())
            .await
            .expect("the stream's request")
            .expect("a message");
        let items_to = request.reply.expect("an items subject");
        // Twice the window, one item (the integer 1) a message, numbered as the
        // protocol asks.
        for seq in 0..2 * streaming::WINDOW {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Daffi-Seq", seq.to_string().as_str());
            client
                .publish_with_headers(
                    items_to.clone(),
                    headers,
                    bytes::Bytes::from_static(&[0x01]),
                )
                .await
                .expect("publish");
        }
        client.flush().await.expect("flush");
        // The caller counts the credit as the items arrive: it tells the callee to stop
        // before its stream is read at all (so no top-up was granted).
        loop {
            let message = tokio::time::timeout(WAIT, to_worker.next())
                .await
                .expect("the caller's cancel")
                .expect("a message");
            let headers = message.headers.as_ref();
            if headers.is_some_and(|h| h.get("Daffi-Cancel").is_some()) {
                break;
            }
        }
        // It kept only the window: then the stream ends with the named error.
        let mut read = 0;
        let error = loop {
            match items.next().await.expect("the stream ends with an error") {
                Ok(_) => read += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(read, streaming::WINDOW, "items kept before the overrun");
        match &error {
            Error::Protocol { peer, message, .. } => {
                assert_eq!(peer, worker);
                assert!(
                    message.contains("more results of `then_nothing`"),
                    "{message}"
                );
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
    });
}
