//! Frames: a length prefix, a small fixed routing header, and an opaque payload.
//!
//! The layout is documented in `docs/PROTOCOL.md`. The controller parses only the header
//! ([`Frame::parse`] borrows the payload, it never decodes it) and forwards the raw bytes.

use bytes::{Bytes, BytesMut};

use crate::reader::KeptBuffer;
use crate::small;

/// Longest process name the header can carry.
pub const MAX_PROCESS_NAME: usize = u8::MAX as usize;
/// Longest callback name the header can carry.
pub const MAX_CALLBACK_NAME: usize = u16::MAX as usize;

/// Bytes of the length prefix in front of every frame.
pub const LEN_PREFIX: usize = 4;
/// Bytes of the fixed part of the header (kind, flags, call id, timeout, three lengths).
pub const FIXED_HEADER: usize = 1 + 1 + 8 + 4 + 1 + 1 + 2;

/// What a frame carries. Values are stable wire constants; a new protocol version may
/// add kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum Kind {
    /// Node -> controller: first frame of a connection.
    Hello = 1,
    /// Controller -> node: the handshake succeeded; carries the current members.
    Welcome = 2,
    /// Controller -> node: the handshake failed; the connection closes next.
    Refused = 3,
    /// Node -> controller: the full list of callbacks this node serves now.
    Announce = 4,
    /// Controller -> node: a node joined, changed its callbacks, or left.
    Membership = 5,
    /// Node -> controller: the node leaves on purpose.
    Goodbye = 6,
    /// Node -> controller: a request the controller itself answers (schedules, listings).
    ControlRequest = 7,
    /// Controller -> node: the answer to a `ControlRequest`, same call id.
    ControlReply = 8,
    /// Node -> controller: the node is stopping; route no new requests to it. Its
    /// replies still flow until its `Goodbye`.
    Leaving = 9,
    /// Controller -> node: a scheduled task was added or ended.
    Schedule = 10,
    /// Node -> node: run a callback.
    Request = 16,
    /// Node -> node: the result of a request.
    Reply = 17,
    /// Controller -> node: a request could not be delivered.
    Undeliverable = 18,
    /// Node -> node: one item of a stream, or a batch of them under [`FLAG_BATCH`], from
    /// the callee (keyed by the request's call id).
    StreamItem = 19,
    /// Node -> node: the callee's stream ended, with an error under `FLAG_ERROR`.
    StreamEnd = 20,
    /// Node -> node: the caller grants the callee more items (`[items, bytes]`).
    StreamCredit = 21,
    /// Node -> node: the caller dropped the stream; the callee stops producing.
    StreamCancel = 22,
}

impl Kind {
    /// Whether the frame belongs to a call between two nodes, which the controller
    /// forwards by destination without decoding (requests, replies, stream frames).
    pub fn is_node_to_node(self) -> bool {
        matches!(
            self,
            Kind::Request
                | Kind::Reply
                | Kind::StreamItem
                | Kind::StreamEnd
                | Kind::StreamCredit
                | Kind::StreamCancel
        )
    }
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Refused,
            4 => Kind::Announce,
            5 => Kind::Membership,
            6 => Kind::Goodbye,
            7 => Kind::ControlRequest,
            8 => Kind::ControlReply,
            9 => Kind::Leaving,
            10 => Kind::Schedule,
            16 => Kind::Request,
            17 => Kind::Reply,
            18 => Kind::Undeliverable,
            19 => Kind::StreamItem,
            20 => Kind::StreamEnd,
            21 => Kind::StreamCredit,
            22 => Kind::StreamCancel,
            _ => return None,
        })
    }
}

/// `Request` flag: the caller wants no reply.
pub const FLAG_NO_REPLY: u8 = 0b0000_0001;
/// `Request` flag: the caller wants a stream of items (`StreamItem` frames, then a
/// `StreamEnd`), not one `Reply`.
pub const FLAG_STREAM: u8 = 0b0000_0010;
/// `Request` flag: the caller feeds the callee a stream of arguments (`StreamItem` and
/// `StreamEnd` frames with [`FLAG_ARGUMENTS`]), read as the callback's `Incoming`.
pub const FLAG_INCOMING: u8 = 0b0000_0100;
/// Stream frame flag: the frame belongs to the arguments a caller streams to its callee
/// (items and end from the caller, credit and cancel from the callee), not to the
/// results the callee streams back.
pub const FLAG_ARGUMENTS: u8 = 0b0000_0010;
/// `StreamItem` flag: the payload is a batch of items, each a `u32` length (big-endian)
/// and its bytes, rather than one item.
pub const FLAG_BATCH: u8 = 0b0000_0100;
/// `Request` flag, only with [`FLAG_NO_REPLY`]: the payload is a batch of calls to the
/// same callback, each call's arguments a `u32` length (big-endian) and its bytes, laid
/// out as a `StreamItem` batch; `call_id` holds how many (two or more).
pub const FLAG_REQUEST_BATCH: u8 = 0b0000_1000;
/// `Reply`, `StreamEnd` and `ControlReply` flag: the payload is an error, not a value.
pub const FLAG_ERROR: u8 = 0b0000_0001;
/// `Reply` flag, alone: the payload is a batch of replies from one callee to one caller,
/// each a `u64` call id, a `u8` of flags ([`FLAG_ERROR`] or none), a `u32` length (all
/// big-endian) and its bytes; `call_id` holds how many (two or more).
pub const FLAG_REPLY_BATCH: u8 = 0b0000_1000;

/// Why bytes off the wire are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the configured limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Announced size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The frame is shorter than its header says.
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    /// The kind byte is not one this version knows.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A name in the header is not UTF-8.
    #[error("header field `{0}` is not valid UTF-8")]
    NotUtf8(&'static str),
}

/// Whether `a` and `b` hold the same bytes: short ones (names, most of them) with a
/// few word loads rather than a call to `memcmp`, which costs more than the compare.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().expect("8"));
    let half = |s: &[u8], at: usize| u32::from_ne_bytes(s[at..at + 4].try_into().expect("4"));
    match n {
        // Two loads that overlap cover every byte.
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        0..=3 => a.iter().zip(b).all(|(x, y)| x == y),
        _ => a == b,
    }
}

/// The routing fields of a frame, for encoding.
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    /// What the frame carries.
    pub kind: Kind,
    /// Kind-specific flags.
    pub flags: u8,
    /// Correlates a request with its reply; chosen by the caller, unique per caller.
    pub call_id: u64,
    /// Milliseconds the caller still waits; 0 means no limit.
    pub timeout_ms: u32,
    /// Process name of the sender (checked by the controller).
    pub src: &'a str,
    /// Process name of the receiver; empty for frames to the controller.
    pub dst: &'a str,
    /// Callback name for requests; empty otherwise.
    pub name: &'a str,
}

impl<'a> Header<'a> {
    /// A header for a control frame between a node and the controller.
    pub fn control(kind: Kind) -> Header<'static> {
        Header {
            kind,
            flags: 0,
            call_id: 0,
            timeout_ms: 0,
            src: "",
            dst: "",
            name: "",
        }
    }

    /// Size of the encoded frame (prefix included) for a payload of `payload_len` bytes.
    pub fn frame_len(&self, payload_len: usize) -> usize {
        LEN_PREFIX + FIXED_HEADER + self.src.len() + self.dst.len() + self.name.len() + payload_len
    }

    /// Encodes the length prefix and the header; the payload follows as separate bytes.
    ///
    /// Names longer than their length fields (255 bytes for process names, 65,535 for
    /// callback names) are rejected earlier, where the user gives them.
    pub fn encode(&self, payload_len: usize) -> Bytes {
        let total = self.frame_len(payload_len);
        let len = total - payload_len;
        // Cut from this thread's buffer of small strings when short (most headers).
        if let Some(head) = small::cut(len, |buf| self.write_to(buf, total)) {
            return head;
        }
        let mut buf = BytesMut::with_capacity(len);
        self.write_to(&mut buf, total);
        buf.freeze()
    }

    /// The flags and `call_id` encoded in `head` (a length prefix and a header, nothing
    /// after the names: an [`Outgoing`](crate::Outgoing)'s head as
    /// [`encode`](Self::encode) made it), if it encodes this header but for its length
    /// prefix, flags and `call_id`; `None` otherwise (another header, or not a head).
    /// Compares bytes: nothing is decoded.
    pub fn matches_head(&self, head: &[u8]) -> Option<(u8, u64)> {
        if head.len() != self.frame_len(0) {
            return None;
        }
        let ours = self.fixed_part(head.len());
        let (src, rest) = head[NAMES_START..].split_at(self.src.len());
        let (dst, name) = rest.split_at(self.dst.len());
        let same = head[4] == ours[4]
            && same_bytes(&head[14..NAMES_START], &ours[14..])
            && same_bytes(name, self.name.as_bytes())
            && same_bytes(dst, self.dst.as_bytes())
            && same_bytes(src, self.src.as_bytes());
        same.then(|| {
            (
                head[5],
                u64::from_be_bytes(head[6..14].try_into().expect("8 bytes")),
            )
        })
    }

    /// Rewrites, in `head` (an encoded length prefix and header), the length prefix for
    /// a payload of `payload_len` bytes, the flags and the `call_id`: a queued frame
    /// that grew (see [`matches_head`](Self::matches_head)), changed without encoding
    /// its names again. `false` (nothing changed) if `head` is shorter than a header or
    /// the frame would pass 4 GiB.
    pub fn patch_head(head: &mut [u8], payload_len: usize, flags: u8, call_id: u64) -> bool {
        let Some(len) = (head.len() + payload_len)
            .checked_sub(LEN_PREFIX)
            .and_then(|len| u32::try_from(len).ok())
        else {
            return false;
        };
        if head.len() < NAMES_START {
            return false;
        }
        head[0..4].copy_from_slice(&len.to_be_bytes());
        head[5] = flags;
        head[6..14].copy_from_slice(&call_id.to_be_bytes());
        true
    }

    /// Appends the length prefix (for a frame of `total` bytes) and the header.
    fn write_to(&self, buf: &mut BytesMut, total: usize) {
        buf.extend_from_slice(&self.fixed_part(total));
        buf.extend_from_slice(self.src.as_bytes());
        buf.extend_from_slice(self.dst.as_bytes());
        buf.extend_from_slice(self.name.as_bytes());
    }

    /// The length prefix and the fixed part of the header, for a frame of `total` bytes.
    fn fixed_part(&self, total: usize) -> [u8; LEN_PREFIX + FIXED_HEADER] {
        let mut b = [0u8; LEN_PREFIX + FIXED_HEADER];
        b[0..4].copy_from_slice(&((total - LEN_PREFIX) as u32).to_be_bytes());
        b[4] = self.kind as u8;
        b[5] = self.flags;
        b[6..14].copy_from_slice(&self.call_id.to_be_bytes());
        b[14..18].copy_from_slice(&self.timeout_ms.to_be_bytes());
        b[18] = self.src.len() as u8;
        b[19] = self.dst.len() as u8;
        b[20..22].copy_from_slice(&(self.name.len() as u16).to_be_bytes());
        b
    }
}

/// A frame read off the wire: the raw bytes (prefix included) and where each field is.
#[derive(Debug, Clone)]
pub struct Frame {
    raw: Bytes,
    kind: Kind,
    flags: u8,
    call_id: u64,
    timeout_ms: u32,
    src_end: usize,
    dst_end: usize,
    name_end: usize,
    /// The reader's hold on `raw`'s buffer, if it keeps it for the next large frame.
    kept: Option<KeptBuffer>,
}

const NAMES_START: usize = LEN_PREFIX + FIXED_HEADER;

/// The receiver's name, as bytes, of the frame `raw` starts with, read from its header
/// alone (nothing is checked): to tell where the next buffered frame goes before it is
/// parsed. `None` if the header is not all there.
pub fn peek_dst(raw: &[u8]) -> Option<&[u8]> {
    let header = raw.get(..NAMES_START)?;
    let src_end = NAMES_START + header[18] as usize;
    raw.get(src_end..src_end + header[19] as usize)
}

impl Frame {
    /// Parses a complete frame, length prefix included. Validates lengths and UTF-8 of
    /// the names; never looks into the payload.
    pub fn parse(raw: Bytes) -> Result<Frame, FrameError> {
        if raw.len() < NAMES_START {
            return Err(FrameError::Truncated("shorter than the fixed header"));
        }
        let b = &raw[..];
        let announced = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if announced != raw.len() - LEN_PREFIX {
            return Err(FrameError::Truncated(
                "length prefix does not match the frame",
            ));
        }
        let kind = Kind::from_u8(b[4]).ok_or(FrameError::UnknownKind(b[4]))?;
        let flags = b[5];
        let call_id = u64::from_be_bytes(b[6..14].try_into().expect("8 bytes"));
        let timeout_ms = u32::from_be_bytes(b[14..18].try_into().expect("4 bytes"));
        let src_len = b[18] as usize;
        let dst_len = b[19] as usize;
        let name_len = u16::from_be_bytes([b[20], b[21]]) as usize;
        let src_end = NAMES_START + src_len;
        let dst_end = src_end + dst_len;
        let name_end = dst_end + name_len;
        if name_end > raw.len() {
            return Err(FrameError::Truncated("names run past the end of the frame"));
        }
        // The three names are checked in one pass; each one is then valid UTF-8 if no
        // character straddles the places where they meet. Names are nearly always ASCII,
        // which a check a word at a time settles (every place is then a boundary): a
        // third of the cost of the UTF-8 check on names this short, for every frame
        // read by every process.
        let names = &b[NAMES_START..name_end];
        let names_valid = names.is_ascii()
            || std::str::from_utf8(names).is_ok_and(|names| {
                names.is_char_boundary(src_len) && names.is_char_boundary(src_len + dst_len)
            });
        if !names_valid {
            let field = [
                ("src", NAMES_START..src_end),
                ("dst", src_end..dst_end),
                ("name", dst_end..name_end),
            ]
            .into_iter()
            .find(|(_, range)| std::str::from_utf8(&b[range.clone()]).is_err())
            .map_or("name", |(field, _)| field);
            return Err(FrameError::NotUtf8(field));
        }
        Ok(Frame {
            raw,
            kind,
            flags,
            call_id,
            timeout_ms,
            src_end,
            dst_end,
            name_end,
            kept: None,
        })
    }

    /// The frame, noted as read into a buffer its reader keeps.
    pub(crate) fn kept_by_reader(mut self, kept: KeptBuffer) -> Frame {
        self.kept = Some(kept);
        self
    }

    /// What the frame carries.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// Kind-specific flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }
    /// The caller's correlation id.
    pub fn call_id(&self) -> u64 {
        self.call_id
    }
    /// Milliseconds the caller still waits; 0 means no limit.
    pub fn timeout_ms(&self) -> u32 {
        self.timeout_ms
    }
    /// The sender's process name.
    pub fn src(&self) -> &str {
        self.str_at(NAMES_START, self.src_end)
    }
    /// The receiver's process name.
    pub fn dst(&self) -> &str {
        self.str_at(self.src_end, self.dst_end)
    }
    /// The callback name (requests) or empty.
    pub fn name(&self) -> &str {
        self.str_at(self.dst_end, self.name_end)
    }
    /// The payload, sharing the frame's memory.
    pub fn payload(&self) -> Bytes {
        self.raw.slice(self.name_end..)
    }
    /// The payload, and the reader's hold on its buffer if it keeps one: for a payload
    /// that may be taken over without a copy once the hold ends (the frame's own share
    /// of the buffer is gone with it).
    pub fn into_payload(self) -> (Bytes, Option<KeptBuffer>) {
        (self.raw.slice(self.name_end..), self.kept)
    }
    /// Hands the payload over as [`into_payload`](Self::into_payload) does, keeping the
    /// frame's head: the frame is then its head alone (copied into a buffer of its own,
    /// with an empty payload and the length prefix to match), so the payload's buffer
    /// is held by the payload and the reader's hold only. For a request whose large
    /// argument may be taken over while its names are still needed for the reply.
    pub fn take_payload(&mut self) -> (Bytes, Option<KeptBuffer>) {
        let head_len = u32::try_from(self.name_end - LEN_PREFIX).unwrap_or(u32::MAX);
        let mut head = BytesMut::with_capacity(self.name_end);
        head.extend_from_slice(&head_len.to_be_bytes());
        head.extend_from_slice(&self.raw[LEN_PREFIX..self.name_end]);
        let raw = std::mem::replace(&mut self.raw, head.freeze());
        (raw.slice(self.name_end..), self.kept.take())
    }
    /// The whole frame as it came off the wire, length prefix included.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    fn str_at(&self, start: usize, end: usize) -> &str {
        let bytes = &self.raw[start..end];
        // SAFETY: `parse` checked that each name range (the only ranges passed here) is
        // valid UTF-8, and `raw` never changes. The controller reads the names of every
        // frame it routes; checking them again on each read showed in its profile.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_agrees_with_slice_equality_at_every_length() {
        let base: Vec<u8> = (0..40u8).collect();
        for n in 0..40 {
            let a = &base[..n];
            assert!(same_bytes(a, a), "{n}");
            for at in 0..n {
                let mut other = a.to_vec();
                other[at] ^= 0x40;
                assert!(!same_bytes(a, &other), "{n}, byte {at}");
            }
            assert!(!same_bytes(a, &base[..n + 1]), "{n} against {}", n + 1);
        }
    }

    /// The header of [`sample`]'s frame.
    fn sample_header() -> Header<'static> {
        Header {
            kind: Kind::Request,
            flags: FLAG_NO_REPLY,
            call_id: 42,
            timeout_ms: 1500,
            src: "proc1",
            dst: "proc2",
            name: "func3",
        }
    }

    fn sample() -> (Bytes, Bytes) {
        let payload = Bytes::from_static(b"\x92\x04\x06");
        (sample_header().encode(payload.len()), payload)
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let (head, payload) = sample();
        let mut raw = BytesMut::from(&head[..]);
        raw.extend_from_slice(&payload);
        let f = Frame::parse(raw.freeze()).expect("valid frame");
        assert_eq!(f.kind(), Kind::Request);
        assert_eq!(f.flags(), FLAG_NO_REPLY);
        assert_eq!(f.call_id(), 42);
        assert_eq!(f.timeout_ms(), 1500);
        assert_eq!((f.src(), f.dst(), f.name()), ("proc1", "proc2", "func3"));
        assert_eq!(f.payload(), payload);
    }

    #[test]
    fn a_payload_taken_leaves_the_head_whole_and_the_buffer_to_the_payload() {
        let head = sample_header().encode(1000);
        let mut raw = BytesMut::from(&head[..]);
        raw.extend_from_slice(&[7u8; 1000]);
        let mut f = Frame::parse(raw.freeze()).expect("valid frame");
        let (payload, kept) = f.take_payload();
        assert!(kept.is_none());
        assert_eq!(&payload[..], &[7u8; 1000][..]);
        // Nothing but the payload holds its buffer: it is taken over, not copied.
        let at = payload.as_ptr();
        let taken = Vec::from(payload);
        assert_eq!(
            taken.as_ptr().wrapping_add(head.len()),
            at,
            "moved in place"
        );
        assert_eq!(taken, vec![7u8; 1000]);
        // The head alone is a valid frame with the same fields and no payload.
        assert_eq!((f.src(), f.dst(), f.name()), ("proc1", "proc2", "func3"));
        assert_eq!(
            (f.call_id(), f.timeout_ms(), f.flags()),
            (42, 1500, FLAG_NO_REPLY)
        );
        assert!(f.payload().is_empty());
        let again = Frame::parse(f.raw().clone()).expect("the head is a frame");
        assert_eq!(again.name(), "func3");
    }

    /// A request frame whose three names are the given bytes (maybe not UTF-8).
    fn with_names(src: &[u8], dst: &[u8], name: &[u8]) -> Bytes {
        let h = Header {
            kind: Kind::Request,
            flags: 0,
            call_id: 1,
            timeout_ms: 0,
            src: "",
            dst: "",
            name: "",
        };
        let total = h.frame_len(0) + src.len() + dst.len() + name.len();
        let mut fixed = h.fixed_part(total);
        fixed[18] = src.len() as u8;
        fixed[19] = dst.len() as u8;
        fixed[20..22].copy_from_slice(&(name.len() as u16).to_be_bytes());
        let mut raw = BytesMut::from(&fixed[..]);
        raw.extend_from_slice(src);
        raw.extend_from_slice(dst);
        raw.extend_from_slice(name);
        raw.freeze()
    }

    #[test]
    fn the_receiver_can_be_read_from_the_header_alone() {
        let (head, _) = sample();
        assert_eq!(peek_dst(&head), Some(&b"proc2"[..]));
        // Up to the receiver's name is enough; less is not.
        let dst_end = NAMES_START + "proc1proc2".len();
        assert_eq!(peek_dst(&head[..dst_end]), Some(&b"proc2"[..]));
        assert_eq!(peek_dst(&head[..dst_end - 1]), None);
        assert_eq!(peek_dst(&head[..10]), None);
    }

    #[test]
    fn names_beyond_ascii_are_read_back_whole() {
        let f = Frame::parse(with_names(
            "é".as_bytes(),
            "ü".as_bytes(),
            "名前".as_bytes(),
        ))
        .expect("valid frame");
        assert_eq!((f.src(), f.dst(), f.name()), ("é", "ü", "名前"));
    }

    #[test]
    fn a_name_that_is_not_utf8_is_refused_and_named() {
        let bad = [0xff];
        for (frame, field) in [
            (with_names(&bad, b"b", b"c"), "src"),
            (with_names(b"a", &bad, b"c"), "dst"),
            (with_names(b"a", b"b", &bad), "name"),
        ] {
            assert_eq!(Frame::parse(frame).unwrap_err(), FrameError::NotUtf8(field));
        }
        // Valid as a whole, but a character is split between two names.
        let e = "é".as_bytes();
        let split = with_names(&e[..1], &e[1..], b"c");
        assert_eq!(Frame::parse(split).unwrap_err(), FrameError::NotUtf8("src"));
        let split = with_names(b"a", &e[..1], &e[1..]);
        assert_eq!(Frame::parse(split).unwrap_err(), FrameError::NotUtf8("dst"));
    }

    #[test]
    fn rejects_truncated_and_unknown() {
        let (head, _) = sample();
        assert!(matches!(
            Frame::parse(head.slice(..10)),
            Err(FrameError::Truncated(_))
        ));
        let mut bad = BytesMut::from(&head[..]);
        bad[4] = 200;
        assert!(matches!(
            Frame::parse(bad.freeze()),
            Err(FrameError::Truncated(_)) | Err(FrameError::UnknownKind(200))
        ));
    }
}
