//! OCI images written by tests: layer tars with exact headers, gzip and zstd blobs, and
//! an OCI image layout directory (what `skopeo` pushes and `mergen-image --from-oci-dir`
//! reads). Every byte is fixed (mtimes, owners), so a layout is the same every run.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

/// The mtime of every entry [`layer_tar`] writes.
pub const MTIME: u64 = 1_700_000_000;
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A tar entry of a test layer.
pub enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    /// A file with an owner: (path, mode, uid, gid, content).
    Owned(&'a str, u32, u64, u64, &'a [u8]),
    /// A directory with an owner: (path, mode, uid, gid).
    OwnedDir(&'a str, u32, u64, u64),
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
            E::Dir(p, mode) | E::OwnedDir(p, mode, _, _) => {
                if let E::OwnedDir(_, _, uid, gid) = e {
                    h.set_uid(*uid);
                    h.set_gid(*gid);
                }
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

/// Busybox applet links (`bin/<applet>` → `busybox`), for a layer that also holds
/// `bin/busybox`.
pub fn busybox_applets(applets: &[&str]) -> Vec<E<'static>> {
    applets
        .iter()
        .map(|a| E::Link(Box::leak(format!("bin/{a}").into_boxed_str()), "busybox"))
        .collect()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// `sha256:<hex>` of `data`, as OCI digests and diff_ids are written.
pub fn sha256(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A layer for [`write_layout`]: its uncompressed tar, its blob and the blob's media
/// type (fields are public so a test can make them disagree).
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

/// `config` (an image config: `architecture`, `os`, `config`, ...) with its
/// `rootfs.diff_ids` naming `layers`.
pub fn with_diff_ids(mut config: Value, layers: &[Layer]) -> Value {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(&l.tar)).collect();
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    config
}

fn put_blob(dir: &Path, data: &[u8]) -> String {
    let d = sha256(data);
    let p = dir
        .join("blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
    d
}

/// Writes an OCI image layout at `dir` holding one image named `tag` (its
/// `org.opencontainers.image.ref.name`): `config` (given its diff_ids here) and
/// `layers`. Returns the manifest.
pub fn write_layout(
    dir: &Path,
    tag: &str,
    layers: &[Layer],
    config_media_type: &str,
    config: Value,
) -> Value {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let config = serde_json::to_vec(&with_diff_ids(config, layers)).unwrap();
    let config_digest = put_blob(dir, &config);
    let layer_descs: Vec<Value> = layers
        .iter()
        .map(|l| json!({"mediaType": l.media_type, "digest": put_blob(dir, &l.blob), "size": l.blob.len()}))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": config_media_type, "digest": config_digest, "size": config.len()},
        "layers": layer_descs,
    });
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let mdigest = put_blob(dir, &mbytes);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": mdigest, "size": mbytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }]
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    manifest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_names_its_blobs_by_digest() {
        let dir = crate::TempDir::new("oci-layout");
        let layers = [Layer::gzip(layer_tar(&[E::File("a", 0o644, b"x")]))];
        let m = write_layout(
            dir.path(),
            "v1",
            &layers,
            CONFIG_MEDIA_TYPE,
            json!({"os": "linux"}),
        );
        let blob = |d: &str| {
            fs::read(
                dir.join("blobs/sha256")
                    .join(d.trim_start_matches("sha256:")),
            )
            .unwrap()
        };
        let config: Value =
            serde_json::from_slice(&blob(m["config"]["digest"].as_str().unwrap())).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&layers[0].tar));
        assert_eq!(config["os"], "linux");
        let layer = blob(m["layers"][0]["digest"].as_str().unwrap());
        assert_eq!(layer, layers[0].blob);
        assert_eq!(
            sha256(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
