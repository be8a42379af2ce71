//! Callbacks: how a Rust function or closure becomes something a remote node can call.
//!
//! Every callback is stored as a [`Handler`]: a function from the encoded argument bytes
//! to the encoded result bytes. Functions marked `#[callback]` reach the table through
//! the `inventory` crate; closures through [`Global::register`](crate::Global::register).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use crate::codec::{self, encode_value};
use crate::protocol::message::RemoteErrorKind;
use crate::Blob;
use daffi_wire::Payload;

use crate::mesh::ItemBatch;

mod args;

pub use args::{decode_args, Param, Signature};

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a callback produced no value. Travels to the caller as an error reply.
#[derive(Debug, Clone)]
pub struct CallbackFailure {
    pub(crate) kind: RemoteErrorKind,
    pub(crate) message: String,
}

impl CallbackFailure {
    /// The callback returned an error.
    pub fn failed(message: impl std::fmt::Display) -> Self {
        CallbackFailure {
            kind: RemoteErrorKind::Failed,
            message: message.to_string(),
        }
    }

    /// The arguments did not decode: `message` says which one and why. The caller gets
    /// [`Error::BadArguments`](crate::Error::BadArguments).
    pub fn bad_arguments(message: impl std::fmt::Display) -> Self {
        CallbackFailure {
            kind: RemoteErrorKind::BadArguments,
            message: message.to_string(),
        }
    }

    pub(crate) fn panicked(message: String) -> Self {
        CallbackFailure {
            kind: RemoteErrorKind::Panicked,
            message: format!("panicked: {message}"),
        }
    }
}

/// The result of running a callback: encoded value or failure.
pub type Outcome = Result<Payload, CallbackFailure>;

/// A callback ready to run.
#[derive(Clone)]
pub enum Handler {
    /// Runs on one of the node's sync callback threads.
    Sync(Arc<dyn Fn(Bytes) -> Outcome + Send + Sync>),
    /// Runs as a task on the runtime.
    Async(Arc<dyn Fn(Bytes) -> BoxFuture<Outcome> + Send + Sync>),
    /// Streams items from an iterator advanced on one of the node's sync callback threads.
    SyncStream(Arc<dyn Fn(Bytes) -> Result<ItemIter, CallbackFailure> + Send + Sync>),
    /// Streams items from a `Stream` polled as a task on the runtime.
    AsyncStream(Arc<dyn Fn(Bytes) -> Result<ItemStream, CallbackFailure> + Send + Sync>),
}

impl Handler {
    /// Whether the callback streams its results (the caller needs `stream()`).
    pub fn is_stream(&self) -> bool {
        matches!(self, Handler::SyncStream(_) | Handler::AsyncStream(_))
    }

    /// Whether it runs on the node's sync callback threads.
    pub fn is_sync(&self) -> bool {
        matches!(self, Handler::Sync(_) | Handler::SyncStream(_))
    }
}

/// The items of a sync stream callback, each encoded straight into the batch that
/// carries it.
pub struct ItemIter(Box<dyn MakeItems>);

/// The items of an async stream callback (or of a caller's `stream_from`), each encoded
/// straight into the batch that carries it.
pub struct ItemStream(Box<dyn PollItems>);

impl ItemIter {
    /// Items encoded already (a Python generator's).
    pub fn of_payloads(items: impl Iterator<Item = Outcome> + Send + 'static) -> Self {
        ItemIter(Box::new(Made::<_, Payloads>::new(items)))
    }

    /// Makes the next item, and adds it to the batch `into` lends; `None` once the items
    /// ran out.
    pub(crate) fn next_into(&mut self, into: &mut dyn Fill) -> Option<Result<(), CallbackFailure>> {
        self.0.next_into(into)
    }
}

impl ItemStream {
    /// Items encoded already (a Python async generator's).
    pub fn of_payloads(items: impl futures_core::Stream<Item = Outcome> + Send + 'static) -> Self {
        ItemStream(Box::new(Made::<_, Payloads>::new(Box::pin(items))))
    }

    /// Polls for the next item, and adds it to `batch`; `None` once the items ran out.
    pub(crate) fn poll_next_into(
        &mut self,
        cx: &mut std::task::Context<'_>,
        batch: &mut ItemBatch,
    ) -> std::task::Poll<Option<Result<(), CallbackFailure>>> {
        self.0.poll_next_into(cx, batch)
    }
}

/// Lends the batch being filled for as long as one item takes to join it.
pub(crate) trait Fill {
    /// Runs `add` on the batch.
    fn fill(
        &mut self,
        add: &mut dyn FnMut(&mut ItemBatch) -> Result<(), CallbackFailure>,
    ) -> Result<(), CallbackFailure>;
}

impl Fill for ItemBatch {
    fn fill(
        &mut self,
        add: &mut dyn FnMut(&mut ItemBatch) -> Result<(), CallbackFailure>,
    ) -> Result<(), CallbackFailure> {
        add(self)
    }
}

/// A sync stream callback's items (see [`ItemIter`]).
trait MakeItems: Send {
    fn next_into(&mut self, into: &mut dyn Fill) -> Option<Result<(), CallbackFailure>>;
}

/// An async stream callback's items (see [`ItemStream`]).
trait PollItems: Send {
    fn poll_next_into(
        &mut self,
        cx: &mut std::task::Context<'_>,
        batch: &mut ItemBatch,
    ) -> std::task::Poll<Option<Result<(), CallbackFailure>>>;
}

/// Items from `S` (an iterator, or a boxed stream), joining a batch the way `K` says.
struct Made<S, K> {
    items: S,
    kind: std::marker::PhantomData<fn() -> K>,
}

impl<S, K> Made<S, K> {
    fn new(items: S) -> Self {
        Made {
            items,
            kind: std::marker::PhantomData,
        }
    }
}

/// How an item of type `X` joins a batch.
trait Join<X> {
    fn join(item: X, into: &mut dyn Fill) -> Result<(), CallbackFailure>;
}

/// Items that are values, encoded as they join.
struct Values;

/// Items encoded already (or failures).
struct Payloads;

impl<T: Serialize> Join<T> for Values {
    fn join(item: T, into: &mut dyn Fill) -> Result<(), CallbackFailure> {
        // As `encode_reply`: a `Vec<u8>` goes as the `Blob` it becomes, without a copy.
        let item = codec::into_vec(item).map(Blob::from);
        into.fill(&mut |batch| {
            match &item {
                Ok(blob) => batch.push_value(blob),
                Err(value) => batch.push_value(value),
            }
            .map_err(encode_failure)
        })
    }
}

impl Join<Outcome> for Payloads {
    fn join(item: Outcome, into: &mut dyn Fill) -> Result<(), CallbackFailure> {
        let mut item = Some(item?);
        into.fill(&mut |batch| match item.take() {
            Some(item) => batch.push(item).map_err(CallbackFailure::failed),
            None => Ok(()),
        })
    }
}

impl<I: Iterator + Send, K: Join<I::Item>> MakeItems for Made<I, K> {
    fn next_into(&mut self, into: &mut dyn Fill) -> Option<Result<(), CallbackFailure>> {
        let item = self.items.next()?;
        Some(K::join(item, into))
    }
}

impl<S: futures_core::Stream + Send, K: Join<S::Item>> PollItems for Made<Pin<Box<S>>, K> {
    fn poll_next_into(
        &mut self,
        cx: &mut std::task::Context<'_>,
        batch: &mut ItemBatch,
    ) -> std::task::Poll<Option<Result<(), CallbackFailure>>> {
        self.items
            .as_mut()
            .poll_next(cx)
            .map(|item| item.map(|item| K::join(item, batch)))
    }
}

fn encode_failure(e: String) -> CallbackFailure {
    CallbackFailure::failed(format!("could not encode the result: {e}"))
}

/// MessagePack's nil: `()` as the serializer encodes it.
const NIL: &[u8] = &[0xc0];

/// Encodes a callback's return value. A `Vec<u8>` or a `serde_bytes::ByteBuf` is sent
/// as the [`Blob`] it becomes without a copy: from its own memory, kept for the next
/// large byte string once sent (see `codec::pool`). `()` (what most NO_RETURN
/// callbacks return) is the static nil, without the serializer.
pub fn encode_reply<T: Serialize>(value: T) -> Outcome {
    if typeid::of::<T>() == std::any::TypeId::of::<()>() {
        return Ok(Payload::from(Bytes::from_static(NIL)));
    }
    let encoded = match codec::into_vec(value) {
        Ok(bytes) => encode_value(&codec::owned_blob(bytes)),
        Err(value) => encode_value(&value),
    };
    encoded.map_err(encode_failure)
}

/// A value a registered closure may return.
///
/// `Result<T, E>` with `E: Display` sends `Err` to the caller as [`Error::Remote`](crate::Error::Remote);
/// common std types are sent as they are. For your own `Serialize` types, return
/// `Ok::<_, std::convert::Infallible>(value)` or wrap them in [`Reply`]; the `#[callback]`
/// macro needs neither.
///
/// Sealed: daffi implements it for the types above; wrap other types in [`Reply`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be returned from a registered closure",
    note = "return `Result<{Self}, E>` (e.g. `Ok::<_, std::convert::Infallible>(value)`) or `daffi::Reply(value)`"
)]
pub trait IntoReply: sealed::Sealed {
    /// Encodes the value, or turns an error into a failure for the caller.
    #[doc(hidden)]
    fn into_reply(self) -> Outcome;
}

/// Keeps [`IntoReply`] to the types this module implements it for: its method returns
/// daffi's internal outcome, which no other crate can build.
mod sealed {
    pub trait Sealed {}
}

impl<T> sealed::Sealed for Reply<T> {}
impl<T, E> sealed::Sealed for Result<T, E> {}
impl sealed::Sealed for &'static [u8] {}

/// Wraps any `Serialize` value so that a closure can return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reply<T>(pub T);

impl<T: Serialize> IntoReply for Reply<T> {
    fn into_reply(self) -> Outcome {
        encode_reply(self.0)
    }
}

impl<T: Serialize, E: std::fmt::Display> IntoReply for Result<T, E> {
    fn into_reply(self) -> Outcome {
        match self {
            Ok(v) => encode_reply(v),
            Err(e) => Err(CallbackFailure::failed(e)),
        }
    }
}

macro_rules! plain_reply {
    ($($t:ty),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl IntoReply for $t {
            fn into_reply(self) -> Outcome { encode_reply(self) }
        }
    )*};
}
/// Integers and bools: their few bytes written directly (the serializer's bytes), without
/// the serializer.
macro_rules! direct_reply {
    ($encode:path, $wide:ty: $($t:ty),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl IntoReply for $t {
            #[inline]
            #[allow(clippy::unnecessary_cast)]
            fn into_reply(self) -> Outcome { Ok($encode(self as $wide)) }
        }
    )*};
}
direct_reply!(codec::encode_int, i64: i8, i16, i32, i64, isize);
direct_reply!(codec::encode_uint, u64: u8, u16, u32, u64, usize);
direct_reply!(codec::encode_bool, bool: bool);
plain_reply!(
    (),
    char,
    i128,
    u128,
    f32,
    f64,
    String,
    &'static str,
    Bytes,
    Blob
);

/// Static bytes are sent from where they are.
impl IntoReply for &'static [u8] {
    fn into_reply(self) -> Outcome {
        encode_reply(Blob::from_static(self))
    }
}

macro_rules! generic_reply {
    ($($t:ident < $($p:ident),* >),* $(,)?) => {$(
        impl<$($p),*> sealed::Sealed for $t<$($p),*> {}
        impl<$($p: Serialize),*> IntoReply for $t<$($p),*> {
            fn into_reply(self) -> Outcome { encode_reply(self) }
        }
    )*};
}
generic_reply!(
    Vec<T>, VecDeque<T>, Option<T>, Box<T>, BTreeSet<T>, HashSet<T>, BTreeMap<K, V>, HashMap<K, V>
);

macro_rules! tuple_reply {
    ($(($($p:ident),+)),*) => {$(
        impl<$($p),+> sealed::Sealed for ($($p,)+) {}
        impl<$($p: Serialize),+> IntoReply for ($($p,)+) {
            fn into_reply(self) -> Outcome { encode_reply(self) }
        }
    )*};
}
tuple_reply!(
    (A),
    (A, B),
    (A, B, C),
    (A, B, C, D),
    (A, B, C, D, E),
    (A, B, C, D, E, F)
);

/// A closure or function that can be registered with [`Global::register`](crate::Global::register).
///
/// Implemented for `Fn(A1, .., An) -> R` (sync, runs on a thread of the node's own) and for
/// `Fn(A1, .., An) -> impl Future<Output = R>` (async), with up to 8 arguments that are
/// `DeserializeOwned` and `R:` [`IntoReply`]. The `Marker` parameter only tells the two
/// apart; you never name it.
///
/// The compiler names this trait, not [`IntoReply`], when a closure's result does not
/// fit (its sync and async forms leave it unsure which to check), so the advice is here.
#[diagnostic::on_unimplemented(
    message = "this closure cannot be registered as a daffi callback",
    label = "its arguments or its result do not fit `register`",
    note = "a closure may return std types as they are; return your own `Serialize` type as `Ok::<_, std::convert::Infallible>(value)` or `daffi::Reply(value)`, or make it a `#[daffi::callback]` fn",
    note = "its arguments (at most 8) must be `DeserializeOwned + Send + 'static`, and the closure `Send + Sync + 'static`"
)]
pub trait IntoCallback<Marker>: Send + Sync + 'static {
    /// Turns the closure into the form the node runs; `name` appears in argument errors.
    #[doc(hidden)]
    fn into_handler(self, name: &str) -> Handler;
}

/// Marker for synchronous closures.
pub struct SyncFn<Args>(std::marker::PhantomData<Args>);
/// Marker for asynchronous closures.
pub struct AsyncFn<Args>(std::marker::PhantomData<Args>);

macro_rules! closure_callback {
    ($($a:ident),*) => {
        impl<F, R, $($a,)*> IntoCallback<SyncFn<($($a,)*)>> for F
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
            R: IntoReply,
            $($a: Param + Send + 'static,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn into_handler(self, name: &str) -> Handler {
                let name: Box<str> = name.into();
                let types = [$(std::any::type_name::<$a>()),*];
                Handler::Sync(Arc::new(move |payload: Bytes| {
                    let signature = Signature { callback: &name, names: &[], types: &types };
                    let ($($a,)*) = decode_args::<($($a,)*)>(&signature, payload)?;
                    (self)($($a),*).into_reply()
                }))
            }
        }

        impl<F, Fut, R, $($a,)*> IntoCallback<AsyncFn<($($a,)*)>> for F
        where
            F: Fn($($a),*) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoReply,
            $($a: Param + Send + 'static,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn into_handler(self, name: &str) -> Handler {
                let name: Box<str> = name.into();
                let types = [$(std::any::type_name::<$a>()),*];
                let f = Arc::new(self);
                Handler::Async(Arc::new(move |payload: Bytes| -> BoxFuture<Outcome> {
                    let signature = Signature { callback: &name, names: &[], types: &types };
                    let decoded = decode_args::<($($a,)*)>(&signature, payload);
                    let f = f.clone();
                    Box::pin(async move {
                        let ($($a,)*) = decoded?;
                        (f)($($a),*).await.into_reply()
                    })
                }))
            }
        }
    };
}

closure_callback!();
closure_callback!(A1);
closure_callback!(A1, A2);
closure_callback!(A1, A2, A3);
closure_callback!(A1, A2, A3, A4);
closure_callback!(A1, A2, A3, A4, A5);
closure_callback!(A1, A2, A3, A4, A5, A6);
closure_callback!(A1, A2, A3, A4, A5, A6, A7);
closure_callback!(A1, A2, A3, A4, A5, A6, A7, A8);

/// A closure that can be registered with [`Global::register_stream`](crate::Global::register_stream):
/// it takes the call's arguments and returns the items to stream.
///
/// Implemented for `Fn(A1, .., An) -> I` where `I: IntoIterator<Item = T>` (the iterator
/// is advanced on a thread of the node's own, only as the caller grants credit) and for
/// `Fn(A1, .., An) -> S` where `S: futures::Stream<Item = T>` (polled as a task), with up
/// to 8 `DeserializeOwned` arguments and `T: Serialize`.
#[diagnostic::on_unimplemented(
    message = "this closure cannot be registered as a daffi stream callback",
    label = "it must return an `IntoIterator` or a `futures::Stream` of `Serialize` items",
    note = "its arguments (at most 8) must be `DeserializeOwned + Send + 'static`, its iterator or stream `Send + 'static`, and the closure `Send + Sync + 'static`"
)]
pub trait IntoStreamCallback<Marker>: Send + Sync + 'static {
    /// Turns the closure into the form the node runs; `name` appears in argument errors.
    #[doc(hidden)]
    fn into_stream_handler(self, name: &str) -> Handler;
}

/// Marker for closures returning an iterator.
pub struct IterFn<Args>(std::marker::PhantomData<Args>);
/// Marker for closures returning a `Stream`.
pub struct StreamFn<Args>(std::marker::PhantomData<Args>);

macro_rules! stream_callback {
    ($($a:ident),*) => {
        impl<F, I, $($a,)*> IntoStreamCallback<IterFn<($($a,)*)>> for F
        where
            F: Fn($($a),*) -> I + Send + Sync + 'static,
            I: IntoIterator,
            I::IntoIter: Send + 'static,
            I::Item: Serialize + 'static,
            $($a: Param + Send + 'static,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn into_stream_handler(self, name: &str) -> Handler {
                let name: Box<str> = name.into();
                let types = [$(std::any::type_name::<$a>()),*];
                Handler::SyncStream(Arc::new(move |payload: Bytes| {
                    let signature = Signature { callback: &name, names: &[], types: &types };
                    let ($($a,)*) = decode_args::<($($a,)*)>(&signature, payload)?;
                    Ok(iter_items((self)($($a),*)))
                }))
            }
        }

        impl<F, S, $($a,)*> IntoStreamCallback<StreamFn<($($a,)*)>> for F
        where
            F: Fn($($a),*) -> S + Send + Sync + 'static,
            S: futures_core::Stream + Send + 'static,
            S::Item: Serialize + 'static,
            $($a: Param + Send + 'static,)*
        {
            #[allow(non_snake_case, unused_variables)]
            fn into_stream_handler(self, name: &str) -> Handler {
                let name: Box<str> = name.into();
                let types = [$(std::any::type_name::<$a>()),*];
                Handler::AsyncStream(Arc::new(move |payload: Bytes| {
                    let signature = Signature { callback: &name, names: &[], types: &types };
                    let ($($a,)*) = decode_args::<($($a,)*)>(&signature, payload)?;
                    Ok(stream_items((self)($($a),*)))
                }))
            }
        }
    };
}

stream_callback!();
stream_callback!(A1);
stream_callback!(A1, A2);
stream_callback!(A1, A2, A3);
stream_callback!(A1, A2, A3, A4);
stream_callback!(A1, A2, A3, A4, A5);
stream_callback!(A1, A2, A3, A4, A5, A6);
stream_callback!(A1, A2, A3, A4, A5, A6, A7);
stream_callback!(A1, A2, A3, A4, A5, A6, A7, A8);

/// The items of an iterator, encoded as they join a batch.
pub fn iter_items<I>(items: I) -> ItemIter
where
    I: IntoIterator,
    I::IntoIter: Send + 'static,
    I::Item: Serialize + 'static,
{
    ItemIter(Box::new(Made::<_, Values>::new(items.into_iter())))
}

/// The items of a stream, encoded as they join a batch.
pub fn stream_items<S>(items: S) -> ItemStream
where
    S: futures_core::Stream + Send + 'static,
    S::Item: Serialize + 'static,
{
    ItemStream(Box::new(Made::<_, Values>::new(Box::pin(items))))
}

/// A type whose `pub` `&self` methods are callbacks: implemented by `#[callback]` on an
/// `impl` block. Serve an instance with [`Global::register_instance`](crate::Global::register_instance).
pub trait CallbackGroup: Send + Sync + 'static {
    /// The instance's methods, each bound to it. Generated; not for hand implementation.
    #[doc(hidden)]
    fn __daffi_methods(this: Arc<Self>) -> Vec<(&'static str, Handler)>;
}

/// What `#[callback]` submits to `inventory` for each function it marks.
#[doc(hidden)]
pub struct StaticCallback {
    /// The exposed name.
    pub name: &'static str,
    /// The shim that decodes, calls, and encodes.
    pub handler: StaticHandler,
}

/// The shim of a `#[callback]` function.
#[doc(hidden)]
pub enum StaticHandler {
    /// A sync function.
    Sync(fn(Bytes) -> Outcome),
    /// An async function.
    Async(fn(Bytes) -> BoxFuture<Outcome>),
    /// A function returning an iterator of items.
    SyncStream(fn(Bytes) -> Result<ItemIter, CallbackFailure>),
    /// A function returning a stream of items.
    AsyncStream(fn(Bytes) -> Result<ItemStream, CallbackFailure>),
}

inventory::collect!(StaticCallback);

impl StaticCallback {
    pub(crate) fn handler(&self) -> Handler {
        match self.handler {
            StaticHandler::Sync(f) => Handler::Sync(Arc::new(f)),
            StaticHandler::Async(f) => Handler::Async(Arc::new(f)),
            StaticHandler::SyncStream(f) => Handler::SyncStream(Arc::new(f)),
            StaticHandler::AsyncStream(f) => Handler::AsyncStream(Arc::new(f)),
        }
    }
}

/// Every `#[callback]` function linked into this program, by exposed name.
pub(crate) fn static_callbacks() -> HashMap<String, Handler> {
    let mut table = HashMap::new();
    for cb in inventory::iter::<StaticCallback> {
        if table.insert(cb.name.to_string(), cb.handler()).is_some() {
            tracing::warn!(
                callback = cb.name,
                "two #[callback] items share this name; the last one linked wins"
            );
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_encoded_as_the_serializer_encodes_it() {
        let fast = encode_reply(()).expect("encodes").to_bytes();
        assert_eq!(fast, encode_value(&()).expect("encodes").to_bytes());
        assert_eq!(fast, rmp_serde::to_vec(&()).expect("encodes"));
        // `Ok(())` of a fallible callback takes the same path; other values do not.
        assert_eq!(
            Ok::<(), String>(())
                .into_reply()
                .expect("encodes")
                .to_bytes(),
            fast
        );
        let pair = encode_reply(((), 1u8)).expect("encodes").to_bytes();
        assert_eq!(pair, rmp_serde::to_vec(&((), 1u8)).expect("encodes"));
    }
}
