//! Micro-benchmarks of the pieces every call goes through, so that a regression shows up
//! in review: `cargo bench -p daffi --bench hot_paths`.
//!
//! The whole path (three processes, sockets, scheduling) is measured by `daffi bench`;
//! see BENCHMARKS.md.

use bytes::Bytes;
use daffi::__bench::{decode_args, encode_value, ControllerRoutes, NodeView};
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

mod routing {
    use super::*;

    /// The controller finds the queue of a request's destination.
    #[divan::bench(args = [10, 1000])]
    fn controller_lookup(bencher: Bencher, nodes: usize) {
        let routes = ControllerRoutes::with_nodes(nodes).expect("runtime");
        let dst = format!("node{}", nodes / 2);
        bencher.bench_local(|| routes.route_request(black_box(&dst)));
    }

    /// A caller picks a node serving the callback.
    #[divan::bench(args = [1, 1000])]
    fn node_pick_provider(bencher: Bencher, nodes: usize) {
        let view = NodeView::with_nodes(nodes);
        bencher.bench_local(|| view.pick(black_box("add")));
    }

    /// A node learns that another joined (each of N joins costs every node this).
    #[divan::bench(args = [10, 1000])]
    fn node_applies_a_join(bencher: Bencher, nodes: usize) {
        let view = NodeView::with_nodes(nodes);
        bencher.bench_local(|| view.join(black_box("newcomer")));
    }
}

mod arguments {
    use super::*;

    /// `.args((a, b))` for two integers.
    #[divan::bench]
    fn encode_two_integers() -> Result<Bytes, String> {
        encode_value(&black_box((123_456_i64, 7_i64)))
    }

    /// A callback decoding them.
    #[divan::bench]
    fn decode_two_integers(bencher: Bencher) {
        let payload = encode_value(&(123_456_i64, 7_i64)).expect("encode");
        bencher.bench_local(|| decode_args::<(i64, i64)>(black_box(&payload)));
    }

    /// `.args((bytes,))` for a 64 KiB payload (the copy into the frame dominates).
    #[divan::bench]
    fn encode_64_kib_bytes(bencher: Bencher) {
        let blob = Bytes::from(vec![7u8; 64 * 1024]);
        bencher
            .counter(divan::counter::BytesCount::new(blob.len()))
            .bench_local(|| encode_value(&(black_box(blob.clone()),)));
    }

    /// A struct with named fields (sent as a map).
    #[divan::bench]
    fn encode_named_struct() -> Result<Bytes, String> {
        #[derive(serde::Serialize)]
        struct Order {
            id: u64,
            symbol: &'static str,
            quantity: i64,
            price: f64,
        }
        encode_value(&black_box(Order {
            id: 42,
            symbol: "DAFI",
            quantity: 100,
            price: 12.5,
        }))
    }
}
