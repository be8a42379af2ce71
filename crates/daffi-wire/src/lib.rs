//! Internal to daffi: no stability promise; use [`daffi`](https://docs.rs/daffi).
//!
//! The frame format of daffi's wire protocol and the framed I/O its connections run on:
//! frames and their routing header, outgoing payloads, reading frames off a byte
//! stream, and the sender and writer task of a connection. `docs/PROTOCOL.md` of the
//! repository describes the bytes.
#![warn(missing_docs)]

pub mod batch;
pub mod channel;
pub mod frame;
pub mod outgoing;
pub mod payload;
pub mod reader;

/// Default limit on one frame (prefix excluded): 128 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 128 * 1024 * 1024;
