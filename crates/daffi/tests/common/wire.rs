//! What a raw client in these tests sends and reads: frames through `daffi-wire`, and
//! the control payloads it needs written from `docs/PROTOCOL.md`, as a client in
//! another language would write them (daffi keeps its own private).

use std::io::Read;
use std::net::TcpStream;

use daffi_wire::frame::LEN_PREFIX;
use daffi_wire::{preamble, Frame, Header, Kind, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::WAIT;

/// Largest `Hello` frame a controller reads: 4 KiB after the length prefix.
pub const MAX_HELLO_SIZE: usize = 4 * 1024;

/// The most a node's callback names may take with frames of up to `max_frame_size`:
/// 1 MiB, and at most the frame limit minus 512 bytes.
pub fn callback_list_limit(max_frame_size: usize) -> usize {
    (1024 * 1024).min(max_frame_size.saturating_sub(512))
}

/// `Hello`: who the node is.
#[derive(Serialize)]
pub struct Hello<'a> {
    pub process_name: &'a str,
    pub auth_token: Option<&'a str>,
    pub max_frame_size: u64,
}

/// `Announce`: the callbacks a node serves from now on.
#[derive(Serialize)]
pub struct Announce<S: AsRef<str> + Serialize> {
    pub callbacks: Vec<S>,
}

/// Why the controller refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseCode {
    DuplicateName,
    InvalidName,
    Version,
    Auth,
    BadHello,
    TlsRequired,
    CallbackListTooLarge,
}

/// `Refused`: the handshake failed.
#[derive(Debug, Deserialize)]
pub struct Refused {
    pub code: RefuseCode,
    pub message: String,
}

/// A control payload: MessagePack, structs as maps.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("encodable")
}

/// Decodes a control payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> T {
    rmp_serde::from_slice(payload).expect("a valid payload")
}

/// A control frame (no routing fields) carrying `payload`, as bytes.
pub fn control_frame<T: Serialize>(kind: Kind, payload: &T) -> Vec<u8> {
    let body = encode(payload);
    let mut frame = Header::control(kind).encode(body.len()).to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// What a node sends first: the preamble, a `Hello` and the `Announce` of `callbacks`
/// behind it.
pub fn opening(name: &str, token: Option<&str>, callbacks: &[&str]) -> Vec<u8> {
    let hello = Hello {
        process_name: name,
        auth_token: token,
        max_frame_size: 0,
    };
    let mut bytes = preamble(PROTOCOL_VERSION).to_vec();
    bytes.extend(control_frame(Kind::Hello, &hello));
    bytes.extend(control_frame(
        Kind::Announce,
        &Announce {
            callbacks: callbacks.to_vec(),
        },
    ));
    bytes
}

/// Reads one frame (waiting up to [`WAIT`]).
pub fn read_frame(stream: &mut TcpStream) -> Frame {
    stream.set_nonblocking(false).expect("blocking");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    read_frame_from(stream)
}

/// Reads one frame from a stream whose read timeout is already set.
pub fn read_frame_from(stream: &mut impl Read) -> Frame {
    let mut len = [0u8; LEN_PREFIX];
    stream.read_exact(&mut len).expect("a frame");
    let mut raw = len.to_vec();
    raw.resize(LEN_PREFIX + u32::from_be_bytes(len) as usize, 0);
    stream
        .read_exact(&mut raw[LEN_PREFIX..])
        .expect("the whole frame");
    Frame::parse(raw.into()).expect("a valid frame")
}

/// A `Request` frame with call id `call_id`, written by hand.
pub fn request(
    src: &str,
    dst: &str,
    call_id: u64,
    callback: &str,
    args: &impl Serialize,
) -> Vec<u8> {
    let body = encode(args);
    let header = Header {
        kind: Kind::Request,
        flags: 0,
        call_id,
        timeout_ms: 0,
        src,
        dst,
        name: callback,
    };
    let mut out = header.encode(body.len()).to_vec();
    out.extend_from_slice(&body);
    out
}

/// A raw node connected by hand to the controller at `path`, serving `callbacks`
/// (handshake done, the `Welcome` read).
pub fn raw_unix_node(
    path: &std::path::Path,
    name: &str,
    callbacks: &[&str],
) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(path).expect("connect");
    stream
        .write_all(&opening(name, None, callbacks))
        .expect("handshake");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let welcome = read_frame_from(&mut stream);
    assert_eq!(welcome.kind(), Kind::Welcome);
    stream
}

/// A hand-made batch request (docs/PROTOCOL.md, "Batches of NO_RETURN calls") with
/// `call_id` `count` and `flags`, from `src` to `dst`, carrying `payload`.
pub fn batch_request(
    src: &str,
    dst: &str,
    name: &str,
    flags: u8,
    count: u64,
    payload: &[u8],
) -> Vec<u8> {
    let header = Header {
        kind: Kind::Request,
        flags,
        call_id: count,
        timeout_ms: 0,
        src,
        dst,
        name,
    };
    let mut out = header.encode(payload.len()).to_vec();
    out.extend_from_slice(payload);
    out
}

/// The batch payload of `calls`: each a `u32` length and its bytes.
pub fn batch_payload(calls: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for call in calls {
        out.extend_from_slice(&(call.len() as u32).to_be_bytes());
        out.extend_from_slice(call);
    }
    out
}

/// The replies a `Reply` frame carries, split as docs/PROTOCOL.md ("Batches of
/// replies") says: (call id, flags, payload) each; a lone reply is one.
pub fn replies_of(frame: &Frame) -> Vec<(u64, u8, Vec<u8>)> {
    use daffi_wire::frame::{FLAG_ERROR, FLAG_REPLY_BATCH};
    let payload = frame.payload();
    if frame.flags() & FLAG_REPLY_BATCH == 0 {
        return vec![(frame.call_id(), frame.flags(), payload.to_vec())];
    }
    assert_eq!(frame.flags(), FLAG_REPLY_BATCH, "BATCH alone");
    let mut replies = Vec::new();
    let mut rest = &payload[..];
    while !rest.is_empty() {
        let id = u64::from_be_bytes(rest[..8].try_into().expect("an id"));
        let flags = rest[8];
        assert!(flags & !FLAG_ERROR == 0, "an item's flags: {flags}");
        let len = u32::from_be_bytes(rest[9..13].try_into().expect("a length")) as usize;
        replies.push((id, flags, rest[13..13 + len].to_vec()));
        rest = &rest[13 + len..];
    }
    assert_eq!(replies.len() as u64, frame.call_id(), "call_id counts them");
    assert!(replies.len() >= 2, "a batch holds two replies or more");
    replies
}
