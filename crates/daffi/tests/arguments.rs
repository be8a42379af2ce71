//! How arguments reach callbacks (one struct as the one argument, by position, by name),
//! and what the caller is told when arguments or results do not fit: every message in
//! the caller's terms, through real calls to a worker process.

mod common;

use std::collections::BTreeMap;
use std::error::Error as _;

use bytes::Bytes;
use common::{Cluster, Transport, WAIT};
use daffi::{callback, Error, Global};
use serde::{Deserialize, Serialize};

/// The ignored test that runs worker processes (see `common`).
const ENTRY: &str = "worker_process";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Person {
    name: String,
    age: u32,
}

fn ann() -> Person {
    Person {
        name: "Ann".into(),
        age: 3,
    }
}

#[callback]
fn greet(p: Person) -> String {
    format!("hello {} ({})", p.name, p.age)
}

#[callback]
fn twice(n: i64) -> i64 {
    2 * n
}

#[callback]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[callback]
fn grid(rows: Vec<Vec<i64>>) -> usize {
    rows.len()
}

#[callback]
fn people() -> Vec<Person> {
    vec![ann()]
}

#[callback]
fn levels(_v: serde::de::IgnoredAny) -> bool {
    true
}

/// A callback group whose method takes one struct.
struct Greeter;

#[callback]
impl Greeter {
    pub fn describe(&self, p: Person) -> String {
        format!("{} is {}", p.name, p.age)
    }
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
    g.register("greet_closure", |p: Person| format!("hi {}", p.name))
        .expect("register");
    g.register("mul", |a: i64, b: i64| a * b).expect("register");
    g.register_instance(Greeter).expect("register the group");
    g.join().expect("join");
}

/// A cluster with one worker, whose closures and methods the caller knows.
fn cluster() -> (Cluster, String) {
    let mut cluster = Cluster::start(Transport::Unix, ENTRY);
    let worker = common::unique("args");
    cluster.spawn_worker(&worker);
    for name in ["greet_closure", "mul", "describe"] {
        cluster
            .caller
            .wait_function_timeout(name, WAIT)
            .expect("announced");
    }
    (cluster, worker)
}

#[test]
fn one_struct_is_the_one_argument_of_functions_closures_and_methods() {
    let (cluster, _worker) = cluster();
    let g = &cluster.caller;
    let call = |name: &str, args| -> String {
        g.call(name)
            .args(args)
            .timeout(WAIT)
            .fg()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(call("greet", ann()), "hello Ann (3)");
    assert_eq!(call("greet_closure", ann()), "hi Ann");
    assert_eq!(call("describe", ann()), "Ann is 3");

    // The other ways still work: in a tuple, or named.
    let in_tuple: String = g.call("greet").args((ann(),)).fg().expect("tuple");
    let named: String = g
        .call("describe")
        .args(BTreeMap::from([("p", ann())]))
        .fg()
        .expect("named");
    assert_eq!(
        (in_tuple.as_str(), named.as_str()),
        ("hello Ann (3)", "Ann is 3")
    );
    // Anything but a list is a one-parameter callback's argument.
    let doubled: i64 = g.call("twice").args(21).fg().expect("a bare value");
    assert_eq!(doubled, 42);
}

/// The message of a call to `name` with `args` that the worker refuses.
fn refused(g: &Global, name: &str, args: impl Serialize) -> String {
    match g
        .call(name)
        .args(args)
        .timeout(WAIT)
        .fg::<serde::de::IgnoredAny>()
    {
        Err(e @ Error::BadArguments { .. }) => e.to_string(),
        other => panic!("{name}: expected BadArguments, got {other:?}"),
    }
}

#[test]
fn argument_errors_say_which_argument_and_why() {
    let (cluster, worker) = cluster();
    let g = &cluster.caller;
    let rejected =
        |name: &str| format!("callback `{name}` on process `{worker}` rejected its arguments: ");

    let cases: Vec<(&str, String, &str)> = vec![
        ("add", refused(g, "add", (1,)), "`add` expects 2 arguments (a: i64, b: i64), got 1"),
        ("add", refused(g, "add", (1, 2, 3)), "`add` expects 2 arguments (a: i64, b: i64), got 3"),
        (
            "add",
            refused(g, "add", (1, "two")),
            "argument 2 (`b`) of add(a: i64, b: i64): expected an integer, got a string",
        ),
        (
            "add",
            refused(g, "add", BTreeMap::from([("a", 1)])),
            "argument 2 (`b`) of add(a: i64, b: i64) is missing",
        ),
        (
            "add",
            refused(g, "add", BTreeMap::from([("a", 1), ("b", 2), ("c", 3)])),
            "`add` has no parameter `c` (a: i64, b: i64)",
        ),
        (
            "grid",
            refused(g, "grid", (vec![vec!["x"]],)),
            "argument 1 (`rows`) of grid(rows: Vec<Vec<i64>>), at [0][0]: expected an integer, got a string",
        ),
        (
            "greet",
            refused(g, "greet", BTreeMap::from([("name", "Ann")])),
            "argument 1 (`p`) of greet(p: Person): missing field `age`",
        ),
        (
            "greet",
            refused(g, "greet", BTreeMap::from([("p", "Ann")])),
            "argument 1 (`p`) of greet(p: Person): expected a `Person`, got a string (the map named the argument `p`; to pass a map as `p` itself, send it in a tuple: `.args((map,))`)",
        ),
        (
            "mul",
            refused(g, "mul", (1,)),
            "`mul` expects 2 arguments (i64, i64), got 1",
        ),
        (
            "mul",
            refused(g, "mul", BTreeMap::from([("a", 1), ("b", 2)])),
            "`mul` takes its arguments by position (i64, i64): send a tuple, e.g. `.args((a, b))`; only `#[callback]` functions take arguments by name",
        ),
        (
            "describe",
            refused(g, "describe", (ann(), 1)),
            "`describe` expects 1 argument (p: Person), got a list of 2 (to pass a list as the one argument, send it in a tuple: `.args((list,))`)",
        ),
    ];
    for (name, message, expected) in cases {
        assert_eq!(message, format!("{}{expected}", rejected(name)));
    }
}

#[test]
fn arguments_nested_deeper_than_a_node_decodes_are_refused_by_name() {
    let cluster = Cluster::start(Transport::Unix, ENTRY);
    // A debug build of serde takes about 2 KiB of stack a level: the worker's callback
    // threads get room for the 1,023 levels a node decodes.
    let worker = common::unique("deep");
    let _worker = common::spawn_child_with(
        ENTRY,
        "worker",
        &worker,
        &cluster.address,
        &[("RUST_MIN_STACK", "33554432")],
    );
    let g = &cluster.caller;
    g.wait_process_timeout(&worker, WAIT)
        .expect("worker connects");
    // Only a hand-made payload nests this deep: a Rust caller refuses to encode it.
    let mut deep = vec![0x91u8; 1100];
    deep.push(0xc0);
    match g
        .call("levels")
        .on(&worker)
        .raw_args(Bytes::from(deep))
        .timeout(WAIT)
        .fg::<bool>()
    {
        Err(Error::BadArguments { message, .. }) => assert_eq!(
            message,
            "argument 1 (`_v`) of levels(_v: IgnoredAny): nested deeper than 1023 levels (lists, maps or structs inside one another); flatten it, or send it in parts"
        ),
        other => panic!("expected BadArguments, got {other:?}"),
    }
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct TextAge {
    name: String,
    age: String,
}

#[test]
fn result_errors_name_the_type_the_caller_asked_for_without_its_path() {
    let (cluster, _worker) = cluster();
    let g = &cluster.caller;
    let bad_result = |e: Error| match e {
        Error::BadResult {
            ref callback,
            expected,
            ..
        } => {
            assert!(e.source().is_some(), "the decoder's error is kept");
            (callback.clone(), expected, e.to_string())
        }
        other => panic!("expected BadResult, got {other:?}"),
    };
    let e = g
        .call("add")
        .args((1, 2))
        .fg::<String>()
        .expect_err("a number");
    assert_eq!(
        bad_result(e),
        (
            "add".to_string(),
            "alloc::string::String",
            "the result of `add` is an integer, not a `String`".to_string()
        )
    );
    let e = g
        .call("add")
        .args((1, 2))
        .fg::<Vec<u8>>()
        .expect_err("a number");
    assert_eq!(
        bad_result(e).2,
        "the result of `add` is an integer, not a `Vec<u8>`"
    );
    let e = g
        .call("add")
        .args((1, 2))
        .fg::<Person>()
        .expect_err("a number");
    assert_eq!(
        bad_result(e).2,
        "the result of `add` is an integer, not a `Person`"
    );
    let e = g
        .call("people")
        .bg::<Vec<TextAge>>()
        .expect("sent")
        .get()
        .expect_err("ages are numbers");
    assert_eq!(
        bad_result(e).2,
        "the result of `people` does not decode as `Vec<TextAge>`, at [0].age: expected a string, got an integer"
    );
}
