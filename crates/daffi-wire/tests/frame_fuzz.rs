//! Fuzzing the frame decoder with proptest: whatever bytes arrive, decoding returns a
//! frame or an error, never panics, never allocates past the limit, and valid frames
//! survive a round trip. Runs a few thousand cases in CI; raise `PROPTEST_CASES` for a
//! longer session.

use bytes::{Bytes, BytesMut};
use daffi_wire::{Frame, FrameReader, Header, Kind};
use proptest::prelude::*;

const LIMIT: usize = 4096;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(3000),
        ..ProptestConfig::default()
    }
}

/// Feeds `bytes` to a reader in chunks of `chunk` bytes; collects frames until the first
/// error or the end.
fn read_all(bytes: Vec<u8>, chunk: usize) -> Vec<Result<Frame, String>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let (mut tx, rx) = tokio::io::duplex(chunk.max(1));
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in bytes.chunks(chunk.max(1)) {
                if tx.write_all(piece).await.is_err() {
                    break;
                }
            }
        });
        let mut reader = FrameReader::new(rx, LIMIT);
        let mut out = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(frame)) => out.push(Ok(frame)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        writer.abort();
        out
    })
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Hello),
        Just(Kind::Welcome),
        Just(Kind::Membership),
        Just(Kind::ControlRequest),
        Just(Kind::Request),
        Just(Kind::Reply),
        Just(Kind::Undeliverable),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Frame::parse(Bytes::from(bytes.clone()));
        for frame in read_all(bytes, 7).into_iter().flatten() {
            prop_assert!(frame.raw().len() <= LIMIT + 4);
        }
    }

    #[test]
    fn valid_frames_round_trip(
        kind in kind_strategy(),
        flags in any::<u8>(),
        call_id in any::<u64>(),
        timeout_ms in any::<u32>(),
        src in "[a-z0-9-]{0,20}",
        dst in "[a-z0-9-]{0,20}",
        name in "\\PC{0,30}",
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        chunk in 1usize..64,
    ) {
        let header = Header { kind, flags, call_id, timeout_ms, src: &src, dst: &dst, name: &name };
        let mut raw = BytesMut::from(&header.encode(payload.len())[..]);
        raw.extend_from_slice(&payload);
        let frames = read_all(raw.to_vec(), chunk);
        prop_assert_eq!(frames.len(), 1);
        let frame = frames.into_iter().next().expect("one").expect("valid");
        prop_assert_eq!(frame.kind(), kind);
        prop_assert_eq!(frame.flags(), flags);
        prop_assert_eq!(frame.call_id(), call_id);
        prop_assert_eq!(frame.timeout_ms(), timeout_ms);
        prop_assert_eq!(frame.src(), src.as_str());
        prop_assert_eq!(frame.dst(), dst.as_str());
        prop_assert_eq!(frame.name(), name.as_str());
        prop_assert_eq!(&frame.payload()[..], &payload[..]);
    }

    #[test]
    fn mutated_frames_decode_or_fail_cleanly(
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let header = Header { kind: Kind::Request, flags: 0, call_id: 1, timeout_ms: 0, src: "a", dst: "b", name: "f" };
        let mut raw = BytesMut::from(&header.encode(payload.len())[..]);
        raw.extend_from_slice(&payload);
        for (at, value) in flips {
            let i = at % raw.len();
            raw[i] = value;
        }
        let bytes = raw.to_vec();
        let _ = Frame::parse(Bytes::from(bytes.clone()));
        for frame in read_all(bytes, 5).into_iter().flatten() {
            prop_assert!(frame.raw().len() <= LIMIT + 4);
        }
    }
}
