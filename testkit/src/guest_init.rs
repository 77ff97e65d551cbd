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

/// A root filesystem as mergen-image makes one, for tests that boot it: busybox-static
/// (`/bin/busybox`, which scripts/test.sh installs) with `applets` linked to it in
/// `/bin`, mergen-init at `/sbin/init`, `passwd` and `group` in `/etc`, `meta` as
/// `/etc/mergen/image-meta.json`, and an empty `/work`.
pub fn busybox_rootfs(root: &Path, applets: &[&str], passwd: &str, group: &str, meta: &str) {
    use std::fs;
    for d in ["bin", "sbin", "etc/mergen", "work"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::copy(static_init(), root.join("sbin/init")).unwrap();
    fs::write(root.join("etc/passwd"), passwd).unwrap();
    fs::write(root.join("etc/group"), group).unwrap();
    fs::write(root.join("etc/mergen/image-meta.json"), meta).unwrap();
}
