//! [`Node`]: a `daffi::Global` on a runtime of its own, driven from Python. Every call
//! returns a [`Pending`] at once; Python waits on it with the GIL released.

use std::collections::HashSet;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use daffi::{Call, Global, Period, ScheduledTask};
use futures_core::Stream;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tokio::runtime::Runtime;

use crate::callee;
use crate::errors;
use crate::feed;
use crate::generators;
use crate::pending::{self, Answer, Pending, Reply};
use crate::streams::CallStream;
use crate::values;

/// How a call ends: the Python daffi's modifiers.
#[derive(Clone, Copy)]
enum Mode {
    /// FG and BG: the result.
    Result,
    /// NO_RETURN: done once sent.
    NoReturn,
    /// BROADCAST with `return_result=True`: node name -> result.
    Broadcast,
    /// BROADCAST with `return_result=False`.
    BroadcastNoReturn,
}

impl Mode {
    fn parse(text: &str) -> PyResult<Mode> {
        Ok(match text {
            "result" => Mode::Result,
            "no_return" => Mode::NoReturn,
            "broadcast" => Mode::Broadcast,
            "broadcast_no_return" => Mode::BroadcastNoReturn,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown call mode {other:?}"
                )))
            }
        })
    }
}

/// A node (and maybe the controller) of this process.
#[pyclass(module = "daffi._daffi", frozen)]
pub struct Node {
    global: Global,
    /// Callbacks found to stream: called as streams from then on.
    streams: Arc<KnownStreams>,
    /// Shut down in the background when the node is dropped (see `Drop`).
    runtime: ManuallyDrop<Runtime>,
}

#[pymethods]
impl Node {
    /// Starts the node and/or controller; the arguments are the Python daffi's `Global`'s,
    /// and `callbacks` what the node serves from the start: `(name, function, kind)`
    /// as [`register`](Self::register) takes them.
    #[new]
    #[pyo3(signature = (callbacks, process_name=None, init_controller=false, init_node=true, host=None, port=None, unix_sock_path=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        callbacks: Vec<(String, Py<PyAny>, String)>,
        process_name: Option<String>,
        init_controller: bool,
        init_node: bool,
        host: Option<String>,
        port: Option<u16>,
        unix_sock_path: Option<String>,
    ) -> PyResult<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("daffi-py")
            .enable_all()
            .build()
            .map_err(|e| errors::to_py_at_start(&daffi::Error::Io(e)))?;
        let mut builder = Global::builder()
            .init_controller(init_controller)
            .init_node(init_node);
        if let Some(name) = process_name {
            builder = builder.process_name(name);
        }
        if let Some(host) = host {
            builder = builder.host(host);
        }
        if let Some(port) = port {
            builder = builder.port(port);
        }
        if let Some(path) = unix_sock_path {
            builder = builder.unix_sock_path(path);
        }
        for (name, function, kind) in callbacks {
            builder = builder.handler(name, handler(function, &kind)?);
        }
        let global = py
            .detach(|| runtime.block_on(builder.start_async()))
            .map_err(|e| errors::to_py_at_start(&e))?;
        Ok(Node {
            global,
            streams: Arc::default(),
            runtime: ManuallyDrop::new(runtime),
        })
    }

    /// This node's process name.
    #[getter]
    fn process_name(&self) -> String {
        self.global.process_name().to_string()
    }

    /// The TCP port of the controller this node talks to (or runs), if on TCP.
    #[getter]
    fn port(&self) -> Option<u16> {
        self.global.port()
    }

    /// Serves `function` under `name`. By `kind`:
    /// - `sync`: called as `function(*args, **kwargs)` on a worker thread;
    /// - `async`: called as `function(args, kwargs, done)`, which must hand the work to
    ///   an event loop and call `done(ok, value)` when it ends;
    /// - `generator`: `function(*args, **kwargs)` is a generator, whose items stream;
    /// - `async_generator`: `function(args, kwargs)` gives a run of an async generator,
    ///   with `advance(done)` (one item: `done(ok, value)`, or `done.end()`) and `close()`.
    fn register(&self, name: &str, function: Py<PyAny>, kind: &str) -> PyResult<()> {
        self.global
            .register_handler(name, handler(function, kind)?)
            .map_err(|e| errors::to_py(&e))
    }

    /// Calls `name(*args, **kwargs)` on another node; `mode` is `result` (FG, BG),
    /// `no_return`, `broadcast` or `broadcast_no_return`. With `result`, a stream
    /// callback's answer is a [`CallStream`] of its items.
    #[pyo3(signature = (name, args, kwargs, mode, timeout=None, eta=None))]
    fn call(
        &self,
        name: &str,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        mode: &str,
        timeout: Option<f64>,
        eta: Option<f64>,
    ) -> PyResult<Pending> {
        let mode = Mode::parse(mode)?;
        let mut call = self
            .global
            .call(name)
            .raw_args(Bytes::from(values::encode_args(args, kwargs)?));
        if let Some(t) = timeout {
            call = call.timeout(seconds("timeout", t)?);
        }
        if let Some(eta) = eta {
            call = call.eta(seconds("eta", eta)?);
        }
        Ok(match mode {
            Mode::Result => self.call_for_result(name, call),
            Mode::NoReturn => {
                self.spawn(async move { call.no_return_async().await.map(|()| nothing()) })
            }
            Mode::Broadcast => self.spawn(async move {
                let all = call.broadcast_async::<rmpv::Value>().await?;
                Ok(Reply::ByNode(all.into_iter().collect()))
            }),
            Mode::BroadcastNoReturn => self
                .spawn(async move { call.broadcast_no_return_async().await.map(|()| nothing()) }),
        })
    }

    /// STREAM: calls `name(*args, **kwargs)` with the items of `iterable` as its stream
    /// of arguments (a Python callback is called with each item in turn, before the
    /// other arguments); the result is the callback's (None for a Python one). An
    /// exception of the iterable ends the stream and is raised in place of the result.
    #[pyo3(signature = (name, iterable, args, kwargs, timeout=None))]
    fn stream_to(
        &self,
        name: &str,
        iterable: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        timeout: Option<f64>,
    ) -> PyResult<Pending> {
        let mut call = self
            .global
            .call(name)
            .raw_args(Bytes::from(values::encode_args(args, kwargs)?));
        if let Some(t) = timeout {
            call = call.timeout(seconds("timeout", t)?);
        }
        let (items, failure) = feed::items(iterable.try_iter()?);
        let call = call.stream_from(items);
        Ok(self.spawn(async move {
            let answer = call.fg_async::<rmpv::Value>().await;
            match failure.take() {
                Some(error) => Ok(Reply::Raise(error)),
                None => answer.map(Reply::Value),
            }
        }))
    }

    /// PERIOD: schedules `name(*args, **kwargs)` at each UTC timestamp of `at_time`, or
    /// every `period` seconds; the result is a [`Schedule`].
    #[pyo3(signature = (name, args, kwargs, at_time=None, period=None))]
    fn schedule(
        &self,
        name: &str,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
        at_time: Option<Vec<f64>>,
        period: Option<f64>,
    ) -> PyResult<Pending> {
        let when = match (at_time, period) {
            (Some(times), None) => {
                Period::at(times.into_iter().map(timestamp).collect::<PyResult<_>>()?)
            }
            (None, Some(every)) => Period::every(seconds("period", every)?),
            _ => {
                return Err(PyValueError::new_err(
                    "PERIOD takes either at_time or period, not both and not neither",
                ))
            }
        };
        let call = self
            .global
            .call(name)
            .raw_args(Bytes::from(values::encode_args(args, kwargs)?));
        Ok(self.spawn(async move { call.period_async(when).await.map(Reply::Schedule) }))
    }

    /// Done once a node named `name` is connected.
    fn wait_process(&self, name: String) -> Pending {
        let global = self.global.clone();
        self.spawn(async move { global.wait_process_async(&name).await.map(|()| nothing()) })
    }

    /// Done once some node serves the callback `name`.
    fn wait_function(&self, name: String) -> Pending {
        let global = self.global.clone();
        self.spawn(async move { global.wait_function_async(&name).await.map(|()| nothing()) })
    }

    /// Done once this node stops.
    fn join(&self) -> Pending {
        let global = self.global.clone();
        self.spawn(async move {
            global.join_async().await;
            Ok(nothing())
        })
    }

    /// Stops the node and the controller (if this process runs it).
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.global.stop());
    }

    /// Callback name -> names of the nodes that serve it.
    fn registered_callbacks(&self) -> std::collections::HashMap<String, Vec<String>> {
        self.global.registered_callbacks()
    }
}

impl Node {
    /// Runs `work` on the runtime; its answer completes the returned [`Pending`].
    fn spawn(&self, work: impl Future<Output = Answer> + Send + 'static) -> Pending {
        pending::spawn(self.runtime.handle(), work)
    }

    /// FG or BG: the result, or the items of a stream callback. A callee that answers
    /// a plain call "it streams" is called again as a stream (it did not run), and its
    /// name is remembered so that later calls open a stream at once.
    fn call_for_result(&self, name: &str, call: Call) -> Pending {
        let streams = self.streams.clone();
        if streams.contains(name) {
            return self.spawn(open_stream(call, streams));
        }
        let again = call.clone();
        // Sent from this thread: the task only waits for the reply, so its start is off
        // the round trip.
        let sent = call.bg::<rmpv::Value>();
        self.spawn(async move {
            match sent?.await {
                Err(daffi::Error::NotAStream { callback, .. }) => {
                    streams.insert(callback);
                    open_stream(again, streams).await
                }
                answer => answer.map(Reply::Value),
            }
        })
    }
}

/// Opens `call` as a stream and reads its first item; a callee that answers it does not
/// stream (any more) gets the call as a plain one.
async fn open_stream(call: Call, streams: Arc<KnownStreams>) -> Answer {
    let plain = call.clone();
    let mut stream = call.stream::<rmpv::Value>()?;
    let first = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_next(cx)).await;
    match first {
        Some(Err(daffi::Error::NotAStream { callback, .. })) => {
            streams.remove(&callback);
            plain.fg_async().await.map(Reply::Value)
        }
        Some(Err(e)) => Err(e),
        first => Ok(Reply::Stream(CallStream::new(stream, first))),
    }
}

/// The names of the callbacks found to stream. Looked up on every call: a process that
/// never met one pays one atomic load.
#[derive(Default)]
struct KnownStreams {
    any: AtomicBool,
    names: Mutex<HashSet<String>>,
}

impl KnownStreams {
    fn names(&self) -> MutexGuard<'_, HashSet<String>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn contains(&self, name: &str) -> bool {
        self.any.load(Ordering::Relaxed) && self.names().contains(name)
    }

    fn insert(&self, name: String) {
        self.names().insert(name);
        self.any.store(true, Ordering::Relaxed);
    }

    fn remove(&self, name: &str) {
        self.names().remove(name);
    }
}

impl Drop for Node {
    /// Stops the node with the GIL released, so that callbacks still running can
    /// finish, then lets the runtime's threads end without waiting for them (one may be
    /// waiting for the GIL this thread holds).
    fn drop(&mut self) {
        Python::attach(|py| py.detach(|| self.global.stop()));
        // SAFETY: the runtime is taken once, here, and never used after.
        let runtime = unsafe { ManuallyDrop::take(&mut self.runtime) };
        runtime.shutdown_background();
    }
}

/// The handler that runs a Python callback of `kind` (see [`Node::register`]).
fn handler(function: Py<PyAny>, kind: &str) -> PyResult<daffi::__private::Handler> {
    Ok(match kind {
        "sync" => callee::sync_handler(function),
        "async" => callee::async_handler(function),
        "generator" => generators::generator_handler(function),
        "async_generator" => generators::async_generator_handler(function),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown callback kind {other:?}"
            )))
        }
    })
}

fn nothing() -> Reply {
    Reply::Value(rmpv::Value::Nil)
}

/// A duration given in seconds, refused when negative or not a number.
fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a number of seconds, at least 0, not {value}"
        ))
    })
}

/// A UTC timestamp (seconds after the Unix epoch) as a time.
fn timestamp(value: f64) -> PyResult<SystemTime> {
    Ok(SystemTime::UNIX_EPOCH + seconds("at_time", value)?)
}

/// A PERIOD schedule, kept by the controller until cancelled.
#[pyclass(module = "daffi._daffi", frozen)]
pub struct Schedule {
    pub(crate) task: ScheduledTask,
}

#[pymethods]
impl Schedule {
    /// The schedule's id at the controller.
    #[getter]
    fn id(&self) -> u64 {
        self.task.id()
    }

    /// Cancels the schedule.
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.task.cancel())
            .map_err(|e| errors::to_py(&e))
    }
}
