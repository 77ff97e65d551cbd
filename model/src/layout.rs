//! Where a VM's files live. One function computes every path so ctl, the runtime
//! steps and the forwarder can never disagree.

use std::path::{Path, PathBuf};

use crate::meta::Paths;

/// The three state roots (`MGR_CONFIG_ROOT`, `MGR_DATA_ROOT`, `MGR_RUN_ROOT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    pub config: PathBuf,
    pub data: PathBuf,
    pub run: PathBuf,
}

impl Roots {
    /// Every path of VM `id`, laid out as the original did.
    pub fn paths(&self, id: &str) -> Paths {
        let config_dir = self.config.join(id);
        let run_dir = self.run.join(id);
        let data_dir = self.data.join(id);
        Paths {
            vm_config_path: s(&config_dir.join("vm.json")),
            meta_path: s(&config_dir.join("meta.json")),
            hooks_path: s(&config_dir.join("hooks.json")),
            env_path: s(&config_dir.join("env")),
            config_dir: s(&config_dir),
            socket_path: s(&run_dir.join("mergen.socket")),
            run_dir: s(&run_dir),
            lock_path: s(&self.run.join(format!("{id}.lock"))),
            logs_dir: s(&data_dir.join("logs")),
            data_dir: s(&data_dir),
        }
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_original() {
        let roots = Roots {
            config: "/etc/mergen/vm.d".into(),
            data: "/var/lib/mergen".into(),
            run: "/run/mergen".into(),
        };
        let p = roots.paths("abc");
        assert_eq!(p.config_dir, "/etc/mergen/vm.d/abc");
        assert_eq!(p.vm_config_path, "/etc/mergen/vm.d/abc/vm.json");
        assert_eq!(p.meta_path, "/etc/mergen/vm.d/abc/meta.json");
        assert_eq!(p.hooks_path, "/etc/mergen/vm.d/abc/hooks.json");
        assert_eq!(p.env_path, "/etc/mergen/vm.d/abc/env");
        assert_eq!(p.run_dir, "/run/mergen/abc");
        assert_eq!(p.socket_path, "/run/mergen/abc/mergen.socket");
        assert_eq!(p.lock_path, "/run/mergen/abc.lock");
        assert_eq!(p.data_dir, "/var/lib/mergen/abc");
        assert_eq!(p.logs_dir, "/var/lib/mergen/abc/logs");
    }
}
