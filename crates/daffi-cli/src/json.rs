//! Results as JSON: any MessagePack value a callback returns, decoded into a
//! `serde_json::Value`.
//!
//! `serde_json::Value` alone refuses what JSON has no word for; this decoder maps it:
//! binary data becomes an array of byte values, a map key that is not a string becomes
//! its JSON text (`1` -> `"1"`), a float that is NaN or infinite becomes `null`, and a
//! MessagePack extension becomes `[type, [bytes]]`.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A decoded result.
#[derive(Debug, Clone, PartialEq)]
pub struct Json(pub Value);

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor).map(Json)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any MessagePack value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Array(
            v.iter().map(|b| Value::Number((*b).into())).collect(),
        ))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Json::deserialize(d).map(|j| j.0)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Json::deserialize(d).map(|j| j.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Json(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some((Json(key), Json(value))) = map.next_entry()? {
            let key = match key {
                Value::String(s) => s,
                other => other.to_string(),
            };
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;
    use std::collections::BTreeMap;

    fn through_msgpack<T: Serialize>(value: &T) -> Value {
        let bytes = rmp_serde::to_vec_named(value).expect("encode");
        rmp_serde::from_slice::<Json>(&bytes).expect("decode").0
    }

    #[test]
    fn plain_values() {
        assert_eq!(through_msgpack(&3i64), serde_json::json!(3));
        assert_eq!(through_msgpack(&-3i64), serde_json::json!(-3));
        assert_eq!(through_msgpack(&u64::MAX), serde_json::json!(u64::MAX));
        assert_eq!(through_msgpack(&1.5f64), serde_json::json!(1.5));
        assert_eq!(through_msgpack(&"Ann"), serde_json::json!("Ann"));
        assert_eq!(through_msgpack(&()), Value::Null);
        assert_eq!(through_msgpack(&Some(2)), serde_json::json!(2));
        assert_eq!(through_msgpack(&vec![1, 2]), serde_json::json!([1, 2]));
        let map: BTreeMap<&str, i32> = [("k", 1)].into();
        assert_eq!(through_msgpack(&map), serde_json::json!({"k": 1}));
    }

    #[test]
    fn what_json_lacks() {
        assert_eq!(through_msgpack(&f64::NAN), Value::Null);
        assert_eq!(
            through_msgpack(&serde_bytes_like(b"hi")),
            serde_json::json!([104, 105])
        );
        let int_keys: BTreeMap<i32, &str> = [(1, "a")].into();
        assert_eq!(through_msgpack(&int_keys), serde_json::json!({"1": "a"}));
    }

    /// A value that serializes as MessagePack binary.
    fn serde_bytes_like(b: &'static [u8]) -> impl Serialize {
        struct B(&'static [u8]);
        impl Serialize for B {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(b)
    }
}
