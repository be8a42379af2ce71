//! The floor's batched writer: one writer task per connection drains its queue into
//! one buffer and one write call, and nothing is written by the senders themselves.

use bytes::BytesMut;
use daffi_wire::batch::{batch_frame, flush_batch, BATCH_LIMIT};
use daffi_wire::outgoing::Outgoing;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Writes everything sent on `rx` to `writer`, batching frames that are queued together.
/// Returns when every sender is gone (after flushing) or the socket fails.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch = BytesMut::with_capacity(BATCH_LIMIT);
    while let Some(first) = rx.recv().await {
        batch_frame(&mut writer, &mut batch, first).await?;
        while batch.len() < BATCH_LIMIT {
            match rx.try_recv() {
                Ok(next) => batch_frame(&mut writer, &mut batch, next).await?,
                Err(_) => break,
            }
        }
        flush_batch(&mut writer, &mut batch).await?;
        writer.flush().await?;
    }
    let _ = writer.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use daffi_wire::frame::{Header, Kind};
    use daffi_wire::reader::FrameReader;

    #[tokio::test]
    async fn frames_survive_the_writer_and_reader() {
        let (a, b) = tokio::io::duplex(1024);
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(write_loop(a, rx));
        let big = Bytes::from(vec![7u8; 100_000]);
        for (i, body) in [Bytes::from_static(b"small"), big.clone()]
            .into_iter()
            .enumerate()
        {
            let mut h = Header::control(Kind::Request);
            h.call_id = i as u64;
            tx.send(Outgoing::new(&h, body))
                .await
                .expect("writer alive");
        }
        drop(tx);
        let mut reader = FrameReader::new(b, 1 << 20);
        let first = reader.next().await.expect("read").expect("frame");
        assert_eq!(&first.payload()[..], b"small");
        let second = reader.next().await.expect("read").expect("frame");
        assert_eq!((second.call_id(), second.payload()), (1, big));
        assert!(reader.next().await.expect("clean end").is_none());
        writer.await.expect("join").expect("io");
    }
}
