//! `daffi._daffi`: the Rust core of the Python package `daffi` (distribution
//! `daffi-rs`). The Python layer in `python/daffi/` gives the Python daffi's API; this
//! module gives it a node (`node.rs`), calls that complete off the GIL (`pending.rs`),
//! the threads of sync callbacks (`workers.rs`),
//! Python callbacks (`callee.rs`), generators served as stream callbacks
//! (`generators.rs`), the items of a stream call (`streams.rs`), a Python iterable
//! streamed to a callback (`feed.rs`), and the conversion of Python values to MessagePack
//! (`values.rs`).
#![warn(missing_docs)]

mod callee;
mod errors;
mod feed;
mod generators;
mod node;
mod pending;
mod streams;
mod values;
mod workers;

use pyo3::prelude::*;

/// The module `daffi._daffi`.
#[pymodule]
fn _daffi(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<node::Node>()?;
    m.add_class::<pending::Pending>()?;
    m.add_class::<node::Schedule>()?;
    m.add_class::<callee::Done>()?;
    m.add_class::<streams::CallStream>()?;
    m.add("PICKLE_EXT", values::PICKLE_EXT)?;
    Ok(())
}
