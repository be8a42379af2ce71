//! Python generators served as stream callbacks. A generator function runs on the
//! threads of [`workers`], the GIL held only while it makes one item; an async
//! generator on the event loop of async callbacks. Either is asked for one item at a
//! time, when the caller's credit lets the node send one, so it runs no further ahead
//! than the Rust core lets any stream callback run. When the caller drops its stream
//! (or goes), the generator is closed: its `finally` blocks run.

use std::sync::Arc;

use bytes::Bytes;
use daffi::__private::{CallbackFailure, Handler, ItemStream};
use pyo3::prelude::*;
use pyo3::types::PyIterator;
use tokio::sync::oneshot;

use crate::callee::{decode, describe, dropped, Done, Step};
use crate::workers;

/// What makes the items.
#[derive(Clone, Copy)]
enum Kind {
    /// `function(*args, **kwargs)` is a generator, advanced with `next`.
    Generator,
    /// `function(args, kwargs)` returns the Python layer's run of an async generator:
    /// `advance(done)` asks it for one item on the event loop, `close()` closes it.
    AsyncGenerator,
}

/// A handler that streams the items of the generator `function(*args, **kwargs)`.
pub fn generator_handler(function: Py<PyAny>) -> Handler {
    stream_handler(Kind::Generator, function)
}

/// A handler that streams the items of an async generator: `start(args, kwargs)` gives
/// its run (see [`Kind::AsyncGenerator`]).
pub fn async_generator_handler(start: Py<PyAny>) -> Handler {
    stream_handler(Kind::AsyncGenerator, start)
}

fn stream_handler(kind: Kind, function: Py<PyAny>) -> Handler {
    let function = Arc::new(function);
    Handler::AsyncStream(Arc::new(move |payload: Bytes| {
        Ok(items(State::Start {
            kind,
            function: function.clone(),
            payload,
        }))
    }))
}

/// Where a stream callback is.
enum State {
    /// Not called yet.
    Start {
        kind: Kind,
        function: Arc<Py<PyAny>>,
        payload: Bytes,
    },
    /// Making items.
    Running(Running),
    /// Failed: nothing more to send.
    Ended,
}

/// The items, made one per poll; dropping the stream closes the generator.
fn items(state: State) -> ItemStream {
    Box::pin(futures_util::stream::unfold(state, |state| async move {
        let running = match state {
            State::Ended => return None,
            State::Running(running) => running,
            State::Start {
                kind,
                function,
                payload,
            } => match start(kind, function, payload).await {
                Ok(running) => running,
                Err(failure) => return Some((Err(failure), State::Ended)),
            },
        };
        match running.next().await {
            Step::Item(item) => Some((Ok(item), State::Running(running))),
            Step::End => {
                running.finished();
                None
            }
            Step::Failed(failure) => {
                running.finished();
                Some((Err(failure), State::Ended))
            }
        }
    }))
}

/// Calls the callback on a worker thread: its generator (or run), not advanced yet.
async fn start(
    kind: Kind,
    function: Arc<Py<PyAny>>,
    payload: Bytes,
) -> Result<Running, CallbackFailure> {
    let producer = workers::run(move |py, tx| {
        let _ = tx.send(make_producer(py, kind, function.bind(py), &payload));
    })
    .await
    .unwrap_or_else(|| Err(dropped()))?;
    Ok(Running {
        kind,
        producer: Arc::new(producer),
        open: true,
    })
}

fn make_producer(
    py: Python<'_>,
    kind: Kind,
    function: &Bound<'_, PyAny>,
    payload: &Bytes,
) -> Result<Py<PyAny>, CallbackFailure> {
    let (args, kwargs) = decode(py, payload)?;
    let made = match kind {
        Kind::Generator => function
            .call(args, Some(&kwargs))
            .and_then(|generator| Ok(generator.try_iter()?.into_any())),
        Kind::AsyncGenerator => function.call1((args, kwargs)),
    };
    made.map(Bound::unbind)
        .map_err(|e| CallbackFailure::failed(describe(py, &e)))
}

/// A started generator (or async generator run), closed when dropped unless it ended.
struct Running {
    kind: Kind,
    producer: Arc<Py<PyAny>>,
    /// Whether it may still make items (then dropping it closes it).
    open: bool,
}

impl Running {
    /// Asks for the next item, on a worker thread.
    async fn next(&self) -> Step {
        let (kind, producer) = (self.kind, self.producer.clone());
        workers::run(move |py, tx| advance(py, kind, producer.bind(py), tx))
            .await
            .unwrap_or_else(|| Step::Failed(dropped()))
    }

    /// It ended by itself: nothing to close.
    fn finished(mut self) {
        self.open = false;
    }
}

impl Drop for Running {
    /// Closes the generator on a worker thread (the caller dropped the stream).
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let (kind, producer) = (self.kind, self.producer.clone());
        // Queued now; nothing waits for it.
        drop(workers::run::<()>(move |py, _| {
            close(py, kind, producer.bind(py))
        }));
    }
}

/// Makes one item: at once for a generator; for an async generator, the event loop
/// answers `tx` later.
fn advance(py: Python<'_>, kind: Kind, producer: &Bound<'_, PyAny>, tx: oneshot::Sender<Step>) {
    match kind {
        Kind::Generator => {
            let step = match producer.cast::<PyIterator>() {
                Ok(generator) => match generator.clone().next() {
                    Some(item) => Step::of(py, item),
                    None => Step::End,
                },
                Err(e) => Step::Failed(CallbackFailure::failed(e)),
            };
            let _ = tx.send(step);
        }
        Kind::AsyncGenerator => {
            // Unanswered (no `done`), the stream ends with "ended without an answer".
            let Ok(done) = Py::new(py, Done::new(tx)) else {
                return;
            };
            if let Err(e) = producer.call_method1("advance", (done.clone_ref(py),)) {
                done.get()
                    .send(Step::Failed(CallbackFailure::failed(describe(py, &e))));
            }
        }
    }
}

/// Closes a generator the caller no longer reads (its `finally` blocks run).
fn close(py: Python<'_>, kind: Kind, producer: &Bound<'_, PyAny>) {
    let closed = match kind {
        Kind::Generator if producer.hasattr("close").unwrap_or(false) => {
            producer.call_method0("close")
        }
        Kind::Generator => return,
        Kind::AsyncGenerator => producer.call_method0("close"),
    };
    if let Err(e) = closed {
        tracing::debug!(error = %describe(py, &e), "a Python generator did not close cleanly");
    }
}
