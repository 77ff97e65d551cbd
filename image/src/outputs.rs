//! The converter's outputs besides the tree: `image-meta.json`, the suggested boot
//! arguments and VM request, the ext4 image, and crash-safe file writes.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};

/// The original's boot arguments for a converted image: its init, and where that init
/// finds the image metadata. mergend adds the guest network's `ip=` itself.
pub const BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off init=/sbin/init mergen.meta=/etc/mergen/image-meta.json";

/// The kernel the original's suggested request names (the operator's base kernel).
pub const DEFAULT_KERNEL: &str = "/var/lib/mergen/base/vmlinux";

/// `image-meta.json`, field for field as the original writes it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageMeta {
    pub image: String,
    /// The image's own creation time (reproducible), not the conversion's.
    pub created_at: String,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub start_cmd: Vec<String>,
    pub env: Option<Vec<String>>,
    pub working_dir: String,
    pub user: String,
    pub exposed_ports: Option<Vec<String>>,
    #[serde(rename = "suggestedHTTPPort", skip_serializing_if = "is_zero")]
    pub suggested_http_port: u16,
}

fn is_zero(p: &u16) -> bool {
    *p == 0
}

/// The command the guest runs: entrypoint then cmd, `/bin/sh` when both are empty.
pub fn start_cmd(entrypoint: &[String], cmd: &[String]) -> Vec<String> {
    let mut argv: Vec<String> = entrypoint.iter().chain(cmd).cloned().collect();
    if argv.is_empty() {
        argv.push("/bin/sh".into());
    }
    argv
}

/// The original's choice: 80, 8080, 3000 or 8000 when exposed over TCP (in that
/// order of port number), else the lowest TCP port, else the lowest port; 0 for none.
pub fn suggested_http_port(exposed: &[String]) -> u16 {
    let mut ports: Vec<(bool, u16)> = exposed
        .iter()
        .filter_map(|e| {
            let (port, proto) = e.split_once('/').unwrap_or((e.as_str(), "tcp"));
            let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
            Some((proto.eq_ignore_ascii_case("tcp"), port))
        })
        .collect();
    // TCP first, then by port.
    ports.sort_by_key(|(tcp, port)| (!tcp, *port));
    ports
        .iter()
        .find(|(tcp, p)| *tcp && matches!(p, 80 | 8080 | 3000 | 8000))
        .or(ports.iter().find(|(tcp, _)| *tcp))
        .or(ports.first())
        .map(|(_, p)| *p)
        .unwrap_or(0)
}

/// A ready `POST /v1/vms` body for the converted image.
pub fn vm_request(rootfs_ext4: &Path, image: &str, http_port: u16) -> serde_json::Value {
    // As the original: a web guest on 80 when the image says nothing.
    let port = if http_port == 0 { 80 } else { http_port };
    serde_json::json!({
        "rootfs": rootfs_ext4.display().to_string(),
        "kernel": DEFAULT_KERNEL,
        "vcpu": 1,
        "memMiB": 512,
        "httpPort": port,
        "ports": [{"guest": port, "host": 0}],
        "bootArgs": BOOT_ARGS,
        "metadata": {"image": image},
    })
}

/// Writes `path` whole or not at all: a temp file in the same directory, fsynced,
/// renamed over it.
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(body)
            .ctx(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path).ctx(|| format!("renaming {} into place", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The ext4 size when `--size-mib` is not given: content (4 KiB blocks, a block per
/// entry) plus a quarter, plus 64 MiB of headroom for the guest to write in.
pub fn auto_size_mib(content_bytes: u64) -> u64 {
    let mib = content_bytes.div_ceil(1 << 20);
    mib + mib / 4 + 64
}

fn mkfs_binary() -> &'static str {
    for p in ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    "mkfs.ext4"
}

/// `mkfs.ext4 -d`: an ext4 image of `dir` at `out`, `size_mib` large. Its UUID and
/// hash seed come from `seed` (the config digest), so they do not change per build.
pub fn mkfs_ext4(dir: &Path, out: &Path, size_mib: u64, entries: usize, seed: &str) -> Result<()> {
    let f = File::create(out).ctx(|| format!("creating {}", out.display()))?;
    f.set_len(size_mib << 20)
        .ctx(|| format!("sizing {}", out.display()))?;
    drop(f);
    let hex: String = seed
        .trim_start_matches("sha256:")
        .chars()
        .chain(std::iter::repeat('0'))
        .take(32)
        .collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let inodes = entries + entries / 4 + 1024;
    let output = Command::new(mkfs_binary())
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-L", "rootfs",
        ])
        .args(["-N", &inodes.to_string(), "-U", &uuid])
        .args(["-E", &format!("root_owner=0:0,hash_seed={uuid}")])
        .arg("-d")
        .arg(dir)
        .arg(out)
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::Invalid("mkfs.ext4 not found (install e2fsprogs)".into())
            }
            _ => Error::io("running mkfs.ext4", e),
        })?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if text.contains("No space left") || text.contains("Could not allocate block") {
            return Err(Error::NoSpace(format!(
                "building {} ({size_mib} MiB; --size-mib may be too small): {text}",
                out.display()
            )));
        }
        return Err(Error::Invalid(format!("mkfs.ext4 failed: {text}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn http_port_choice_matches_the_original() {
        assert_eq!(
            suggested_http_port(&ports(&["9000/tcp", "8080/tcp", "80/udp"])),
            8080
        );
        assert_eq!(suggested_http_port(&ports(&["3000/tcp", "80/tcp"])), 80);
        assert_eq!(suggested_http_port(&ports(&["9000/tcp", "5000/tcp"])), 5000);
        assert_eq!(suggested_http_port(&ports(&["53/udp", "9000/tcp"])), 9000);
        assert_eq!(suggested_http_port(&ports(&["53/udp"])), 53);
        assert_eq!(suggested_http_port(&ports(&["junk", "0/tcp"])), 0);
        assert_eq!(suggested_http_port(&[]), 0);
    }

    #[test]
    fn meta_json_field_names() {
        let m = ImageMeta {
            image: "nginx:alpine".into(),
            created_at: "2024-01-01T00:00:00Z".into(),
            entrypoint: Some(vec!["/docker-entrypoint.sh".into()]),
            cmd: Some(vec!["nginx".into()]),
            start_cmd: start_cmd(&["/docker-entrypoint.sh".into()], &["nginx".into()]),
            env: None,
            working_dir: String::new(),
            user: String::new(),
            exposed_ports: Some(ports(&["80/tcp"])),
            suggested_http_port: 80,
        };
        let v = serde_json::to_value(&m).unwrap();
        for k in [
            "image",
            "createdAt",
            "entrypoint",
            "cmd",
            "startCmd",
            "env",
            "workingDir",
            "user",
            "exposedPorts",
            "suggestedHTTPPort",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert_eq!(start_cmd(&[], &[]), ["/bin/sh"]);
        let r = vm_request(Path::new("/o/rootfs.ext4"), "nginx:alpine", 0);
        assert_eq!(r["httpPort"], 80);
        assert_eq!(r["ports"][0]["guest"], 80);
        assert!(r["bootArgs"].as_str().unwrap().contains("init=/sbin/init"));
    }
}
