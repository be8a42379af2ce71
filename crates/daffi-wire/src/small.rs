//! Small byte strings cut from a buffer per thread: frame headers, small encoded values.
//!
//! Each is a slice of this thread's buffer (a `Bytes` sharing it): no allocation and no
//! free per string, one per 1 KiB of them. A buffer lives while a string cut
//! from it does, and is reused in place once none does. Kept small, so that a string
//! kept long (a frame queued for a slow peer) holds at most this much alive besides its
//! own bytes.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};

/// The size of each thread's buffer.
const CHUNK: usize = 1024;
/// Longer strings get an allocation of their own.
pub const SMALL_MAX: usize = 256;

thread_local! {
    /// This thread's buffer (see the module's docs).
    static CHUNKS: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// The `len` bytes that `write` appends, cut from this thread's buffer; `None` (and
/// `write` not called) if `len` is over [`SMALL_MAX`], or the buffer is not at hand
/// (the thread is exiting).
pub(crate) fn cut(len: usize, write: impl FnOnce(&mut BytesMut)) -> Option<Bytes> {
    if len > SMALL_MAX {
        return None;
    }
    CHUNKS
        .try_with(|chunks| {
            let mut chunks = chunks.try_borrow_mut().ok()?;
            if chunks.capacity() - chunks.len() < len {
                // In place if nothing cut from it is alive, else a new buffer.
                chunks.reserve(CHUNK);
            }
            write(&mut chunks);
            Some(chunks.split().freeze())
        })
        .ok()
        .flatten()
}

/// A copy of `bytes`: cut from this thread's buffer if it is small, in an allocation of
/// its own otherwise. For bytes sent in a frame (kept until written), not for values
/// kept long.
pub fn copy(bytes: &[u8]) -> Bytes {
    cut(bytes.len(), |buf| buf.extend_from_slice(bytes))
        .unwrap_or_else(|| Bytes::copy_from_slice(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_cut_keep_their_bytes_while_buffers_are_reused_and_replaced() {
        let mut kept = Vec::new();
        for i in 0..2_000u32 {
            let text = format!("string {i} {}", "x".repeat(i as usize % 200));
            let cut = copy(text.as_bytes());
            assert_eq!(&cut[..], text.as_bytes());
            // Some live long (their buffer is replaced), the rest go at once (reused).
            if i % 7 == 0 {
                kept.push((text, cut));
            }
        }
        for (text, cut) in &kept {
            assert_eq!(&cut[..], text.as_bytes());
        }
        let long = vec![7u8; SMALL_MAX + 1];
        assert_eq!(&copy(&long)[..], &long[..]);
        assert!(cut(SMALL_MAX + 1, |_| unreachable!("too long to cut")).is_none());
    }
}
