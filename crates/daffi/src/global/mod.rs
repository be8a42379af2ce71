//! [`Global`]: the entry point that starts a node (and maybe the controller) and makes
//! calls. One job per file: the options (`builder`), the TLS checks (`tls`), starting
//! (`launch`), the hooks' thread (`hooks`), the handle (here), waiting for peers
//! (`wait`), asking the controller (`control`), and stopping (`stop`).

mod builder;
mod control;
mod hooks;
mod launch;
mod stop;
mod tls;
mod wait;

pub use builder::GlobalBuilder;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;

use crate::call::Call;
use crate::callback::{CallbackGroup, Handler, IntoCallback, IntoStreamCallback};
use crate::controller::ControllerHandle;
use crate::error::{Error, Result};
use crate::info::MemberInfo;
use crate::node::Node;
use crate::protocol::{check_name, NameKind};
use crate::transport::Address;
use hooks::Hooks;
use launch::OwnedRuntime;

/// A handle to this process's daffi node (and controller, if it runs one).
///
/// Cheap to clone; every clone is the same node. The node stops when [`Global::stop`] is
/// called or the last clone is dropped.
#[derive(Clone)]
pub struct Global {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    address: Address,
    runtime: Handle,
    node: Option<Arc<Node>>,
    controller: Mutex<Option<ControllerHandle>>,
    owned_runtime: Mutex<Option<OwnedRuntime>>,
    /// `stop` was called.
    stopping: AtomicBool,
    /// Everything has stopped (what `join` waits for); shared with the drain task.
    stopped: Arc<tokio::sync::watch::Sender<bool>>,
    hooks: Hooks,
}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            .field("process_name", &self.inner.name)
            .field("address", &self.inner.address)
            .field("node", &self.inner.node.is_some())
            .finish()
    }
}

impl Global {
    /// Starts configuring a `Global`.
    pub fn builder() -> GlobalBuilder {
        GlobalBuilder::default()
    }

    /// This node's process name.
    pub fn process_name(&self) -> &str {
        &self.inner.name
    }

    /// The controller's address (with the real port when a free one was picked); for a
    /// node on a NATS cluster, [`Address::Nats`] with the server URLs given to
    /// `nats(..)` (the client may be connected to another server of the cluster).
    pub fn address(&self) -> &Address {
        &self.inner.address
    }

    /// The controller's TCP port, or `None` on a Unix socket or a NATS cluster.
    pub fn port(&self) -> Option<u16> {
        match &self.inner.address {
            Address::Tcp { port, .. } => Some(*port),
            Address::Unix(_) | Address::Nats(_) => None,
        }
    }

    pub(crate) fn node(&self) -> Result<&Arc<Node>> {
        // A match, not `ok_or`: that builds (and drops) the error on every call.
        match &self.inner.node {
            Some(node) => Ok(node),
            None => Err(Error::NoNode),
        }
    }

    pub(crate) fn runtime(&self) -> &Handle {
        &self.inner.runtime
    }

    /// Serves a closure under `name`, sync or async:
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// g.register("add", |a: i64, b: i64| a + b)?;
    /// g.register("greet", |name: String| async move { format!("hello {name}") })?;
    /// g.register("checked_div", |a: i64, b: i64| {
    ///     a.checked_div(b).ok_or("division by zero")
    /// })?;
    /// # Ok(()) }
    /// ```
    ///
    /// Arguments arrive positionally. A closure returning `Result<T, E: Display>` sends
    /// `Err` to the caller as [`Error::Remote`]. A closure that captures this `Global`
    /// keeps it alive: stop it with [`Global::stop`].
    ///
    /// A node's callback names together may take at most 1 MiB, each counting its
    /// length plus 4 bytes (less with a `max_frame_size` under 1 MiB + 512 bytes, on this
    /// node or the controller): past that, `register`, `register_instance` and `start`
    /// (for the `#[callback]` functions) fail with [`Error::CallbackListTooLarge`].
    pub fn register<M>(&self, name: &str, callback: impl IntoCallback<M>) -> Result<()> {
        self.register_handler(name, callback.into_handler(name))
    }

    /// Serves a handler that takes the arguments as MessagePack bytes and returns the
    /// encoded result: for callbacks whose types are only known at run time (the Python
    /// package `crates/daffi-py`). Not public API: no stability promise.
    #[doc(hidden)]
    pub fn register_handler(&self, name: &str, handler: Handler) -> Result<()> {
        check_name(NameKind::Callback, name).map_err(Error::Config)?;
        let node = self.node()?;
        // Announcing spawns onto the node's runtime.
        let _context = self.inner.runtime.enter();
        node.register(vec![(name.to_string(), handler)])
    }

    /// Serves a stream callback under `name`: the closure takes the call's arguments
    /// (as with [`register`](Self::register)) and returns its items, as an
    /// `IntoIterator` (advanced on the node's sync callback threads) or a
    /// `futures::Stream` (polled as a task). Callers read them with
    /// [`Call::stream`]. The callee produces only as far ahead as the caller has read
    /// (see [`CallStream`](crate::CallStream)), and stops (the iterator or stream is
    /// dropped) when the caller drops its stream or goes.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// g.register_stream("count_to", |n: u64| 1..=n)?;
    /// # Ok(()) }
    /// ```
    pub fn register_stream<M>(
        &self,
        name: &str,
        callback: impl IntoStreamCallback<M>,
    ) -> Result<()> {
        self.register_handler(name, callback.into_stream_handler(name))
    }

    /// Serves the `pub` `&self` methods of a callback group (a type whose `impl` block
    /// is marked `#[callback]`), each under its method name. Groups are singletons: a
    /// second instance of the same type fails with [`Error::DuplicateInstance`].
    ///
    /// ```no_run
    /// struct Calc { k: i64 }
    ///
    /// #[daffi::callback]
    /// impl Calc {
    ///     pub fn mul(&self, a: i64) -> i64 { a * self.k }
    ///     pub fn version() -> String { "1".into() }   // served without an instance
    /// }
    ///
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// g.register_instance(Calc { k: 3 })?;
    /// assert!(g.register_instance(Calc { k: 4 }).is_err());
    /// # Ok(()) }
    /// ```
    pub fn register_instance<T: CallbackGroup>(&self, instance: T) -> Result<()> {
        let node = self.node()?;
        let _context = self.inner.runtime.enter();
        node.register_instance(instance)
    }

    /// Starts a call to the callback `name` on another node.
    pub fn call(&self, name: &str) -> Call {
        Call::new(self.clone(), name)
    }

    /// Callback name -> names of the nodes that serve it, this one included. Like
    /// [`members`](Self::members), the first call asks the controller for every node.
    pub fn registered_callbacks(&self) -> HashMap<String, Vec<String>> {
        let Some(node) = &self.inner.node else {
            return HashMap::new();
        };
        let mut all = node.whole_membership(self.runtime()).providers();
        for name in node.callback_names() {
            all.entry(name).or_default().push(self.inner.name.clone());
        }
        for nodes in all.values_mut() {
            nodes.sort();
        }
        all
    }

    /// The other nodes connected to the controller and the callbacks each serves, sorted
    /// by name: this node's view, kept current by the controller. The first call asks
    /// the controller for every node (one round trip; see "What a node knows, and when"
    /// in the crate docs); later ones read the view. Empty while the node is
    /// disconnected, or for a `Global` without a node.
    pub fn members(&self) -> Vec<MemberInfo> {
        let Some(node) = &self.inner.node else {
            return Vec::new();
        };
        node.whole_membership(self.runtime())
            .members()
            .into_iter()
            .map(|(name, callbacks)| MemberInfo { name, callbacks })
            .collect()
    }
}
