//! Large byte payloads with `daffi::Blob`: sent from the caller's own buffer and received
//! as a slice of the frame that carried them, never copied on the way.
//!
//! ```text
//! cargo run --release --example blob
//! ```
//!
//! This process runs the controller and a node serving `checksum`; it starts a second
//! process (itself, with `--sender PORT`) that sends 1, 16 and 100 MiB to it and prints
//! what came back and how fast.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daffi::{Blob, Global};

type Error = Box<dyn std::error::Error>;

/// Payloads up to this size are accepted (the default frame limit is 128 MiB).
const FRAME_LIMIT: usize = 256 * 1024 * 1024;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, port] if flag == "--sender" => sender(port.parse()?),
        _ => receiver(),
    }
}

/// The controller, and a node whose `checksum` gets each payload as a `Blob`.
fn receiver() -> Result<(), Error> {
    let g = Global::builder()
        .process_name("storage")
        .init_controller(true)
        .host("127.0.0.1")
        .max_frame_size(FRAME_LIMIT)
        .start()?;
    // The argument is a slice of the received frame: no second buffer.
    g.register("checksum", |data: Blob| -> (u64, u64) {
        let sum = data.iter().fold(0u64, |s, &b| s.wrapping_add(u64::from(b)));
        (data.len() as u64, sum)
    })?;
    let port = g.port().ok_or("the controller has no TCP port")?;
    let status = Command::new(std::env::current_exe()?)
        .args(["--sender", &port.to_string()])
        .stdin(Stdio::null())
        .status()?;
    g.stop();
    if !status.success() {
        return Err(format!("the sender failed: {status}").into());
    }
    Ok(())
}

/// Sends three payloads and checks the answers.
fn sender(port: u16) -> Result<(), Error> {
    let g = Global::builder()
        .process_name("camera")
        .host("127.0.0.1")
        .port(port)
        .max_frame_size(FRAME_LIMIT)
        .start()?;
    g.wait_process_timeout("storage", Duration::from_secs(10))?;
    for mib in [1usize, 16, 100] {
        let data: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.iter().fold(0u64, |s, &b| s.wrapping_add(u64::from(b)));
        // Written to the socket from this buffer: no encoded copy beside it.
        let blob = Blob::from(data);
        let started = Instant::now();
        let (len, sum): (u64, u64) = g.call("checksum").args((blob,)).fg()?;
        let secs = started.elapsed().as_secs_f64();
        if len != (mib << 20) as u64 || sum != expected {
            return Err(format!("{mib} MiB came back as {len} bytes, checksum {sum}").into());
        }
        println!(
            "[camera] {mib:>3} MiB: checksum {sum}, round trip with the sum {:.1} ms ({:.0} MiB/s)",
            secs * 1e3,
            mib as f64 / secs
        );
    }
    g.stop();
    Ok(())
}
