//! Fixtures for the converter's tests: a small image built here (busybox-static, a
//! whiteout, an opaque directory, a symlink, a hard link, a device node, an xattr, a
//! gzip and a zstd layer) written as an OCI layout, the static mergen-init, and a real
//! registry (Debian's docker-registry) with TLS and either a bearer-token server in
//! this process or htpasswd basic auth.
#![allow(dead_code)]

pub mod registry;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::json;

pub const MTIME: u64 = 1_700_000_000;
pub const CREATED: &str = "2024-01-02T03:04:05Z";

/// The static mergen-init, built once per test binary by init/build-static.sh.
pub fn static_init() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../init/build-static.sh");
        let out = Command::new(&script)
            .output()
            .expect("running init/build-static.sh");
        assert!(
            out.status.success(),
            "build-static.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

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

/// A tar entry of a test layer.
pub enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    Owned(&'a str, u32, u64, u64, &'a [u8]),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Xattr(&'a str, &'a str, &'a [u8]),
    /// A raw name the tar crate would refuse to write (`../x`, `/abs`).
    RawName(&'a str),
}

/// An uncompressed layer tar (fixed mtimes and owners: the same bytes every run).
pub fn layer_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            E::File(p, mode, data) | E::Owned(p, mode, _, _, data) => {
                if let E::Owned(_, _, uid, gid, _) = e {
                    h.set_uid(*uid);
                    h.set_gid(*gid);
                }
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Hard(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Char(p, ma, mi) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            E::Xattr(p, name, value) => {
                let key = format!("SCHILY.xattr.{name}");
                b.append_pax_extensions([(key.as_str(), *value)]).unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(3);
                b.append_data(&mut h, p, &b"xa\n"[..]).unwrap();
            }
            E::RawName(name) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(4);
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                b.append(&h, &b"evil"[..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

pub fn sha(data: &[u8]) -> String {
    mergen_image::digest::sha256(data)
}

/// A layer for [`write_layout`]: (uncompressed tar, blob bytes, media type).
pub struct Layer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub media_type: String,
}

impl Layer {
    pub fn gzip(tar: Vec<u8>) -> Layer {
        Layer {
            blob: gzip(&tar),
            tar,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }
    }
    pub fn zstd(tar: Vec<u8>) -> Layer {
        Layer {
            blob: zstd(&tar),
            tar,
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        }
    }
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let d = sha(data);
    let p = dir
        .join("blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
    d
}

/// The image config the fixture uses.
pub fn config_json(diff_ids: &[String]) -> serde_json::Value {
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
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    })
}

/// Writes an OCI layout at `dir` holding one image named `tag`; returns the manifest.
pub fn write_layout(
    dir: &Path,
    tag: &str,
    layers: &[Layer],
    config_media_type: &str,
) -> serde_json::Value {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(&l.tar)).collect();
    let config = serde_json::to_vec(&config_json(&diff_ids)).unwrap();
    let config_digest = put_blob(dir, &config);
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| json!({"mediaType": l.media_type, "digest": put_blob(dir, &l.blob), "size": l.blob.len()}))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": config_media_type, "digest": config_digest, "size": config.len()},
        "layers": layer_descs,
    });
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let mdigest = put_blob(dir, &mbytes);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest, "size": mbytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }]
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    manifest
}

pub const CONFIG_MT: &str = "application/vnd.oci.image.config.v1+json";

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
    for applet in [
        "sh", "echo", "id", "pwd", "sleep", "cat", "grep", "ls", "hostname", "ip", "env", "kill",
        "true",
    ] {
        l1.push(E::Link(
            Box::leak(format!("bin/{applet}").into_boxed_str()),
            "busybox",
        ));
    }
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
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(&l.tar)).collect();
    let config = serde_json::to_vec(&config_json(&diff_ids)).unwrap();
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
