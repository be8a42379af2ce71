//! Large byte buffers kept for a moment after use, so that the next large byte string
//! is copied into memory already mapped instead of fresh pages.
//!
//! Buffers move between here and the frame readers both ways: a copy takes a buffer a
//! reader kept for its next large frame if the pool has none, and a reader whose buffer
//! was taken (by that copy, or by a result or parameter taken over as a `Vec<u8>`)
//! reads its next large frame into one from here.
//!
//! A copy of 64 MiB into a fresh allocation costs about three times a copy into a warm
//! one: the system maps and zeroes every page on first touch. Where daffi must copy a
//! large byte string (a borrowed `&[u8]` or `&Vec<u8>` argument being encoded, a
//! `Vec<u8>` or `ByteBuf` parameter being decoded), it copies into a buffer from here,
//! and a buffer it sends and then drops (that encoded copy, a `Vec<u8>` result) comes
//! back here instead of being freed. Buffers kept are dropped [`KEEP`] after they were
//! given back, as the frame reader does with its own (`KEEP_LARGE_BUFFERS`), so an idle
//! process holds none.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

/// Byte strings at least this long are copied into buffers from the pool.
pub(crate) const POOLED: usize = 1024 * 1024;
/// How long a buffer given back is kept for the next byte string.
const KEEP: Duration = daffi_wire::reader::KEEP_LARGE_BUFFERS;
/// Buffers kept at most (the latest): a call's argument and its result.
const MAX_KEPT: usize = 2;
/// Room a new pooled buffer has beyond its byte string: a frame that carries the same
/// bytes (the reply to an echo, read into the argument's buffer once it was sent) has a
/// header and names beside them.
const HEAD_ROOM: usize = 64 * 1024;

/// A buffer given back, and until when it is kept.
struct Kept {
    buffer: Vec<u8>,
    until: Instant,
}

static KEPT: Mutex<Vec<Kept>> = Mutex::new(Vec::new());

fn kept() -> std::sync::MutexGuard<'static, Vec<Kept>> {
    KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An empty buffer with room for `len` bytes: one kept here or by a frame reader (of at
/// most twice that room, so that a small string does not hold a huge buffer), or a new
/// one with [`HEAD_ROOM`] to spare, advised for huge pages in a burst.
fn take(len: usize) -> Vec<u8> {
    if len < POOLED {
        return Vec::with_capacity(len);
    }
    let burst = note_large_use();
    if let Some(buffer) = lend(len) {
        return buffer;
    }
    if let Some(buffer) = daffi_wire::take_idle_large_buffer(len) {
        // That reader reads its next large frame into a buffer from here (this one, once
        // sent, say) instead.
        lend_to_readers();
        return buffer;
    }
    if burst {
        // As a frame reader does in a burst of large frames: the memory the system hands
        // out now is what was freed a moment ago, which huge pages fault in at a
        // fraction of the cost. Not after a pause (see `FrameReader::large_buffer`).
        return daffi_wire::huge_page_buffer(len + HEAD_ROOM);
    }
    Vec::with_capacity(len + HEAD_ROOM)
}

/// When a large buffer was last taken or given back here.
static LAST_USED: Mutex<Option<std::time::Instant>> = Mutex::new(None);

/// Notes a large buffer taken or given back now, and tells whether the last one was
/// less than [`KEEP`] ago (a burst of large byte strings).
fn note_large_use() -> bool {
    let now = std::time::Instant::now();
    let last = LAST_USED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .replace(now);
    last.is_some_and(|last| now.duration_since(last) < KEEP)
}

/// A kept buffer with room for `len` bytes (see [`take`]), if there is one.
fn lend(len: usize) -> Option<Vec<u8>> {
    if len < POOLED {
        return None;
    }
    let mut kept = kept();
    let at = kept
        .iter()
        .position(|k| daffi_wire::room_suits(k.buffer.capacity(), len))?;
    let mut buffer = kept.swap_remove(at).buffer;
    buffer.clear();
    Some(buffer)
}

/// Lets the frame readers of this process read their next large frames into kept
/// buffers: once a parameter, a result or a copy took over a reader's buffer, the reader
/// cannot reuse it, and the one that comes back (the same bytes sent back as the result,
/// or the copy once sent) is here.
pub(super) fn lend_to_readers() {
    static LENT: std::sync::Once = std::sync::Once::new();
    LENT.call_once(|| daffi_wire::lend_large_buffers(lend));
}

/// `data` in a `Vec` of its own, from the pool if it is large.
pub(crate) fn vec_of(data: &[u8]) -> Vec<u8> {
    let mut buffer = take(data.len());
    buffer.extend_from_slice(data);
    buffer
}

/// `data` copied into a buffer from the pool, which goes back to it once the `Bytes`
/// (the frame it is sent in) is dropped.
pub(super) fn copy_of(data: &[u8]) -> Bytes {
    into_bytes(vec_of(data))
}

/// `buffer` as `Bytes` (no copy); a large one goes back to the pool when they are
/// dropped.
pub(crate) fn into_bytes(buffer: Vec<u8>) -> Bytes {
    if buffer.capacity() < POOLED {
        return Bytes::from(buffer);
    }
    Bytes::from_owner(GivenBack(buffer))
}

/// A buffer that goes back to the pool when dropped.
struct GivenBack(Vec<u8>);

impl AsRef<[u8]> for GivenBack {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for GivenBack {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

/// Keeps `buffer` for [`KEEP`]. Only where a Tokio runtime runs (where frames are
/// written and dropped), whose timer drops it then; elsewhere it is freed at once.
fn give_back(buffer: Vec<u8>) {
    note_large_use();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let until = Instant::now() + KEEP;
    let dropped = {
        let mut kept = kept();
        kept.push(Kept { buffer, until });
        (kept.len() > MAX_KEPT).then(|| kept.remove(0))
    };
    drop(dropped);
    runtime.spawn(async move {
        tokio::time::sleep_until(until).await;
        drop_expired();
    });
}

/// Drops the buffers kept past their time.
fn drop_expired() {
    let now = Instant::now();
    let expired: Vec<Kept> = {
        let mut kept = kept();
        let (expired, left) = std::mem::take(&mut *kept)
            .into_iter()
            .partition(|k| k.until <= now);
        *kept = left;
        expired
    };
    drop(expired);
}

/// How many buffers are kept now (for tests).
#[cfg(test)]
pub(super) fn kept_count() -> usize {
    kept().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_buffer_given_back_is_reused_then_dropped() {
        let data = vec![5u8; POOLED + 10];
        let sent = copy_of(&data);
        let at = sent.as_ptr();
        assert_eq!(sent[..], data[..]);
        drop(sent);
        assert_eq!(kept_count(), 1, "kept after the frame is dropped");
        let again = vec_of(&data[..POOLED]);
        assert_eq!(again.as_ptr(), at, "the same buffer, reused");
        assert_eq!(again[..], data[..POOLED]);
        drop(into_bytes(again));
        tokio::time::sleep(KEEP + Duration::from_millis(1)).await;
        assert_eq!(kept_count(), 0, "dropped after KEEP");
        // Small strings neither take a kept buffer nor give theirs back.
        drop(copy_of(&data));
        assert_eq!(vec_of(&data[..10]).capacity(), 10);
        drop(copy_of(&data[..10]));
        assert_eq!(kept_count(), 1);
    }
}
