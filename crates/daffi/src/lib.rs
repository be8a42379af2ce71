//! Call functions in other processes by name: sync or async, over TCP or a Unix socket,
//! through a controller that runs inside any node or on its own.
//!
//! Every process runs a *node*; one of them (or the `daffi controller` binary) also runs
//! the *controller*, which routes every call. A node serves callbacks (functions marked
//! [`#[callback]`](macro@callback) or closures given to [`Global::register`]) and calls
//! the callbacks of any other node with [`Global::call`].
//!
//! ```no_run
//! use daffi::{callback, Global};
//! use std::time::Duration;
//!
//! #[callback]
//! fn add(a: i64, b: i64) -> i64 { a + b }
//!
//! #[callback(name = "sub")]
//! async fn subtract(a: i64, b: i64) -> Result<i64, String> { Ok(a - b) }
//!
//! fn main() -> daffi::Result<()> {
//!     // This process runs the controller and a node, on TCP port 8888.
//!     let g = Global::builder()
//!         .process_name("proc1")
//!         .init_controller(true)
//!         .host("localhost")
//!         .port(8888)
//!         .start()?;
//!     g.register("mul", |a: i64, b: i64| a * b)?;
//!
//!     g.wait_process("proc2")?;
//!     // FG: wait for the result.
//!     let d: i64 = g.call("func1").args((10, 3)).timeout(Duration::from_secs(15)).fg()?;
//!     // BG: the result later.
//!     let r = g.call("func3").args((4, 6)).eta(Duration::from_secs(1)).bg::<i64>()?;
//!     let s: i64 = r.get()?;
//!     // NO_RETURN: fire and forget.
//!     g.call("func2").no_return()?;
//!     println!("{d} {s}");
//!     g.stop();
//!     Ok(())
//! }
//! ```
//!
//! # Execution modes
//!
//! | the Python daffi's modifier | Rust | async twin |
//! |---|---|---|
//! | `FG` | [`Call::fg`] (`.timeout(d)`) | [`Call::fg_async`] |
//! | `BG` | [`Call::bg`] -> [`AsyncResult`] (`.timeout(d)`, `.eta(d)`) | `.await` the `AsyncResult` |
//! | `NO_RETURN` | [`Call::no_return`] (`.eta(d)`) | [`Call::no_return_async`] |
//! | `PERIOD` | [`Call::period`] with [`Period::every`] or [`Period::at`] -> [`ScheduledTask`] | [`Call::period_async`] |
//! | `BROADCAST` | [`Call::broadcast`], [`Call::broadcast_results`], [`Call::broadcast_no_return`] | the `_async` twins |
//!
//! Each row has a compiled example in the README and on the method.
//!
//! In async code, start with [`GlobalBuilder::start_async`] and end calls with the
//! `_async` twins ([`Call::fg_async`], [`Call::no_return_async`]) or `.await` an
//! [`AsyncResult`].
//!
//! # What a node knows, and when
//!
//! Over the built-in controller a node keeps only what it needs of the others, so that
//! a mesh of thousands of nodes costs each little:
//!
//! - By default it knows nobody. The first call, broadcast, stream or
//!   [`Global::wait_function`] for a callback name asks the controller for that name's
//!   providers (one round trip, once per connection); from then on the controller keeps
//!   them current (joins, callback changes, leaves) in batches sent every 5 ms at most.
//!   A provider whose leave was announced is never chosen again.
//! - It knows every node, kept current, from the first [`Global::members`],
//!   [`Global::registered_callbacks`] or [`Global::wait_process`] on (the first waits
//!   one round trip), and from the start when the builder has a membership hook
//!   ([`GlobalBuilder::on_member_added`], [`GlobalBuilder::on_member_removed`]), and
//!   from its first stream callback on (it stops the streams of a caller that leaves).
//!   The CLI's `ls` and `watch` do so.
//! - After a reconnect it asks again for what it needs, as it needs it.
//!
//! Over NATS it is the same, with the cluster in the controller's place: a node
//! watches the providers of the names it uses (learned on first use, the first time
//! waiting for one read of them), or every node when asked as above; joins, callback
//! changes and leaves reach it as they are written, and nobody hears the others'
//! heartbeats. With a controller older than this behaviour, a node knows every node.
//!
//! Every failure is a named [`Error`] variant. The wire format is described in
//! `docs/PROTOCOL.md` of the repository.
//!
//! # Security
//!
//! The default Unix socket admits only processes of the same user. On TCP, protect the
//! controller with TLS ([`GlobalBuilder::tls_cert`], [`GlobalBuilder::tls_key`] on the
//! controller, [`GlobalBuilder::tls_ca`] on nodes, optionally mutual TLS) and a shared
//! token ([`GlobalBuilder::auth_token`], or the `DAFFI_AUTH_TOKEN` environment
//! variable). Every node that gets in is trusted with the whole mesh. The threat model
//! and a guide to running beyond loopback are in `docs/SECURITY.md`.
#![warn(missing_docs)]

mod async_result;
mod auth;
mod blob;
mod blocking;
mod call;
mod callback;
mod codec;
mod controller;
mod error;
mod executor;
mod global;
mod incoming;
mod info;
mod mesh;
mod node;
mod period;
mod protocol;
mod spin;
mod stream;
mod sync;
mod tombstones;
mod transport;

pub use async_result::AsyncResult;
pub use blob::Blob;
pub use call::Call;
pub use callback::{
    AsyncFn, CallbackGroup, IntoCallback, IntoReply, IntoStreamCallback, IterFn, Reply, StreamFn,
    SyncFn,
};
pub use daffi_macros::callback;
pub use error::{Error, Result};
pub use global::{Global, GlobalBuilder};
pub use incoming::Incoming;
pub use info::{ControllerStats, MemberInfo};
pub use period::{parse_duration, Period, ScheduledTask, ScheduledTaskInfo};
pub use stream::{BlockingItems, CallStream};
pub use transport::Address;

/// The README's snippets, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

/// The snippets of `docs/SECURITY.md`, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/SECURITY.md")]
pub struct SecurityDoctests;

/// What `#[callback]` expands to refers to these. Not public API: no stability promise.
#[doc(hidden)]
pub mod __private {
    pub use crate::callback::{
        decode_args, encode_reply, iter_items, stream_items, BoxFuture, CallbackFailure, Handler,
        ItemIter, ItemStream, Outcome, Param, Signature, StaticCallback, StaticHandler,
    };
    pub use bytes::Bytes;
    pub use inventory;
    pub use serde;
}
