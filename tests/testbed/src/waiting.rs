//! Waiting, bounded, for something a test bed is expected to do.

use std::time::{Duration, Instant};

/// Polls `check` every 10 ms until it holds; how long that took, or `what`
/// and the bound when `timeout` passes first.
pub fn try_wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let started = Instant::now();
    while !check() {
        if started.elapsed() >= timeout {
            return Err(format!("{what}: not within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(started.elapsed())
}

/// [`try_wait_for`] for tests: panics with `what` when `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, check: impl FnMut() -> bool) -> Duration {
    try_wait_for(what, timeout, check).unwrap_or_else(|error| panic!("{error}"))
}
