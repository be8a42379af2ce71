//! `& STREAM`: the items of a Python iterable, streamed to a callback's stream of
//! arguments (`daffi::Incoming`). Each is taken from the iterable on a thread of
//! [`workers`] (the GIL held for that `next` only) when the core asks for it: only as
//! far ahead as the callee has read.

use std::sync::{Arc, Mutex};

use futures_core::Stream;
use pyo3::prelude::*;
use pyo3::types::PyIterator;

use crate::values;
use crate::workers;

/// What ended a feed early: the iterable raised, or an item could not be sent. Raised
/// in the caller, in place of the call's result.
#[derive(Clone, Default)]
pub struct Failure(Arc<Mutex<Option<PyErr>>>);

impl Failure {
    fn set(&self, error: PyErr) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// The exception that ended the feed, if one did.
    pub fn take(&self) -> Option<PyErr> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The items of `iterator`, as MessagePack values, in order. An exception ends them
/// (the callee sees the end) and is kept in the returned [`Failure`].
pub fn items(
    iterator: Bound<'_, PyIterator>,
) -> (impl Stream<Item = rmpv::Value> + Send + 'static, Failure) {
    let failure = Failure::default();
    let state = (Arc::new(iterator.unbind()), failure.clone());
    let items = futures_util::stream::unfold(state, |(iterator, failure)| async move {
        let source = iterator.clone();
        let next = workers::run(move |py, tx| {
            let _ = tx.send(next_value(source.bind(py)));
        })
        .await?;
        match next {
            Some(Ok(value)) => Some((value, (iterator, failure))),
            Some(Err(error)) => {
                failure.set(error);
                None
            }
            None => None,
        }
    });
    (items, failure)
}

/// The next item of `iterator` as a value; None at its end.
fn next_value(iterator: &Bound<'_, PyIterator>) -> Option<PyResult<rmpv::Value>> {
    let item = iterator.clone().next()?;
    Some(item.and_then(|item| values::to_value(&item)))
}
