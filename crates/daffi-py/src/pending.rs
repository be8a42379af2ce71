//! [`Pending`]: a call running on the runtime, whose result Python collects by waiting
//! in slices (the GIL released, Ctrl-C checked between slices), by a done callback, or
//! as an asyncio future that Rust resolves on its event loop.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use std::future::Future;

use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use tokio::runtime::Handle;

use crate::errors;
use crate::node::Schedule;
use crate::streams::CallStream;

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
    /// The items of a stream callback.
    Stream(CallStream),
    /// A Python exception to raise (an iterable fed to a callback raised).
    Raise(PyErr),
    /// A stream has no more items: `StopAsyncIteration` (which `__next__` turns into
    /// `StopIteration`).
    End,
}

#[derive(Default)]
struct State {
    answer: Option<Answer>,
    /// Stays true once the answer is in, taken or not.
    finished: bool,
    /// Told once the answer is in.
    on_done: Vec<Waiter>,
}

/// Who is told that a call is done.
enum Waiter {
    /// A Python callable, called with no arguments.
    Callback(Py<PyAny>),
    /// An asyncio future, given the result on its event loop.
    Future {
        /// The loop that runs the future's callbacks.
        event_loop: Py<PyAny>,
        /// Made by that loop's `create_future()`.
        future: Py<PyAny>,
    },
}

/// Runs `work` on `runtime`; its answer completes the returned [`Pending`]. If the
/// runtime drops the work unfinished (it shut down: the node was dropped), the answer
/// is [`daffi::Error::Stopped`], so nobody waits forever.
pub fn spawn(runtime: &Handle, work: impl Future<Output = Answer> + Send + 'static) -> Pending {
    let completion = Completion::default();
    let unfinished = Unfinished(Some(completion.clone()));
    runtime.spawn(async move { unfinished.finish(work.await) });
    Pending::new(completion)
}

/// Completes a call with [`daffi::Error::Stopped`] if dropped before [`finish`](Self::finish).
struct Unfinished(Option<Completion>);

impl Unfinished {
    fn finish(mut self, answer: Answer) {
        if let Some(completion) = self.0.take() {
            completion.complete(answer);
        }
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(completion) = self.0.take() {
            completion.complete(Err(daffi::Error::Stopped));
        }
    }
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

    /// Stores the answer, wakes the waiters, and hands the others to the notifier
    /// thread (a runtime thread must not wait for the GIL).
    pub fn complete(&self, answer: Answer) {
        let on_done = {
            let mut state = self.lock();
            state.answer = Some(answer);
            state.finished = true;
            std::mem::take(&mut state.on_done)
        };
        self.state.1.notify_all();
        if !on_done.is_empty() {
            notifier::run(on_done.into_iter().map(|w| (self.clone(), w)).collect());
        }
    }

    /// Tells `waiter` once the call is done; gives it back if the call is done already.
    fn add_waiter(&self, waiter: Waiter) -> Option<Waiter> {
        let mut state = self.lock();
        if state.finished {
            return Some(waiter);
        }
        state.on_done.push(waiter);
        None
    }

    /// The call's result as a Python value; raises the call's error. Only once.
    fn take_result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let answer = self.lock().answer.take();
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
            Some(Ok(Reply::Stream(stream))) => Ok(Py::new(py, stream)?.into_any()),
            Some(Ok(Reply::End)) => Err(PyStopAsyncIteration::new_err(())),
            Some(Ok(Reply::Raise(error))) => Err(error),
        }
    }
}

/// Gives `future` the result of `completion` (its value or its exception), unless the
/// future was cancelled meanwhile. Runs on the future's event loop.
fn resolve(py: Python<'_>, future: &Bound<'_, PyAny>, completion: &Completion) -> PyResult<()> {
    if future.call_method0(intern!(py, "done"))?.is_truthy()? {
        return Ok(());
    }
    match completion.take_result(py) {
        Ok(value) => future.call_method1(intern!(py, "set_result"), (value,))?,
        Err(e) => future.call_method1(intern!(py, "set_exception"), (e.into_value(py),))?,
    };
    Ok(())
}

/// The futures of one event loop whose calls finished together: the loop runs it once
/// (one wake-up of the loop for all, not one per call).
#[pyclass(module = "daffi._daffi")]
struct Resolver {
    futures: Vec<(Py<PyAny>, Completion)>,
}

#[pymethods]
impl Resolver {
    /// Resolves the futures (on their event loop).
    fn __call__(&mut self, py: Python<'_>) {
        for (future, completion) in std::mem::take(&mut self.futures) {
            if let Err(e) = resolve(py, future.bind(py), &completion) {
                e.write_unraisable(py, None);
            }
        }
    }
}

/// One thread that runs done callbacks: it takes the GIL once for all those waiting,
/// instead of once per call (256 calls in flight finish in bursts).
mod notifier {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::{Mutex, OnceLock};

    use pyo3::intern;
    use pyo3::prelude::*;

    use super::{Completion, Resolver, Waiter};

    /// The waiters of calls that finished together.
    type Batch = Vec<(Completion, Waiter)>;

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

    /// Calls the callbacks, and hands each event loop its futures in one `Resolver`.
    fn call_all(py: Python<'_>, waiters: impl IntoIterator<Item = (Completion, Waiter)>) {
        let mut by_loop: Vec<(Py<PyAny>, Resolver)> = Vec::new();
        for (completion, waiter) in waiters {
            match waiter {
                Waiter::Callback(callback) => {
                    if let Err(e) = callback.call0(py) {
                        e.write_unraisable(py, None);
                    }
                }
                Waiter::Future { event_loop, future } => {
                    match by_loop.iter_mut().find(|(l, _)| l.is(&event_loop)) {
                        Some((_, resolver)) => resolver.futures.push((future, completion)),
                        None => by_loop.push((
                            event_loop,
                            Resolver {
                                futures: vec![(future, completion)],
                            },
                        )),
                    }
                }
            }
        }
        for (event_loop, resolver) in by_loop {
            hand_to_loop(py, event_loop.bind(py), resolver);
        }
    }

    /// Runs `resolver` on `event_loop` (nobody waits any more if the loop is closed).
    fn hand_to_loop(py: Python<'_>, event_loop: &Bound<'_, PyAny>, resolver: Resolver) {
        let handed = Py::new(py, resolver).and_then(|resolver| {
            event_loop.call_method1(intern!(py, "call_soon_threadsafe"), (resolver,))
        });
        if let Err(e) = handed {
            tracing::debug!(error = %e, "an event loop closed before its calls finished");
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

    /// A call done already, with `answer`.
    pub fn ready(answer: Answer) -> Self {
        let completion = Completion::default();
        completion.complete(answer);
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
        if let Some(Waiter::Callback(callback)) =
            self.completion.add_waiter(Waiter::Callback(callback))
        {
            callback.call0(py)?;
        }
        Ok(())
    }

    /// An asyncio future of the running event loop that gets the result (or the call's
    /// error): the way async code awaits a call without a Python callback per call.
    /// Takes the result, as `result()` does.
    pub fn asyncio_future(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let event_loop = get_running_loop(py)?;
        let future = event_loop.call_method0(intern!(py, "create_future"))?;
        let waiter = Waiter::Future {
            event_loop: event_loop.unbind(),
            future: future.clone().unbind(),
        };
        if self.completion.add_waiter(waiter).is_some() {
            resolve(py, &future, &self.completion)?;
        }
        Ok(future.unbind())
    }

    /// The result; raises the call's error. Only once the call is done, and only once.
    fn result(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.completion.take_result(py)
    }

    /// Waits for the call with the GIL released, in slices between which signal
    /// handlers run (Ctrl-C), and gives the result as `result()` does.
    pub fn get(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        while !self.wait(py, SLICE.as_secs_f64()) {
            py.check_signals()?;
        }
        self.completion.take_result(py)
    }
}

/// How long `get` waits before Python handles pending signals.
const SLICE: Duration = Duration::from_millis(100);

/// `asyncio.get_running_loop()` (looked up once).
fn get_running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    GET_RUNNING_LOOP
        .import(py, "asyncio", "get_running_loop")?
        .call0()
}
