//! [`Pending`]: a call running on the runtime, whose result Python collects by waiting
//! in slices (the GIL released, Ctrl-C checked between slices) or by a done callback
//! (for asyncio).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::prelude::*;

use crate::errors;
use crate::node::Schedule;

/// What a finished call gives Python: a value built under the GIL, or an error.
pub type Answer = Result<Reply, daffi::Error>;

/// A result, converted to a Python value only when Python asks for it.
pub enum Reply {
    /// MessagePack from the callee.
    Value(rmpv::Value),
    /// Several results by node name (BROADCAST).
    ByNode(Vec<(String, rmpv::Value)>),
    /// A PERIOD schedule.
    Schedule(daffi::ScheduledTask),
}

#[derive(Default)]
struct State {
    answer: Option<Answer>,
    /// Stays true once the answer is in, taken or not.
    finished: bool,
    /// Called (with no arguments) once the answer is in.
    on_done: Vec<Py<PyAny>>,
}

/// The shared end a runtime task completes.
#[derive(Clone, Default)]
pub struct Completion {
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Completion {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores the answer, wakes the waiters, and hands the done callbacks to the
    /// notifier thread (a runtime thread must not wait for the GIL).
    pub fn complete(&self, answer: Answer) {
        let on_done = {
            let mut state = self.lock();
            state.answer = Some(answer);
            state.finished = true;
            std::mem::take(&mut state.on_done)
        };
        self.state.1.notify_all();
        if !on_done.is_empty() {
            notifier::run(on_done);
        }
    }
}

/// One thread that runs done callbacks: it takes the GIL once for all those waiting,
/// instead of once per call (256 calls in flight finish in bursts).
mod notifier {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::{Mutex, OnceLock};

    use pyo3::prelude::*;

    /// Done callbacks of calls that finished together.
    type Batch = Vec<Py<PyAny>>;

    static QUEUE: OnceLock<Option<Mutex<Sender<Batch>>>> = OnceLock::new();

    /// Runs `callbacks` on the notifier thread, started on first use (or here, if no
    /// thread could be started).
    pub fn run(callbacks: Batch) {
        let queue = QUEUE.get_or_init(start);
        let unsent = match queue {
            Some(tx) => tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(callbacks)
                .err()
                .map(|e| e.0),
            None => Some(callbacks),
        };
        if let Some(callbacks) = unsent {
            Python::attach(|py| call_all(py, callbacks));
        }
    }

    fn start() -> Option<Mutex<Sender<Batch>>> {
        let (tx, rx) = channel();
        let spawned = std::thread::Builder::new()
            .name("daffi-py-notifier".into())
            .spawn(move || notify(rx));
        match spawned {
            Ok(_) => Some(Mutex::new(tx)),
            Err(e) => {
                tracing::error!(error = %e, "no thread for done callbacks: running them in place");
                None
            }
        }
    }

    fn call_all(py: Python<'_>, callbacks: impl IntoIterator<Item = Py<PyAny>>) {
        for callback in callbacks {
            if let Err(e) = callback.call0(py) {
                e.write_unraisable(py, None);
            }
        }
    }

    fn notify(rx: Receiver<Batch>) {
        while let Ok(first) = rx.recv() {
            Python::attach(|py| {
                call_all(py, std::iter::once(first).chain(rx.try_iter()).flatten())
            });
        }
    }
}

/// A call in flight.
#[pyclass(module = "daffi._daffi", frozen)]
pub struct Pending {
    completion: Completion,
}

impl Pending {
    /// A pending call completed through `completion`.
    pub fn new(completion: Completion) -> Self {
        Pending { completion }
    }
}

#[pymethods]
impl Pending {
    /// Waits at most `seconds` with the GIL released; whether the call is done.
    fn wait(&self, py: Python<'_>, seconds: f64) -> bool {
        let slice = Duration::from_secs_f64(seconds.clamp(0.0, 3600.0));
        py.detach(|| {
            let (lock, ready) = &*self.completion.state;
            let state = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (state, _) = ready
                .wait_timeout_while(state, slice, |s| !s.finished)
                .unwrap_or_else(|e| e.into_inner());
            state.finished
        })
    }

    /// Whether the call is done.
    fn done(&self) -> bool {
        self.completion.lock().finished
    }

    /// Calls `callback()` once the call is done (at once if it is), from another thread.
    fn add_done_callback(&self, py: Python<'_>, callback: Py<PyAny>) -> PyResult<()> {
        let mut state = self.completion.lock();
        if !state.finished {
            state.on_done.push(callback);
            return Ok(());
        }
        drop(state);
        callback.call0(py).map(drop)
    }

    /// The result; raises the call's error. Only once the call is done, and only once.
    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let answer = self.completion.lock().answer.take();
        match answer {
            None => Err(errors::exception(
                py,
                "DaffiError",
                "the result was taken already, or is not in yet",
            )?),
            Some(Err(e)) => Err(errors::to_py(&e)),
            Some(Ok(Reply::Value(v))) => crate::values::from_value(py, v),
            Some(Ok(Reply::ByNode(results))) => {
                let dict = pyo3::types::PyDict::new(py);
                for (node, v) in results {
                    dict.set_item(node, crate::values::from_value(py, v)?)?;
                }
                Ok(dict.into_any().unbind())
            }
            Some(Ok(Reply::Schedule(task))) => Ok(Py::new(py, Schedule { task })?.into_any()),
        }
    }
}
