//! A frame's payload as it leaves: one buffer, or several when a value holds large
//! blobs (daffi's `Blob`), which are sent from their own memory instead of being copied
//! into the encoded value.

use bytes::{Buf, Bytes, BytesMut};

/// The bytes of an outgoing payload, in order, in one or more parts.
///
/// Almost every payload is one part (`rest` is empty and allocates nothing). A value
/// with large blobs is the encoded bytes around them, with each blob's own `Bytes` in
/// between: the writer sends the parts one after another, so nothing is copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    first: Bytes,
    rest: Vec<Bytes>,
}

impl Payload {
    /// A payload of the given parts, in order (empty parts are dropped).
    pub fn from_parts(parts: impl IntoIterator<Item = Bytes>) -> Self {
        let mut payload = Payload::default();
        for part in parts {
            payload.push(part);
        }
        payload
    }

    /// Appends `part`.
    pub fn push(&mut self, part: Bytes) {
        if part.is_empty() {
            return;
        }
        if self.first.is_empty() && self.rest.is_empty() {
            self.first = part;
        } else {
            self.rest.push(part);
        }
    }

    /// Appends the parts of `other`.
    pub fn append(&mut self, other: Payload) {
        self.push(other.first);
        for part in other.rest {
            self.push(part);
        }
    }

    /// Takes the last part off (to extend it and push it back); `None` when empty.
    pub fn pop(&mut self) -> Option<Bytes> {
        if let Some(last) = self.rest.pop() {
            return Some(last);
        }
        (!self.first.is_empty()).then(|| std::mem::take(&mut self.first))
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.first.len() + self.rest.iter().map(Bytes::len).sum::<usize>()
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.first.is_empty() && self.rest.iter().all(Bytes::is_empty)
    }

    /// The parts, in order.
    pub fn parts(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }

    /// The bytes as one buffer: the part itself when there is one, a copy otherwise.
    pub fn to_bytes(&self) -> Bytes {
        if self.rest.is_empty() {
            return self.first.clone();
        }
        let mut joined = BytesMut::with_capacity(self.len());
        for part in self.parts() {
            joined.extend_from_slice(part);
        }
        joined.freeze()
    }

    /// The bytes as one buffer, without a copy when there is one part.
    pub fn into_bytes(self) -> Bytes {
        if self.rest.is_empty() {
            self.first
        } else {
            self.to_bytes()
        }
    }

    /// Drops the first `n` bytes (those a write took).
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let step = n.min(self.first.len());
            self.first.advance(step);
            n -= step;
            if self.first.is_empty() {
                if self.rest.is_empty() {
                    return;
                }
                self.first = self.rest.remove(0);
            }
        }
    }
}

impl From<Bytes> for Payload {
    fn from(first: Bytes) -> Self {
        Payload {
            first,
            rest: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_their_order_through_advance() {
        let mut p = Payload::from_parts([
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cde"),
            Bytes::from_static(b"f"),
        ]);
        assert_eq!((p.len(), &p.to_bytes()[..]), (6, &b"abcdef"[..]));
        p.advance(3);
        assert_eq!(&p.to_bytes()[..], b"def");
        p.advance(3);
        assert!(p.is_empty());
        assert_eq!(p.len(), 0);
    }
}
