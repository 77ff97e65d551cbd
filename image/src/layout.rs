//! From a store (an OCI image layout, the pull cache, a `docker save` archive) to one
//! image: its config and its layers in order, every manifest and config checked
//! against its digest, indexes resolved to the wanted platform.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::digest::{hex_of, sha256};
use crate::error::{Error, Result};
use crate::store::Store;

/// `os/arch[/variant]`, e.g. `linux/amd64` or `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                arch: arch.to_string(),
                variant: parts
                    .get(2)
                    .map(|v| v.to_string())
                    .filter(|v| !v.is_empty()),
            }),
            _ => Err(Error::Invalid(format!(
                "--platform {s:?}: expected os/arch[/variant], e.g. linux/amd64"
            ))),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        // A variant is compared only when both sides name one (arm64 is v8 either way).
        self.os == os
            && self.arch == arch
            && match (&self.variant, variant) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    }
}

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];
/// The manifest types a registry is asked for, in order of preference.
pub const MANIFEST_ACCEPT: [&str; 4] = [
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
];

const ANN_REF_NAME: &str = "org.opencontainers.image.ref.name";
const ANN_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// No media type (a legacy `docker save` layer): decided by the magic bytes.
    Sniff,
}

impl Compression {
    pub fn of_media_type(mt: &str) -> Result<Compression> {
        let base = mt
            .strip_prefix("application/vnd.oci.image.layer.")
            .map(|rest| rest.trim_start_matches("nondistributable."))
            .or_else(|| mt.strip_prefix("application/vnd.docker.image.rootfs."))
            .map(|rest| rest.trim_start_matches("foreign."));
        match base {
            Some("v1.tar" | "diff.tar") => Ok(Compression::None),
            Some("v1.tar+gzip" | "diff.tar.gzip") => Ok(Compression::Gzip),
            Some("v1.tar+zstd" | "diff.tar.zstd") => Ok(Compression::Zstd),
            _ => Err(Error::MediaType(format!(
                "layer type {mt:?} (readable: tar, tar+gzip, tar+zstd)"
            ))),
        }
    }
}

/// One layer: where its bytes are and how to check them.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Member of the store holding the blob.
    pub rel: String,
    /// The blob's own digest and size (checked before it is applied), when known.
    pub digest: Option<String>,
    pub size: Option<u64>,
    pub compression: Compression,
    /// The uncompressed tar's digest from the config (checked while applying).
    pub diff_id: Option<String>,
}

/// An image ready to apply.
#[derive(Debug)]
pub struct Image {
    pub config: ImageConfiguration,
    pub config_digest: String,
    pub layers: Vec<Layer>,
    /// The name the store gives it (a ref-name annotation, a RepoTag), if any.
    pub name: Option<String>,
}

impl Image {
    pub fn diff_ids(&self) -> Vec<String> {
        self.config
            .rootfs()
            .diff_ids()
            .iter()
            .map(|d| d.to_string())
            .collect()
    }
}

fn blob_rel(digest: &str) -> Result<String> {
    Ok(format!("blobs/sha256/{}", hex_of(digest)?))
}

/// Reads a small blob (manifest, index, config) and checks its digest.
fn read_verified(store: &Store, digest: &str, what: &str) -> Result<Vec<u8>> {
    let rel = blob_rel(digest)?;
    let body = store.read(&rel).map_err(|e| match e {
        Error::NotFound(m) => Error::NotFound(format!("{what} {digest} ({m})")),
        other => other,
    })?;
    let actual = sha256(&body);
    if actual != digest {
        return Err(Error::Digest {
            what: format!("{what} {rel} in {}", store.describe()),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(body)
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Invalid(format!("malformed {what}: {e}")))
}

/// Whether a reference names the same image as `wanted`: compared in Docker's
/// normalised form, or as a bare tag (what skopeo writes as `ref.name`).
fn same_ref(have: &str, wanted: &str) -> bool {
    if have == wanted {
        return true;
    }
    let norm = |s: &str| {
        oci_spec::distribution::Reference::from_str(s)
            .ok()
            .map(|r| r.whole())
    };
    matches!((norm(have), norm(wanted)), (Some(a), Some(b)) if a == b)
        || oci_spec::distribution::Reference::from_str(wanted)
            .ok()
            .and_then(|r| r.tag().map(|t| t == have))
            .unwrap_or(false)
}

/// The entry `wanted` names (by any of `names`), or the only entry when there is one.
fn choose<'a, T>(
    entries: &'a [T],
    wanted: Option<&str>,
    names: impl Fn(&T) -> Vec<String>,
    store: &Store,
) -> Result<&'a T> {
    let by_name = wanted.and_then(|w| {
        entries
            .iter()
            .find(|e| names(e).iter().any(|n| same_ref(n, w)))
    });
    let only = if entries.len() == 1 {
        entries.first()
    } else {
        None
    };
    by_name.or(only).ok_or_else(|| {
        let held: Vec<String> = entries.iter().flat_map(&names).collect();
        Error::NotFound(format!(
            "{} in {} (it holds: {})",
            wanted.unwrap_or("a single image"),
            store.describe(),
            if held.is_empty() {
                "no named images".into()
            } else {
                held.join(", ")
            }
        ))
    })
}

/// Reads an OCI image layout (`index.json` + `blobs/`) from `store`; `wanted` picks a
/// manifest by its `ref.name` annotation when the layout holds several.
pub fn from_layout(store: &Store, wanted: Option<&str>, platform: &Platform) -> Result<Image> {
    if !store.exists("index.json") {
        return Err(Error::NotFound(format!(
            "index.json in {} (not an OCI image layout)",
            store.describe()
        )));
    }
    let index: ImageIndex = parse(&store.read("index.json")?, "index.json")?;
    let named = |d: &Descriptor| -> Vec<String> {
        d.annotations()
            .as_ref()
            .map(|a| {
                [ANN_REF_NAME, ANN_CONTAINERD_NAME]
                    .iter()
                    .filter_map(|k| a.get(*k).cloned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let desc = choose(index.manifests(), wanted, named, store)?;
    let name = named(desc).into_iter().next();
    let mut image = resolve(store, desc, platform, 0)?;
    image.name = image.name.or(name);
    Ok(image)
}

/// Follows a descriptor through indexes to the platform's manifest.
fn resolve(store: &Store, desc: &Descriptor, platform: &Platform, depth: u32) -> Result<Image> {
    if depth > 4 {
        return Err(Error::Invalid("index nesting too deep".into()));
    }
    let digest = desc.digest().to_string();
    let body = read_verified(store, &digest, "manifest")?;
    let media_type = desc.media_type().to_string();
    match media_type.as_str() {
        MT_OCI_INDEX | MT_DOCKER_LIST => {
            let index: ImageIndex = parse(&body, "image index")?;
            let next = pick_platform(&index, platform)?;
            resolve(store, &next, platform, depth + 1)
        }
        MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => manifest(store, &body, platform),
        other => Err(Error::MediaType(format!(
            "manifest type {other:?} (readable: OCI and Docker v2 manifests and indexes)"
        ))),
    }
}

/// The index entry for `platform`; attestations and other platforms are skipped.
pub fn pick_platform(index: &ImageIndex, platform: &Platform) -> Result<Descriptor> {
    let mut seen = Vec::new();
    for d in index.manifests() {
        let Some(p) = d.platform() else { continue };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        if platform.matches(&os, &arch, p.variant().as_deref()) {
            return Ok(d.clone());
        }
        seen.push(format!(
            "{os}/{arch}{}",
            p.variant()
                .as_ref()
                .map(|v| format!("/{v}"))
                .unwrap_or_default()
        ));
    }
    Err(Error::NotFound(format!(
        "no image for platform {platform} (available: {})",
        if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        }
    )))
}

/// Parses a manifest and its config; checks the config's platform.
pub fn manifest(store: &Store, body: &[u8], platform: &Platform) -> Result<Image> {
    let m: ImageManifest = parse(body, "image manifest")?;
    let cfg_desc = m.config();
    let cfg_type = cfg_desc.media_type().to_string();
    if !CONFIG_TYPES.contains(&cfg_type.as_str()) {
        return Err(Error::MediaType(format!(
            "config type {cfg_type:?}: this is not a container image"
        )));
    }
    let config_digest = cfg_desc.digest().to_string();
    let config_body = read_verified(store, &config_digest, "config")?;
    let config: ImageConfiguration = parse(&config_body, "image config")?;
    check_platform(&config, platform)?;
    let diff_ids: Vec<String> = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| d.to_string())
        .collect();
    if diff_ids.len() != m.layers().len() {
        return Err(Error::Invalid(format!(
            "manifest has {} layers but its config lists {} diff_ids",
            m.layers().len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::with_capacity(m.layers().len());
    for (l, diff_id) in m.layers().iter().zip(diff_ids) {
        let digest = l.digest().to_string();
        layers.push(Layer {
            rel: blob_rel(&digest)?,
            compression: Compression::of_media_type(l.media_type().as_ref())?,
            digest: Some(digest),
            size: Some(l.size()),
            diff_id: Some(diff_id),
        });
    }
    Ok(Image {
        config,
        config_digest,
        layers,
        name: None,
    })
}

fn check_platform(config: &ImageConfiguration, platform: &Platform) -> Result<()> {
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if platform.matches(&os, &arch, config.variant().as_deref()) {
        Ok(())
    } else {
        Err(Error::NotFound(format!(
            "the image is {os}/{arch}, not {platform} (see --platform)"
        )))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A `docker save` archive: the OCI layout inside it when it has one (Docker 25+),
/// else its `manifest.json` (config named by its digest, uncompressed layers checked
/// against the config's diff_ids).
pub fn from_docker_save(store: &Store, wanted: Option<&str>, platform: &Platform) -> Result<Image> {
    if store.exists("index.json") && store.exists("oci-layout") {
        // Docker's index.json names images by the containerd annotation; prefer it.
        if let Ok(image) = from_layout(store, wanted, platform) {
            return Ok(image);
        }
    }
    if !store.exists("manifest.json") {
        return Err(Error::Invalid(format!(
            "{} is not a docker save archive (no manifest.json)",
            store.describe()
        )));
    }
    let entries: Vec<SaveEntry> = parse(&store.read("manifest.json")?, "manifest.json")?;
    let tags = |e: &SaveEntry| e.repo_tags.clone().unwrap_or_default();
    let entry = choose(&entries, wanted, tags, store)?;
    // The config's file name is its digest (`<hex>.json` or `blobs/sha256/<hex>`).
    let stem = entry
        .config
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .trim_end_matches(".json");
    let config_digest = format!("sha256:{stem}");
    hex_of(&config_digest)?;
    let body = store.read(&entry.config)?;
    let actual = sha256(&body);
    if actual != config_digest {
        return Err(Error::Digest {
            what: format!("config {} in {}", entry.config, store.describe()),
            expected: config_digest,
            actual,
        });
    }
    let config: ImageConfiguration = parse(&body, "image config")?;
    check_platform(&config, platform)?;
    let diff_ids: Vec<String> = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| d.to_string())
        .collect();
    if diff_ids.len() != entry.layers.len() {
        return Err(Error::Invalid(format!(
            "manifest.json lists {} layers but the config has {} diff_ids",
            entry.layers.len(),
            diff_ids.len()
        )));
    }
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(rel, diff_id)| {
            // A layer stored under its blob digest is checked against that too.
            let digest = rel
                .strip_prefix("blobs/sha256/")
                .map(|h| format!("sha256:{h}"))
                .filter(|d| hex_of(d).is_ok());
            Layer {
                rel: rel.clone(),
                digest,
                size: None,
                compression: Compression::Sniff,
                diff_id: Some(diff_id),
            }
        })
        .collect();
    Ok(Image {
        config,
        config_digest: actual,
        layers,
        name: tags(entry).into_iter().next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(p.matches("linux", "arm64", None));
        assert!(!p.matches("linux", "arm64", Some("v7")));
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/amd64"
            .parse::<Platform>()
            .unwrap()
            .matches("linux", "amd64", Some("v3")));
    }

    #[test]
    fn layer_media_types() {
        use Compression::*;
        for (mt, c) in [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Gzip,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Gzip,
            ),
        ] {
            assert_eq!(Compression::of_media_type(mt).unwrap(), c, "{mt}");
        }
        let e = Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+bzip2");
        assert!(matches!(e, Err(Error::MediaType(_))));
    }

    #[test]
    fn references_compare_normalised_or_by_tag() {
        assert!(same_ref("docker.io/library/busybox:latest", "busybox"));
        assert!(same_ref("v1", "127.0.0.1:5000/test/img:v1"));
        assert!(!same_ref("v2", "127.0.0.1:5000/test/img:v1"));
        assert!(!same_ref("alpine:3", "busybox:3"));
    }
}
