//! Frames as they leave: the encoded head and the payload, kept apart so that a large
//! payload is written from its own memory.

use bytes::{Bytes, BytesMut};

use crate::frame::Header;
use crate::payload::Payload;

/// A frame ready to send: the encoded head (length prefix and header) and the payload.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// Length prefix and header, or a whole forwarded frame. Empty while the frame
    /// [grows](Self::grow): its head is then `open`'s.
    pub(crate) head: Bytes,
    /// Payload; may be empty. While the frame grows, `open`'s tail follows it.
    pub(crate) body: Payload,
    /// A frame that grows while it waits in a queue: its head and the end of its
    /// payload, kept writable until it leaves (see [`grow`](Self::grow)).
    pub(crate) open: Option<Box<Open>>,
}

/// The writable parts of a frame that grows: see [`Outgoing::grow`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Open {
    head: BytesMut,
    tail: BytesMut,
}

/// A frame opened to grow in place ([`Outgoing::grow`]): its head, the payload's parts
/// before the end, and the end, which stays writable until the frame leaves.
#[derive(Debug)]
pub struct Growing<'a> {
    /// The length prefix and header, to patch in place.
    pub head: &'a mut BytesMut,
    /// The payload's parts before `tail`.
    pub body: &'a mut Payload,
    /// The end of the payload, to append to (empty when the frame was just opened).
    pub tail: &'a mut BytesMut,
}

impl Outgoing {
    /// A frame whose bytes are all in `raw` (a forwarded frame).
    pub fn raw(raw: Bytes) -> Self {
        Outgoing {
            head: raw,
            body: Payload::default(),
            open: None,
        }
    }

    /// A frame of `header` and `body`, the length prefix computed.
    pub fn new(header: &Header<'_>, body: impl Into<Payload>) -> Self {
        let body = body.into();
        Outgoing {
            head: header.encode(body.len()),
            body,
            open: None,
        }
    }

    /// Several frames sent as one: they go out together, in order, in one write when
    /// the connection is idle (a broadcast's requests, say).
    pub fn joined(frames: Vec<Outgoing>) -> Self {
        let mut frames = frames.into_iter();
        let Some(mut joined) = frames.next() else {
            return Outgoing::default();
        };
        joined.seal();
        for mut frame in frames {
            frame.seal();
            joined.body.push(frame.head);
            joined.body.append(frame.body);
        }
        joined
    }

    /// A frame of an encoded head and a payload (the rest of one partly written).
    pub(crate) fn from_parts(head: Bytes, body: Payload) -> Self {
        Outgoing {
            head,
            body,
            open: None,
        }
    }

    /// The length prefix and header (or a whole forwarded frame) of a frame that does
    /// not [grow](Self::grow) (one that does: [`head_bytes`](Self::head_bytes)).
    pub fn head(&self) -> &Bytes {
        debug_assert!(self.open.is_none(), "the head of a growing frame");
        &self.head
    }

    /// The length prefix and header (or a whole forwarded frame), whether or not the
    /// frame [grows](Self::grow).
    pub fn head_bytes(&self) -> &[u8] {
        match &self.open {
            Some(open) => &open.head,
            None => &self.head,
        }
    }

    /// The payload (for joined frames: the frames after the first) of a frame that does
    /// not [grow](Self::grow).
    pub fn body(&self) -> &Payload {
        debug_assert!(self.open.is_none(), "the body of a growing frame");
        &self.body
    }

    /// Opens the frame to grow in place while it waits in a queue (see
    /// [`FrameSender::join_last`](crate::FrameSender::join_last)): its head becomes
    /// writable (copied if shared) and an empty tail follows the payload. Appends to
    /// the tail cost a copy of what is appended, however often the frame grows; the
    /// frame is made whole again (the tail one more part) when it leaves. Opened
    /// already: the same parts again.
    pub fn grow(&mut self) -> Growing<'_> {
        let open = self.open.get_or_insert_with(|| {
            let head = std::mem::take(&mut self.head)
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            Box::new(Open {
                head,
                tail: BytesMut::new(),
            })
        });
        Growing {
            head: &mut open.head,
            body: &mut self.body,
            tail: &mut open.tail,
        }
    }

    /// Whether the frame grows ([`grow`](Self::grow)) and was not made whole since.
    pub fn is_growing(&self) -> bool {
        self.open.is_some()
    }

    /// Makes a frame that grew whole again: its head frozen, its tail the payload's last
    /// part. Nothing to do for one that never grew.
    pub fn seal(&mut self) {
        if let Some(open) = self.open.take() {
            let Open { head, tail } = *open;
            self.head = head.freeze();
            self.body.push(tail.freeze());
        }
    }

    /// The bytes of the frame in order, as slices: head, the payload's parts, and the
    /// tail of a frame that grows.
    pub(crate) fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let (head, tail): (&[u8], &[u8]) = match &self.open {
            Some(open) => (&open.head, &open.tail),
            None => (&self.head, &[]),
        };
        std::iter::once(head)
            .chain(self.body.parts().map(|part| &part[..]))
            .chain(std::iter::once(tail))
            .filter(|slice| !slice.is_empty())
    }

    /// The length prefix and header, to change or replace in place (see
    /// [`FrameSender::join_last`](crate::FrameSender::join_last)); empty while the frame
    /// [grows](Self::grow) (its head is then [`Growing::head`]).
    pub fn head_mut(&mut self) -> &mut Bytes {
        &mut self.head
    }

    /// The payload, to change in place (see
    /// [`FrameSender::join_last`](crate::FrameSender::join_last)); while the frame
    /// [grows](Self::grow), the parts before its tail.
    pub fn body_mut(&mut self) -> &mut Payload {
        &mut self.body
    }

    /// Whether it is one whole frame: its length prefix gives the bytes it holds (not a
    /// frame partly written, nor several [`joined`](Self::joined)).
    pub fn is_one_frame(&self) -> bool {
        let Some(prefix) = self.head_bytes().get(..crate::frame::LEN_PREFIX) else {
            return false;
        };
        let announced = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        announced as usize + crate::frame::LEN_PREFIX == self.len()
    }

    /// Appends the frame's bytes to `out`: for what is written in one piece (the
    /// opening of a connection) and for tests.
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        for slice in self.slices() {
            out.extend_from_slice(slice);
        }
    }

    /// Total bytes on the wire.
    pub fn len(&self) -> usize {
        let open = self
            .open
            .as_ref()
            .map_or(0, |open| open.head.len() + open.tail.len());
        self.head.len() + self.body.len() + open
    }

    /// Whether the frame is empty (never true for a valid frame).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
