//! Waiting on a state nothing signals (what a server's monitoring endpoint shows, the
//! threads of a process): asked again until it holds, within [`WAIT`].

use std::time::{Duration, Instant};

use super::WAIT;

/// Retries `probe` until it succeeds, for at most [`WAIT`], every 50 ms; panics with
/// `what` and the last failure past that.
pub fn poll_until(what: &str, mut probe: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match probe() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("waited {WAIT:?} for {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
