//! [`Blob`]: bytes that cross the mesh without being copied.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::codec;

/// A byte string argument or result that daffi moves without copying it.
///
/// On the wire a `Blob` is a MessagePack `bin`, exactly like `bytes::Bytes`, `Vec<u8>`
/// with `serde_bytes`, or Python's `bytes`, so either side may use any of them. The
/// difference is in memory: a `Blob` of 16 KiB or more is written to the socket from its
/// own buffer (the caller's 1 GiB stays where it is, with no encoded copy beside it),
/// and a `Blob` received is a slice of the frame that carried it (no second buffer).
/// Other byte types work too: a `Bytes`, an owned `Vec<u8>` or `ByteBuf` argument
/// (`.args((data,))`) and a `Vec<u8>` result leave from their own memory as a `Blob`
/// does; a borrowed one (`.args((&data,))`) is copied on the way out, and a `Vec<u8>` or
/// `ByteBuf` parameter on the way in (from 1 MiB, into buffers daffi keeps for a second
/// for the next such copy).
///
/// Cheap to clone (a reference count). Derefs to `[u8]`; [`Blob::into_bytes`] gives the
/// `Bytes` back.
///
/// ```no_run
/// use daffi::{Blob, Global};
///
/// # fn main() -> daffi::Result<()> {
/// let g = Global::builder().start()?;
/// // Served by some node as: g.register("checksum", |data: Blob| data.iter().map(|&b| b as u64).sum::<u64>())
/// let image = Blob::from(std::fs::read("image.png").unwrap_or_default());
/// let sum: u64 = g.call("checksum").args((image,)).fg()?;
/// # Ok(()) }
/// ```
///
/// A received `Blob` keeps the whole frame it came in alive; call
/// [`Blob::copy_to_owned`] to keep a small piece of a large frame without it.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blob(Bytes);

impl Blob {
    /// An empty blob.
    pub const fn new() -> Self {
        Blob(Bytes::new())
    }

    /// A blob of static bytes (no allocation).
    pub const fn from_static(bytes: &'static [u8]) -> Self {
        Blob(Bytes::from_static(bytes))
    }

    /// The bytes, as `bytes::Bytes` (no copy).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The bytes, as `bytes::Bytes`.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// A copy of these bytes in a buffer of their own: drops the reference to the frame
    /// a received blob was sliced from.
    pub fn copy_to_owned(&self) -> Blob {
        Blob(Bytes::copy_from_slice(&self.0))
    }
}

impl Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl From<Bytes> for Blob {
    fn from(bytes: Bytes) -> Self {
        Blob(bytes)
    }
}

impl From<Vec<u8>> for Blob {
    fn from(bytes: Vec<u8>) -> Self {
        Blob(Bytes::from(bytes))
    }
}

impl From<&'static [u8]> for Blob {
    fn from(bytes: &'static [u8]) -> Self {
        Blob(Bytes::from_static(bytes))
    }
}

impl From<String> for Blob {
    fn from(text: String) -> Self {
        Blob(Bytes::from(text))
    }
}

impl From<Blob> for Bytes {
    fn from(blob: Blob) -> Self {
        blob.0
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        codec::offer_blob(&self.0);
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_byte_buf(BlobVisitor)
    }
}

/// Accepts what a `bytes::Bytes` accepts: a `bin` (by reference when daffi decodes a
/// frame), a list of bytes (JSON from `daffi call`), or a string.
struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Blob, E> {
        Ok(Blob(
            codec::slice_of_source(v).unwrap_or_else(|| Bytes::copy_from_slice(v)),
        ))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob::from(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Blob, E> {
        Ok(Blob(Bytes::copy_from_slice(v.as_bytes())))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Blob, E> {
        Ok(Blob::from(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        Ok(Blob::from(bytes))
    }
}
