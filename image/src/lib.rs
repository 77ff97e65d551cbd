//! mergen-image: an OCI image to a bootable root filesystem, without Docker.
//!
//! `build` reads the image from one of three places, all ending up as a layout read
//! through a [`store::Store`]: a registry (pulled into `DIR/image-cache`, itself an
//! OCI layout), a `docker save` archive, or an OCI layout directory. It applies the
//! layers into a staging directory, injects mergen-init and the image metadata, writes
//! `rootfs.tar` and `rootfs.ext4`, and only then moves the outputs into place: a
//! failed build leaves the previous outputs (or none) and no half-written file.

#![deny(unsafe_code)]

pub mod apply;
pub mod digest;
pub mod error;
pub mod init_bin;
pub mod layout;
pub mod outputs;
pub mod progress;
pub mod registry;
pub mod store;
pub mod tree;

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use error::IoContext;
pub use error::{Error, Result};
use layout::{Image, Platform};
use outputs::ImageMeta;
use progress::Progress;
use registry::Access;
use store::Store;
use tree::Tree;

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Registry { skip_pull: bool },
    Archive(PathBuf),
    OciDir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The reference (required for a registry; picks an image in an archive/layout).
    pub image: Option<String>,
    pub source: Source,
    pub output_dir: Option<PathBuf>,
    pub name: Option<String>,
    pub size_mib: Option<u64>,
    pub platform: Platform,
    pub init: Option<PathBuf>,
    pub access: Access,
    pub progress: bool,
}

/// What a build produced (all paths final).
#[derive(Debug)]
pub struct Outcome {
    pub image: String,
    pub output_dir: PathBuf,
    pub init_from: PathBuf,
    pub meta: ImageMeta,
    pub ext4_size_mib: u64,
    /// What this host could not reproduce in `rootfs/` (rootfs.tar has it all).
    pub skipped: Vec<String>,
}

/// The output names, in the order they are moved into place.
pub const OUTPUTS: [&str; 6] = [
    "rootfs",
    "rootfs.tar",
    "rootfs.ext4",
    "image-meta.json",
    "suggested-bootargs.txt",
    "suggested-vm-request.json",
];

/// The original's default output name: the reference with `/`, `:` and `@` as `-`.
pub fn sanitize_name(raw: &str) -> String {
    let s: String = raw
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => Some(c),
            '/' | ':' | '@' => Some('-'),
            _ => None,
        })
        .collect();
    let s = s.trim_matches('-');
    if s.is_empty() {
        "image-rootfs".into()
    } else {
        s.to_string()
    }
}

/// The staging directory: removed on drop unless the build committed it.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn source_label(o: &Options) -> Result<String> {
    if let Some(i) = &o.image {
        return Ok(i.clone());
    }
    match &o.source {
        Source::Registry { .. } => Err(Error::Invalid("--image REF is required".into())),
        Source::Archive(p) | Source::OciDir(p) => Ok(p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())),
    }
}

fn open_image(o: &Options, out: &Path, progress: &mut Progress) -> Result<(Store, Image)> {
    match &o.source {
        Source::Registry { skip_pull } => {
            let reference = o
                .image
                .as_deref()
                .ok_or_else(|| Error::Invalid("--image REF is required".into()))?;
            let whole = registry::parse_reference(reference)?.whole();
            let cache = out.join("image-cache");
            if !skip_pull {
                registry::pull(reference, &cache, &o.platform, &o.access, progress)?;
            }
            let store = Store::dir(&cache);
            let image =
                layout::from_layout(&store, Some(&whole), &o.platform).map_err(|e| match e {
                    Error::NotFound(m) if *skip_pull => Error::NotFound(format!(
                        "{m}; --skip-pull reads only {} (pull once without it)",
                        cache.display()
                    )),
                    other => other,
                })?;
            // A layout of several images falls back to its only one; the cache must not.
            if *skip_pull && image.name.as_deref().is_some_and(|n| n != whole) {
                return Err(Error::NotFound(format!(
                    "{whole} in {} (pull once without --skip-pull)",
                    cache.display()
                )));
            }
            Ok((store, image))
        }
        Source::Archive(p) => {
            let store = Store::tar(p)?;
            let image = layout::from_docker_save(&store, o.image.as_deref(), &o.platform)?;
            Ok((store, image))
        }
        Source::OciDir(p) => {
            let store = Store::dir(p);
            let image = layout::from_layout(&store, o.image.as_deref(), &o.platform)?;
            Ok((store, image))
        }
    }
}

/// The image's creation time as the mtime policy's fixed point (0 without one).
fn created(image: &Image) -> (String, u64) {
    let raw = image.config.created().clone().unwrap_or_default();
    match OffsetDateTime::parse(&raw, &Rfc3339) {
        Ok(t) => (raw, t.unix_timestamp().max(0) as u64),
        Err(_) => ("1970-01-01T00:00:00Z".into(), 0),
    }
}

fn image_meta(image: &Image, label: &str, created_at: String) -> ImageMeta {
    let cfg = image.config.config().clone().unwrap_or_default();
    let entrypoint = cfg.entrypoint().clone();
    let cmd = cfg.cmd().clone();
    let mut exposed = cfg.exposed_ports().clone();
    if let Some(e) = exposed.as_mut() {
        e.sort();
    }
    let start = outputs::start_cmd(
        entrypoint.as_deref().unwrap_or_default(),
        cmd.as_deref().unwrap_or_default(),
    );
    ImageMeta {
        image: label.to_string(),
        created_at,
        entrypoint,
        cmd,
        start_cmd: start,
        env: cfg.env().clone(),
        working_dir: cfg.working_dir().clone().unwrap_or_default(),
        user: cfg.user().clone().unwrap_or_default(),
        suggested_http_port: outputs::suggested_http_port(exposed.as_deref().unwrap_or_default()),
        exposed_ports: exposed,
    }
}

pub fn build(o: &Options) -> Result<Outcome> {
    let label = source_label(o)?;
    let out = match &o.output_dir {
        Some(d) => d.clone(),
        None => PathBuf::from("artifacts/converter")
            .join(sanitize_name(o.name.as_deref().unwrap_or(&label))),
    };
    fs::create_dir_all(&out).ctx(|| format!("creating {}", out.display()))?;
    let out = out
        .canonicalize()
        .ctx(|| format!("resolving {}", out.display()))?;
    let mut progress = Progress::new(o.progress);
    let (store, image) = open_image(o, &out, &mut progress)?;
    let label = o.image.clone().or(image.name.clone()).unwrap_or(label);
    let (init_from, init_bytes) = init_bin::find(o.init.as_deref(), &o.platform.arch)?;

    let staging = Staging(out.join(format!(".mergen-image-work-{}", std::process::id())));
    let _ = fs::remove_dir_all(&staging.0);
    fs::create_dir_all(&staging.0).ctx(|| format!("creating {}", staging.0.display()))?;
    let work = |name: &str| staging.0.join(name);

    let (created_at, mtime) = created(&image);
    let mut tree = Tree::create(&work("rootfs"), mtime)?;
    let count = image.layers.len();
    for (i, layer) in image.layers.iter().enumerate() {
        let name = format!(
            "{}/{count} ({})",
            i + 1,
            layer
                .digest
                .as_deref()
                .or(layer.diff_id.as_deref())
                .unwrap_or(&layer.rel)
        );
        if let Some(d) = &layer.digest {
            digest::verify(
                &format!("layer {name} in {}", store.describe()),
                store.open(&layer.rel)?,
                d,
                layer.size,
            )?;
        } else if layer.diff_id.is_none() {
            return Err(Error::Invalid(format!(
                "layer {name} has no digest to check it against"
            )));
        }
        apply::apply_layer(
            &mut tree,
            &name,
            store.open(&layer.rel)?,
            layer.compression,
            layer.diff_id.as_deref(),
        )?;
    }

    // The guest's PID 1, at both of the original's names (one inode).
    tree.add_own_file(Path::new("sbin/init"), 0o755, &init_bytes)?;
    let alias = tree.place(Path::new("sbin/mergen-init"))?;
    tree.add_hardlink(&alias, Path::new("sbin/init"))?;
    let meta = image_meta(&image, &label, created_at);
    let mut meta_json = serde_json::to_vec_pretty(&meta).expect("metadata serialises");
    meta_json.push(b'\n');
    tree.add_own_file(Path::new("etc/mergen/image-meta.json"), 0o644, &meta_json)?;
    tree.finish()?;

    let tar_file = fs::File::create(work("rootfs.tar")).ctx(|| "creating rootfs.tar".into())?;
    let mut w = BufWriter::with_capacity(1 << 20, tar_file);
    tree.write_tar(&mut w)?;
    w.into_inner()
        .map_err(|e| Error::io("writing rootfs.tar", e.into_error()))?
        .sync_all()
        .ctx(|| "writing rootfs.tar".into())?;

    let size_mib = o
        .size_mib
        .unwrap_or_else(|| outputs::auto_size_mib(tree.content_bytes()));
    outputs::mkfs_ext4(
        tree.root(),
        &work("rootfs.ext4"),
        size_mib,
        tree.entries.len(),
        &image.config_digest,
    )?;

    outputs::write_atomic(&work("image-meta.json"), &meta_json)?;
    outputs::write_atomic(
        &work("suggested-bootargs.txt"),
        format!("{}\n", outputs::BOOT_ARGS).as_bytes(),
    )?;
    let request = outputs::vm_request(&out.join("rootfs.ext4"), &label, meta.suggested_http_port);
    let mut body = serde_json::to_vec_pretty(&request).expect("request serialises");
    body.push(b'\n');
    outputs::write_atomic(&work("suggested-vm-request.json"), &body)?;

    // Commit: each old output is moved into the staging dir (removed with it), each
    // new one renamed into place.
    for name in OUTPUTS {
        let (new, fin) = (work(name), out.join(name));
        if fs::symlink_metadata(&fin).is_ok() {
            fs::rename(&fin, work(&format!("old-{name}")))
                .ctx(|| format!("replacing {}", fin.display()))?;
        }
        fs::rename(&new, &fin).ctx(|| format!("moving {} into place", fin.display()))?;
    }
    Ok(Outcome {
        image: label,
        output_dir: out,
        init_from,
        meta,
        ext4_size_mib: size_mib,
        skipped: tree.skipped.clone(),
    })
}
