//! A node to try the `daffi` command on: serves `add`, `greet` and `cfg` until Ctrl-C.
//!
//! ```text
//! daffi controller --port 8888                      # terminal 1
//! cargo run -p daffi-cli --example calc -- 8888     # terminal 2 (name: calc)
//! daffi call add 1 2 --port 8888                    # terminal 3
//! ```

use std::collections::BTreeMap;

use daffi::{callback, Global};

/// Adds two numbers.
#[callback]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Greets by name.
#[callback]
async fn greet(name: String) -> String {
    format!("hello {name}")
}

/// Echoes a map of settings, with the number of keys added.
#[callback]
fn cfg(mut settings: BTreeMap<String, serde_json::Value>) -> BTreeMap<String, serde_json::Value> {
    let keys = settings.len();
    settings.insert("keys".into(), keys.into());
    settings
}

fn main() -> daffi::Result<()> {
    let mut args = std::env::args().skip(1);
    let port = args.next().and_then(|p| p.parse().ok()).unwrap_or(8888);
    let name = args.next().unwrap_or_else(|| "calc".into());
    let g = Global::builder()
        .process_name(name)
        .host("localhost")
        .port(port)
        .start()?;
    println!(
        "{} serves add, greet and cfg; Ctrl-C to stop",
        g.process_name()
    );
    g.join()
}
