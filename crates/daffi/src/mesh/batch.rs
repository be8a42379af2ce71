//! What every backend's streams share: the credit a receiver grants (items and bytes),
//! and the batches that carry several items in one message (see docs/PROTOCOL.md,
//! "Streams": a `StreamItem` with the `BATCH` flag).

use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use bytes::{Bytes, BytesMut};
use daffi_wire::frame::{FLAG_NO_REPLY, FLAG_REQUEST_BATCH, LEN_PREFIX};
use daffi_wire::{Header, Kind, Outgoing, Payload};
use serde::Serialize;

/// Items a stream's receiver grants at first, and tops up to as it consumes them. Small
/// items need this many to keep a stream going while a grant crosses the controller (a
/// window of 256 stalled a stream of integers on every grant); larger ones run out of
/// [`STREAM_WINDOW_BYTES`] first. At most this many frames (one item each, at worst)
/// wait on any hop.
pub const STREAM_WINDOW: u32 = 4096;

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

/// Items on their way out in one message: each item is its length (`u32`, big-endian)
/// and its bytes, except that a lone item goes as it is (no batch layout). Values after
/// the first are encoded straight into the batch's buffer; an item of [`COPIED_ITEM`] bytes or more
/// that arrives encoded goes out from its own memory, without a copy, as do large
/// blobs inside a value.
#[derive(Debug, Default)]
pub struct ItemBatch {
    /// Finished parts: the buffer up to a large item, and the large item's own parts.
    parts: Payload,
    /// The items since the last finished part, each with its length in front.
    buf: Vec<u8>,
    items: u32,
    bytes: usize,
    /// Its one item went in without its length in front (a large item first in the
    /// batch, kept as its own parts: most often it goes alone, as it is); the next item
    /// puts that length back.
    bare: bool,
}

/// What a batch's buffer holds at first: room for many small items.
const FIRST_CAPACITY: usize = 512;

impl ItemBatch {
    /// Adds an item encoded already.
    pub fn push(&mut self, item: Payload) -> Result<(), String> {
        let len = item.len();
        let prefix = item_len(len)?.to_be_bytes();
        self.unbare();
        if len < COPIED_ITEM {
            self.reserve();
            self.buf.extend_from_slice(&prefix);
            for part in item.parts() {
                self.buf.extend_from_slice(part);
            }
        } else if self.is_empty() {
            self.start_bare(item);
        } else {
            self.buf.extend_from_slice(&prefix);
            self.finish_part();
            self.parts.append(item);
        }
        self.count(len);
        Ok(())
    }

    /// Encodes `value` into the batch as its next item. On `Err` (or a panic while
    /// encoding), the batch holds the same items as before.
    pub fn push_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), String> {
        if self.is_empty() {
            // On the encoder's own buffer: a large item (most often alone) never
            // allocates this batch's buffer.
            return self.push(crate::codec::encode_value(value)?);
        }
        self.unbare();
        self.reserve();
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; ITEM_LEN]);
        let encoded = catch_unwind(AssertUnwindSafe(|| {
            crate::codec::encode_appended(value, &mut self.buf)
        }));
        let parts = match encoded {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => {
                self.buf.truncate(at);
                return Err(e);
            }
            Err(panic) => {
                self.buf.truncate(at);
                resume_unwind(panic);
            }
        };
        let len = parts
            .as_ref()
            .map_or(self.buf.len() - at - ITEM_LEN, Payload::len);
        let prefix = match item_len(len) {
            Ok(prefix) => prefix,
            Err(e) => {
                self.buf.truncate(at);
                return Err(e);
            }
        };
        match parts {
            Some(parts) => {
                self.buf[at..at + ITEM_LEN].copy_from_slice(&prefix.to_be_bytes());
                self.finish_part();
                self.parts.append(parts);
            }
            None => self.buf[at..at + ITEM_LEN].copy_from_slice(&prefix.to_be_bytes()),
        }
        self.count(len);
        Ok(())
    }

    /// Takes a large first item as its own parts, without its length in front.
    fn start_bare(&mut self, item: Payload) {
        self.parts = item;
        self.bare = true;
    }

    /// Puts the length of a bare first item in front of it: another item joins.
    fn unbare(&mut self) {
        if !std::mem::take(&mut self.bare) {
            return;
        }
        // Its length was checked when it joined (`item_len`).
        let len = self.bytes as u32;
        let mut parts = Payload::from(Bytes::copy_from_slice(&len.to_be_bytes()));
        parts.append(std::mem::take(&mut self.parts));
        self.parts = parts;
    }

    fn reserve(&mut self) {
        if self.buf.capacity() == 0 {
            self.buf.reserve(FIRST_CAPACITY);
        }
    }

    fn count(&mut self, len: usize) {
        self.items += 1;
        self.bytes += len;
    }

    /// Moves the buffer into the finished parts.
    fn finish_part(&mut self) {
        if !self.buf.is_empty() {
            self.parts.push(Bytes::from(std::mem::take(&mut self.buf)));
        }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// How many items it holds.
    pub fn items(&self) -> u32 {
        self.items
    }

    /// Bytes of its items (without their lengths).
    pub fn item_bytes(&self) -> usize {
        self.bytes
    }

    /// Whether another item may join it (it is below [`MAX_BATCH_BYTES`]).
    pub fn has_room(&self) -> bool {
        self.bytes < MAX_BATCH_BYTES
    }

    /// Counts its items against `credit` (which allowed each as it was added).
    pub fn charge(&self, credit: &mut Credit) {
        credit.items = credit.items.saturating_sub(self.items);
        credit.bytes = credit
            .bytes
            .saturating_sub(i64::try_from(self.bytes).unwrap_or(i64::MAX));
    }

    /// The message's payload, and whether it is a batch (more than one item).
    pub fn into_payload(mut self) -> (Payload, bool) {
        if self.bare {
            return (self.parts, false);
        }
        self.finish_part();
        let mut payload = self.parts;
        if self.items == 1 {
            payload.advance(ITEM_LEN);
            return (payload, false);
        }
        (payload, true)
    }
}

/// An item's length as a batch writes it; `Err` for an item too large for a stream.
fn item_len(len: usize) -> Result<u32, String> {
    u32::try_from(len)
        .map_err(|_| format!("an item of {len} bytes is too large for a stream (at most 4 GiB)"))
}

/// An item that arrives in parts (over NATS, one larger than a message), joined in
/// order until it holds the size its parts give.
#[cfg(feature = "nats")]
#[derive(Debug)]
pub struct Joining {
    whole: bytes::BytesMut,
    size: usize,
}

#[cfg(feature = "nats")]
impl Joining {
    /// Adds `part` of an item of `size` bytes to `joining` (starting it if `None`);
    /// returns the item once whole (and `joining` is `None` again). `Err` if the part
    /// does not fit: another size, empty, or past the size.
    pub fn join(
        joining: &mut Option<Joining>,
        part: Bytes,
        size: usize,
    ) -> Result<Option<Bytes>, String> {
        let item = joining.get_or_insert_with(|| Joining {
            whole: bytes::BytesMut::new(),
            size,
        });
        if item.size != size {
            return Err(format!(
                "the parts of one item give its size as {} and as {size} bytes",
                item.size
            ));
        }
        if part.is_empty() || item.whole.len() + part.len() > size {
            return Err(format!(
                "a part of {} bytes does not fit an item of {size} bytes with {} joined",
                part.len(),
                item.whole.len()
            ));
        }
        item.whole.extend_from_slice(&part);
        if item.whole.len() < size {
            return Ok(None);
        }
        Ok(joining.take().map(|item| item.whole.freeze()))
    }
}

/// Arguments of a NO_RETURN call that may join a batch request: smaller than this (a
/// larger call goes alone, from its own memory).
pub const JOINED_CALL: usize = COPIED_ITEM;

/// A batch request's payload (lengths included) stays within this: well below a
/// reader's 64 KiB buffer, so that a flood of batches is read, forwarded and freed like
/// a flood of small frames, many to a buffer.
pub const MAX_CALLS_BATCH_BYTES: usize = 16 * 1024;

/// Joins the NO_RETURN call of `call` (its request header, `call_id` 0) with arguments
/// `args` to the request `last` still queued, if that is a NO_RETURN request (or a batch
/// of them, docs/PROTOCOL.md "Batches of NO_RETURN calls") to the same node and callback,
/// with the same flags and timeout, with room left (a payload of at most
/// [`MAX_CALLS_BATCH_BYTES`], lengths included, and the frame within `frame_limit`). A lone request becomes a batch of
/// two. `false`: `last` is left as it was.
pub fn join_call(
    last: &mut Outgoing,
    call: &Header<'_>,
    args: &Payload,
    frame_limit: usize,
) -> bool {
    let Some((flags, count)) = call.matches_head(last.head()) else {
        return false;
    };
    let batched = flags & FLAG_REQUEST_BATCH != 0;
    let same = call.kind == Kind::Request
        && call.flags == FLAG_NO_REPLY
        && flags & !FLAG_REQUEST_BATCH == call.flags;
    let len = args.len();
    if !same || len >= JOINED_CALL {
        return false;
    }
    let items = if batched { count } else { 1 };
    let body = last.body_mut();
    let framing = if batched { ITEM_LEN } else { 2 * ITEM_LEN };
    let new_len = body.len() + framing + len;
    // Bounded by the payload, lengths included: a flood of tiny calls makes frames (and
    // buffers, on every hop) of at most 16 KiB.
    if new_len > MAX_CALLS_BATCH_BYTES
        || (!batched && body.len() >= JOINED_CALL)
        || items >= u64::from(u32::MAX)
        || call.frame_len(new_len) - LEN_PREFIX > frame_limit
    {
        return false;
    }
    let mut buf = if batched {
        // The batch's buffer is extended in place when nothing else holds it.
        match body.pop().map(Bytes::try_into_mut) {
            Some(Ok(buf)) => buf,
            Some(Err(part)) => {
                body.push(part);
                BytesMut::with_capacity(FIRST_CAPACITY)
            }
            None => BytesMut::with_capacity(FIRST_CAPACITY),
        }
    } else {
        // The lone call's arguments become the batch's first item.
        let first = std::mem::take(body);
        let mut buf = BytesMut::with_capacity(FIRST_CAPACITY.max(2 * new_len));
        buf.extend_from_slice(&(first.len() as u32).to_be_bytes());
        for part in first.parts() {
            buf.extend_from_slice(part);
        }
        buf
    };
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    for part in args.parts() {
        buf.extend_from_slice(part);
    }
    body.push(buf.freeze());
    let (flags, payload_len) = (call.flags | FLAG_REQUEST_BATCH, body.len());
    // The head is changed in place when this batch owns it (after its first join);
    // the lone request's head, cut from a shared buffer, is copied once.
    let head = std::mem::take(last.head_mut());
    let mut head = head
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    *last.head_mut() = if Header::patch_head(&mut head, payload_len, flags, items + 1) {
        head.freeze()
    } else {
        // Never taken (the head matched a whole header, the frame is within the limit);
        // encoded afresh, the frame stays valid whatever happens.
        Header {
            flags,
            call_id: items + 1,
            ..*call
        }
        .encode(payload_len)
    };
    true
}

/// The calls of a batch request (`flags` with [`FLAG_REQUEST_BATCH`], `count` its
/// `call_id`), checked whole; `Err` names what is wrong with a malformed one: not
/// NO_RETURN, another flag with it, a malformed layout, or a count that is not the
/// number of calls it holds.
pub fn batch_calls(flags: u8, count: u64, payload: Bytes) -> Result<BatchItems, String> {
    if flags != FLAG_NO_REPLY | FLAG_REQUEST_BATCH {
        return Err(format!(
            "a batch request must carry NO_REPLY and no other flag (flags {flags:#010b})"
        ));
    }
    let calls = BatchItems::new(payload)?;
    if u64::from(calls.items) != count {
        return Err(format!(
            "a batch request says it holds {count} calls and holds {}",
            calls.items
        ));
    }
    Ok(calls)
}

/// The items of a received batch, checked whole when it arrives, then read one by one
/// as slices of its payload (no copy, no list of them).
#[derive(Debug, Clone, Default)]
pub struct BatchItems {
    payload: Bytes,
    /// Where the next item's length is.
    at: usize,
    /// How many it held when it arrived.
    items: u32,
}

impl BatchItems {
    /// The items of the batch `payload`; `Err` names what is wrong with a malformed one.
    pub fn new(payload: Bytes) -> Result<BatchItems, String> {
        let mut at = 0;
        let mut items = 0u32;
        while let Some(item) = item_at(&payload, at)? {
            at = item.end;
            items = items.saturating_add(1);
        }
        if items < 2 {
            return Err("a batch holds fewer than two items".to_string());
        }
        Ok(BatchItems {
            payload,
            at: 0,
            items,
        })
    }

    /// Counts the items not read yet against `credit`; `false` if it does not cover
    /// them.
    pub fn charge(&self, credit: &mut Credit) -> bool {
        self.item_ranges().all(|item| credit.take(item.len()))
    }

    /// Where the items not read yet are in the payload (checked in [`new`](Self::new)).
    fn item_ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut at = self.at;
        std::iter::from_fn(move || {
            let item = item_at(&self.payload, at).ok()??;
            at = item.end;
            Some(item)
        })
    }
}

impl Iterator for BatchItems {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let item = self.item_ranges().next()?;
        self.at = item.end;
        Some(self.payload.slice(item))
    }
}

/// Where the item whose length is at `at` is in `payload`; `None` at its end, `Err`
/// if the item is cut short.
fn item_at(payload: &[u8], at: usize) -> Result<Option<Range<usize>>, String> {
    if at >= payload.len() {
        return Ok(None);
    }
    let Some(len) = payload.get(at..at + ITEM_LEN) else {
        return Err(format!("a batch's item length is cut short at byte {at}"));
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let start = at + ITEM_LEN;
    let end = start
        .checked_add(len)
        .filter(|end| *end <= payload.len())
        .ok_or_else(|| format!("a batch's item of {len} bytes runs past its end"))?;
    Ok(Some(start..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_batch(payload: &Bytes) -> Result<Vec<Bytes>, String> {
        Ok(BatchItems::new(payload.clone())?.collect())
    }

    fn batch_of(items: &[Bytes]) -> (Payload, bool) {
        let mut batch = ItemBatch::default();
        for item in items {
            batch.push(Payload::from(item.clone())).unwrap();
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
    fn values_encode_into_the_batch_as_their_payloads_would() {
        let blob = crate::Blob::from(vec![9u8; 64 * 1024]);
        let mut batch = ItemBatch::default();
        batch.push_value(&1u64).unwrap();
        batch.push_value(&blob).unwrap();
        batch.push_value(&"three").unwrap();
        assert_eq!(batch.items(), 3);
        let (payload, batched) = batch.into_payload();
        assert!(batched);
        assert!(
            payload.parts().any(|part| part.as_ptr() == blob.as_ptr()),
            "a large blob goes from its own memory"
        );
        let expected: Vec<Bytes> = [
            crate::codec::encode_value(&1u64),
            crate::codec::encode_value(&blob),
            crate::codec::encode_value(&"three"),
        ]
        .into_iter()
        .map(|p| p.unwrap().into_bytes())
        .collect();
        assert_eq!(split_batch(&payload.into_bytes()).unwrap(), expected);
    }

    #[test]
    fn a_lone_value_goes_without_the_batch_layout() {
        let mut batch = ItemBatch::default();
        batch.push_value(&42u64).unwrap();
        let (payload, batched) = batch.into_payload();
        assert!(!batched);
        assert_eq!(payload, crate::codec::encode_value(&42u64).unwrap());
    }

    #[test]
    fn a_large_first_item_goes_alone_as_it_is_or_first_in_a_batch() {
        let blob = crate::Blob::from(vec![5u8; 64 * 1024]);
        let encoded = crate::codec::encode_value(&blob).unwrap();
        let mut lone = ItemBatch::default();
        lone.push_value(&blob).unwrap();
        assert_eq!(lone.into_payload(), (encoded.clone(), false));

        let large = Bytes::from(vec![6u8; COPIED_ITEM]);
        let mut batch = ItemBatch::default();
        batch.push_value(&blob).unwrap();
        batch.push(Payload::from(large.clone())).unwrap();
        batch.push_value(&7u8).unwrap();
        let (payload, batched) = batch.into_payload();
        assert!(batched);
        let expected = vec![
            encoded.into_bytes(),
            large,
            crate::codec::encode_value(&7u8).unwrap().into_bytes(),
        ];
        assert_eq!(split_batch(&payload.into_bytes()).unwrap(), expected);
    }

    fn call(dst: &str, name: &str) -> Header<'static> {
        Header {
            kind: Kind::Request,
            flags: FLAG_NO_REPLY,
            call_id: 0,
            timeout_ms: 0,
            src: "me",
            dst: Box::leak(dst.to_string().into_boxed_str()),
            name: Box::leak(name.to_string().into_boxed_str()),
        }
    }

    fn parsed(frame: &Outgoing) -> daffi_wire::Frame {
        let mut raw = Vec::new();
        frame.copy_to(&mut raw);
        daffi_wire::Frame::parse(raw.into()).expect("a valid frame")
    }

    #[test]
    fn calls_join_a_queued_request_to_the_same_node_and_callback_only() {
        let args = |n: u8| Payload::from(Bytes::from(vec![n; usize::from(n)]));
        let add = call("b", "add");
        let mut last = Outgoing::new(&add, args(1));
        for n in 2..=4 {
            assert!(join_call(&mut last, &add, &args(n), 1 << 20));
        }
        assert!(
            !join_call(&mut last, &call("c", "add"), &args(5), 1 << 20),
            "another node"
        );
        assert!(
            !join_call(&mut last, &call("b", "sub"), &args(5), 1 << 20),
            "another callback"
        );
        let mut timed = call("b", "add");
        timed.timeout_ms = 5;
        assert!(
            !join_call(&mut last, &timed, &args(5), 1 << 20),
            "another timeout"
        );
        let wants_reply = Header { flags: 0, ..add };
        assert!(
            !join_call(&mut last, &wants_reply, &args(5), 1 << 20),
            "a call that wants a reply"
        );
        let large = Payload::from(Bytes::from(vec![0u8; JOINED_CALL]));
        assert!(
            !join_call(&mut last, &add, &large, 1 << 20),
            "large arguments go alone"
        );
        assert!(
            !join_call(&mut last, &add, &args(5), 40),
            "past the frame limit"
        );

        let frame = parsed(&last);
        assert_eq!(frame.flags(), FLAG_NO_REPLY | FLAG_REQUEST_BATCH);
        assert_eq!(
            (frame.call_id(), frame.dst(), frame.name()),
            (4, "b", "add")
        );
        let calls: Vec<Bytes> = batch_calls(frame.flags(), frame.call_id(), frame.payload())
            .expect("a valid batch")
            .collect();
        let expected: Vec<Bytes> = (1..=4).map(|n| args(n).into_bytes()).collect();
        assert_eq!(calls, expected, "in order, each as it was sent");
    }

    #[test]
    fn a_batch_closes_at_its_size_and_never_joins_a_reply_or_a_stream_frame() {
        let add = call("b", "add");
        let args = Payload::from(Bytes::from(vec![1u8; 1000]));
        let mut last = Outgoing::new(&add, args.clone());
        let mut joined = 1;
        while join_call(&mut last, &add, &args, 1 << 20) {
            joined += 1;
        }
        assert_eq!(
            joined,
            MAX_CALLS_BATCH_BYTES / (ITEM_LEN + 1000),
            "16 KiB of payload"
        );
        let reply = Header {
            kind: Kind::Reply,
            ..add
        };
        let mut reply = Outgoing::new(&reply, args.clone());
        assert!(!join_call(&mut reply, &add, &args, 1 << 20));
        let mut stream = Outgoing::new(
            &Header {
                flags: FLAG_NO_REPLY | 2,
                ..add
            },
            args.clone(),
        );
        assert!(!join_call(&mut stream, &add, &args, 1 << 20));
    }

    #[test]
    fn malformed_batch_requests_are_refused() {
        let flags = FLAG_NO_REPLY | FLAG_REQUEST_BATCH;
        let two = Bytes::from_static(b"\0\0\0\x01a\0\0\0\x01b");
        assert_eq!(batch_calls(flags, 2, two.clone()).map(|c| c.count()), Ok(2));
        assert!(
            batch_calls(flags, 3, two.clone()).is_err(),
            "a count that is not theirs"
        );
        assert!(
            batch_calls(flags, 0, two.clone()).is_err(),
            "a count of zero"
        );
        assert!(
            batch_calls(FLAG_REQUEST_BATCH, 2, two.clone()).is_err(),
            "wants a reply"
        );
        assert!(batch_calls(flags | 2, 2, two).is_err(), "another flag");
        let one = Bytes::from_static(b"\0\0\0\x01a");
        assert!(batch_calls(flags, 1, one).is_err(), "one call");
        assert!(batch_calls(flags, 0, Bytes::new()).is_err(), "no call");
        let past = Bytes::from_static(b"\0\0\0\x01a\0\0\0\x09b");
        assert!(
            batch_calls(flags, 2, past).is_err(),
            "a length past the end"
        );
        let garbage = Bytes::from_static(b"\xff\xff\xff\xff\x01\x02");
        assert!(batch_calls(flags, 2, garbage).is_err(), "garbage");
    }

    #[test]
    fn malformed_batches_are_refused() {
        assert!(split_batch(&Bytes::from_static(b"\0\0\0\x05ab")).is_err());
        assert!(split_batch(&Bytes::from_static(b"\0\0")).is_err());
        assert!(split_batch(&Bytes::from_static(b"\0\0\0\x01a")).is_err());
    }

    #[cfg(feature = "nats")]
    #[test]
    fn parts_join_into_their_item_and_misfits_are_refused() {
        let mut joining = None;
        let part = |b: &'static [u8]| Bytes::from_static(b);
        assert_eq!(Joining::join(&mut joining, part(b"ab"), 5), Ok(None));
        assert_eq!(Joining::join(&mut joining, part(b"cd"), 5), Ok(None));
        let whole = Joining::join(&mut joining, part(b"e"), 5);
        assert_eq!(whole, Ok(Some(part(b"abcde"))));
        assert!(joining.is_none());

        assert!(
            Joining::join(&mut None, part(b"abc"), 2).is_err(),
            "past its size"
        );
        assert!(Joining::join(&mut None, part(b""), 2).is_err(), "empty");
        let mut joining = None;
        assert_eq!(Joining::join(&mut joining, part(b"a"), 3), Ok(None));
        assert!(
            Joining::join(&mut joining, part(b"b"), 4).is_err(),
            "another size"
        );
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
