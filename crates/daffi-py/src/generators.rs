//! Python generators served as stream callbacks. A generator runs on the node's sync
//! callback threads, the GIL held only while it makes one item; an async generator on
//! the event loop of async callbacks. Either is asked for one item at a time, when the
//! caller's credit lets the node send one, so it runs no further ahead than the Rust
//! core lets any stream callback run. When the caller drops its stream (or goes), the
//! generator is closed: its `finally` blocks run (an async generator waiting for its
//! next item is cancelled).

use std::sync::Arc;

use bytes::Bytes;
use daffi::__private::{CallbackFailure, Handler, ItemIter, ItemStream, Outcome};
use pyo3::prelude::*;
use pyo3::types::PyIterator;
use tokio::sync::oneshot;

use crate::callee::{decode, describe, dropped, Done, Step};
use crate::workers;

/// A handler that streams the items of the generator `function(*args, **kwargs)`,
/// advanced on the node's sync callback threads: one item costs no hand-over between
/// threads, and a generator that blocks holds that thread only, as a Rust iterator
/// does (it waits there for credit too, holding one of `max_sync_callbacks`).
pub fn generator_handler(function: Py<PyAny>) -> Handler {
    Handler::SyncStream(Arc::new(move |payload: Bytes| {
        Python::attach(|py| {
            let (args, kwargs) = decode(py, &payload, None)?;
            let generator = function
                .bind(py)
                .call(args, Some(&kwargs))
                .and_then(|made| made.try_iter())
                .map_err(|e| CallbackFailure::failed(describe(py, &e)))?;
            Ok(ItemIter::of_payloads(GeneratorItems(Some(
                generator.unbind(),
            ))))
        })
    }))
}

/// A generator's items; None once it ended by itself. Dropped before that (the caller
/// stopped reading), it closes the generator.
struct GeneratorItems(Option<Py<PyIterator>>);

impl Iterator for GeneratorItems {
    type Item = Outcome;

    fn next(&mut self) -> Option<Outcome> {
        let generator = self.0.as_ref()?;
        let item = Python::attach(|py| {
            generator
                .bind(py)
                .clone()
                .next()
                .map(|item| Step::of(py, item))
        });
        match item {
            Some(Step::Item(item)) => Some(Ok(item)),
            Some(Step::Failed(failure)) => {
                self.finished();
                Some(Err(failure))
            }
            Some(Step::End) | None => {
                self.finished();
                None
            }
        }
    }
}

impl GeneratorItems {
    /// It ended by itself: nothing to close; its reference dropped with the GIL held.
    fn finished(&mut self) {
        if let Some(generator) = self.0.take() {
            Python::attach(|_| drop(generator));
        }
    }
}

impl Drop for GeneratorItems {
    fn drop(&mut self) {
        if let Some(generator) = self.0.take() {
            Python::attach(|py| close(py, generator.bind(py)));
        }
    }
}

/// A handler that streams the items of an async generator: `start(args, kwargs)` gives
/// its run, the Python layer's: `advance(done)` asks it for one item on the event loop,
/// `close()` closes it.
pub fn async_generator_handler(start: Py<PyAny>) -> Handler {
    let start = Arc::new(start);
    Handler::AsyncStream(Arc::new(move |payload: Bytes| {
        Ok(items(State::Start {
            start: start.clone(),
            payload,
        }))
    }))
}

/// Where an async generator is.
enum State {
    /// Not called yet.
    Start {
        start: Arc<Py<PyAny>>,
        payload: Bytes,
    },
    /// Making items.
    Running(Running),
    /// Failed: nothing more to send.
    Ended,
}

/// The items, made one per poll; dropping the stream closes the generator.
fn items(state: State) -> ItemStream {
    ItemStream::of_payloads(futures_util::stream::unfold(state, |state| async move {
        let running = match state {
            State::Ended => return None,
            State::Running(running) => running,
            State::Start { start, payload } => match Running::start(start, payload).await {
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

/// A started async generator run, closed when dropped unless it ended. Python is
/// reached through the threads of [`workers`], never from a runtime thread.
struct Running {
    run: Arc<Py<PyAny>>,
    /// Whether it may still make items (then dropping it closes it).
    open: bool,
}

impl Running {
    /// Calls `start(args, kwargs)` on a worker thread: the run, not advanced yet.
    async fn start(start: Arc<Py<PyAny>>, payload: Bytes) -> Result<Running, CallbackFailure> {
        let run = workers::run(move |py, tx| {
            let run = decode(py, &payload, None).and_then(|(args, kwargs)| {
                start
                    .bind(py)
                    .call1((args, kwargs))
                    .map(Bound::unbind)
                    .map_err(|e| CallbackFailure::failed(describe(py, &e)))
            });
            let _ = tx.send(run);
        })
        .await
        .unwrap_or_else(|| Err(dropped()))?;
        Ok(Running {
            run: Arc::new(run),
            open: true,
        })
    }

    /// Asks for the next item; the event loop answers.
    async fn next(&self) -> Step {
        let run = self.run.clone();
        workers::run(move |py, tx| advance(py, run.bind(py), tx))
            .await
            .unwrap_or_else(|| Step::Failed(dropped()))
    }

    /// It ended by itself: nothing to close.
    fn finished(mut self) {
        self.open = false;
    }
}

impl Drop for Running {
    /// Closes the generator from a worker thread (the caller dropped the stream).
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let run = self.run.clone();
        workers::spawn(move |py| close(py, run.bind(py)));
    }
}

/// Asks the run for one item: the event loop answers `tx` through `done`.
fn advance(py: Python<'_>, run: &Bound<'_, PyAny>, tx: oneshot::Sender<Step>) {
    // Unanswered (no `done`), the stream ends with "ended without an answer".
    let Ok(done) = Py::new(py, Done::new(tx)) else {
        return;
    };
    if let Err(e) = run.call_method1("advance", (done.clone_ref(py),)) {
        done.get()
            .send(Step::Failed(CallbackFailure::failed(describe(py, &e))));
    }
}

/// Closes a generator (or run) the caller no longer reads: its `finally` blocks run.
fn close(py: Python<'_>, producer: &Bound<'_, PyAny>) {
    if let Err(e) = producer.call_method0("close") {
        tracing::debug!(error = %describe(py, &e), "a Python generator did not close cleanly");
    }
}
