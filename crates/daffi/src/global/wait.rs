//! Waiting for another process or callback to appear: blocking or async, with or
//! without a timeout (eight forms over two waits).

use std::time::Duration;

use super::Global;
use crate::blocking;
use crate::error::Result;
use crate::mesh::Scope;

impl Global {
    /// Blocks until the process `name` is connected and its callbacks are known here.
    pub fn wait_process(&self, name: &str) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "wait_process",
            self.wait_process_inner(name, None),
        )?
    }

    /// Like [`wait_process`](Self::wait_process), giving up with [`Error::Timeout`](crate::Error::Timeout) after `timeout`.
    pub fn wait_process_timeout(&self, name: &str, timeout: Duration) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "wait_process",
            self.wait_process_inner(name, Some(timeout)),
        )?
    }

    /// Async twin of [`wait_process`](Self::wait_process).
    pub async fn wait_process_async(&self, name: &str) -> Result<()> {
        self.wait_process_inner(name, None).await
    }

    /// Async twin of [`wait_process_timeout`](Self::wait_process_timeout).
    pub async fn wait_process_timeout_async(&self, name: &str, timeout: Duration) -> Result<()> {
        self.wait_process_inner(name, Some(timeout)).await
    }

    /// Blocks until some other node serves the callback `name`.
    pub fn wait_function(&self, name: &str) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "wait_function",
            self.wait_function_inner(name, None),
        )?
    }

    /// Like [`wait_function`](Self::wait_function), giving up with [`Error::Timeout`](crate::Error::Timeout) after `timeout`.
    pub fn wait_function_timeout(&self, name: &str, timeout: Duration) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "wait_function",
            self.wait_function_inner(name, Some(timeout)),
        )?
    }

    /// Async twin of [`wait_function`](Self::wait_function).
    pub async fn wait_function_async(&self, name: &str) -> Result<()> {
        self.wait_function_inner(name, None).await
    }

    /// Async twin of [`wait_function_timeout`](Self::wait_function_timeout).
    pub async fn wait_function_timeout_async(&self, name: &str, timeout: Duration) -> Result<()> {
        self.wait_function_inner(name, Some(timeout)).await
    }

    async fn wait_process_inner(&self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let what = format!("wait_process(\"{name}\")");
        self.node()?
            .wait_until(&what, timeout, Scope::Everything, |m| m.has_node(name))
            .await
    }

    async fn wait_function_inner(&self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let what = format!("wait_function(\"{name}\")");
        self.node()?
            .wait_until(&what, timeout, Scope::Callback(name), |m| {
                m.has_provider(name)
            })
            .await
    }
}
