//! The Rust half of `examples/python/mixed.py`: a Rust node and a Python node (the
//! package in `crates/daffi-py`) call each other by name through the controller the
//! Python process runs. Python's keyword arguments are the named arguments of a Rust
//! callback; a Rust struct sent as the arguments reaches Python as keyword arguments.
//! Streams cross too, both ways: Python iterates a Rust stream callback and streams
//! its items to a Rust `Incoming` parameter (`& STREAM`); this node reads a Python
//! generator with `.stream()` and streams items to a Python callback with
//! `.stream_from(..)`, which calls it with each.
//!
//! ```text
//! python examples/python/mixed.py          # controller + Python node on port 8890
//! cargo run -p daffi --example mixed       # this Rust node; exits when Python leaves
//! ```
//!
//! A first argument overrides the port.

use daffi::{callback, Global};
use serde::Serialize;

/// Adds two numbers.
#[callback]
fn rust_add(a: i64, b: i64) -> i64 {
    a + b
}

/// Greets by name; Python calls it with keyword arguments.
#[callback]
fn rust_greet(name: String, punctuation: String) -> String {
    format!("Hello from Rust, {name}{punctuation}")
}

/// Divides, or fails with a text that reaches the Python caller.
#[callback]
fn rust_checked_div(a: i64, b: i64) -> Result<i64, String> {
    a.checked_div(b)
        .ok_or_else(|| "division by zero".to_string())
}

/// Counts down to 1: a stream callback, which Python iterates.
#[callback]
fn rust_countdown(from: u32) -> impl Iterator<Item = u32> {
    (1..=from).rev()
}

/// Sums the numbers a caller streams (`g.call.rust_sum(numbers) & STREAM` in Python).
#[callback]
fn rust_sum(numbers: daffi::Incoming<i64>) -> daffi::Result<i64> {
    let mut total = 0;
    for n in numbers {
        total += n?;
    }
    Ok(total)
}

/// The keyword arguments of the Python callback `py_scale(values, factor=1.0)`.
#[derive(Serialize)]
struct Scale<'a> {
    values: &'a [f64],
    factor: f64,
}

fn main() -> daffi::Result<()> {
    let port = match std::env::args().nth(1) {
        Some(text) => text
            .parse()
            .map_err(|_| daffi::Error::Config(format!("`{text}` is not a port")))?,
        None => 8890,
    };
    let g = Global::builder()
        .process_name("rust-node")
        .host("localhost")
        .port(port)
        .on_member_removed(|g, name| {
            if name == "python-node" {
                g.stop();
            }
        })
        .start()?;
    g.wait_function("py_rust_done")?;

    let product: i64 = g.call("py_mul").args((6, 7)).fg()?;
    println!("rust-node: py_mul(6, 7) = {product}");
    let scale = Scale {
        values: &[1.0, 2.5],
        factor: 2.0,
    };
    let scaled: Vec<f64> = g.call("py_scale").args(scale).fg()?;
    println!("rust-node: py_scale(values=[1.0, 2.5], factor=2.0) = {scaled:?}");
    match g.call("py_fail").args(("boom",)).fg::<()>() {
        Err(e) => println!("rust-node: py_fail raised: {e}"),
        Ok(()) => println!("rust-node: py_fail returned"),
    }
    // A Python generator, read as a stream.
    let squares = g
        .call("py_squares")
        .args((4,))
        .stream::<i64>()?
        .into_iter()
        .collect::<daffi::Result<Vec<i64>>>()?;
    println!("rust-node: py_squares(4) streamed {squares:?}");
    // Items streamed to a Python callback: it is called with each in turn.
    let words = futures_util::stream::iter(["a", "b", "c"]);
    g.call("py_record").stream_from(words).fg::<()>()?;
    let recorded: Vec<String> = g.call("py_recorded").fg()?;
    println!("rust-node: streamed [a, b, c] to py_record, which got {recorded:?}");
    // Tells the Python node that this side is done calling; it stops once its own
    // calls are done too, and then this node (see `on_member_removed`).
    g.call("py_rust_done").no_return()?;
    g.join()
}
