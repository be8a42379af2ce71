//! Reading frames off a byte stream, and the one writer task per connection.
//!
//! The writer drains everything queued for a connection into one buffer and one write
//! call, so that many calls in flight share system calls. Large payloads are written
//! straight from their `Bytes`, never copied into the buffer.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::frame::{Frame, FrameError, Header, Kind, LEN_PREFIX};

/// A frame ready to send: the encoded head (length prefix and header) and the payload.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// Length prefix and header, or a whole forwarded frame.
    pub head: Bytes,
    /// Payload; may be empty.
    pub body: Bytes,
}

impl Outgoing {
    /// A frame whose bytes are all in `raw` (a forwarded frame).
    pub fn raw(raw: Bytes) -> Self {
        Outgoing {
            head: raw,
            body: Bytes::new(),
        }
    }

    /// A control frame (no routing fields) with a MessagePack payload.
    pub fn control<T: serde::Serialize>(kind: Kind, payload: &T) -> Self {
        let body = super::message::encode(payload);
        Outgoing {
            head: Header::control(kind).encode(body.len()),
            body,
        }
    }

    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether the frame is empty (never true for a valid frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why reading the next frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer sent bytes that are not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Eof,
}

/// Reads length-prefixed frames, enforcing the size limit before allocating.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_frame_size: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader; frames over `max_frame_size` bytes (prefix excluded) are refused.
    pub fn new(inner: R, max_frame_size: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
            max_frame_size,
        }
    }

    /// Changes the limit (after the handshake told us the controller's).
    pub fn set_max_frame_size(&mut self, limit: usize) {
        self.max_frame_size = limit;
    }

    /// The underlying reader; bytes already buffered are dropped.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads exactly `n` raw bytes (the handshake preamble).
    pub async fn read_exact_bytes(&mut self, n: usize) -> Result<Bytes, ReadError> {
        while self.buf.len() < n {
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Eof);
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// The next frame, or `None` when the peer closed the connection between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(len) = self.complete_frame_len()? {
                let raw = self.buf.split_to(len).freeze();
                return Ok(Some(Frame::parse(raw)?));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Eof)
                };
            }
        }
    }

    /// If the buffer holds a whole frame, its length with prefix; reserves room otherwise.
    fn complete_frame_len(&mut self) -> Result<Option<usize>, FrameError> {
        if self.buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let size = (&self.buf[..LEN_PREFIX]).get_u32() as usize;
        if size > self.max_frame_size {
            return Err(FrameError::TooLarge {
                size,
                limit: self.max_frame_size,
            });
        }
        let total = LEN_PREFIX + size;
        if self.buf.len() >= total {
            Ok(Some(total))
        } else {
            // One allocation for a large frame instead of doubling repeatedly.
            self.buf.reserve(total - self.buf.len());
            Ok(None)
        }
    }
}

/// Payloads up to this size are copied into the batch buffer; larger ones are written
/// from their own memory.
const COPY_THRESHOLD: usize = 16 * 1024;
/// Flush the batch once it holds this much.
const BATCH_LIMIT: usize = 256 * 1024;

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

async fn push<W: AsyncWrite + Unpin>(
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
    if frame.body.len() > COPY_THRESHOLD {
        flush_batch(writer, batch).await?;
        writer.write_all(&frame.body).await?;
    } else {
        batch.extend_from_slice(&frame.body);
    }
    Ok(())
}

async fn flush_batch<W: AsyncWrite + Unpin>(
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
                body,
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

    #[tokio::test]
    async fn oversized_prefix_is_refused_before_reading_the_body() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
        let mut reader = FrameReader::new(b, 1024);
        assert!(matches!(
            reader.next().await,
            Err(ReadError::Frame(FrameError::TooLarge { limit: 1024, .. }))
        ));
    }
}
