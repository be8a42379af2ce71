//! Batching frames into few write calls: small parts are copied into one buffer, large
//! ones written from their own memory.
//!
//! [`write_loop`] is the plain batching writer (a queue and a writer task, nothing
//! written by the senders), kept for tools that want exactly that.

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::outgoing::Outgoing;

/// Payloads up to this size are copied into the batch buffer; larger ones are written
/// from their own memory.
pub(crate) const COPY_THRESHOLD: usize = 16 * 1024;
/// Flush the batch once it holds this much.
pub(crate) const BATCH_LIMIT: usize = 256 * 1024;

/// Writes everything sent on `rx` to `writer`, batching frames that are queued together.
/// Returns when every sender is gone (after flushing) or the socket fails.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch = BytesMut::with_capacity(BATCH_LIMIT);
    while let Some(first) = rx.recv().await {
        push(&mut writer, &mut batch, first).await?;
        while batch.len() < BATCH_LIMIT {
            match rx.try_recv() {
                Ok(next) => push(&mut writer, &mut batch, next).await?,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            writer.write_all(&batch).await?;
            batch.clear();
        }
        writer.flush().await?;
    }
    let _ = writer.shutdown().await;
    Ok(())
}

pub(crate) async fn push<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut BytesMut,
    frame: Outgoing,
) -> std::io::Result<()> {
    if frame.head.len() > COPY_THRESHOLD {
        flush_batch(writer, batch).await?;
        writer.write_all(&frame.head).await?;
    } else {
        batch.extend_from_slice(&frame.head);
    }
    for part in frame.body.parts() {
        if part.len() > COPY_THRESHOLD {
            flush_batch(writer, batch).await?;
            writer.write_all(part).await?;
        } else {
            batch.extend_from_slice(part);
        }
    }
    Ok(())
}

pub(crate) async fn flush_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut BytesMut,
) -> std::io::Result<()> {
    if !batch.is_empty() {
        writer.write_all(batch).await?;
        batch.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Header, Kind};
    use crate::reader::FrameReader;
    use bytes::Bytes;

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
            tx.send(Outgoing {
                head: h.encode(body.len()),
                body: body.into(),
            })
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
