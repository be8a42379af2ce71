//! What every backend's streams share: the credit a receiver grants (items and bytes),
//! and the batches that carry several items in one message (see docs/PROTOCOL.md,
//! "Streams": a `StreamItem` with the `BATCH` flag).

use bytes::{Bytes, BytesMut};
use daffi_wire::Payload;

/// Items a stream's receiver grants at first, and tops up to as it consumes them.
pub const STREAM_WINDOW: u32 = 256;

/// Bytes of items a stream's receiver grants at first, and tops up to: with
/// [`STREAM_WINDOW`], whichever runs out first bounds what is in flight on any hop (one
/// item may overdraw it, so that an item larger than the window still goes).
pub const STREAM_WINDOW_BYTES: u64 = 2 * 1024 * 1024;

/// A batch closes once it holds this many bytes: items go on in the next one.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Items smaller than this are copied into the batch's buffer; larger ones go out from
/// their own memory (a part of the payload), without a copy.
const COPIED_ITEM: usize = 4 * 1024;

/// Bytes of the length in front of each item of a batch.
const ITEM_LEN: usize = 4;

/// What a stream's sender may still send: items, and bytes of items. Bytes may go
/// negative by the overdraft of the last item sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Credit {
    /// Items.
    pub items: u32,
    /// Bytes of items (their encoded length).
    pub bytes: i64,
}

impl Credit {
    /// The first credit of every stream.
    pub const WINDOW: Credit = Credit {
        items: STREAM_WINDOW,
        bytes: STREAM_WINDOW_BYTES as i64,
    };

    /// Whether one more item may go, whatever its size.
    pub fn allows_one(&self) -> bool {
        self.items > 0 && self.bytes > 0
    }

    /// Counts one item of `len` bytes against the credit; `false` (nothing counted) if
    /// the credit does not allow it.
    pub fn take(&mut self, len: usize) -> bool {
        if !self.allows_one() {
            return false;
        }
        self.items -= 1;
        self.bytes -= i64::try_from(len).unwrap_or(i64::MAX);
        true
    }

    /// Adds `grant` (saturating: a receiver that grants too much wastes only its own
    /// memory).
    pub fn add(&mut self, grant: Grant) {
        self.items = self.items.saturating_add(grant.items);
        let bytes = i64::try_from(grant.bytes).unwrap_or(i64::MAX);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// What brings this credit back up to the window, once it fell to half of it (in
    /// items or bytes); `None` before that.
    pub fn top_up(&self) -> Option<Grant> {
        let half = self.items <= STREAM_WINDOW / 2 || self.bytes <= Credit::WINDOW.bytes / 2;
        half.then(|| Grant {
            items: STREAM_WINDOW.saturating_sub(self.items),
            bytes: (Credit::WINDOW.bytes - self.bytes.min(Credit::WINDOW.bytes)) as u64,
        })
    }
}

/// More credit, as a receiver grants it (the payload of a `StreamCredit`: the
/// MessagePack array `[items, bytes]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// More items.
    pub items: u32,
    /// More bytes of items.
    pub bytes: u64,
}

/// Items on their way out in one message. One item is its own payload, as it came (no
/// copy, and no batch layout); from the second on, each item is its length (`u32`,
/// big-endian) and its bytes.
#[derive(Debug, Default)]
pub struct ItemBatch {
    /// The first item, until a second one comes.
    single: Option<Payload>,
    /// The batch so far, when it holds more than one item.
    batched: Payload,
    /// Small items (and lengths) not yet added to `batched`.
    copied: BytesMut,
    items: u32,
    bytes: usize,
}

impl ItemBatch {
    /// Adds `item`.
    pub fn push(&mut self, item: Payload) {
        self.items += 1;
        self.bytes += item.len();
        if self.items == 1 {
            self.single = Some(item);
            return;
        }
        if let Some(first) = self.single.take() {
            self.append(first);
        }
        self.append(item);
    }

    fn append(&mut self, item: Payload) {
        self.copied
            .extend_from_slice(&(item.len() as u32).to_be_bytes());
        if item.len() < COPIED_ITEM {
            for part in item.parts() {
                self.copied.extend_from_slice(part);
            }
            return;
        }
        self.batched.push(self.copied.split().freeze());
        self.batched.append(item);
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// Whether another item may join it (it is below [`MAX_BATCH_BYTES`]).
    pub fn has_room(&self) -> bool {
        self.bytes < MAX_BATCH_BYTES
    }

    /// The message's payload, and whether it is a batch (more than one item).
    pub fn into_payload(mut self) -> (Payload, bool) {
        if let Some(single) = self.single {
            return (single, false);
        }
        self.batched.push(self.copied.freeze());
        (self.batched, true)
    }
}

/// The items of a received batch, as slices of its payload (no copy); `Err` names what
/// is wrong with a malformed one.
pub fn split_batch(payload: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut items = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        let Some(len) = payload.get(at..at + ITEM_LEN) else {
            return Err(format!("a batch's item length is cut short at byte {at}"));
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let start = at + ITEM_LEN;
        let end = start
            .checked_add(len)
            .filter(|end| *end <= payload.len())
            .ok_or_else(|| format!("a batch's item of {len} bytes runs past its end"))?;
        items.push(payload.slice(start..end));
        at = end;
    }
    if items.len() < 2 {
        return Err("a batch holds fewer than two items".to_string());
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(items: &[Bytes]) -> (Payload, bool) {
        let mut batch = ItemBatch::default();
        for item in items {
            batch.push(Payload::from(item.clone()));
        }
        batch.into_payload()
    }

    #[test]
    fn a_lone_item_goes_as_it_came() {
        let item = Bytes::from_static(b"\x2a");
        assert_eq!(
            batch_of(std::slice::from_ref(&item)),
            (Payload::from(item), false)
        );
    }

    #[test]
    fn small_and_large_items_split_back_in_order() {
        let items = [
            Bytes::from_static(b"\x01"),
            Bytes::from(vec![7u8; COPIED_ITEM * 2]),
            Bytes::from_static(b"\xa2hi"),
        ];
        let (payload, batched) = batch_of(&items);
        assert!(batched);
        assert_eq!(split_batch(&payload.into_bytes()).unwrap(), items);
    }

    #[test]
    fn malformed_batches_are_refused() {
        assert!(split_batch(&Bytes::from_static(b"\0\0\0\x05ab")).is_err());
        assert!(split_batch(&Bytes::from_static(b"\0\0")).is_err());
        assert!(split_batch(&Bytes::from_static(b"\0\0\0\x01a")).is_err());
    }

    #[test]
    fn credit_runs_out_by_items_or_bytes_and_tops_up() {
        let mut credit = Credit {
            items: 2,
            bytes: 10,
        };
        assert!(credit.take(30), "one item may overdraw the bytes");
        assert!(!credit.take(1), "no bytes left");
        credit.add(Grant {
            items: 0,
            bytes: 100,
        });
        assert!(credit.take(1));
        assert!(!credit.take(1), "no items left");
        let grant = credit.top_up().expect("below half");
        credit.add(grant);
        assert_eq!(credit, Credit::WINDOW);
    }
}
