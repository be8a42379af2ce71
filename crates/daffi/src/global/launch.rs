//! Starting a `Global` from its builder: the controller, then the node, then the thread
//! that runs the lifecycle hooks; and the runtime `start()` owns.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::hooks::run_hooks;
use super::{Global, GlobalBuilder, Inner};
use crate::callback::static_callbacks;
use crate::controller::{ControllerConfig, ControllerHandle};
use crate::error::{Error, Result};
use crate::executor::{Executor, Limits};
use crate::mesh::controller::{ControllerMesh, NodeConfig, Route};
use crate::mesh::NodeEvent;
use crate::node::Node;
use crate::protocol::{check_name, NameKind};
use crate::transport::Address;

impl GlobalBuilder {
    pub(super) async fn launch(
        self,
        runtime: Handle,
        owned: Option<OwnedRuntime>,
    ) -> Result<Global> {
        if !self.init_node && !self.init_controller {
            return Err(Error::Config(
                "init_node(false) and init_controller(false): nothing to start".into(),
            ));
        }
        for (callback, _) in &self.handlers.0 {
            check_name(NameKind::Callback, callback).map_err(Error::Config)?;
        }
        let name = match &self.process_name {
            Some(n) => {
                check_name(NameKind::Process, n).map_err(Error::Config)?;
                n.clone()
            }
            None => format!("node-{}", random_suffix()),
        };
        if self.nats.is_some() {
            return self.launch_nats(name, runtime, owned).await;
        }
        if self.stall_timeout.is_zero() {
            return Err(Error::Config(
                "stall_timeout must be longer than zero".into(),
            ));
        }
        let mut address = self.address()?;
        let auth_token = self.token()?;
        let (server_tls, client_tls) = self.load_tls(&address)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let controller = if self.init_controller {
            let config = ControllerConfig {
                max_frame_size: self.max_frame_size,
                handshake_timeout: self.handshake_timeout,
                max_connections: self.max_connections,
                tls: server_tls,
                auth_token: auth_token.clone(),
                max_queue_bytes: self.max_queue_bytes,
                stall_timeout: self.stall_timeout,
                linger: self.controller_linger,
            };
            let c = ControllerHandle::start(&address, config).await?;
            if let (Address::Tcp { port, .. }, Address::Tcp { port: bound, .. }) =
                (&mut address, c.address())
            {
                *port = *bound;
            }
            Some(c)
        } else {
            if matches!(address, Address::Tcp { port: 0, .. }) {
                return Err(Error::Config(
                    "a node without the controller needs the controller's port".into(),
                ));
            }
            None
        };
        let node = if self.init_node {
            // Beside its controller, the node links to it in-process, with no token.
            let (route, auth_token) = match &controller {
                Some(c) => (Route::InProcess(c.in_process()), None),
                None => (Route::Socket { tls: client_tls }, auth_token),
            };
            let executor = self.executor(&name);
            let config = NodeConfig {
                address: address.clone(),
                max_frame_size: self.max_frame_size,
                connect_timeout: self.connect_timeout,
                handshake_timeout: self.handshake_timeout,
                auth_token,
                route,
                max_queue_bytes: self.max_queue_bytes,
                stall_timeout: self.stall_timeout,
                // The membership hooks, and a producer of streams (which stops the
                // streams of a caller that leaves), need to hear of every node.
                whole_view: self.wants_whole_view(&executor),
                own_replies: crate::spin::may_spin(self.sync_spin),
            };
            let mesh = ControllerMesh::new(config, executor.clone(), events_tx);
            mesh.start().await?;
            Some(Arc::new(Node::new(
                executor,
                mesh,
                self.max_in_flight,
                self.sync_spin,
            )))
        } else {
            None
        };
        self.finish(name, address, runtime, node, controller, owned, events_rx)
    }

    /// Whether a node keeps every other node in its view from the start: the
    /// membership hooks, and a producer of streams (which stops the streams of a caller
    /// that leaves), need to hear of every node.
    fn wants_whole_view(&self, executor: &Executor) -> bool {
        self.hooks.on_member_added.is_some()
            || self.hooks.on_member_removed.is_some()
            || executor.serves_streams()
    }

    /// The executor of a node called `name`, with the `#[callback]` functions and the
    /// builder's handlers (which win over a function of the same name).
    fn executor(&self, name: &str) -> Arc<Executor> {
        let limits = Limits {
            max_concurrent_callbacks: self.max_concurrent_callbacks,
            max_sync_callbacks: self.max_sync_callbacks,
            stop_timeout: self.stop_timeout,
        };
        let mut callbacks = static_callbacks();
        callbacks.extend(self.handlers.0.iter().cloned());
        Executor::new(Arc::from(name), limits, callbacks)
    }

    /// The `Global` of a started node (and controller), with the thread of its hooks.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        self,
        name: String,
        address: Address,
        runtime: Handle,
        node: Option<Arc<Node>>,
        controller: Option<ControllerHandle>,
        owned: Option<OwnedRuntime>,
        events_rx: mpsc::UnboundedReceiver<NodeEvent>,
    ) -> Result<Global> {
        let global = Global {
            inner: Arc::new(Inner {
                name,
                address,
                runtime: runtime.clone(),
                node,
                controller: Mutex::new(controller),
                owned_runtime: Mutex::new(owned),
                stopping: AtomicBool::new(false),
                stopped: Arc::new(tokio::sync::watch::channel(false).0),
                hooks: self.hooks.clone(),
            }),
        };
        if !self.hooks.is_empty() {
            let global = Arc::downgrade(&global.inner);
            let hooks = self.hooks;
            std::thread::Builder::new()
                .name("daffi-hooks".into())
                .spawn(move || {
                    // As on tokio's blocking pool: hooks may use the runtime.
                    let _context = runtime.enter();
                    run_hooks(global, hooks, events_rx);
                })?;
        }
        Ok(global)
    }

    /// Starts a node on a NATS cluster (`nats(..)`): no controller.
    #[cfg(feature = "nats")]
    async fn launch_nats(
        self,
        name: String,
        runtime: Handle,
        owned: Option<OwnedRuntime>,
    ) -> Result<Global> {
        let urls = self.checked_nats_urls()?;
        let address = Address::Nats(urls.clone());
        let executor = self.executor(&name);
        let config = crate::mesh::nats::NatsConfig {
            urls,
            namespace: self.namespace.clone(),
            credentials: self.nats_credentials.clone(),
            auth_token: self.token()?,
            tls: self.nats_tls()?,
            tls_files: [
                self.tls_ca.clone(),
                self.tls_client_cert.clone(),
                self.tls_client_key.clone(),
            ],
            connect_timeout: self.connect_timeout,
            max_frame_size: self.max_frame_size,
            stall_timeout: self.stall_timeout,
            whole_view: self.wants_whole_view(&executor),
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mesh = crate::mesh::nats::NatsMesh::start(config, executor.clone(), events_tx).await?;
        let node = Arc::new(Node::new(
            executor,
            mesh,
            self.max_in_flight,
            self.sync_spin,
        ));
        self.finish(name, address, runtime, Some(node), None, owned, events_rx)
    }

    /// Built without the `nats` feature: says how to get it.
    #[cfg(not(feature = "nats"))]
    async fn launch_nats(
        self,
        _name: String,
        _runtime: Handle,
        _owned: Option<OwnedRuntime>,
    ) -> Result<Global> {
        self.checked_nats_urls()?;
        Err(Error::Config(
            "nats(..): daffi was built without the `nats` feature: enable it with `daffi = { features = [\"nats\"] }`".into(),
        ))
    }

    /// The `nats(..)` URLs, checked against the options that do not go with them.
    fn checked_nats_urls(&self) -> Result<String> {
        if self.init_controller {
            return Err(Error::Config(
                "init_controller(true) and nats(..) do not go together: a mesh on a NATS cluster has no controller; drop one of them".into(),
            ));
        }
        if !self.init_node {
            return Err(Error::Config(
                "nats(..) with init_node(false): nothing to start (a NATS mesh has no controller to run)".into(),
            ));
        }
        Ok(self.nats.clone().unwrap_or_default())
    }
}

/// The runtime `start()` creates: its own thread holds it, so that it is never dropped
/// inside async code (which tokio forbids).
pub(super) struct OwnedRuntime {
    pub(super) handle: Handle,
    shutdown: std::sync::mpsc::Sender<()>,
}

impl OwnedRuntime {
    pub(super) fn new() -> Result<OwnedRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("daffi-worker")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (shutdown, rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("daffi-runtime".into())
            .spawn(move || {
                let _ = rx.recv();
                // Let replies and goodbyes go out, but never hang on a stuck callback.
                runtime.shutdown_timeout(Duration::from_millis(500));
            })?;
        Ok(OwnedRuntime { handle, shutdown })
    }

    pub(super) fn shutdown(self) {
        let _ = self.shutdown.send(());
    }
}

fn random_suffix() -> String {
    (0..8).map(|_| fastrand::alphanumeric()).collect()
}
