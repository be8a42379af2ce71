//! Python functions served as callbacks. Sync ones run on the threads of
//! [`workers`]; async ones on the event loop the Python `Global` keeps: the handler hands
//! the arguments to a Python `submit(args, kwargs, done)` from a blocking thread, and
//! the loop calls `done` with the outcome. Neither takes the GIL on a runtime thread.
//! A call that brings a stream of arguments (`& STREAM`) calls either once per item.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use daffi::__private::{serde, BoxFuture, CallbackFailure, Handler, Outcome, Param};
use daffi::Incoming;
use daffi_wire::Payload;
use futures_core::Stream;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::sync::oneshot;

use crate::values;
use crate::workers;

/// A handler that calls the Python function `function(*args, **kwargs)` on a thread of
/// [`workers`]; with a caller's stream of arguments (`& STREAM`), once per item.
pub fn sync_handler(function: Py<PyAny>) -> Handler {
    let function = Arc::new(function);
    Handler::Async(Arc::new(move |payload: Bytes| -> BoxFuture<Outcome> {
        let function = function.clone();
        match take_incoming() {
            Some(items) => Box::pin(each_item(items, move |item| {
                run_sync(function.clone(), payload.clone(), Some(item))
            })),
            None => Box::pin(run_sync(function, payload, None)),
        }
    }))
}

/// Calls `function(*args, **kwargs)` (`function(item, *args, **kwargs)` with an item)
/// on a thread of [`workers`], queued at once.
fn run_sync(
    function: Arc<Py<PyAny>>,
    payload: Bytes,
    item: Option<rmpv::Value>,
) -> impl Future<Output = Outcome> {
    let answer = workers::run(move |py, tx| {
        let result = decode(py, &payload, item)
            .and_then(|(args, kwargs)| outcome(py, function.bind(py).call(args, Some(&kwargs))));
        // The caller may be gone (a timeout); nothing to tell then.
        let _ = tx.send(result);
    });
    async move { answer.await.unwrap_or_else(|| Err(dropped())) }
}

pub(crate) fn dropped() -> CallbackFailure {
    CallbackFailure::failed("the Python callback ended without an answer")
}

/// A handler that starts the Python `submit(args, kwargs, done)` and waits for `done`;
/// with a caller's stream of arguments, once per item, in turn.
pub fn async_handler(submit: Py<PyAny>) -> Handler {
    let submit = Arc::new(submit);
    Handler::Async(Arc::new(move |payload: Bytes| -> BoxFuture<Outcome> {
        let submit = submit.clone();
        match take_incoming() {
            Some(items) => Box::pin(each_item(items, move |item| {
                run_async(submit.clone(), payload.clone(), Some(item))
            })),
            None => Box::pin(run_async(submit, payload, None)),
        }
    }))
}

/// Runs `submit` (`item` first among the arguments, if given) and waits for its `done`.
async fn run_async(submit: Arc<Py<PyAny>>, payload: Bytes, item: Option<rmpv::Value>) -> Outcome {
    let (tx, rx) = oneshot::channel();
    let started = tokio::task::spawn_blocking(move || {
        Python::attach(|py| start(py, &submit, &payload, item, tx))
    })
    .await
    .map_err(|e| CallbackFailure::failed(format!("the Python callback did not start: {e}")))?;
    started?;
    match rx.await {
        Ok(step) => step.into_outcome(),
        Err(_) => Err(CallbackFailure::failed(
            "the Python event loop dropped the call (it stopped)",
        )),
    }
}

/// The caller's stream of arguments (`& STREAM`, or `.stream_from(..)` in Rust), if
/// this call has one. The core offers it while the handler starts.
fn take_incoming() -> Option<Incoming<rmpv::Value>> {
    <Incoming<rmpv::Value> as Param>::unnamed::<serde::de::value::Error>()?.ok()
}

/// Runs `call` with each item of `items` in turn, each once the one before ended: the
/// Python daffi's STREAM. The result is None; the first failure ends it (the caller
/// stops feeding), as does the caller giving up.
async fn each_item<F, Fut>(mut items: Incoming<rmpv::Value>, call: F) -> Outcome
where
    F: Fn(rmpv::Value) -> Fut,
    Fut: Future<Output = Outcome>,
{
    while let Some(item) = std::future::poll_fn(|cx| Pin::new(&mut items).poll_next(cx)).await {
        call(item.map_err(CallbackFailure::failed)?).await?;
    }
    Ok(Payload::from(Bytes::from_static(NONE)))
}

/// MessagePack for None.
const NONE: &[u8] = &[0xc0];

fn start(
    py: Python<'_>,
    submit: &Py<PyAny>,
    payload: &Bytes,
    item: Option<rmpv::Value>,
    tx: oneshot::Sender<Step>,
) -> Result<(), CallbackFailure> {
    let (args, kwargs) = decode(py, payload, item)?;
    submit
        .bind(py)
        .call1((args, kwargs, Done::new(tx)))
        .map(drop)
        .map_err(|e| CallbackFailure::failed(describe(py, &e)))
}

/// What a Python callback gave: its value, or (a generator) one item; the end of a
/// generator; or a failure.
pub enum Step {
    /// The value or item, encoded.
    Item(Payload),
    /// The generator is exhausted.
    End,
    /// The callback raised, or its value could not be sent.
    Failed(CallbackFailure),
}

impl Step {
    /// A value (or the exception raised instead) as a step.
    pub fn of(py: Python<'_>, result: PyResult<Bound<'_, PyAny>>) -> Step {
        match outcome(py, result) {
            Ok(item) => Step::Item(item),
            Err(failure) => Step::Failed(failure),
        }
    }

    /// The step of a callback with one result: its outcome.
    fn into_outcome(self) -> Outcome {
        match self {
            Step::Item(item) => Ok(item),
            Step::Failed(failure) => Err(failure),
            Step::End => Err(CallbackFailure::failed(
                "the Python callback raised StopAsyncIteration",
            )),
        }
    }
}

/// Given to the event loop: `done(ok, value)` ends a call (or gives an async generator's
/// next item), `value` being the result or the exception; `done.end()` tells that an
/// async generator is exhausted.
#[pyclass(module = "daffi._daffi", frozen)]
pub struct Done {
    tx: Mutex<Option<oneshot::Sender<Step>>>,
}

impl Done {
    /// A `done` that answers on `tx`.
    pub fn new(tx: oneshot::Sender<Step>) -> Self {
        Done {
            tx: Mutex::new(Some(tx)),
        }
    }

    /// Answers, once; later answers are dropped.
    pub fn send(&self, step: Step) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            // The caller may be gone (a timeout, a cancelled stream); nothing to tell then.
            let _ = tx.send(step);
        }
    }
}

#[pymethods]
impl Done {
    fn __call__(&self, py: Python<'_>, ok: bool, value: Bound<'_, PyAny>) {
        let result = if ok {
            Ok(value)
        } else {
            Err(PyErr::from_value(value))
        };
        self.send(Step::of(py, result));
    }

    /// The async generator is exhausted.
    fn end(&self) {
        self.send(Step::End);
    }
}

/// The arguments of a call as `(args, kwargs)`; an item of a stream of arguments, if
/// given, comes first in `args`.
pub(crate) fn decode<'py>(
    py: Python<'py>,
    payload: &Bytes,
    item: Option<rmpv::Value>,
) -> Result<(Bound<'py, PyTuple>, Bound<'py, PyDict>), CallbackFailure> {
    let value = rmpv::decode::read_value(&mut &payload[..]).map_err(|e| {
        CallbackFailure::bad_arguments(format!("the arguments are not MessagePack: {e}"))
    })?;
    let bad = |e: PyErr| CallbackFailure::bad_arguments(describe(py, &e));
    let (args, kwargs) = values::decode_args(py, value).map_err(bad)?;
    let Some(item) = item else {
        return Ok((args, kwargs));
    };
    let item = values::from_value(py, item).map_err(bad)?.into_bound(py);
    let all: Vec<_> = std::iter::once(item).chain(args.iter()).collect();
    let all = PyTuple::new(py, all).map_err(bad)?;
    Ok((all, kwargs))
}

/// A Python result as the reply, or its exception as the caller's error text.
fn outcome(py: Python<'_>, result: PyResult<Bound<'_, PyAny>>) -> Outcome {
    let value = result
        .and_then(|v| values::to_value(&v))
        .map_err(|e| CallbackFailure::failed(describe(py, &e)))?;
    let bytes = values::encode(&value).map_err(|e| CallbackFailure::failed(describe(py, &e)))?;
    Ok(Payload::from(Bytes::from(bytes)))
}

/// `TypeName: message`, as Python prints an exception's last line.
pub(crate) fn describe(py: Python<'_>, error: &PyErr) -> String {
    let name = error
        .get_type(py)
        .qualname()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    format!("{name}: {}", error.value(py))
}
