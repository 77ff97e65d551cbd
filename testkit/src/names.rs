//! Names unique on the machine while a test runs: the pid and a per-process counter.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number distinct for every call in this process.
pub fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `<prefix><pid>-<n>`: fit for namespaces and links, whose names the kernel caps at
/// 15 bytes (a longer one is a bug in the test, so it panics).
pub fn unique_name(prefix: &str) -> String {
    let name = format!("{prefix}{}-{}", std::process::id(), next());
    assert!(name.len() <= 15, "{name:?} is longer than 15 bytes");
    name
}
