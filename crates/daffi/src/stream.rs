//! [`CallStream`]: the items a stream callback sends, as the caller reads them.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;

use crate::blocking;
use crate::call::decode_result;
use crate::callback::ItemStream;
use crate::error::{Error, Result};
use crate::mesh::{Arrived, Credit, Feed, OpenStream, ReplyPayload, StreamControl};

/// The items of a stream call (`g.call(name).stream::<T>()`), in order, each decoded as
/// `T`. Two faces, one per kind of code:
///
/// - async: a [`futures::Stream`](futures_core::Stream)`<Item = Result<T>>` (and
///   `Unpin`), read with `StreamExt::next`;
/// - sync: [`IntoIterator`]`<Item = Result<T>>`, read with `for item in stream`, which
///   blocks between items.
///
/// The callee produces only as far ahead as the caller reads (4,096 items or 2 MiB of
/// them, whichever comes first): a slow reader slows the producer. Dropping the stream stops the producer. An `Err`
/// item ends the stream: the callee's error, the callee gone (`PeerDisconnected`), or
/// the call's `timeout` passed while waiting for one item.
///
/// ```no_run
/// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
/// let mut total = 0;
/// for n in g.call("numbers").args((1000,)).stream::<i64>()? {
///     total += n?;
/// }
/// # Ok(()) }
/// ```
#[must_use = "a stream does nothing unless read; dropping it cancels the call"]
pub struct CallStream<T> {
    callback: Arc<str>,
    open: OpenStream,
    /// What the producer may still send without more credit, as of the items read.
    credit: Credit,
    /// The rest of a batch that arrived, to read before the next.
    batch: crate::mesh::BatchItems,
    timeout: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    ended: bool,
    runtime: Handle,
    /// The arguments this call streams to the callee (both ways at once), if any.
    feeding: Option<Feeding>,
    _item: PhantomData<fn() -> T>,
}

impl<T> CallStream<T> {
    pub(crate) fn new(
        callback: Arc<str>,
        open: OpenStream,
        timeout: Option<Duration>,
        runtime: Handle,
    ) -> Self {
        CallStream {
            callback,
            open,
            credit: Credit::WINDOW,
            batch: crate::mesh::BatchItems::default(),
            timeout,
            timer: None,
            ended: false,
            runtime,
            feeding: None,
            _item: PhantomData,
        }
    }

    /// Keeps `feeding` going while the stream is read.
    pub(crate) fn feeding(mut self, feeding: Feeding) -> Self {
        self.feeding = Some(feeding);
        self
    }

    /// The node producing the items.
    pub fn process(&self) -> &str {
        &self.open.target
    }

    /// Counts an item of `len` bytes read, and tops the credit up once half of it is
    /// used (one grant for many items). The mesh checked the producer's credit as the
    /// item arrived.
    fn read(&mut self, len: usize) {
        self.credit.take(len);
        if let Some(grant) = self.credit.top_up() {
            self.open.control.grant(grant);
            self.credit.add(grant);
        }
    }

    /// Ends the stream here, telling the callee if it may still be producing.
    fn finish(&mut self, cancel: bool) {
        self.ended = true;
        self.timer = None;
        self.feeding = None;
        if cancel {
            self.open.control.cancel();
        }
    }

    /// Whether the call's timeout passed while waiting for this item.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.timeout else {
            return false;
        };
        let timer = self.timer.get_or_insert_with(|| {
            let _runtime = Handle::try_current().is_err().then(|| self.runtime.enter());
            Box::pin(tokio::time::sleep(timeout))
        });
        timer.as_mut().poll(cx).is_ready()
    }
}

impl<T: DeserializeOwned> CallStream<T> {
    /// Counts `item` read and decodes it.
    fn decode(&mut self, item: ReplyPayload) -> Result<T> {
        self.read(item.bytes.len());
        decode_result(&self.callback, item)
    }
}

impl<T: DeserializeOwned> Stream for CallStream<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(item) = this.batch.next() {
            return Poll::Ready(Some(this.decode(item.into())));
        }
        match this.open.items.poll_recv(cx) {
            Poll::Ready(Some(Ok(arrived))) => {
                this.timer = None;
                let item = match arrived {
                    Arrived::One(item) => item,
                    Arrived::Batch(mut items) => {
                        // A batch holds two items at least.
                        let first = items.next().unwrap_or_default();
                        this.batch = items;
                        first.into()
                    }
                };
                Poll::Ready(Some(this.decode(item)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(false);
                Poll::Ready(None)
            }
            Poll::Pending if this.timed_out(cx) => {
                let after = this.timeout.unwrap_or_default();
                this.finish(true);
                Poll::Ready(Some(Err(Error::timeout(this.callback.to_string(), after))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T> Drop for CallStream<T> {
    fn drop(&mut self) {
        if !self.ended {
            self.open.control.cancel();
        }
    }
}

impl<T> std::fmt::Debug for CallStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("callback", &self.callback)
            .field("process", &self.open.target)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> IntoIterator for CallStream<T> {
    type Item = Result<T>;
    type IntoIter = BlockingItems<T>;

    fn into_iter(self) -> BlockingItems<T> {
        BlockingItems(self)
    }
}

/// A [`CallStream`] read from sync code: each `next` blocks until the next item. From
/// a thread that drives a current-thread runtime, the first item is
/// [`Error::BlockingInAsync`] (use the `Stream` face there).
#[derive(Debug)]
pub struct BlockingItems<T>(CallStream<T>);

impl<T: DeserializeOwned> Iterator for BlockingItems<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        // The rest of a batch is at hand: no wait, no runtime.
        if let Some(item) = self.0.batch.next().filter(|_| !self.0.ended) {
            return Some(self.0.decode(item.into()));
        }
        let runtime = self.0.runtime.clone();
        let next = std::future::poll_fn(|cx| Pin::new(&mut self.0).poll_next(cx));
        match blocking::wait(&runtime, "stream", next) {
            Ok(item) => item,
            Err(e) => {
                self.0.finish(true);
                Some(Err(e))
            }
        }
    }
}

/// The task feeding a call's arguments to its callee (`stream_from`), polled on the
/// node's runtime as the callee grants credit. Dropped, it stops feeding, and (unless the
/// call is over) tells the callee that the caller gave up.
pub(crate) struct Feeding {
    task: tokio::task::AbortHandle,
    /// Cancels the call at the callee; `None` once there is nothing to tell it.
    cancel: Option<Box<dyn StreamControl>>,
}

impl Feeding {
    /// Starts sending `items` through `feed`. `cancels`: dropping this tells the callee
    /// (a call's stream of results tells it itself).
    pub(crate) fn start(runtime: &Handle, feed: Feed, items: ItemStream, cancels: bool) -> Self {
        let task = runtime.spawn(crate::executor::send_items(Ok(items), feed.items));
        Feeding {
            task: task.abort_handle(),
            cancel: cancels.then_some(feed.control),
        }
    }

    /// The call is over: stop feeding, with nothing to tell the callee.
    pub(crate) fn finish(mut self) {
        self.cancel = None;
    }
}

impl Drop for Feeding {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(control) = self.cancel.take() {
            control.cancel();
        }
    }
}
