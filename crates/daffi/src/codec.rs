//! How arguments and results become bytes and back: MessagePack (structs as maps), with
//! large [`Blob`](crate::Blob)s moved by reference instead of copied.
//!
//! Encoding: while [`encode_value`] runs, a `Blob` being serialized leaves a clone of its
//! `Bytes` (a reference count, not a copy) on the thread. When the encoder then writes
//! exactly that slice, the writer takes the `Bytes` as a part of the payload instead of
//! copying it. Decoding: while [`decode`] runs on a large payload, the payload's `Bytes`
//! is on the thread, and a `Blob` found inside it becomes a slice of it. Both are matched
//! by address and length, so a value that is not a `Blob`, or a serializer that is not
//! ours, just takes the ordinary copying path.
//!
//! Byte strings of other types (`Vec<u8>`, `[u8]`, `bytes::Bytes`) travel as a `bin`
//! too, and are read and written in one piece; a `Bytes` takes the `Blob` ways (see
//! [`byte_strings`]). Large ones that must be copied are copied into warm buffers
//! ([`pool`]).
//!
//! Encoding refuses a value nested deeper than the decoder reads (see [`depth`]),
//! rather than overflow the stack.

use std::borrow::BorrowMut;
use std::cell::{Cell, RefCell};

use bytes::Bytes;
use serde::de::{DeserializeOwned, DeserializeSeed};
use serde::Serialize;

use daffi_wire::{KeptBuffer, Payload};

mod byte_strings;
mod depth;
pub(crate) mod explain;
mod flat;
mod pool;

pub(crate) use depth::MAX_DEPTH;

pub(crate) use byte_strings::into_vec;

/// Blobs shorter than this are copied like any other bytes: a separate part costs more
/// than copying a few KiB.
pub(crate) const BLOB_BY_REFERENCE: usize = 16 * 1024;

/// Values encoded into at most this many bytes get an allocation of their exact size.
const SMALL: usize = 4096;

/// What the encoder keeps per thread (one thread-local, so one lookup per value).
struct Encoder {
    /// The buffer small values are encoded into before they get their exact allocation.
    scratch: RefCell<Vec<u8>>,
    /// Whether [`encode_value`] runs on this thread (blobs offer their bytes only then).
    encoding: Cell<bool>,
    /// The blob whose bytes the encoder is about to write.
    offered: Cell<Option<Bytes>>,
}

thread_local! {
    static ENCODER: Encoder = Encoder {
        scratch: RefCell::new(Vec::with_capacity(SMALL)),
        encoding: Cell::new(false),
        offered: Cell::new(None),
    };
    /// The payload [`decode`] reads, that blobs may be sliced from.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Encodes a value the way every payload is encoded: MessagePack, structs as maps, large
/// blobs as parts of their own.
pub fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Payload, String> {
    // A scalar or a flat tuple of them (most arguments): written directly.
    if let Some(payload) = flat::encode(value) {
        return Ok(payload);
    }
    while_encoding(|encoder| match encoder.scratch.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let out = encode_into(value, &mut buf);
            if buf.capacity() > SMALL {
                *buf = Vec::with_capacity(SMALL);
            }
            out
        }
        // A value whose serialization encodes another value on this thread.
        Err(_) => encode_into(value, &mut Vec::new()),
    })
}

/// Encodes a value as [`encode_value`] does, onto the end of `buf` (a stream's batch
/// being filled: no allocation of its own). `None`: the value is all in `buf`, after
/// the bytes it held before. `Some`: the value's parts, large blobs in it taken by
/// reference; `buf` holds what it held before. On `Err`, `buf` is as it was too.
pub(crate) fn encode_appended<T: Serialize + ?Sized>(
    value: &T,
    buf: &mut Vec<u8>,
) -> Result<Option<Payload>, String> {
    let start = buf.len();
    let writer = PartsWriter {
        start,
        buf: &mut *buf,
        done: Payload::default(),
    };
    let (encoded, mut done, _) = while_encoding(|_| serialize(value, writer));
    if encoded.is_err() || !done.is_empty() {
        if encoded.is_ok() {
            done.push(Bytes::copy_from_slice(&buf[start..]));
        }
        buf.truncate(start);
    }
    encoded.map(|()| (!done.is_empty()).then_some(done))
}

/// Runs `encode` with blobs offering their bytes to the writer.
fn while_encoding<R>(encode: impl FnOnce(&Encoder) -> R) -> R {
    ENCODER.with(|encoder| {
        let was_encoding = encoder.encoding.replace(true);
        let out = encode(encoder);
        encoder.encoding.set(was_encoding);
        if !was_encoding {
            // An offered blob that was never written (another serializer took it).
            drop(encoder.offered.take());
        }
        out
    })
}

/// Serializes `value` through `writer`; returns the parts it took by reference (the
/// rest is in the writer's buffer), and the buffer.
fn serialize<T: Serialize + ?Sized, B: BorrowMut<Vec<u8>>>(
    value: &T,
    writer: PartsWriter<B>,
) -> (Result<(), String>, Payload, B) {
    // The serializer owns the writer, and the writer the buffer (or the borrow of it):
    // one step from a write to the bytes, as with a plain `Vec`.
    let mut serializer = rmp_serde::Serializer::new(writer).with_struct_map();
    let encoded = depth::Limited::new(value)
        .serialize(&mut serializer)
        .map_err(|e| e.to_string());
    let PartsWriter { buf, done, .. } = serializer.into_inner();
    (encoded, done, buf)
}

fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>) -> Result<Payload, String> {
    let writer = PartsWriter {
        start: 0,
        buf: std::mem::take(buf),
        done: Payload::default(),
    };
    let (encoded, mut done, written) = serialize(value, writer);
    *buf = written;
    encoded?;
    // Small values (most arguments and results) are copied out of the scratch buffer:
    // the smallest (up to `daffi_wire::small::SMALL_MAX`) into this thread's buffer of
    // small strings (no allocation of their own: they leave in a frame), the others
    // into one allocation of their exact size. Large ones keep the buffer they were
    // encoded into.
    let tail = if buf.len() <= SMALL {
        daffi_wire::small::copy(buf)
    } else {
        Bytes::from(std::mem::take(buf))
    };
    done.push(tail);
    Ok(done)
}

/// Every byte value once: a one-byte encoding (a small integer, a bool) is a slice of
/// this, without a copy or a buffer.
static ONE_BYTE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = i as u8;
        i += 1;
    }
    table
};

/// `encoded` (1 to 9 bytes) as a payload: a static byte, or cut from this thread's
/// buffer of small strings.
#[inline]
fn small_payload(encoded: &[u8]) -> Payload {
    let bytes = match encoded {
        [b] => Bytes::from_static(&ONE_BYTE[*b as usize..=*b as usize]),
        _ => daffi_wire::small::copy(encoded),
    };
    Payload::from(bytes)
}

/// A signed integer encoded as [`encode_value`] encodes it (the same bytes: the
/// shortest MessagePack form, as `rmp`'s own encoder writes it), without the serializer
/// and its scratch buffer: a result that is an integer (most small replies) costs a few
/// bytes' work.
pub(crate) fn encode_int(v: i64) -> Payload {
    let mut out = flat::Flat::new();
    // Nine bytes at most: it always fits.
    let _ = out.sint(v);
    small_payload(out.bytes())
}

/// An unsigned integer encoded as [`encode_value`] encodes it, without the serializer
/// (see [`encode_int`]).
pub(crate) fn encode_uint(v: u64) -> Payload {
    let mut out = flat::Flat::new();
    let _ = out.uint(v);
    small_payload(out.bytes())
}

/// A bool encoded as [`encode_value`] encodes it, without the serializer.
pub(crate) fn encode_bool(v: bool) -> Payload {
    let marker = if v {
        rmp::Marker::True
    } else {
        rmp::Marker::False
    };
    small_payload(&[marker.to_u8()])
}

/// Collects the encoder's output: bytes into `buf` (from `start` on), an offered blob
/// as a part of its own.
struct PartsWriter<B> {
    start: usize,
    buf: B,
    done: Payload,
}

impl<B: BorrowMut<Vec<u8>>> PartsWriter<B> {
    /// Takes `data` as a part of its own: by reference if it is the offered blob's
    /// bytes, or copied into a pooled buffer if it is large (warm memory, see [`pool`]).
    #[cold]
    #[inline(never)]
    fn take_large(&mut self, data: &[u8]) -> bool {
        let part = match take_offered(data) {
            Some(blob) => blob,
            None if data.len() >= pool::POOLED => pool::copy_of(data),
            None => return false,
        };
        let buf = self.buf.borrow_mut();
        self.done.push(Bytes::copy_from_slice(&buf[self.start..]));
        buf.truncate(self.start);
        self.done.push(part);
        true
    }
}

impl<B: BorrowMut<Vec<u8>>> std::io::Write for PartsWriter<B> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if data.len() < BLOB_BY_REFERENCE || !self.take_large(data) {
            self.buf.borrow_mut().extend_from_slice(data);
        }
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write(data).map(drop)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The offered blob, if `data` is its very bytes.
fn take_offered(data: &[u8]) -> Option<Bytes> {
    ENCODER.with(|encoder| {
        let offered = encoder.offered.take()?;
        if offered.as_ptr() == data.as_ptr() && offered.len() == data.len() {
            Some(offered)
        } else {
            encoder.offered.set(Some(offered));
            None
        }
    })
}

/// Encodes a call's arguments as [`encode_value`] does. One owned `Vec<u8>` or
/// `ByteBuf` (`.args((data,))`) is sent from its own memory, as a [`Blob`](crate::Blob)
/// is, and its buffer is kept for the next large copy once sent ([`pool`]).
pub(crate) fn encode_args<A: Serialize>(args: A) -> Result<Payload, String> {
    let args = match byte_strings::into_one_vec(args) {
        Ok(bytes) => return encode_value(&(owned_blob(bytes),)),
        Err(args) => args,
    };
    match into_vec(args) {
        Ok(bytes) => encode_value(&owned_blob(bytes)),
        Err(args) => encode_value(&args),
    }
}

/// Bytes the user gave away, as a blob: sent from their own memory, then kept for the
/// next large copy ([`pool`]).
pub(crate) fn owned_blob(bytes: Vec<u8>) -> crate::Blob {
    crate::Blob::from(pool::into_bytes(bytes))
}

/// Called by a blob being serialized: if [`encode_value`] is running, the writer may
/// take these bytes by reference.
pub(crate) fn offer_blob(bytes: &Bytes) {
    if bytes.len() >= BLOB_BY_REFERENCE {
        ENCODER.with(|encoder| {
            if encoder.encoding.get() {
                encoder.offered.set(Some(bytes.clone()));
            }
        });
    }
}

/// Decodes a MessagePack payload; blobs and `Bytes` inside a large one share its memory,
/// and its byte strings are read in one piece.
pub fn decode<T: DeserializeOwned>(payload: &Bytes) -> Result<T, rmp_serde::decode::Error> {
    decode_seed(payload, std::marker::PhantomData::<T>)
}

/// [`decode`] with a seed: for a decoder that carries what it needs to know.
pub(crate) fn decode_seed<'p, S: DeserializeSeed<'p>>(
    payload: &'p Bytes,
    seed: S,
) -> Result<S::Value, rmp_serde::decode::Error> {
    let read = || {
        let mut deserializer = rmp_serde::Deserializer::from_read_ref(&payload[..]);
        seed.deserialize(byte_strings::Decoder(&mut deserializer))
    };
    if payload.len() < BLOB_BY_REFERENCE {
        return read();
    }
    let previous = SOURCE.with(|s| s.replace(Some(payload.clone())));
    let out = read();
    SOURCE.with(|s| *s.borrow_mut() = previous);
    out
}

/// Decodes a payload handed over whole: a `Vec<u8>` or `serde_bytes::ByteBuf` that is all
/// of it takes over its buffer when nothing else holds it, instead of being copied. The
/// reader's hold on the buffer (`kept`) is ended only then.
pub(crate) fn decode_owned<T: DeserializeOwned>(
    payload: Bytes,
    kept: Option<&KeptBuffer>,
) -> Result<T, (Bytes, rmp_serde::decode::Error)> {
    match byte_strings::whole_bin::<T>(payload, kept) {
        Ok(value) => Ok(value),
        Err(payload) => decode(&payload).map_err(|e| (payload, e)),
    }
}

thread_local! {
    /// Where the arguments handed to the callback running on this thread start, and the
    /// reader's hold on their buffer (see [`handing_over`]).
    static HANDED: Cell<Option<(usize, KeptBuffer)>> = const { Cell::new(None) };
}

/// Whether a callback's parameters `T` are one `Vec<u8>` or `serde_bytes::ByteBuf`,
/// which [`lone_bytes_param`] may take over (constant once inlined).
#[inline(always)]
pub(crate) fn is_lone_bytes_param<T>() -> bool {
    byte_strings::is_lone_bin_param::<T>()
}

/// Runs `run`, a callback's shim, on `payload`, its arguments, with `kept`, the reader's
/// hold on their buffer: a lone `Vec<u8>` or `ByteBuf` parameter ends it to take the
/// buffer over ([`lone_bytes_param`]); any other keeps the reader's reuse of it.
#[inline]
pub(crate) fn handing_over<R>(
    payload: Bytes,
    kept: Option<KeptBuffer>,
    run: impl FnOnce(Bytes) -> R,
) -> R {
    let Some(kept) = kept else {
        return run(payload);
    };
    /// Forgets the hold however `run` ends (a panic included).
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            let _ = HANDED.try_with(Cell::take);
        }
    }
    HANDED.with(|h| h.set(Some((payload.as_ptr() as usize, kept))));
    let _forget = Forget;
    run(payload)
}

/// A callback's parameters `T` that are one `Vec<u8>` or `serde_bytes::ByteBuf`,
/// `(data,)`, from arguments that are one `bin` from `at` to the end of `payload` (the
/// `bin` itself, or the one value of a list or of a map that names it): the bytes take
/// over the payload's buffer when nothing else holds it, instead of being copied, after
/// the reader's hold on it ends (given by [`handing_over`]). `Err` gives the payload
/// back for any other type or payload.
pub(crate) fn lone_bytes_param<T>(payload: Bytes, at: usize) -> Result<T, Bytes> {
    if !byte_strings::is_lone_bin_param::<T>() {
        return Err(payload);
    }
    let start = payload.as_ptr() as usize;
    let hold = || {
        let (handed, kept) = HANDED.with(Cell::take)?;
        (handed == start).then_some(kept)
    };
    byte_strings::lone_bin_param(payload, at, hold)
}

/// Called by a blob being deserialized from borrowed bytes: a slice of the payload
/// [`decode`] is reading, if `data` lies inside it.
pub(crate) fn slice_of_source(data: &[u8]) -> Option<Bytes> {
    if data.len() < BLOB_BY_REFERENCE {
        return None;
    }
    SOURCE.with(|s| {
        let source = s.borrow();
        let source = source.as_ref()?;
        let start = source.as_ptr() as usize;
        let at = data.as_ptr() as usize;
        let inside = at >= start && at + data.len() <= start + source.len();
        inside.then(|| source.slice_ref(data))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Blob;

    #[test]
    fn integers_and_bools_written_directly_are_the_serializers_bytes() {
        let mut signed: Vec<i64> = vec![i64::MIN, i64::MAX, 0, -1];
        for edge in [
            32i64,
            128,
            256,
            32_768,
            65_536,
            2_147_483_648,
            4_294_967_296,
        ] {
            for v in [edge - 1, edge, edge + 1] {
                signed.extend([v, -v]);
            }
        }
        for v in signed {
            let direct = encode_int(v).to_bytes();
            assert_eq!(direct, encode_value(&v).expect("encodes").to_bytes(), "{v}");
            assert_eq!(decode::<i64>(&direct).expect("decodes"), v);
            if v >= 0 {
                assert_eq!(encode_uint(v as u64).to_bytes(), direct, "{v}");
            }
        }
        for v in [u64::MAX, u64::MAX - 1, 1 << 63] {
            let direct = encode_uint(v).to_bytes();
            assert_eq!(direct, encode_value(&v).expect("encodes").to_bytes(), "{v}");
            assert_eq!(decode::<u64>(&direct).expect("decodes"), v);
        }
        for v in [true, false] {
            let direct = encode_bool(v).to_bytes();
            assert_eq!(direct, encode_value(&v).expect("encodes").to_bytes());
        }
    }

    #[test]
    fn a_large_blob_travels_by_reference_both_ways() {
        let big = Bytes::from(vec![7u8; 100_000]);
        let payload = encode_value(&(1u8, Blob::from(big.clone()), "end")).expect("encodes");
        let parts: Vec<&Bytes> = payload.parts().collect();
        assert_eq!(parts.len(), 3, "before, the blob, after");
        assert_eq!(parts[1].as_ptr(), big.as_ptr(), "the blob is not copied");
        // The same bytes as the ordinary encoding.
        let plain = rmp_serde::to_vec(&(1u8, &big, "end")).expect("encodes");
        let wire = payload.to_bytes();
        assert_eq!(&wire[..], &plain[..]);

        let (n, blob, end): (u8, Blob, String) = decode(&wire).expect("decodes");
        assert_eq!((n, blob.len(), end.as_str()), (1, 100_000, "end"));
        let inside = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        assert!(
            inside.contains(&(blob.as_ptr() as usize)),
            "a slice of the payload"
        );
    }

    #[test]
    fn an_owned_byte_argument_is_sent_from_its_own_memory() {
        let data = vec![9u8; 3 * BLOB_BY_REFERENCE];
        let at = data.as_ptr();
        let expected = rmp_serde::to_vec(&(Bytes::from(data.clone()),)).expect("encodes");
        let payload = encode_args((data,)).expect("encodes");
        assert!(payload.parts().any(|p| p.as_ptr() == at), "not copied");
        assert_eq!(&payload.to_bytes()[..], &expected[..], "the same bytes");
        // Alone, it is sent as a bin, as `encode_value` writes it.
        let data = vec![8u8; 3 * BLOB_BY_REFERENCE];
        let expected = encode_value(&data).expect("encodes").to_bytes();
        assert_eq!(encode_args(data).expect("encodes").to_bytes(), expected);
    }

    #[test]
    fn small_blobs_and_other_bytes_are_copied_as_usual() {
        let payload = encode_value(&(Blob::from(vec![1u8; 10]),)).expect("encodes");
        assert_eq!(payload.parts().count(), 1);
        let vec_payload = encode_value(&(vec![1u8; 100_000],)).expect("encodes");
        assert_eq!(vec_payload.parts().count(), 1);
        let (blob,): (Blob,) = decode(&payload.to_bytes()).expect("decodes");
        assert_eq!(&blob[..], &[1u8; 10]);
    }
}
