//! Fixtures for the converter's tests: a small image built here (busybox-static, a
//! whiteout, an opaque directory, a symlink, a hard link, a device node, an xattr, a
//! gzip and a zstd layer) written as an OCI layout (with `mergen_testkit::oci`), and a real
//! registry (Debian's docker-registry) with TLS and either a bearer-token server in
//! this process or htpasswd basic auth.
#![allow(dead_code)]

pub mod registry;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::json;

pub use mergen_testkit::oci::{layer_tar, Layer, CONFIG_MEDIA_TYPE as CONFIG_MT, E, MTIME};
pub use mergen_testkit::static_init;

pub const CREATED: &str = "2024-01-02T03:04:05Z";

pub fn have(program: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(program).exists())
}

/// Skips (loudly) unless every program is installed.
pub fn require(test: &str, programs: &[&str]) -> bool {
    let missing: Vec<&&str> = programs.iter().filter(|p| !have(p)).collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!("SKIP: {test} needs {missing:?} (scripts/test.sh installs them)");
    false
}

/// Runs mergen-image with `args`.
pub fn convert(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_mergen-image"))
        .arg("build")
        .args(args)
        .arg("--quiet")
        .env("MERGEN_INIT_BIN", static_init())
        .output()
        .expect("running mergen-image");
    out
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "mergen-image failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The error text of a run that must fail.
pub fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "mergen-image should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn sha(data: &[u8]) -> String {
    mergen_image::digest::sha256(data)
}

/// The image config the fixture uses (its diff_ids are added for the layers at hand).
pub fn fixture_config() -> serde_json::Value {
    json!({
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo \"$GREETING from $(pwd) as $(id -u):$(id -g) groups $(id -G)\"; exit 7"],
            "Env": ["PATH=/bin:/sbin", "GREETING=hello"],
            "WorkingDir": "/data",
            "User": "app",
            "ExposedPorts": {"53/udp": {}, "9000/tcp": {}, "8080/tcp": {}}
        }
    })
}

/// Writes an OCI layout at `dir` holding one image named `tag` with the fixture's
/// config; returns the manifest.
pub fn write_layout(
    dir: &Path,
    tag: &str,
    layers: &[Layer],
    config_media_type: &str,
) -> serde_json::Value {
    mergen_testkit::oci::write_layout(dir, tag, layers, config_media_type, fixture_config())
}

/// The fixture's two layers.
pub fn fixture_layers() -> Vec<Layer> {
    let busybox = fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let mut l1 = vec![
        E::Dir("bin", 0o755),
        E::File("bin/busybox", 0o755, &busybox),
        E::Dir("etc", 0o755),
        E::File(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        ),
        E::File(
            "etc/group",
            0o644,
            b"root:x:0:\napp:x:1000:\nwww:x:33:app\n",
        ),
        E::Dir("data", 0o755),
        E::Owned("data/x", 0o640, 1000, 1000, b"first\n"),
        E::File("gone.txt", 0o644, b"to be whited out\n"),
        E::Dir("opaque", 0o755),
        E::File("opaque/a", 0o644, b"a\n"),
        E::Dir("opaque/sub", 0o755),
        E::File("opaque/sub/b", 0o644, b"b\n"),
        E::Dir("usr/share/doc", 0o755),
        E::File("usr/share/doc/one", 0o644, b"shared inode\n"),
        E::Hard("usr/share/doc/two", "usr/share/doc/one"),
        E::Dir("dev", 0o755),
        E::Char("dev/mergen-null", 1, 3),
        E::Xattr("etc/labelled", "user.mergen", b"yes"),
        E::Dir("tmp", 0o1777),
    ];
    l1.extend(mergen_testkit::oci::busybox_applets(&[
        "sh", "echo", "id", "pwd", "sleep", "cat", "grep", "ls", "hostname", "ip", "env", "kill",
        "true",
    ]));
    let l2 = vec![
        E::File(".wh.gone.txt", 0o644, b""),
        E::File("opaque/.wh..wh..opq", 0o644, b""),
        E::File("opaque/c", 0o644, b"c\n"),
        E::Owned("data/x", 0o600, 1000, 1000, b"second\n"),
        E::Link("data/link", "x"),
        E::Link("abs-link", "/data/x"),
        E::File("bin/suid", 0o4755, b"#!/bin/sh\n"),
    ];
    vec![Layer::gzip(layer_tar(&l1)), Layer::zstd(layer_tar(&l2))]
}

/// A `docker save` (legacy manifest.json) archive of `layers`, uncompressed as Docker
/// writes them.
pub fn write_docker_save(path: &Path, repo_tag: &str, layers: &[Layer]) {
    let config = mergen_testkit::oci::with_diff_ids(fixture_config(), layers);
    let config = serde_json::to_vec(&config).unwrap();
    let chex = sha(&config).trim_start_matches("sha256:").to_string();
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut layer_names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        add(&name, &l.tar);
        layer_names.push(name);
    }
    add(&format!("{chex}.json"), &config);
    let manifest =
        json!([{"Config": format!("{chex}.json"), "RepoTags": [repo_tag], "Layers": layer_names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    b.finish().unwrap();
}

/// Every path under `root` with what a guest would see of it, sorted.
pub fn describe_tree(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).unwrap().display())
            } else if m.is_file() {
                sha(&fs::read(&p).unwrap())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                format!("rdev {}", m.rdev())
            };
            out.push(format!(
                "{rel} {:o} {}:{} mtime {} nlink {} {what}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.nlink()
            ));
        }
    }
    out.sort();
    out
}

/// `debugfs -R "ls -l DIR"` of an ext4 image, without the inode numbers' column order
/// mattering less than names, modes, owners and sizes.
pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
