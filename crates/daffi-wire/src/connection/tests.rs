use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::channel::{frame_channel, QueueLimits};
use crate::frame::{Header, Kind};
use crate::outgoing::Outgoing;

/// Bounds every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// Records what it is handed; `then` runs on each frame (with its call id).
struct Recorder {
    call_ids: Vec<u64>,
    next_dsts: Vec<Option<Vec<u8>>>,
    caught_up: usize,
    then: Box<dyn FnMut(u64) -> Result<(), &'static str> + Send>,
}

impl Recorder {
    fn new(then: impl FnMut(u64) -> Result<(), &'static str> + Send + 'static) -> Self {
        Recorder {
            call_ids: Vec::new(),
            next_dsts: Vec::new(),
            caught_up: 0,
            then: Box::new(then),
        }
    }
}

impl FrameHandler for Recorder {
    type Refusal = &'static str;

    fn frame(&mut self, frame: Frame, next_dst: Option<&[u8]>) -> Handled<&'static str> {
        self.call_ids.push(frame.call_id());
        self.next_dsts.push(next_dst.map(<[u8]>::to_vec));
        match (self.then)(frame.call_id()) {
            Ok(()) => Handled::Done,
            Err(refusal) => Handled::Refused(refusal),
        }
    }

    fn caught_up(&mut self) {
        self.caught_up += 1;
    }
}

fn request(call_id: u64, dst: &str) -> Bytes {
    let header = Header {
        call_id,
        dst,
        ..Header::control(Kind::Request)
    };
    header.encode(0)
}

/// A sender whose peer reads everything, and whose writer runs.
fn sender() -> FrameSender {
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let (tx, writer) = frame_channel(a, QueueLimits::default());
    tokio::spawn(writer);
    tokio::spawn(async move { tokio::io::copy(&mut b, &mut tokio::io::sink()).await });
    tx
}

/// A peer that sends requests (call ids from 1) until the connection is gone.
fn flood() -> FrameReader<DuplexStream> {
    let (mut a, b) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        for id in 1.. {
            if a.write_all(&request(id, "node")).await.is_err() {
                return;
            }
        }
    });
    FrameReader::new(b, 1 << 20)
}

async fn run(
    reader: &mut FrameReader<DuplexStream>,
    sender: &FrameSender,
    stop: &watch::Receiver<bool>,
    handler: &mut Recorder,
) -> Ended<&'static str> {
    tokio::time::timeout(WAIT, read_frames(reader, sender, stop, handler))
        .await
        .expect("the loop ends within WAIT")
}

#[tokio::test]
async fn frames_go_to_the_handler_in_order_until_the_peer_closes() {
    let (mut a, b) = tokio::io::duplex(64 * 1024);
    for (id, dst) in [(1, "one"), (2, "two"), (3, "two")] {
        a.write_all(&request(id, dst)).await.expect("write");
    }
    drop(a);
    let mut reader = FrameReader::new(b, 1 << 20);
    let (_stop_tx, stop) = watch::channel(false);
    let mut handler = Recorder::new(|_| Ok(()));
    let ended = run(&mut reader, &sender(), &stop, &mut handler).await;
    assert!(matches!(ended, Ended::PeerClosed), "{ended:?}");
    assert_eq!(handler.call_ids, [1, 2, 3]);
    // All three came in one read: each but the last saw where the next one goes.
    let next: Vec<Option<&[u8]>> = handler.next_dsts.iter().map(|d| d.as_deref()).collect();
    assert_eq!(next, [Some(&b"two"[..]), Some(&b"two"[..]), None]);
    assert!(handler.caught_up >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_does_not_hide_the_stop() {
    let mut reader = flood();
    let (stop_tx, stop) = watch::channel(false);
    let mut handler = Recorder::new(move |id| {
        if id == 10 {
            stop_tx.send_replace(true);
        }
        Ok(())
    });
    let ended = run(&mut reader, &sender(), &stop, &mut handler).await;
    assert!(matches!(ended, Ended::Stopped), "{ended:?}");
    assert_eq!(
        handler.call_ids.len(),
        10,
        "no frame is handled after the stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_does_not_hide_a_closed_writer() {
    let mut reader = flood();
    let (_stop_tx, stop) = watch::channel(false);
    let tx = sender();
    let closing = tx.clone();
    let mut handler = Recorder::new(move |id| {
        if id == 5 {
            closing.close_as_slow_consumer();
        }
        Ok(())
    });
    let ended = run(&mut reader, &tx, &stop, &mut handler).await;
    match ended {
        Ended::WriterClosed(Some(reason)) => assert!(reason.is_slow_consumer(), "{reason}"),
        other => panic!("expected the writer's close, got {other:?}"),
    }
    assert_eq!(handler.call_ids.len(), 5);
}

#[tokio::test]
async fn a_refused_frame_ends_the_loop() {
    let mut reader = flood();
    let (_stop_tx, stop) = watch::channel(false);
    let mut handler = Recorder::new(|id| if id == 3 { Err("no") } else { Ok(()) });
    let ended = run(&mut reader, &sender(), &stop, &mut handler).await;
    assert!(matches!(ended, Ended::Refused("no")), "{ended:?}");
    assert_eq!(handler.call_ids, [1, 2, 3]);
}

#[tokio::test]
async fn bytes_that_are_no_frame_end_the_loop_as_a_read_failure() {
    let (mut a, b) = tokio::io::duplex(64);
    a.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
    let mut reader = FrameReader::new(b, 1024);
    let (_stop_tx, stop) = watch::channel(false);
    let mut handler = Recorder::new(|_| Ok(()));
    let ended = run(&mut reader, &sender(), &stop, &mut handler).await;
    assert!(matches!(ended, Ended::ReadFailed(_)), "{ended:?}");
    assert!(handler.call_ids.is_empty());
}

#[tokio::test]
async fn a_drain_writes_what_is_queued() {
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let (tx, writer) = frame_channel(a, QueueLimits::default());
    let writer = WriterTask::spawn(writer);
    let body = Bytes::from(vec![7u8; 100_000]);
    tx.send(Outgoing::new(&Header::control(Kind::Request), body))
        .await
        .expect("open");
    let reading = tokio::spawn(async move {
        let mut all = Vec::new();
        b.read_to_end(&mut all).await.map(|_| all.len())
    });
    assert!(writer.drain(tx, Instant::now() + WAIT).await);
    let read = reading.await.expect("join").expect("read");
    assert!(read > 100_000, "read {read} bytes");
}

#[tokio::test]
async fn a_drain_gives_up_on_a_peer_that_reads_nothing() {
    let (a, _peer) = tokio::io::duplex(64);
    let (tx, writer) = frame_channel(a, QueueLimits::default());
    let writer = WriterTask::spawn(writer);
    let body = Bytes::from(vec![7u8; 100_000]);
    tx.send(Outgoing::new(&Header::control(Kind::Request), body))
        .await
        .expect("open");
    let started = Instant::now();
    let drained = writer.drain(tx, started + Duration::from_millis(100)).await;
    assert!(!drained);
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
}
