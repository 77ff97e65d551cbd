//! The create request: strict parsing (unknown fields and wrong types are named) and
//! the original's validation rules, plus the image-root confinement.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use mergen_model::{HookType, Hooks, ProcessSpec, Protocol};
use serde::Deserialize;

use crate::alloc::PortRequest;
use crate::error::ApiError;

pub const HOOK_EVENTS: [&str; 4] = ["onCreate", "onDelete", "onStart", "onStop"];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCreate {
    rootfs: Option<String>,
    kernel: Option<String>,
    data_disk: Option<String>,
    vcpu: Option<u64>,
    #[serde(rename = "memMiB")]
    mem_mib: Option<u64>,
    ports: Option<Vec<RawPort>>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    auto_start: Option<bool>,
    boot_args: Option<String>,
    extra_env: Option<BTreeMap<String, String>>,
    tags: Option<BTreeMap<String, String>>,
    hooks: Option<Hooks>,
    process: Option<ProcessSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    guest: i64,
    /// Absent or null is 0 (allocate), as Go decoded it into an int.
    host: Option<i64>,
    protocol: Option<String>,
}

/// A validated create request.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    /// Canonical paths, inside the image roots.
    pub rootfs: String,
    pub kernel: String,
    pub data_disk: String,
    pub vcpu: u32,
    pub mem_mib: u32,
    pub ports: Vec<PortRequest>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub auto_start: bool,
    pub boot_args: Option<String>,
    pub extra_env: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    pub hooks: Hooks,
    pub process: Option<ProcessSpec>,
}

/// Parse and validate a create body. `image_roots` must be canonical paths.
pub fn parse_create(body: &[u8], image_roots: &[PathBuf]) -> Result<CreateRequest, ApiError> {
    if !mergen_model::meta::opens_an_object(body) {
        return Err(ApiError::bad_request(
            "invalid request body: want a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw: RawCreate = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::bad_request(format!("invalid request body: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid field {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    validate(raw, image_roots)
}

fn bad(m: String) -> ApiError {
    ApiError::bad_request(m)
}

fn validate(raw: RawCreate, image_roots: &[PathBuf]) -> Result<CreateRequest, ApiError> {
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let process = match raw.process {
        Some(p) => Some(validate_process(p)?),
        None => None,
    };
    let image = |field: &str, v: Option<String>, required: bool| -> Result<String, ApiError> {
        match nonempty(v) {
            Some(p) => image_file(field, &p, image_roots),
            None if required => Err(bad(format!("{field} is required"))),
            None => Ok(String::new()),
        }
    };
    let needs_images = process.is_none();
    let rootfs = image("rootfs", raw.rootfs, needs_images)?;
    let kernel = image("kernel", raw.kernel, needs_images)?;
    let data_disk = image("dataDisk", raw.data_disk, false)?;
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
        let protocol = match p.protocol.as_deref() {
            None | Some("") | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some(other) => {
                return Err(bad(format!(
                    "ports[{i}].protocol must be tcp or udp (got {other:?})"
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
        metadata: raw.metadata.unwrap_or_default(),
        auto_start: raw.auto_start.unwrap_or(false),
        boot_args: nonempty(raw.boot_args),
        extra_env,
        tags: raw.tags.unwrap_or_default(),
        hooks,
        process,
    })
}

/// A path the VM will get: an existing regular file inside an image root, after
/// resolving symlinks, so the API cannot hand an arbitrary host file to a guest.
fn image_file(field: &str, path: &str, roots: &[PathBuf]) -> Result<String, ApiError> {
    if !Path::new(path).is_absolute() {
        return Err(bad(format!("{field}: {path:?} is not an absolute path")));
    }
    let canon = fs::canonicalize(path).map_err(|e| bad(format!("{field}: {path:?}: {e}")))?;
    let md = fs::metadata(&canon).map_err(|e| bad(format!("{field}: {path:?}: {e}")))?;
    if !md.is_file() {
        return Err(bad(format!("{field}: {path:?} is not a regular file")));
    }
    if !roots.iter().any(|r| canon.starts_with(r)) {
        return Err(bad(format!(
            "{field}: {path:?} is outside the allowed image roots (MGR_IMAGE_ROOTS)"
        )));
    }
    canon
        .into_os_string()
        .into_string()
        .map_err(|_| bad(format!("{field}: path is not UTF-8")))
}

fn validate_process(p: ProcessSpec) -> Result<ProcessSpec, ApiError> {
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

fn validate_hooks(hooks: &Hooks) -> Result<(), ApiError> {
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

/// The rules one hook entry must meet (also applied to global hook files).
pub fn check_hook(h: &mergen_model::HookSpec) -> Result<(), String> {
    match h.kind {
        HookType::Http => {
            if h.url.starts_with("https://") {
                Err("https hooks are not supported; use an http:// URL (e.g. a local relay) or an exec hook".into())
            } else if !h.url.starts_with("http://") {
                Err(format!("url {:?} must start with http://", h.url))
            } else {
                Ok(())
            }
        }
        HookType::Exec if h.cmd.first().is_none_or(|c| c.is_empty()) => {
            Err("exec hooks need a non-empty cmd".into())
        }
        HookType::Exec => Ok(()),
    }
}
