use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::*;
use crate::frame::{Header, Kind};
use crate::payload::Payload;
use crate::reader::FrameReader;

/// Default limits, with room for about `n` small frames.
fn frames(n: usize) -> QueueLimits {
    QueueLimits {
        bytes: n * (FRAME_COST + 32),
        ..QueueLimits::default()
    }
}

/// Limits for the tests below: 1,000 bytes, a hard limit of 2,000.
fn small(stall_timeout: Duration) -> QueueLimits {
    QueueLimits {
        bytes: 1000,
        hard_bytes: 2000,
        stall_timeout,
    }
}

fn raw(len: usize) -> Outgoing {
    Outgoing::raw(Bytes::from(vec![0u8; len]))
}

fn goodbye() -> Outgoing {
    Outgoing::new(&Header::control(Kind::Goodbye), Payload::default())
}

#[tokio::test]
async fn one_frame_of_any_size_passes_when_nothing_is_held() {
    // The peer reads nothing: the socket takes 64 bytes, the rest stays held.
    let (a, _peer) = tokio::io::duplex(64);
    let (tx, writer) = frame_channel(a, small(Duration::from_secs(60)));
    let _writer = tokio::spawn(writer);
    assert!(
        matches!(tx.push(raw(5000)), Push::Sent),
        "5x the byte limit"
    );
    assert!(
        matches!(tx.push(raw(1)), Push::Full(_)),
        "then nothing more"
    );
    assert!(matches!(tx.push_unrefused(raw(1)), Push::Full(_)));
}

#[tokio::test]
async fn the_byte_limit_refuses_requests_and_the_hard_limit_closes() {
    let (a, _peer) = tokio::io::duplex(64);
    let (tx, writer) = frame_channel(a, small(Duration::from_secs(60)));
    let writer = tokio::spawn(writer);
    // 64 bytes go to the socket at once; the rest is held, with the frame's cost.
    let mut held = 600 - 64 + FRAME_COST;
    assert!(matches!(tx.push(raw(600)), Push::Sent));
    held += 200 + FRAME_COST;
    assert!(held <= 1000);
    assert!(matches!(tx.push(raw(200)), Push::Sent));
    assert!(held + 100 + FRAME_COST > 1000);
    assert!(matches!(tx.push(raw(100)), Push::Full(_)));
    assert_eq!(tx.try_send(raw(100)), Err(Closed), "full, not sent");
    assert!(!tx.is_closed(), "a full queue is not a closed one");
    // A frame that cannot be refused passes the byte limit, up to the hard limit.
    assert!(matches!(tx.push_unrefused(raw(100)), Push::Sent));
    held += 100 + FRAME_COST;
    assert!(held + 700 + FRAME_COST > 2000);
    assert!(matches!(tx.push_unrefused(raw(700)), Push::Full(_)));
    assert_eq!(tx.close_as_slow_consumer().bytes, held);
    assert!(tx.is_closed());
    tokio::time::timeout(Duration::from_secs(10), tx.closed())
        .await
        .expect("closed() resolves once closed");
    assert!(matches!(
        tx.close_reason(),
        Some(CloseReason::Overflowed { bytes, .. }) if bytes == held
    ));
    assert_eq!(tx.send(raw(1)).await, Err(Closed));
    // The writer, stuck in a write to a peer that reads nothing, ends at once.
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer ends when the connection is closed")
        .expect("join")
        .expect("not a write failure");
}

#[tokio::test]
async fn bytes_count_until_the_socket_takes_them() {
    let (a, mut peer) = tokio::io::duplex(64);
    let (tx, writer) = frame_channel(a, small(Duration::from_secs(60)));
    let _writer = tokio::spawn(writer);
    assert!(matches!(tx.push(raw(1000)), Push::Sent));
    assert!(matches!(tx.push(raw(100)), Push::Full(_)));
    // The writer task took the rest of the frame from the queue: it is still held
    // until the peer has read it. Once it has, there is room again.
    let mut got = vec![0u8; 1000];
    peer.read_exact(&mut got).await.expect("read");
    tokio::time::timeout(Duration::from_secs(10), tx.send(raw(900)))
        .await
        .expect("room once the peer read")
        .expect("open");
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_reads_nothing_is_closed_after_the_stall_timeout() {
    let (a, _peer) = tokio::io::duplex(64);
    let stall = Duration::from_secs(10);
    let (tx, writer) = frame_channel(a, small(stall));
    let writer = tokio::spawn(writer);
    let started = tokio::time::Instant::now();
    assert!(matches!(tx.push(raw(1000)), Push::Sent));
    tx.closed().await;
    assert!(started.elapsed() >= stall, "{:?}", started.elapsed());
    assert_eq!(tx.close_reason(), Some(CloseReason::Stalled(stall)));
    assert!(tx
        .close_reason()
        .is_some_and(|r| r.to_string().contains("slow consumer")));
    let failed = writer.await.expect("join").expect_err("the writer failed");
    assert_eq!(failed.kind(), std::io::ErrorKind::TimedOut);
    assert_eq!(tx.try_send(raw(1)), Err(Closed));
}

#[tokio::test(start_paused = true)]
async fn a_slow_peer_that_keeps_reading_is_never_cut() {
    // 64 bytes every 6 s: the frame takes minutes, but no wait reaches 10 s.
    let (a, mut peer) = tokio::io::duplex(64);
    let stall = Duration::from_secs(10);
    let (tx, writer) = frame_channel(a, small(stall));
    let writer = tokio::spawn(writer);
    let started = tokio::time::Instant::now();
    assert!(matches!(tx.push(raw(2000)), Push::Sent));
    let mut got = 0;
    let mut chunk = [0u8; 64];
    while got < 2000 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        got += peer.read(&mut chunk).await.expect("read");
    }
    assert!(started.elapsed() > 5 * stall, "{:?}", started.elapsed());
    assert!(!tx.is_closed(), "{:?}", tx.close_reason());
    drop(tx);
    writer.await.expect("join").expect("written in full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_left_to_the_writer_on_an_idle_connection_still_go_out() {
    // A corked sender never writes itself: the writer task must be woken for its
    // frames, even when nothing else is sent afterwards, and with the cork still held.
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (tx, writer) = frame_channel(a, frames(8));
    let writer = tokio::spawn(writer);
    let _cork = tx.cork();
    for id in 1..=3u64 {
        let mut h = Header::control(Kind::Request);
        h.call_id = id;
        assert!(matches!(
            tx.push(Outgoing::new(&h, Bytes::from_static(b"x"))),
            Push::Sent
        ));
    }
    let mut reader = FrameReader::new(b, 1 << 20);
    for id in 1..=3u64 {
        let f = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .expect("the frame within 10 s")
            .expect("read")
            .expect("a frame");
        assert_eq!(f.call_id(), id);
    }
    drop(tx);
    writer.await.expect("join").expect("io");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sender_keeps_order_through_direct_and_queued_writes() {
    // A pipe smaller than one frame: direct writes stop part-way and the writer task
    // finishes them, while other tasks keep sending.
    let (a, b) = tokio::io::duplex(512);
    let (tx, writer) = frame_channel(a, frames(8));
    let writer = tokio::spawn(writer);
    let reading = tokio::spawn(async move {
        let mut reader = FrameReader::new(b, 1 << 20);
        let mut ids = Vec::new();
        while let Some(f) = reader.next().await.expect("read") {
            assert_eq!(f.payload().len(), (f.call_id() % 7) as usize * 300);
            ids.push(f.call_id());
        }
        ids
    });
    let mut tasks = Vec::new();
    for sender in 0..4u64 {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                let id = sender * 1000 + i;
                let mut h = Header::control(Kind::Request);
                h.call_id = id;
                let body = Bytes::from(vec![1u8; (id % 7) as usize * 300]);
                tx.send(Outgoing::new(&h, body))
                    .await
                    .expect("connection open");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    drop(tx);
    writer.await.expect("join").expect("io");
    let ids = reading.await.expect("reader");
    assert_eq!(ids.len(), 800);
    for sender in 0..4u64 {
        let mine: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| id / 1000 == sender)
            .collect();
        let sorted: Vec<u64> = (0..200).map(|i| sender * 1000 + i).collect();
        assert_eq!(mine, sorted, "frames of one sender arrive in order");
    }
}

#[tokio::test]
async fn a_frame_sender_from_a_blocking_thread_and_after_the_peer_left() {
    let (a, b) = tokio::io::duplex(64);
    let (tx, writer) = frame_channel(a, frames(2));
    let writer = tokio::spawn(writer);
    let blocking = tx.clone();
    let runtime = tokio::runtime::Handle::current();
    let sent = tokio::task::spawn_blocking(move || {
        (0..50u64)
            .map(|i| {
                let mut h = Header::control(Kind::Reply);
                h.call_id = i;
                runtime.block_on(blocking.send(Outgoing::new(&h, Payload::default())))
            })
            .filter(Result::is_ok)
            .count()
    });
    let mut reader = FrameReader::new(b, 1 << 20);
    for i in 0..50u64 {
        let f = reader.next().await.expect("read").expect("frame");
        assert_eq!(f.call_id(), i);
    }
    assert_eq!(sent.await.expect("join"), 50);
    drop(reader);
    // The peer is gone: a frame sent now is written at once or queued; either way the
    // write fails, the writer ends, and every later frame fails by name.
    let _ = tx.send(goodbye()).await;
    let _ = writer.await.expect("join");
    assert!(tx.is_closed());
    assert_eq!(tx.send(goodbye()).await, Err(Closed));
    assert_eq!(tx.try_send(goodbye()), Err(Closed));
}

#[tokio::test]
async fn joined_frames_arrive_as_separate_frames_in_order() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (tx, writer) = frame_channel(a, frames(8));
    let writer = tokio::spawn(writer);
    let frames = (0..5u64)
        .map(|i| {
            let mut h = Header::control(Kind::Request);
            h.call_id = i;
            let body = Payload::from_parts([
                Bytes::from(vec![i as u8; 10]),
                Bytes::from(vec![i as u8; 20_000]),
            ]);
            Outgoing::new(&h, body)
        })
        .collect();
    tx.send(Outgoing::joined(frames)).await.expect("sent");
    drop(tx);
    let mut reader = FrameReader::new(b, 1 << 20);
    for i in 0..5u64 {
        let f = reader.next().await.expect("read").expect("frame");
        assert_eq!(f.call_id(), i);
        assert_eq!(f.payload().len(), 20_010);
        assert!(f.payload().iter().all(|&b| b == i as u8));
    }
    assert!(reader.next().await.expect("clean end").is_none());
    writer.await.expect("join").expect("io");
}

/// What the peer can read at once, without waiting; `None` if nothing.
fn readable_now(peer: &mut tokio::io::DuplexStream) -> Option<usize> {
    use tokio::io::AsyncRead;
    let mut space = [0u8; 1024];
    let mut buf = tokio::io::ReadBuf::new(&mut space);
    let mut cx = std::task::Context::from_waker(sender::noop_waker());
    match std::pin::Pin::new(peer).poll_read(&mut cx, &mut buf) {
        std::task::Poll::Ready(read) => read.map(|()| buf.filled().len()).ok(),
        std::task::Poll::Pending => None,
    }
}

#[tokio::test]
async fn a_sender_writes_itself_on_an_idle_connection_unless_corked() {
    // Writer tasks that are not running: only a sender writing itself reaches the peer.
    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, _writer) = frame_channel(a, frames(8));
    assert!(matches!(tx.push(raw(20)), Push::Sent));
    assert_eq!(readable_now(&mut peer), Some(20));

    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, writer) = frame_channel(a, frames(8));
    let cork = tx.cork();
    assert!(matches!(tx.push(raw(10)), Push::Sent));
    assert_eq!(
        readable_now(&mut peer),
        None,
        "a corked sender wrote itself"
    );
    drop(cork);
    tokio::spawn(writer);
    let mut frame = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut frame))
        .await
        .expect("the writer task sends it within 10 s")
        .expect("read");
}

#[tokio::test]
async fn a_batch_leaves_in_one_write_by_whoever_drops_it() {
    // A writer task that is not running: only the batch's own write reaches the peer.
    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, _writer) = frame_channel(a, frames(64));
    let batch = tx.batch();
    let second = tx.batch();
    for len in [10, 20, 30] {
        assert!(matches!(tx.push(raw(len)), Push::Sent));
    }
    assert_eq!(readable_now(&mut peer), None, "a frame left during a batch");
    drop(second);
    assert_eq!(
        readable_now(&mut peer),
        None,
        "a batch still open, yet frames left"
    );
    drop(batch);
    assert_eq!(
        readable_now(&mut peer),
        Some(60),
        "the last batch dropped wrote them"
    );
    assert_eq!(
        tx.shared.lock().unwritten,
        0,
        "nothing is held once written"
    );
    // Nothing open: an idle connection is written at once again.
    std::thread::sleep(QUIET);
    assert!(matches!(tx.push(raw(5)), Push::Sent));
    assert_eq!(readable_now(&mut peer), Some(5));
}

/// Longer than a connection must be quiet before a sender writes itself.
const QUIET: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_socket_cannot_take_is_finished_by_the_writer_in_order() {
    // A pipe smaller than the batch: the dropper writes what fits, the writer task the
    // rest, and frames queued after the batch follow it.
    let (a, b) = tokio::io::duplex(256);
    let (tx, writer) = frame_channel(a, frames(64));
    let writer = tokio::spawn(writer);
    let frame = |id: u64| {
        let mut h = Header::control(Kind::Request);
        h.call_id = id;
        Outgoing::new(&h, Bytes::from(vec![id as u8; 100]))
    };
    let batch = tx.batch();
    for id in 0..10 {
        assert!(matches!(tx.push(frame(id)), Push::Sent));
    }
    drop(batch);
    for id in 10..20 {
        tx.send(frame(id)).await.expect("connection open");
    }
    let mut reader = FrameReader::new(b, 1 << 20);
    for id in 0..20u64 {
        let f = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .expect("the frame within 10 s")
            .expect("read")
            .expect("a frame");
        assert_eq!(f.call_id(), id);
        assert!(f.payload().iter().all(|&b| b == id as u8));
    }
    drop(tx);
    writer.await.expect("join").expect("io");
}

#[tokio::test]
async fn a_batch_too_large_to_copy_goes_to_the_writer_task() {
    let (a, mut peer) = tokio::io::duplex(1 << 20);
    let (tx, writer) = frame_channel(a, QueueLimits::default());
    let batch = tx.batch();
    assert!(matches!(tx.push(raw(DIRECT_BATCH / 2 + 1)), Push::Sent));
    assert!(matches!(tx.push(raw(DIRECT_BATCH / 2 + 1)), Push::Sent));
    drop(batch);
    assert_eq!(
        readable_now(&mut peer),
        None,
        "copied and written by the dropper"
    );
    tokio::spawn(writer);
    let mut both = vec![0u8; DIRECT_BATCH + 2];
    tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut both))
        .await
        .expect("the writer task sends them within 10 s")
        .expect("read");
}

#[tokio::test]
async fn only_a_whole_frame_still_queued_is_joined() {
    // The peer reads nothing yet: the socket takes 64 bytes of the first frame.
    let (a, peer) = tokio::io::duplex(64);
    let (tx, writer) = frame_channel(a, frames(100));
    let _writer = tokio::spawn(writer);
    assert!(!tx.join_last(3, |_| panic!("nothing is queued")));
    let long = Payload::from(Bytes::from(vec![7u8; 200]));
    assert!(matches!(
        tx.push(Outgoing::new(&Header::control(Kind::Goodbye), long)),
        Push::Sent
    ));
    assert!(
        !tx.join_last(3, |_| panic!("the rest of a frame partly written")),
        "a frame partly written is never joined"
    );
    assert!(matches!(tx.push(goodbye()), Push::Sent));
    let joined = tx.join_last(3, |last| {
        assert!(last.is_one_frame());
        *last.head_mut() = Header::control(Kind::Goodbye).encode(3);
        last.body_mut().push(Bytes::from_static(b"abc"));
        true
    });
    assert!(joined, "a whole frame still queued is joined");
    assert!(
        !tx.join_last(3, |_| false),
        "one that says no is left as it was"
    );
    assert!(
        !Outgoing::joined(vec![goodbye(), goodbye()]).is_one_frame(),
        "frames joined into one Outgoing are not one frame"
    );

    let mut reader = FrameReader::new(peer, 1 << 20);
    let first = reader.next().await.expect("read").expect("a frame");
    assert_eq!(first.payload().len(), 200);
    let second = reader.next().await.expect("read").expect("a frame");
    assert_eq!(&second.payload()[..], b"abc");
}

#[tokio::test]
async fn what_joins_a_queued_frame_counts_against_the_byte_limit() {
    // The peer reads nothing: 64 bytes go to the socket, the rest is held.
    let (a, _peer) = tokio::io::duplex(64);
    let (tx, writer) = frame_channel(a, small(Duration::from_secs(60)));
    let _writer = tokio::spawn(writer);
    assert!(matches!(tx.push(raw(300)), Push::Sent));
    assert!(matches!(tx.push(goodbye()), Push::Sent));
    // Joins of 100 bytes each to the goodbye still queued, until the limit says no.
    let mut joins = 0;
    while tx.join_last(100, |last| {
        let body = last.body().len() + 100;
        *last.head_mut() = Header::control(Kind::Goodbye).encode(body);
        last.body_mut().push(Bytes::from(vec![1u8; 100]));
        true
    }) {
        joins += 1;
        assert!(joins < 100, "joins never stop");
    }
    let held = tx.shared.lock().unwritten;
    assert!(joins > 0, "there was room for some");
    assert!(
        held <= 1000,
        "the joins took the queue past its limit: {held}"
    );
    assert!(held + 100 > 1000, "a join refused with room left: {held}");
    assert!(
        matches!(tx.push(raw(200)), Push::Full(_)),
        "a request that does not fit what the joins left is refused"
    );
}

#[tokio::test]
async fn pieces_pushed_together_go_all_or_none_and_in_order() {
    // The peer reads nothing at first: 64 bytes go to the socket, the rest is held.
    let (a, mut peer) = tokio::io::duplex(64);
    let (tx, writer) = frame_channel(a, small(Duration::from_secs(60)));
    let _writer = tokio::spawn(writer);
    assert!(matches!(tx.push(raw(300)), Push::Sent));
    // Three pieces that together pass the limit: none is queued.
    let held = tx.shared.lock().unwritten;
    let pieces = vec![raw(200), raw(200), raw(200)];
    assert!(matches!(tx.push_all(pieces), Push::Full(_)));
    assert_eq!(tx.shared.lock().unwritten, held, "nothing was counted");
    // Three goodbyes that fit: all are queued, and arrive after the first frame, in
    // order.
    assert!(matches!(
        tx.push_all(vec![goodbye(), goodbye(), goodbye()]),
        Push::Sent
    ));
    let mut first = vec![0u8; 300];
    peer.read_exact(&mut first).await.expect("the first frame");
    let mut reader = FrameReader::new(peer, 1 << 20);
    for _ in 0..3 {
        let frame = reader.next().await.expect("read").expect("a frame");
        assert_eq!(frame.kind(), Kind::Goodbye);
    }
    // Once the connection is closed, nothing is queued.
    tx.close_as_slow_consumer();
    assert!(matches!(tx.push_all(vec![goodbye()]), Push::Closed));
}

#[tokio::test]
async fn held_frames_wait_for_their_flush_and_leave_in_one_write() {
    // A writer task that is not running: only the flush's own write reaches the peer.
    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, _writer) = frame_channel(a, frames(64));
    let held = tx.held_frames();
    assert!(held.are_for(&tx) && !held.are_for(&frame_channel(tokio::io::sink(), frames(1)).0));
    for len in [10, 20, 30] {
        assert!(matches!(tx.push_held(raw(len)), Push::Sent));
    }
    assert_eq!(
        readable_now(&mut peer),
        None,
        "a held frame left before its flush"
    );
    held.flush();
    assert_eq!(
        readable_now(&mut peer),
        Some(60),
        "the flush wrote them together"
    );
    assert_eq!(
        tx.shared.lock().unwritten,
        0,
        "nothing is held once written"
    );
    // A flush with nothing held writes nothing.
    tx.held_frames().flush();
    assert_eq!(readable_now(&mut peer), None);
}

#[tokio::test]
async fn held_frames_leave_without_their_flush_within_the_bound() {
    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, writer) = frame_channel(a, frames(64));
    tokio::spawn(writer);
    // Held, and never flushed: the thread that held them went off to other work.
    let _held = tx.held_frames();
    assert!(matches!(tx.push_held(raw(10)), Push::Sent));
    assert!(matches!(tx.push_held(raw(20)), Push::Sent));
    let mut frames = [0u8; 30];
    tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut frames))
        .await
        .expect("the writer task sends held frames after HOLD_AT_MOST")
        .expect("read");
    assert!(tx.shared.lock().held_since.is_none());
}

#[tokio::test]
async fn a_frame_that_may_not_wait_ends_the_hold() {
    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, writer) = frame_channel(a, frames(64));
    assert!(matches!(tx.push_held(raw(10)), Push::Sent));
    assert!(matches!(tx.push(raw(20)), Push::Sent));
    assert!(
        tx.shared.lock().held_since.is_none(),
        "the frame that may not wait left the first one held"
    );
    tokio::spawn(writer);
    let mut frames = [0u8; 30];
    tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut frames))
        .await
        .expect("both go out")
        .expect("read");
}

#[tokio::test]
async fn held_frames_do_not_keep_the_connection_open() {
    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, writer) = frame_channel(a, frames(64));
    let writer = tokio::spawn(writer);
    assert!(matches!(tx.push_held(raw(10)), Push::Sent));
    let held = tx.held_frames();
    drop(tx);
    // The last sender is gone: the writer sends what is held and ends, with the
    // thread's handle still alive.
    tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer ends without its senders")
        .expect("join")
        .expect("io");
    let mut frame = Vec::new();
    peer.read_to_end(&mut frame).await.expect("read");
    assert_eq!(frame.len(), 10);
    held.flush();
}

#[tokio::test]
async fn what_joins_a_held_frame_ends_the_hold_unless_it_is_held_too() {
    let (a, _peer) = tokio::io::duplex(64 * 1024);
    let (tx, _writer) = frame_channel(a, frames(64));
    let grow = |last: &mut Outgoing| {
        last.copy_to(&mut Vec::new());
        true
    };
    // A whole frame: only such a frame is joined.
    assert!(matches!(tx.push_held(goodbye()), Push::Sent));
    assert!(tx.join_last_held(8, grow));
    assert!(
        tx.shared.lock().held_since.is_some(),
        "a held join ended the hold"
    );
    assert!(tx.join_last(8, grow));
    assert!(
        tx.shared.lock().held_since.is_none(),
        "a join that may not wait left the frame held"
    );
}

#[tokio::test]
async fn held_frames_do_not_keep_an_aborted_connection_s_socket() {
    // The writer task aborted (its future dropped) and every sender gone, as when a
    // link fails: the thread's handle must not keep the socket open for the peer.
    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, writer) = frame_channel(a, frames(64));
    let held = tx.held_frames();
    drop(writer);
    drop(tx);
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut rest))
        .await
        .expect("the peer sees the connection end")
        .expect("read");
    held.flush();
}

#[tokio::test]
async fn a_frame_held_behind_frames_waiting_for_the_writer_goes_with_them() {
    let (a, _peer) = tokio::io::duplex(64 * 1024);
    let (tx, _writer) = frame_channel(a, frames(64));
    let _cork = tx.cork();
    assert!(matches!(tx.push(raw(10)), Push::Sent));
    assert!(matches!(tx.push_held(raw(10)), Push::Sent));
    assert!(
        tx.shared.lock().held_since.is_none(),
        "a hold began over frames the writer task was woken for"
    );
}

/// A socket whose writes take twice `QUIET_BEFORE_DIRECT_WRITE`: as a write does
/// whose sender lost its processor in it to the peer it woke.
struct PreemptedWrites(tokio::io::DuplexStream);

impl tokio::io::AsyncWrite for PreemptedWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::thread::sleep(sender::QUIET_BEFORE_DIRECT_WRITE * 2);
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_write_counts_from_when_it_began_not_when_its_sender_got_back() {
    // A writer task that is not running: only a sender writing itself reaches the peer.
    // The first write lasts longer than the quiet time, so the second frame, pushed at
    // once after it (a lone caller's next request), finds the connection quiet since
    // the first write began: it is written at once, not left to the writer task.
    let (a, mut peer) = tokio::io::duplex(64 * 1024);
    let (tx, _writer) = frame_channel(PreemptedWrites(a), frames(8));
    assert!(matches!(tx.push(raw(20)), Push::Sent));
    assert_eq!(readable_now(&mut peer), Some(20));
    assert!(matches!(tx.push(raw(30)), Push::Sent));
    assert_eq!(
        readable_now(&mut peer),
        Some(30),
        "the second frame was left to the writer task"
    );
}
