//! What every backend's streams share: the credit a receiver grants (items and bytes),
//! and the batches that carry several items in one message (see docs/PROTOCOL.md,
//! "Streams": a `StreamItem` with the `BATCH` flag).

use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use bytes::{Bytes, BytesMut};
use daffi_wire::frame::{
    FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY_BATCH, FLAG_REQUEST_BATCH, LEN_PREFIX,
};
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
/// [`MAX_CALLS_BATCH_BYTES`], lengths included, and the frame within `frame_limit`). A
/// lone request becomes a batch of two. `false`: `last` is left as it was.
pub fn join_call(
    last: &mut Outgoing,
    call: &Header<'_>,
    args: &Payload,
    frame_limit: usize,
) -> bool {
    let Some((flags, count)) = call.matches_head(last.head_bytes()) else {
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
    let body_len = payload_len(last);
    let framing = if batched { ITEM_LEN } else { 2 * ITEM_LEN };
    let new_len = body_len + framing + len;
    // Bounded by the payload, lengths included: a flood of tiny calls makes frames (and
    // buffers, on every hop) of at most 16 KiB.
    if new_len > MAX_CALLS_BATCH_BYTES
        || (!batched && body_len >= JOINED_CALL)
        || items >= u64::from(u32::MAX)
        || call.frame_len(new_len) - LEN_PREFIX > frame_limit
    {
        return false;
    }
    let grown = last.grow();
    if !batched {
        // The lone call's arguments become the batch's first item.
        let first = take_payload(grown.body, grown.tail);
        *grown.tail = BytesMut::with_capacity(FIRST_CAPACITY.max(2 * new_len));
        grown
            .tail
            .extend_from_slice(&(first.len() as u32).to_be_bytes());
        for part in first.parts() {
            grown.tail.extend_from_slice(part);
        }
    } else if grown.tail.capacity() == 0 {
        grown.tail.reserve(FIRST_CAPACITY.max(2 * (framing + len)));
    }
    grown.tail.extend_from_slice(&(len as u32).to_be_bytes());
    for part in args.parts() {
        grown.tail.extend_from_slice(part);
    }
    let flags = call.flags | FLAG_REQUEST_BATCH;
    patch_batch_head(grown.head, call, flags, items + 1, new_len);
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

/// Bytes in front of each call of a batch of calls that want replies: its call id
/// (`u64`) and the length of its arguments (`u32`).
pub const CALL_ITEM_HEAD: usize = 8 + ITEM_LEN;

/// Joins the call `call` (its request header, with its own call id, no flag: a call that
/// wants a reply) with arguments `args` to the request `last` still queued, if that is
/// such a call (or a batch of them, docs/PROTOCOL.md "Batches of calls that want
/// replies") to the same node and callback, with the same timeout, with room left (a
/// payload of at most [`MAX_CALLS_BATCH_BYTES`], heads included, and the frame within
/// `frame_limit`). A lone request becomes a batch of two. `false`: `last` is left as it
/// was.
pub fn join_call_with_reply(
    last: &mut Outgoing,
    call: &Header<'_>,
    args: &Payload,
    frame_limit: usize,
) -> bool {
    join_item(last, call, args, frame_limit, &CALLS)
}

/// How the items of one kind of batch (calls that want replies, or replies) are laid
/// out, and when one may join.
struct ItemLayout {
    /// The kind of frame the batch is.
    kind: Kind,
    /// The flags a lone item may carry into the batch (in its head).
    item_flags: u8,
    /// The flag that marks the frame a batch.
    batch_flag: u8,
    /// Bytes of each item's head.
    head: usize,
    /// An item joins only if smaller than this.
    joined_below: usize,
    /// A batch's payload stays within this, heads included.
    max_bytes: usize,
    /// Writes one item's head: call id, flags, length.
    put_head: fn(&mut BytesMut, u64, u8, usize),
}

/// Calls that want replies (docs/PROTOCOL.md "Batches of calls that want replies").
const CALLS: ItemLayout = ItemLayout {
    kind: Kind::Request,
    item_flags: 0,
    batch_flag: FLAG_REQUEST_BATCH,
    head: CALL_ITEM_HEAD,
    joined_below: JOINED_CALL,
    max_bytes: MAX_CALLS_BATCH_BYTES,
    put_head: put_call_head,
};

/// Replies (docs/PROTOCOL.md "Batches of replies").
const REPLIES: ItemLayout = ItemLayout {
    kind: Kind::Reply,
    item_flags: FLAG_ERROR,
    batch_flag: FLAG_REPLY_BATCH,
    head: REPLY_ITEM_HEAD,
    joined_below: JOINED_REPLY,
    max_bytes: MAX_REPLIES_BATCH_BYTES,
    put_head: put_reply_head,
};

/// Joins the item `header` (with its own call id) and `body` to the frame `last` still
/// queued, under `layout`'s rules: see [`join_call_with_reply`] and [`join_reply`].
fn join_item(
    last: &mut Outgoing,
    header: &Header<'_>,
    body: &Payload,
    frame_limit: usize,
    layout: &ItemLayout,
) -> bool {
    if header.kind != layout.kind || header.flags & !layout.item_flags != 0 {
        return false;
    }
    let Some((flags, id_or_count)) = header.matches_head(last.head_bytes()) else {
        return false;
    };
    let batched = flags == layout.batch_flag;
    let len = body.len();
    if (!batched && flags & !layout.item_flags != 0) || len >= layout.joined_below {
        return false;
    }
    let items = if batched { id_or_count } else { 1 };
    let body_len = payload_len(last);
    let framing = if batched {
        layout.head
    } else {
        2 * layout.head
    };
    let new_len = body_len + framing + len;
    if new_len > layout.max_bytes
        || (!batched && body_len >= layout.joined_below)
        || items >= u64::from(u32::MAX)
        || header.frame_len(new_len) - LEN_PREFIX > frame_limit
    {
        return false;
    }
    // The frame stays open while it waits: each item joined is copied once into its
    // tail, which leaves as the payload's last part (no buffer turned back into a
    // writable one, and frozen again, per item).
    let grown = last.grow();
    if !batched {
        // The lone item becomes the batch's first.
        let first = take_payload(grown.body, grown.tail);
        *grown.tail = BytesMut::with_capacity(BATCH_CAPACITY);
        (layout.put_head)(grown.tail, id_or_count, flags, first.len());
        for part in first.parts() {
            grown.tail.extend_from_slice(part);
        }
    } else if grown.tail.capacity() == 0 {
        grown.tail.reserve(BATCH_CAPACITY.max(framing + len));
    }
    (layout.put_head)(grown.tail, header.call_id, header.flags, len);
    for part in body.parts() {
        grown.tail.extend_from_slice(part);
    }
    patch_batch_head(grown.head, header, layout.batch_flag, items + 1, new_len);
    true
}

/// The payload's length of `frame` (whether or not it grows): its bytes after the head.
fn payload_len(frame: &Outgoing) -> usize {
    frame.len() - frame.head_bytes().len()
}

/// Takes the whole payload of a growing frame out: its parts, then its tail.
fn take_payload(body: &mut Payload, tail: &mut BytesMut) -> Payload {
    let mut first = std::mem::take(body);
    if !tail.is_empty() {
        first.push(std::mem::take(tail).freeze());
    }
    first
}

/// What a batch's buffer holds at first when two calls or replies start it: room for
/// a batch of small ones without growing.
const BATCH_CAPACITY: usize = 4 * 1024;

/// Writes the head of one call of a batch of calls that want replies.
/// (Calls carry no flags of their own: `_flags` is for [`ItemLayout::put_head`].)
pub fn put_call_head(buf: &mut BytesMut, call_id: u64, _flags: u8, len: usize) {
    buf.extend_from_slice(&call_id.to_be_bytes());
    // Below `JOINED_CALL` (or the frame limit, for a split batch): the caller checked.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
}

/// The calls of a batch request that wants replies (`flags` [`FLAG_REQUEST_BATCH`]
/// alone, `count` its `call_id`), checked whole; `Err` names what is wrong with a
/// malformed one: another flag, a call cut short, fewer than two calls, or a count that
/// is not theirs.
pub fn batch_requests(flags: u8, count: u64, payload: Bytes) -> Result<CallItems, String> {
    if flags != FLAG_REQUEST_BATCH {
        return Err(format!(
            "a batch of calls that want replies must carry BATCH and no other flag (flags {flags:#010b})"
        ));
    }
    let mut at = 0;
    let mut items = 0u64;
    while let Some((_, range)) = call_at(&payload, at)? {
        at = range.end;
        items += 1;
    }
    if items < 2 {
        return Err("a batch request holds fewer than two calls".to_string());
    }
    if items != count {
        return Err(format!(
            "a batch request says it holds {count} calls and holds {items}"
        ));
    }
    Ok(CallItems { payload, at: 0 })
}

/// The calls of a batch request that wants replies, checked ([`batch_requests`]): each
/// its call id and its arguments (a slice of the payload).
#[derive(Debug, Clone)]
pub struct CallItems {
    payload: Bytes,
    at: usize,
}

impl Iterator for CallItems {
    type Item = (u64, Bytes);

    fn next(&mut self) -> Option<(u64, Bytes)> {
        let (call_id, range) = call_at(&self.payload, self.at).ok()??;
        self.at = range.end;
        Some((call_id, self.payload.slice(range)))
    }
}

/// The call whose head is at `at` in `payload`: its id and where its arguments are;
/// `None` at its end, `Err` if it is cut short.
fn call_at(payload: &[u8], at: usize) -> Result<Option<(u64, Range<usize>)>, String> {
    if at >= payload.len() {
        return Ok(None);
    }
    let Some(head) = payload.get(at..at + CALL_ITEM_HEAD) else {
        return Err(format!(
            "a batch request's call head is cut short at byte {at}"
        ));
    };
    let call_id = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    let start = at + CALL_ITEM_HEAD;
    let end = start
        .checked_add(len)
        .filter(|end| *end <= payload.len())
        .ok_or_else(|| format!("a batch request's call of {len} bytes runs past its end"))?;
    Ok(Some((call_id, start..end)))
}

/// The call ids a batch request that wants replies gives, as far as its layout can be
/// read: for the controller, which answers each call of a batch it cannot deliver (a
/// malformed batch's calls that can be read are answered; the rest cannot be).
pub fn readable_call_ids(payload: &[u8]) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut at = 0;
    while let Ok(Some((call_id, range))) = call_at(payload, at) {
        ids.push(call_id);
        at = range.end;
    }
    ids
}

/// A reply that may join a batch reply: a result smaller than this (a larger one goes
/// alone, from its own memory).
pub const JOINED_REPLY: usize = COPIED_ITEM;

/// A batch reply's payload (each reply's call id, flags and length included) stays
/// within this, as a batch request's does ([`MAX_CALLS_BATCH_BYTES`]).
pub const MAX_REPLIES_BATCH_BYTES: usize = MAX_CALLS_BATCH_BYTES;

/// Bytes in front of each reply of a batch reply: its call id (`u64`), its flags (`u8`)
/// and its length (`u32`).
pub const REPLY_ITEM_HEAD: usize = 8 + 1 + ITEM_LEN;

/// Joins the reply `reply` (its header: a `Reply` with its own call id and flags) with
/// the result `body` to the frame `last` still queued, if that is a reply (or a batch of
/// them, docs/PROTOCOL.md "Batches of replies") from the same node to the same caller,
/// with room left (a payload of at most [`MAX_REPLIES_BATCH_BYTES`], each reply's head
/// included, and the frame within `frame_limit`). A lone reply becomes a batch of two.
/// `false`: `last` is left as it was.
pub fn join_reply(
    last: &mut Outgoing,
    reply: &Header<'_>,
    body: &Payload,
    frame_limit: usize,
) -> bool {
    join_item(last, reply, body, frame_limit, &REPLIES)
}

/// Gives the head of a queued frame that grew into a batch of `items` with a payload
/// of `payload_len` bytes its new length, `flags` and count (in `call_id`), in place.
fn patch_batch_head(
    head: &mut BytesMut,
    header: &Header<'_>,
    flags: u8,
    items: u64,
    payload_len: usize,
) {
    if !Header::patch_head(head, payload_len, flags, items) {
        // Never taken (the head matched a whole header, the frame is within the limit);
        // encoded afresh, the frame stays valid whatever happens.
        let fresh = Header {
            flags,
            call_id: items,
            ..*header
        }
        .encode(payload_len);
        head.clear();
        head.extend_from_slice(&fresh);
    }
}

/// Writes the head of one reply of a batch reply.
pub fn put_reply_head(buf: &mut BytesMut, call_id: u64, flags: u8, len: usize) {
    buf.extend_from_slice(&call_id.to_be_bytes());
    buf.extend_from_slice(&[flags]);
    // Below `JOINED_REPLY` (or the frame limit, for a split batch): the caller checked.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
}

/// One reply of a batch reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyItem {
    /// The call it answers.
    pub call_id: u64,
    /// Whether `payload` is a `RemoteError`, not a value.
    pub error: bool,
    /// The result (a slice of the batch's payload).
    pub payload: Bytes,
}

/// The replies of a batch reply (`flags` [`FLAG_REPLY_BATCH`], `count` its `call_id`),
/// checked whole when it arrives, then read one by one as slices of its payload. `Err`
/// names what is wrong with a malformed one: another flag, a reply cut short or with
/// flags other than `ERROR`, fewer than two replies, or a count that is not theirs.
pub fn batch_replies(flags: u8, count: u64, payload: Bytes) -> Result<ReplyItems, String> {
    if flags != FLAG_REPLY_BATCH {
        return Err(format!(
            "a batch reply must carry BATCH and no other flag (flags {flags:#010b})"
        ));
    }
    let mut at = 0;
    let mut items = 0u64;
    while let Some(item) = reply_at(&payload, at)? {
        at = item.payload.end;
        items += 1;
    }
    if items < 2 {
        return Err("a batch reply holds fewer than two replies".to_string());
    }
    if items != count {
        return Err(format!(
            "a batch reply says it holds {count} replies and holds {items}"
        ));
    }
    Ok(ReplyItems {
        payload,
        at: 0,
        left: items as usize,
    })
}

/// The replies of a batch reply, checked ([`batch_replies`]).
#[derive(Debug, Clone)]
pub struct ReplyItems {
    payload: Bytes,
    at: usize,
    /// Replies not yet taken (for `size_hint`: what takes them sizes its lists once).
    left: usize,
}

impl Iterator for ReplyItems {
    type Item = ReplyItem;

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }

    fn next(&mut self) -> Option<ReplyItem> {
        let item = reply_at(&self.payload, self.at).ok()??;
        self.at = item.payload.end;
        self.left = self.left.saturating_sub(1);
        Some(ReplyItem {
            call_id: item.call_id,
            error: item.error,
            payload: self.payload.slice(item.payload),
        })
    }
}

/// Where one reply of a batch reply is.
struct ReplyAt {
    call_id: u64,
    error: bool,
    payload: Range<usize>,
}

/// The reply whose head is at `at` in `payload`; `None` at its end, `Err` if it is cut
/// short or its flags are not `ERROR` or none.
fn reply_at(payload: &[u8], at: usize) -> Result<Option<ReplyAt>, String> {
    if at >= payload.len() {
        return Ok(None);
    }
    let Some(head) = payload.get(at..at + REPLY_ITEM_HEAD) else {
        return Err(format!(
            "a batch reply's item head is cut short at byte {at}"
        ));
    };
    let call_id = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    let flags = head[8];
    if flags & !FLAG_ERROR != 0 {
        return Err(format!(
            "a batch reply's item carries flags {flags:#010b} (only ERROR is allowed)"
        ));
    }
    let len = u32::from_be_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
    let start = at + REPLY_ITEM_HEAD;
    let end = start
        .checked_add(len)
        .filter(|end| *end <= payload.len())
        .ok_or_else(|| format!("a batch reply's item of {len} bytes runs past its end"))?;
    Ok(Some(ReplyAt {
        call_id,
        error: flags & FLAG_ERROR != 0,
        payload: start..end,
    }))
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

    fn reply_to(caller: &str, call_id: u64, flags: u8) -> Header<'static> {
        Header {
            kind: Kind::Reply,
            flags,
            call_id,
            timeout_ms: 0,
            src: "callee",
            dst: Box::leak(caller.to_string().into_boxed_str()),
            name: "",
        }
    }

    #[test]
    fn replies_join_a_queued_reply_to_the_same_caller_only() {
        let result = |n: u8| Payload::from(Bytes::from(vec![n; usize::from(n)]));
        let mut last = Outgoing::new(&reply_to("a", 7, FLAG_ERROR), result(1));
        assert!(join_reply(
            &mut last,
            &reply_to("a", 9, 0),
            &result(2),
            1 << 20
        ));
        assert!(join_reply(
            &mut last,
            &reply_to("a", 3, FLAG_ERROR),
            &result(3),
            1 << 20
        ));
        assert!(
            !join_reply(&mut last, &reply_to("b", 4, 0), &result(4), 1 << 20),
            "another caller"
        );
        let request = Header {
            kind: Kind::Request,
            ..reply_to("a", 4, 0)
        };
        assert!(
            !join_reply(&mut last, &request, &result(4), 1 << 20),
            "not a reply"
        );
        let mut queued_request = Outgoing::new(&request, result(4));
        assert!(
            !join_reply(
                &mut queued_request,
                &reply_to("a", 4, 0),
                &result(4),
                1 << 20
            ),
            "a reply never joins a request"
        );
        let large = Payload::from(Bytes::from(vec![0u8; JOINED_REPLY]));
        assert!(
            !join_reply(&mut last, &reply_to("a", 4, 0), &large, 1 << 20),
            "large results go alone"
        );
        assert!(
            !join_reply(&mut last, &reply_to("a", 4, 0), &result(4), 40),
            "past the frame limit"
        );

        let frame = parsed(&last);
        assert_eq!(frame.kind(), Kind::Reply);
        assert_eq!(frame.flags(), FLAG_REPLY_BATCH);
        assert_eq!(
            (frame.call_id(), frame.src(), frame.dst()),
            (3, "callee", "a")
        );
        let replies: Vec<ReplyItem> =
            batch_replies(frame.flags(), frame.call_id(), frame.payload())
                .expect("a valid batch")
                .collect();
        let expected: Vec<ReplyItem> = [(7, true, 1), (9, false, 2), (3, true, 3)]
            .into_iter()
            .map(|(call_id, error, n)| ReplyItem {
                call_id,
                error,
                payload: result(n).into_bytes(),
            })
            .collect();
        assert_eq!(replies, expected, "in order, each with its call and flags");
    }

    #[test]
    fn a_batch_of_replies_closes_at_its_size() {
        let body = Payload::from(Bytes::from(vec![1u8; 1000]));
        let mut last = Outgoing::new(&reply_to("a", 1, 0), body.clone());
        let mut joined = 1;
        while join_reply(&mut last, &reply_to("a", joined + 1, 0), &body, 1 << 20) {
            joined += 1;
        }
        assert_eq!(
            joined as usize,
            MAX_REPLIES_BATCH_BYTES / (REPLY_ITEM_HEAD + 1000),
            "16 KiB of payload"
        );
    }

    /// A batch reply's payload, made by hand: (call id, flags, payload) each.
    fn replies_payload(items: &[(u64, u8, &[u8])]) -> Bytes {
        let mut buf = Vec::new();
        for (id, flags, payload) in items {
            buf.extend_from_slice(&id.to_be_bytes());
            buf.push(*flags);
            buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            buf.extend_from_slice(payload);
        }
        buf.into()
    }

    #[test]
    fn malformed_batch_replies_are_refused() {
        let two = replies_payload(&[(1, 0, b"a"), (2, FLAG_ERROR, b"b")]);
        assert_eq!(
            batch_replies(FLAG_REPLY_BATCH, 2, two.clone()).map(|r| r.count()),
            Ok(2)
        );
        assert!(
            batch_replies(FLAG_REPLY_BATCH, 3, two.clone()).is_err(),
            "count"
        );
        assert!(
            batch_replies(FLAG_REPLY_BATCH, 0, two.clone()).is_err(),
            "zero"
        );
        assert!(
            batch_replies(FLAG_REPLY_BATCH, u64::MAX, two.clone()).is_err(),
            "huge"
        );
        assert!(
            batch_replies(FLAG_REPLY_BATCH | FLAG_ERROR, 2, two.clone()).is_err(),
            "another flag"
        );
        let one = replies_payload(&[(1, 0, b"a")]);
        assert!(
            batch_replies(FLAG_REPLY_BATCH, 1, one).is_err(),
            "one reply"
        );
        assert!(
            batch_replies(FLAG_REPLY_BATCH, 0, Bytes::new()).is_err(),
            "none"
        );
        let odd_flags = replies_payload(&[(1, 0, b"a"), (2, 0b10, b"b")]);
        assert!(
            batch_replies(FLAG_REPLY_BATCH, 2, odd_flags).is_err(),
            "an item's flags"
        );
        let mut past = two.to_vec();
        let at = past.len() - 1 - 4;
        past[at..at + 4].copy_from_slice(&9u32.to_be_bytes());
        assert!(
            batch_replies(FLAG_REPLY_BATCH, 2, past.into()).is_err(),
            "a length past the end"
        );
        let cut = two.slice(..two.len() - 3);
        assert!(
            batch_replies(FLAG_REPLY_BATCH, 2, cut).is_err(),
            "cut short"
        );
        let huge_len = replies_payload(&[(1, 0, b"a"), (2, 0, b"")]);
        let mut huge_len = huge_len.to_vec();
        let at = huge_len.len() - 4;
        huge_len[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(batch_replies(FLAG_REPLY_BATCH, 2, huge_len.into()).is_err());
    }

    #[test]
    fn calls_that_want_replies_join_a_queued_one_to_the_same_node_callback_and_timeout() {
        let args = |n: u8| Payload::from(Bytes::from(vec![n; usize::from(n)]));
        let with_id = |id: u64| Header {
            flags: 0,
            call_id: id,
            ..call("b", "add")
        };
        let mut last = Outgoing::new(&with_id(11), args(1));
        for (id, n) in [(12, 2), (13, 3)] {
            assert!(join_call_with_reply(
                &mut last,
                &with_id(id),
                &args(n),
                1 << 20
            ));
        }
        let no_return = call("b", "add");
        assert!(
            !join_call_with_reply(&mut last, &no_return, &args(4), 1 << 20),
            "a NO_RETURN call"
        );
        assert!(
            !join_call(&mut last, &no_return, &args(4), 1 << 20),
            "a NO_RETURN call never joins calls that want replies"
        );
        let other = Header {
            call_id: 14,
            ..with_id(14)
        };
        let mut timed = other;
        timed.timeout_ms = 9;
        assert!(
            !join_call_with_reply(&mut last, &timed, &args(4), 1 << 20),
            "timeout"
        );
        let elsewhere = Header { dst: "c", ..other };
        assert!(
            !join_call_with_reply(&mut last, &elsewhere, &args(4), 1 << 20),
            "node"
        );
        let large = Payload::from(Bytes::from(vec![0u8; JOINED_CALL]));
        assert!(
            !join_call_with_reply(&mut last, &other, &large, 1 << 20),
            "large"
        );
        let mut lone_no_return = Outgoing::new(&no_return, args(1));
        assert!(
            !join_call_with_reply(&mut lone_no_return, &other, &args(4), 1 << 20),
            "never joins a NO_RETURN request"
        );

        let frame = parsed(&last);
        assert_eq!(frame.flags(), FLAG_REQUEST_BATCH);
        assert_eq!(
            (frame.call_id(), frame.dst(), frame.name()),
            (3, "b", "add")
        );
        let calls: Vec<(u64, Bytes)> =
            batch_requests(frame.flags(), frame.call_id(), frame.payload())
                .expect("a valid batch")
                .collect();
        let expected: Vec<(u64, Bytes)> = [(11, 1), (12, 2), (13, 3)]
            .into_iter()
            .map(|(id, n)| (id, args(n).into_bytes()))
            .collect();
        assert_eq!(calls, expected, "in order, each with its call id");
        assert_eq!(readable_call_ids(&frame.payload()), vec![11, 12, 13]);
    }

    #[test]
    fn malformed_batches_of_calls_that_want_replies_are_refused() {
        let item = |id: u64, args: &[u8]| {
            let mut v = id.to_be_bytes().to_vec();
            v.extend_from_slice(&(args.len() as u32).to_be_bytes());
            v.extend_from_slice(args);
            v
        };
        let two: Bytes = [item(1, b"a"), item(2, b"bc")].concat().into();
        assert_eq!(
            batch_requests(FLAG_REQUEST_BATCH, 2, two.clone()).map(|c| c.count()),
            Ok(2)
        );
        for (flags, count, what) in [
            (FLAG_REQUEST_BATCH, 3, "count"),
            (FLAG_REQUEST_BATCH, 0, "zero"),
            (FLAG_REQUEST_BATCH, u64::MAX, "huge"),
            (FLAG_REQUEST_BATCH | 0b10, 2, "STREAM"),
            (FLAG_REQUEST_BATCH | 0b100, 2, "INCOMING"),
            (FLAG_REQUEST_BATCH | FLAG_NO_REPLY, 2, "NO_RETURN layout"),
        ] {
            assert!(batch_requests(flags, count, two.clone()).is_err(), "{what}");
        }
        let one: Bytes = item(1, b"a").into();
        assert!(batch_requests(FLAG_REQUEST_BATCH, 1, one).is_err(), "one");
        let cut = two.slice(..two.len() - 1);
        assert!(
            batch_requests(FLAG_REQUEST_BATCH, 2, cut.clone()).is_err(),
            "cut"
        );
        assert_eq!(
            readable_call_ids(&cut),
            vec![1],
            "the calls that can be read"
        );
        let mut past = two.to_vec();
        past[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(batch_requests(FLAG_REQUEST_BATCH, 2, past.clone().into()).is_err());
        assert_eq!(readable_call_ids(&past), Vec::<u64>::new());
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
