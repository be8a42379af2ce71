//! A depth limit for encoding. Serde serializes a value with a native stack frame or a
//! few per level of nesting, so a value nested deep enough overflows the stack of the
//! thread that encodes it, which aborts the process. rmp-serde's decoder refuses input
//! nested deeper than [`MAX_DEPTH`] lists and maps; this adapter makes the encoder
//! refuse such a value too, with an error, before the stack runs out.
//!
//! [`Limited`] wraps a value, and [`Depth`] the serializer it is given. What the decoder
//! counts (a sequence, tuple, map or struct, an enum variant with data) counts here the
//! same; options and newtypes, which the encoding leaves out, have a budget of their
//! own, since they recurse too. Everything else passes through untouched (bytes keep
//! their address, which [`Blob`](crate::Blob)s rely on), but for byte strings: a
//! sequence of bytes in one slice is written as a `bin`, and a `bytes::Bytes` from its
//! own memory (see [`byte_strings`]).

use super::byte_strings;
use serde::ser::{
    Serialize, SerializeMap, SerializeSeq, SerializeStruct, SerializeStructVariant, SerializeTuple,
    SerializeTupleStruct, SerializeTupleVariant, Serializer,
};

/// How many lists and maps an argument or a result may hold inside one another: as
/// many as rmp-serde's decoder reads (its default limit of 1024 refuses the 1024th),
/// so that whatever is sent can be read. Options and newtypes inside one another have
/// the same allowance, apart.
pub const MAX_DEPTH: u32 = 1023;

/// The levels of nesting left.
#[derive(Clone, Copy)]
struct Left {
    /// Lists and maps (as encoded: an enum variant with data is a map).
    containers: u32,
    /// Options and newtypes.
    wrappers: u32,
}

impl Left {
    const ALL: Left = Left {
        containers: MAX_DEPTH,
        wrappers: MAX_DEPTH,
    };

    /// Inside `containers` more lists or maps; an error if that is too deep.
    #[inline]
    fn enter<E: serde::ser::Error>(self, containers: u32) -> Result<Left, E> {
        match self.containers.checked_sub(containers) {
            Some(left) => Ok(Left {
                containers: left,
                ..self
            }),
            None => Err(too_deep()),
        }
    }

    /// Inside one more option or newtype; an error if that is too deep.
    #[inline]
    fn wrap<E: serde::ser::Error>(self) -> Result<Left, E> {
        match self.wrappers.checked_sub(1) {
            Some(left) => Ok(Left {
                wrappers: left,
                ..self
            }),
            None => Err(too_deep()),
        }
    }
}

#[cold]
fn too_deep<E: serde::ser::Error>() -> E {
    E::custom(format_args!(
        "the value is nested deeper than {MAX_DEPTH} levels (lists, maps, structs, enums or options inside one another); flatten it, or send it in parts"
    ))
}

/// A value to serialize within the levels left.
pub struct Limited<'a, T: ?Sized> {
    value: &'a T,
    left: Left,
}

impl<'a, T: ?Sized> Limited<'a, T> {
    /// `value`, allowed [`MAX_DEPTH`] levels.
    #[inline]
    pub fn new(value: &'a T) -> Self {
        Limited {
            value,
            left: Left::ALL,
        }
    }
}

impl<T: Serialize + ?Sized> Serialize for Limited<'_, T> {
    #[inline]
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if let Some(bytes) = byte_strings::as_bytes(self.value) {
            super::offer_blob(bytes);
        }
        self.value.serialize(Depth {
            inner: serializer,
            left: self.left,
        })
    }
}

/// A serializer (or one of its compound parts) that counts the levels left.
pub struct Depth<S> {
    inner: S,
    left: Left,
}

impl<S> Depth<S> {
    /// `value`, to serialize within the levels left here.
    #[inline]
    fn nested<'a, T: ?Sized>(&self, value: &'a T) -> Limited<'a, T> {
        Limited {
            value,
            left: self.left,
        }
    }
}

/// Methods that serialize a value with nothing nested in it: passed on as they are.
macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[inline]
        fn $method(self, $($arg: $ty),*) -> Result<S::Ok, S::Error> {
            self.inner.$method($($arg),*)
        }
    )*};
}

impl<S: Serializer> Serializer for Depth<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Depth<S::SerializeSeq>;
    type SerializeTuple = Depth<S::SerializeTuple>;
    type SerializeTupleStruct = Depth<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Depth<S::SerializeTupleVariant>;
    type SerializeMap = Depth<S::SerializeMap>;
    type SerializeStruct = Depth<S::SerializeStruct>;
    type SerializeStructVariant = Depth<S::SerializeStructVariant>;

    forward! {
        serialize_bool(v: bool);
        serialize_i8(v: i8);
        serialize_i16(v: i16);
        serialize_i32(v: i32);
        serialize_i64(v: i64);
        serialize_i128(v: i128);
        serialize_u8(v: u8);
        serialize_u16(v: u16);
        serialize_u32(v: u32);
        serialize_u64(v: u64);
        serialize_u128(v: u128);
        serialize_f32(v: f32);
        serialize_f64(v: f64);
        serialize_char(v: char);
        serialize_str(v: &str);
        serialize_bytes(v: &[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(name: &'static str);
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str);
    }

    #[inline]
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        let left = self.left.wrap()?;
        self.inner.serialize_some(&Limited { value, left })
    }

    #[inline]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        let left = self.left.wrap()?;
        self.inner
            .serialize_newtype_struct(name, &Limited { value, left })
    }

    #[inline]
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        // A map of one entry: the variant's name, then its value.
        let left = self.left.enter(1)?;
        self.inner
            .serialize_newtype_variant(name, index, variant, &Limited { value, left })
    }

    #[inline]
    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        let left = self.left.enter(1)?;
        Ok(Depth {
            inner: self.inner.serialize_seq(len)?,
            left,
        })
    }

    #[inline]
    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        let left = self.left.enter(1)?;
        Ok(Depth {
            inner: self.inner.serialize_tuple(len)?,
            left,
        })
    }

    #[inline]
    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        let left = self.left.enter(1)?;
        Ok(Depth {
            inner: self.inner.serialize_tuple_struct(name, len)?,
            left,
        })
    }

    #[inline]
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        // A map of one entry, whose value is a list.
        let left = self.left.enter(2)?;
        Ok(Depth {
            inner: self
                .inner
                .serialize_tuple_variant(name, index, variant, len)?,
            left,
        })
    }

    #[inline]
    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        let left = self.left.enter(1)?;
        Ok(Depth {
            inner: self.inner.serialize_map(len)?,
            left,
        })
    }

    #[inline]
    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        let left = self.left.enter(1)?;
        Ok(Depth {
            inner: self.inner.serialize_struct(name, len)?,
            left,
        })
    }

    #[inline]
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        // A map of one entry, whose value is a map.
        let left = self.left.enter(2)?;
        Ok(Depth {
            inner: self
                .inner
                .serialize_struct_variant(name, index, variant, len)?,
            left,
        })
    }

    /// A `Vec<u8>` or a `[u8]` is written as a `bin`, in one piece; any other sequence
    /// as serde's default does.
    #[inline]
    fn collect_seq<I>(self, iter: I) -> Result<S::Ok, S::Error>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        if let Some(bytes) = byte_strings::as_slice(&iter) {
            return self.inner.serialize_bytes(bytes);
        }
        let iter = iter.into_iter();
        let len = match iter.size_hint() {
            (low, Some(high)) if low == high => Some(low),
            _ => None,
        };
        let mut seq = self.serialize_seq(len)?;
        for item in iter {
            seq.serialize_element(&item)?;
        }
        seq.end()
    }

    #[inline]
    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

/// The compound parts: each element or field goes on with the levels left.
macro_rules! compound {
    ($trait:ident, $method:ident($($key:ident: $key_ty:ty),*)) => {
        impl<S: $trait> $trait for Depth<S> {
            type Ok = S::Ok;
            type Error = S::Error;

            #[inline]
            fn $method<T: Serialize + ?Sized>(
                &mut self,
                $($key: $key_ty,)*
                value: &T,
            ) -> Result<(), S::Error> {
                let value = self.nested(value);
                self.inner.$method($($key,)* &value)
            }

            #[inline]
            fn end(self) -> Result<S::Ok, S::Error> {
                self.inner.end()
            }
        }
    };
}

compound!(SerializeSeq, serialize_element());
compound!(SerializeTuple, serialize_element());
compound!(SerializeTupleStruct, serialize_field());
compound!(SerializeTupleVariant, serialize_field());
compound!(SerializeStruct, serialize_field(key: &'static str));
compound!(SerializeStructVariant, serialize_field(key: &'static str));

impl<S: SerializeMap> SerializeMap for Depth<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    #[inline]
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), S::Error> {
        let key = self.nested(key);
        self.inner.serialize_key(&key)
    }

    #[inline]
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), S::Error> {
        let value = self.nested(value);
        self.inner.serialize_value(&value)
    }

    #[inline]
    fn serialize_entry<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &mut self,
        key: &K,
        value: &V,
    ) -> Result<(), S::Error> {
        let (key, value) = (self.nested(key), self.nested(value));
        self.inner.serialize_entry(&key, &value)
    }

    #[inline]
    fn end(self) -> Result<S::Ok, S::Error> {
        self.inner.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists inside one another; built and dropped without recursion.
    #[derive(serde::Serialize)]
    struct List(Vec<List>);

    impl List {
        fn nested(levels: u32) -> List {
            (1..levels).fold(List(Vec::new()), |inner, _| List(vec![inner]))
        }
    }

    impl Drop for List {
        fn drop(&mut self) {
            let mut rest = std::mem::take(&mut self.0);
            while let Some(mut next) = rest.pop() {
                rest.append(&mut next.0);
            }
        }
    }

    /// Options inside newtypes inside one another (two wrappers a link, no container).
    #[derive(serde::Serialize)]
    struct Chain(Option<Box<Chain>>);

    impl Drop for Chain {
        fn drop(&mut self) {
            let mut next = self.0.take();
            while let Some(mut link) = next {
                next = link.0.take();
            }
        }
    }

    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        let mut out = Vec::new();
        Limited::new(value).serialize(&mut rmp_serde::Serializer::new(&mut out))?;
        Ok(out)
    }

    fn decodes(bytes: &[u8]) -> bool {
        rmp_serde::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    }

    /// Runs `test` on a thread with room for the deepest values (a debug build of
    /// serde takes up to a KiB of stack a level).
    fn with_big_stack(test: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(32 << 20)
            .spawn(test)
            .expect("thread")
            .join()
            .expect("test passed");
    }

    #[test]
    fn values_up_to_the_limit_encode_as_without_it_and_deeper_ones_fail() {
        with_big_stack(up_to_the_limit);
    }

    fn up_to_the_limit() {
        let fits = List::nested(MAX_DEPTH);
        let plain = rmp_serde::to_vec(&fits).expect("encodes");
        assert_eq!(encode(&fits).expect("fits"), plain);
        assert!(decodes(&plain), "the decoder reads what fits");

        let deeper = List::nested(MAX_DEPTH + 1);
        let error = encode(&deeper).expect_err("too deep").to_string();
        assert!(error.contains("nested deeper than 1023 levels"), "{error}");
        let unchecked = rmp_serde::to_vec(&deeper).expect("encodes without the limit");
        assert!(!decodes(&unchecked), "the decoder refuses one level more");
    }

    #[test]
    fn options_and_newtypes_count_and_flat_values_pass_through() {
        let flat = (1u8, "a", [1.5f64], Some(()), vec![(); 3], b"xyz");
        assert_eq!(
            encode(&flat).expect("encodes"),
            rmp_serde::to_vec(&flat).expect("encodes")
        );
        let chain = |links: u32| (0..links).fold(Chain(None), |c, _| Chain(Some(Box::new(c))));
        // `links` options and one newtype more.
        assert!(encode(&chain(MAX_DEPTH / 2)).is_ok());
        assert!(encode(&chain(MAX_DEPTH / 2 + 1)).is_err());
    }
}
