#![doc = include_str!("../README_LIB.md")]
#![warn(missing_docs)]

mod async_result;
mod blocking;
mod call;
mod callback;
mod controller;
mod error;
mod global;
mod node;
pub mod protocol;
mod sync;
mod transport;

pub use async_result::AsyncResult;
pub use call::Call;
pub use callback::{AsyncFn, IntoCallback, IntoReply, Reply, SyncFn};
pub use daffi_macros::callback;
pub use error::{Error, Result};
pub use global::{Global, GlobalBuilder};
pub use transport::Address;

/// What `#[callback]` expands to refers to these. Not public API: no stability promise.
#[doc(hidden)]
pub mod __private {
    pub use crate::callback::{
        decode_args, encode_reply, BoxFuture, CallbackFailure, Outcome, StaticCallback,
        StaticHandler,
    };
    pub use bytes::Bytes;
    pub use inventory;
    pub use serde;
}
