//! The threads that run Python sync callbacks. A thread that takes the GIL runs every
//! job waiting before it lets go, so a burst of quick callbacks costs one GIL hand-over,
//! not one per call, and a few threads, not one per call in flight (hundreds of threads
//! queueing for the GIL cost more than the callbacks). A job still queued a moment after
//! it came, with no thread free, starts another thread: callbacks that block (sleep,
//! wait for I/O) do not hold up the others.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A Python sync callback to run, with the GIL held.
type Job = Box<dyn FnOnce(Python<'_>) + Send>;

/// The most threads the pool starts (the node's own limit of sync callbacks).
const MAX_THREADS: usize = 1024;

/// How long a job may wait, with no thread free, before another thread starts.
const STUCK_AFTER: Duration = Duration::from_millis(2);

/// Runs `job` on a thread of the pool with the GIL held, with nobody waiting for it.
/// The pool is still unstuck if all its threads are busy (blocked in callbacks): by a
/// task of the current runtime, or at once outside one.
pub fn spawn(job: impl FnOnce(Python<'_>) + Send + 'static) {
    let ran = run::<()>(move |py, _| job(py));
    match Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(ran)),
        Err(_) => Workers::get().unstick(),
    }
}

/// Runs `job` on a thread of the pool with the GIL held, and gives what it sends on
/// the sender it is handed (which it may also pass on, to be answered later), or None
/// if the sender was dropped unanswered. The job is queued at once, not when the
/// future is first polled.
pub fn run<T: Send + 'static>(
    job: impl FnOnce(Python<'_>, oneshot::Sender<T>) + Send + 'static,
) -> impl Future<Output = Option<T>> + Send + 'static {
    let (tx, mut rx) = oneshot::channel();
    let workers = Workers::get();
    let busy = workers.push(Box::new(move |py| job(py, tx)));
    async move {
        if busy {
            match tokio::time::timeout(STUCK_AFTER, &mut rx).await {
                Ok(answer) => return answer.ok(),
                Err(_) => workers.unstick(),
            }
        }
        rx.await.ok()
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    threads: usize,
}

impl Queue {
    /// Whether some queued job has no idle thread to take it. An idle thread counts as
    /// idle until it wakes up, so two jobs queued at once with one thread idle leave one
    /// unclaimed: if the first blocks, the second must not wait for it.
    fn unclaimed(&self) -> bool {
        self.jobs.len() > self.idle
    }
}

/// The pool: one per process.
#[derive(Default)]
struct Workers {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Workers {
    /// The process's pool.
    fn get() -> &'static Arc<Workers> {
        static WORKERS: OnceLock<Arc<Workers>> = OnceLock::new();
        WORKERS.get_or_init(Arc::default)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`; whether no thread was free to take it.
    fn push(self: &Arc<Self>, job: Job) -> bool {
        let mut queue = self.lock();
        queue.jobs.push_back(job);
        if queue.threads == 0 {
            self.start_thread(&mut queue);
        }
        let busy = queue.unclaimed();
        drop(queue);
        self.ready.notify_one();
        busy
    }

    /// Starts another thread if jobs are still waiting and no thread is free.
    fn unstick(self: &Arc<Self>) {
        let mut queue = self.lock();
        if queue.unclaimed() {
            self.start_thread(&mut queue);
        }
    }

    fn start_thread(self: &Arc<Self>, queue: &mut Queue) {
        if queue.threads >= MAX_THREADS {
            return;
        }
        let workers = self.clone();
        let started = std::thread::Builder::new()
            .name("daffi-py-callback".into())
            .spawn(move || workers.run());
        match started {
            Ok(_) => queue.threads += 1,
            Err(e) => {
                tracing::warn!(error = %e, "no thread for Python callbacks; the queued ones wait")
            }
        }
    }

    /// A thread's life: wait for a job, then run every job waiting with the GIL held.
    fn run(&self) {
        loop {
            let first = self.next();
            Python::attach(|py| {
                first(py);
                while let Some(job) = self.pop() {
                    job(py);
                }
            });
        }
    }

    /// The next job waiting, if any (the queue is unlocked before the job runs).
    fn pop(&self) -> Option<Job> {
        self.lock().jobs.pop_front()
    }

    fn next(&self) -> Job {
        let mut queue = self.lock();
        loop {
            if let Some(job) = queue.jobs.pop_front() {
                return job;
            }
            queue.idle += 1;
            queue = self.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
            queue.idle -= 1;
        }
    }
}
