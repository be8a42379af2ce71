//! Frames as they leave: the encoded head and the payload, kept apart so that a large
//! payload is written from its own memory.

use bytes::Bytes;

use crate::frame::Header;
use crate::payload::Payload;

/// A frame ready to send: the encoded head (length prefix and header) and the payload.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// Length prefix and header, or a whole forwarded frame.
    pub(crate) head: Bytes,
    /// Payload; may be empty.
    pub(crate) body: Payload,
}

impl Outgoing {
    /// A frame whose bytes are all in `raw` (a forwarded frame).
    pub fn raw(raw: Bytes) -> Self {
        Outgoing {
            head: raw,
            body: Payload::default(),
        }
    }

    /// A frame of `header` and `body`, the length prefix computed.
    pub fn new(header: &Header<'_>, body: impl Into<Payload>) -> Self {
        let body = body.into();
        Outgoing {
            head: header.encode(body.len()),
            body,
        }
    }

    /// Several frames sent as one: they go out together, in order, in one write when
    /// the connection is idle (a broadcast's requests, say).
    pub fn joined(frames: Vec<Outgoing>) -> Self {
        let mut frames = frames.into_iter();
        let Some(mut joined) = frames.next() else {
            return Outgoing::default();
        };
        for Outgoing { head, body } in frames {
            joined.body.push(head);
            joined.body.append(body);
        }
        joined
    }

    /// The length prefix and header (or a whole forwarded frame).
    pub fn head(&self) -> &Bytes {
        &self.head
    }

    /// The payload (for joined frames: the frames after the first).
    pub fn body(&self) -> &Payload {
        &self.body
    }

    /// The length prefix and header, to change or replace in place (see
    /// [`FrameSender::join_last`](crate::FrameSender::join_last)).
    pub fn head_mut(&mut self) -> &mut Bytes {
        &mut self.head
    }

    /// The payload, to change in place (see
    /// [`FrameSender::join_last`](crate::FrameSender::join_last)).
    pub fn body_mut(&mut self) -> &mut Payload {
        &mut self.body
    }

    /// Whether it is one whole frame: its length prefix gives the bytes it holds (not a
    /// frame partly written, nor several [`joined`](Self::joined)).
    pub fn is_one_frame(&self) -> bool {
        let Some(prefix) = self.head.get(..crate::frame::LEN_PREFIX) else {
            return false;
        };
        let announced = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        announced as usize + crate::frame::LEN_PREFIX == self.len()
    }

    /// Appends the frame's bytes to `out`: for what is written in one piece (the
    /// opening of a connection) and for tests.
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        for part in self.body.parts() {
            out.extend_from_slice(part);
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
