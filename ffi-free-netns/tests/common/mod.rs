//! Shared test helpers: root check, unique names, cleanup guards.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when running as root; otherwise prints the loud SKIP line.
pub fn root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        true
    } else {
        eprintln!("SKIP: {test} needs root");
        false
    }
}

/// A per-process counter, distinct for every call.
pub fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A namespace name unique to this process and call: `fn-<pid>-<n>`.
pub fn unique_name() -> String {
    format!("fn-{}-{}", std::process::id(), next())
}

/// Deletes the named namespace on drop, even when the test panics.
pub struct NsGuard(pub String);

impl NsGuard {
    pub fn create() -> (NsGuard, ffi_free_netns::Netns) {
        let name = unique_name();
        let ns = ffi_free_netns::create(&name).expect("create namespace");
        (NsGuard(name), ns)
    }
}

impl Drop for NsGuard {
    fn drop(&mut self) {
        if let Err(e) = ffi_free_netns::delete(&self.0) {
            eprintln!("cleanup of namespace {} failed: {e}", self.0);
        }
    }
}

/// Poll `cond` until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Entries in a /proc/self directory (fds or tasks).
pub fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).expect("read /proc/self").count()
}
