//! The NATS test servers themselves (`common/nats.rs`), before any daffi code runs on
//! them: they start, cluster, crash and come back as the NATS backend's tests assume.
//! Plain TCP and the servers' monitoring endpoints only.

mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;

use common::nats::{json_strings, server_info, NatsCluster, NatsServer};

fn host_port(url: &str) -> &str {
    url.strip_prefix("nats://").expect("a nats:// URL")
}

fn refuses(url: &str) -> bool {
    TcpStream::connect(host_port(url)).is_err()
}

/// Every server of `cluster` has routes to all the others.
fn assert_full_mesh(cluster: &NatsCluster, when: &str) {
    let size = cluster.urls().len();
    for i in 0..size {
        let others: BTreeSet<String> = (0..size)
            .filter(|&j| j != i)
            .map(|j| cluster.name(j).to_string())
            .collect();
        assert_eq!(
            cluster.peers(i),
            others,
            "routes of {} {when}",
            cluster.name(i)
        );
    }
}

#[test]
fn a_server_with_options_comes_back_on_its_port_after_a_crash() {
    let mut server = NatsServer::start_with(&["--auth", "harness-token"]);
    let url = server.url();
    let info = server_info(&url);
    assert!(info.contains(r#""jetstream":true"#), "{info}");
    assert!(info.contains(r#""auth_required":true"#), "{info}");

    server.kill();
    assert!(refuses(&url), "{url} still accepts after SIGKILL");

    server.restart();
    assert_eq!(server.url(), url);
    assert!(server_info(&url).contains(r#""auth_required":true"#));
}

#[test]
fn a_cluster_of_three_forms_again_after_a_server_is_killed_and_restarted() {
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    assert_full_mesh(&cluster, "once started");
    // What failover relies on: a client of one server learns the others' URLs.
    let info = server_info(&urls[0]);
    let learned = json_strings(&info, "connect_urls");
    for url in &urls[1..] {
        assert!(
            learned.contains(&host_port(url)),
            "{url} not in {learned:?}"
        );
    }

    cluster.kill(1);
    assert!(refuses(&urls[1]), "{} still accepts after SIGKILL", urls[1]);
    cluster.wait_formed();
    let only = |i: usize| BTreeSet::from([cluster.name(i).to_string()]);
    assert_eq!(cluster.peers(0), only(2));
    assert_eq!(cluster.peers(2), only(0));

    cluster.restart(1);
    assert_full_mesh(&cluster, "after the restart");
    let info = server_info(&urls[1]);
    assert_eq!(json_strings(&info, "server_name"), [cluster.name(1)]);
}
