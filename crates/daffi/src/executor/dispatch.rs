//! Running one request: checked (known callback, room, caller still waiting), then run,
//! async callbacks as tasks and sync ones through the node's
//! [`SyncRunner`]; the outcome goes back through the
//! request. A panic becomes an error reply; the node keeps serving. The calls of a
//! batch frame to a quick sync callback are checked and run as one job
//! ([`serve_batch`]), each call still admitted, run and answered on its own.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::items::{send_items, send_thread_items, thread_items, ThreadFeed};
use super::pace::{Pace, QUICK_RUN};
use super::sync_runner::SyncRunner;
use super::thread_clock;
use super::{CallBatch, CallbackKind, Executor, Request, Served, ServingGuard};
use crate::callback::{CallbackFailure, Handler, ItemIter, Outcome};
use crate::codec::handing_over;
use crate::incoming::{offering, Offer};
use crate::protocol::message::RemoteErrorKind;
use batch_run::BatchRun;
pub(super) use batch_run::BatchShare;

mod batch_run;

/// NO_RETURN requests have their own allowance of callbacks waiting or running: this
/// many times `max_concurrent_callbacks` (async) or `max_sync_callbacks` (sync). Their
/// callers cannot be told "overloaded", so a burst of them is queued rather than
/// dropped, and it does not crowd out calls that want a reply. Beyond it they are
/// dropped, and logged.
pub const NO_RETURN_BACKLOG_FACTOR: usize = 64;

/// Sync callbacks a reader took from one read, handed to the runner together: a burst of
/// requests costs the runner's threads one wake-up, not one each, and a burst of quick
/// callbacks none (they run on the reader's worker).
#[derive(Default)]
pub struct SyncBatch {
    jobs: Vec<SyncJob>,
    /// A job among them is not a callback seen to finish quickly.
    not_all_quick: bool,
}

impl SyncBatch {
    /// Hands the jobs to the runner. Call it before the reader waits for more bytes.
    /// Behind a backlog of quick calls (a NO_RETURN flood outrunning its callbacks),
    /// the reader runs some of them itself first: it reads on only once the backlog is
    /// smaller, and what is not read yet waits upstream, within the sender's queue
    /// limits, instead of past this node's NO_RETURN allowance (dropped).
    pub fn submit(&mut self, executor: &Arc<Executor>) {
        if self.jobs.is_empty() {
            return;
        }
        let quick = !std::mem::take(&mut self.not_all_quick);
        if !(quick && SyncRunner::run_on_worker(executor, &mut self.jobs)) {
            SyncRunner::submit(executor, &mut self.jobs);
        }
        SyncRunner::help_with_backlog(executor);
    }
}

/// Starts serving a request. Never blocks the caller (the mesh's reader). A sync
/// callback joins `batch`, which the reader submits before it waits for more.
pub fn serve(executor: &Arc<Executor>, mut request: Box<dyn Request>, batch: &mut SyncBatch) {
    let wants_reply = request.wants_reply();
    // Opened first: items may follow the request at once. Refused, it is cancelled.
    let offer = request
        .open_incoming()
        .and_then(|open| Offer::new(request.callback(), open));
    let Some(Served { handler, pace }) = executor.handler(request.callback()) else {
        let message = format!(
            "process `{}` does not serve `{}`",
            executor.name,
            request.callback()
        );
        refuse(request, RemoteErrorKind::NotFound, message);
        return;
    };
    if let Some(mismatch) = stream_mismatch(&handler, &*request) {
        refuse(request, RemoteErrorKind::NotAStream, mismatch.to_string());
        return;
    }
    let kind = CallbackKind {
        sync: handler.is_sync(),
        one_way: !wants_reply,
    };
    let Some(running) = admit(executor, kind, 1) else {
        refuse_over_limit(executor, kind, request);
        return;
    };
    let work = match handler {
        Handler::Sync(f) => SyncWork::Call(f),
        Handler::SyncStream(f) => match request.open_stream() {
            Some(sink) => {
                let (feed, items) = thread_items();
                tokio::spawn(send_thread_items(items, sink));
                SyncWork::Stream(f, feed)
            }
            None => return refuse_stream(request),
        },
        Handler::AsyncStream(f) => {
            let Some(sink) = request.open_stream() else {
                return refuse_stream(request);
            };
            tokio::spawn(async move {
                let _running = running;
                if !too_late(&*request) {
                    let (payload, kept) = request.take_payload();
                    let start = || handing_over(payload, kept, |payload| f(payload));
                    send_items(guarded(|| offering(offer, start)), sink).await;
                }
            });
            return;
        }
        Handler::Async(f) => {
            let (payload, kept) = request.take_payload();
            tokio::spawn(async move {
                let _running = running;
                if too_late(&*request) {
                    return;
                }
                let start = || handing_over(payload, kept, |payload| f(payload));
                let outcome = CatchUnwind(offering(offer, start)).await;
                if let Some(wait_for_room) = finish(request, outcome) {
                    wait_for_room.await;
                }
            });
            return;
        }
    };
    let job = SyncJob {
        work,
        calls: Calls::One(request),
        offer,
        pace,
        _running: running,
    };
    batch.not_all_quick |= !job.is_quick_call();
    batch.jobs.push(job);
}

/// Starts serving the calls of a batch frame, as [`serve`] does each request: a sync
/// callback seen to finish quickly takes them as one job (one lookup, one admission
/// pass, one hand-off; its replies leave together), each call admitted against the
/// limits in order (those past them are refused, or for NO_RETURN dropped, one by
/// one, as lone requests would be); any other callback (or none) takes them one by
/// one, as lone requests.
pub fn serve_batch(executor: &Arc<Executor>, mut calls: Box<dyn CallBatch>, batch: &mut SyncBatch) {
    let quick =
        executor
            .handler(calls.callback())
            .and_then(|Served { handler, pace }| match handler {
                Handler::Sync(f) if pace.is_quick() => Some((f, pace)),
                _ => None,
            });
    let Some((f, pace)) = quick else {
        for request in calls.split_off(0) {
            serve(executor, request, batch);
        }
        return;
    };
    let kind = CallbackKind {
        sync: true,
        one_way: !calls.wants_reply(),
    };
    let count = u32::try_from(calls.remaining()).unwrap_or(u32::MAX);
    let running = admit(executor, kind, count);
    let admitted = running.as_ref().map_or(0, |r| r.calls as usize);
    for request in calls.split_off(admitted) {
        refuse_over_limit(executor, kind, request);
    }
    let Some(mut running) = running else {
        return;
    };
    // Jobs of a bounded number of calls: a run on a worker takes its turns between
    // jobs, and a large batch's replies leave in parts.
    let most = if kind.one_way {
        ONE_WAY_BATCH_JOB_CALLS
    } else {
        BATCH_JOB_CALLS
    };
    let mut calls = calls;
    loop {
        let rest = calls.split_batch(most);
        let count = u32::try_from(calls.remaining()).unwrap_or(u32::MAX);
        // The last job takes what the guard still counts.
        let share = rest
            .as_ref()
            .and_then(|_| running.take(count))
            .unwrap_or_else(|| std::mem::replace(&mut running, ServingGuard::none(executor)));
        let job = SyncJob {
            work: SyncWork::Call(f.clone()),
            calls: Calls::Batch(calls),
            offer: None,
            pace: pace.clone(),
            _running: share,
        };
        batch.not_all_quick |= !job.is_quick_call();
        batch.jobs.push(job);
        match rest {
            Some(rest) => calls = rest,
            None => break,
        }
    }
}

/// Calls that want replies of a batch one sync job takes at most: as many as a caller
/// keeps in flight in the usual flood, whose replies then leave in one frame (unless
/// `batch_run::REPLIES_WAIT_AT_MOST` passes first). Fewer made more frames, and woke the
/// controller and the caller more often.
const BATCH_JOB_CALLS: usize = 256;

/// NO_RETURN calls of a batch one sync job takes at most: as many as the NO_RETURN jobs
/// a run on a worker takes in one task.
const ONE_WAY_BATCH_JOB_CALLS: usize = 64;

/// Answers a request that found its kind of callbacks at their limit: `Overloaded`, or
/// for NO_RETURN dropped (and counted in the log).
fn refuse_over_limit(executor: &Executor, kind: CallbackKind, request: Box<dyn Request>) {
    let limit = executor.limits.callback_limit(kind);
    if request.wants_reply() {
        let (what, option) = if kind.sync {
            ("sync", "max_sync_callbacks")
        } else {
            ("async", "max_concurrent_callbacks")
        };
        let message = format!(
            "process `{}` runs as many {what} callbacks as it allows ({option} = {limit})",
            executor.name
        );
        refuse(request, RemoteErrorKind::Overloaded, message);
    } else {
        executor
            .sync_runner
            .note_dropped(&executor.name, request.callback(), limit);
    }
}

/// Why `request` does not fit `handler`: a stream asked of a plain callback, or one
/// value of a stream callback.
fn stream_mismatch(handler: &Handler, request: &dyn Request) -> Option<&'static str> {
    match (request.wants_stream(), handler.is_stream()) {
        (true, false) => {
            Some("as a plain callback, with one result: call it with fg, bg or no_return")
        }
        (false, true) => Some("as a stream: call it with `stream()`"),
        _ => None,
    }
}

/// Runs `start` (a callback making its items), turning a panic into a failure.
fn guarded<R>(start: impl FnOnce() -> Result<R, CallbackFailure>) -> Result<R, CallbackFailure> {
    catch_unwind(AssertUnwindSafe(start)).unwrap_or_else(|p| Err(panic_failure(p)))
}

/// Answers a stream request whose mesh carries no streams.
fn refuse_stream(request: Box<dyn Request>) {
    let message = "this node's mesh does not carry streams".to_string();
    refuse(request, RemoteErrorKind::Failed, message);
}

/// Counts up to `calls` callbacks of `kind` as running (the first of them, in order),
/// as many as their limit allows. Queued sync calls whose callers already gave up hold
/// places for nothing: when sync callbacks are at their limit, those are dropped first,
/// and the places looked for again.
fn admit(executor: &Arc<Executor>, kind: CallbackKind, calls: u32) -> Option<ServingGuard> {
    let first = executor.admit_callbacks(kind, calls);
    let admitted = first.as_ref().map_or(0, |g| g.calls);
    if admitted == calls || !kind.sync || executor.sync_runner.drop_expired() == 0 {
        return first;
    }
    let Some(more) = executor.admit_callbacks(kind, calls - admitted) else {
        return first;
    };
    Some(match first {
        Some(mut first) => {
            let mut more = more;
            first.calls += std::mem::take(&mut more.calls);
            first
        }
        None => more,
    })
}

/// Whether the caller has given up on `request` already (it then gets `Timeout` itself).
fn too_late(request: &dyn Request) -> bool {
    let late = request.deadline().is_some_and(|d| Instant::now() >= d);
    if late {
        note_skipped(request.callback(), request.caller(), 1);
    }
    late
}

fn note_skipped(callback: &str, caller: &str, calls: usize) {
    tracing::debug!(
        callback,
        caller,
        calls,
        "skipped calls whose caller already timed out"
    );
}

/// Answers a request that will not run, if its caller wants an answer; a NO_RETURN
/// one is logged instead (the first, then one in a thousand).
fn refuse(request: Box<dyn Request>, kind: RemoteErrorKind, message: String) {
    if request.wants_reply() {
        if let Some(wait_for_room) = request.reply(Err(CallbackFailure { kind, message })) {
            tokio::spawn(wait_for_room);
        }
    } else {
        // Its caller hears nothing: the log is the only trace (a misspelled name, say).
        note_no_return_failure(request.callback(), request.caller(), &message);
    }
}

/// A thread's usage, read at some point before the jobs it runs (one system call for
/// several jobs), for a second opinion on a callback slow by the wall clock: whether
/// its thread only waited for a processor meanwhile (see [`Pace::record`]).
#[derive(Default)]
pub(super) struct RunUsage {
    usage: Option<thread_clock::Usage>,
    jobs: u32,
}

impl RunUsage {
    /// Jobs run on one reading: a second opinion counts the processor time of the jobs
    /// before it since the reading, so it must not be many.
    const JOBS_PER_READING: u32 = 16;

    /// Before a job: reads the thread's usage, again every `JOBS_PER_READING` jobs.
    pub(super) fn before_job(&mut self) {
        if self.jobs % Self::JOBS_PER_READING == 0 {
            self.usage = thread_clock::usage();
        }
        self.jobs = self.jobs.wrapping_add(1);
    }

    /// The thread waited (for a job): the next job reads its usage again.
    pub(super) fn forget(&mut self) {
        *self = RunUsage::default();
    }
}

/// What a sync job runs: a callback with one result, or a stream's iterator.
enum SyncWork {
    Call(Arc<dyn Fn(bytes::Bytes) -> Outcome + Send + Sync>),
    Stream(SyncStreamFn, ThreadFeed),
}

type SyncStreamFn = Arc<dyn Fn(bytes::Bytes) -> Result<ItemIter, CallbackFailure> + Send + Sync>;

/// The calls a sync job answers: one request, or the calls of a batch.
enum Calls {
    One(Box<dyn Request>),
    Batch(Box<dyn CallBatch>),
}

impl Calls {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Calls::One(request) => request.deadline(),
            Calls::Batch(calls) => calls.deadline(),
        }
    }

    fn wants_reply(&self) -> bool {
        match self {
            Calls::One(request) => request.wants_reply(),
            Calls::Batch(calls) => calls.wants_reply(),
        }
    }

    fn callback(&self) -> &str {
        match self {
            Calls::One(request) => request.callback(),
            Calls::Batch(calls) => calls.callback(),
        }
    }

    fn caller(&self) -> &str {
        match self {
            Calls::One(request) => request.caller(),
            Calls::Batch(calls) => calls.caller(),
        }
    }

    fn count(&self) -> usize {
        match self {
            Calls::One(_) => 1,
            Calls::Batch(calls) => calls.remaining(),
        }
    }
}

/// One sync callback to run: for one request, or for each call of a batch.
pub(super) struct SyncJob {
    work: SyncWork,
    calls: Calls,
    /// The caller's stream of arguments, for the callback's `Incoming`.
    offer: Option<Box<Offer>>,
    /// How the callback's recent runs went: this run is added to it.
    pace: Arc<Pace>,
    /// Counts the callbacks as running until their replies are queued.
    _running: ServingGuard,
}

impl SyncJob {
    /// Whether its caller has given up by `now`.
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.calls.deadline().is_some_and(|d| now >= d)
    }

    /// Answers that the node is overloaded (no thread could take the job).
    pub(super) fn overloaded(self, message: String) {
        match self.calls {
            Calls::One(request) => refuse(request, RemoteErrorKind::Overloaded, message),
            Calls::Batch(mut calls) => {
                for request in calls.split_off(0) {
                    refuse(request, RemoteErrorKind::Overloaded, message.clone());
                }
            }
        }
    }

    /// Whether it may run on a runtime worker: a plain call (not a stream's producer,
    /// which may wait for credit for ever) of a callback seen to finish quickly.
    pub(super) fn is_quick_call(&self) -> bool {
        matches!(self.work, SyncWork::Call(_)) && self.pace.is_quick()
    }

    /// Whether its caller waits for a reply (not NO_RETURN).
    pub(super) fn wants_reply(&self) -> bool {
        self.calls.wants_reply()
    }

    /// The calls it answers: one, or a batch's.
    pub(super) fn calls(&self) -> usize {
        self.calls.count()
    }

    /// Logs that the job is dropped because its caller gave up.
    pub(super) fn note_skipped(&self) {
        note_skipped(self.calls.callback(), self.calls.caller(), self.calls());
    }

    /// Runs the callback (for each call of a batch) and answers; returns when the
    /// callback last finished (a thread going on to its next job needs no other clock
    /// read for it). `started`: read just before. `on_worker`: this thread is a runtime
    /// worker (the reader's), which must not wait for room on the way back. `usage`:
    /// the thread's, if read before this job (see [`RunUsage`]). `progress`: told when
    /// each call of a batch after the first begins (the run on a worker marks its
    /// progress for the watch).
    pub(super) fn run(
        self,
        started: Instant,
        on_worker: bool,
        usage: &mut RunUsage,
        progress: Option<&dyn Fn(Instant)>,
    ) -> Instant {
        let SyncJob {
            work,
            calls,
            offer,
            pace,
            _running: running,
        } = self;
        let mut request = match calls {
            Calls::One(request) => request,
            Calls::Batch(calls) => {
                let SyncWork::Call(f) = work else {
                    // Batches are made only for plain calls (`serve_batch`).
                    return started;
                };
                return BatchRun::new(f, pace, calls, running, on_worker)
                    .run(started, usage, progress);
            }
        };
        if too_late(&*request) {
            return started;
        }
        let (payload, kept) = request.take_payload();
        let f = match work {
            SyncWork::Call(f) => f,
            SyncWork::Stream(f, feed) => {
                let start = || handing_over(payload, kept, |payload| f(payload));
                feed.run(guarded(|| offering(offer, start)));
                return Instant::now();
            }
        };
        let (outcome, finished) = call_sync(
            &f,
            payload,
            kept,
            offer,
            &pace,
            started,
            on_worker,
            usage,
            request.callback(),
        );
        let Some(wait_for_room) = finish(request, outcome) else {
            return finished;
        };
        wait(wait_for_room, on_worker).unwrap_or(finished)
    }
}

/// Waits for room on the way back: on a runtime worker in a task of its own (`None`);
/// on a callback thread, on it (returns when it finished).
fn wait(wait_for_room: crate::mesh::BoxFuture<'static, ()>, on_worker: bool) -> Option<Instant> {
    if on_worker {
        tokio::spawn(wait_for_room);
        None
    } else {
        // The way back is full: wait for room on this thread (not a runtime's).
        crate::blocking::park(wait_for_room);
        Some(Instant::now())
    }
}

/// Runs the sync callback `f` on `payload` once, `started` just before, turning a panic
/// into a failure, and records how long it took in `pace` (see [`SyncJob::run`]).
/// Returns its outcome and when it finished. `kept`: the reader's hold on the payload's
/// buffer, if handed over (see `codec::handing_over`). `callback`: its name, for the log.
#[allow(clippy::too_many_arguments)]
fn call_sync(
    f: &SyncFn,
    payload: bytes::Bytes,
    kept: Option<daffi_wire::KeptBuffer>,
    offer: Option<Box<Offer>>,
    pace: &Pace,
    started: Instant,
    on_worker: bool,
    usage: &mut RunUsage,
    callback: &str,
) -> (Outcome, Instant) {
    crate::blocking::take_blocked();
    let start = || handing_over(payload, kept, |payload| f(payload));
    let outcome = catch_unwind(AssertUnwindSafe(|| offering(offer, start)))
        .unwrap_or_else(|p| Err(panic_failure(p)));
    let finished = Instant::now();
    let took = finished.saturating_duration_since(started);
    let blocked = crate::blocking::take_blocked();
    // The second opinion's processor time (µs) and blocking, for the log.
    let mut seen = None;
    let descheduled = || {
        let (Some(before), Some(now)) = (usage.usage, thread_clock::usage()) else {
            return false;
        };
        // Later runs compare with this reading, taken after this callback.
        usage.usage = Some(now);
        seen = Some((
            now.cpu_us.saturating_sub(before.cpu_us),
            now.blocked.saturating_sub(before.blocked),
        ));
        before.ran_under(now, QUICK_RUN)
    };
    if pace.record(took, blocked, descheduled) {
        tracing::debug!(
            callback,
            took_us = took.as_micros() as u64,
            blocked,
            on_worker,
            second_opinion = ?seen,
            "a sync callback ran slow: its next runs go to threads"
        );
    }
    (outcome, finished)
}

/// A plain sync callback's function.
type SyncFn = Arc<dyn Fn(bytes::Bytes) -> Outcome + Send + Sync>;

/// Sends the outcome back, if the caller wants it; for NO_RETURN, logs a failure.
/// Returns the wait for room if the way back is full.
fn finish(
    request: Box<dyn Request>,
    outcome: Outcome,
) -> Option<crate::mesh::BoxFuture<'static, ()>> {
    if !request.wants_reply() {
        if let Err(f) = &outcome {
            note_no_return_failure(request.callback(), request.caller(), &f.message);
        }
        return None;
    }
    request.reply(outcome)
}

/// NO_RETURN calls that failed in this process: nobody else hears of them.
static NO_RETURN_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Logs a failed NO_RETURN call: the first, then one line per thousand. A caller's
/// flood of calls that fail (arguments of the wrong type, say: a batch carries one per
/// few bytes) must not flood the log.
fn note_no_return_failure(callback: &str, caller: &str, error: &str) {
    let failed = NO_RETURN_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if failed == 1 || failed % 1000 == 0 {
        tracing::warn!(
            callback,
            caller,
            error,
            failed,
            "a no-return callback failed ({failed} in this process so far; logged for the first and then every thousandth)"
        );
    } else {
        tracing::debug!(callback, caller, error, "no-return callback failed");
    }
}

pub(crate) fn panic_failure(panic: Box<dyn std::any::Any + Send>) -> CallbackFailure {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string());
    CallbackFailure::panicked(message)
}

/// Polls a future, turning a panic into a failure.
struct CatchUnwind<F>(F);

impl<F: Future<Output = Outcome> + Unpin> Future for CatchUnwind<F> {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let inner = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *inner).poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(panic_failure(panic))),
        }
    }
}

#[cfg(test)]
impl SyncJob {
    /// A job that does nothing, for tests of the runner's planning.
    pub(super) fn placeholder() -> SyncJob {
        struct Nothing;
        impl Request for Nothing {
            fn callback(&self) -> &str {
                "nothing"
            }
            fn caller(&self) -> &str {
                "test"
            }
            fn payload(&self) -> bytes::Bytes {
                bytes::Bytes::new()
            }
            fn wants_reply(&self) -> bool {
                false
            }
            fn deadline(&self) -> Option<Instant> {
                None
            }
            fn reply(self: Box<Self>, _: Outcome) -> Option<crate::mesh::BoxFuture<'static, ()>> {
                None
            }
        }
        let limits = super::Limits {
            max_concurrent_callbacks: 1,
            max_sync_callbacks: usize::MAX,
            stop_timeout: std::time::Duration::ZERO,
        };
        let executor = Executor::new("test".into(), limits, Default::default());
        let kind = CallbackKind {
            sync: true,
            one_way: true,
        };
        SyncJob {
            work: SyncWork::Call(Arc::new(|_| Ok(Default::default()))),
            calls: Calls::One(Box::new(Nothing)),
            offer: None,
            pace: Arc::default(),
            _running: executor.admit_callback(kind).expect("room"),
        }
    }

    /// A placeholder of a callback seen to finish quickly.
    pub(super) fn quick_placeholder() -> SyncJob {
        let job = SyncJob::placeholder();
        while !job.pace.is_quick() {
            job.pace.record(std::time::Duration::ZERO, false, || false);
        }
        job
    }
}
