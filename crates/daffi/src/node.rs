//! A node, whatever the mesh behind it: the callbacks it serves (its [`Executor`]), the
//! calls it makes (one send path, one [`Waiter`]), and waiting for the membership view.
//! It knows the mesh only through [`Mesh`].

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::callback::{CallbackGroup, Handler, ItemStream};
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::mesh::pending::OwnReply;
use crate::mesh::{
    check_callback_list, sleep_until, BoxFuture, CallRequest, Feed, Membership, Mesh, NodeOutcome,
    OpenStream, ReplyPayload, Scope, Slot, Slots, Waiter,
};
use crate::protocol::message::{ControlAnswer, ControlRequest, TaskEntry};
use crate::protocol::TASK_OVERHEAD;
use crate::spin::{AsyncSpin, LoneWait, SpinPolicy};
use crate::stream::Feeding;
use tokio::runtime::Handle;

/// A node: its executor, its mesh, and the slots for its own calls in flight.
pub struct Node {
    /// This node's process name.
    pub name: Arc<str>,
    executor: Arc<Executor>,
    mesh: Arc<dyn Mesh>,
    /// Slots for this node's own calls in flight (`max_in_flight`).
    in_flight: Arc<Slots>,
    /// Whether a thread waiting for a lone call spins first (`sync_spin`).
    spin: SpinPolicy,
    /// The node's runtime, entered by a call that must wait from the calling thread.
    runtime: tokio::runtime::Handle,
}

/// A call on its way: sent (its reply awaited where it is polled), or still waiting to
/// be sent (an eta, a slot, room to send), to be run by a task.
pub enum Started {
    /// Sent: what waits on the reply.
    Sent(Waiter),
    /// Failed before anything was sent.
    Failed(Error),
    /// Not sent yet: the rest of the call, start to reply.
    Later(BoxFuture<'static, Result<ReplyPayload>>),
}

impl Node {
    /// A node whose requests `executor` runs, over `mesh`. Made inside the node's runtime.
    pub fn new(
        executor: Arc<Executor>,
        mesh: Arc<dyn Mesh>,
        max_in_flight: usize,
        sync_spin: Duration,
    ) -> Self {
        Node {
            name: executor.name.clone(),
            executor,
            mesh,
            in_flight: Slots::new(max_in_flight),
            spin: SpinPolicy::new(sync_spin),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// How a thread waits for a call of this node that holds one of its slots (`own`)
    /// or is yet to take one: it may spin first if nothing else is in flight (see
    /// [`SpinPolicy`]).
    pub fn lone_wait(&self, own: bool) -> Option<LoneWait<'_>> {
        let others = self.in_flight.used().saturating_sub(usize::from(own));
        self.spin.plan(others)
    }

    /// [`lone_wait`](Self::lone_wait) for the sent `call`, which holds its slot: a
    /// spinning thread reads the reply itself where it can ([`Waiter::own_reply`]).
    pub fn lone_wait_on(&self, call: &Waiter) -> Option<LoneWait<'_>> {
        self.lone_wait(true)
            .map(|lone| lone.reading(|| call.own_reply()))
    }

    /// Awaits a sent call's reply; outside any task, a lone call spins for it first, as
    /// a sync call does (see [`AsyncSpin`]).
    pub async fn reply(&self, mut call: Waiter) -> Result<ReplyPayload> {
        let mut spun = Spun::new(&self.spin);
        let reply = std::future::poll_fn(|cx| self.poll_reply(&mut call, &mut spun.spin, cx)).await;
        self.replied(&mut spun.spin);
        reply
    }

    /// The awaited wait `spin` is over: a timed one counts into the node's average.
    pub fn replied(&self, spin: &mut AsyncSpin) {
        spin.arrived(&self.spin);
    }

    /// An awaited reply's future dropped unfinished: see [`AsyncSpin::abandoned`].
    pub fn abandon_reply(&self, spin: &mut AsyncSpin) {
        spin.abandoned(&self.spin);
    }

    /// Polls `call`'s reply for [`reply`](Self::reply), a broadcast and `AsyncResult`;
    /// [`replied`](Self::replied) once the wait is over.
    pub fn poll_reply(
        &self,
        call: &mut Waiter,
        spin: &mut AsyncSpin,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ReplyPayload>> {
        loop {
            if let Poll::Ready(reply) = std::pin::Pin::new(&mut *call).poll(cx) {
                return Poll::Ready(reply);
            }
            // What a spinning thread reads its reply with, made at its first look: most
            // polls do not spin.
            let own = std::cell::OnceCell::new();
            let read_own = || {
                own.get_or_init(|| call.own_reply())
                    .as_ref()
                    .is_some_and(OwnReply::read)
            };
            // `is_ready`, not `has_reply`: the call's deadline ends the spin too, as a
            // wake-up by its timer ends a sync wait's.
            let ready = || call.is_ready() || read_own();
            if !spin.wait(cx, || self.lone_wait(true), ready) {
                return Poll::Pending;
            }
        }
    }

    /// Makes one call and waits for its outcome (the empty payload for NO_RETURN).
    pub async fn call(self: Arc<Self>, mut req: CallRequest) -> Result<ReplyPayload> {
        let sent = match self.try_send(&mut req) {
            Some(sent) => sent?,
            // Boxed: the call that can be sent at once does not carry the waits.
            None => Box::pin(self.send(req)).await?,
        };
        match sent {
            Some(waiter) => waiter.await,
            None => Ok(Bytes::new().into()),
        }
    }

    /// Starts a call from the calling thread: sent at once if nothing makes it wait,
    /// otherwise the rest of it as a future (for a task). Enter the node's runtime
    /// first (timers need it).
    pub fn start(self: &Arc<Self>, mut req: CallRequest) -> Started {
        match self.try_send(&mut req) {
            Some(Ok(Some(waiter))) => return Started::Sent(waiter),
            Some(Ok(None)) => return Started::Later(Box::pin(async { Ok(Bytes::new().into()) })),
            Some(Err(e)) => return Started::Failed(e),
            None => {}
        }
        // Waiting may need timers (the providers' subscription, a deadline).
        let _context = self.runtime.enter();
        let mut call = Box::pin(self.clone().send(req));
        match call.as_mut().poll(&mut Context::from_waker(noop_waker())) {
            Poll::Ready(Ok(Some(waiter))) => Started::Sent(waiter),
            // NO_RETURN: nothing to wait for.
            Poll::Ready(Ok(None)) => Started::Later(Box::pin(async { Ok(Bytes::new().into()) })),
            Poll::Ready(Err(e)) => Started::Failed(e),
            Poll::Pending => Started::Later(Box::pin(async move {
                match call.await? {
                    Some(waiter) => waiter.await,
                    None => Ok(Bytes::new().into()),
                }
            })),
        }
    }

    /// Sends `req` from the calling thread if nothing makes it wait (an eta, no free
    /// slot, no room to send): what waits on the reply, holding the slot (`None` for
    /// NO_RETURN); the arguments move out of `req` once sent. `None` if it would have
    /// to wait: [`send`](Self::send) does that.
    fn try_send(&self, req: &mut CallRequest) -> Option<Result<Option<Waiter>>> {
        if req.eta.is_some() {
            return None;
        }
        if self.is_stopped() {
            return Some(Err(Error::Stopped));
        }
        if req.no_reply {
            // A NO_RETURN call holds its slot only while it is sent: a free one is
            // enough, not taken and given back (giving a permit back takes the
            // semaphore's lock).
            if self.in_flight.available() == 0 {
                return None;
            }
            return self.mesh.try_send_call(req);
        }
        let slot = self.in_flight.try_take()?;
        let sent = self.mesh.try_send_call(req)?;
        Some(sent.map(|waiter| waiter.map(|w| w.hold(slot))))
    }

    /// Sends a NO_RETURN call from the calling thread if nothing makes it wait (no
    /// future, no runtime entered); `None` (`req` whole) if it would have to:
    /// [`call`](Self::call) does that. Enter the node's runtime first if `req` has a
    /// timeout.
    pub fn try_no_return(&self, req: &mut CallRequest) -> Option<Result<()>> {
        self.try_send(req).map(|sent| sent.map(drop))
    }

    /// The one send path that may wait: for the eta and a slot, then sends; what waits on the
    /// reply (holding the slot), or `None` for NO_RETURN.
    async fn send(self: Arc<Self>, req: CallRequest) -> Result<Option<Waiter>> {
        self.wait_eta(req.eta).await?;
        let deadline = req.timeout.map(|t| Instant::now() + t);
        let slot = self.admit(&req, deadline).await?;
        let waiter = self.mesh.send_call(&req, deadline).await?;
        Ok(waiter.map(|w| w.hold(slot)))
    }

    /// Makes a call (`req.incoming`) whose arguments stream from `items`, fed from a task
    /// on `runtime` while the call waits for its outcome. Dropped before the outcome, it
    /// stops feeding and tells the callee (its `Incoming` ends with `Cancelled`).
    pub async fn call_fed(
        self: Arc<Self>,
        req: CallRequest,
        items: ItemStream,
        runtime: Handle,
    ) -> Result<ReplyPayload> {
        let Some(waiter) = Box::pin(self.clone().send(req)).await? else {
            return Err(Error::Config(
                "a call fed with `.stream_from(..)` waits for its outcome".into(),
            ));
        };
        let feeding = match self.mesh.open_feed(waiter.call_id()) {
            Ok(feed) => Some(Feeding::start(&runtime, feed, items, true)),
            // The outcome came first (a refusal): nothing to feed.
            Err(_) if waiter.is_ready() => None,
            Err(e) => return Err(e),
        };
        let outcome = waiter.await;
        match (&outcome, feeding) {
            // The caller gives up: dropped, the feeding tells the callee.
            (Err(Error::Timeout { .. }), _) | (_, None) => {}
            (_, Some(feeding)) => feeding.finish(),
        }
        outcome
    }

    /// Starts feeding the arguments of the stream call `call_id` (see
    /// [`Mesh::open_feed`]).
    pub fn open_feed(&self, call_id: u64) -> Result<Feed> {
        self.mesh.open_feed(call_id)
    }

    /// Sends `req` as a stream call; its items arrive on what this returns.
    pub fn open_stream(&self, req: &CallRequest) -> Result<OpenStream> {
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        self.mesh.open_stream(req)
    }

    /// Calls every node serving the callback (never this one) and collects each outcome.
    /// A NO_RETURN broadcast returns an empty list once every request is sent.
    pub async fn broadcast(self: Arc<Self>, req: CallRequest) -> Result<Vec<NodeOutcome>> {
        self.wait_eta(req.eta).await?;
        let deadline = req.timeout.map(|t| Instant::now() + t);
        let _slot = self.admit(&req, deadline).await?;
        let sent = self.mesh.send_broadcast(&req, deadline).await?;
        let mut outcomes = Vec::with_capacity(sent.len());
        // The replies are spun for as a lone call's (the broadcast holds one slot),
        // within one limit for them all, as a sync broadcast's.
        let mut spun = Spun::new(&self.spin);
        for (target, sent) in sent {
            let outcome = match sent {
                Ok(Some(mut waiter)) => {
                    std::future::poll_fn(|cx| self.poll_reply(&mut waiter, &mut spun.spin, cx))
                        .await
                }
                Ok(None) => Ok(Bytes::new().into()),
                Err(e) => Err(e),
            };
            outcomes.push((target, outcome));
        }
        self.replied(&mut spun.spin);
        if req.no_reply {
            return match outcomes.into_iter().find_map(|(_, o)| o.err()) {
                Some(e) => Err(e),
                None => Ok(Vec::new()),
            };
        }
        Ok(outcomes)
    }

    /// Asks the mesh itself (schedules, counters).
    pub async fn control(
        self: Arc<Self>,
        request: ControlRequest,
        what: &str,
    ) -> Result<ControlAnswer> {
        self.mesh.control(request, what).await
    }

    /// Waits until `ready` holds for the membership view, which is made to hold
    /// `scope` (again after each reconnect), or `timeout` passes.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Option<Duration>,
        scope: Scope<'_>,
        ready: impl Fn(&Membership) -> bool,
    ) -> Result<()> {
        let membership = self.mesh.membership();
        let mut changes = membership.subscribe();
        let mut stop = self.mesh.stopping();
        let deadline = timeout.map(|t| Instant::now() + t);
        // Asked again after a change (a reconnect ends subscriptions), never in a loop.
        let mut ask = true;
        loop {
            if self.is_stopped() {
                return Err(Error::Stopped);
            }
            if ready(membership) {
                return Ok(());
            }
            let asking = ask && !membership.covers(scope) && self.mesh.is_connected();
            tokio::select! {
                asked = self.mesh.want(scope), if asking => {
                    if let Err(e) = asked {
                        tracing::debug!(process = %self.name, error = %e, "{what}: could not subscribe; waiting for a change");
                        ask = false;
                    }
                }
                _ = changes.changed() => ask = true,
                _ = stop.changed() => {}
                _ = sleep_until(deadline) => {
                    return Err(Error::timeout(what, timeout.unwrap_or_default()));
                }
            }
        }
    }

    /// Adds callbacks (all or none) and tells the other nodes.
    pub fn register(&self, handlers: Vec<(String, Handler)>) -> Result<()> {
        let limit = self.mesh.size_limit();
        self.executor
            .register(handlers, |names| check_callback_list(names, limit))?;
        self.mesh.clone().announce();
        self.hear_of_callers();
        Ok(())
    }

    /// Serves the methods of `instance`; one instance per type and node.
    pub fn register_instance<T: CallbackGroup>(&self, instance: T) -> Result<()> {
        let limit = self.mesh.size_limit();
        self.executor
            .register_instance(instance, |names| check_callback_list(names, limit))?;
        self.mesh.clone().announce();
        self.hear_of_callers();
        Ok(())
    }

    /// A node that serves streams stops those of a caller that leaves: it asks (in the
    /// background) to hear of every node.
    fn hear_of_callers(&self) {
        if self.executor.serves_streams() && !self.mesh.membership().covers(Scope::Everything) {
            let mesh = self.mesh.clone();
            self.runtime.spawn(async move {
                if let Err(e) = mesh.want(Scope::Everything).await {
                    tracing::warn!(error = %e, "a node serving streams could not ask for every member; it hears of its callers' leaves after its next reconnect");
                }
            });
        }
    }

    /// Names of the callbacks this node serves.
    pub fn callback_names(&self) -> Vec<String> {
        self.executor.callback_names()
    }

    /// This node's view of the others, made whole first (kept so from then on): the
    /// first time, this waits for the controller's answer (at most its control
    /// timeout). Where waiting is not allowed (a current-thread runtime's own thread),
    /// the view is asked for and what is known now is returned.
    pub fn whole_membership(&self, runtime: &tokio::runtime::Handle) -> &Membership {
        let membership = self.mesh.membership();
        if membership.covers(Scope::Everything) {
            return membership;
        }
        let asked = crate::blocking::wait(runtime, "members", self.mesh.want(Scope::Everything));
        match asked {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(process = %self.name, error = %e, "could not ask the controller for every member; the list holds what this node knows")
            }
            Err(_) => {
                let mesh = self.mesh.clone();
                runtime.spawn(async move { mesh.want(Scope::Everything).await });
                tracing::warn!(process = %self.name, "members() or registered_callbacks() called on a current-thread runtime's thread before this node knew every member: it is asked for now, and the list holds what is known so far (call wait_process_async first)")
            }
        }
        membership
    }

    /// Checks that a schedule leaves [`TASK_OVERHEAD`] of the size limit: every message
    /// that carries it must fit. `entry` is the task as every node would hold it.
    pub fn check_schedule_size(&self, entry: &TaskEntry) -> Result<()> {
        let size = entry.size_bound() + TASK_OVERHEAD;
        let limit = self.mesh.size_limit();
        if size > limit {
            return Err(Error::PayloadTooLarge {
                callback: entry.callback.clone(),
                size,
                limit,
            });
        }
        Ok(())
    }

    /// Whether the node is connected to the mesh now.
    pub fn is_connected(&self) -> bool {
        self.mesh.is_connected()
    }

    /// Whether stopping has begun.
    pub fn is_stopped(&self) -> bool {
        self.mesh.is_stopped()
    }

    /// Begins stopping (see [`Mesh::begin_stop`]); `false` if already stopping.
    pub fn begin_stop(&self) -> bool {
        self.mesh.begin_stop()
    }

    /// Whether callbacks are running here now.
    pub fn is_serving(&self) -> bool {
        self.executor.is_serving()
    }

    /// Waits until no callback runs here, or `stop_timeout` passes.
    pub async fn drain(&self) {
        self.executor.drain().await;
    }

    /// Leaves the mesh for good.
    pub fn close(&self) {
        self.mesh.close();
    }

    /// Waits (briefly) until the goodbye and the last replies have gone out.
    pub async fn finished(&self) {
        self.mesh.finished().await;
    }

    /// Waits for a slot among `max_in_flight` (until `deadline`).
    async fn admit(&self, req: &CallRequest, deadline: Option<Instant>) -> Result<Slot> {
        if let Some(slot) = self.in_flight.try_take() {
            return Ok(slot);
        }
        tokio::select! {
            slot = self.in_flight.take() => Ok(slot),
            _ = sleep_until(deadline) => Err(Error::timeout(
                req.callback.to_string(),
                req.timeout.unwrap_or_default(),
            )),
        }
    }

    async fn wait_eta(&self, eta: Option<Duration>) -> Result<()> {
        if let Some(eta) = eta {
            // Boxed: calls without an eta (most) do not carry this wait in their future.
            Box::pin(async {
                let mut stop = self.mesh.stopping();
                tokio::select! {
                    _ = tokio::time::sleep(eta) => Ok(()),
                    _ = stop.wait_for(|s| *s) => Err(Error::Stopped),
                }
            })
            .await?;
        }
        if self.is_stopped() {
            return Err(Error::Stopped);
        }
        Ok(())
    }
}

/// A waker that does nothing: [`Node::start`] polls once on the calling thread, and a
/// call that cannot finish then is polled again, with a real waker, by a task; a BG
/// result whose reply is in is taken with it.
pub(crate) fn noop_waker() -> &'static Waker {
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    static WAKER: OnceLock<Waker> = OnceLock::new();
    WAKER.get_or_init(|| Waker::from(Arc::new(Noop)))
}

/// An await's spin, counted as a wait given up past the limit if dropped before it is
/// over (see [`AsyncSpin::abandoned`]).
struct Spun<'a> {
    policy: &'a SpinPolicy,
    spin: AsyncSpin,
}

impl<'a> Spun<'a> {
    fn new(policy: &'a SpinPolicy) -> Self {
        Spun {
            policy,
            spin: AsyncSpin::default(),
        }
    }
}

impl Drop for Spun<'_> {
    fn drop(&mut self) {
        self.spin.abandoned(self.policy);
    }
}
