//! [`AsyncResult`]: the result of a BG call, collected later.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use crate::blocking;
use crate::call::decode_result;
use crate::error::{Error, Result};
use crate::global::Global;
use crate::mesh::{held, ReplyPayload, Waiter};
use crate::spin::AsyncSpin;

/// The pending result of a [`Call::bg`](crate::Call::bg).
///
/// The call runs whether or not anyone waits: dropping an `AsyncResult` discards the
/// result, it does not cancel the call. Collect it with [`get`](Self::get) (blocking),
/// [`get_timeout`](Self::get_timeout), [`get_async`](Self::get_async), or `.await`.
///
/// ```no_run
/// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
/// // The Python daffi: `future = g.call.func3(4, 6) & BG`; `await future.get_async()`
/// let future = g.call("func3").args((4, 6)).bg::<i64>()?;
/// // ... other work while it runs ...
/// let sum = future.await?;
/// # Ok(()) }
/// ```
#[must_use = "the call runs anyway; collect its result with get(), get_async() or .await"]
#[derive(Debug)]
pub struct AsyncResult<T> {
    global: Global,
    callback: Arc<str>,
    outcome: Outcome,
    /// Outside any task, a lone call's reply is spun for first (see `AsyncSpin`).
    spin: AsyncSpin,
    _result: PhantomData<fn() -> T>,
}

/// Where the result comes from.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The request is sent; the reply is awaited right here, without a task.
    Sent(Waiter),
    /// A task sends the request (after an eta, or a wait for room) and awaits the reply.
    Task(JoinHandle<Result<ReplyPayload>>),
    /// The call failed before anything was sent (taken when polled).
    Failed(Option<Error>),
}

impl<T: DeserializeOwned> AsyncResult<T> {
    pub(crate) fn new(global: Global, callback: Arc<str>, outcome: Outcome) -> Self {
        AsyncResult {
            global,
            callback,
            outcome,
            spin: AsyncSpin::default(),
            _result: PhantomData,
        }
    }

    /// Whether the result is ready (`get` would not block).
    pub fn is_ready(&self) -> bool {
        match &self.outcome {
            Outcome::Sent(call) => call.is_ready(),
            Outcome::Task(task) => task.is_finished(),
            Outcome::Failed(_) => true,
        }
    }

    /// Blocks until the result arrives.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `future = g.call.func3(4, 6) & BG`; `future.get()`
    /// let future = g.call("func3").args((4, 6)).bg::<i64>()?;
    /// let sum = future.get()?;
    /// # Ok(()) }
    /// ```
    pub fn get(mut self) -> Result<T> {
        if let Some(result) = self.take_arrived() {
            blocking::may_block("get")?;
            return result;
        }
        let global = self.global.clone();
        let lone = self.lone_wait(&global);
        blocking::wait_lone(global.runtime(), "get", self, lone)?
    }

    /// How this thread waits for the reply: it may spin first if the call is sent and
    /// is its node's only one in flight, and read the reply itself while it spins.
    fn lone_wait<'g>(&self, global: &'g Global) -> Option<crate::spin::LoneWait<'g>> {
        match &self.outcome {
            Outcome::Sent(call) => global.node().ok()?.lone_wait_on(call),
            _ => None,
        }
    }

    /// The result, if its reply is in: taken without entering the runtime to wait (with
    /// many calls in flight, most replies are in by the time `get` is called).
    fn take_arrived(&mut self) -> Option<Result<T>> {
        match &self.outcome {
            Outcome::Sent(call) if call.has_reply() => {
                let mut cx = Context::from_waker(crate::node::noop_waker());
                match Pin::new(self).poll(&mut cx) {
                    Poll::Ready(result) => Some(result),
                    Poll::Pending => None,
                }
            }
            _ => None,
        }
    }

    /// Blocks until the result arrives or `timeout` passes ([`Error::Timeout`]). The
    /// remote call itself goes on; its result is then discarded.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `future.get(timeout=5)`
    /// use std::time::Duration;
    /// let future = g.call("func3").args((4, 6)).bg::<i64>()?;
    /// let sum = future.get_timeout(Duration::from_secs(5))?;
    /// # Ok(()) }
    /// ```
    pub fn get_timeout(self, timeout: Duration) -> Result<T> {
        let global = self.global.clone();
        let what = self.callback.to_string();
        let lone = self.lone_wait(&global);
        let within = async move {
            tokio::time::timeout(timeout, self)
                .await
                .unwrap_or_else(|_| Err(Error::timeout(what, timeout)))
        };
        blocking::wait_lone(global.runtime(), "get_timeout", within, lone)?
    }

    /// Waits for the result from async code (the same as `.await`).
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `future = g.call.func3(4, 6) & BG`; `await future.get_async()`
    /// let future = g.call("func3").args((4, 6)).bg::<i64>()?;
    /// let sum = future.get_async().await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_async(self) -> Result<T> {
        self.await
    }
}

impl<T> Drop for AsyncResult<T> {
    fn drop(&mut self) {
        // Dropped while its lone wait was timed: a wait given up counts (see `AsyncSpin`).
        if let Ok(node) = self.global.node() {
            node.abandon_reply(&mut self.spin);
        }
    }
}

impl<T: DeserializeOwned> Future for AsyncResult<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = &mut *self;
        let outcome = match &mut this.outcome {
            Outcome::Sent(call) => {
                // A sent call came from this `Global`'s node: the lookup cannot fail.
                let node = match this.global.node() {
                    Ok(node) => node,
                    Err(e) => return Poll::Ready(Err(e)),
                };
                let Poll::Ready(reply) = node.poll_reply(call, &mut this.spin, cx) else {
                    // This thread waits: the requests it held go now.
                    held::flush();
                    return Poll::Pending;
                };
                node.replied(&mut this.spin);
                held::collected();
                reply
            }
            Outcome::Task(task) => match std::task::ready!(Pin::new(task).poll(cx)) {
                Ok(outcome) => outcome,
                // The task only fails to finish when the node's runtime shut down.
                Err(_) => Err(Error::Stopped),
            },
            Outcome::Failed(error) => Err(error.take().unwrap_or(Error::Stopped)),
        };
        Poll::Ready(outcome.and_then(|bytes| decode_result(&self.callback, bytes)))
    }
}
