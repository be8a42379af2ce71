//! Reads a nats-server's monitoring endpoints (`nats-server -m PORT`): `/varz` for its
//! memory, `/connz` for the messages it sent each connection (named by its node).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::Deserialize;

use super::proc::Result;

/// How long one monitoring request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Varz {
    /// Resident memory, in bytes.
    mem: u64,
}

#[derive(Deserialize)]
struct Connz {
    connections: Vec<Connection>,
}

#[derive(Deserialize)]
struct Connection {
    #[serde(default)]
    name: String,
    /// Messages the server sent to this client.
    out_msgs: u64,
}

/// The server's resident memory, in MiB.
pub fn server_memory_mib(monitor: &str) -> Result<f64> {
    let varz: Varz = get_json(monitor, "/varz")?;
    Ok(varz.mem as f64 / (1024.0 * 1024.0))
}

/// How many messages the server has sent to the connection named `name` (a daffi node
/// names its connection after itself).
pub fn messages_to(monitor: &str, name: &str) -> Result<u64> {
    let connz: Connz = get_json(monitor, "/connz?limit=100000")?;
    connz
        .connections
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.out_msgs)
        .ok_or_else(|| {
            format!("no connection named {name:?} on the nats-server at {monitor}").into()
        })
}

/// GETs `path` from `monitor` (`HOST:PORT`) and decodes its JSON body.
fn get_json<T: serde::de::DeserializeOwned>(monitor: &str, path: &str) -> Result<T> {
    let mut stream = TcpStream::connect(monitor)
        .map_err(|e| format!("cannot reach the nats-server's monitoring at {monitor}: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {monitor}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let body_at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{monitor}{path}: no HTTP body"))?;
    Ok(serde_json::from_slice(&response[body_at + 4..])
        .map_err(|e| format!("{monitor}{path}: {e}"))?)
}
