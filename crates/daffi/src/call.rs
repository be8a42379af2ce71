//! [`Call`]: one builder for every way of calling a remote callback.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::async_result::{AsyncResult, Outcome};
use crate::blocking;
use crate::callback::{stream_items, ItemStream};
use crate::codec::{self, explain};
use crate::error::{Error, Result};
use crate::global::Global;
use crate::mesh::{BoxFuture, CallRequest, NodeOutcome, ReplyPayload};
use crate::node::{Node, Started};
use crate::period::{Period, ScheduledTask};
use crate::protocol::message::{ControlAnswer, ControlRequest, TaskEntry, Timing};
use crate::protocol::MAX_TASK_ID;
use crate::stream::{CallStream, Feeding};
use daffi_wire::Payload;

/// MessagePack for an empty argument list.
const NO_ARGS: &[u8] = &[0x90];

/// A call being set up: choose arguments and options, then end it with one of
///
/// | terminal | sync | async |
/// |---|---|---|
/// | wait for the result (FG) | [`fg`](Self::fg) | [`fg_async`](Self::fg_async) |
/// | result later (BG) | [`bg`](Self::bg) -> [`AsyncResult`] | the same `AsyncResult`, `.await`ed |
/// | no result (NO_RETURN) | [`no_return`](Self::no_return) | [`no_return_async`](Self::no_return_async) |
/// | every provider (BROADCAST) | [`broadcast`](Self::broadcast), [`broadcast_results`](Self::broadcast_results), [`broadcast_no_return`](Self::broadcast_no_return) | the `_async` twins |
/// | on a schedule (PERIOD) | [`period`](Self::period) -> [`ScheduledTask`] | [`period_async`](Self::period_async) |
/// | a stream of results (STREAM) | [`stream`](Self::stream) -> [`CallStream`] | the same `CallStream` |
///
/// [`stream_from`](Self::stream_from) streams arguments to the callback's
/// [`Incoming`](crate::Incoming) parameter, with `fg`, `fg_async`, `bg` or `stream`.
///
/// ```no_run
/// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
/// use std::time::Duration;
/// let sum: i64 = g.call("add").args((1, 2)).timeout(Duration::from_secs(5)).fg()?;
/// # Ok(()) }
/// ```
#[must_use = "a Call does nothing until it ends with fg(), bg(), no_return() or an _async twin"]
#[derive(Debug, Clone)]
pub struct Call {
    global: Global,
    callback: Arc<str>,
    args: std::result::Result<Payload, String>,
    on: Option<String>,
    timeout: Option<Duration>,
    eta: Option<Duration>,
    /// The arguments `stream_from` streams to the callee.
    feed: Option<FeedSource>,
}

/// The items given to [`Call::stream_from`], encoded as they come; clones of a call
/// share them, and the first to end takes them.
#[derive(Clone)]
struct FeedSource(Arc<Mutex<Option<ItemStream>>>);

impl std::fmt::Debug for FeedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FeedSource")
    }
}

impl Call {
    pub(crate) fn new(global: Global, callback: &str) -> Call {
        Call {
            global,
            callback: shared_name(callback),
            args: Ok(Payload::from(Bytes::from_static(NO_ARGS))),
            on: None,
            timeout: None,
            eta: None,
            feed: None,
        }
    }

    /// The arguments. A tuple sends them by position: `.args((10, 3))`, `.args(("x",))`
    /// for one. A struct (or map) sends them by name, which `#[callback]` functions
    /// accept too. A callback of one parameter takes anything but a list as that
    /// argument, so `.args(person)` reaches `fn greet(p: Person)`, unless it is a map of
    /// one entry keyed by the parameter's name. Without `.args`, the call has no
    /// arguments.
    ///
    /// Byte strings: one owned `Vec<u8>` or `serde_bytes::ByteBuf`, `.args((data,))`,
    /// is sent from its own memory, as a [`Blob`](crate::Blob) is; a borrowed one,
    /// `.args((&data,))`, is copied once, into memory the node already has mapped if it
    /// has some (a buffer of a recent large frame or copy).
    pub fn args<A: Serialize>(mut self, args: A) -> Self {
        self.args = codec::encode_args(args);
        self
    }

    /// Arguments already encoded as MessagePack (a list or a map).
    pub fn raw_args(mut self, args: Bytes) -> Self {
        self.args = Ok(args.into());
        self
    }

    /// Fails the call with [`Error::Timeout`] if no result came within `timeout` of
    /// sending it. The callee is told, and skips the work if it starts too late.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Waits `eta` before sending the request.
    pub fn eta(mut self, eta: Duration) -> Self {
        self.eta = Some(eta);
        self
    }

    /// Sends the call to the node named `process` instead of a random provider.
    pub fn on(mut self, process: impl Into<String>) -> Self {
        self.on = Some(process.into());
        self
    }

    /// Streams `items` to the callback's [`Incoming`](crate::Incoming) parameter (its
    /// other parameters are the `.args(..)`, in order); end the call with
    /// [`fg`](Self::fg), [`fg_async`](Self::fg_async), [`bg`](Self::bg) or
    /// [`stream`](Self::stream) (both ways at once). The stream is polled on the node's
    /// runtime, only as far ahead as the callee reads (32 items); it is dropped once the
    /// callee stops reading or the call ends. A callback without an `Incoming` parameter
    /// refuses the call with [`Error::NotAStream`], as does one with it called without
    /// `stream_from`. `timeout` bounds the whole call; `eta` is not supported here.
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // `fn sum(scale: i64, numbers: daffi::Incoming<i64>) -> daffi::Result<i64>`
    /// let numbers = futures_util::stream::iter(1..=10_000i64); // or `futures::stream::iter`
    /// let total: i64 = g.call("sum").args((2,)).stream_from(numbers).fg_async().await?;
    /// # Ok(()) }
    /// ```
    pub fn stream_from<S>(mut self, items: S) -> Self
    where
        S: futures_core::Stream + Send + 'static,
        S::Item: Serialize + 'static,
    {
        let items = Some(stream_items(items));
        self.feed = Some(FeedSource(Arc::new(Mutex::new(items))));
        self
    }

    /// FG: blocks until the result arrives.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `delta = g.call.func1(10, 3) & FG(timeout=15)`
    /// use std::time::Duration;
    /// let delta: i64 = g.call("func1").args((10, 3)).timeout(Duration::from_secs(15)).fg()?;
    /// # Ok(()) }
    /// ```
    pub fn fg<T: DeserializeOwned>(self) -> Result<T> {
        if self.feed.is_some() {
            let runtime = self.global.runtime().clone();
            return blocking::wait(&runtime, "fg", self.fg_async())?;
        }
        // Refused before anything is sent where it could not wait.
        let may_wait = blocking::may_wait("fg")?;
        let callback = self.callback.clone();
        let (global, request) = self.into_parts(false)?;
        let node = global.node()?;
        // Sent from this thread when nothing makes it wait (as `bg` does); only the wait
        // for the reply enters the runtime.
        let started = start_here(&global, node, request);
        let reply = match started {
            Started::Sent(call) => {
                let lone = node.lone_wait_on(&call);
                may_wait.wait_lone(global.runtime(), call, lone)
            }
            Started::Failed(e) => Err(e),
            Started::Later(rest) => may_wait.wait(global.runtime(), rest),
        };
        decode_result(&callback, reply?)
    }

    /// FG from async code.
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `delta = await g.call.func1(10, 3) & FG`
    /// let delta: i64 = g.call("func1").args((10, 3)).fg_async().await?;
    /// # Ok(()) }
    /// ```
    pub async fn fg_async<T: DeserializeOwned>(self) -> Result<T> {
        let callback = self.callback.clone();
        if self.feed.is_some() {
            let bytes = self.fed_request()?.await?;
            return decode_result(&callback, bytes);
        }
        // Sent at once when nothing makes it wait (as `bg` does): what is awaited is
        // then only the reply's waiter, not the builder and the node's send future
        // (a future several times larger, moved on every poll's way in).
        let (global, request) = self.into_parts(false)?;
        let node = global.node()?;
        let started = start_here(&global, node, request);
        let reply = match started {
            Started::Sent(call) => node.reply(call).await,
            Started::Failed(e) => Err(e),
            Started::Later(rest) => rest.await,
        };
        // The node is kept (`global`) until the reply is in, as the builder kept it.
        drop(global);
        decode_result(&callback, reply?)
    }

    /// BG: sends the call now (or after `eta`) and returns at once; the result is
    /// collected from the [`AsyncResult`] (`get`, `get_timeout`, `.await`).
    ///
    /// A thread that keeps many calls in flight (16 or more on its connection) and
    /// collects their results as they come, making a new call for each, sends the calls
    /// it makes between two waits in one write: its requests are held until it next
    /// waits for a result (in `get`, or an `.await` that is not ready), for at most a
    /// millisecond or two if it goes off to other work first. That write costs the
    /// caller, the controller and the callee far less than one per call.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `future = g.call.func3(4, 6) & BG(eta=1)`; `future.get()`
    /// use std::time::Duration;
    /// let future = g.call("func3").args((4, 6)).eta(Duration::from_secs(1)).bg::<i64>()?;
    /// // ... other work while it runs ...
    /// let sum = future.get()?;
    /// # Ok(()) }
    /// ```
    pub fn bg<T: DeserializeOwned>(self) -> Result<AsyncResult<T>> {
        let callback = self.callback.clone();
        if self.feed.is_some() {
            let global = self.global.clone();
            let call = global.runtime().spawn(self.fed_request()?);
            return Ok(AsyncResult::new(global, callback, Outcome::Task(call)));
        }
        // The builder's `Global` moves into the result (not cloned).
        let (global, mut request) = self.into_parts(false)?;
        request.may_hold = true;
        // Sent from this thread when nothing makes it wait: no task to start and wake.
        let started = start_here(&global, global.node()?, request);
        let outcome = match started {
            Started::Sent(call) => Outcome::Sent(call),
            Started::Failed(e) => Outcome::Failed(Some(e)),
            Started::Later(rest) => Outcome::Task(global.runtime().spawn(rest)),
        };
        Ok(AsyncResult::new(global, callback, outcome))
    }

    /// NO_RETURN: sends the call and does not wait for it to run. With an `eta`, returns
    /// at once and sends later (a failure to send then is logged).
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `g.call.func2() & NO_RETURN(eta=3)`
    /// use std::time::Duration;
    /// g.call("func2").eta(Duration::from_secs(3)).no_return()?;
    /// # Ok(()) }
    /// ```
    pub fn no_return(self) -> Result<()> {
        if self.eta.is_some() {
            return self.no_return_later();
        }
        // Refused where waiting would be (whether it waits does not depend on timing).
        blocking::may_block("no_return")?;
        let (global, mut request) = self.into_parts(true)?;
        // The node is borrowed from the builder's `Global`: no reference counts moved.
        let node = global.node()?;
        // Sent from this thread when nothing makes it wait: no runtime entered, no future
        // parked on. Only a timeout's deadline needs the runtime.
        let sent = {
            let _runtime = request.timeout.is_some().then(|| global.runtime().enter());
            node.try_no_return(&mut request)
        };
        match sent {
            Some(sent) => sent,
            None => {
                let call = node.clone().call(request);
                blocking::wait(global.runtime(), "no_return", call)?.map(drop)
            }
        }
    }

    /// NO_RETURN from async code.
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `await g.call.func2() & NO_RETURN`
    /// g.call("func2").no_return_async().await?;
    /// # Ok(()) }
    /// ```
    pub async fn no_return_async(self) -> Result<()> {
        if self.eta.is_some() {
            return self.no_return_later();
        }
        self.request(true)?.await.map(drop)
    }

    fn no_return_later(self) -> Result<()> {
        let global = self.global.clone();
        let request = self.request(true)?;
        global.runtime().spawn(async move {
            if let Err(e) = request.await {
                tracing::warn!(error = %e, "a delayed no_return call could not be sent");
            }
        });
        Ok(())
    }

    /// BROADCAST: calls every node serving the name (never this one) and returns each
    /// result by process name. If any node fails or times out, returns
    /// [`Error::Broadcast`], which names the nodes that answered and, for each other
    /// one, its error; use [`broadcast_results`](Self::broadcast_results) to keep the
    /// values that did arrive. No node serving the name: [`Error::NoProvider`].
    /// `timeout` bounds the whole broadcast; `eta` delays it.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `results = g.call.func1(10, 3) & BROADCAST(return_result=True)`
    /// let deltas = g.call("func1").args((10, 3)).broadcast::<i64>()?;
    /// for (process, delta) in &deltas {
    ///     println!("{process}: {delta}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn broadcast<T: DeserializeOwned>(self) -> Result<HashMap<String, T>> {
        let global = self.global.clone();
        let lone = self.lone_broadcast(&global);
        blocking::wait_lone(global.runtime(), "broadcast", self.broadcast_async(), lone)?
    }

    /// How a thread waits for this broadcast: it may spin first if nothing else of the
    /// node is in flight, and no eta delays it (a wait no spin shortens; an `fg` with an
    /// eta does not spin either).
    fn lone_broadcast<'g>(&self, global: &'g Global) -> Option<crate::spin::LoneWait<'g>> {
        if self.eta.is_some() {
            return None;
        }
        global.node().ok()?.lone_wait(false)
    }

    /// BROADCAST from async code.
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `results = await g.call.func1(10, 3) & BROADCAST(return_result=True)`
    /// let deltas = g.call("func1").args((10, 3)).broadcast_async::<i64>().await?;
    /// # Ok(()) }
    /// ```
    pub async fn broadcast_async<T: DeserializeOwned>(self) -> Result<HashMap<String, T>> {
        let callback = self.callback.to_string();
        let results = self.broadcast_results_async::<T>().await?;
        let mut values = HashMap::with_capacity(results.len());
        let mut failed = Vec::new();
        for (node, result) in results {
            match result {
                Ok(v) => {
                    values.insert(node, v);
                }
                Err(e) => failed.push((node, e)),
            }
        }
        if failed.is_empty() {
            return Ok(values);
        }
        failed.sort_by(|a, b| a.0.cmp(&b.0));
        let mut succeeded: Vec<String> = values.into_keys().collect();
        succeeded.sort();
        Err(Error::Broadcast {
            callback,
            succeeded,
            failed,
        })
    }

    /// BROADCAST keeping every outcome: process name -> its value or its error.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // Like `& BROADCAST(return_result=True)`, keeping what the other nodes returned when
    /// // one of them fails.
    /// for (process, outcome) in g.call("func1").args((10, 3)).broadcast_results::<i64>()? {
    ///     match outcome {
    ///         Ok(delta) => println!("{process}: {delta}"),
    ///         Err(e) => eprintln!("{process} failed: {e}"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn broadcast_results<T: DeserializeOwned>(self) -> Result<HashMap<String, Result<T>>> {
        let global = self.global.clone();
        let lone = self.lone_broadcast(&global);
        blocking::wait_lone(
            global.runtime(),
            "broadcast_results",
            self.broadcast_results_async(),
            lone,
        )?
    }

    /// Async twin of [`broadcast_results`](Self::broadcast_results).
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// let outcomes = g.call("func1").args((10, 3)).broadcast_results_async::<i64>().await?;
    /// # Ok(()) }
    /// ```
    pub async fn broadcast_results_async<T: DeserializeOwned>(
        self,
    ) -> Result<HashMap<String, Result<T>>> {
        let callback = self.callback.clone();
        let outcomes = self.broadcast_request(false)?.await?;
        Ok(outcomes
            .into_iter()
            .map(|(node, outcome)| {
                let value = outcome.and_then(|bytes| decode_result(&callback, bytes));
                (node.to_string(), value)
            })
            .collect())
    }

    /// BROADCAST without results: returns once the request went to every provider.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `g.call.func2() & BROADCAST`
    /// g.call("func2").broadcast_no_return()?;
    /// # Ok(()) }
    /// ```
    pub fn broadcast_no_return(self) -> Result<()> {
        let global = self.global.clone();
        blocking::wait(
            global.runtime(),
            "broadcast_no_return",
            self.broadcast_no_return_async(),
        )?
    }

    /// Async twin of [`broadcast_no_return`](Self::broadcast_no_return).
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `await g.call.func2() & BROADCAST`
    /// g.call("func2").broadcast_no_return_async().await?;
    /// # Ok(()) }
    /// ```
    pub async fn broadcast_no_return_async(self) -> Result<()> {
        self.broadcast_request(true)?.await.map(drop)
    }

    /// PERIOD: asks the controller to run this call on a schedule. Each run goes to the
    /// node named with [`on`](Self::on), or to a node serving the name chosen at that
    /// moment; a run that finds no such node is skipped. No results come back. The
    /// schedule lives in the controller, so it outlives this node, and every node keeps a
    /// copy, so it outlives a controller restart, under the same id (see "Schedules
    /// survive a controller restart" in the README). Over NATS
    /// ([`nats`](crate::GlobalBuilder::nats)) it lives in a replicated KV bucket, and one
    /// node at a time sends its runs.
    ///
    /// A time in the past, an empty list or a zero interval fails here with
    /// [`Error::InvalidPeriod`]; arguments that leave less than 512 bytes of the frame
    /// limit (every node keeps them) with [`Error::PayloadTooLarge`].
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `g.call.func2() & PERIOD(interval="5s")`
    /// use daffi::{parse_duration, Period};
    /// let task = g.call("func2").period(Period::every(parse_duration("5s")?))?;
    /// // ... later: the schedule runs until it is cancelled.
    /// task.cancel()?;
    /// # Ok(()) }
    /// ```
    pub fn period(self, period: Period) -> Result<ScheduledTask> {
        let global = self.global.clone();
        blocking::wait(global.runtime(), "period", self.period_async(period))?
    }

    /// Async twin of [`period`](Self::period).
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// // The Python daffi: `await g.call.func2() & PERIOD(at_time=[...])`
    /// use std::time::{Duration, SystemTime};
    /// use daffi::Period;
    /// let soon = SystemTime::now() + Duration::from_secs(10);
    /// let task = g
    ///     .call("func2")
    ///     .period_async(Period::at(vec![soon, soon + Duration::from_secs(5)]))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn period_async(mut self, period: Period) -> Result<ScheduledTask> {
        if self.feed.is_some() {
            return Err(feed_needs_outcome());
        }
        let timing = timing_of(period)?;
        let node = self.global.node()?.clone();
        let entry = TaskEntry {
            task_id: MAX_TASK_ID,
            callback: self.callback.to_string(),
            args: self.take_args()?.into_bytes(),
            on: self.on,
            created_by: node.name.to_string(),
            timing,
        };
        node.check_schedule_size(&entry)?;
        let request = ControlRequest::Schedule {
            callback: entry.callback,
            args: entry.args,
            on: entry.on,
            timing: entry.timing,
        };
        match node.control(request, "period").await? {
            ControlAnswer::Scheduled { task_id } => Ok(ScheduledTask {
                id: task_id,
                global: self.global,
            }),
            other => Err(unexpected_answer(other)),
        }
    }

    /// STREAM: calls a stream callback (one registered with
    /// [`Global::register_stream`]) and returns its items as they come, as a
    /// [`CallStream`]: a `futures::Stream` for async code, an `IntoIterator` for sync
    /// code. Returns at once (the request is sent, or queued to be). `timeout` bounds
    /// the wait for each item; `eta` is not supported here. A callback that returns one
    /// value ends the stream with [`Error::NotAStream`].
    ///
    /// ```no_run
    /// # async fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// use futures_util::StreamExt; // or `futures::StreamExt`
    /// let mut lines = g.call("tail").args(("app.log",)).stream::<String>()?;
    /// while let Some(line) = lines.next().await {
    ///     println!("{}", line?);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stream<T: DeserializeOwned>(mut self) -> Result<CallStream<T>> {
        if self.eta.is_some() {
            return Err(Error::Config(
                "a stream call starts at once; drop `.eta(..)`".into(),
            ));
        }
        let global = self.global.clone();
        let callback = self.callback.clone();
        let items = self.take_feed()?;
        let (node, request) = self.into_request(false)?;
        let runtime = global.runtime().clone();
        let open = {
            // Sending may spawn onto the node's runtime.
            let _runtime = runtime.enter();
            node.open_stream(&request)?
        };
        let call_id = open.call_id;
        let stream = CallStream::new(callback, open, request.timeout, runtime.clone());
        match items {
            // The stream's own cancel tells the callee: the feeding need not.
            Some(items) => Ok(stream.feeding(Feeding::start(
                &runtime,
                node.open_feed(call_id)?,
                items,
                false,
            ))),
            None => Ok(stream),
        }
    }

    /// The items `stream_from` gave, taken (clones of the call share them).
    fn take_feed(&mut self) -> Result<Option<ItemStream>> {
        let Some(feed) = &self.feed else {
            return Ok(None);
        };
        let items = crate::sync::lock(&feed.0).take();
        items.map(Some).ok_or_else(|| {
            Error::Config(
                "the stream given to `.stream_from(..)` was taken by a clone of this call".into(),
            )
        })
    }

    /// The call with its arguments streamed from `stream_from`'s items.
    fn fed_request(mut self) -> Result<BoxFuture<'static, Result<ReplyPayload>>> {
        if self.eta.is_some() {
            return Err(Error::Config(
                "a call fed with `.stream_from(..)` starts at once; drop `.eta(..)`".into(),
            ));
        }
        let runtime = self.global.runtime().clone();
        let items = self
            .take_feed()?
            .ok_or_else(|| Error::Config("no stream given to `.stream_from(..)`".into()))?;
        let (node, request) = self.into_request(false)?;
        Ok(Box::pin(node.call_fed(request, items, runtime)))
    }

    /// The encoded arguments, moved out (not cloned: a clone of each part would be
    /// dropped at once), or why they could not be encoded.
    fn take_args(&mut self) -> Result<Payload> {
        std::mem::replace(&mut self.args, Ok(Payload::default())).map_err(|message| Error::Encode {
            callback: self.callback.to_string(),
            message,
        })
    }

    fn into_request(self, no_reply: bool) -> Result<(Arc<Node>, CallRequest)> {
        let (global, request) = self.into_parts(no_reply)?;
        Ok((global.node()?.clone(), request))
    }

    /// The call's node (checked to be there) and its request: the builder taken apart,
    /// its `Global` moved out rather than cloned, its arguments moved out whole.
    fn into_parts(self, no_reply: bool) -> Result<(Global, CallRequest)> {
        if no_reply && self.feed.is_some() {
            return Err(feed_needs_outcome());
        }
        self.global.node()?;
        let Call {
            global,
            callback,
            args,
            on,
            timeout,
            eta,
            feed,
        } = self;
        let args = args.map_err(|message| Error::Encode {
            callback: callback.to_string(),
            message,
        })?;
        Ok((
            global,
            CallRequest {
                callback,
                args,
                on,
                timeout,
                eta,
                no_reply,
                incoming: feed.is_some(),
                may_hold: false,
            },
        ))
    }

    /// The future that performs the call on the node.
    fn request(self, no_reply: bool) -> Result<impl Future<Output = Result<ReplyPayload>>> {
        let (node, request) = self.into_request(no_reply)?;
        Ok(node.call(request))
    }

    fn broadcast_request(
        self,
        no_reply: bool,
    ) -> Result<impl Future<Output = Result<Vec<NodeOutcome>>>> {
        if self.on.is_some() {
            return Err(Error::Config(
                "a broadcast goes to every node serving the name; drop `.on(..)`".into(),
            ));
        }
        if self.feed.is_some() {
            return Err(feed_needs_outcome());
        }
        let (node, request) = self.into_request(no_reply)?;
        Ok(node.broadcast(request))
    }
}

/// The callback name as an `Arc<str>`: the same one as this thread's previous call when
/// the name is the same (calls in a loop then allocate no name).
fn shared_name(callback: &str) -> Arc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match last.as_ref() {
            Some(name) if **name == *callback => name.clone(),
            _ => {
                let name: Arc<str> = Arc::from(callback);
                *last = Some(name.clone());
                name
            }
        }
    })
}

/// Why a call fed with `stream_from` cannot end with no_return, broadcast or period.
fn feed_needs_outcome() -> Error {
    Error::Config(
        "a call fed with `.stream_from(..)` goes to one node and waits for its outcome: end it with fg, fg_async, bg or stream".into(),
    )
}

/// Turns a [`Period`] into the controller's timing, refusing what cannot be kept.
fn timing_of(period: Period) -> Result<Timing> {
    let millis = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
    match period {
        Period::Every(interval) if millis(interval) == 0 => Err(Error::InvalidPeriod(
            "the interval must be at least 1 ms".into(),
        )),
        Period::Every(interval) => Ok(Timing::Every {
            interval_ms: millis(interval),
            first_ms: None,
        }),
        Period::At(times) if times.is_empty() => {
            Err(Error::InvalidPeriod("the list of times is empty".into()))
        }
        Period::At(times) => {
            let now = SystemTime::now();
            let delays_ms = times
                .iter()
                .map(|t| match t.duration_since(now) {
                    Ok(delay) if millis(delay) > 0 => Ok(millis(delay)),
                    _ => Err(Error::InvalidPeriod(format!(
                        "{} is not in the future",
                        humantime_utc(*t)
                    ))),
                })
                .collect::<Result<Vec<u64>>>()?;
            Ok(Timing::At { delays_ms })
        }
    }
}

/// A time as seconds since the Unix epoch, for error messages.
fn humantime_utc(t: SystemTime) -> String {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => format!(
            "the time {:.3} s after the Unix epoch (UTC)",
            d.as_secs_f64()
        ),
        Err(_) => "a time before the Unix epoch".into(),
    }
}

pub(crate) fn unexpected_answer(answer: ControlAnswer) -> Error {
    Error::protocol("the controller", format!("unexpected answer {answer:?}"))
}

/// Decodes a result into the type the caller asked for.
/// Takes the bytes over: a byte string result may keep them instead of copying them.
pub(crate) fn decode_result<T: DeserializeOwned>(callback: &str, reply: ReplyPayload) -> Result<T> {
    codec::decode_owned(reply.bytes, reply.kept.as_ref()).map_err(|(bytes, e)| Error::BadResult {
        callback: callback.to_string(),
        expected: std::any::type_name::<T>(),
        message: explain::result::<T>(&bytes, &e),
        source: Box::new(e),
    })
}

/// Starts `request` on `node` from the calling thread (sent at once when nothing makes
/// it wait): only timers (a timeout, an eta) need the node's runtime entered.
fn start_here(global: &Global, node: &Arc<Node>, request: CallRequest) -> Started {
    let timers = request.timeout.is_some() || request.eta.is_some();
    let _runtime = timers.then(|| global.runtime().enter());
    node.start(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_called_again_shares_its_allocation() {
        let first = shared_name("add");
        let again = shared_name("add");
        assert!(Arc::ptr_eq(&first, &again));
        let other = shared_name("sub");
        assert_eq!((&*other, &*shared_name("add")), ("sub", "add"));
    }
}
