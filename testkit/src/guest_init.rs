//! The static mergen-init that images and namespace tests put at `/sbin/init`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The static mergen-init, built by `init/build-static.sh` once per test binary (the
/// script builds in its own target dir, so it never waits for the cargo running us).
pub fn static_init() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../init/build-static.sh");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "init/build-static.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}
