//! Byte strings in the types users have them (`Vec<u8>`, `serde_bytes::ByteBuf`,
//! `bytes::Bytes`, `&'static [u8]`, and `Vec<u8>` inside a struct), as arguments and as
//! results between real processes, on both sides of the 16 KiB by-reference threshold
//! and at tens of MiB; and a `Vec<u8>` parameter reading both wire forms (a `bin`, as
//! Python sends `bytes`, and an array of integers, as older peers send it). Echoes of
//! each type, one after another from sync code and from a user's `#[tokio::main]`: large
//! byte strings are copied into buffers reused from call to call, and no call may see
//! another's bytes.

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

#[callback]
fn echo_vec(data: Vec<u8>) -> Vec<u8> {
    data
}

#[callback]
fn echo_byte_buf(data: ByteBuf) -> ByteBuf {
    data
}

#[callback]
fn echo_bytes(data: Bytes) -> Bytes {
    data
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

/// Sizes an echo is tried at: nothing, one byte, both sides of the by-reference
/// threshold, and 64 MiB (over the pooled buffers' threshold, 1 MiB).
const ECHO_SIZES: [usize; 5] = [0, 1, 16 * 1024 - 1, 16 * 1024, 64 << 20];

/// A different payload of `len` bytes for each call `n`: the pattern with its first and
/// last KiB changed (cheap at 64 MiB), so that bytes left over from another call show.
fn payload_for(base: &[u8], n: u8) -> Vec<u8> {
    let mut data = base.to_vec();
    let ends = data.len().min(1024);
    let tail = data.len() - ends;
    for at in (0..ends).chain(tail..data.len()) {
        data[at] = data[at].wrapping_add(n);
    }
    data
}

/// What to echo at `len` bytes: the payload as each byte type, a different one for
/// each call (`n` numbers them), with the echo callback of that type.
fn echoes(len: usize, n: &mut u8) -> Vec<(&'static str, Echoed)> {
    let base = pattern(len, 11);
    let mut next = || {
        *n = n.wrapping_add(1);
        payload_for(&base, *n)
    };
    vec![
        ("echo_vec", Echoed::Vec(next())),
        ("echo_byte_buf", Echoed::ByteBuf(ByteBuf::from(next()))),
        ("echo_bytes", Echoed::Bytes(Bytes::from(next()))),
        // A borrowed `&[u8]` (as `serde_bytes::Bytes`), taken back as a `Vec<u8>`.
        ("echo_vec", Echoed::Slice(next())),
    ]
}

/// Fails unless `back` is exactly what was `sent`.
fn check_echo(callback: &str, sent: &Echoed, back: &Echoed) {
    let len = sent.bytes().len();
    assert!(
        back.bytes() == sent.bytes(),
        "{callback} of {len} bytes ({}) came back changed",
        sent.kind()
    );
}

/// A byte string as a user of each type sends and receives it.
enum Echoed {
    Vec(Vec<u8>),
    ByteBuf(ByteBuf),
    Bytes(Bytes),
    /// Sent borrowed as `&[u8]`, received as a `Vec<u8>`.
    Slice(Vec<u8>),
}

impl Echoed {
    fn bytes(&self) -> &[u8] {
        match self {
            Echoed::Vec(v) | Echoed::Slice(v) => v,
            Echoed::ByteBuf(b) => b,
            Echoed::Bytes(b) => b,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Echoed::Vec(_) => "Vec<u8>",
            Echoed::ByteBuf(_) => "ByteBuf",
            Echoed::Bytes(_) => "Bytes",
            Echoed::Slice(_) => "&[u8]",
        }
    }

    /// Calls `callback` with this value (borrowed, as users pass a buffer they keep)
    /// and takes the answer as the same type.
    fn call_sync(&self, caller: &daffi::Global, callback: &str) -> Echoed {
        let call = caller.call(callback).timeout(WAIT);
        match self {
            Echoed::Vec(v) => Echoed::Vec(self.answer(callback, call.args((v,)).fg())),
            Echoed::ByteBuf(b) => Echoed::ByteBuf(self.answer(callback, call.args((b,)).fg())),
            Echoed::Bytes(b) => Echoed::Bytes(self.answer(callback, call.args((b,)).fg())),
            Echoed::Slice(v) => {
                let call = call.args((serde_bytes::Bytes::new(v),));
                Echoed::Slice(self.answer(callback, call.fg()))
            }
        }
    }

    /// [`call_sync`](Self::call_sync) from async code, with `fg_async`.
    async fn call_async(&self, caller: &daffi::Global, callback: &str) -> Echoed {
        let call = caller.call(callback).timeout(WAIT);
        match self {
            Echoed::Vec(v) => Echoed::Vec(self.answer(callback, call.args((v,)).fg_async().await)),
            Echoed::ByteBuf(b) => {
                Echoed::ByteBuf(self.answer(callback, call.args((b,)).fg_async().await))
            }
            Echoed::Bytes(b) => {
                Echoed::Bytes(self.answer(callback, call.args((b,)).fg_async().await))
            }
            Echoed::Slice(v) => {
                let call = call.args((serde_bytes::Bytes::new(v),));
                Echoed::Slice(self.answer(callback, call.fg_async().await))
            }
        }
    }

    /// The answer to an echo of this value, which must have succeeded.
    fn answer<T>(&self, callback: &str, answer: daffi::Result<T>) -> T {
        answer.unwrap_or_else(|e| panic!("{callback} ({}): {e}", self.kind()))
    }
}

#[test]
fn each_byte_type_echoes_unchanged_from_sync_code() {
    let cluster = cluster(Transport::Unix, "echo-sync");
    let mut n = 0;
    for len in ECHO_SIZES {
        for (callback, sent) in echoes(len, &mut n) {
            check_echo(callback, &sent, &sent.call_sync(&cluster.caller, callback));
        }
    }
}

/// Owned arguments, `.args((data,))`, are sent from their own memory: what arrives must
/// still be exactly what was given, call after call.
#[test]
fn owned_byte_arguments_echo_unchanged() {
    let cluster = cluster(Transport::Unix, "echo-owned");
    let mut n = 50;
    for len in ECHO_SIZES {
        let base = pattern(len, 13);
        for _ in 0..2 {
            n += 1;
            let data = payload_for(&base, n);
            let call = || cluster.caller.call("echo_vec").timeout(WAIT);
            let back: Vec<u8> = call().args((data.clone(),)).fg().expect("Vec<u8>");
            assert!(
                back == data,
                "an owned Vec<u8> of {len} bytes came back changed"
            );
            let sent = ByteBuf::from(data.clone());
            let back: ByteBuf = call().args((sent,)).fg().expect("ByteBuf");
            assert!(
                back[..] == data[..],
                "an owned ByteBuf of {len} bytes came back changed"
            );
        }
    }
}

/// The user's own runtime, as `#[tokio::main]` makes it, with a node of its own.
#[tokio::main]
async fn echo_from_users_main(address: daffi::Address) {
    let caller = common::builder_for(&address)
        .process_name(common::unique("async-caller"))
        .start_async()
        .await
        .expect("start_async");
    caller
        .wait_function_timeout_async("echo_byte_buf", WAIT)
        .await
        .expect("announced");
    let mut n = 100;
    for len in ECHO_SIZES {
        for (callback, sent) in echoes(len, &mut n) {
            let back = sent.call_async(&caller, callback).await;
            check_echo(callback, &sent, &back);
        }
    }
}

#[test]
fn each_byte_type_echoes_unchanged_from_a_users_tokio_main() {
    let cluster = cluster(Transport::Unix, "echo-async");
    echo_from_users_main(cluster.address.clone());
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
