//! Golden bytes: the worked examples of `docs/PROTOCOL.md`, built with the real encoders
//! and compared to literal bytes (as mini-redis writes literal RESP), then parsed back.
//! A change to the wire that breaks them is a protocol change: the version goes up and
//! the examples change with it.

use bytes::Bytes;
use daffi_wire::frame::{FLAG_ERROR, LEN_PREFIX};
use daffi_wire::{Frame, Header, Kind, Outgoing, PREAMBLE_LEN};

use super::message::{self, Announce, Hello, Member, RemoteError, RemoteErrorKind, Welcome};
use super::opening;
use crate::codec::encode_value;

const PROTOCOL_MD: &str = include_str!("../../../../docs/PROTOCOL.md");

const REQUEST: &str = r#"
00 00 00 1a                                       # length: 26 bytes follow
10                                                # kind: Request
00                                                # flags: none (a reply is wanted)
00 00 00 00 00 00 00 01                           # call_id: 1
00 00 13 88                                       # timeout_ms: 5000
01 01 00 03                                       # src_len 1, dst_len 1, name_len 3
61 62 61 64 64                                    # src "a", dst "b", name "add"
92 01 02                                          # payload: the arguments, [1, 2]
"#;

const REPLY: &str = r#"
00 00 00 15                                       # length: 21
11                                                # kind: Reply
00                                                # flags: none (a value)
00 00 00 00 00 00 00 01                           # call_id: 1, the request's
00 00 00 00                                       # timeout_ms: 0
01 01 00 00                                       # src_len 1, dst_len 1, name_len 0
62 61                                             # src "b" (the callee), dst "a" (the caller)
03                                                # payload: the result, 3
"#;

const ERROR_REPLY: &str = r#"
00 00 00 2c                                       # length: 44
11                                                # kind: Reply
01                                                # flags: ERROR
00 00 00 00 00 00 00 01                           # call_id: 1
00 00 00 00                                       # timeout_ms: 0
01 01 00 00                                       # src_len 1, dst_len 1, name_len 0
62 61                                             # src "b", dst "a"
82                                                # payload: RemoteError, a map of 2
a4 6b 69 6e 64 a6 66 61 69 6c 65 64               # kind: "failed"
a7 6d 65 73 73 61 67 65 a2 6e 6f                  # message: "no"
"#;

const OPENING: &str = r#"
44 41 46 49 00 05                                 # preamble: magic "DAFI", version 5
00 00 00 3e                                       # Hello frame, length: 62
01 00                                             # kind: Hello, flags: none
00 00 00 00 00 00 00 00 00 00 00 00               # call_id 0, timeout_ms 0
00 00 00 00                                       # no src, dst, name
83                                                # payload: Hello, a map of 3
ac 70 72 6f 63 65 73 73 5f 6e 61 6d 65 a1 61      # process_name: "a"
aa 61 75 74 68 5f 74 6f 6b 65 6e c0               # auth_token: nil
ae 6d 61 78 5f 66 72 61 6d 65 5f 73 69 7a 65 00   # max_frame_size: 0 (not said)
00 00 00 22                                       # Announce frame, length: 34
04 00                                             # kind: Announce, flags: none
00 00 00 00 00 00 00 00 00 00 00 00               # call_id 0, timeout_ms 0
00 00 00 00                                       # no src, dst, name
81                                                # payload: Announce, a map of 1
a9 63 61 6c 6c 62 61 63 6b 73 91 a3 61 64 64      # callbacks: ["add"]
"#;

const WELCOME: &str = r#"
00 00 00 5e                                       # length: 94
02 00                                             # kind: Welcome, flags: none
00 00 00 00 00 00 00 00 00 00 00 00               # call_id 0, timeout_ms 0
00 00 00 00                                       # no src, dst, name
85                                                # payload: Welcome, a map of 5
a7 6d 65 6d 62 65 72 73 91 82                     # members: one Member, a map of 2
a4 6e 61 6d 65 a1 62                              # name: "b"
a9 63 61 6c 6c 62 61 63 6b 73 91 a3 61 64 64      # callbacks: ["add"]
ae 6d 61 78 5f 66 72 61 6d 65 5f 73 69 7a 65 ce
08 00 00 00                                       # max_frame_size: 134217728 (128 MiB)
a4 6d 6f 72 65 c2                                 # more: false (the last page)
a8 69 6e 73 74 61 6e 63 65 07                     # instance: 7
a5 74 61 73 6b 73 90                              # tasks: []
"#;

/// The bytes of an example, after checking that `docs/PROTOCOL.md` shows it as written.
fn bytes_of(example: &str) -> Vec<u8> {
    assert!(
        PROTOCOL_MD.contains(example.trim()),
        "docs/PROTOCOL.md no longer shows this example:{example}"
    );
    example
        .lines()
        .flat_map(|line| line.split('#').next().unwrap_or("").split_whitespace())
        .map(|byte| u8::from_str_radix(byte, 16).expect("a hex byte"))
        .collect()
}

fn encoded(frame: Outgoing) -> Vec<u8> {
    let mut out = Vec::new();
    frame.copy_to(&mut out);
    out
}

fn parsed(raw: &[u8]) -> Frame {
    Frame::parse(Bytes::copy_from_slice(raw)).expect("the example parses")
}

fn request_header() -> Header<'static> {
    Header {
        kind: Kind::Request,
        flags: 0,
        call_id: 1,
        timeout_ms: 5000,
        src: "a",
        dst: "b",
        name: "add",
    }
}

fn reply_header(flags: u8) -> Header<'static> {
    Header {
        kind: Kind::Reply,
        flags,
        call_id: 1,
        timeout_ms: 0,
        src: "b",
        dst: "a",
        name: "",
    }
}

#[test]
fn a_request() {
    let args = encode_value(&(1, 2)).expect("encode");
    assert_eq!(
        encoded(Outgoing::new(&request_header(), args)),
        bytes_of(REQUEST)
    );

    let frame = parsed(&bytes_of(REQUEST));
    assert_eq!(frame.kind(), Kind::Request);
    assert_eq!(frame.flags(), 0);
    assert_eq!(frame.call_id(), 1);
    assert_eq!(frame.timeout_ms(), 5000);
    assert_eq!((frame.src(), frame.dst(), frame.name()), ("a", "b", "add"));
    let args: (i64, i64) = rmp_serde::from_slice(&frame.payload()).expect("arguments");
    assert_eq!(args, (1, 2));
}

#[test]
fn a_reply() {
    let result = encode_value(&3).expect("encode");
    assert_eq!(
        encoded(Outgoing::new(&reply_header(0), result)),
        bytes_of(REPLY)
    );

    let frame = parsed(&bytes_of(REPLY));
    assert_eq!(
        (frame.kind(), frame.flags(), frame.call_id()),
        (Kind::Reply, 0, 1)
    );
    assert_eq!((frame.src(), frame.dst(), frame.name()), ("b", "a", ""));
    let result: i64 = rmp_serde::from_slice(&frame.payload()).expect("result");
    assert_eq!(result, 3);
}

#[test]
fn an_error_reply() {
    let error = message::encode(&RemoteError {
        kind: RemoteErrorKind::Failed,
        message: "no".into(),
    });
    let reply = Outgoing::new(&reply_header(FLAG_ERROR), error);
    assert_eq!(encoded(reply), bytes_of(ERROR_REPLY));

    let frame = parsed(&bytes_of(ERROR_REPLY));
    assert_eq!((frame.kind(), frame.flags()), (Kind::Reply, FLAG_ERROR));
    let error: RemoteError = message::decode(&frame.payload()).expect("a RemoteError");
    assert_eq!(error.kind, RemoteErrorKind::Failed);
    assert_eq!(error.message, "no");
}

#[test]
fn the_opening_hello_and_announce() {
    let hello = Hello {
        process_name: "a".into(),
        auth_token: None,
        max_frame_size: 0,
        view: None,
    };
    assert_eq!(opening(&hello, vec!["add".into()]), bytes_of(OPENING));

    let raw = bytes_of(OPENING);
    let (preamble, frames) = raw.split_at(PREAMBLE_LEN);
    assert_eq!(preamble, daffi_wire::preamble(5));
    let hello_len = LEN_PREFIX + u32::from_be_bytes(frames[..4].try_into().unwrap()) as usize;
    let (hello, announce) = frames.split_at(hello_len);
    let hello = parsed(hello);
    assert_eq!(hello.kind(), Kind::Hello);
    let hello: Hello = message::decode(&hello.payload()).expect("a Hello");
    assert_eq!(hello.process_name, "a");
    assert_eq!(hello.auth_token, None);
    assert_eq!(hello.max_frame_size, 0);
    let announce = parsed(announce);
    assert_eq!(announce.kind(), Kind::Announce);
    let announce: Announce = message::decode(&announce.payload()).expect("an Announce");
    assert_eq!(announce.callbacks, ["add"]);
}

#[test]
fn a_welcome_page() {
    let welcome = Welcome {
        members: vec![Member {
            name: "b".into(),
            callbacks: vec!["add".into()],
        }],
        max_frame_size: 128 * 1024 * 1024,
        more: false,
        instance: 7,
        tasks: Vec::new(),
        views: false,
    };
    let frame = message::control_frame(Kind::Welcome, &welcome);
    assert_eq!(encoded(frame), bytes_of(WELCOME));

    let frame = parsed(&bytes_of(WELCOME));
    assert_eq!(frame.kind(), Kind::Welcome);
    let welcome: Welcome = message::decode(&frame.payload()).expect("a Welcome");
    assert_eq!(
        welcome.members,
        [Member {
            name: "b".into(),
            callbacks: vec!["add".into()]
        }]
    );
    assert_eq!(welcome.max_frame_size, 128 * 1024 * 1024);
    assert!(!welcome.more);
    assert_eq!(welcome.instance, 7);
    assert!(welcome.tasks.is_empty());
}
