//! `daffi-idle-node --connect ENDPOINT --name NAME`: one idle daffi node, as small as a
//! user's own program that only joins a mesh and waits (daffi alone, `Global::start`,
//! no callbacks). Scenario E reads its memory: the memory of an idle node, not of the
//! benchmark's binary with every role and floor linked in. Prints `ready` once
//! connected, and stops when its standard input closes.

use std::io::Read;
use std::process::ExitCode;

use daffi_bench::Endpoint;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("daffi-idle-node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let (connect, name) = arguments()?;
    let node = connect
        .builder()
        .process_name(name)
        .start()
        .map_err(|e| e.to_string())?;
    println!("ready");
    let _ = std::io::stdin().lock().read_to_end(&mut Vec::new());
    node.stop();
    Ok(())
}

/// `--connect ENDPOINT --name NAME`, in either order.
fn arguments() -> Result<(Endpoint, String), String> {
    const USAGE: &str = "usage: daffi-idle-node --connect ENDPOINT --name NAME";
    let (mut connect, mut name) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(USAGE)?;
        match flag.as_str() {
            "--connect" => connect = Some(value.parse::<Endpoint>()?),
            "--name" => name = Some(value),
            _ => return Err(USAGE.into()),
        }
    }
    Ok((connect.ok_or(USAGE)?, name.ok_or(USAGE)?))
}
