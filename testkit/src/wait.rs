//! Waiting for a condition: polled until a deadline, never a bare sleep.

use std::time::{Duration, Instant};

const INTERVAL: Duration = Duration::from_millis(10);

/// Poll `f` until it returns `Some` or `limit` passes (it is always tried at least once).
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(INTERVAL);
    }
}

/// Whether `cond` came to hold within `limit`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll(limit, || cond().then_some(())).is_some()
}

/// The first `Some` of `f` within `limit`; panics naming `what` when there is none.
pub fn wait_for<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll(limit, f).unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}
