//! The wire protocol: frames, control messages, and the framed reader and batching writer.
//! See `docs/PROTOCOL.md`.

pub mod frame;
pub mod io;
pub mod message;
pub mod payload;

pub use frame::{Frame, FrameError, Header, Kind};
pub use payload::Payload;

/// First bytes a node sends on a new connection: magic, then the protocol version.
pub const MAGIC: [u8; 4] = *b"DAFI";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Default limit on one frame (prefix excluded): 128 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 128 * 1024 * 1024;
/// Largest `Hello` frame (prefix excluded) a controller accepts, whatever its frame
/// limit: a peer that has not authenticated cannot make it buffer more. A node whose
/// callback list would not fit sends it in an `Announce` right after `Welcome`.
pub const MAX_HELLO_SIZE: usize = 1024 * 1024;
/// Longest process name the header can carry.
pub const MAX_PROCESS_NAME: usize = u8::MAX as usize;
/// Longest callback name the header can carry.
pub const MAX_CALLBACK_NAME: usize = u16::MAX as usize;
