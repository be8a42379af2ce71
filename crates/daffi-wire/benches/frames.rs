//! Micro-benchmarks of what every frame goes through, so that a regression shows up in
//! review: `cargo bench -p daffi-wire --bench frames`.

use bytes::Bytes;
use daffi_wire::{Frame, Header, Kind};
use divan::{black_box, Bencher};

fn main() {
    divan::main();
}

fn request_header() -> Header<'static> {
    Header {
        kind: Kind::Request,
        flags: 0,
        call_id: 123_456,
        timeout_ms: 0,
        src: "bench1234-ab-unix-caller",
        dst: "bench1234-ab-unix-callee0",
        name: "bench_add",
    }
}

/// A small request as it comes off the wire.
fn request_frame() -> Bytes {
    let args = Bytes::from_static(&[0x92, 0x01, 0x01]);
    let mut raw = request_header().encode(args.len()).to_vec();
    raw.extend_from_slice(&args);
    Bytes::from(raw)
}

mod frame {
    use super::*;

    /// The caller's and the callee's side: length prefix and routing header.
    #[divan::bench]
    fn encode_request_header() -> Bytes {
        black_box(request_header()).encode(black_box(3))
    }

    /// What the controller does with every frame: check and locate the header fields.
    #[divan::bench]
    fn parse_request(bencher: Bencher) {
        let raw = request_frame();
        bencher.bench_local(|| Frame::parse(black_box(raw.clone())).map(|f| f.call_id()));
    }
}
