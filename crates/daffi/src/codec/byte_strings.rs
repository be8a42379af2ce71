//! Byte strings in the types users have them: `Vec<u8>`, `[u8]` and `bytes::Bytes`,
//! moved in one go instead of one byte at a time.
//!
//! Serde sees a `Vec<u8>` or a `[u8]` as a sequence of integers: left alone, each byte is
//! encoded as a MessagePack integer (two bytes above 127) and decoded one by one. Here,
//! such a sequence is encoded as a `bin` copied in one piece ([`as_slice`]), and a
//! `Vec<u8>` is decoded from a `bin` with one copy ([`Decoder`]); a `Bytes` becomes a
//! slice of a large payload instead of a copy, and is encoded from its own memory, as a
//! [`Blob`](crate::Blob) is. A result that is one `bin`, taken as a `Vec<u8>` or a
//! `ByteBuf`, keeps the payload's own buffer when nothing else holds it ([`whole_bin`]).
//! Both forms of a `Vec<u8>` (a `bin`, or an array of
//! integers as older peers send it) decode into any of these types.
//!
//! Serde has no way to say "these are bytes" for these types, so they are recognized by
//! their type where generic code meets them: the sequence serde hands the serializer, and
//! the visitor that `Vec<u8>`'s and `Bytes`'s own `Deserialize` hand the deserializer.
//! The comparisons are of `TypeId`s without lifetimes ([`typeid::of`]), settled at
//! compile time; only types without lifetimes of their own are matched ([`Plain`]).

use std::any::TypeId;
use std::fmt;
use std::mem::ManuallyDrop;

use bytes::{Buf, Bytes};
use daffi_wire::KeptBuffer;
use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use serde::Deserialize;
use serde_bytes::ByteBuf;

/// Types without lifetime parameters: a type whose `TypeId` without lifetimes is one of
/// these *is* that type, so a value may be taken as one.
pub(super) trait Plain: 'static {}

impl Plain for [u8] {}
impl Plain for Vec<u8> {}
impl Plain for Bytes {}
impl Plain for ByteBuf {}
impl Plain for (Vec<u8>,) {}
impl Plain for (ByteBuf,) {}

/// Whether `T` is `P`.
#[inline(always)]
fn is<T: ?Sized, P: ?Sized + Plain>() -> bool {
    typeid::of::<T>() == TypeId::of::<P>()
}

/// `value` as a `To`, if `From` and `To` are both `P`.
#[inline(always)]
fn cast<P: Plain, From, To>(value: From) -> Result<To, From> {
    if !(is::<From, P>() && is::<To, P>()) {
        return Err(value);
    }
    let value = ManuallyDrop::new(value);
    // SAFETY: `From` and `To` are both `P` (a type without lifetimes: see `Plain`), so
    // they are one type. The value is moved, not copied: `ManuallyDrop` keeps the
    // original from being dropped.
    Ok(unsafe { std::mem::transmute_copy::<ManuallyDrop<From>, To>(&value) })
}

/// What `value` refers to, if `T` is `&P` (with any lifetime).
#[inline(always)]
fn through_ref<'a, T: ?Sized, P: ?Sized + Plain>(value: &'a T) -> Option<&'a P> {
    if typeid::of::<T>() != TypeId::of::<&'static P>() {
        return None;
    }
    // SAFETY: `T` is `&'x P` for some lifetime 'x (only a lifetime differs from
    // `&'static P`, as `P` has none). `value: &'a T` means 'x outlives 'a, so the
    // reference it holds may be read as a `&'a P`.
    Some(unsafe { *(value as *const T as *const &'a P) })
}

/// The bytes of a sequence held in one slice, as serde hands it to `collect_seq`: a
/// `&Vec<u8>` (from a `Vec<u8>`) or a `&[u8]` (from a `[u8]`, `&[u8]`, `Box<[u8]>` ...).
#[inline]
pub(super) fn as_slice<I: ?Sized>(seq: &I) -> Option<&[u8]> {
    through_ref::<I, Vec<u8>>(seq)
        .map(Vec::as_slice)
        .or_else(|| through_ref::<I, [u8]>(seq))
}

/// `value` if it is a `Bytes` or a `&Bytes`: it may be written from its own memory.
#[inline]
pub(super) fn as_bytes<T: ?Sized>(value: &T) -> Option<&Bytes> {
    if is::<T, Bytes>() {
        // SAFETY: `T` is `Bytes`, which has no lifetimes.
        return Some(unsafe { &*(value as *const T as *const Bytes) });
    }
    through_ref::<T, Bytes>(value)
}

/// `value` as a `Vec<u8>`, if it is one or a `ByteBuf` (an owned result that may become
/// a `Blob`).
pub(crate) fn into_vec<T>(value: T) -> Result<Vec<u8>, T> {
    let value = match cast::<Vec<u8>, T, Vec<u8>>(value) {
        Ok(bytes) => return Ok(bytes),
        Err(value) => value,
    };
    cast::<ByteBuf, T, ByteBuf>(value).map(ByteBuf::into_vec)
}

/// The byte string of `args` if they are one owned `Vec<u8>` or `ByteBuf` by position,
/// `(data,)`: arguments that may be sent from their own memory.
pub(crate) fn into_one_vec<T>(args: T) -> Result<Vec<u8>, T> {
    let args = match cast::<(Vec<u8>,), T, (Vec<u8>,)>(args) {
        Ok((bytes,)) => return Ok(bytes),
        Err(args) => args,
    };
    cast::<(ByteBuf,), T, (ByteBuf,)>(args).map(|(bytes,)| bytes.into_vec())
}

/// A payload that is one `bin`, as a `Vec<u8>` or a `ByteBuf` (`T`): it takes over the
/// payload's buffer when nothing else holds it, its bytes moved to the front in place
/// (no fresh pages to fault in, as a copy of tens of MiB would); otherwise one copy, as
/// decoding makes. `kept`, the reader's hold on the buffer, is ended first. `Err` gives
/// the payload back for any other type or payload.
pub(super) fn whole_bin<T>(payload: Bytes, kept: Option<&KeptBuffer>) -> Result<T, Bytes> {
    if !(is::<T, Vec<u8>>() || is::<T, ByteBuf>()) {
        return Err(payload);
    }
    let Some(header) = bin_header_len(&payload) else {
        return Err(payload);
    };
    if let Some(kept) = kept {
        kept.release();
        // The reader reads its next large frame into a buffer that came back instead.
        super::pool::lend_to_readers();
    }
    let vec = take_from(payload, header);
    let value = match cast::<Vec<u8>, Vec<u8>, T>(vec) {
        Ok(vec) => Ok(vec),
        Err(vec) => cast::<ByteBuf, ByteBuf, T>(ByteBuf::from(vec)),
    };
    // `T` is one of the two (checked above), so this is never `Err`.
    Ok(value.unwrap_or_else(|_| unreachable!("`T` is `Vec<u8>` or `ByteBuf`")))
}

/// Whether parameters `T` are one `Vec<u8>` or `ByteBuf`, `(data,)` (constant once
/// inlined).
#[inline(always)]
pub(super) fn is_lone_bin_param<T>() -> bool {
    is::<T, (Vec<u8>,)>() || is::<T, (ByteBuf,)>()
}

/// A callback's parameters `T` that are one `Vec<u8>` or `ByteBuf`, `(data,)`, from
/// arguments whose value, from `at` on, is one `bin` running to the end of `payload`:
/// taken over as [`whole_bin`] takes a result. `hold` gives the reader's hold on the
/// buffer, ended first. `Err` gives the payload back for any other type or payload.
pub(super) fn lone_bin_param<T>(
    payload: Bytes,
    at: usize,
    hold: impl FnOnce() -> Option<KeptBuffer>,
) -> Result<T, Bytes> {
    if !is_lone_bin_param::<T>() {
        return Err(payload);
    }
    let Some(header) = payload.get(at..).and_then(bin_header_len) else {
        return Err(payload);
    };
    if let Some(kept) = hold() {
        kept.release();
        // The reader reads its next large frame into a buffer that came back instead.
        super::pool::lend_to_readers();
    }
    let vec = take_from(payload, at + header);
    let value = match cast::<(Vec<u8>,), (Vec<u8>,), T>((vec,)) {
        Ok(params) => Ok(params),
        Err((vec,)) => cast::<(ByteBuf,), (ByteBuf,), T>((ByteBuf::from(vec),)),
    };
    // `T` is one of the two (checked above), so this is never `Err`.
    Ok(value.unwrap_or_else(|_| unreachable!("`T` is `(Vec<u8>,)` or `(ByteBuf,)`")))
}

/// The bytes of `payload` from `start` on, in the payload's own buffer if nothing else
/// holds it (moved to its front), or copied. A large buffer over twice their size is
/// shrunk to them: a reader reads smaller frames into the buffer it kept from a larger
/// one, and a value the user keeps must not hold all of it.
fn take_from(payload: Bytes, start: usize) -> Vec<u8> {
    let mut data = payload;
    data.advance(start);
    let mut vec = Vec::from(data);
    if vec.capacity() / 2 > vec.len().max(super::pool::POOLED) {
        vec.shrink_to_fit();
    }
    vec
}

/// The length of the `bin` header `payload` starts with, if the `bin` is all of it.
fn bin_header_len(payload: &[u8]) -> Option<usize> {
    let (header, len) = match *payload {
        [0xc4, n, ..] => (2, usize::from(n)),
        [0xc5, a, b, ..] => (3, usize::from(u16::from_be_bytes([a, b]))),
        [0xc6, a, b, c, d, ..] => (5, u32::from_be_bytes([a, b, c, d]) as usize),
        _ => return None,
    };
    (payload.len() - header == len).then_some(header)
}

/// The visitor that `T`'s `Deserialize` hands a deserializer: found by asking a
/// deserializer that only notes it (constant once inlined).
#[inline(always)]
fn visitor_of<T: for<'de> Deserialize<'de>>() -> Option<TypeId> {
    match T::deserialize(VisitorProbe) {
        Err(Probed(visitor)) => visitor,
        Ok(_) => None,
    }
}

/// Whether `V` is the visitor `T`'s own `Deserialize` uses.
#[inline(always)]
fn visitor_is<V, T: for<'de> Deserialize<'de>>() -> bool {
    visitor_of::<T>() == Some(typeid::of::<V>())
}

/// A deserializer that fails at once, with the type of the visitor it was given.
struct VisitorProbe;

#[derive(Debug)]
struct Probed(Option<TypeId>);

impl fmt::Display for Probed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a probe, not a value")
    }
}

impl std::error::Error for Probed {}

impl serde::de::Error for Probed {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Probed(None)
    }
}

impl<'de> Deserializer<'de> for VisitorProbe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probed> {
        Err(Probed(Some(typeid::of::<V>())))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

/// A byte string type read in one go.
trait ByteString: Plain + Sized {
    /// From bytes of the payload being decoded.
    fn from_payload(bytes: &[u8]) -> Self;
    /// From bytes that live only for the call.
    fn from_transient(bytes: &[u8]) -> Self;
    /// From bytes already owned.
    fn from_vec(bytes: Vec<u8>) -> Self;
}

impl ByteString for Vec<u8> {
    fn from_payload(bytes: &[u8]) -> Self {
        super::pool::vec_of(bytes)
    }

    fn from_transient(bytes: &[u8]) -> Self {
        super::pool::vec_of(bytes)
    }

    fn from_vec(bytes: Vec<u8>) -> Self {
        bytes
    }
}

impl ByteString for Bytes {
    fn from_payload(bytes: &[u8]) -> Self {
        super::slice_of_source(bytes).unwrap_or_else(|| Bytes::copy_from_slice(bytes))
    }

    fn from_transient(bytes: &[u8]) -> Self {
        Bytes::copy_from_slice(bytes)
    }

    fn from_vec(bytes: Vec<u8>) -> Self {
        Bytes::from(bytes)
    }
}

impl ByteString for ByteBuf {
    fn from_payload(bytes: &[u8]) -> Self {
        ByteBuf::from(super::pool::vec_of(bytes))
    }

    fn from_transient(bytes: &[u8]) -> Self {
        ByteBuf::from(super::pool::vec_of(bytes))
    }

    fn from_vec(bytes: Vec<u8>) -> Self {
        ByteBuf::from(bytes)
    }
}

/// Wraps a deserializer so that every value inside reads its byte strings in one go.
/// Costs nothing where there are none: the wrappers are inlined away.
pub(super) struct Decoder<D>(pub D);

/// Methods that read a value with nothing inside: passed on as they are.
macro_rules! forward_plain {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[inline]
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            self.0.$method($($arg,)* visitor)
        }
    )*};
}

/// Methods that read a value that may hold others: the visitor is wrapped.
macro_rules! forward_nested {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[inline]
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            self.0.$method($($arg,)* Nested(visitor))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Decoder<D> {
    type Error = D::Error;

    forward_plain! {
        deserialize_bool(); deserialize_i8(); deserialize_i16(); deserialize_i32();
        deserialize_i64(); deserialize_i128(); deserialize_u8(); deserialize_u16();
        deserialize_u32(); deserialize_u64(); deserialize_u128(); deserialize_f32();
        deserialize_f64(); deserialize_char(); deserialize_str(); deserialize_string();
        deserialize_bytes(); deserialize_unit(); deserialize_unit_struct(name: &'static str);
        deserialize_identifier(); deserialize_ignored_any();
    }

    forward_nested! {
        deserialize_any(); deserialize_option(); deserialize_map();
        deserialize_newtype_struct(name: &'static str);
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
    }

    #[inline]
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        if visitor_is::<V, Vec<u8>>() {
            // Asked for bytes, the deserializer gives a `bin` whole (an array still
            // comes as a sequence).
            return self
                .0
                .deserialize_byte_buf(InOneGo::<V, Vec<u8>>::new(visitor));
        }
        self.0.deserialize_seq(Nested(visitor))
    }

    #[inline]
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        if visitor_is::<V, Bytes>() {
            return self
                .0
                .deserialize_byte_buf(InOneGo::<V, Bytes>::new(visitor));
        }
        if visitor_is::<V, ByteBuf>() {
            return self
                .0
                .deserialize_byte_buf(InOneGo::<V, ByteBuf>::new(visitor));
        }
        self.0.deserialize_byte_buf(visitor)
    }

    #[inline]
    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// The visitor of `Vec<u8>` or `Bytes` (`P`), given a `bin` in one piece.
struct InOneGo<V, P> {
    visitor: V,
    target: std::marker::PhantomData<P>,
}

impl<V, P> InOneGo<V, P> {
    fn new(visitor: V) -> Self {
        InOneGo {
            visitor,
            target: std::marker::PhantomData,
        }
    }
}

impl<'de, V: Visitor<'de>, P: ByteString> InOneGo<V, P> {
    /// `bytes` as the visitor's value; `otherwise` if that is not `P` after all.
    #[inline]
    fn take<E: serde::de::Error>(
        self,
        bytes: P,
        otherwise: impl FnOnce(V, P) -> Result<V::Value, E>,
    ) -> Result<V::Value, E> {
        match cast::<P, P, V::Value>(bytes) {
            Ok(value) => Ok(value),
            Err(bytes) => otherwise(self.visitor, bytes),
        }
    }
}

impl<'de, V: Visitor<'de>, P: ByteString + AsRef<[u8]>> Visitor<'de> for InOneGo<V, P> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<V::Value, E> {
        self.take(P::from_payload(v), |visitor, _| {
            visitor.visit_borrowed_bytes(v)
        })
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
        self.take(P::from_transient(v), |visitor, _| visitor.visit_bytes(v))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<V::Value, E> {
        self.take(P::from_vec(v), |visitor, bytes| {
            visitor.visit_bytes(bytes.as_ref())
        })
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.visitor.visit_str(v)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        self.visitor.visit_borrowed_str(v)
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<V::Value, E> {
        self.visitor.visit_string(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_seq(seq)
    }
}

/// A visitor whose values inside are read through [`Decoder`].
struct Nested<V>(V);

/// Visits of a value with nothing inside: passed on as they are.
macro_rules! visit_plain {
    ($($method:ident($ty:ty);)*) => {$(
        #[inline]
        fn $method<E: serde::de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.0.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Nested<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    visit_plain! {
        visit_bool(bool); visit_i8(i8); visit_i16(i16); visit_i32(i32); visit_i64(i64);
        visit_i128(i128); visit_u8(u8); visit_u16(u16); visit_u32(u32); visit_u64(u64);
        visit_u128(u128); visit_f32(f32); visit_f64(f64); visit_char(char);
        visit_str(&str); visit_borrowed_str(&'de str); visit_string(String);
        visit_bytes(&[u8]); visit_borrowed_bytes(&'de [u8]); visit_byte_buf(Vec<u8>);
    }

    #[inline]
    fn visit_none<E: serde::de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_none()
    }

    #[inline]
    fn visit_unit<E: serde::de::Error>(self) -> Result<V::Value, E> {
        self.0.visit_unit()
    }

    #[inline]
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.0.visit_some(Decoder(deserializer))
    }

    #[inline]
    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<V::Value, D::Error> {
        self.0.visit_newtype_struct(Decoder(deserializer))
    }

    #[inline]
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.0.visit_seq(Nested(seq))
    }

    #[inline]
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(Nested(map))
    }

    #[inline]
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.0.visit_enum(Nested(data))
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Nested<S> {
    type Value = S::Value;

    #[inline]
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Decoder(deserializer))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Nested<A> {
    type Error = A::Error;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Nested(seed))
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Nested<A> {
    type Error = A::Error;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(seed)
    }

    #[inline]
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Nested(seed))
    }

    #[inline]
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Nested<A> {
    type Error = A::Error;
    type Variant = Nested<A::Variant>;

    #[inline]
    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let (name, variant) = self.0.variant_seed(seed)?;
        Ok((name, Nested(variant)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Nested<A> {
    type Error = A::Error;

    #[inline]
    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    #[inline]
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Nested(seed))
    }

    #[inline]
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Nested(visitor))
    }

    #[inline]
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Nested(visitor))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::codec::{decode, encode_value, BLOB_BY_REFERENCE};

    /// Sizes on both sides of the by-reference threshold.
    const SIZES: [usize; 4] = [0, 200, BLOB_BY_REFERENCE - 1, 3 * BLOB_BY_REFERENCE];

    #[test]
    fn a_string_taken_over_does_not_hold_a_much_larger_buffer() {
        const LEN: usize = 1 << 20;
        // A reader's kept buffer of 8 MiB, a 1 MiB `bin` read into it.
        let mut buffer = Vec::with_capacity(8 * LEN);
        buffer.extend_from_slice(&[0xc6, 0, 0x10, 0, 0]);
        buffer.extend(bytes_of(LEN));
        let taken: Vec<u8> = whole_bin(Bytes::from(buffer), None).expect("a whole bin");
        assert!(taken == bytes_of(LEN));
        assert!(
            taken.capacity() <= 2 * LEN,
            "{} bytes held",
            taken.capacity()
        );
        // A buffer of about the string's size is taken as it is.
        let mut buffer = Vec::with_capacity(LEN + 64);
        buffer.extend_from_slice(&[0xc6, 0, 0x10, 0, 0]);
        buffer.extend(bytes_of(LEN));
        let at_fitting = buffer.as_ptr();
        let taken: Vec<u8> = whole_bin(Bytes::from(buffer), None).expect("a whole bin");
        assert_eq!(taken.as_ptr(), at_fitting, "moved in place, not copied");
        assert!(taken == bytes_of(LEN));
    }

    fn bytes_of(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 128) as u8).collect()
    }

    /// What `rmp_serde` writes for `value` with byte strings as `bin`.
    fn plain_bin(bytes: &[u8]) -> Vec<u8> {
        rmp_serde::to_vec(&Bytes::copy_from_slice(bytes)).expect("encodes")
    }

    fn wire<T: Serialize + ?Sized>(value: &T) -> Bytes {
        encode_value(value).expect("encodes").to_bytes()
    }

    #[test]
    fn byte_sequences_in_one_slice_are_written_as_bin() {
        for len in SIZES {
            let data = bytes_of(len);
            let bin = plain_bin(&data);
            assert_eq!(wire(&data)[..], bin[..], "Vec<u8> of {len}");
            assert_eq!(wire(&data[..])[..], bin[..], "[u8] of {len}");
            assert_eq!(wire(&&data[..])[..], bin[..], "&[u8] of {len}");
            assert_eq!(wire(&data.clone().into_boxed_slice())[..], bin[..]);
            assert_eq!(wire(&Bytes::from(data.clone()))[..], bin[..]);
        }
        // Other sequences of bytes stay arrays of integers (both forms decode the same).
        let deque: VecDeque<u8> = VecDeque::from(vec![1, 200]);
        assert_eq!(&wire(&deque)[..], &[0x92, 0x01, 0xcc, 200]);
        // Fixed-size arrays are tuples to serde.
        assert_eq!(&wire(&[1u8, 2])[..], &[0x92, 0x01, 0x02]);
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Raw(Vec<u8>),
        Named { data: Vec<u8> },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Photo {
        name: String,
        pixels: Vec<u8>,
        thumbnail: Option<Vec<u8>>,
        tags: Vec<Vec<u8>>,
        shapes: Vec<Shape>,
        raw: Bytes,
    }

    fn photo(len: usize) -> Photo {
        Photo {
            name: "cat".into(),
            pixels: bytes_of(len),
            thumbnail: Some(bytes_of(len / 2)),
            tags: vec![b"a".to_vec(), bytes_of(len)],
            shapes: vec![
                Shape::Raw(bytes_of(3)),
                Shape::Named {
                    data: bytes_of(len),
                },
            ],
            raw: Bytes::from(bytes_of(len)),
        }
    }

    /// `Photo` with every byte string a `Bytes`: what it looks like with `bin`s.
    #[derive(Serialize)]
    enum BinShape {
        Raw(Bytes),
        Named { data: Bytes },
    }

    #[derive(Serialize)]
    struct BinPhoto {
        name: String,
        pixels: Bytes,
        thumbnail: Option<Bytes>,
        tags: Vec<Bytes>,
        shapes: Vec<BinShape>,
        raw: Bytes,
    }

    #[test]
    fn nested_byte_strings_are_bin_and_come_back_whole() {
        let bin = |len: usize| Bytes::from(bytes_of(len));
        for len in SIZES {
            let sent = photo(len);
            let payload = wire(&sent);
            let as_bin = BinPhoto {
                name: "cat".into(),
                pixels: bin(len),
                thumbnail: Some(bin(len / 2)),
                tags: vec![Bytes::from_static(b"a"), bin(len)],
                shapes: vec![BinShape::Raw(bin(3)), BinShape::Named { data: bin(len) }],
                raw: bin(len),
            };
            let expected = rmp_serde::to_vec_named(&as_bin).expect("encodes");
            assert_eq!(payload[..], expected[..], "{len} bytes");
            let back: Photo = decode(&payload).expect("decodes");
            assert_eq!(back, sent, "{len} bytes");
        }
    }

    #[test]
    fn a_vec_of_bytes_decodes_from_an_array_of_integers_too() {
        for len in SIZES {
            let data = bytes_of(len);
            // What older peers (and `serde` without daffi) send: an array of integers.
            let array = Bytes::from(rmp_serde::to_vec(&data).expect("encodes"));
            assert_eq!(decode::<Vec<u8>>(&array).expect("decodes"), data);
            let bin = Bytes::from(plain_bin(&data));
            assert_eq!(decode::<Vec<u8>>(&bin).expect("decodes"), data);
            assert_eq!(decode::<Bytes>(&array).expect("decodes"), data);
            assert_eq!(decode::<Bytes>(&bin).expect("decodes"), data);
            // In a struct, either form.
            #[derive(Serialize)]
            struct Old {
                pixels: Vec<u8>,
            }
            let old = Bytes::from(
                rmp_serde::to_vec_named(&Old {
                    pixels: data.clone(),
                })
                .unwrap(),
            );
            #[derive(Deserialize)]
            struct New {
                pixels: Vec<u8>,
            }
            assert_eq!(decode::<New>(&old).expect("decodes").pixels, data);
        }
    }

    #[test]
    fn bytes_decoded_from_a_large_payload_share_its_memory() {
        let data = bytes_of(3 * BLOB_BY_REFERENCE);
        let payload = wire(&(1u8, Bytes::from(data.clone())));
        let (_, back): (u8, Bytes) = decode(&payload).expect("decodes");
        assert_eq!(back, data);
        let inside = payload.as_ptr() as usize..payload.as_ptr() as usize + payload.len();
        assert!(
            inside.contains(&(back.as_ptr() as usize)),
            "a slice of the payload"
        );
    }

    #[test]
    fn bytes_are_written_from_their_own_memory() {
        let big = Bytes::from(bytes_of(3 * BLOB_BY_REFERENCE));
        for payload in [encode_value(&(&big,)), encode_value(&big)] {
            let payload = payload.expect("encodes");
            let parts: Vec<&Bytes> = payload.parts().collect();
            assert!(
                parts.iter().any(|p| p.as_ptr() == big.as_ptr()),
                "not copied"
            );
        }
    }

    /// A visitor of its own that makes a `Vec<u8>` from a sequence: each byte plus one.
    fn plus_one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct PlusOne;
        impl<'de> Visitor<'de> for PlusOne {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b.wrapping_add(1));
                }
                Ok(out)
            }
        }
        deserializer.deserialize_seq(PlusOne)
    }

    #[test]
    fn other_visitors_of_bytes_are_left_alone() {
        #[derive(Deserialize)]
        struct Custom {
            #[serde(deserialize_with = "plus_one")]
            data: Vec<u8>,
        }
        let data = bytes_of(3 * BLOB_BY_REFERENCE);
        let back: Custom = decode(&wire(&BTreeMap::from([("data", &data)]))).expect("decodes");
        let expected: Vec<u8> = data.iter().map(|b| b.wrapping_add(1)).collect();
        assert_eq!(back.data, expected);
    }

    #[test]
    fn a_whole_bin_takes_over_its_payload_when_nothing_else_holds_it() {
        for len in [0, 200, 70_000] {
            let data = bytes_of(len);
            let payload = Bytes::from(plain_bin(&data));
            let at = payload.as_ptr();
            let back: Vec<u8> = whole_bin(payload, None).expect("a Vec of a bin");
            assert_eq!(back, data);
            assert_eq!(back.as_ptr(), at, "{len} bytes moved in place, not copied");
            // Held elsewhere too: copied, the payload left as it was.
            let payload = Bytes::from(plain_bin(&data));
            let held = payload.clone();
            let back: ByteBuf = whole_bin(payload, None).expect("a ByteBuf of a bin");
            assert_eq!(back.as_slice(), &data[..]);
            assert_eq!(held[..], plain_bin(&data)[..]);
        }
        // Other types, and payloads that are more than a bin, are given back.
        let bin = Bytes::from(plain_bin(&[1, 2]));
        assert_eq!(whole_bin::<Bytes>(bin.clone(), None), Err(bin.clone()));
        let mut longer = bin.to_vec();
        longer.push(0xc0);
        let longer = Bytes::from(longer);
        assert_eq!(whole_bin::<Vec<u8>>(longer.clone(), None), Err(longer));
        let array = Bytes::from(rmp_serde::to_vec(&[1u8, 2]).expect("encodes"));
        assert_eq!(whole_bin::<Vec<u8>>(array.clone(), None), Err(array));
        assert_eq!(whole_bin::<Vec<u8>>(Bytes::new(), None), Err(Bytes::new()));
    }

    #[test]
    fn owned_byte_arguments_are_taken_as_they_are() {
        assert_eq!(into_one_vec((vec![1u8, 2],)), Ok(vec![1, 2]));
        assert_eq!(into_one_vec((ByteBuf::from([3u8]),)), Ok(vec![3]));
        assert_eq!(
            into_one_vec(vec![4u8]),
            Err(vec![4u8]),
            "alone: see into_vec"
        );
        assert_eq!(into_one_vec((vec![1u8], 2u8)), Err((vec![1u8], 2u8)));
        assert_eq!(into_one_vec((vec![1u16],)), Err((vec![1u16],)));
        let data = vec![5u8];
        assert_eq!(into_one_vec((&data,)), Err((&data,)), "borrowed: copied");
    }

    #[test]
    fn only_a_vec_of_bytes_is_taken_as_one() {
        assert_eq!(into_vec(vec![1u8, 2]), Ok(vec![1, 2]));
        assert_eq!(into_vec(ByteBuf::from([3u8])), Ok(vec![3]));
        assert_eq!(into_vec(vec![1i8]), Err(vec![1i8]));
        assert_eq!(into_vec("text"), Err("text"));
        assert_eq!(as_slice(&&[1u8][..]), Some(&[1u8][..]));
        assert_eq!(as_slice(&&vec![2u8]), Some(&[2u8][..]));
        assert_eq!(as_slice(&vec![2u8]), None, "serde hands over a reference");
        assert_eq!(as_slice(&&vec![2u16]), None);
        assert!(as_bytes(&Bytes::new()).is_some() && as_bytes(&&Bytes::new()).is_some());
        assert!(as_bytes(&vec![1u8]).is_none());
        assert!(visitor_of::<Vec<u8>>().is_some() && visitor_of::<Bytes>().is_some());
        assert_ne!(visitor_of::<Vec<u8>>(), visitor_of::<Vec<u16>>());
        assert_ne!(visitor_of::<Vec<u8>>(), visitor_of::<Bytes>());
    }
}
