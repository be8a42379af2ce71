//! The commands a client child (a daffi caller or a floor client) runs for the parent,
//! one JSON line each way, and what it answers.

use serde::{Deserialize, Serialize};

use super::report::Percentiles;

/// The callback a small call goes to: two integers in, their sum out.
pub const ADD: &str = "bench_add";
/// Returns the length of its `bytes` argument.
pub const LEN: &str = "bench_len";
/// Counts fire-and-forget calls.
pub const SINK: &str = "bench_sink";
/// Waits until the sink counted `n` calls (or gives up), returns how many it counted.
pub const SINK_WAIT: &str = "bench_sink_wait";
/// Streams the integers `0..n` (a sync iterator).
pub const STREAM_ITEMS: &str = "bench_stream_items";
/// Streams `n` chunks of `bytes` bytes each (a sync iterator).
pub const STREAM_CHUNKS: &str = "bench_stream_chunks";
/// Prefix of the callbacks that return their byte-string argument (one per [`ByteKind`]).
const ECHO: &str = "bench_echo_";
/// Prefix of the callbacks that return the prepared byte string (one per [`ByteKind`]).
const RESULT: &str = "bench_result_";
/// Prepares the byte string the result callbacks return: `n` bytes, once per size.
pub const PREPARE: &str = "bench_prepare";

/// The name of the callback a callee registers last, so that a caller that sees it knows
/// every other callback of that callee.
pub fn ready_marker(callee: &str) -> String {
    format!("bench_ready_{callee}")
}

/// One measurement to make.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Small calls one at a time: `warmup` unmeasured, then `calls` measured.
    Latency {
        /// Measured calls.
        calls: usize,
        /// Calls made first, not measured.
        warmup: usize,
        /// How a daffi caller makes each call (the floor has one way).
        #[serde(default)]
        style: CallStyle,
    },
    /// `calls` small calls with `in_flight` outstanding at any time.
    Rate {
        /// How the caller keeps calls in flight.
        mode: RateMode,
        /// Calls in total.
        calls: usize,
        /// Calls outstanding.
        in_flight: usize,
    },
    /// `calls` fire-and-forget calls, then one call that returns once the callee counted
    /// them all: the rate at which the callee received them.
    OneWay {
        /// Calls in total.
        calls: usize,
        /// Bytes in each call's body: the floors only (the reference for a stream of
        /// chunks); daffi's one-way calls carry none.
        #[serde(default)]
        bytes: usize,
    },
    /// One stream of `items` small items (integers), read to the end.
    StreamItems {
        /// Items in the stream.
        items: usize,
    },
    /// One stream of `chunks` byte strings of `bytes` bytes each, read to the end.
    StreamChunks {
        /// Chunks in the stream.
        chunks: usize,
        /// Bytes per chunk.
        bytes: usize,
    },
    /// One call whose argument is `bytes` long; the callee returns the length.
    Blob {
        /// Payload size.
        bytes: usize,
    },
    /// One call whose argument and result are `bytes` long, both of type `kind`.
    Echo {
        /// The type the bytes have on both sides.
        kind: ByteKind,
        /// Payload size.
        bytes: usize,
    },
    /// One call with no argument whose result is `bytes` long, of type `kind` on both
    /// sides (made from a buffer the callee prepared before the timing).
    Result {
        /// The type the result has on both sides.
        kind: ByteKind,
        /// Payload size.
        bytes: usize,
    },
    /// Broadcasts with results to every node serving the small call, one at a time.
    Broadcast {
        /// Measured broadcasts.
        calls: usize,
        /// Broadcasts made first, not measured.
        warmup: usize,
        /// How many answers each must bring.
        nodes: usize,
    },
    /// Waits until the nodes `{prefix}0 .. {prefix}{count-1}` and `extra` are all known
    /// to this node; answers the seconds it waited.
    WaitNodes {
        /// The swarm's nodes: a name prefix, and how many nodes have it (numbered from 0).
        groups: Vec<(String, usize)>,
        /// Other names to wait for.
        extra: Vec<String>,
        /// Give up after this many seconds.
        timeout_s: u64,
    },
}

/// How a daffi caller makes one call at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallStyle {
    /// From sync code: `fg()`.
    #[default]
    Fg,
    /// From async code on the caller's own runtime: `fg_async().await`.
    FgAsync,
    /// From async code on the caller's own runtime: `bg()?.await`.
    BgAwait,
}

impl CallStyle {
    /// The style's name, for labels.
    pub fn label(self) -> &'static str {
        match self {
            CallStyle::Fg => "FG",
            CallStyle::FgAsync => "fg_async",
            CallStyle::BgAwait => "bg + .await",
        }
    }
}

/// How a caller keeps many calls in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateMode {
    /// daffi from sync code: a window of `bg()` results, collected with `get()`.
    Bg,
    /// daffi from async code: `in_flight` tasks, each calling `fg_async` in a loop.
    Async,
    /// daffi from async code: a window of `bg()` results, each awaited in turn.
    BgAwait,
    /// The floor: requests written as replies come back.
    Pipelined,
}

/// The types a byte string has in users' code, as [`Op::Echo`] sends and receives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ByteKind {
    /// `daffi::Blob`: the reference the others are measured against.
    Blob,
    /// `Vec<u8>`.
    Vec,
    /// `serde_bytes::ByteBuf`.
    ByteBuf,
    /// `bytes::Bytes`.
    Bytes,
    /// `daffi::Blob` made from a fresh `Vec<u8>` (a result only): the reference for the
    /// `Vec<u8>` and `ByteBuf` results, whose callee makes a fresh copy the same way, so
    /// that their ratio shows what daffi adds, not what the callee's copy costs.
    FreshBlob,
    /// `&'static [u8]`: a result only (a callback cannot take a borrowed argument); the
    /// caller receives it as a `Blob`.
    StaticSlice,
}

impl ByteKind {
    /// Every kind an echo takes and returns, the reference first.
    pub const ECHOED: [ByteKind; 4] = [
        ByteKind::Blob,
        ByteKind::Vec,
        ByteKind::ByteBuf,
        ByteKind::Bytes,
    ];

    /// Every kind a callback returns, the reference first.
    pub const RETURNED: [ByteKind; 6] = [
        ByteKind::Blob,
        ByteKind::FreshBlob,
        ByteKind::Vec,
        ByteKind::ByteBuf,
        ByteKind::Bytes,
        ByteKind::StaticSlice,
    ];

    /// The type's name, for labels.
    pub fn label(self) -> &'static str {
        match self {
            ByteKind::Blob => "Blob",
            ByteKind::Vec => "Vec<u8>",
            ByteKind::ByteBuf => "ByteBuf",
            ByteKind::Bytes => "Bytes",
            ByteKind::FreshBlob => "Blob (fresh Vec)",
            ByteKind::StaticSlice => "&'static [u8]",
        }
    }

    /// The kind's name in callback names.
    fn callback_part(self) -> &'static str {
        match self {
            ByteKind::Blob => "blob",
            ByteKind::Vec => "vec",
            ByteKind::ByteBuf => "byte_buf",
            ByteKind::Bytes => "bytes",
            ByteKind::FreshBlob => "fresh_blob",
            ByteKind::StaticSlice => "static_slice",
        }
    }

    /// The callback that echoes this kind.
    pub fn echo_callback(self) -> String {
        format!("{ECHO}{}", self.callback_part())
    }

    /// The callback that returns the prepared bytes as this kind.
    pub fn result_callback(self) -> String {
        format!("{RESULT}{}", self.callback_part())
    }
}

/// The answer to [`Op::Latency`] and [`Op::Broadcast`].
pub type LatencyAnswer = Percentiles;

/// The answer to [`Op::Rate`] and [`Op::OneWay`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RateAnswer {
    /// Calls per second.
    pub calls_per_s: f64,
    /// Fire-and-forget calls the callee never counted.
    pub lost: u64,
}

/// The answer to [`Op::Blob`], [`Op::Result`] and [`Op::Echo`] (which counts the payload
/// both ways).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BlobAnswer {
    /// Payload MiB per second of round trip.
    pub mib_per_s: f64,
}

/// The answer to [`Op::WaitNodes`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WaitAnswer {
    /// Seconds waited.
    pub waited_s: f64,
}

/// MiB per second for `bytes` moved in `secs`.
pub fn mib_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs.max(1e-9)
}
