//! `daffi ls`, `call` and `watch` with `--nats`: the built binary against a mesh on a
//! real nats-server, whose nodes run in the test process.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::sync::mpsc;

use common::nats::NatsServer;
use common::{daffi_command, stderr, stdout, unique, KillOnDrop, WAIT};
use daffi::Global;
use serde_json::{json, Value};

/// A mesh of its own (a namespace) on a server: where `daffi` finds it.
struct NatsMesh {
    url: String,
    namespace: String,
}

impl NatsMesh {
    fn on(server: &NatsServer) -> NatsMesh {
        NatsMesh {
            url: server.url(),
            namespace: unique("cli"),
        }
    }

    fn flags(&self) -> [&str; 4] {
        ["--nats", &self.url, "--namespace", &self.namespace]
    }

    /// A node in this mesh that serves `whoami` (its name) and `add`.
    fn node(&self, name: &str) -> Global {
        let g = Global::builder()
            .nats(self.url.clone())
            .namespace(self.namespace.clone())
            .process_name(name)
            .connect_timeout(WAIT)
            .start()
            .expect("node joins the mesh");
        let own = name.to_string();
        g.register("whoami", move || own.clone()).expect("whoami");
        g.register("add", |a: i64, b: i64| a + b).expect("add");
        g
    }

    /// Runs `daffi` with `args` and the flags that find this mesh.
    fn daffi(&self, args: &[&str]) -> Output {
        daffi_command()
            .args(args)
            .args(self.flags())
            .output()
            .expect("run daffi")
    }

    /// Runs `daffi args..`, checks it succeeded, and returns its output as JSON.
    fn json(&self, args: &[&str]) -> Value {
        let out = self.daffi(args);
        assert!(out.status.success(), "daffi {args:?}: {}", stderr(&out));
        serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("daffi {args:?} printed no JSON ({e}): {}", stdout(&out)))
    }
}

/// Two nodes, each seen by the other (so every node's view has both).
fn two_nodes(mesh: &NatsMesh) -> (Global, Global) {
    let calc = mesh.node("calc");
    let calc2 = mesh.node("calc2");
    calc.wait_process_timeout("calc2", WAIT)
        .expect("calc2 seen");
    calc2.wait_process_timeout("calc", WAIT).expect("calc seen");
    for g in [&calc, &calc2] {
        g.wait_function_timeout("add", WAIT).expect("add seen");
    }
    (calc, calc2)
}

#[test]
fn ls_and_call_reach_the_nodes_of_a_nats_mesh() {
    let server = NatsServer::start();
    let mesh = NatsMesh::on(&server);
    let (_calc, _calc2) = two_nodes(&mesh);

    let listed = mesh.json(&["ls", "--json"]);
    let mut names: Vec<&str> = listed
        .as_array()
        .expect("an array")
        .iter()
        .map(|m| m["name"].as_str().expect("a name"))
        .collect();
    names.sort();
    assert_eq!(names, ["calc", "calc2"], "{listed}");
    assert_eq!(listed[0]["callbacks"], json!(["add", "whoami"]));

    assert_eq!(mesh.json(&["call", "add", "1", "2"]), json!(3));
    assert_eq!(
        mesh.json(&["call", "whoami", "--on", "calc2"]),
        json!("calc2")
    );
    assert_eq!(
        mesh.json(&["call", "whoami", "--broadcast"]),
        json!({ "calc": "calc", "calc2": "calc2" })
    );
    let out = mesh.daffi(&["call", "whoami", "--on", "nobody"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

#[test]
fn the_environment_finds_a_nats_mesh() {
    let server = NatsServer::start();
    let mesh = NatsMesh::on(&server);
    let _calc = mesh.node("calc");
    let out = daffi_command()
        .args(["call", "add", "20", "22"])
        .env("DAFFI_NATS", &mesh.url)
        .env("DAFFI_NAMESPACE", &mesh.namespace)
        .env("DAFFI_CONNECT_TIMEOUT", "20s")
        .output()
        .expect("run daffi");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "42");
}

#[test]
fn a_mesh_in_another_namespace_is_not_seen() {
    let server = NatsServer::start();
    let mesh = NatsMesh::on(&server);
    let _calc = mesh.node("calc");
    let other = NatsMesh::on(&server);
    assert_eq!(other.json(&["ls", "--json"]), json!([]));
    let out = other.daffi(&["ls"]);
    assert_eq!(
        stdout(&out),
        format!("no nodes are connected to {}", other.url)
    );
}

#[test]
fn watch_shows_nodes_of_a_nats_mesh_joining_and_leaving() {
    let server = NatsServer::start();
    let mesh = NatsMesh::on(&server);
    let _calc = mesh.node("calc");
    let mut child = daffi_command()
        .args(["watch", "--json", "--interval", "100ms"])
        .args(mesh.flags())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn daffi watch");
    let lines = child.stdout.take().expect("piped stdout");
    let _watch = KillOnDrop(child);
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(lines).lines().map_while(Result::ok) {
            let event: Value = serde_json::from_str(&line).expect("a JSON line");
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    let next = || events.recv_timeout(WAIT).expect("the next event of watch");

    let first = next();
    assert_eq!(first["event"], "watching");
    assert_eq!(first["controller"], mesh.url.as_str());
    // `calc` joined before: it is a member at start, or it joins while watch starts.
    let member = next();
    assert!(
        ["member", "joined"].contains(&member["event"].as_str().unwrap_or_default()),
        "{member}"
    );
    assert_eq!(member["node"], "calc");
    assert_eq!(member["callbacks"], json!(["add", "whoami"]));

    let late = mesh.node("late");
    let joined = next();
    assert_eq!(
        (&joined["event"], &joined["node"]),
        (&json!("joined"), &json!("late"))
    );
    late.stop();
    // Its callbacks may show up first, then it leaves; no call counts over NATS.
    let left = std::iter::repeat_with(next)
        .find(|e| e["event"] != "updated")
        .expect("an event");
    assert_eq!(
        (&left["event"], &left["node"]),
        (&json!("left"), &json!("late"))
    );
}

#[test]
fn nats_with_a_controller_address_is_a_usage_error() {
    for flags in [["--port", "8888"], ["--host", "h"], ["--unix-socket", "/s"]] {
        let out = daffi_command()
            .args(["ls", "--nats", "nats://127.0.0.1:4222"])
            .args(flags)
            .output()
            .expect("run daffi");
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("cannot be used with"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn nats_options_without_nats_are_a_usage_error() {
    for flags in [["--namespace", "other"], ["--nats-credentials", "/x.creds"]] {
        let out = daffi_command()
            .arg("ls")
            .args(flags)
            .output()
            .expect("run daffi");
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("--nats"), "{}", stderr(&out));
    }
}

#[test]
fn unreachable_nats_servers_exit_with_8() {
    let mut server = NatsServer::start();
    let url = server.url();
    server.kill();
    let out = daffi_command()
        .args(["ls", "--nats", &url, "--connect-timeout", "500ms"])
        .output()
        .expect("run daffi");
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert!(stderr(&out).contains("127.0.0.1"), "{}", stderr(&out));
}
