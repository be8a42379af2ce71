//! [`Call`]: one builder for every way of calling a remote callback.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::async_result::AsyncResult;
use crate::blocking;
use crate::callback::encode_value;
use crate::error::{Error, Result};
use crate::global::Global;
use crate::node::CallRequest;

/// MessagePack for an empty argument list.
const NO_ARGS: &[u8] = &[0x90];

/// A call being set up: choose arguments and options, then end it with one of
///
/// | terminal | sync | async |
/// |---|---|---|
/// | wait for the result (FG) | [`fg`](Self::fg) | [`fg_async`](Self::fg_async) |
/// | result later (BG) | [`bg`](Self::bg) -> [`AsyncResult`] | the same `AsyncResult`, `.await`ed |
/// | no result (NO_RETURN) | [`no_return`](Self::no_return) | [`no_return_async`](Self::no_return_async) |
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
    args: std::result::Result<Bytes, String>,
    on: Option<String>,
    timeout: Option<Duration>,
    eta: Option<Duration>,
}

impl Call {
    pub(crate) fn new(global: Global, callback: &str) -> Call {
        Call {
            global,
            callback: Arc::from(callback),
            args: Ok(Bytes::from_static(NO_ARGS)),
            on: None,
            timeout: None,
            eta: None,
        }
    }

    /// The arguments. A tuple sends them by position: `.args((10, 3))`, `.args(("x",))`
    /// for one. A struct (or map) sends them by name, which `#[callback]` functions
    /// accept too. Without `.args`, the call has no arguments.
    pub fn args<A: Serialize>(mut self, args: A) -> Self {
        self.args = encode_value(&args);
        self
    }

    /// Arguments already encoded as MessagePack (a list or a map).
    pub fn raw_args(mut self, args: Bytes) -> Self {
        self.args = Ok(args);
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

    /// FG: blocks until the result arrives.
    pub fn fg<T: DeserializeOwned>(self) -> Result<T> {
        let global = self.global.clone();
        blocking::wait(global.runtime(), "fg", self.fg_async())?
    }

    /// FG from async code.
    pub async fn fg_async<T: DeserializeOwned>(self) -> Result<T> {
        let callback = self.callback.clone();
        let bytes = self.request(false)?.await?;
        decode_result(&callback, &bytes)
    }

    /// BG: sends the call now (or after `eta`) and returns at once; the result is
    /// collected from the [`AsyncResult`] (`get`, `get_timeout`, `.await`).
    pub fn bg<T: DeserializeOwned>(self) -> Result<AsyncResult<T>> {
        let global = self.global.clone();
        let callback = self.callback.clone();
        let task = global.runtime().spawn(self.request(false)?);
        Ok(AsyncResult::new(global, callback, task))
    }

    /// NO_RETURN: sends the call and does not wait for it to run. With an `eta`, returns
    /// at once and sends later (a failure to send then is logged).
    pub fn no_return(self) -> Result<()> {
        if self.eta.is_some() {
            return self.no_return_later();
        }
        let global = self.global.clone();
        blocking::wait(global.runtime(), "no_return", self.request(true)?)?.map(drop)
    }

    /// NO_RETURN from async code.
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

    /// The future that performs the call on the node.
    fn request(self, no_reply: bool) -> Result<impl Future<Output = Result<Bytes>>> {
        let node = self.global.node()?.clone();
        let args = self.args.map_err(|message| Error::Encode {
            callback: self.callback.to_string(),
            message,
        })?;
        Ok(node.call(CallRequest {
            callback: self.callback,
            args,
            on: self.on,
            timeout: self.timeout,
            eta: self.eta,
            no_reply,
        }))
    }
}

/// Decodes a result into the type the caller asked for.
pub(crate) fn decode_result<T: DeserializeOwned>(callback: &str, bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::BadResult {
        callback: callback.to_string(),
        expected: std::any::type_name::<T>(),
        message: e.to_string(),
    })
}
