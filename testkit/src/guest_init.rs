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

/// Whether busybox-static is at `/bin/busybox` (scripts/test.sh installs it), which
/// the image tests copy into their rootfs; says SKIP on stderr when it is not.
pub fn have_busybox() -> bool {
    let ok = Path::new("/bin/busybox").is_file();
    if !ok {
        eprintln!("SKIP: needs busybox-static at /bin/busybox (scripts/test.sh installs it)");
    }
    ok
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

/// `unshare` starting `root`'s `/sbin/init` as PID 1 of new PID, mount, UTS and network
/// namespaces, as a VM would: `setup` (shell, may be empty) runs in the namespaces
/// first, then the rootfs is bind-mounted onto itself (a mount point init can make
/// private) and chrooted into. `--kill-child`: SIGKILL to unshare (a [`crate::ChildGuard`]
/// dropped by a failing test) kills init, and with it the namespace. The environment
/// is PATH only.
pub fn init_in_namespaces(root: &Path, setup: &str) -> Command {
    let boot = r#"mount --bind "$1" "$1" && exec chroot "$1" /sbin/init"#;
    let script = if setup.is_empty() {
        boot.to_string()
    } else {
        format!("{setup} && {boot}")
    };
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--uts",
        "--net",
        "--",
        "sh",
        "-c",
    ])
    .arg(script)
    .arg("sh")
    .arg(root)
    .env_clear()
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd
}
