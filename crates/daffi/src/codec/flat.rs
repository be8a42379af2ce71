//! A direct MessagePack writer for the commonest small values: a scalar, or a tuple (or
//! array) of up to 15 scalars (integers, bools, floats, chars and short strings), such
//! as the arguments `.args((10, 3))` or `.args(("x", 2))`. It writes the very bytes
//! rmp-serde writes for them (the shortest forms `rmp`'s encoders choose; the tests
//! compare the two on the edge values) into a buffer on the stack, without the
//! serializer's scratch buffer, its depth adapter and its parts writer. Anything else
//! (a struct, a map, a nested list, bytes, an option, a value too long for the buffer)
//! is refused at its first sight, and [`encode_value`](super::encode_value) takes its
//! ordinary path.

use std::fmt;

use serde::ser::{Impossible, Serialize, SerializeTuple, Serializer};

use daffi_wire::Payload;

/// The most bytes a value written here takes (longer ones take the ordinary path).
const CAPACITY: usize = 128;

/// The largest tuple written here: its length fits the one-byte `fixarray` marker.
const MAX_ITEMS: usize = 15;

/// `value` encoded as rmp-serde encodes it, if it is a scalar or a flat tuple of
/// scalars that fits [`CAPACITY`]; `None` for anything else.
#[inline]
pub(super) fn encode<T: Serialize + ?Sized>(value: &T) -> Option<Payload> {
    let mut out = Flat::new();
    value.serialize(Top(&mut out)).ok()?;
    Some(super::small_payload(out.bytes()))
}

/// The bytes written so far.
pub(super) struct Flat {
    buf: [u8; CAPACITY],
    len: usize,
}

impl Flat {
    /// An empty buffer.
    #[inline(always)]
    pub(super) fn new() -> Flat {
        Flat {
            buf: [0; CAPACITY],
            len: 0,
        }
    }

    /// What was written.
    #[inline(always)]
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Appends a marker and the big-endian bytes after it; refused if they do not fit.
    #[inline(always)]
    fn put<const N: usize>(&mut self, marker: u8, data: [u8; N]) -> Result<(), Refused> {
        let end = self.len + 1 + N;
        let Some(room) = self.buf.get_mut(self.len..end) else {
            return Err(Refused);
        };
        room[0] = marker;
        room[1..].copy_from_slice(&data);
        self.len = end;
        Ok(())
    }

    /// One byte (a fixint, a fixarray's marker, a bool).
    #[inline(always)]
    fn byte(&mut self, b: u8) -> Result<(), Refused> {
        self.put(b, [])
    }

    /// A signed integer in its shortest form, as `rmp::encode::write_sint` writes it.
    #[inline(always)]
    pub(super) fn sint(&mut self, v: i64) -> Result<(), Refused> {
        match v {
            0.. => self.uint(v as u64),
            -32..=-1 => self.byte(v as u8),
            -128..=-33 => self.put(0xd0, (v as i8).to_be_bytes()),
            -32_768..=-129 => self.put(0xd1, (v as i16).to_be_bytes()),
            -2_147_483_648..=-32_769 => self.put(0xd2, (v as i32).to_be_bytes()),
            _ => self.put(0xd3, v.to_be_bytes()),
        }
    }

    /// An unsigned integer in its shortest form, as `rmp::encode::write_uint` writes it.
    #[inline(always)]
    pub(super) fn uint(&mut self, v: u64) -> Result<(), Refused> {
        match v {
            0..=127 => self.byte(v as u8),
            128..=255 => self.put(0xcc, [v as u8]),
            256..=65_535 => self.put(0xcd, (v as u16).to_be_bytes()),
            65_536..=4_294_967_295 => self.put(0xce, (v as u32).to_be_bytes()),
            _ => self.put(0xcf, v.to_be_bytes()),
        }
    }

    /// A string, its length in the shortest form, as `rmp::encode::write_str` writes it.
    #[inline(always)]
    fn str(&mut self, v: &str) -> Result<(), Refused> {
        let len = v.len();
        // Checked first, with the longest length form: nothing written if it does not fit.
        if len + 5 > CAPACITY - self.len {
            return Err(Refused);
        }
        match len {
            0..=31 => self.byte(0xa0 | len as u8)?,
            32..=255 => self.put(0xd9, [len as u8])?,
            // Never longer than the buffer.
            _ => self.put(0xda, (len as u16).to_be_bytes())?,
        }
        self.buf[self.len..self.len + len].copy_from_slice(v.as_bytes());
        self.len += len;
        Ok(())
    }
}

/// A value this writer does not take (the ordinary path does).
#[derive(Debug)]
pub(super) struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a flat value")
    }
}

impl std::error::Error for Refused {}

impl serde::ser::Error for Refused {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Refused
    }
}

/// The scalars, the same at the top and inside the tuple.
macro_rules! scalars {
    () => {
        /// As rmp-serde's serializer says (its default, binary config): types such as
        /// IP addresses then take their compact forms, as they do on the ordinary path.
        fn is_human_readable(&self) -> bool {
            false
        }
        #[inline]
        fn serialize_bool(self, v: bool) -> Result<(), Refused> {
            self.0.byte(if v { 0xc3 } else { 0xc2 })
        }
        #[inline]
        fn serialize_i8(self, v: i8) -> Result<(), Refused> {
            self.0.sint(i64::from(v))
        }
        #[inline]
        fn serialize_i16(self, v: i16) -> Result<(), Refused> {
            self.0.sint(i64::from(v))
        }
        #[inline]
        fn serialize_i32(self, v: i32) -> Result<(), Refused> {
            self.0.sint(i64::from(v))
        }
        #[inline]
        fn serialize_i64(self, v: i64) -> Result<(), Refused> {
            self.0.sint(v)
        }
        #[inline]
        fn serialize_u8(self, v: u8) -> Result<(), Refused> {
            self.0.uint(u64::from(v))
        }
        #[inline]
        fn serialize_u16(self, v: u16) -> Result<(), Refused> {
            self.0.uint(u64::from(v))
        }
        #[inline]
        fn serialize_u32(self, v: u32) -> Result<(), Refused> {
            self.0.uint(u64::from(v))
        }
        #[inline]
        fn serialize_u64(self, v: u64) -> Result<(), Refused> {
            self.0.uint(v)
        }
        #[inline]
        fn serialize_f32(self, v: f32) -> Result<(), Refused> {
            self.0.put(0xca, v.to_bits().to_be_bytes())
        }
        #[inline]
        fn serialize_f64(self, v: f64) -> Result<(), Refused> {
            self.0.put(0xcb, v.to_bits().to_be_bytes())
        }
        #[inline]
        fn serialize_char(self, v: char) -> Result<(), Refused> {
            self.0.str(v.encode_utf8(&mut [0; 4]))
        }
        #[inline]
        fn serialize_str(self, v: &str) -> Result<(), Refused> {
            self.0.str(v)
        }
        fn serialize_i128(self, _: i128) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_u128(self, _: u128) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_bytes(self, _: &[u8]) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_none(self) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_unit(self) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
        ) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: &T,
        ) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<(), Refused> {
            Err(Refused)
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Refused> {
            Err(Refused)
        }
        fn serialize_tuple_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleStruct, Refused> {
            Err(Refused)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleVariant, Refused> {
            Err(Refused)
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Refused> {
            Err(Refused)
        }
        fn serialize_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStruct, Refused> {
            Err(Refused)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStructVariant, Refused> {
            Err(Refused)
        }
    };
}

/// The value itself: a scalar, or a tuple of them.
struct Top<'a>(&'a mut Flat);

impl<'a> Serializer for Top<'a> {
    type Ok = ();
    type Error = Refused;
    type SerializeSeq = Impossible<(), Refused>;
    type SerializeTuple = Items<'a>;
    type SerializeTupleStruct = Impossible<(), Refused>;
    type SerializeTupleVariant = Impossible<(), Refused>;
    type SerializeMap = Impossible<(), Refused>;
    type SerializeStruct = Impossible<(), Refused>;
    type SerializeStructVariant = Impossible<(), Refused>;

    scalars!();

    #[inline]
    fn serialize_tuple(self, len: usize) -> Result<Items<'a>, Refused> {
        if len > MAX_ITEMS {
            return Err(Refused);
        }
        // A `fixarray`, as `rmp::encode::write_array_len` writes one this short.
        self.0.byte(0x90 | len as u8)?;
        Ok(Items(self.0))
    }
}

/// The items of a tuple.
struct Items<'a>(&'a mut Flat);

impl SerializeTuple for Items<'_> {
    type Ok = ();
    type Error = Refused;

    #[inline]
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Refused> {
        value.serialize(Item(self.0))
    }

    #[inline]
    fn end(self) -> Result<(), Refused> {
        Ok(())
    }
}

/// One item of a tuple: a scalar only.
struct Item<'a>(&'a mut Flat);

impl Serializer for Item<'_> {
    type Ok = ();
    type Error = Refused;
    type SerializeSeq = Impossible<(), Refused>;
    type SerializeTuple = Impossible<(), Refused>;
    type SerializeTupleStruct = Impossible<(), Refused>;
    type SerializeTupleVariant = Impossible<(), Refused>;
    type SerializeMap = Impossible<(), Refused>;
    type SerializeStruct = Impossible<(), Refused>;
    type SerializeStructVariant = Impossible<(), Refused>;

    scalars!();

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Refused> {
        Err(Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the ordinary path writes (rmp-serde, structs as maps).
    fn ordinary<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
        rmp_serde::to_vec_named(value).unwrap()
    }

    /// `value` is written here, with rmp-serde's bytes.
    fn same<T: Serialize + ?Sized + fmt::Debug>(value: &T) {
        let flat = encode(value).unwrap_or_else(|| panic!("{value:?} was refused"));
        assert_eq!(flat.into_bytes().to_vec(), ordinary(value), "{value:?}");
        let full = crate::codec::encode_value(value).unwrap();
        assert_eq!(
            full.into_bytes().to_vec(),
            ordinary(value),
            "{value:?} through encode_value"
        );
    }

    /// `value` is left to the ordinary path (which writes byte strings as `bin`,
    /// unlike plain rmp-serde: see `codec`'s own tests).
    fn refused<T: Serialize + ?Sized + fmt::Debug>(value: &T) {
        assert!(encode(value).is_none(), "{value:?} was taken");
        assert!(crate::codec::encode_value(value).is_ok(), "{value:?}");
    }

    const SIGNED: &[i64] = &[
        i64::MIN,
        i64::MIN + 1,
        -2_147_483_649,
        -2_147_483_648,
        -32_769,
        -32_768,
        -129,
        -128,
        -33,
        -32,
        -31,
        -1,
        0,
        1,
        127,
        128,
        255,
        256,
        65_535,
        65_536,
        4_294_967_295,
        4_294_967_296,
        i64::MAX,
    ];

    #[test]
    fn integers_as_rmp_serde_writes_them() {
        for &v in SIGNED {
            same(&v);
            same(&(v,));
            same(&(v, 1));
            same(&(1u8, v, -7i8));
            same(&(v as i32, v as i16, v as i8));
            same(&(v as u64, v as u32, v as u16, v as u8));
        }
        for v in [u64::MAX, i64::MAX as u64 + 1, 1 << 63 | 5, 0, 127, 128] {
            same(&v);
            same(&(v, v));
        }
    }

    #[test]
    fn strings_floats_and_bools_as_rmp_serde_writes_them() {
        let long31 = "s".repeat(31);
        let long32 = "s".repeat(32);
        let fits = "é".repeat(60); // 120 bytes: a `str8`
        for s in ["", "x", "héllo", &long31, &long32, &fits] {
            same(&(s,));
            same(&(s, 2i64));
            same(&s);
        }
        same(&(true, false, 'x', 'é', '🦀'));
        same(&(1.5f64, -0.0f64, f64::NAN, f64::INFINITY, 3.25f32));
        same(&[1i64, 2, 3]);
        same(&[7i64; 15]);
        // Written by serde as a tuple of four `u8` (not as a string): a binary format.
        same(&std::net::Ipv4Addr::new(10, 0, 0, 1));
        same(&(1, -2, 3u8, "four", 5.0, '6', true, 8, 9, 10, 11, 12));
    }

    #[test]
    fn other_values_take_the_ordinary_path() {
        #[derive(serde::Serialize, Debug)]
        struct Point {
            x: i64,
        }
        refused(&"s".repeat(124)); // past the buffer with its marker
        refused(&("a".repeat(100), "b".repeat(30)));
        refused(&[7i64; 16]);
        refused(&Point { x: 1 });
        refused(&(Point { x: 1 },));
        refused(&(1, vec![1u8, 2]));
        refused(&vec![1i64, 2]);
        refused(&(Some(1),));
        refused(&((1, 2),));
        refused(&(1i128,));
        refused(&(std::net::Ipv4Addr::new(10, 0, 0, 1),));
        refused(&());
        refused(&(serde_bytes::ByteBuf::from(vec![1u8]),));
    }
}
