//! Internal to daffi: no stability promise; use [`daffi`](https://docs.rs/daffi).
//!
//! The frame format of daffi's wire protocol and the framed I/O its connections run on:
//! frames and their routing header, outgoing payloads, reading frames off a byte
//! stream, the sender and writer task of a connection, and the loop that reads it. `docs/PROTOCOL.md` of the
//! repository describes the bytes.
#![warn(missing_docs)]

pub mod batch;
pub mod channel;
pub mod connection;
pub mod frame;
mod memory;
pub mod outgoing;
pub mod payload;
pub mod reader;
pub mod small;
mod when_woken;

pub use channel::{frame_channel, Batch, Cork, FrameSender, HeldFrames, Push, QueueLimits};
pub use connection::{read_frames, Ended, FrameHandler, Handled, WriterTask};
pub use frame::{Frame, FrameError, Header, Kind};
pub use memory::{huge_page_buffer, lend_large_buffers, room_suits};
pub use outgoing::{Growing, Outgoing};
pub use payload::Payload;
pub use reader::{take_idle_large_buffer, FrameReader, KeptBuffer, ReadError};

/// First bytes a node sends on a new connection: magic, then the protocol version.
pub const MAGIC: [u8; 4] = *b"DAFI";
/// The protocol version this build speaks. Version 2: the callback list left the `Hello`
/// for an `Announce` sent right behind it, and `Welcome` comes in pages. Version 3: every
/// node keeps a replica of the scheduled tasks (`Schedule` frames, tasks and the
/// controller's instance in `Welcome`) and gives them back to a restarted controller
/// (`Restore`). Version 4: NO_RETURN calls to one callback travel in batch requests
/// ([`frame::FLAG_REQUEST_BATCH`]), which a version 3 node would misread. Version 5:
/// replies to one caller travel in batch replies ([`frame::FLAG_REPLY_BATCH`]), which a
/// version 4 node would take for one reply to a call it never made.
pub const PROTOCOL_VERSION: u16 = 5;
/// Bytes of the preamble: [`MAGIC`] and [`PROTOCOL_VERSION`].
pub const PREAMBLE_LEN: usize = MAGIC.len() + 2;
/// Default limit on one frame (prefix excluded): 128 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 128 * 1024 * 1024;

/// The preamble of a connection that speaks `version`.
pub fn preamble(version: u16) -> [u8; PREAMBLE_LEN] {
    let mut bytes = [0; PREAMBLE_LEN];
    bytes[..MAGIC.len()].copy_from_slice(&MAGIC);
    bytes[MAGIC.len()..].copy_from_slice(&version.to_be_bytes());
    bytes
}
