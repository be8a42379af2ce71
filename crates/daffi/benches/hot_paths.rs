//! Micro-benchmarks of the pieces every call goes through, so that a regression shows up
//! in review: `cargo bench -p daffi --bench hot_paths`. Frames have their own in
//! daffi-wire (`cargo bench -p daffi-wire --bench frames`).
//!
//! Arguments and results are encoded and decoded by the functions the `#[callback]`
//! expansion calls (`daffi::__private`, not public API); `.args(..)` encodes the same
//! way. The whole path (three processes, sockets, scheduling) is measured by
//! `daffi-bench`; see BENCHMARKS.md.

use bytes::Bytes;
use daffi::__private::{decode_args, encode_reply, Outcome, Signature};

/// What the `#[callback]` expansion passes for `fn add(a: i64, b: i64)`.
const SIGNATURE: Signature<'static> = Signature {
    callback: "add",
    names: &["a", "b"],
    types: &["i64", "i64"],
};
use divan::{black_box, Bencher};

fn main() {
    divan::main();
}

mod arguments {
    use super::*;

    /// `.args((a, b))` for two integers.
    #[divan::bench]
    fn encode_two_integers() -> Outcome {
        encode_reply(black_box((123_456_i64, 7_i64)))
    }

    /// A callback decoding them.
    #[divan::bench]
    fn decode_two_integers(bencher: Bencher) {
        let payload = encode_reply((123_456_i64, 7_i64))
            .expect("encode")
            .into_bytes();
        bencher
            .bench_local(|| decode_args::<(i64, i64)>(&SIGNATURE, black_box(payload.clone())).ok());
    }

    /// `.args((bytes,))` for a 64 KiB payload (the copy into the frame dominates).
    #[divan::bench]
    fn encode_64_kib_bytes(bencher: Bencher) {
        let blob = Bytes::from(vec![7u8; 64 * 1024]);
        bencher
            .counter(divan::counter::BytesCount::new(blob.len()))
            .bench_local(|| encode_reply(&(black_box(blob.clone()),)));
    }

    /// A struct with named fields (sent as a map).
    #[divan::bench]
    fn encode_named_struct() -> Outcome {
        #[derive(serde::Serialize)]
        struct Order {
            id: u64,
            symbol: &'static str,
            quantity: i64,
            price: f64,
        }
        encode_reply(black_box(Order {
            id: 42,
            symbol: "DAFI",
            quantity: 100,
            price: 12.5,
        }))
    }
}
