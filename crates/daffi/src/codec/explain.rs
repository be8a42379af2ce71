//! Decode failures in the caller's terms: "expected an integer, got a string", "at
//! `[2].age`", "`Vec<u8>`", never "wrong msgpack marker FixStr(1)" or
//! `alloc::string::String`.
//!
//! rmp-serde reports most mismatches as text, some only as the marker it found. So when
//! a decode fails (and only then), the payload is read again into a [`Value`] tree and
//! the same type decoded from that tree by [`At`], whose error, a [`Mismatch`], keeps
//! what serde knows: what was expected, what was found, and where. The tree holds at
//! most [`MAX_VALUES`] values, [`MAX_NESTING`] deep, and borrows strings and bytes from
//! the payload: explaining a large payload costs the peer that sent it little, and one
//! too large to explain gets the plainer words of [`plain`].

use std::cell::Cell;
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Expected, IntoDeserializer, MapAccess,
    SeqAccess, Unexpected, VariantAccess, Visitor,
};

use super::MAX_DEPTH;

/// How a MessagePack extension that is not a pickled Python object is named.
const EXTENSION: &str = "a MessagePack extension";

/// The extension type in which the Python package (`crates/daffi-py`) sends a pickled
/// Python object: a byte with the length of the type's name, the name, the pickle.
const PYTHON_PICKLE: i8 = 80;

/// The Python type's name in extension data of type `tag`, if it is a pickled object.
fn python_type(tag: i8, data: &[u8]) -> Option<&str> {
    let (&len, rest) = data.split_first().filter(|_| tag == PYTHON_PICKLE)?;
    std::str::from_utf8(rest.get(..len as usize)?).ok()
}

/// The most values a payload may hold to be explained in full.
const MAX_VALUES: usize = 1 << 16;

/// The deepest a payload may nest to be explained in full (the decoder reads deeper).
const MAX_NESTING: usize = 128;

/// A decoded MessagePack value; strings and bytes borrowed from the payload.
#[derive(Debug)]
pub(crate) enum Value<'a> {
    Nil,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Str(&'a str),
    Bytes(&'a [u8]),
    List(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    /// A MessagePack extension (no Rust daffi type uses them); with the type's name when
    /// it is a pickled Python object (see [`PYTHON_PICKLE`]).
    Extension(Option<&'a str>),
}

/// Reads `payload` into a tree, or `None` when it is too large or too deep to explain
/// (or not MessagePack).
pub(crate) fn tree(payload: &[u8]) -> Option<Value<'_>> {
    let budget = Cell::new(MAX_VALUES);
    let mut decoder = rmp_serde::Deserializer::from_read_ref(payload);
    Build {
        budget: &budget,
        nesting: 0,
    }
    .deserialize(&mut decoder)
    .ok()
}

/// Builds a [`Value`] within the budget of values left.
#[derive(Clone, Copy)]
struct Build<'b> {
    budget: &'b Cell<usize>,
    nesting: usize,
}

impl Build<'_> {
    /// Counts one more value; an error once the budget is spent.
    fn take<E: de::Error>(self) -> Result<Self, E> {
        let left = self.budget.get().checked_sub(1);
        match left {
            Some(left) if self.nesting < MAX_NESTING => {
                self.budget.set(left);
                Ok(Build {
                    nesting: self.nesting + 1,
                    ..self
                })
            }
            _ => Err(E::custom("too large to explain")),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Build<'_> {
    type Value = Value<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Build<'_> {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any MessagePack value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value<'de>, E> {
        Ok(Value::Nil)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value<'de>, E> {
        Ok(Value::Bool(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value<'de>, E> {
        Ok(Value::Unsigned(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value<'de>, E> {
        Ok(Value::Signed(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value<'de>, E> {
        Ok(Value::Float(v))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Value<'de>, E> {
        Ok(Value::Str(v))
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Value<'de>, E> {
        Ok(Value::Bytes(v))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value<'de>, D::Error> {
        let (tag, data): (i8, &'de serde_bytes::Bytes) = serde::Deserialize::deserialize(d)?;
        Ok(Value::Extension(python_type(tag, data)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
        let inner = self.take()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(inner.take()?)? {
            items.push(item);
        }
        Ok(Value::List(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
        let inner = self.take()?;
        let mut entries = Vec::new();
        while let Some(key) = map.next_key_seed(inner.take()?)? {
            entries.push((key, map.next_value_seed(inner.take()?)?));
        }
        Ok(Value::Map(entries))
    }
}

/// What did not fit, and where: the error of decoding from an [`At`].
#[derive(Debug)]
pub(crate) struct Mismatch {
    /// From the outside in.
    path: Vec<Step>,
    what: What,
}

#[derive(Debug)]
enum Step {
    Index(usize),
    Key(String),
}

#[derive(Debug)]
enum What {
    /// A value of another kind than expected.
    Type {
        found: String,
        expected: String,
    },
    /// A value of the right kind that does not fit (an integer out of range, ...);
    /// `expected` as serde says it.
    Value {
        found: String,
        expected: String,
    },
    Length {
        len: usize,
        expected: String,
    },
    UnknownVariant(String, &'static [&'static str]),
    UnknownField(String, &'static [&'static str]),
    MissingField(&'static str),
    DuplicateField(&'static str),
    Other(String),
}

impl Mismatch {
    fn new(what: What) -> Self {
        Mismatch {
            path: Vec::new(),
            what,
        }
    }

    /// The same mismatch, inside `step`.
    fn inside(mut self, step: Step) -> Self {
        self.path.insert(0, step);
        self
    }

    /// Whether it is about the value itself (not something inside it).
    pub(crate) fn at_top(&self) -> bool {
        self.path.is_empty()
    }

    /// Forgets the outermost step (the argument a list or map of arguments holds).
    pub(crate) fn without_outer_step(mut self) -> Self {
        if !self.path.is_empty() {
            self.path.remove(0);
        }
        self
    }

    /// What was found, when the value is of another kind than expected.
    pub(crate) fn found_instead(&self) -> Option<&str> {
        match &self.what {
            What::Type { found, .. } => Some(found),
            _ => None,
        }
    }

    /// Where, as `, at [0].name`, or nothing at the top.
    pub(crate) fn location(&self) -> String {
        if self.path.is_empty() {
            return String::new();
        }
        let mut at = String::from(", at ");
        for (i, step) in self.path.iter().enumerate() {
            match step {
                Step::Index(n) => at.push_str(&format!("[{n}]")),
                Step::Key(k) if is_plain_name(k) => {
                    if i > 0 {
                        at.push('.');
                    }
                    at.push_str(k);
                }
                Step::Key(k) => at.push_str(&format!("[{k:?}]")),
            }
        }
        at
    }
}

fn is_plain_name(key: &str) -> bool {
    !key.is_empty() && key.chars().all(|c| c.is_alphanumeric() || c == '_')
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.what {
            What::Type { found, expected } => write!(f, "expected {expected}, got {found}"),
            What::Value { found, expected } if is_number_type(expected) => {
                write!(f, "{found} does not fit in `{expected}`")
            }
            What::Value { found, expected } => {
                write!(f, "expected {}, got {found}", in_plain_words(expected))
            }
            What::Length { len, expected } => {
                write!(f, "expected {expected}, got a list of {len}")
            }
            What::UnknownVariant(variant, known) => {
                write!(f, "no variant `{variant}`{}", one_of(known))
            }
            What::UnknownField(field, known) => write!(f, "no field `{field}`{}", one_of(known)),
            What::MissingField(field) => write!(f, "missing field `{field}`"),
            What::DuplicateField(field) => write!(f, "field `{field}` given twice"),
            What::Other(text) => f.write_str(text),
        }
    }
}

fn one_of(known: &[&str]) -> String {
    if known.is_empty() {
        return String::new();
    }
    let names: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
    format!(" (expected one of {})", names.join(", "))
}

impl std::error::Error for Mismatch {}

impl de::Error for Mismatch {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Mismatch::new(What::Other(msg.to_string()))
    }

    fn invalid_type(found: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Mismatch::new(What::Type {
            found: found_words(&found),
            expected: in_plain_words(&expected.to_string()),
        })
    }

    fn invalid_value(found: Unexpected<'_>, expected: &dyn Expected) -> Self {
        Mismatch::new(What::Value {
            found: with_value(&found),
            expected: expected.to_string(),
        })
    }

    fn invalid_length(len: usize, expected: &dyn Expected) -> Self {
        Mismatch::new(What::Length {
            len,
            expected: in_plain_words(&expected.to_string()),
        })
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Mismatch::new(What::UnknownVariant(variant.to_string(), expected))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Mismatch::new(What::UnknownField(field.to_string(), expected))
    }

    fn missing_field(field: &'static str) -> Self {
        Mismatch::new(What::MissingField(field))
    }

    fn duplicate_field(field: &'static str) -> Self {
        Mismatch::new(What::DuplicateField(field))
    }
}

/// What kind of value serde found, as a caller would say it.
pub(crate) fn kind_of(found: &Unexpected<'_>) -> &'static str {
    match found {
        Unexpected::Bool(_) => "a boolean",
        Unexpected::Unsigned(_) | Unexpected::Signed(_) => "an integer",
        Unexpected::Float(_) => "a floating-point number",
        Unexpected::Char(_) => "a character",
        Unexpected::Str(_) => "a string",
        Unexpected::Bytes(_) => "bytes",
        Unexpected::Unit => "nil",
        Unexpected::Option => "an option",
        Unexpected::NewtypeStruct => "a newtype struct",
        Unexpected::Seq => "a list",
        Unexpected::Map => "a map",
        Unexpected::Enum
        | Unexpected::UnitVariant
        | Unexpected::NewtypeVariant
        | Unexpected::TupleVariant
        | Unexpected::StructVariant => "an enum variant",
        Unexpected::Other(_) => EXTENSION,
    }
}

/// What a found value was, in a type mismatch: [`kind_of`], or the Python type of a
/// pickled Python object.
fn found_words(found: &Unexpected<'_>) -> String {
    match found {
        Unexpected::Other(python_type) if *python_type != EXTENSION => format!(
            "a pickled Python object of type `{python_type}`, which only Python nodes read \
             (send a value MessagePack expresses: None, bool, int, float, str, bytes, list, dict)"
        ),
        other => kind_of(other).to_string(),
    }
}

/// Like [`kind_of`], with the value where it is short.
fn with_value(found: &Unexpected<'_>) -> String {
    match found {
        Unexpected::Unsigned(n) => format!("the integer {n}"),
        Unexpected::Signed(n) => format!("the integer {n}"),
        Unexpected::Float(x) => format!("the number {x}"),
        Unexpected::Bool(b) => format!("`{b}`"),
        Unexpected::Char(c) => format!("{c:?}"),
        Unexpected::Str(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        other => kind_of(other).to_string(),
    }
}

/// Whether serde's visitor of a number type expected it (`u8`, `f64`, ...).
fn is_number_type(expected: &str) -> bool {
    matches!(
        expected,
        "i8" | "i16"
            | "i32"
            | "i64"
            | "i128"
            | "isize"
            | "u8"
            | "u16"
            | "u32"
            | "u64"
            | "u128"
            | "usize"
            | "f32"
            | "f64"
    )
}

/// What serde's visitors expect (`i64`, `a sequence`, `struct Person`), as a caller
/// would say it (`an integer`, `a list`, `a `Person``).
fn in_plain_words(text: &str) -> String {
    let plain = match text {
        "f32" | "f64" => "a number",
        number if is_number_type(number) => "an integer",
        "a sequence" => "a list",
        "unit" => "nil",
        "option" => "a value or nil",
        "a borrowed string" => "a string",
        "a byte array" | "byte array" | "a borrowed byte array" | "bytes" => "bytes",
        _ => "",
    };
    if !plain.is_empty() {
        return plain.to_string();
    }
    for prefix in ["struct ", "tuple struct ", "unit struct ", "enum "] {
        if let Some(name) = text.strip_prefix(prefix) {
            return format!("a `{name}`");
        }
    }
    match text
        .strip_prefix("a tuple of size ")
        .or_else(|| text.strip_prefix("tuple of size "))
    {
        Some(n) => format!("a list of {n}"),
        None => text.to_string(),
    }
}

/// Decodes from a [`Value`], keeping what goes wrong as a [`Mismatch`]. It reads the
/// tree the way rmp-serde reads the bytes, so what fails there fails here.
#[derive(Clone, Copy)]
pub(crate) struct At<'v, 'de>(pub(crate) &'v Value<'de>);

impl<'de> At<'_, 'de> {
    fn unexpected(&self) -> Unexpected<'de> {
        match self.0 {
            Value::Nil => Unexpected::Unit,
            Value::Bool(b) => Unexpected::Bool(*b),
            Value::Unsigned(n) => Unexpected::Unsigned(*n),
            Value::Signed(n) => Unexpected::Signed(*n),
            Value::Float(x) => Unexpected::Float(*x),
            Value::Str(s) => Unexpected::Str(s),
            Value::Bytes(b) => Unexpected::Bytes(b),
            Value::List(_) => Unexpected::Seq,
            Value::Map(_) => Unexpected::Map,
            Value::Extension(None) => Unexpected::Other(EXTENSION),
            Value::Extension(Some(python_type)) => Unexpected::Other(python_type),
        }
    }
}

impl<'de> Deserializer<'de> for At<'_, 'de> {
    type Error = Mismatch;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Mismatch> {
        match self.0 {
            Value::Nil => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Unsigned(n) => visitor.visit_u64(*n),
            Value::Signed(n) => visitor.visit_i64(*n),
            Value::Float(x) => visitor.visit_f64(*x),
            Value::Str(s) => visitor.visit_borrowed_str(s),
            Value::Bytes(b) => visitor.visit_borrowed_bytes(b),
            Value::List(items) => visitor.visit_seq(Items {
                items: items.iter(),
                next: 0,
            }),
            Value::Map(entries) => visitor.visit_map(Entries {
                entries: entries.iter(),
                value: None,
            }),
            Value::Extension(_) => Err(de::Error::invalid_type(self.unexpected(), &visitor)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Mismatch> {
        match self.0 {
            Value::Nil => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Mismatch> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Mismatch> {
        match self.0 {
            Value::Nil => visitor.visit_unit(),
            Value::List(items) if items.is_empty() => visitor.visit_unit(),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Mismatch> {
        match self.0 {
            // As rmp-serde: bytes read as a list, where a list is asked for.
            Value::Bytes(bytes) => {
                visitor.visit_seq(de::value::SeqDeserializer::new(bytes.iter().copied()))
            }
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Mismatch> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Mismatch> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Mismatch> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_i128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Mismatch> {
        match self.0 {
            // As rmp-serde: 16 bytes, big-endian.
            Value::Bytes(b) => match <[u8; 16]>::try_from(*b) {
                Ok(b) => visitor.visit_i128(i128::from_be_bytes(b)),
                Err(_) => Err(de::Error::invalid_length(b.len(), &"16 bytes")),
            },
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_u128<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Mismatch> {
        match self.0 {
            Value::Bytes(b) => match <[u8; 16]>::try_from(*b) {
                Ok(b) => visitor.visit_u128(u128::from_be_bytes(b)),
                Err(_) => Err(de::Error::invalid_length(b.len(), &"16 bytes")),
            },
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Mismatch> {
        match self.0 {
            // A variant with data: a map of one entry, variant -> data.
            Value::Map(entries) => match entries.as_slice() {
                [(variant, data)] => visitor.visit_enum(Variant {
                    variant: At(variant),
                    data: Some(At(data)),
                }),
                _ => Err(de::Error::invalid_length(entries.len(), &"one variant")),
            },
            // A unit variant: its name or index.
            _ => visitor.visit_enum(Variant {
                variant: self,
                data: None,
            }),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 u8 u16 u32 u64 f32 f64 char str string bytes byte_buf unit
        map identifier ignored_any
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

struct Items<'v, 'de> {
    items: std::slice::Iter<'v, Value<'de>>,
    next: usize,
}

impl<'de> SeqAccess<'de> for Items<'_, 'de> {
    type Error = Mismatch;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Mismatch> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let index = self.next;
        self.next += 1;
        seed.deserialize(At(item))
            .map(Some)
            .map_err(|e| e.inside(Step::Index(index)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Entries<'v, 'de> {
    entries: std::slice::Iter<'v, (Value<'de>, Value<'de>)>,
    /// The value of the key just read, and the key's name for the path.
    value: Option<(&'v Value<'de>, Step)>,
}

impl<'de> MapAccess<'de> for Entries<'_, 'de> {
    type Error = Mismatch;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Mismatch> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let step = match key {
            Value::Str(s) => Step::Key(s.to_string()),
            Value::Unsigned(n) => Step::Key(n.to_string()),
            Value::Signed(n) => Step::Key(n.to_string()),
            _ => Step::Key("(key)".into()),
        };
        let key = seed
            .deserialize(At(key))
            .map_err(|e| e.inside(step_copy(&step)))?;
        self.value = Some((value, step));
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Mismatch> {
        match self.value.take() {
            Some((value, step)) => seed.deserialize(At(value)).map_err(|e| e.inside(step)),
            None => Err(de::Error::custom(
                "a map value was asked for before its key",
            )),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

fn step_copy(step: &Step) -> Step {
    match step {
        Step::Index(n) => Step::Index(*n),
        Step::Key(k) => Step::Key(k.clone()),
    }
}

/// An enum variant: its name (or index), and its data if it has any.
struct Variant<'v, 'de> {
    variant: At<'v, 'de>,
    data: Option<At<'v, 'de>>,
}

impl<'v, 'de> EnumAccess<'de> for Variant<'v, 'de> {
    type Error = Mismatch;
    type Variant = Data<'v, 'de>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), Mismatch> {
        Ok((seed.deserialize(self.variant)?, Data(self.data)))
    }
}

/// A variant's data, if it has any.
struct Data<'v, 'de>(Option<At<'v, 'de>>);

impl<'de> VariantAccess<'de> for Data<'_, 'de> {
    type Error = Mismatch;

    fn unit_variant(self) -> Result<(), Mismatch> {
        match self.0 {
            None => Ok(()),
            Some(data) => de::Deserialize::deserialize(data),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Mismatch> {
        match self.0 {
            Some(data) => seed.deserialize(data),
            None => seed.deserialize(().into_deserializer()),
        }
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Mismatch> {
        match self.0 {
            Some(data) => data.deserialize_seq(visitor),
            None => Err(de::Error::invalid_type(Unexpected::UnitVariant, &visitor)),
        }
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Mismatch> {
        match self.0 {
            Some(data) => data.deserialize_any(visitor),
            None => Err(de::Error::invalid_type(Unexpected::UnitVariant, &visitor)),
        }
    }
}

/// Why a result did not decode as `T`, to follow "the result of `add` ": "is an
/// integer, not a `String`", or "does not decode as `Vec<Point>`, at `[2].x`: ...".
#[cold]
pub(crate) fn result<T: de::DeserializeOwned>(
    payload: &[u8],
    error: &rmp_serde::decode::Error,
) -> String {
    let wanted = short_type_name(std::any::type_name::<T>());
    let mismatch = tree(payload).and_then(|tree| T::deserialize(At(&tree)).err());
    let Some(mismatch) = mismatch else {
        return format!("does not decode as `{wanted}`: {}", plain(error));
    };
    match mismatch.found_instead() {
        Some(found) if mismatch.at_top() => format!("is {found}, not a `{wanted}`"),
        _ => format!(
            "does not decode as `{wanted}`{}: {mismatch}",
            mismatch.location()
        ),
    }
}

/// rmp-serde's own error in plain words, for a payload too large to explain in full.
pub(crate) fn plain(error: &rmp_serde::decode::Error) -> String {
    use rmp_serde::decode::Error as E;
    match error {
        E::TypeMismatch(marker) => format!(
            "got {} where a number or a boolean belongs",
            marker_kind(*marker)
        ),
        E::OutOfRange => "a number is out of range for its type".into(),
        E::LengthMismatch(n) => format!("a list has the wrong length (expected {n})"),
        E::Utf8Error(_) => "a string is not valid UTF-8".into(),
        E::DepthLimitExceeded => format!(
            "nested deeper than {MAX_DEPTH} levels (lists, maps or structs inside one another); flatten it, or send it in parts"
        ),
        E::InvalidMarkerRead(_) | E::InvalidDataRead(_) => {
            "the data ends early: it was cut short, or is not MessagePack".into()
        }
        E::Syntax(text) | E::Uncategorized(text) => text.clone(),
    }
}

fn marker_kind(marker: rmp::Marker) -> &'static str {
    use rmp::Marker as M;
    match marker {
        M::Null => "nil",
        M::True | M::False => "a boolean",
        M::FixPos(_)
        | M::FixNeg(_)
        | M::U8
        | M::U16
        | M::U32
        | M::U64
        | M::I8
        | M::I16
        | M::I32
        | M::I64 => "an integer",
        M::F32 | M::F64 => "a floating-point number",
        M::FixStr(_) | M::Str8 | M::Str16 | M::Str32 => "a string",
        M::Bin8 | M::Bin16 | M::Bin32 => "bytes",
        M::FixArray(_) | M::Array16 | M::Array32 => "a list",
        M::FixMap(_) | M::Map16 | M::Map32 => "a map",
        M::Reserved => "a reserved MessagePack marker",
        _ => "a MessagePack extension",
    }
}

/// A type's name without module paths: `Vec<u8>` for `alloc::vec::Vec<u8>`,
/// `HashMap<String, i64>`, `Person` for `my_app::model::Person`.
pub(crate) fn short_type_name(full: &str) -> String {
    let mut short = String::with_capacity(full.len());
    let mut path = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            path.push(c);
        } else {
            short.push_str(last_segment(&path));
            path.clear();
            short.push(c);
        }
    }
    short.push_str(last_segment(&path));
    short
}

fn last_segment(path: &str) -> &str {
    path.rsplit("::").next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn mismatch<T: serde::de::DeserializeOwned + fmt::Debug>(payload: &[u8]) -> Mismatch {
        let value = tree(payload).expect("a tree");
        T::deserialize(At(&value)).expect_err("a mismatch")
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Person {
        name: String,
        age: u32,
    }

    #[test]
    fn type_mismatches_say_what_was_expected_and_found_and_where() {
        let payload = rmp_serde::to_vec(&vec![vec![1], vec![2, 3]]).expect("encodes");
        let m = mismatch::<Vec<Vec<String>>>(&payload);
        assert_eq!(
            (m.to_string(), m.location()),
            (
                "expected a string, got an integer".into(),
                ", at [0][0]".into()
            )
        );

        let payload = rmp_serde::to_vec(&vec![text_aged("Ann", "three")]).expect("encodes");
        let m = mismatch::<Vec<Person>>(&payload);
        assert_eq!(
            (m.to_string(), m.location()),
            (
                "expected an integer, got a string".into(),
                ", at [0].age".into()
            )
        );

        let m = mismatch::<u8>(&rmp_serde::to_vec(&300).expect("encodes"));
        assert_eq!(m.to_string(), "the integer 300 does not fit in `u8`");
    }

    #[test]
    fn a_pickled_python_object_is_named_by_its_type() {
        let ext = |tag: i8, data: &[u8]| {
            let mut payload = Vec::new();
            rmp::encode::write_ext_meta(&mut payload, data.len() as u32, tag).expect("encodes");
            payload.extend_from_slice(data);
            payload
        };
        let pickled = [&[14u8][..], b"__main__.Point", b"pickle bytes"].concat();
        assert!(mismatch::<i64>(&ext(PYTHON_PICKLE, &pickled))
            .to_string()
            .starts_with(
                "expected an integer, got a pickled Python object of type `__main__.Point`"
            ));
        assert_eq!(
            mismatch::<i64>(&ext(7, &pickled)).to_string(),
            "expected an integer, got a MessagePack extension"
        );
    }

    /// A person whose age is a string.
    fn text_aged(name: &str, age: &str) -> std::collections::BTreeMap<String, String> {
        [
            ("name".to_string(), name.to_string()),
            ("age".to_string(), age.to_string()),
        ]
        .into()
    }

    #[test]
    fn struct_errors_name_the_field() {
        let payload = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("name", "Ann")]))
            .expect("encodes");
        assert_eq!(
            mismatch::<Person>(&payload).to_string(),
            "missing field `age`"
        );
    }

    #[test]
    fn what_is_too_large_or_too_deep_is_not_explained_in_full() {
        let many = rmp_serde::to_vec(&vec![0u8; MAX_VALUES + 1]).expect("encodes");
        assert!(tree(&many).is_none());
        let mut deep = vec![0x91u8; MAX_NESTING + 1];
        deep.push(0xc0);
        assert!(tree(&deep).is_none());
        let fine = rmp_serde::to_vec(&vec![0u8; 1000]).expect("encodes");
        assert!(tree(&fine).is_some());
    }

    #[test]
    fn type_names_lose_their_module_paths() {
        for (full, short) in [
            ("alloc::string::String", "String"),
            ("alloc::vec::Vec<u8>", "Vec<u8>"),
            ("my_app::model::Person", "Person"),
            (
                "std::collections::hash::map::HashMap<alloc::string::String, i64>",
                "HashMap<String, i64>",
            ),
            (
                "(i64, core::option::Option<bytes::bytes::Bytes>)",
                "(i64, Option<Bytes>)",
            ),
            ("&str", "&str"),
            ("[u8; 4]", "[u8; 4]"),
        ] {
            assert_eq!(short_type_name(full), short);
        }
    }
}
