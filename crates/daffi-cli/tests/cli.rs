//! `daffi ls`, `daffi call` and `daffi watch`: the built binary run against a
//! `daffi controller` process and nodes in the test process, over real sockets.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::wire;
use common::{
    daffi, daffi_command, start_controller, stderr, stdout, tcp_controller, tcp_controller_with,
    Endpoint, KillOnDrop, WAIT,
};
use daffi::Global;
use daffi_wire::frame::FLAG_NO_REPLY;
use daffi_wire::{Frame, Header, Kind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A controller and two nodes: `calc` serves a set of callbacks, `calc2` serves `add`
/// and `whoami` too.
struct Mesh {
    endpoint: Endpoint,
    calc: Global,
    calc2: Global,
    recorded: mpsc::Receiver<i64>,
    _controller: KillOnDrop,
}

const CALC_CALLBACKS: [&str; 8] = [
    "add", "cfg", "fails", "greet", "range", "record", "slow", "whoami",
];

fn mesh() -> Mesh {
    let (controller, endpoint) = tcp_controller();
    mesh_on(controller, endpoint)
}

fn mesh_on(controller: KillOnDrop, endpoint: Endpoint) -> Mesh {
    let calc = endpoint.node("calc");
    calc.register("add", |a: i64, b: i64| a + b).expect("add");
    calc.register("greet", |name: String| format!("hello {name}"))
        .expect("greet");
    calc.register("range", |n: i64| (0..n).collect::<Vec<i64>>())
        .expect("range");
    calc.register("cfg", |mut m: HashMap<String, i64>| {
        m.insert("seen".into(), 1);
        m
    })
    .expect("cfg");
    calc.register("whoami", || "calc".to_string())
        .expect("whoami");
    calc.register("fails", |why: String| Err::<i64, _>(why))
        .expect("fails");
    calc.register("slow", |ms: u64| {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    })
    .expect("slow");
    let (tx, recorded) = mpsc::channel();
    let tx = Mutex::new(tx);
    calc.register("record", move |n: i64| {
        let _ = tx.lock().expect("lock").send(n);
    })
    .expect("record");

    let calc2 = endpoint.node("calc2");
    calc2.register("add", |a: i64, b: i64| a + b).expect("add");
    calc2
        .register("whoami", || "calc2".to_string())
        .expect("whoami");
    // Once another node sees a callback, the controller has it too.
    for name in CALC_CALLBACKS {
        calc2
            .wait_function_timeout(name, WAIT)
            .expect("calc's callbacks announced");
    }
    calc.wait_function_timeout("whoami", WAIT)
        .expect("calc2's callbacks announced");
    Mesh {
        endpoint,
        calc,
        calc2,
        recorded,
        _controller: controller,
    }
}

/// Runs `daffi call ...`, checks it succeeded, and returns its output as JSON.
fn call_json(endpoint: &Endpoint, args: &[&str]) -> Value {
    let mut full = vec!["call"];
    full.extend_from_slice(args);
    let out = daffi(endpoint, &full);
    assert!(
        out.status.success(),
        "daffi {full:?}: {:?}\n{}",
        out.status,
        stderr(&out)
    );
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("daffi {full:?} printed no JSON ({e}): {:?}", stdout(&out)))
}

/// Runs `daffi call ...`, expects it to fail; returns its exit code and stderr.
fn call_fails(endpoint: &Endpoint, args: &[&str]) -> (i32, String) {
    let mut full = vec!["call"];
    full.extend_from_slice(args);
    let out = daffi(endpoint, &full);
    assert!(!out.status.success(), "daffi {full:?} succeeded");
    (out.status.code().expect("exit code"), stderr(&out))
}

// ---- ls ------------------------------------------------------------------------------

#[test]
fn ls_lists_the_nodes_and_their_callbacks() {
    let m = mesh();

    let out = daffi(&m.endpoint, &["ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NODE") && lines[0].contains("CALLBACKS"));
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>().join(" "),
        format!("calc {}", CALC_CALLBACKS.join(", "))
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>().join(" "),
        "calc2 add, whoami"
    );

    let out = daffi(&m.endpoint, &["ls", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(
        listed,
        json!([
            { "name": "calc", "callbacks": CALC_CALLBACKS },
            { "name": "calc2", "callbacks": ["add", "whoami"] },
        ])
    );
}

// ---- call ----------------------------------------------------------------------------

#[test]
fn call_turns_json_arguments_into_a_json_result() {
    let m = mesh();
    let e = &m.endpoint;
    assert_eq!(call_json(e, &["add", "1", "2", "--on", "calc"]), json!(3));
    assert_eq!(call_json(e, &["add", "-1", "-2"]), json!(-3));
    assert_eq!(call_json(e, &["greet", "\"Ann\""]), json!("hello Ann"));
    assert_eq!(call_json(e, &["range", "4"]), json!([0, 1, 2, 3]));
    assert_eq!(
        call_json(e, &["cfg", r#"{"k": 1}"#]),
        json!({ "k": 1, "seen": 1 })
    );
    // A callback returning nothing prints null.
    assert_eq!(call_json(e, &["record", "1"]), Value::Null);
}

#[test]
fn call_stream_prints_one_json_line_per_item() {
    let m = mesh();
    m.calc
        .register_stream("count", |n: u64| (1..=n).map(|i| json!({ "i": i })))
        .expect("count");
    m.calc2
        .wait_function_timeout("count", WAIT)
        .expect("count announced");
    let out = daffi(&m.endpoint, &["call", "count", "3", "--stream"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(
        lines,
        vec![json!({"i": 1}), json!({"i": 2}), json!({"i": 3})]
    );
    // A plain callback is not a stream: a named failure, nothing printed.
    let (code, message) = call_fails(&m.endpoint, &["add", "1", "2", "--stream"]);
    assert_eq!(code, 1, "{message}");
    assert!(message.contains("plain callback"), "{message}");
}

#[test]
fn call_broadcast_and_on_pick_the_nodes() {
    let m = mesh();
    let e = &m.endpoint;
    assert_eq!(
        call_json(e, &["whoami", "--broadcast"]),
        json!({ "calc": "calc", "calc2": "calc2" })
    );
    assert_eq!(
        call_json(e, &["add", "2", "3", "--broadcast"]),
        json!({ "calc": 5, "calc2": 5 })
    );
    for node in ["calc", "calc2", "calc"] {
        assert_eq!(call_json(e, &["whoami", "--on", node]), json!(node));
    }
}

#[test]
fn call_failures_have_their_documented_exit_codes() {
    let m = mesh();
    let e = &m.endpoint;

    let (code, err) = call_fails(e, &["nosuch", "1"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no node serves callback `nosuch`"), "{err}");
    let (code, err) = call_fails(e, &["range", "1", "--on", "calc2"]);
    assert_eq!(code, 3, "{err}");

    let (code, err) = call_fails(e, &["add", "1", "2", "--on", "nobody"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("`nobody`"), "{err}");

    let (code, err) = call_fails(e, &["slow", "3000", "--timeout", "100ms"]);
    assert_eq!(code, 5, "{err}");

    let (code, err) = call_fails(e, &["fails", "\"on purpose\""]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("on purpose"), "{err}");

    let (code, err) = call_fails(e, &["greet", "Ann"]);
    assert_eq!(code, 7, "{err}");
    assert!(
        err.contains("not JSON") && err.contains(r#"'"Ann"'"#),
        "{err}"
    );
    let (code, err) = call_fails(e, &["add", "\"one\"", "2"]);
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("rejected its arguments"), "{err}");

    let (code, err) = call_fails(e, &["add", "1", "--broadcast", "--on", "calc"]);
    assert_eq!(code, 2, "{err}");

    // A broadcast where one node fails prints what the others returned.
    m.calc
        .register("half", || Ok::<i64, String>(1))
        .expect("half");
    m.calc2
        .register("half", || Err::<i64, _>("calc2 fails".to_string()))
        .expect("half");
    m.calc
        .wait_function_timeout("half", WAIT)
        .expect("calc2's half announced");
    m.calc2
        .wait_function_timeout("half", WAIT)
        .expect("calc's half announced");
    let out = daffi(e, &["call", "half", "--broadcast"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert_eq!(stdout(&out), r#"{"calc":1}"#);
    assert!(stderr(&out).contains("calc2 fails"), "{}", stderr(&out));
}

#[test]
fn an_unreachable_controller_exits_with_8() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let endpoint = Endpoint::Tcp(port);
    for args in [
        &["call", "add", "1", "2", "--connect-timeout", "200ms"][..],
        &["ls", "--connect-timeout", "200ms"][..],
        &["watch", "--connect-timeout", "200ms"][..],
    ] {
        let out = daffi(&endpoint, args);
        assert_eq!(out.status.code(), Some(8), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("unreachable"), "{}", stderr(&out));
    }
}

#[test]
fn no_return_reaches_the_callee_before_the_command_exits() {
    let m = mesh();
    for n in [7, 8, 9] {
        let out = daffi(
            &m.endpoint,
            &["call", "record", &n.to_string(), "--no-return"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "");
        assert_eq!(m.recorded.recv_timeout(WAIT), Ok(n));
    }
    let out = daffi(
        &m.endpoint,
        &["call", "add", "1", "1", "--broadcast", "--no-return"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
}

#[test]
fn environment_variables_find_a_unix_socket_controller() {
    let sock = std::env::temp_dir()
        .join("daffi-cli-tests")
        .join(format!("env-{}.sock", std::process::id()));
    let (controller, _) = start_controller(&["--unix-socket", &sock.display().to_string()]);
    let m = mesh_on(controller, Endpoint::Unix(sock.clone()));
    let out = daffi_command()
        .args(["call", "add", "20", "22"])
        .env("DAFFI_UNIX_SOCKET", &sock)
        .output()
        .expect("run daffi");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42");
    drop(m);
}

#[test]
fn environment_variables_find_a_tcp_controller() {
    let m = mesh();
    let Endpoint::Tcp(port) = m.endpoint else {
        unreachable!("mesh() is on TCP")
    };
    let out = daffi_command()
        .args(["ls", "--json"])
        .env("DAFFI_HOST", "127.0.0.1")
        .env("DAFFI_PORT", port.to_string())
        .output()
        .expect("run daffi");
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
}

// ---- watch ---------------------------------------------------------------------------

/// A running `daffi watch --json`, its stdout read line by line on a thread.
struct Watch {
    child: KillOnDrop,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Watch {
    fn start(endpoint: &Endpoint) -> Watch {
        Watch::start_with(endpoint, &[])
    }

    /// Like [`Watch::start`], with more flags.
    fn start_with(endpoint: &Endpoint, flags: &[&str]) -> Watch {
        let mut child = daffi_command()
            .args(["watch", "--json", "--interval", "100ms"])
            .args(flags)
            .args(endpoint.flags())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn daffi watch");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Watch {
            child: KillOnDrop(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one matches `want`; panics after `WAIT`.
    fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("no {what} within {WAIT:?} ({e}); saw {:#?}", self.seen),
            }
        }
    }
}

/// Matches a line with this event about this node.
fn is(event: &'static str, node: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["event"] == event && v["node"] == node
}

#[test]
fn watch_json_prints_joins_leaves_and_call_counts() {
    let m = mesh();
    let mut watch = Watch::start(&m.endpoint);

    let ready = watch.expect("the watching line", |v| v["event"] == "watching");
    assert!(ready["node"]
        .as_str()
        .is_some_and(|n| n.starts_with("daffi-cli-")));
    assert!(ready["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    let calc = watch.expect("calc as a member", is("member", "calc"));
    assert_eq!(calc["callbacks"], json!(CALC_CALLBACKS));

    // The nodes of `daffi` commands (this watch, this ls) are listed with --all only.
    let own = ready["node"].as_str().expect("own name").to_string();
    let listed = |args: &[&str]| -> Vec<String> {
        let out = daffi(&m.endpoint, args);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
        v.as_array()
            .expect("array")
            .iter()
            .map(|n| n["name"].as_str().expect("name").to_string())
            .collect()
    };
    assert_eq!(listed(&["ls", "--json"]), ["calc", "calc2"]);
    assert!(listed(&["ls", "--json", "--all"]).contains(&own));

    let visitor = m.endpoint.node("visitor");
    visitor.register("hello", || "hi").expect("register");
    let joined = watch.expect("visitor joining", is("joined", "visitor"));
    if joined["callbacks"] != json!(["hello"]) {
        // It joined before it registered `hello`.
        let updated = watch.expect("visitor's callbacks", is("updated", "visitor"));
        assert_eq!(updated["callbacks"], json!(["hello"]));
    }

    visitor
        .wait_function_timeout("range", WAIT)
        .expect("visitor knows range");
    for _ in 0..3 {
        let _: Vec<i64> = visitor.call("range").args((2,)).fg().expect("range");
    }
    let counted = watch.expect("3 calls of range", |v| {
        v["event"] == "calls" && v["callback"] == "range" && v["total"] == 3
    });
    assert!(counted["new"].as_u64().is_some_and(|n| n >= 1), "{counted}");

    visitor.stop();
    watch.expect("visitor leaving", is("left", "visitor"));
    let shown_cli_nodes: Vec<&Value> = watch
        .seen
        .iter()
        .filter(|v| v["event"] != "watching")
        .filter(|v| {
            v["node"]
                .as_str()
                .is_some_and(|n| n.starts_with("daffi-cli-"))
        })
        .collect();
    assert!(shown_cli_nodes.is_empty(), "{shown_cli_nodes:#?}");

    // SIGTERM ends the watch with success.
    let pid = watch.child.0.id().to_string();
    let kill = |signal: &str| Command::new("kill").args([signal, &pid]).status();
    assert!(kill("-TERM").expect("run kill").success());
    let mut child = watch.child;
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.0.wait());
    });
    match done.recv_timeout(WAIT) {
        Ok(status) => assert!(status.expect("wait").success()),
        Err(_) => {
            let _ = kill("-KILL");
            panic!("watch did not exit within {WAIT:?} of SIGTERM");
        }
    }
}

// ---- stats that outgrow a frame --------------------------------------------------------

/// The frame limit of every process in the test below, as a user may set it.
const FRAME: usize = 256 * 1024;

/// A raw client, joined as a node serving nothing, that sends frames by hand.
struct RawNode {
    name: String,
    stream: std::net::TcpStream,
}

impl RawNode {
    fn join(endpoint: &Endpoint, name: &str) -> RawNode {
        let Endpoint::Tcp(port) = endpoint else {
            panic!("TCP only")
        };
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", *port)).expect("connect");
        stream
            .write_all(&wire::opening(name, None, &[]))
            .expect("opening");
        let mut node = RawNode {
            name: name.to_string(),
            stream,
        };
        let welcome = node.next_frame();
        assert_eq!(welcome.kind(), Kind::Welcome);
        node
    }

    /// Calls `callback` on `on` without asking for a reply.
    fn call_one_way(&mut self, on: &str, callback: &str) {
        let header = Header {
            kind: Kind::Request,
            flags: FLAG_NO_REPLY,
            call_id: 0,
            timeout_ms: 0,
            src: &self.name,
            dst: on,
            name: callback,
        };
        let mut frame = header.encode(1).to_vec();
        frame.push(0x90); // no arguments
        self.stream.write_all(&frame).expect("request");
    }

    /// Asks for the controller's counters: they count every request sent before.
    fn stats(&mut self) -> ControlAnswer {
        let body = wire::encode(&ControlRequest::Stats);
        let header = Header {
            kind: Kind::ControlRequest,
            flags: 0,
            call_id: 1,
            timeout_ms: 0,
            src: &self.name,
            dst: "",
            name: "",
        };
        let mut frame = header.encode(body.len()).to_vec();
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).expect("stats request");
        loop {
            let frame = self.next_frame();
            if frame.kind() == Kind::ControlReply {
                return wire::decode(&frame.payload());
            }
        }
    }

    /// Reads what the controller sends until it has said that each of `names` left. A
    /// node that stops is first announced as leaving, and serves its callbacks until its
    /// link closes; then the controller forgets it, and says so: a request sent after
    /// that sees it gone.
    fn wait_until_left(&mut self, names: &[&str]) {
        let mut waiting: HashSet<&str> = names.iter().copied().collect();
        while !waiting.is_empty() {
            let frame = self.next_frame();
            if frame.kind() != Kind::Membership {
                continue;
            }
            let event: MembershipEvent = wire::decode(&frame.payload());
            if let MembershipEvent::Left { name } = event {
                waiting.remove(name.as_str());
            }
        }
    }

    fn next_frame(&mut self) -> Frame {
        wire::read_frame(&mut self.stream)
    }
}

/// The control payloads [`RawNode`] sends and reads, written from `docs/PROTOCOL.md`.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ControlRequest {
    Stats,
}

#[derive(Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum ControlAnswer {
    Stats {
        omitted_names: u64,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum MembershipEvent {
    Left {
        name: String,
    },
    #[serde(other)]
    Other,
}

/// Callback `i` of `node`, `len` bytes long.
fn long_name(node: &str, i: usize, len: usize) -> String {
    let head = format!("{node}-{i}-");
    format!("{head}{}", "x".repeat(len - head.len()))
}

#[test]
fn stats_and_watch_keep_working_after_thousands_of_long_names() {
    const LEAVERS: usize = 3;
    const SERVED: usize = 25;
    const SERVED_LEN: usize = 8_000;
    const MADE_UP: usize = 1_000;
    const MADE_UP_LEN: usize = 2_000;
    const LIVE_CALLS: u64 = 30;
    let frame = FRAME.to_string();
    let small_frames = ["--max-frame-size", frame.as_str()];
    let (_controller, endpoint) = tcp_controller_with(&small_frames);
    let mut watch = Watch::start_with(&endpoint, &small_frames);
    let node = |name: &str| {
        endpoint
            .builder(name)
            .max_frame_size(FRAME)
            .start()
            .expect("node connects")
    };
    let live = node("live");
    live.register("live_add", |a: i64, b: i64| a + b)
        .expect("live_add");
    let caller = endpoint
        .builder("stats-caller")
        .max_frame_size(FRAME)
        .start()
        .expect("caller connects");
    // Nodes serving long names (200 KB each), called once each.
    let leavers: Vec<Global> = (0..LEAVERS)
        .map(|n| {
            let name = format!("leaver{n}");
            let g = node(&name);
            for i in 0..SERVED {
                g.register(&long_name(&name, i, SERVED_LEN), || 0)
                    .expect("within the limit");
            }
            g
        })
        .collect();
    for g in &leavers {
        for i in 0..SERVED {
            let callback = long_name(g.process_name(), i, SERVED_LEN);
            caller
                .wait_function_timeout(&callback, WAIT)
                .expect("announced");
            let zero: i64 = caller
                .call(&callback)
                .on(g.process_name())
                .fg()
                .expect("call");
            assert_eq!(zero, 0);
        }
    }
    for i in 0..LIVE_CALLS as i64 {
        let sum: i64 = caller.call("live_add").args((i, 1)).fg().expect("call");
        assert_eq!(sum, i + 1);
    }
    // A hostile node calls thousands of long made-up names on the leavers (2 MB of
    // names each, far over the frame limit); the controller forwards and counts them.
    let mut prankster = RawNode::join(&endpoint, "prankster");
    for g in &leavers {
        for i in 0..MADE_UP {
            prankster.call_one_way(g.process_name(), &long_name("made-up", i, MADE_UP_LEN));
        }
    }
    let served_calls = (LEAVERS * SERVED) as u64;
    let total = LIVE_CALLS + served_calls + (LEAVERS * MADE_UP) as u64;

    // While the leavers are connected: the answer fits, keeps the most called names,
    // and accounts for every request. (The prankster asks first: a node's stats
    // request counts every request that node sent before it.)
    let ControlAnswer::Stats { omitted_names, .. } = prankster.stats() else {
        panic!("not a stats answer")
    };
    assert!(omitted_names > 0);
    let stats = caller.controller_stats().expect("stats");
    assert_eq!(stats.calls.get("live_add"), Some(&LIVE_CALLS));
    assert!(
        stats.calls.keys().all(|name| !name.starts_with("made-up")),
        "names nobody serves are listed"
    );
    assert!(stats.omitted_names > 0, "600 KB of names were all listed");
    let listed: usize = stats.calls.keys().map(|name| name.len() + 16).sum();
    assert!(listed <= FRAME / 4, "{listed} bytes of names listed");
    assert_eq!(stats.calls.values().sum::<u64>() + stats.other_calls, total);

    // Once they left, only live names are listed, and the rest is summed.
    for g in &leavers {
        g.stop();
    }
    let names: Vec<&str> = leavers.iter().map(Global::process_name).collect();
    prankster.wait_until_left(&names);
    let stats = caller.controller_stats().expect("stats");
    assert_eq!(
        stats.calls,
        HashMap::from([("live_add".to_string(), LIVE_CALLS)])
    );
    assert_eq!(stats.other_calls, total - LIVE_CALLS);
    assert_eq!(stats.omitted_names, 0);

    // `daffi watch` kept polling all along: it shows the live count and the others.
    watch.expect("live_add's count", |v| {
        v["event"] == "calls" && v["callback"] == "live_add" && v["total"] == LIVE_CALLS
    });
    watch.expect("the other names' count", |v| {
        v["event"] == "other_calls" && v["total"] == total - LIVE_CALLS
    });
    let _: i64 = caller.call("live_add").args((1, 1)).fg().expect("call");
    watch.expect("one more call of live_add", |v| {
        v["event"] == "calls" && v["callback"] == "live_add" && v["total"] == LIVE_CALLS + 1
    });
}

#[test]
fn watch_with_a_zero_interval_is_a_usage_error() {
    // Refused while parsing the flags: no controller is needed, none is asked.
    let out = daffi(&Endpoint::Tcp(1), &["watch", "--interval", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the interval must be more than zero"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_timeout_that_is_not_a_duration_or_is_zero_is_a_usage_error() {
    // Refused while parsing the flags: no controller is needed, none is asked.
    let out = daffi(&Endpoint::Tcp(1), &["call", "add", "--timeout", "abc"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cannot read `abc` as a duration")
            && err.contains("e.g. 250ms, 5s, 1m30s")
            && !err.contains("schedule"),
        "{err}"
    );
    let out = daffi(&Endpoint::Tcp(1), &["call", "add", "--timeout", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the timeout must be more than zero"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_one_millisecond_timeout_fires() {
    let m = mesh();
    for extra in [&[][..], &["--broadcast"][..]] {
        let mut args = vec!["slow", "3000", "--timeout", "1ms"];
        args.extend_from_slice(extra);
        let (code, err) = call_fails(&m.endpoint, &args);
        assert_eq!(code, 5, "{err}");
        assert!(err.contains("did not complete within 1ms"), "{err}");
    }
}

#[test]
fn failures_advise_what_the_command_line_offers() {
    let m = mesh();
    let e = &m.endpoint;
    for (args, says) in [
        (
            &["nosuch"][..],
            "no node serves callback `nosuch`; `daffi ls`",
        ),
        (
            &["range", "1", "--on", "calc2"][..],
            "node `calc2` does not serve callback `range`; `daffi ls`",
        ),
        (
            &["add", "1", "2", "--on", "nobody"][..],
            "node `nobody` is not connected; `daffi ls` lists the connected nodes to pass to --on",
        ),
    ] {
        let (_, err) = call_fails(e, args);
        assert!(err.contains(says), "{err}");
        assert!(!err.contains("wait_"), "{err}");
    }
}

#[test]
fn the_benchmark_is_not_in_the_daffi_binary_and_help_says_where_it_is() {
    let out = daffi(&Endpoint::Tcp(1), &["bench", "--quick"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = daffi(&Endpoint::Tcp(1), &["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        help.contains("cargo run --release -p daffi-bench") && !help.contains("\n  bench "),
        "{help}"
    );
}
