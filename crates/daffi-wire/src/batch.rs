//! Batching frames into few write calls: small parts are copied into one buffer, large
//! ones written from their own memory. The connection's writer task batches this way;
//! so may a tool that writes frames from a queue of its own.

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::outgoing::Outgoing;

/// Payloads up to this size are copied into the batch buffer; larger ones are written
/// from their own memory.
pub const COPY_THRESHOLD: usize = 16 * 1024;
/// Flush the batch once it holds this much.
pub const BATCH_LIMIT: usize = 256 * 1024;

/// Adds `frame` to `batch`; a part over [`COPY_THRESHOLD`] is written from its own
/// memory instead, after what the batch held. [`flush_batch`] writes the rest.
pub async fn batch_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut BytesMut,
    frame: Outgoing,
) -> std::io::Result<()> {
    for part in frame.slices() {
        if part.len() > COPY_THRESHOLD {
            flush_batch(writer, batch).await?;
            writer.write_all(part).await?;
        } else {
            batch.extend_from_slice(part);
        }
    }
    Ok(())
}

/// Writes what `batch` holds, and empties it.
pub async fn flush_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut BytesMut,
) -> std::io::Result<()> {
    if !batch.is_empty() {
        writer.write_all(batch).await?;
        batch.clear();
    }
    Ok(())
}
