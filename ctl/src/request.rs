//! The create request: strict parsing (unknown fields and wrong types are named) and
//! the original's validation rules, plus the image-root confinement.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use mergen_model::{Hooks, ProcessSpec, Protocol, HOOK_EVENTS};
use serde::Deserialize;

use crate::alloc::PortRequest;
use crate::error::Error;
use crate::hooks::check_hook;

/// What one VM may store of its own: every list response carries its tags and
/// metadata, and the forwarder keeps its tags and metadata in memory.
pub const MAX_STORED_BYTES: usize = 64 * 1024;
/// Entries in `tags`, in `metadata` (top level), in `extraEnv`.
pub const MAX_ENTRIES: usize = 256;
/// Hooks over all events.
pub const MAX_HOOKS: usize = 64;

/// Unknown keys anywhere in the body are refused (see `parse_create`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCreate {
    rootfs: Option<String>,
    kernel: Option<String>,
    data_disk: Option<String>,
    vcpu: Option<u64>,
    #[serde(rename = "memMiB")]
    mem_mib: Option<u64>,
    ports: Option<Vec<RawPort>>,
    http_port: Option<i64>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    auto_start: Option<bool>,
    boot_args: Option<String>,
    extra_env: Option<BTreeMap<String, String>>,
    tags: Option<BTreeMap<String, String>>,
    hooks: Option<Hooks>,
    process: Option<ProcessSpec>,
}

#[derive(Debug, Deserialize)]
struct RawPort {
    guest: i64,
    /// Absent or null is 0 (allocate), as Go decoded it into an int.
    host: Option<i64>,
    protocol: Option<String>,
}

/// A validated create request.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    /// As given; checked against the image roots and devices.
    pub rootfs: String,
    pub kernel: String,
    pub data_disk: String,
    pub vcpu: u32,
    pub mem_mib: u32,
    pub ports: Vec<PortRequest>,
    /// The guest port the forwarder's HTTPS listener dials; 0 = none.
    pub http_port: u16,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub auto_start: bool,
    pub boot_args: Option<String>,
    pub extra_env: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub hooks: Hooks,
    pub process: Option<ProcessSpec>,
}

/// Where a VM's images may come from, canonical (symlinks resolved at start-up).
#[derive(Debug, Clone, Default)]
pub struct Images {
    /// `MGR_IMAGE_ROOTS`: files and block devices inside these dirs.
    pub roots: Vec<PathBuf>,
    /// `MGR_IMAGE_DEVICES`: block devices allowed wherever they are (LVM volumes).
    pub devices: Vec<PathBuf>,
}

/// Parse and validate a create body.
pub fn parse_create(body: &[u8], images: &Images) -> Result<CreateRequest, Error> {
    if !mergen_model::meta::opens_an_object(body) {
        return Err(Error::BadRequest(
            "invalid request body: want a JSON object".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    // The model's types ignore unknown keys (files of other versions must load); a
    // request is strict, so every key they would ignore is collected and refused.
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path| unknown.push(path.to_string());
    let raw: RawCreate =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(&mut de, &mut note))
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." || path.is_empty() {
                    Error::BadRequest(format!("invalid request body: {inner}"))
                } else {
                    Error::BadRequest(format!("invalid field {path}: {inner}"))
                }
            })?;
    de.end()
        .map_err(|e| Error::BadRequest(format!("invalid request body: {e}")))?;
    if let Some(path) = unknown.first() {
        return Err(Error::BadRequest(format!("unknown field {path}")));
    }
    validate(raw, images)
}

fn bad(m: String) -> Error {
    Error::BadRequest(m)
}

fn validate(raw: RawCreate, images: &Images) -> Result<CreateRequest, Error> {
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let process = match raw.process {
        Some(p) => Some(validate_process(p, images)?),
        None => None,
    };
    let image = |field: &str, v: Option<String>, required: bool, want: Want| match nonempty(v) {
        Some(p) => image_path(field, &p, images, want),
        None if required => Err(bad(format!("{field} is required"))),
        None => Ok(String::new()),
    };
    let needs_images = process.is_none();
    let rootfs = image("rootfs", raw.rootfs, needs_images, Want::Disk)?;
    let kernel = image("kernel", raw.kernel, needs_images, Want::File)?;
    let data_disk = image("dataDisk", raw.data_disk, false, Want::Disk)?;
    if rootfs.is_empty() != kernel.is_empty() {
        return Err(bad(
            "rootfs and kernel go together: give both or neither".into()
        ));
    }
    let vcpu = match raw.vcpu {
        None => 1,
        Some(v) if v > 0 && v <= u64::from(u32::MAX) => v as u32,
        Some(v) => return Err(bad(format!("vcpu must be > 0 (got {v})"))),
    };
    let mem_mib = match raw.mem_mib {
        None => 512,
        Some(v) if (128..=u64::from(u32::MAX)).contains(&v) => v as u32,
        Some(v) => return Err(bad(format!("memMiB must be >= 128 (got {v})"))),
    };
    let mut ports = Vec::new();
    let mut hosts = std::collections::HashSet::new();
    for (i, p) in raw.ports.unwrap_or_default().into_iter().enumerate() {
        let guest = u16::try_from(p.guest)
            .ok()
            .filter(|g| *g > 0)
            .ok_or_else(|| {
                bad(format!(
                    "ports[{i}].guest must be 1..65535 (got {})",
                    p.guest
                ))
            })?;
        let requested_host = p.host.unwrap_or(0);
        let host = u16::try_from(requested_host).map_err(|_| {
            bad(format!(
                "ports[{i}].host must be 0..65535 (got {requested_host})"
            ))
        })?;
        let protocol = match p.protocol.as_deref().map(Protocol::parse) {
            None => Protocol::Tcp,
            Some(Some(proto)) => proto,
            Some(None) => {
                return Err(bad(format!(
                    "ports[{i}].protocol must be tcp or udp (got {:?})",
                    p.protocol.unwrap_or_default()
                )))
            }
        };
        if host != 0 && !hosts.insert(host) {
            return Err(bad(format!(
                "ports[{i}].host {host} is repeated in the request"
            )));
        }
        ports.push(PortRequest {
            guest,
            host,
            protocol,
        });
    }
    let http_port = match raw.http_port {
        None => 0,
        Some(p) => {
            u16::try_from(p).map_err(|_| bad(format!("httpPort must be 0..65535 (got {p})")))?
        }
    };
    let extra_env = raw.extra_env.unwrap_or_default();
    for (k, v) in &extra_env {
        // Blank keys are accepted and skipped when the env file is written, as the
        // original did.
        let valid_key = k.trim().is_empty()
            || (k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit());
        if !valid_key {
            return Err(bad(format!(
                "extraEnv key {k:?} is not a valid variable name"
            )));
        }
        // The env file is read by the root-run unit steps: it must not reconfigure
        // them (MGR_*) nor the dynamic loader (LD_*).
        if k.starts_with("MGR_") || k.starts_with("LD_") {
            return Err(bad(format!(
                "extraEnv key {k:?} is reserved (MGR_* and LD_* cannot be set)"
            )));
        }
        if v.contains(['\n', '\r', '\0']) {
            return Err(bad(format!(
                "extraEnv {k}: values cannot hold line breaks or NUL"
            )));
        }
    }
    let hooks = raw.hooks.unwrap_or_default();
    validate_hooks(&hooks)?;
    let tags = raw.tags.unwrap_or_default();
    let metadata = raw.metadata.unwrap_or_default();
    check_bounds(&tags, &metadata, &hooks, &extra_env)?;
    if let Some(b) = &raw.boot_args {
        if b.contains(['\n', '\0']) {
            return Err(bad("bootArgs cannot hold line breaks or NUL".into()));
        }
    }
    Ok(CreateRequest {
        rootfs,
        kernel,
        data_disk,
        vcpu,
        mem_mib,
        ports,
        http_port,
        metadata,
        auto_start: raw.auto_start.unwrap_or(false),
        boot_args: nonempty(raw.boot_args),
        extra_env,
        tags,
        hooks,
        process,
    })
}

/// What an image path must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A regular file (a kernel).
    File,
    /// A regular file or a block device (a rootfs or data disk).
    Disk,
    /// A directory (`process.root`, an image's `rootfs/`).
    Directory,
}

impl Want {
    fn what(self) -> &'static str {
        match self {
            Want::File => "a regular file",
            Want::Disk => "a regular file or a block device",
            Want::Directory => "a directory",
        }
    }
}

/// A path the VM will get: an existing regular file, block device (for disks) or
/// directory (for an image root) inside an image root after resolving symlinks, or a
/// block device listed in `MGR_IMAGE_DEVICES`, so the API cannot hand an arbitrary host
/// file to a guest. The path is stored as given (as the original did): an LVM volume's
/// `/dev/vg/lv` stays valid when its `/dev/dm-N` target is renumbered at the next boot.
fn image_path(field: &str, path: &str, images: &Images, want: Want) -> Result<String, Error> {
    if !Path::new(path).is_absolute() {
        return Err(bad(format!("{field}: {path:?} is not an absolute path")));
    }
    let canon = fs::canonicalize(path).map_err(|e| bad(format!("{field}: {path:?}: {e}")))?;
    let md = fs::metadata(&canon).map_err(|e| bad(format!("{field}: {path:?}: {e}")))?;
    let device = md.file_type().is_block_device();
    let fits = match want {
        Want::File => md.is_file(),
        Want::Disk => md.is_file() || device,
        Want::Directory => md.is_dir(),
    };
    if !fits {
        if device {
            return Err(bad(format!(
                "{field}: {path:?} is a block device, not {}",
                want.what()
            )));
        }
        return Err(bad(format!("{field}: {path:?} is not {}", want.what())));
    }
    let inside_roots = images.roots.iter().any(|r| canon.starts_with(r));
    let listed_device = device && images.devices.contains(&canon);
    if !inside_roots && !listed_device {
        let also = if device {
            " nor listed in MGR_IMAGE_DEVICES"
        } else {
            ""
        };
        return Err(bad(format!(
            "{field}: {path:?} is outside the allowed image roots (MGR_IMAGE_ROOTS){also}"
        )));
    }
    Ok(path.to_string())
}

/// What a `process.root` must hold, as the guest will see it: mergen-image's outputs
/// always do.
const IMAGE_ROOT_FILES: [&str; 2] = ["sbin/init", "etc/mergen/image-meta.json"];

fn validate_process(p: ProcessSpec, images: &Images) -> Result<ProcessSpec, Error> {
    if let Some(root) = &p.root {
        // The image's own start command, env and working dir apply, as in a VM.
        for (field, given) in [
            ("cmd", !p.cmd.is_empty()),
            ("env", !p.env.is_empty()),
            ("workdir", p.workdir.is_some()),
        ] {
            if given {
                return Err(bad(format!(
                    "process.{field} cannot be given with process.root: the image's start command runs, with the image's env and working dir"
                )));
            }
        }
        image_path("process.root", root, images, Want::Directory)?;
        for file in IMAGE_ROOT_FILES {
            check_image_file(root, file)?;
        }
        return Ok(p);
    }
    if p.cmd.first().is_none_or(|c| c.is_empty()) {
        return Err(bad("process.cmd must be a non-empty argv".into()));
    }
    if p.cmd.iter().any(|a| a.contains('\0')) {
        return Err(bad("process.cmd cannot hold NUL".into()));
    }
    if let Some(w) = &p.workdir {
        if !Path::new(w).is_absolute() || !Path::new(w).is_dir() {
            return Err(bad(format!(
                "process.workdir {w:?} is not an existing absolute directory"
            )));
        }
    }
    Ok(p)
}

/// `file` must be a regular file in the image at `root`, its symlinks resolved with
/// `root` as `/` (`RESOLVE_IN_ROOT`), as the chrooted guest will resolve them: an
/// image's absolute links (`/sbin -> /usr/sbin`) work, and none can point the check
/// at a host file.
fn check_image_file(root: &str, file: &str) -> Result<(), Error> {
    use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
    let missing = |e: &dyn std::fmt::Display| {
        bad(format!(
            "process.root: {root:?} has no /{file} ({e}): give the rootfs/ directory of a mergen-image output"
        ))
    };
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| missing(&e))?;
    let fd = openat2(
        &dir,
        file,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| missing(&e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| missing(&e))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(missing(&"not a regular file"));
    }
    Ok(())
}

/// The bounds on what a create may store, each error naming its limit.
fn check_bounds(
    tags: &BTreeMap<String, String>,
    metadata: &serde_json::Map<String, serde_json::Value>,
    hooks: &Hooks,
    extra_env: &BTreeMap<String, String>,
) -> Result<(), Error> {
    for (field, n) in [
        ("tags", tags.len()),
        ("metadata", metadata.len()),
        ("extraEnv", extra_env.len()),
    ] {
        if n > MAX_ENTRIES {
            return Err(bad(format!("{field}: {n} entries, at most {MAX_ENTRIES}")));
        }
    }
    let n_hooks: usize = hooks.values().map(Vec::len).sum();
    if n_hooks > MAX_HOOKS {
        return Err(bad(format!("hooks: {n_hooks} hooks, at most {MAX_HOOKS}")));
    }
    let total = json_len(tags) + json_len(metadata) + json_len(hooks);
    if total > MAX_STORED_BYTES {
        return Err(bad(format!(
            "tags, metadata and hooks: {total} bytes of JSON, at most {MAX_STORED_BYTES}"
        )));
    }
    Ok(())
}

/// The length of a value's JSON, counted without building the text.
fn json_len<T: serde::Serialize>(v: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

fn validate_hooks(hooks: &Hooks) -> Result<(), Error> {
    for (event, list) in hooks {
        if !HOOK_EVENTS.contains(&event.as_str()) {
            return Err(bad(format!(
                "hooks.{event}: unknown event (want one of {})",
                HOOK_EVENTS.join(", ")
            )));
        }
        for (i, h) in list.iter().enumerate() {
            check_hook(h).map_err(|m| bad(format!("hooks.{event}[{i}]: {m}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mergen_testkit::TempDir;
    use std::os::unix::fs::symlink;

    /// An image root `img/<name>` holding what mergen-image puts there; `/sbin` is an
    /// absolute link, as in usrmerged images.
    fn image(tmp: &TempDir, name: &str) -> PathBuf {
        let root = tmp.join("img").join(name);
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        fs::create_dir_all(root.join("etc/mergen")).unwrap();
        symlink("/usr/sbin", root.join("sbin")).unwrap();
        fs::write(root.join("usr/sbin/init"), b"\x7fELF").unwrap();
        fs::write(root.join("etc/mergen/image-meta.json"), b"{}").unwrap();
        root
    }

    fn images(tmp: &TempDir) -> Images {
        Images {
            roots: vec![fs::canonicalize(tmp.join("img")).unwrap()],
            devices: vec![],
        }
    }

    fn create(body: serde_json::Value, images: &Images) -> Result<CreateRequest, String> {
        parse_create(body.to_string().as_bytes(), images).map_err(|e| e.to_string())
    }

    #[test]
    fn an_image_root_is_a_process_guest_of_its_own() {
        let tmp = TempDir::new("req-root");
        let root = image(&tmp, "web");
        let images = images(&tmp);
        let req = create(
            serde_json::json!({"process": {"root": root}, "httpPort": 8080}),
            &images,
        )
        .unwrap();
        let spec = req.process.unwrap();
        assert_eq!(spec.root.as_deref(), Some(root.to_str().unwrap()));
        assert!(spec.cmd.is_empty() && req.rootfs.is_empty() && req.kernel.is_empty());
    }

    #[test]
    fn an_image_root_refuses_what_the_image_decides() {
        let tmp = TempDir::new("req-root-refused");
        let root = image(&tmp, "web");
        let images = images(&tmp);
        for (extra, field) in [
            (serde_json::json!({"cmd": ["sh"]}), "process.cmd"),
            (serde_json::json!({"env": {"A": "b"}}), "process.env"),
            (serde_json::json!({"workdir": "/tmp"}), "process.workdir"),
        ] {
            let mut process = extra;
            process["root"] = root.to_str().unwrap().into();
            let err = create(serde_json::json!({"process": process}), &images).unwrap_err();
            assert!(
                err.contains(field) && err.contains("the image's start command runs"),
                "{err}"
            );
        }
        // An explicit empty command is no command.
        let ok = serde_json::json!({"process": {"root": root, "cmd": []}});
        assert!(create(ok, &images).is_ok());
    }

    #[test]
    fn an_image_root_must_be_an_image_inside_the_roots() {
        let tmp = TempDir::new("req-root-where");
        let inside = image(&tmp, "web");
        let images = images(&tmp);
        let err_of = |root: &Path| {
            create(serde_json::json!({"process": {"root": root}}), &images).unwrap_err()
        };
        // Outside the image roots, directly or through a link inside them.
        let outside = tmp.join("elsewhere");
        fs::create_dir_all(&outside).unwrap();
        fs::rename(image(&tmp, "moved"), outside.join("rootfs")).unwrap();
        let err = err_of(&outside.join("rootfs"));
        assert!(err.contains("outside the allowed image roots"), "{err}");
        symlink(outside.join("rootfs"), tmp.join("img/link")).unwrap();
        let err = err_of(&tmp.join("img/link"));
        assert!(err.contains("outside the allowed image roots"), "{err}");
        // Relative, missing, not a directory.
        let err = create(serde_json::json!({"process": {"root": "img/web"}}), &images).unwrap_err();
        assert!(err.contains("not an absolute path"), "{err}");
        let err = err_of(&tmp.join("img/none"));
        assert!(
            err.contains("process.root") && err.contains("No such file"),
            "{err}"
        );
        let err = err_of(&inside.join("etc/mergen/image-meta.json"));
        assert!(err.contains("is not a directory"), "{err}");
        // Without mergen-init or the metadata.
        fs::remove_file(inside.join("usr/sbin/init")).unwrap();
        let err = err_of(&inside);
        assert!(err.contains("has no /sbin/init"), "{err}");
        fs::create_dir(inside.join("usr/sbin/init")).unwrap();
        let err = err_of(&inside);
        assert!(
            err.contains("has no /sbin/init") && err.contains("not a regular file"),
            "{err}"
        );
        let other = image(&tmp, "nometa");
        fs::remove_file(other.join("etc/mergen/image-meta.json")).unwrap();
        let err = err_of(&other);
        assert!(err.contains("has no /etc/mergen/image-meta.json"), "{err}");
        // A link that leads out of the image is resolved inside it, as the chrooted
        // guest would: the host's file is not found there.
        let escape = image(&tmp, "escape");
        fs::remove_file(escape.join("sbin")).unwrap();
        let host_sbin = tmp.join("host-sbin");
        fs::create_dir_all(&host_sbin).unwrap();
        fs::write(host_sbin.join("init"), b"host").unwrap();
        symlink(&host_sbin, escape.join("sbin")).unwrap();
        let err = err_of(&escape);
        assert!(err.contains("has no /sbin/init"), "{err}");
    }

    #[test]
    fn a_command_guest_is_unchanged() {
        let tmp = TempDir::new("req-cmd");
        fs::create_dir_all(tmp.join("img")).unwrap();
        let images = images(&tmp);
        let err = create(serde_json::json!({"process": {"cmd": []}}), &images).unwrap_err();
        assert!(
            err.contains("process.cmd must be a non-empty argv"),
            "{err}"
        );
        let err = create(serde_json::json!({"process": {}}), &images).unwrap_err();
        assert!(
            err.contains("process.cmd must be a non-empty argv"),
            "{err}"
        );
        let req = create(
            serde_json::json!({"process": {"cmd": ["sleep", "1"], "env": {"A": "b"}}}),
            &images,
        )
        .unwrap();
        assert_eq!(req.process.unwrap().cmd, ["sleep", "1"]);
    }
}
