//! Stopping a `Global`: at once for new calls, with a drain of the callbacks already
//! running, then the goodbye; and `join`, which waits for the end of it.

use std::sync::atomic::Ordering;

use super::{Global, Inner};
use crate::blocking;
use crate::error::Result;
use crate::sync::lock;

impl Global {
    /// Blocks until this `Global` is stopped (from another thread, or by a callback):
    /// its callbacks finished or timed out, its goodbye sent, and the controller it ran
    /// (if any) closed, so that its address can be bound again at once.
    pub fn join(&self) -> Result<()> {
        blocking::wait(self.runtime(), "join", self.join_async())
    }

    /// Async twin of [`join`](Self::join).
    pub async fn join_async(&self) {
        let mut rx = self.inner.stopped.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops the node and the controller (if this process runs one), gracefully.
    ///
    /// At once: this node's own calls waiting here fail with [`Error::Stopped`](crate::Error::Stopped), new calls
    /// from here fail the same way, and the controller routes no new requests here
    /// (their callers get [`Error::PeerStopped`](crate::Error::PeerStopped)). Callbacks already running here get up
    /// to `stop_timeout` (default 5 s) to finish and send their results; then the node
    /// says goodbye, and callers still waiting get [`Error::PeerStopped`](crate::Error::PeerStopped). `stop` returns
    /// at once; [`join`](Self::join) returns when all of this is done. Idempotent; also
    /// runs when the last clone drops.
    pub fn stop(&self) {
        let connected_node = self
            .inner
            .node
            .as_ref()
            .filter(|n| !n.is_stopped() && n.is_connected());
        if let (Some(_), Some(hook)) = (connected_node, &self.inner.hooks.on_node_disconnect) {
            hook(self, &self.inner.name);
        }
        self.inner.stop();
    }
}

impl Inner {
    /// Stops the node gracefully: no new calls in or out at once; callbacks already
    /// running get up to `stop_timeout` to finish (in the background), then the node
    /// says goodbye, the controller (if any) stops, and `join` returns.
    fn stop(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let controller = lock(&self.controller).take();
        let owned_runtime = lock(&self.owned_runtime).take();
        let stopped = self.stopped.clone();
        let node = self.node.clone();
        let drain = node
            .as_ref()
            .is_some_and(|n| n.begin_stop() && n.is_serving());
        if !drain {
            // Nothing to wait for: stop at once, so that others see it right away.
            if let Some(node) = &node {
                node.close();
            }
            if let Some(controller) = &controller {
                controller.stop();
            }
        }
        self.runtime.spawn(async move {
            if let Some(node) = &node {
                if drain {
                    node.drain().await;
                    node.close();
                }
                // Let the goodbye and the last replies go out before the runtime ends.
                node.finished().await;
            }
            if let Some(controller) = controller {
                controller.stop();
                controller.closed().await;
            }
            stopped.send_replace(true);
            if let Some(rt) = owned_runtime {
                rt.shutdown();
            }
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}
