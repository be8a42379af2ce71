//! How a callback's arguments decode, and what the caller is told when they do not.
//!
//! Arguments come as a list (by position: `.args((1, 2))`) or, for `#[callback]`
//! functions, whose parameter names are known, as a map (by name: a struct, or
//! `{"a": 1, "b": 2}`). A callback of one parameter takes a map as that one argument
//! (`.args(person)`), unless the map is exactly `{"p": value}` with `p` the parameter's
//! name, which names it.
//!
//! Parameters decode as a tuple ([`Params`]), each noting in a [`Failed`] which one is
//! being read: when decoding fails, [`explain()`] says which argument did not fit and
//! why, in the caller's terms.

use std::cell::Cell;
use std::fmt;

use bytes::Bytes;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Unexpected,
    Visitor,
};

use super::CallbackFailure;
use crate::codec::{self, explain};

/// A callback as its errors name it: `add(a: i64, b: i64)`, or `mul(i64, i64)` for a
/// closure, whose parameters have no names.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Signature<'a> {
    /// The exposed name.
    pub callback: &'a str,
    /// The parameters' names (`#[callback]`), or none (closures: by position only).
    pub names: &'a [&'static str],
    /// The parameters' types: as written (`#[callback]`), or as
    /// `std::any::type_name` gives them (closures).
    pub types: &'a [&'static str],
}

impl fmt::Display for Signature<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.callback, self.params())
    }
}

impl Signature<'_> {
    /// `a: i64, b: i64`, or `i64, i64`.
    fn params(&self) -> String {
        let types = self.types.iter().map(|t| explain::short_type_name(t));
        if self.names.is_empty() {
            return types.collect::<Vec<_>>().join(", ");
        }
        self.names
            .iter()
            .zip(types)
            .map(|(name, ty)| format!("{name}: {ty}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `argument 2 (`b`)`, or `argument 2` for a closure.
    fn argument(&self, index: usize) -> String {
        match self.names.get(index) {
            Some(name) => format!("argument {} (`{name}`)", index + 1),
            None => format!("argument {}", index + 1),
        }
    }
}

/// Decodes a callback's arguments into its parameters, `T = (A1, .., An)`. Its
/// [`Incoming`](crate::Incoming) parameter, if it has one, is the stream of arguments
/// the request offers; a stream offered to a callback without one, or none to a
/// callback with one, is refused (`NotAStream`) before anything runs.
///
/// The payload is handed over: a lone `Vec<u8>` or `serde_bytes::ByteBuf` parameter
/// takes over its buffer when nothing else holds it, instead of copying its bytes.
#[doc(hidden)]
pub fn decode_args<T: Params>(
    signature: &Signature<'_>,
    payload: Bytes,
) -> Result<T, CallbackFailure> {
    if T::INCOMING != crate::incoming::is_offered() {
        return Err(crate::incoming::mismatch(T::INCOMING));
    }
    if T::COUNT == 0 {
        // A callback without parameters ignores whatever the caller sent (nil, `[]`).
        let nothing =
            de::value::SeqDeserializer::<_, de::value::Error>::new(std::iter::empty::<()>());
        return T::from_seq(nothing, &Cell::default()).map_err(CallbackFailure::bad_arguments);
    }
    let shape = Shape::of::<T>(signature, &payload);
    if shape == Shape::AsItComes && !T::INCOMING {
        if let Some(args) = plain_args::<T>(&payload) {
            return Ok(args);
        }
    }
    let payload = match lone_byte_string::<T>(signature, shape, payload) {
        Ok(args) => return Ok(args),
        Err(payload) => payload,
    };
    let failed = Cell::new(Failed::Nothing);
    let seed = ArgsSeed::<T> {
        signature,
        shape,
        failed: &failed,
        params: std::marker::PhantomData,
    };
    codec::decode_seed(&payload, seed).map_err(|error| {
        CallbackFailure::bad_arguments(explain::<T>(
            signature,
            shape,
            &payload,
            failed.take(),
            &error,
        ))
    })
}

/// A large byte string as the one argument of a callback whose one parameter is a
/// `Vec<u8>` or a `ByteBuf` (by position, by name, or as the whole payload): taken over
/// with its buffer (see [`codec::lone_bytes_param`]). `Err` gives the payload back for
/// any other parameters or arguments, which the deserializer reads.
#[inline]
fn lone_byte_string<T: Params>(
    signature: &Signature<'_>,
    shape: Shape,
    payload: Bytes,
) -> Result<T, Bytes> {
    if !codec::is_lone_bytes_param::<T>() || payload.len() < codec::BLOB_BY_REFERENCE {
        return Err(payload);
    }
    let at = match shape {
        Shape::Whole => Some(0),
        // A fixarray of one (`Shape::of` saw a list).
        Shape::AsItComes => (payload.first() == Some(&0x91)).then_some(1),
        Shape::NamesTheOne => signature
            .names
            .first()
            .and_then(|name| value_of_one(&payload, name)),
    };
    match at {
        Some(at) => codec::lone_bytes_param(payload, at),
        None => Err(payload),
    }
}

/// Arguments by position that are all integers or bools (`.args((1, 2))` to
/// `fn add(a: i64, b: i64)`), each fitting its parameter's type: read straight from the
/// MessagePack, without the deserializer. `None` for anything else (other types, a map,
/// a value that does not fit): the deserializer reads those, and explains a failure.
fn plain_args<T: Params>(payload: &[u8]) -> Option<T> {
    let (&first, mut rest) = payload.split_first()?;
    // A fixarray of exactly the parameters (at most 15 of them).
    if T::COUNT > 15 || first != 0x90 | T::COUNT as u8 {
        return None;
    }
    let args = T::from_plain(&mut rest)?;
    rest.is_empty().then_some(args)
}

/// A MessagePack integer at the start of `rest` (which then moves past it), as serde's
/// visitors receive it from `rmp_serde`, widened.
fn plain_int(rest: &mut &[u8]) -> Option<i128> {
    /// The `N` bytes after the marker.
    fn be<const N: usize>(tail: &[u8]) -> Option<[u8; N]> {
        tail.get(..N)?.try_into().ok()
    }
    let (&marker, tail) = rest.split_first()?;
    let (value, width) = match marker {
        0x00..=0x7f => (i128::from(marker), 0),
        0xe0..=0xff => (i128::from(marker as i8), 0),
        0xcc => (i128::from(tail.first().copied()?), 1),
        0xcd => (i128::from(u16::from_be_bytes(be(tail)?)), 2),
        0xce => (i128::from(u32::from_be_bytes(be(tail)?)), 4),
        0xcf => (i128::from(u64::from_be_bytes(be(tail)?)), 8),
        0xd0 => (i128::from(tail.first().copied()? as i8), 1),
        0xd1 => (i128::from(i16::from_be_bytes(be(tail)?)), 2),
        0xd2 => (i128::from(i32::from_be_bytes(be(tail)?)), 4),
        0xd3 => (i128::from(i64::from_be_bytes(be(tail)?)), 8),
        _ => return None,
    };
    *rest = &tail[width..];
    Some(value)
}

/// A parameter of type `T` read by [`plain_args`], if `T` is an integer type or `bool`
/// and `rest` starts with a value that fits it (as serde's own `Deserialize` of `T`
/// would accept it from `rmp_serde`).
fn plain_value<T>(rest: &mut &[u8]) -> Option<T> {
    use std::any::TypeId;
    let id = typeid::of::<T>();
    macro_rules! ints {
        ($($t:ty),*) => {$(
            if id == TypeId::of::<$t>() {
                let value = <$t>::try_from(plain_int(rest)?).ok()?;
                // SAFETY: `T` is `$t` (the same `TypeId`; `$t` has no lifetimes), so
                // this moves a `$t` as itself.
                return Some(unsafe { std::mem::transmute_copy::<$t, T>(&value) });
            }
        )*};
    }
    ints!(i64, u64, i32, u32, usize, isize, i16, u16, i8, u8);
    if id == TypeId::of::<bool>() {
        let value = match rest.split_first()? {
            (0xc2, tail) => (false, tail),
            (0xc3, tail) => (true, tail),
            _ => return None,
        };
        *rest = value.1;
        // SAFETY: `T` is `bool` (the same `TypeId`).
        return Some(unsafe { std::mem::transmute_copy::<bool, T>(&value.0) });
    }
    None
}

/// How the payload holds the arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A list (by position) or a map (by name), as it comes.
    AsItComes,
    /// A map of one entry that names the one parameter.
    NamesTheOne,
    /// Anything but a list, for one parameter: its value.
    Whole,
}

impl Shape {
    fn of<T: Params>(signature: &Signature<'_>, payload: &[u8]) -> Shape {
        if T::COUNT != 1 || is_list(payload) {
            return Shape::AsItComes;
        }
        match signature.names.first() {
            Some(name) if is_map_of_one(payload, name) => Shape::NamesTheOne,
            _ => Shape::Whole,
        }
    }
}

/// Whether `payload` is a MessagePack list.
fn is_list(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(0x90..=0x9f | 0xdc | 0xdd))
}

/// Whether `payload` is a map of one entry keyed `name`.
fn is_map_of_one(payload: &[u8], name: &str) -> bool {
    value_of_one(payload, name).is_some()
}

/// Where the value starts in `payload`, if it is a map of one entry keyed `name`.
fn value_of_one(payload: &[u8], name: &str) -> Option<usize> {
    let entry = match payload {
        [0x81, entry @ ..] | [0xde, 0, 1, entry @ ..] | [0xdf, 0, 0, 0, 1, entry @ ..] => entry,
        _ => return None,
    };
    let (len, key) = match entry {
        [m @ 0xa0..=0xbf, key @ ..] => (usize::from(m & 0x1f), key),
        [0xd9, len, key @ ..] => (usize::from(*len), key),
        [0xda, hi, lo, key @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), key),
        _ => return None,
    };
    (key.get(..len) == Some(name.as_bytes())).then(|| payload.len() - key.len() + len)
}

/// What was being read when decoding stopped.
#[doc(hidden)]
#[derive(Debug, Default)]
pub enum Failed {
    /// Nothing yet: the payload itself is not a list or a map.
    #[default]
    Nothing,
    /// So many arguments came.
    Count(usize),
    /// A map came, for a callback that takes its arguments by position only.
    ByPositionOnly,
    /// The argument at this position.
    Argument(usize),
    /// A named argument for no parameter.
    Unknown(String),
    /// This parameter was named twice.
    Twice(usize),
    /// This parameter was not named.
    Missing(usize),
}

/// One parameter of a callback: a value the caller sends among the arguments (any
/// owned `DeserializeOwned` type), or the stream of arguments it feeds
/// ([`Incoming`](crate::Incoming)).
#[doc(hidden)]
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a parameter of a daffi callback",
    note = "parameters must be owned `serde::DeserializeOwned` types, or one `daffi::Incoming<T>`"
)]
pub trait Param: Sized {
    /// Whether the caller sends it among the arguments (`Incoming` it feeds instead).
    const SENT: bool = true;

    /// Reads it from arguments given by position (`None`: the list ran out).
    fn next<'de, S: SeqAccess<'de>>(seq: &mut S) -> Result<Option<Self>, S::Error>;

    /// Reads it from a named argument.
    fn value<'de, M: MapAccess<'de>>(map: &mut M) -> Result<Self, M::Error>;

    /// The parameter when the arguments, given by name, do not name it.
    fn unnamed<E: de::Error>() -> Option<Result<Self, E>> {
        None
    }

    /// Reads it straight from arguments by position, moving `rest` past it, if it is a
    /// plain integer or bool that fits (see [`plain_args`]); `None` otherwise.
    fn plain(_rest: &mut &[u8]) -> Option<Self> {
        None
    }
}

impl<T: DeserializeOwned> Param for T {
    fn next<'de, S: SeqAccess<'de>>(seq: &mut S) -> Result<Option<Self>, S::Error> {
        seq.next_element()
    }

    #[inline]
    fn plain(rest: &mut &[u8]) -> Option<Self> {
        plain_value(rest)
    }

    fn value<'de, M: MapAccess<'de>>(map: &mut M) -> Result<Self, M::Error> {
        map.next_value()
    }
}

/// A callback's parameters: a tuple `(A1, .., An)` of up to 16 of them.
#[doc(hidden)]
pub trait Params: Sized {
    /// How many the caller sends among the arguments.
    const COUNT: usize;
    /// Whether one is the caller's stream of arguments ([`Incoming`](crate::Incoming)).
    const INCOMING: bool;

    /// Reads them by position; `failed` follows which one is read.
    fn from_seq<'de, S: SeqAccess<'de>>(seq: S, failed: &Cell<Failed>) -> Result<Self, S::Error>;

    /// Reads them straight from arguments by position if each is a plain integer or
    /// bool that fits (see [`plain_args`]).
    fn from_plain(rest: &mut &[u8]) -> Option<Self>;

    /// Reads them by name; `failed` follows which one is read.
    fn from_map<'de, M: MapAccess<'de>>(
        map: M,
        names: &[&'static str],
        failed: &Cell<Failed>,
    ) -> Result<Self, M::Error>;
}

macro_rules! params {
    ($($n:tt $a:ident),*) => {
        impl<$($a: Param),*> Params for ($($a,)*) {
            const COUNT: usize = 0 $(+ <$a as Param>::SENT as usize)*;
            const INCOMING: bool = false $(|| !<$a as Param>::SENT)*;

            #[allow(unused_mut, unused_variables)]
            fn from_seq<'de, S: SeqAccess<'de>>(
                mut seq: S,
                failed: &Cell<Failed>,
            ) -> Result<Self, S::Error> {
                Ok(($({
                    failed.set(Failed::Argument($n));
                    match <$a as Param>::next(&mut seq)? {
                        Some(value) => value,
                        None => {
                            failed.set(Failed::Count($n));
                            return Err(de::Error::invalid_length($n, &"more arguments"));
                        }
                    }
                },)*))
            }

            #[allow(unused_variables)]
            #[inline]
            fn from_plain(rest: &mut &[u8]) -> Option<Self> {
                Some(($(<$a as Param>::plain(rest)?,)*))
            }

            #[allow(unused_mut, unused_variables)]
            fn from_map<'de, M: MapAccess<'de>>(
                mut map: M,
                names: &[&'static str],
                failed: &Cell<Failed>,
            ) -> Result<Self, M::Error> {
                let mut given = ($(None::<$a>,)*);
                while let Some(index) = map.next_key_seed(Name { names, failed })? {
                    match index {
                        $($n => {
                            if given.$n.is_some() {
                                failed.set(Failed::Twice($n));
                                return Err(de::Error::duplicate_field(name_at(names, $n)));
                            }
                            failed.set(Failed::Argument($n));
                            given.$n = Some(<$a as Param>::value(&mut map)?);
                        })*
                        _ => return Err(de::Error::custom("more names than parameters")),
                    }
                }
                Ok(($(match given.$n.map(Ok::<$a, M::Error>).or_else(<$a as Param>::unnamed::<M::Error>) {
                    Some(value) => value?,
                    None => {
                        failed.set(Failed::Missing($n));
                        return Err(de::Error::missing_field(name_at(names, $n)));
                    }
                },)*))
            }
        }
    };
}

params!();
params!(0 A1);
params!(0 A1, 1 A2);
params!(0 A1, 1 A2, 2 A3);
params!(0 A1, 1 A2, 2 A3, 3 A4);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8, 8 A9);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8, 8 A9, 9 A10);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8, 8 A9, 9 A10, 10 A11);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8, 8 A9, 9 A10, 10 A11, 11 A12);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8, 8 A9, 9 A10, 10 A11, 11 A12, 12 A13);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8, 8 A9, 9 A10, 10 A11, 11 A12, 12 A13, 13 A14);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8, 8 A9, 9 A10, 10 A11, 11 A12, 12 A13, 13 A14, 14 A15);
params!(0 A1, 1 A2, 2 A3, 3 A4, 4 A5, 5 A6, 6 A7, 7 A8, 8 A9, 9 A10, 10 A11, 11 A12, 12 A13, 13 A14, 14 A15, 15 A16);

/// The name of parameter `index`, for an error.
fn name_at(names: &[&'static str], index: usize) -> &'static str {
    names.get(index).copied().unwrap_or("?")
}

/// A key of a map of named arguments: the index of the parameter it names.
struct Name<'n> {
    names: &'n [&'static str],
    failed: &'n Cell<Failed>,
}

impl<'de> DeserializeSeed<'de> for Name<'_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a parameter's name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<usize, E> {
        match self.names.iter().position(|name| *name == key) {
            Some(index) => Ok(index),
            None => {
                self.failed.set(Failed::Unknown(key.to_string()));
                Err(E::unknown_field(key, &[]))
            }
        }
    }
}

/// Decodes the arguments, as the [`Shape`] says, into `T`.
struct ArgsSeed<'s, T> {
    signature: &'s Signature<'s>,
    shape: Shape,
    failed: &'s Cell<Failed>,
    params: std::marker::PhantomData<T>,
}

impl<'de, T: Params> DeserializeSeed<'de> for ArgsSeed<'_, T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        match self.shape {
            Shape::Whole => T::from_seq(One(Some(deserializer)), self.failed),
            Shape::AsItComes | Shape::NamesTheOne => deserializer.deserialize_any(self),
        }
    }
}

impl<'de, T: Params> Visitor<'de> for ArgsSeed<'_, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of arguments, or a map of them by name")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, seq: S) -> Result<T, S::Error> {
        match seq.size_hint() {
            Some(count) if count != T::COUNT => {
                self.failed.set(Failed::Count(count));
                Err(de::Error::invalid_length(count, &self))
            }
            _ => T::from_seq(seq, self.failed),
        }
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<T, M::Error> {
        if self.signature.names.is_empty() {
            self.failed.set(Failed::ByPositionOnly);
            return Err(de::Error::invalid_type(Unexpected::Map, &self));
        }
        T::from_map(map, self.signature.names, self.failed)
    }
}

/// A list of one argument: the payload itself.
struct One<D>(Option<D>);

impl<'de, D: Deserializer<'de>> SeqAccess<'de> for One<D> {
    type Error = D::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, D::Error> {
        self.0.take().map(|d| seed.deserialize(d)).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(usize::from(self.0.is_some()))
    }
}

/// Why the arguments did not decode, in the caller's terms. The arguments are read
/// again, into a tree, to learn what did not fit where (see [`explain()`]).
#[cold]
fn explain<T: Params>(
    signature: &Signature<'_>,
    shape: Shape,
    payload: &Bytes,
    failed: Failed,
    error: &rmp_serde::decode::Error,
) -> String {
    let again = explain::tree(payload).and_then(|tree| {
        let failed = Cell::new(Failed::Nothing);
        let seed = ArgsSeed::<T> {
            signature,
            shape,
            failed: &failed,
            params: std::marker::PhantomData,
        };
        let mismatch = seed.deserialize(explain::At(&tree)).err()?;
        Some((failed.take(), mismatch))
    });
    match again {
        Some((failed, mismatch)) => describe(signature, shape, failed, Detail::Mismatch(mismatch)),
        None => describe(signature, shape, failed, Detail::Plain(error)),
    }
}

/// What is known of what went wrong inside an argument.
enum Detail<'e> {
    /// From reading the tree: what was expected, found, and where.
    Mismatch(explain::Mismatch),
    /// rmp-serde's error, when the payload was too large to read again.
    Plain(&'e rmp_serde::decode::Error),
}

fn describe(signature: &Signature<'_>, shape: Shape, failed: Failed, detail: Detail<'_>) -> String {
    let count = signature.types.len();
    let params = signature.params();
    let name = signature.callback;
    match failed {
        Failed::Nothing => {
            let found = match &detail {
                Detail::Mismatch(m) => m.found_instead().unwrap_or("something else").to_string(),
                Detail::Plain(e) => explain::plain(e),
            };
            let by_name = if signature.names.is_empty() { "" } else { ", or a map of them by name" };
            format!("`{name}` takes a list of arguments ({params}){by_name}; got {found}")
        }
        Failed::Count(got) if count == 1 => format!(
            "`{name}` expects 1 argument ({params}), got a list of {got} (to pass a list as the one argument, send it in a tuple: `.args((list,))`)"
        ),
        Failed::Count(got) => format!("`{name}` expects {count} arguments ({params}), got {got}"),
        Failed::ByPositionOnly => format!(
            "`{name}` takes its arguments by position ({params}): send a tuple, e.g. `.args((a, b))`; only `#[callback]` functions take arguments by name"
        ),
        Failed::Unknown(key) => format!("`{name}` has no parameter `{key}` ({params})"),
        Failed::Twice(i) => format!("{} of {signature} is given twice", signature.argument(i)),
        Failed::Missing(i) => format!("{} of {signature} is missing", signature.argument(i)),
        Failed::Argument(i) => {
            let what = match detail {
                Detail::Mismatch(m) => {
                    // In a list or map of arguments, the first step is the argument.
                    let m = if shape == Shape::Whole { m } else { m.without_outer_step() };
                    format!("{}: {m}", m.location())
                }
                Detail::Plain(e) => format!(": {}", explain::plain(e)),
            };
            let hint = match (shape, signature.names) {
                (Shape::NamesTheOne, [one]) => format!(
                    " (the map named the argument `{one}`; to pass a map as `{one}` itself, send it in a tuple: `.args((map,))`)"
                ),
                _ => String::new(),
            };
            format!("{} of {signature}{what}{hint}", signature.argument(i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use serde_bytes::ByteBuf;
    use std::collections::BTreeMap;

    const ADD: Signature<'static> = Signature {
        callback: "add",
        names: &["a", "b"],
        types: &["i64", "i64"],
    };

    fn encode<T: Serialize>(value: &T) -> Bytes {
        Bytes::from(rmp_serde::to_vec_named(value).expect("encodes"))
    }

    fn message<T: Params + fmt::Debug>(signature: &Signature<'_>, value: impl Serialize) -> String {
        decode_args::<T>(signature, encode(&value))
            .expect_err("does not decode")
            .message
    }

    #[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
    struct Person {
        name: String,
        age: u32,
    }

    /// What the deserializer makes of `payload`, bypassing the plain fast path.
    fn through_serde<T: Params>(payload: &Bytes) -> Option<T> {
        let failed = Cell::new(Failed::Nothing);
        let seed = ArgsSeed::<T> {
            signature: &ADD,
            shape: Shape::AsItComes,
            failed: &failed,
            params: std::marker::PhantomData,
        };
        codec::decode_seed(payload, seed).ok()
    }

    #[test]
    fn plain_integers_and_bools_decode_as_the_deserializer_decodes_them() {
        let edges: Vec<i128> = [0i128, 1, 127, 128, 255, 256, 32_767, 32_768, 65_535, 65_536]
            .into_iter()
            .chain([2_147_483_647, 2_147_483_648, 4_294_967_295, 4_294_967_296])
            .chain([i64::MAX as i128, u64::MAX as i128])
            .flat_map(|v| [v, -v, v - 1, -v - 1])
            .filter(|v| i64::try_from(*v).is_ok() || u64::try_from(*v).is_ok())
            .collect();
        fn check<A: Params + PartialEq + fmt::Debug, V: Serialize>(value: V) {
            let payload = encode(&value);
            let plain = plain_args::<A>(&payload);
            let serde = through_serde::<A>(&payload);
            if plain.is_some() {
                assert_eq!(plain, serde, "{payload:x?}");
            }
            // What the fast path leaves, the deserializer reads (or explains).
            let decoded = decode_args::<A>(&ADD, payload.clone()).ok();
            assert_eq!(decoded, serde, "{payload:x?}");
        }
        for v in edges {
            let (i, u) = (i64::try_from(v).ok(), u64::try_from(v).ok());
            if let Some(i) = i {
                check::<(i64, i8), _>((i, -3i8));
                check::<(i32, u16), _>((i, 7u16));
                check::<(i8, isize), _>((i, 1));
                check::<(u8, i16), _>((i, 1));
                check::<(usize, i64), _>((i, i));
            }
            if let Some(u) = u {
                check::<(u64, u32), _>((u, 5u32));
                check::<(i64, u64), _>((u, u));
                check::<(u8, bool), _>((u, true));
            }
        }
        check::<(bool, bool), _>((false, true));
        check::<(bool, i64), _>((1, 2));
        check::<(i64, i64), _>((1.5, 2));
        check::<(i64, String), _>((1, "two"));
        check::<(i64, i64), _>((1, 2, 3));
        check::<(i64, i64, i64), _>((1, 2));
        assert!(
            plain_args::<(i64, i64)>(&encode(&(1, 2))).is_some(),
            "the path is taken"
        );
        assert!(
            plain_args::<(i64, i64)>(&encode(&(1, 2))[..2]).is_none(),
            "cut short"
        );
    }

    #[test]
    fn arguments_come_by_position_or_by_name() {
        let by_position: (i64, i64) = decode_args(&ADD, encode(&(1, 2))).expect("decodes");
        let by_name: (i64, i64) =
            decode_args(&ADD, encode(&BTreeMap::from([("b", 2), ("a", 1)]))).expect("decodes");
        assert_eq!((by_position, by_name), ((1, 2), (1, 2)));
    }

    #[test]
    fn one_parameter_takes_a_map_as_itself_unless_the_map_names_it() {
        let greet = Signature {
            callback: "greet",
            names: &["p"],
            types: &["Person"],
        };
        let ann = Person {
            name: "Ann".into(),
            age: 3,
        };
        let whole: (Person,) = decode_args(&greet, encode(&ann)).expect("the map is p");
        let named: (Person,) =
            decode_args(&greet, encode(&BTreeMap::from([("p", &ann)]))).expect("names p");
        let listed: (Person,) = decode_args(&greet, encode(&(&ann,))).expect("by position");
        assert_eq!(
            [whole.0, named.0],
            [
                listed.0,
                Person {
                    name: "Ann".into(),
                    age: 3
                }
            ]
        );
        // A closure's one parameter has no name: any map is its value.
        let closure = Signature {
            callback: "f",
            names: &[],
            types: &["Person"],
        };
        let (p,): (Person,) = decode_args(
            &closure,
            encode(&Person {
                name: "Bo".into(),
                age: 1,
            }),
        )
        .expect("decodes");
        assert_eq!(p.name, "Bo");
    }

    #[test]
    fn failures_say_which_argument_and_why() {
        assert_eq!(
            message::<(i64, i64)>(&ADD, (1,)),
            "`add` expects 2 arguments (a: i64, b: i64), got 1"
        );
        assert_eq!(
            message::<(i64, i64)>(&ADD, (1, "x")),
            "argument 2 (`b`) of add(a: i64, b: i64): expected an integer, got a string"
        );
        assert_eq!(
            message::<(i64, i64)>(&ADD, BTreeMap::from([("a", 1)])),
            "argument 2 (`b`) of add(a: i64, b: i64) is missing"
        );
        assert_eq!(
            message::<(i64, i64)>(&ADD, BTreeMap::from([("a", 1), ("b", 2), ("c", 3)])),
            "`add` has no parameter `c` (a: i64, b: i64)"
        );
        assert_eq!(
            message::<(i64, i64)>(&ADD, "text"),
            "`add` takes a list of arguments (a: i64, b: i64), or a map of them by name; got a string"
        );
        let mul = Signature {
            callback: "mul",
            names: &[],
            types: &["i64", "i64"],
        };
        assert!(
            message::<(i64, i64)>(&mul, BTreeMap::from([("a", 1), ("b", 2)]))
                .starts_with("`mul` takes its arguments by position (i64, i64)")
        );
        let deep = Signature {
            callback: "deep",
            names: &["v"],
            types: &["Vec<Vec<i64>>"],
        };
        assert_eq!(
            message::<(Vec<Vec<i64>>,)>(&deep, (vec![vec!["x"]],)),
            "argument 1 (`v`) of deep(v: Vec<Vec<i64>>), at [0][0]: expected an integer, got a string"
        );
    }

    #[test]
    fn a_map_that_names_the_one_parameter_says_how_to_pass_it_whole() {
        let f = Signature {
            callback: "f",
            names: &["p"],
            types: &["Person"],
        };
        let text = message::<(Person,)>(&f, BTreeMap::from([("p", 1)]));
        assert!(text.contains(".args((map,))"), "{text}");
    }

    #[test]
    fn a_payload_too_large_to_read_again_still_names_the_argument() {
        let sum = Signature {
            callback: "sum",
            names: &["values", "scale"],
            types: &["Vec<u16>", "i64"],
        };
        let many = vec![1u16; 70_000];
        assert_eq!(
            message::<(Vec<u16>, i64)>(&sum, (many, "x")),
            "argument 2 (`scale`) of sum(values: Vec<u16>, scale: i64): got a string where a number or a boolean belongs"
        );
    }

    /// `value` encoded as a frame's payload is: behind a few bytes of head, in a buffer
    /// of its own. Returns the payload and where the buffer starts.
    fn behind_a_head<V: Serialize>(value: &V) -> (Bytes, usize) {
        let mut buffer = vec![0u8; 40];
        buffer.extend(rmp_serde::to_vec_named(value).expect("encodes"));
        let at = buffer.as_ptr() as usize;
        (Bytes::from(buffer).slice(40..), at)
    }

    #[test]
    fn a_lone_byte_string_takes_the_buffer_over_in_every_shape() {
        let data = (0..100_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>();
        let bin = serde_bytes::Bytes::new(&data);
        let one = Signature {
            callback: "f",
            names: &["data"],
            types: &["Vec<u8>"],
        };
        let shapes = || {
            [
                behind_a_head(&(bin,)),
                behind_a_head(&bin),
                behind_a_head(&BTreeMap::from([("data", bin)])),
            ]
        };
        for (payload, at) in shapes() {
            let (vec,): (Vec<u8>,) = decode_args(&one, payload).expect("decodes");
            assert_eq!(vec, data);
            assert_eq!(vec.as_ptr() as usize, at, "taken over, not copied");
        }
        for (payload, at) in shapes() {
            let (buf,): (ByteBuf,) = decode_args(&one, payload).expect("decodes");
            assert_eq!(buf.as_slice(), &data[..]);
            assert_eq!(buf.as_ptr() as usize, at, "taken over, not copied");
        }
        // Held elsewhere too: copied, and the other holder's bytes stay as they were.
        let (payload, at) = behind_a_head(&(bin,));
        let other = payload.clone();
        let (vec,): (Vec<u8>,) = decode_args(&one, payload).expect("decodes");
        assert_ne!(vec.as_ptr() as usize, at);
        assert_eq!(vec, data);
        assert_eq!(
            &other[..],
            &rmp_serde::to_vec(&(bin,)).expect("encodes")[..]
        );
        // Small ones and other types take the deserializer's path.
        let (small,): (Vec<u8>,) =
            decode_args(&one, encode(&(serde_bytes::Bytes::new(&data[..100]),))).expect("small");
        assert_eq!(small, &data[..100]);
        let (as_bytes,): (Bytes,) = decode_args(&one, behind_a_head(&(bin,)).0).expect("Bytes");
        assert_eq!(&as_bytes[..], &data[..]);
    }

    #[test]
    fn a_byte_string_whose_length_lies_is_refused_as_before() {
        let one = Signature {
            callback: "f",
            names: &["data"],
            types: &["Vec<u8>"],
        };
        let data = vec![5u8; 70_000];
        let honest = rmp_serde::to_vec(&(serde_bytes::Bytes::new(&data),)).expect("encodes");
        // [0x91, 0xc6, len (4 bytes), data]: a length past the end is refused; a
        // shorter one reads that many bytes and leaves the rest, as the deserializer
        // does; neither is taken over (the `bin` is not all of the rest).
        for announced in [70_001u32, u32::MAX, 69_999, 70_000] {
            let mut lying = honest.clone();
            lying[2..6].copy_from_slice(&announced.to_be_bytes());
            let decoded = decode_args::<(Vec<u8>,)>(&one, Bytes::from(lying));
            match decoded {
                Ok((vec,)) => assert_eq!(vec, &data[..announced as usize], "{announced}"),
                Err(failure) => {
                    assert!(announced > 70_000, "{announced}: {}", failure.message);
                    assert!(
                        failure.message.contains("f(data: Vec<u8>)"),
                        "{}",
                        failure.message
                    );
                }
            }
        }
        // Cut short: the header alone.
        let failure = decode_args::<(Vec<u8>,)>(&one, Bytes::from(honest[..20_000].to_vec()))
            .expect_err("cut short");
        assert!(!failure.message.is_empty());
    }

    #[test]
    fn map_keys_are_recognized_in_every_string_form() {
        assert!(is_map_of_one(&encode(&BTreeMap::from([("p", 1)])), "p"));
        assert!(!is_map_of_one(
            &encode(&BTreeMap::from([("p", 1), ("q", 2)])),
            "p"
        ));
        assert!(!is_map_of_one(&encode(&BTreeMap::from([("q", 1)])), "p"));
        let long = "k".repeat(300);
        assert!(is_map_of_one(
            &encode(&BTreeMap::from([(long.as_str(), 1)])),
            &long
        ));
        assert!(!is_map_of_one(&[0x81], "p"));
    }
}
