//! mergend's create request (`mergen_ctl::request::parse_create`): the JSON body of
//! `POST /vms`, parsed strictly and validated.
//!
//! Beyond "no panic", each input checks that a refusal is a 400 `bad_request` with a
//! message, that nothing but a JSON object is accepted, and that an accepted request
//! keeps every promise the rest of mergend relies on: images are canonical regular
//! files inside the image roots, sizes and ports are in range, host ports are not
//! repeated, env keys are variable names that cannot reach mergend's or the loader's
//! settings, nothing that ends up in a line-based file holds a line break or NUL,
//! hooks are for known events and runnable.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mergen_ctl::request::{parse_create, HOOK_EVENTS};
use mergen_model::HookType;

/// The image root the checks allow, made once per process: `rootfs.ext4`, `vmlinux`
/// and `data.ext4` in it, a directory, and a symlink that escapes it. Seeds name
/// these files under `/tmp/mergen-fuzz-images`.
fn image_roots() -> &'static [PathBuf] {
    static ROOTS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let dir = std::env::temp_dir().join("mergen-fuzz-images");
        fs::create_dir_all(dir.join("dir")).expect("making the image root");
        for name in ["rootfs.ext4", "vmlinux", "data.ext4"] {
            fs::write(dir.join(name), name).expect("writing an image");
        }
        match std::os::unix::fs::symlink("/etc/passwd", dir.join("escape")) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                panic!("making the escaping symlink: {e}")
            }
            _ => {}
        }
        vec![fs::canonicalize(&dir).expect("the image root is there")]
    })
}

pub fn check(data: &[u8]) {
    let roots = image_roots();
    let req = match parse_create(data, roots) {
        Ok(req) => req,
        Err(e) => {
            assert_eq!((e.status, e.code), (400, "bad_request"), "{e:?}");
            assert!(!e.message.trim().is_empty(), "a refusal without a message");
            return;
        }
    };
    let doc: serde_json::Value = serde_json::from_slice(data).expect("an accepted body is JSON");
    assert!(doc.is_object(), "an accepted body is not a JSON object");

    for (field, path) in [
        ("rootfs", &req.rootfs),
        ("kernel", &req.kernel),
        ("dataDisk", &req.data_disk),
    ] {
        if path.is_empty() {
            continue;
        }
        let p = Path::new(path);
        assert!(
            roots.iter().any(|r| p.starts_with(r)),
            "{field} {path:?} is outside the image roots"
        );
        assert_eq!(
            fs::canonicalize(p).ok().as_deref(),
            Some(p),
            "{field} {path:?} is not canonical"
        );
        assert!(p.is_file(), "{field} {path:?} is not a regular file");
    }
    assert_eq!(
        req.rootfs.is_empty(),
        req.kernel.is_empty(),
        "rootfs without kernel or the reverse"
    );
    assert!(
        req.process.is_some() || !req.rootfs.is_empty(),
        "neither images nor a process"
    );
    assert!(
        req.vcpu >= 1 && req.mem_mib >= 128,
        "vcpu or memMiB too small"
    );

    let mut hosts = Vec::new();
    for p in &req.ports {
        assert_ne!(p.guest, 0, "guest port 0");
        if p.host != 0 {
            assert!(!hosts.contains(&p.host), "host port {} repeated", p.host);
            hosts.push(p.host);
        }
    }

    for (k, v) in &req.extra_env {
        let name_ok = k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.starts_with(|c: char| c.is_ascii_digit());
        assert!(
            k.trim().is_empty() || name_ok,
            "extraEnv key {k:?} is not a variable name"
        );
        assert!(
            !k.starts_with("MGR_") && !k.starts_with("LD_"),
            "extraEnv key {k:?} is reserved"
        );
        assert!(
            !v.contains(['\n', '\r', '\0']),
            "extraEnv {k} holds a line break"
        );
    }
    if let Some(b) = &req.boot_args {
        assert!(!b.trim().is_empty(), "blank bootArgs kept");
        assert!(
            !b.contains(['\n', '\0']),
            "bootArgs hold a line break or NUL"
        );
    }

    for (event, hooks) in &req.hooks {
        assert!(
            HOOK_EVENTS.contains(&event.as_str()),
            "unknown event {event:?}"
        );
        for h in hooks {
            match h.kind {
                HookType::Http => assert!(h.url.starts_with("http://"), "hook url {:?}", h.url),
                HookType::Exec => assert!(
                    h.cmd.first().is_some_and(|c| !c.is_empty()),
                    "exec hook without a command"
                ),
            }
        }
    }

    if let Some(p) = &req.process {
        assert!(
            p.cmd.first().is_some_and(|c| !c.is_empty()),
            "process without a command"
        );
        assert!(
            !p.cmd.iter().any(|a| a.contains('\0')),
            "process argv holds NUL"
        );
        if let Some(w) = &p.workdir {
            assert!(
                Path::new(w).is_absolute() && Path::new(w).is_dir(),
                "process workdir {w:?}"
            );
        }
    }
}
