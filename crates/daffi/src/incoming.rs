//! [`Incoming`]: the arguments a caller streams to a callback (`.stream_from(..)`), as
//! the callback reads them.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use serde::de::{self, DeserializeOwned, MapAccess, SeqAccess};
use tokio::runtime::Handle;

use crate::callback::{CallbackFailure, Param};
use crate::error::Result;
use crate::mesh::OpenStream;
use crate::protocol::message::RemoteErrorKind;
use crate::stream::{BlockingItems, CallStream};

/// The items a caller streams to this callback with
/// [`Call::stream_from`](crate::Call::stream_from), in order, each decoded as `T`. A
/// callback parameter, in any position; the caller's `.args(..)` carries the others, in
/// order. The same two faces as [`CallStream`]:
///
/// - async callbacks: a [`futures::Stream`](futures_core::Stream)`<Item = Result<T>>`
///   (and `Unpin`), read with `StreamExt::next`;
/// - sync callbacks: [`IntoIterator`]`<Item = Result<T>>`, read with
///   `for item in incoming`, which blocks between items.
///
/// The caller sends only as far ahead as the callback reads (4,096 items or 2 MiB of
/// them, whichever comes first): a slow callback slows the caller's feeding. Returning (or dropping it) before the end stops the
/// caller's feeding. An `Err` item ends it: the caller gave up on the call
/// ([`Error::Cancelled`](crate::Error::Cancelled)), or left
/// ([`Error::PeerDisconnected`](crate::Error::PeerDisconnected)).
///
/// ```no_run
/// #[daffi::callback]
/// fn sum(scale: i64, numbers: daffi::Incoming<i64>) -> daffi::Result<i64> {
///     let mut total = 0;
///     for n in numbers {
///         total += n? * scale;
///     }
///     Ok(total)
/// }
/// ```
pub struct Incoming<T>(CallStream<T>);

impl<T> Incoming<T> {
    /// The node feeding the items (the caller).
    pub fn caller(&self) -> &str {
        self.0.process()
    }
}

impl<T: DeserializeOwned> Stream for Incoming<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        Pin::new(&mut self.0).poll_next(cx)
    }
}

impl<T: DeserializeOwned> IntoIterator for Incoming<T> {
    type Item = Result<T>;
    type IntoIter = BlockingItems<T>;

    fn into_iter(self) -> BlockingItems<T> {
        self.0.into_iter()
    }
}

impl<T> std::fmt::Debug for Incoming<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Incoming").field(&self.0).finish()
    }
}

impl<T> Param for Incoming<T> {
    const SENT: bool = false;

    fn next<'de, S: SeqAccess<'de>>(_: &mut S) -> Result<Option<Self>, S::Error> {
        take().map(Some)
    }

    fn value<'de, M: MapAccess<'de>>(_: &mut M) -> Result<Self, M::Error> {
        Err(de::Error::custom(
            "the stream of arguments is fed with `.stream_from(..)`, not named among them",
        ))
    }

    fn unnamed<E: de::Error>() -> Option<Result<Self, E>> {
        Some(take())
    }
}

/// The arguments stream a request offers its callback, until the callback takes it.
/// One not taken is cancelled when dropped: the caller stops feeding it.
pub(crate) struct Offer {
    callback: Arc<str>,
    open: Option<OpenStream>,
    runtime: Handle,
}

impl Offer {
    /// The stream `open` of a request for `callback`, read on the current runtime;
    /// `None` outside one. Boxed: requests without one carry a pointer's worth.
    pub(crate) fn new(callback: &str, open: OpenStream) -> Option<Box<Offer>> {
        let runtime = Handle::try_current().ok()?;
        Some(Box::new(Offer {
            callback: Arc::from(callback),
            open: Some(open),
            runtime,
        }))
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            open.control.cancel();
        }
    }
}

thread_local! {
    /// The offer of the request whose callback starts on this thread now.
    static OFFERED: RefCell<Option<Box<Offer>>> = const { RefCell::new(None) };
    /// Whether `OFFERED` holds one: what every call's decoding reads, a plain flag (no
    /// destructor to register, so one load).
    static IS_OFFERED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `start` (a callback's shim: it decodes the arguments, then runs or returns the
/// callback's future) with `offer` as the `Incoming` its parameters may take.
pub(crate) fn offering<R>(offer: Option<Box<Offer>>, start: impl FnOnce() -> R) -> R {
    if offer.is_none() {
        return start();
    }
    /// Withdraws the offer however `start` ends (a panic included).
    struct Withdraw;
    impl Drop for Withdraw {
        fn drop(&mut self) {
            IS_OFFERED.set(false);
            let _ = OFFERED.try_with(|o| o.borrow_mut().take());
        }
    }
    OFFERED.with(|o| *o.borrow_mut() = offer);
    IS_OFFERED.set(true);
    let _withdraw = Withdraw;
    start()
}

/// Whether a stream of arguments is offered on this thread now.
pub(crate) fn is_offered() -> bool {
    IS_OFFERED.get()
}

/// Takes the offered stream as an `Incoming<T>`.
fn take<T, E: de::Error>() -> Result<Incoming<T>, E> {
    IS_OFFERED.set(false);
    let offered = OFFERED
        .with(|o| o.borrow_mut().take())
        .and_then(|mut offer| {
            let open = offer.open.take()?;
            Some((offer.callback.clone(), open, offer.runtime.clone()))
        });
    let Some((callback, open, runtime)) = offered else {
        return Err(de::Error::custom(
            "no stream of arguments left for this `Incoming` (a callback takes one)",
        ));
    };
    Ok(Incoming(CallStream::new(callback, open, None, runtime)))
}

/// Why a request and its callback do not fit: a stream of arguments offered to a
/// callback without an `Incoming` parameter (`wanted` false), or none to one with it.
pub(crate) fn mismatch(wanted: bool) -> CallbackFailure {
    let message = if wanted {
        "with a stream of arguments (an `Incoming` parameter): feed it with `.stream_from(..)`"
    } else {
        "without a stream of arguments (no `Incoming` parameter): drop `.stream_from(..)`"
    };
    CallbackFailure {
        kind: RemoteErrorKind::NotAStream,
        message: message.to_string(),
    }
}
