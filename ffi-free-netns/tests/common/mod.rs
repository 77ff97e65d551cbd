//! Namespaces made by the crate under test, removed even when a test panics.
#![allow(dead_code)] // each test binary uses a different subset

/// A namespace name unique to this process and call: `fn-<pid>-<n>`.
pub fn unique_name() -> String {
    mergen_testkit::unique_name("fn-")
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

/// Entries in a /proc/self directory (fds or tasks).
pub fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).expect("read /proc/self").count()
}
