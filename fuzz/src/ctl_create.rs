//! mergend's create request (`mergen_ctl::request::parse_create`): the JSON body of
//! `POST /v1/vms`, parsed strictly and validated, hook templates included.
//!
//! Beyond "no panic", each input checks that a refusal is a 400 `bad_request` with a
//! message, that nothing but a JSON object is accepted, and that an accepted request
//! keeps every promise the rest of mergend relies on: images are regular files inside
//! the image roots, sizes and ports are in range, host ports are not repeated, env keys
//! are variable names that cannot reach mergend's or the loader's settings, nothing
//! that ends up in a line-based file holds a line break or NUL, what a VM stores is
//! within its bounds, and its hooks pass the runner's own check and their templates
//! run on the VM's own context (its metadata included) without panicking.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mergen_ctl::gotmpl::Template;
use mergen_ctl::hooks::{check_hook, HookContext};
use mergen_ctl::request::{
    parse_create, CreateRequest, Images, MAX_ENTRIES, MAX_HOOKS, MAX_STORED_BYTES,
};
use mergen_model::{HookType, Meta, HOOK_EVENTS};

/// The image root the checks allow, made once per process: `rootfs.ext4`, `vmlinux`
/// and `data.ext4` in it, a directory, an `image` directory holding what a
/// mergen-image `rootfs/` must (a `process.root`), and a symlink that escapes it.
/// Seeds name these files under `/tmp/mergen-fuzz-images`.
fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = std::env::temp_dir().join("mergen-fuzz-images");
        fs::create_dir_all(dir.join("dir")).expect("making the image root");
        for name in ["rootfs.ext4", "vmlinux", "data.ext4"] {
            fs::write(dir.join(name), name).expect("writing an image");
        }
        fs::create_dir_all(dir.join("image/sbin")).expect("making an image rootfs");
        fs::create_dir_all(dir.join("image/etc/mergen")).expect("making an image rootfs");
        fs::write(dir.join("image/sbin/init"), "init").expect("writing an image's init");
        fs::write(dir.join("image/etc/mergen/image-meta.json"), "{}")
            .expect("writing an image's metadata");
        match std::os::unix::fs::symlink("/etc/passwd", dir.join("escape")) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                panic!("making the escaping symlink: {e}")
            }
            _ => {}
        }
        Images {
            roots: vec![fs::canonicalize(&dir).expect("the image root is there")],
            devices: Vec::new(),
        }
    })
}

pub fn check(data: &[u8]) {
    let images = images();
    let req = match parse_create(data, images) {
        Ok(req) => req,
        Err(e) => {
            let answer = mergen_ctl::respond::error(&e);
            assert_eq!((answer.status, answer.code), (400, "bad_request"), "{e:?}");
            assert!(
                !answer.message.trim().is_empty(),
                "a refusal without a message"
            );
            return;
        }
    };
    let doc: serde_json::Value = serde_json::from_slice(data).expect("an accepted body is JSON");
    assert!(doc.is_object(), "an accepted body is not a JSON object");
    check_images(&req, &images.roots);
    check_sizes_and_ports(&req);
    check_env_and_args(&req);
    check_bounds(&req);
    check_hooks(&req);
}

fn check_images(req: &CreateRequest, roots: &[PathBuf]) {
    for (field, path) in [
        ("rootfs", &req.rootfs),
        ("kernel", &req.kernel),
        ("dataDisk", &req.data_disk),
    ] {
        if path.is_empty() {
            continue;
        }
        let canon = fs::canonicalize(path).expect("an accepted image exists");
        assert!(
            roots.iter().any(|r| canon.starts_with(r)),
            "{field} {path:?} is outside the image roots"
        );
        assert!(canon.is_file(), "{field} {path:?} is not a regular file");
        assert!(
            Path::new(path).is_absolute(),
            "{field} {path:?} is relative"
        );
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
    if let Some(root) = req.process.as_ref().and_then(|p| p.root.as_ref()) {
        // An image's rootfs: its own start command, env and working dir apply.
        let p = req.process.as_ref().expect("a process");
        assert!(
            p.cmd.is_empty() && p.env.is_empty() && p.workdir.is_none(),
            "process.root with a command, env or workdir of its own"
        );
        assert!(
            Path::new(root).is_absolute(),
            "process.root {root:?} is relative"
        );
        let canon = fs::canonicalize(root).expect("an accepted process.root exists");
        assert!(
            roots.iter().any(|r| canon.starts_with(r)),
            "process.root {root:?} is outside the image roots"
        );
        assert!(canon.is_dir(), "process.root {root:?} is not a directory");
        for file in ["sbin/init", "etc/mergen/image-meta.json"] {
            assert!(
                canon.join(file).is_file(),
                "process.root {root:?} has no /{file}"
            );
        }
    } else if let Some(p) = &req.process {
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

fn check_sizes_and_ports(req: &CreateRequest) {
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
}

fn check_env_and_args(req: &CreateRequest) {
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
}

fn check_bounds(req: &CreateRequest) {
    for (field, n) in [
        ("tags", req.tags.len()),
        ("metadata", req.metadata.len()),
        ("extraEnv", req.extra_env.len()),
    ] {
        assert!(n <= MAX_ENTRIES, "{field}: {n} entries kept");
    }
    let hooks: usize = req.hooks.values().map(Vec::len).sum();
    assert!(hooks <= MAX_HOOKS, "{hooks} hooks kept");
    let stored = [
        serde_json::to_vec(&req.tags),
        serde_json::to_vec(&req.metadata),
        serde_json::to_vec(&req.hooks),
    ]
    .into_iter()
    .map(|j| j.expect("stored fields serialise").len())
    .sum::<usize>();
    assert!(stored <= MAX_STORED_BYTES, "{stored} bytes stored");
}

/// Every accepted hook passes the check the runner makes before running it, and its
/// templates run on a context carrying the request's own metadata and ports.
fn check_hooks(req: &CreateRequest) {
    if req.hooks.is_empty() {
        return;
    }
    let mut meta = Meta::from_slice(
        br#"{"id":"084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6","createdAt":"2025-01-02T03:04:05.12Z","guestIP":"172.30.0.2"}"#,
    )
    .expect("a minimal meta.json");
    meta.metadata = req.metadata.clone();
    for (event, hooks) in &req.hooks {
        assert!(
            HOOK_EVENTS.contains(&event.as_str()),
            "unknown event {event:?}"
        );
        let context = HookContext::new(event, &meta).template_data();
        for h in hooks {
            check_hook(h).unwrap_or_else(|e| panic!("accepted, then refused by the runner: {e}"));
            let texts: Vec<&str> = match h.kind {
                HookType::Http => vec![h.url.as_str()],
                HookType::Exec => h.cmd.iter().map(String::as_str).collect(),
            };
            for text in texts {
                let template = Template::parse(text).expect("an accepted template parses");
                let _ = template.execute(&context);
            }
        }
    }
}
