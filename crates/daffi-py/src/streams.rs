//! [`CallStream`]: what a call of a stream callback gives Python, iterated with `for`
//! (each item waited for with the GIL released, Ctrl-C checked) or `async for`.
//! Closing it, or dropping the last reference to it, cancels the call: the callee's
//! generator or iterator stops.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::task::noop_waker_ref;
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use tokio::runtime::Handle;
use tokio::sync::{watch, Mutex};

use crate::pending::{self, Answer, Pending, Reply};

/// One read of a stream: an item, an error, or None at the end.
type Item = Option<daffi::Result<rmpv::Value>>;

/// The items of a call of a stream callback (a generator, an async generator, or a
/// Rust stream callback), in order. `for item in stream` waits for each; `async for`
/// awaits each. An error of the callee (its exception), a callee gone
/// (`RemoteStoppedUnexpectedly`) or the call's timeout passed while waiting for one
/// item (`TimeoutError`) raises, and ends the stream. `close()` (or a `with` block, or
/// dropping the last reference) cancels the call: the callee stops making items.
#[pyclass(module = "daffi", name = "CallStream", frozen)]
pub struct CallStream {
    source: Arc<Source>,
    runtime: Handle,
    process: String,
}

/// What the items are read from, shared with the task reading the next one.
struct Source {
    reader: Mutex<Reader>,
    /// True once closed: a read in flight ends at once.
    closed: watch::Sender<bool>,
}

struct Reader {
    /// None once closed (dropped: the callee is told to stop).
    stream: Option<daffi::CallStream<rmpv::Value>>,
    /// The item read when the call was opened, not given to Python yet.
    first: Option<Item>,
}

impl CallStream {
    /// A stream whose first item (`first`) was read already: that is how a call tells
    /// a stream callback from a plain one. Made on the node's runtime.
    pub fn new(stream: daffi::CallStream<rmpv::Value>, first: Item) -> Self {
        let process = stream.process().to_string();
        CallStream {
            source: Arc::new(Source {
                reader: Mutex::new(Reader {
                    stream: Some(stream),
                    first: Some(first),
                }),
                closed: watch::Sender::new(false),
            }),
            runtime: Handle::current(),
            process,
        }
    }

    /// The next item: taken on this thread if it is in already (the callee runs ahead
    /// of the reader, so mostly it is), else read on the runtime.
    fn next_item(&self) -> Pending {
        if let Some(answer) = self.source.try_next(&self.runtime) {
            return Pending::ready(answer);
        }
        let source = self.source.clone();
        pending::spawn(&self.runtime, async move { source.next().await })
    }
}

impl Source {
    async fn next(&self) -> Answer {
        let mut closed = self.closed.subscribe();
        let mut reader = self.reader.lock().await;
        let item = tokio::select! {
            item = std::future::poll_fn(|cx| reader.poll_next(cx)) => item,
            _ = closed.wait_for(|closed| *closed) => None,
        };
        answer(item)
    }

    /// The next item if it is in already and no other read is in flight.
    fn try_next(&self, runtime: &Handle) -> Option<Answer> {
        if *self.closed.borrow() {
            return Some(Ok(Reply::End));
        }
        let mut reader = self.reader.try_lock().ok()?;
        // Reading may grant credit, which sends from the runtime.
        let _runtime = runtime.enter();
        match reader.poll_next(&mut Context::from_waker(noop_waker_ref())) {
            Poll::Ready(item) => Some(answer(item)),
            Poll::Pending => None,
        }
    }

    /// Ends the stream now; the callee is told once no read is in flight.
    fn close(self: &Arc<Self>, runtime: &Handle) {
        self.closed.send_replace(true);
        let source = self.clone();
        runtime.spawn(async move { source.reader.lock().await.stream = None });
    }
}

fn answer(item: Item) -> Answer {
    match item {
        Some(Ok(value)) => Ok(Reply::Value(value)),
        Some(Err(e)) => Err(e),
        None => Ok(Reply::End),
    }
}

impl Reader {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Item> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(first);
        }
        match self.stream.as_mut() {
            Some(stream) => Pin::new(stream).poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

#[pymethods]
impl CallStream {
    /// The node making the items.
    #[getter]
    fn process(&self) -> &str {
        &self.process
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next item, waited for with the GIL released; StopIteration at the end.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.next_item().get(py) {
            Ok(item) => Ok(Some(item)),
            Err(e) if e.is_instance_of::<PyStopAsyncIteration>(py) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// An asyncio future of the next item; StopAsyncIteration at the end.
    fn __anext__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.next_item().asyncio_future(py)
    }

    /// Cancels the call: the callee stops making items; the stream ends here.
    fn close(&self) {
        self.source.close(&self.runtime);
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) {
        self.close();
    }

    fn __repr__(&self) -> String {
        format!("<daffi.CallStream from {:?}>", self.process)
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        self.source.close(&self.runtime);
    }
}
