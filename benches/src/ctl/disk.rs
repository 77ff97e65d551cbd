//! Thousands of VMs on disk without thousands of API calls: each is a copy of a VM that
//! mergend itself created (so every file is in the form mergend writes), with the fields
//! that must differ changed: id, names derived from it, guest IP, host port, paths,
//! creation time. Each copy is committed as mergend commits a create, by renaming a
//! finished temporary directory into place, so a reader never sees half a VM.
//!
//! Creating them through the API would take the better part of an hour at 10,000 VMs
//! while create re-reads every meta.json; mergend must also cope with VMs that appear
//! behind its back, so copies written beside it are fair game.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use mergen_model::{names, Meta, Roots};
use time::OffsetDateTime;

/// A VM mergend wrote, read back to be copied.
pub struct Template {
    meta: Meta,
    /// The config dir's other files (vm.json, env, hooks.json), by name.
    files: Vec<(String, String)>,
}

/// What identifies one replica.
pub struct Replica {
    pub id: String,
    pub guest_ip: Ipv4Addr,
    pub host_port: u16,
}

impl Replica {
    /// The `n`th copy: ids `c0000000-…` upward (unique short ids), guest IPs from
    /// 10.200.4.0 upward, host ports from 25000 upward: clear of what the API hands out
    /// to the first few hundred VMs.
    pub fn nth(n: u32, salt: u32) -> Replica {
        let host = 1024 + n;
        Replica {
            id: format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                0xc000_0000u32 + n,
                salt & 0xffff,
                n & 0xfff,
                (n >> 12) & 0xfff,
                u64::from(n) * 7919 + u64::from(salt)
            ),
            guest_ip: Ipv4Addr::new(10, 200, (host >> 8) as u8, host as u8),
            host_port: 25_000 + n as u16,
        }
    }

    pub fn short_id(&self) -> &str {
        names::short_id(&self.id)
    }
}

impl Template {
    pub fn read(config_root: &Path, id: &str) -> Result<Template, String> {
        let dir = config_root.join(id);
        let meta_bytes = std::fs::read(dir.join("meta.json")).map_err(|e| e.to_string())?;
        let meta = Meta::from_slice(&meta_bytes).map_err(|e| e.to_string())?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "meta.json" {
                let text = std::fs::read_to_string(entry.path()).map_err(|e| e.to_string())?;
                files.push((name, text));
            }
        }
        Ok(Template { meta, files })
    }

    /// Write copy `c` under `roots`, whole or not at all.
    pub fn write(
        &self,
        roots: &Roots,
        c: &Replica,
        created_at: OffsetDateTime,
    ) -> Result<(), String> {
        let t = &self.meta;
        let mut meta = t.clone();
        meta.id = c.id.clone();
        meta.created_at = created_at;
        meta.guest_ip = c.guest_ip;
        meta.tap_name = names::tap_name(&c.id);
        meta.netns = names::netns_name(&c.id);
        meta.paths = roots.paths(&c.id);
        for p in &mut meta.ports {
            p.host = c.host_port;
        }
        let swaps = [
            (t.id.clone(), c.id.clone()),
            (names::short_id(&t.id).to_string(), c.short_id().to_string()),
            (names::guest_mac(&t.id), names::guest_mac(&c.id)),
        ];
        let tmp = roots.config.join(format!(".tmp-{}", c.id));
        let result = (|| -> std::io::Result<()> {
            std::fs::create_dir(&tmp)?;
            for (name, text) in &self.files {
                let mut text = replace_ip(text, t.guest_ip, c.guest_ip);
                for (from, to) in &swaps {
                    text = text.replace(from.as_str(), to);
                }
                std::fs::write(tmp.join(name), text)?;
            }
            let mut json = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
            json.push(b'\n');
            std::fs::write(tmp.join("meta.json"), json)?;
            for d in [&meta.paths.logs_dir, &meta.paths.run_dir] {
                std::fs::create_dir_all(d)?;
            }
            std::fs::rename(&tmp, &meta.paths.config_dir)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            format!("writing VM {}: {e}", c.id)
        })
    }
}

/// `text` with every whole occurrence of `from` (not followed by another digit) as `to`.
fn replace_ip(text: &str, from: Ipv4Addr, to: Ipv4Addr) -> String {
    let (from, to) = (from.to_string(), to.to_string());
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(&from) {
        let after = &rest[i + from.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(&from);
        } else {
            out.push_str(&to);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Remove a VM as mergend does: out of sight first (renamed to a dot-name), then gone.
pub fn remove(roots: &Roots, id: &str) -> Result<(), String> {
    let gone: PathBuf = roots.config.join(format!(".del-{id}"));
    std::fs::rename(roots.config.join(id), &gone)
        .and_then(|()| std::fs::remove_dir_all(&gone))
        .map_err(|e| format!("removing VM {id}: {e}"))
}

/// How many meta.json files the config root holds, read whole (the floor for listing).
pub fn read_metas(config: &Path) -> Result<usize, String> {
    let mut n = 0;
    for e in std::fs::read_dir(config).map_err(|e| e.to_string())? {
        let p = e.map_err(|e| e.to_string())?.path().join("meta.json");
        if let Ok(b) = std::fs::read(&p) {
            n += usize::from(!b.is_empty());
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_replacement_respects_boundaries() {
        let from = Ipv4Addr::new(10, 200, 0, 2);
        let to = Ipv4Addr::new(10, 200, 4, 9);
        assert_eq!(
            replace_ip("ip=10.200.0.2::10.200.0.1 10.200.0.25,10.200.0.2", from, to),
            "ip=10.200.4.9::10.200.0.1 10.200.0.25,10.200.4.9"
        );
    }

    #[test]
    fn copies_have_distinct_valid_ids_ips_and_ports() {
        let a = Replica::nth(0, 7);
        let b = Replica::nth(9_999, 7);
        for c in [&a, &b] {
            assert!(names::is_valid_id(&c.id), "{}", c.id);
        }
        assert_ne!(a.short_id(), b.short_id());
        assert_ne!(a.guest_ip, b.guest_ip);
        assert_eq!(b.host_port, 25_000 + 9_999);
        assert_eq!(Replica::nth(1, 7).guest_ip, Ipv4Addr::new(10, 200, 4, 1));
    }
}
