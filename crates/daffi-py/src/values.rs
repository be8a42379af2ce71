//! Python values <-> MessagePack. What MessagePack expresses (None, bool, int, float,
//! str, bytes, list, tuple, dict) crosses between languages as itself; any other object
//! travels pickled (stdlib `pickle`) in an extension value that only Python nodes read.
//!
//! A pickled value is the extension [`PICKLE_EXT`] holding one byte (the length of the
//! type's name), the name (`module.QualName`), then the pickle. The name lets a node
//! that cannot unpickle say what it was given.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple,
};
use rmpv::Value;

/// The MessagePack extension type of a pickled Python object.
pub const PICKLE_EXT: i8 = 80;

/// Deeper values are refused rather than overflow the stack (a list that holds itself).
const MAX_DEPTH: usize = 512;

/// A Python value as MessagePack.
pub fn to_value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    to_value_at(obj, 0)
}

fn to_value_at(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "a value nested deeper than {MAX_DEPTH} levels cannot be sent"
        )));
    }
    if obj.is_none() {
        return Ok(Value::Nil);
    }
    if let Ok(b) = obj.cast_exact::<PyBool>() {
        return Ok(Value::Boolean(b.is_true()));
    }
    if obj.is_exact_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
    }
    if let Ok(f) = obj.cast_exact::<PyFloat>() {
        return Ok(Value::F64(f.value()));
    }
    if let Ok(s) = obj.cast_exact::<PyString>() {
        return Ok(Value::from(s.to_cow()?.as_ref()));
    }
    if let Ok(b) = obj.cast_exact::<PyBytes>() {
        return Ok(Value::Binary(b.as_bytes().to_vec()));
    }
    if let Ok(b) = obj.cast_exact::<PyByteArray>() {
        return Ok(Value::Binary(b.to_vec()));
    }
    if let Ok(list) = obj.cast_exact::<PyList>() {
        return list
            .iter()
            .map(|v| to_value_at(&v, depth + 1))
            .collect::<PyResult<_>>()
            .map(Value::Array);
    }
    if let Ok(tuple) = obj.cast_exact::<PyTuple>() {
        return tuple
            .iter()
            .map(|v| to_value_at(&v, depth + 1))
            .collect::<PyResult<_>>()
            .map(Value::Array);
    }
    if let Ok(dict) = obj.cast_exact::<PyDict>() {
        return dict_to_value(dict, depth);
    }
    pickled(obj)
}

fn dict_to_value(dict: &Bound<'_, PyDict>, depth: usize) -> PyResult<Value> {
    dict.iter()
        .map(|(k, v)| Ok((to_value_at(&k, depth + 1)?, to_value_at(&v, depth + 1)?)))
        .collect::<PyResult<_>>()
        .map(Value::Map)
}

/// `obj` pickled, with its type's name in front.
fn pickled(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    let py = obj.py();
    let class = obj.get_type();
    let name = format!("{}.{}", class.module()?, class.qualname()?);
    let name = truncated(&name, u8::MAX as usize);
    let pickle = py.import("pickle")?.getattr("dumps")?.call1((obj,))?;
    let pickle = pickle.cast::<PyBytes>()?.as_bytes();
    let mut data = Vec::with_capacity(1 + name.len() + pickle.len());
    data.push(name.len() as u8);
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(pickle);
    Ok(Value::Ext(PICKLE_EXT, data))
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// MessagePack as a Python value.
pub fn from_value(py: Python<'_>, value: Value) -> PyResult<Py<PyAny>> {
    Ok(match value {
        Value::Nil => py.None(),
        Value::Boolean(b) => PyBool::new(py, b).to_owned().into_any().unbind(),
        Value::Integer(i) => match i.as_i64() {
            Some(i) => i.into_pyobject(py)?.into_any().unbind(),
            None => i
                .as_u64()
                .unwrap_or_default()
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        },
        Value::F32(f) => f64::from(f).into_pyobject(py)?.into_any().unbind(),
        Value::F64(f) => f.into_pyobject(py)?.into_any().unbind(),
        Value::String(s) => match s.into_str() {
            Some(s) => s.into_pyobject(py)?.into_any().unbind(),
            None => return Err(PyValueError::new_err("received a string that is not UTF-8")),
        },
        Value::Binary(b) => PyBytes::new(py, &b).into_any().unbind(),
        Value::Array(items) => {
            let items = items
                .into_iter()
                .map(|v| from_value(py, v))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Value::Map(entries) => map_to_dict(py, entries)?.into_any().unbind(),
        Value::Ext(PICKLE_EXT, data) => unpickled(py, &data)?,
        Value::Ext(kind, _) => {
            return Err(PyValueError::new_err(format!(
                "received a MessagePack extension of type {kind}, which daffi does not read"
            )))
        }
    })
}

/// A map as a dict; list keys become tuples (a dict key must be hashable).
pub fn map_to_dict(py: Python<'_>, entries: Vec<(Value, Value)>) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    for (k, v) in entries {
        let key = from_value(py, k)?;
        let key = match key.bind(py).cast::<PyList>() {
            Ok(list) => list.to_tuple().into_any().unbind(),
            Err(_) => key,
        };
        dict.set_item(key, from_value(py, v)?)?;
    }
    Ok(dict)
}

/// The object in a pickled extension value. Unpickling runs code the sender chose:
/// only between nodes you trust.
fn unpickled(py: Python<'_>, data: &[u8]) -> PyResult<Py<PyAny>> {
    let pickle = data
        .first()
        .and_then(|&len| data.get(1 + len as usize..))
        .ok_or_else(|| PyValueError::new_err("received a pickled value cut short"))?;
    Ok(py
        .import("pickle")?
        .getattr("loads")?
        .call1((PyBytes::new(py, pickle),))?
        .unbind())
}

/// Positional and keyword arguments as one MessagePack value: a list when there are no
/// keyword arguments, a map of name -> value (the named arguments a Rust `#[callback]`
/// takes) when there are no positional ones, and otherwise a map holding both, the
/// positional ones keyed by their index.
pub fn encode_args(
    args: &Bound<'_, PyTuple>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Vec<u8>> {
    let kwargs = kwargs.filter(|k| !k.is_empty());
    let value = match kwargs {
        None => to_value(args.as_any())?,
        Some(kwargs) => {
            let mut entries = Vec::with_capacity(args.len() + kwargs.len());
            for (i, arg) in args.iter().enumerate() {
                entries.push((Value::from(i as u64), to_value(&arg)?));
            }
            if let Value::Map(named) = dict_to_value(kwargs, 0)? {
                entries.extend(named);
            }
            Value::Map(entries)
        }
    };
    encode(&value)
}

/// A MessagePack value as bytes.
pub fn encode(value: &Value) -> PyResult<Vec<u8>> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value)
        .map_err(|e| PyValueError::new_err(format!("could not encode a value: {e}")))?;
    Ok(out)
}

/// Arguments received (see [`encode_args`]) as Python `(args, kwargs)`. Anything but a
/// list or a map is one positional argument.
pub fn decode_args<'py>(
    py: Python<'py>,
    value: Value,
) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyDict>)> {
    let kwargs = PyDict::new(py);
    let mut positional = Vec::new();
    match value {
        Value::Array(items) => positional = items,
        Value::Map(entries) => {
            let mut indexed = Vec::new();
            for (k, v) in entries {
                match k {
                    Value::Integer(i) => indexed.push((i.as_u64().unwrap_or(u64::MAX), v)),
                    Value::String(s) => {
                        let name = s.into_str().ok_or_else(|| {
                            PyValueError::new_err("an argument name is not UTF-8")
                        })?;
                        kwargs.set_item(name, from_value(py, v)?)?;
                    }
                    other => {
                        return Err(PyValueError::new_err(format!(
                            "an argument is named by {other}, not by a string"
                        )))
                    }
                }
            }
            indexed.sort_by_key(|(i, _)| *i);
            positional = indexed.into_iter().map(|(_, v)| v).collect();
        }
        one => positional.push(one),
    }
    let positional = positional
        .into_iter()
        .map(|v| from_value(py, v))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((PyTuple::new(py, positional)?, kwargs))
}
