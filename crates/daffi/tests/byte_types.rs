//! Byte strings in the types users have them (`Vec<u8>`, `serde_bytes::ByteBuf`,
//! `bytes::Bytes`, `&'static [u8]`, and `Vec<u8>` inside a struct), as arguments and as
//! results between real processes, on both sides of the 16 KiB by-reference threshold
//! and at tens of MiB; and a `Vec<u8>` parameter reading both wire forms (a `bin`, as
//! Python sends `bytes`, and an array of integers, as older peers send it).

mod common;

use bytes::Bytes;
use common::{Cluster, Transport, WAIT};
use daffi::{callback, Blob};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The ignored test that runs worker processes (see `common`).
const ENTRY: &str = "worker_process";

/// Sizes around the by-reference threshold (16 KiB), and 16 MiB.
const SIZES: [usize; 6] = [0, 100, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 16 << 20];

/// Bytes of every value, different for each `len` and `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// What every echo returns: the bytes reversed, so that a wrong path cannot pass them on.
fn reversed(data: &[u8]) -> Vec<u8> {
    data.iter().rev().copied().collect()
}

// ---- callbacks, served by the worker ---------------------------------------------------

#[callback]
fn reverse_vec(data: Vec<u8>) -> Vec<u8> {
    reversed(&data)
}

#[callback]
fn reverse_byte_buf(data: ByteBuf) -> ByteBuf {
    ByteBuf::from(reversed(&data))
}

#[callback]
fn reverse_bytes(data: Bytes) -> Bytes {
    Bytes::from(reversed(&data))
}

/// 16 KiB + 1 of static bytes, the same in every process.
static STATIC: std::sync::LazyLock<&'static [u8]> =
    std::sync::LazyLock::new(|| pattern(16 * 1024 + 1, 9).leak());

#[callback]
fn static_bytes(short: bool) -> &'static [u8] {
    if short {
        &STATIC[..3]
    } else {
        &STATIC
    }
}

/// A struct with byte strings inside, as a user sends a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Photo {
    name: String,
    pixels: Vec<u8>,
    thumbnail: Option<Vec<u8>>,
    layers: Vec<Vec<u8>>,
}

impl Photo {
    fn of(len: usize) -> Photo {
        Photo {
            name: format!("photo of {len}"),
            pixels: pattern(len, 1),
            thumbnail: Some(pattern(len / 2, 2)),
            layers: vec![pattern(3, 3), pattern(len, 4)],
        }
    }

    fn reversed(&self) -> Photo {
        Photo {
            name: self.name.chars().rev().collect(),
            pixels: reversed(&self.pixels),
            thumbnail: self.thumbnail.as_deref().map(reversed),
            layers: self.layers.iter().rev().map(|l| reversed(l)).collect(),
        }
    }
}

#[callback]
fn reverse_photo(photo: Photo) -> Photo {
    photo.reversed()
}

/// Runs a worker node when started by a test; ignored in normal runs.
#[test]
#[ignore = "helper: tests start it as a child process"]
fn worker_process() {
    let Some(role) = common::child_role() else {
        return;
    };
    assert_eq!(role, "worker");
    let name = std::env::var(common::ENV_NAME).expect("worker name");
    let g = common::builder_for(&common::address_from_env())
        .process_name(name)
        .start()
        .expect("worker starts");
    g.join().expect("join");
}

fn cluster(transport: Transport, name: &str) -> Cluster {
    let mut cluster = Cluster::start(transport, ENTRY);
    cluster.spawn_worker(&common::unique(name));
    cluster
}

/// Calls `callback` with `arg` and takes the result as an `R`.
fn call<A: Serialize, R: serde::de::DeserializeOwned>(
    cluster: &Cluster,
    callback: &str,
    arg: A,
) -> R {
    cluster
        .caller
        .call(callback)
        .args((arg,))
        .timeout(WAIT)
        .fg()
        .unwrap_or_else(|e| panic!("{callback}: {e}"))
}

fn each_type_crosses_both_ways(transport: Transport) {
    let cluster = cluster(transport, "types");
    for len in SIZES {
        let data = pattern(len, len as u8);
        let expected = reversed(&data);
        let back: Vec<u8> = call(&cluster, "reverse_vec", &data);
        assert!(back == expected, "Vec<u8> of {len} bytes");
        let back: ByteBuf = call(&cluster, "reverse_byte_buf", ByteBuf::from(data.clone()));
        assert!(back[..] == expected[..], "ByteBuf of {len} bytes");
        let back: Bytes = call(&cluster, "reverse_bytes", Bytes::from(data.clone()));
        assert!(back[..] == expected[..], "Bytes of {len} bytes");
        // `&[u8]` as the argument, and the types read each other's bytes.
        let back: Bytes = call(&cluster, "reverse_vec", &data[..]);
        assert!(back[..] == expected[..], "&[u8] to Vec<u8> of {len} bytes");
        let back: Vec<u8> = call(&cluster, "reverse_bytes", Blob::from(data.clone()));
        assert!(back == expected, "Blob to Bytes of {len} bytes");
    }
    for short in [true, false] {
        let back: Vec<u8> = call(&cluster, "static_bytes", short);
        let len = if short { 3 } else { STATIC.len() };
        assert!(back[..] == STATIC[..len], "&'static [u8] of {len} bytes");
    }
}

#[test]
fn each_byte_type_crosses_as_argument_and_result_over_unix_socket() {
    each_type_crosses_both_ways(Transport::Unix);
}

#[test]
fn each_byte_type_crosses_as_argument_and_result_over_tcp() {
    each_type_crosses_both_ways(Transport::Tcp);
}

#[test]
fn a_vec_of_64_mib_crosses_both_ways() {
    let cluster = cluster(Transport::Unix, "big");
    let data = pattern(64 << 20, 7);
    let back: Vec<u8> = call(&cluster, "reverse_vec", &data);
    assert!(back == reversed(&data), "64 MiB came back changed");
}

/// A 16 MiB result taken as `Vec<u8>` and `ByteBuf` through every way a caller collects
/// one: `bg` + `get`, `fg_async` and `bg` awaited from the user's own runtime, and a
/// broadcast.
#[test]
fn a_byte_string_result_arrives_whole_however_it_is_collected() {
    let cluster = cluster(Transport::Unix, "collect");
    let data = pattern(16 << 20, 3);
    let expected = reversed(&data);
    let call = || {
        cluster
            .caller
            .call("reverse_vec")
            .args((&data,))
            .timeout(WAIT)
    };
    let back: Vec<u8> = call().bg().expect("sent").get().expect("bg result");
    assert!(back == expected, "Vec<u8> from bg().get()");
    let back: ByteBuf = call().bg().expect("sent").get().expect("bg result");
    assert!(back[..] == expected[..], "ByteBuf from bg().get()");
    let runtime = tokio::runtime::Runtime::new().expect("the user's runtime");
    runtime.block_on(async {
        let back: Vec<u8> = call().fg_async().await.expect("fg_async result");
        assert!(back == expected, "Vec<u8> from fg_async");
        let pending = call().bg::<ByteBuf>().expect("sent");
        let back = pending.await.expect("awaited result");
        assert!(back[..] == expected[..], "ByteBuf from an awaited bg");
    });
    let results = call().broadcast::<Vec<u8>>().expect("broadcast");
    assert_eq!(results.len(), 1, "one worker");
    assert!(
        results.values().all(|back| *back == expected),
        "Vec<u8> from a broadcast"
    );
}

#[test]
fn byte_strings_inside_a_struct_cross_both_ways() {
    let cluster = cluster(Transport::Unix, "photos");
    for len in SIZES {
        let photo = Photo::of(len);
        let back: Photo = call(&cluster, "reverse_photo", &photo);
        assert!(back == photo.reversed(), "a photo of {len} bytes");
    }
}

/// `(data,)` as MessagePack, with `data` a `bin` of the smallest header that fits.
fn bin_args(data: &[u8]) -> Bytes {
    let mut out = vec![0x91];
    match u8::try_from(data.len()) {
        Ok(len) => out.extend_from_slice(&[0xc4, len]),
        Err(_) => match u16::try_from(data.len()) {
            Ok(len) => out.extend(std::iter::once(0xc5).chain(len.to_be_bytes())),
            Err(_) => out.extend(std::iter::once(0xc6).chain((data.len() as u32).to_be_bytes())),
        },
    }
    out.extend_from_slice(data);
    Bytes::from(out)
}

#[test]
fn a_vec_parameter_reads_a_bin_and_an_array_of_integers() {
    let cluster = cluster(Transport::Unix, "forms");
    for len in [0, 3, 300, 70_000, 3 << 20] {
        let data = pattern(len, 5);
        let expected = reversed(&data);
        // A `bin`, as the Python daffi sends `bytes`.
        let back: Vec<u8> = cluster
            .caller
            .call("reverse_vec")
            .raw_args(bin_args(&data))
            .timeout(WAIT)
            .fg()
            .expect("a bin");
        assert!(back == expected, "a bin of {len} bytes");
        // An array of integers, as serde writes a `Vec<u8>` without daffi.
        let array = rmp_serde::to_vec(&(data.iter().map(|&b| b as u16).collect::<Vec<_>>(),))
            .expect("encodes");
        let back: Vec<u8> = cluster
            .caller
            .call("reverse_vec")
            .raw_args(Bytes::from(array))
            .timeout(WAIT)
            .fg()
            .expect("an array");
        assert!(back == expected, "an array of {len} integers");
    }
}
