//! The floors: the least a brokered call can cost with daffi's framing.
//!
//! Three processes, as in daffi: a client, a relay and a server (client -> relay ->
//! server -> relay -> client). They use daffi's own frame code (`Header::encode`,
//! `Frame::parse`) and nothing else: no handshake beyond one `Hello` frame naming the
//! connection, no membership, no pending-call table, no argument encoding. The relay
//! routes each frame by its `dst` and forwards its bytes untouched.
//!
//! Two engines, each in two variants (batched and direct writes):
//! - [`on_tokio`]: tasks on a 2-worker tokio runtime, as daffi runs;
//! - [`on_threads`]: blocking std threads and sockets, the least machinery there is;
//!   and a fifth floor, its direct variant whose client polls for a reply for a moment
//!   before it blocks ([`spin_before_blocking`]), as daffi's sync callers do.
//!
//! Every daffi figure is compared with the best of the floors measured in the same run.

pub mod on_nats;
mod on_threads;
mod on_tokio;
mod write_loop;

use bytes::Bytes;
use daffi_wire::frame::FLAG_NO_REPLY;
use daffi_wire::{Frame, Header, Kind};

use super::ops;
use super::proc::{Endpoint, Result};

/// Payloads up to this size are copied next to their header for one write (as daffi's
/// writer does); larger ones are written from their own memory.
const COPY_THRESHOLD: usize = 16 * 1024;
/// The callback name the client asks for the one-way count with.
const COUNT: &str = "count";
/// The arguments of a small call, `[1, 1]` in MessagePack, as daffi sends them.
const SMALL_ARGS: &[u8] = &[0x92, 0x01, 0x01];
/// The result of a small call, `2` in MessagePack.
const SMALL_RESULT: &[u8] = &[0x02];

/// Which floor: the engine and how it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Tasks on a tokio runtime.
    Tokio,
    /// Blocking std threads.
    Threads,
}

impl Engine {
    /// The engine's name, for labels.
    pub fn label(self) -> &'static str {
        match self {
            Engine::Tokio => "tokio",
            Engine::Threads => "threads",
        }
    }
}

/// The `Hello` frame that names a connection to the relay.
fn hello(name: &str) -> Bytes {
    Header {
        src: name,
        ..Header::control(Kind::Hello)
    }
    .encode(0)
}

/// The relay's answer to a `Hello`.
fn welcome() -> Bytes {
    Header::control(Kind::Welcome).encode(0)
}

/// The name a connection's first frame gives it.
fn name_of_hello(first: Option<Frame>) -> Result<String> {
    match first {
        Some(f) if f.kind() == Kind::Hello && !f.src().is_empty() => Ok(f.src().to_string()),
        Some(_) => Err("the first frame must be a Hello naming the connection".into()),
        None => Err("closed before its Hello".into()),
    }
}

/// Whether the relay answered a `Hello`.
fn check_welcome(answer: Option<Frame>) -> Result<()> {
    match answer {
        Some(f) if f.kind() == Kind::Welcome => Ok(()),
        _ => Err("the relay did not welcome us".into()),
    }
}

/// The server's whole logic: answers every request at once, counts one-way ones.
#[derive(Default)]
struct Answers {
    one_way: u64,
}

impl Answers {
    /// The reply's payload to `frame`; `None` when it gets no reply.
    fn to(&mut self, frame: &Frame) -> Option<Bytes> {
        if frame.kind() != Kind::Request {
            return None;
        }
        if frame.flags() & FLAG_NO_REPLY != 0 {
            self.one_way += 1;
            return None;
        }
        Some(match frame.name() {
            COUNT => Bytes::from(std::mem::take(&mut self.one_way).to_be_bytes().to_vec()),
            ops::LEN => msgpack_u64(frame.payload().len() as u64),
            _ => Bytes::from_static(SMALL_RESULT),
        })
    }
}

/// The header of the reply to `frame`, sent by `name`.
fn reply_header<'a>(frame: &'a Frame, name: &'a str) -> Header<'a> {
    Header {
        kind: Kind::Reply,
        flags: 0,
        call_id: frame.call_id(),
        timeout_ms: 0,
        src: name,
        dst: frame.src(),
        name: "",
    }
}

/// The header of a request from `src` to `dst`.
fn request_header<'a>(
    call_id: u64,
    src: &'a str,
    dst: &'a str,
    callback: &'a str,
    no_reply: bool,
) -> Header<'a> {
    Header {
        kind: Kind::Request,
        flags: if no_reply { FLAG_NO_REPLY } else { 0 },
        call_id,
        timeout_ms: 0,
        src,
        dst,
        name: callback,
    }
}

/// The count in the server's reply to [`COUNT`].
fn count_in(reply: &Frame) -> Result<u64> {
    let payload = reply.payload();
    <[u8; 8]>::try_from(&payload[..])
        .map(u64::from_be_bytes)
        .map_err(|_| "bad count reply".into())
}

/// Checks the server's reply to [`ops::LEN`].
fn check_len_reply(reply: &Frame) -> Result<()> {
    if reply.payload().len() != 9 {
        return Err("bad length reply".into());
    }
    Ok(())
}

/// A `u64` in MessagePack (always the 9-byte form).
fn msgpack_u64(v: u64) -> Bytes {
    let mut b = Vec::with_capacity(9);
    b.push(0xcf);
    b.extend_from_slice(&v.to_be_bytes());
    Bytes::from(b)
}

/// The relay process of `engine`: prints `ready <endpoint>`, routes until stdin closes.
pub fn relay(
    engine: Engine,
    listen: &Endpoint,
    batched: bool,
    max_frame_size: usize,
) -> Result<()> {
    match engine {
        Engine::Tokio => on_tokio::relay(listen, batched, max_frame_size),
        Engine::Threads => on_threads::relay(listen, batched, max_frame_size),
    }
}

/// The server process of `engine`: answers every request at once, counts one-way ones.
pub fn server(
    engine: Engine,
    connect: &Endpoint,
    name: &str,
    batched: bool,
    max_frame_size: usize,
) -> Result<()> {
    match engine {
        Engine::Tokio => on_tokio::server(connect, name, batched, max_frame_size),
        Engine::Threads => on_threads::server(connect, name, batched, max_frame_size),
    }
}

/// The client process of `engine`: runs the parent's commands against the server.
/// Lets the threads client poll for a reply for up to `limit` before it blocks, as
/// daffi's sync callers do for a lone call (`sync_spin`): the floor for them. Set once,
/// before the client starts; zero (the default) blocks at once.
pub fn spin_before_blocking(limit: std::time::Duration) {
    on_threads::spin_before_blocking(limit);
}

pub fn client(
    engine: Engine,
    connect: &Endpoint,
    names: (&str, &str),
    batched: bool,
    max_frame_size: usize,
) -> Result<()> {
    let (name, server) = names;
    match engine {
        Engine::Tokio => on_tokio::client(connect, name, server, batched, max_frame_size),
        Engine::Threads => on_threads::client(connect, name, server, batched, max_frame_size),
    }
}
