//! `daffi::Error` as the exceptions of `daffi.exceptions` (the Python daffi's names,
//! under one base class `DaffiError`).

use daffi::Error;
use pyo3::prelude::*;

/// The class in `daffi.exceptions` that stands for `error`.
fn class_name(error: &Error) -> &'static str {
    match error {
        Error::Timeout { .. } => "TimeoutError",
        Error::BadArguments { .. } => "BadArgumentsError",
        Error::Remote { .. } | Error::BadResult { .. } | Error::Broadcast { .. } => {
            "RemoteCallError"
        }
        Error::NoProvider { .. } | Error::UnknownProcess { .. } => "UnableToFindCandidate",
        Error::PeerDisconnected { .. }
        | Error::PeerStopped { .. }
        | Error::ControllerUnreachable { .. } => "RemoteStoppedUnexpectedly",
        Error::Stopped | Error::NoNode => "GlobalContextError",
        Error::Config(_)
        | Error::Bind { .. }
        | Error::DuplicateProcessName { .. }
        | Error::DuplicateCallback { .. }
        | Error::AuthenticationFailed { .. }
        | Error::Tls { .. }
        | Error::UnsafeSocket { .. } => "InitializationError",
        _ => "DaffiError",
    }
}

/// The Python exception for `error`, with its text.
pub fn to_py(error: &Error) -> PyErr {
    Python::attach(
        |py| match exception(py, class_name(error), &error.to_string()) {
            Ok(e) => e,
            Err(e) => e,
        },
    )
}

/// The Python exception for `error` when a node could not start: always an
/// `InitializationError`, whatever the cause (an unreachable controller included).
pub fn to_py_at_start(error: &Error) -> PyErr {
    raise("InitializationError", error)
}

/// `error` as an exception of the class `class` (or the failure to make one).
fn raise(class: &str, error: &Error) -> PyErr {
    Python::attach(|py| match exception(py, class, &error.to_string()) {
        Ok(e) => e,
        Err(e) => e,
    })
}

/// An exception of `daffi.exceptions`, by class name.
pub fn exception(py: Python<'_>, class: &str, message: &str) -> PyResult<PyErr> {
    let class = py.import("daffi.exceptions")?.getattr(class)?;
    Ok(PyErr::from_value(class.call1((message,))?))
}
