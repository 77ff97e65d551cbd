//! The runtime's part of mergend's configuration (`MGR_*` variables). The per-VM step
//! subcommands read the same variables, so a step run by systemd or by the embedded
//! supervisor sees exactly what mergend saw.

use std::path::PathBuf;
use std::time::Duration;

use mergen_model::{Ipv4Cidr, Roots};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorChoice {
    Auto,
    Systemd,
    Embedded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeChoice {
    Auto,
    Firecracker,
    Process,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub roots: Roots,
    /// `MGR_GUEST_CIDR` (172.30.0.0/24); its first host is every VM's gateway.
    pub guest_cidr: Ipv4Cidr,
    /// `MGR_SUPERVISOR` (auto).
    pub supervisor: SupervisorChoice,
    /// `MGR_RUNTIME` (auto = firecracker when its binary and /dev/kvm are present).
    pub runtime: RuntimeChoice,
    /// `MGR_UNIT_PREFIX` (mergen): units are `<prefix>@<id>.service`.
    pub unit_prefix: String,
    /// `MGR_SYSTEMCTL_PATH` (systemctl).
    pub systemctl_path: PathBuf,
    /// `MGR_COMMAND_TIMEOUT_SECONDS` (10): bound on every external command.
    pub command_timeout: Duration,
    /// `MGR_STOP_TIMEOUT_SECONDS` (20): graceful stop before terminating the guest.
    pub stop_timeout: Duration,
    /// `MGR_FIRECRACKER_BIN` (firecracker), `MGR_JAILER_BIN` (jailer), `MGR_JAILER` (1).
    pub firecracker_bin: PathBuf,
    pub jailer_bin: PathBuf,
    pub use_jailer: bool,
    /// `MGR_JAILER_UID` / `MGR_JAILER_GID` (0), `MGR_JAILER_CHROOT_BASE` (/srv/jailer).
    pub jailer_uid: u32,
    pub jailer_gid: u32,
    pub chroot_base: PathBuf,
    /// The binary whose `vm <step> <id>` subcommands run the host steps (mergend itself).
    pub mergend_exe: PathBuf,
}

impl RuntimeConfig {
    pub fn from_env() -> Result<RuntimeConfig, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Build from any variable source (tests pass a map). Errors name the variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<RuntimeConfig, String> {
        let var = |k: &str, default: &str| {
            get(k)
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| default.to_string())
        };
        let secs = |k: &str, default: &str| -> Result<Duration, String> {
            let v = var(k, default);
            v.trim()
                .parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| format!("{k}={v:?} is not a whole number of seconds"))
        };
        let id = |k: &str| -> Result<u32, String> {
            let v = var(k, "0");
            v.trim()
                .parse()
                .map_err(|_| format!("{k}={v:?} is not a numeric id"))
        };
        let supervisor = match var("MGR_SUPERVISOR", "auto").as_str() {
            "auto" => SupervisorChoice::Auto,
            "systemd" => SupervisorChoice::Systemd,
            "embedded" => SupervisorChoice::Embedded,
            other => {
                return Err(format!(
                    "MGR_SUPERVISOR={other:?}: want auto|systemd|embedded"
                ))
            }
        };
        let runtime = match var("MGR_RUNTIME", "auto").as_str() {
            "auto" => RuntimeChoice::Auto,
            "firecracker" => RuntimeChoice::Firecracker,
            "process" => RuntimeChoice::Process,
            other => {
                return Err(format!(
                    "MGR_RUNTIME={other:?}: want auto|firecracker|process"
                ))
            }
        };
        let guest_cidr = var("MGR_GUEST_CIDR", "172.30.0.0/24")
            .parse()
            .map_err(|e| format!("MGR_GUEST_CIDR: {e}"))?;
        let use_jailer = match var("MGR_JAILER", "1").as_str() {
            "1" | "true" | "yes" => true,
            "0" | "false" | "no" => false,
            other => return Err(format!("MGR_JAILER={other:?}: want 1 or 0")),
        };
        let mergend_exe = match get("MGR_MERGEND_BIN").filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe().map_err(|e| {
                format!("cannot find the mergend binary (set MGR_MERGEND_BIN): {e}")
            })?,
        };
        Ok(RuntimeConfig {
            roots: Roots {
                config: var("MGR_CONFIG_ROOT", "/etc/mergen/vm.d").into(),
                data: var("MGR_DATA_ROOT", "/var/lib/mergen").into(),
                run: var("MGR_RUN_ROOT", "/run/mergen").into(),
            },
            guest_cidr,
            supervisor,
            runtime,
            unit_prefix: var("MGR_UNIT_PREFIX", "mergen"),
            systemctl_path: var("MGR_SYSTEMCTL_PATH", "systemctl").into(),
            command_timeout: secs("MGR_COMMAND_TIMEOUT_SECONDS", "10")?,
            stop_timeout: secs("MGR_STOP_TIMEOUT_SECONDS", "20")?,
            firecracker_bin: var("MGR_FIRECRACKER_BIN", "firecracker").into(),
            jailer_bin: var("MGR_JAILER_BIN", "jailer").into(),
            use_jailer,
            jailer_uid: id("MGR_JAILER_UID")?,
            jailer_gid: id("MGR_JAILER_GID")?,
            chroot_base: var("MGR_JAILER_CHROOT_BASE", "/srv/jailer").into(),
            mergend_exe,
        })
    }
}

impl RuntimeConfig {
    /// The `MGR_*` variables that reproduce this configuration, handed to the embedded
    /// supervisor's process so it sees exactly what its caller saw (even when the
    /// caller's configuration did not come from its own environment).
    pub fn to_env(&self) -> Vec<(String, String)> {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        let v = |k: &str, val: String| (k.to_string(), val);
        vec![
            v("MGR_CONFIG_ROOT", path(&self.roots.config)),
            v("MGR_DATA_ROOT", path(&self.roots.data)),
            v("MGR_RUN_ROOT", path(&self.roots.run)),
            v("MGR_GUEST_CIDR", self.guest_cidr.to_string()),
            v(
                "MGR_SUPERVISOR",
                match self.supervisor {
                    SupervisorChoice::Auto => "auto",
                    SupervisorChoice::Systemd => "systemd",
                    SupervisorChoice::Embedded => "embedded",
                }
                .into(),
            ),
            v(
                "MGR_RUNTIME",
                match self.runtime {
                    RuntimeChoice::Auto => "auto",
                    RuntimeChoice::Firecracker => "firecracker",
                    RuntimeChoice::Process => "process",
                }
                .into(),
            ),
            v("MGR_UNIT_PREFIX", self.unit_prefix.clone()),
            v("MGR_SYSTEMCTL_PATH", path(&self.systemctl_path)),
            v(
                "MGR_COMMAND_TIMEOUT_SECONDS",
                self.command_timeout.as_secs().to_string(),
            ),
            v(
                "MGR_STOP_TIMEOUT_SECONDS",
                self.stop_timeout.as_secs().to_string(),
            ),
            v("MGR_FIRECRACKER_BIN", path(&self.firecracker_bin)),
            v("MGR_JAILER_BIN", path(&self.jailer_bin)),
            v("MGR_JAILER", if self.use_jailer { "1" } else { "0" }.into()),
            v("MGR_JAILER_UID", self.jailer_uid.to_string()),
            v("MGR_JAILER_GID", self.jailer_gid.to_string()),
            v("MGR_JAILER_CHROOT_BASE", path(&self.chroot_base)),
            v("MGR_MERGEND_BIN", path(&self.mergend_exe)),
        ]
    }

    /// `MGR_RUNTIME` with `auto` resolved: Firecracker when its binary is found and
    /// /dev/kvm exists, the process runtime otherwise.
    pub fn effective_runtime(&self) -> RuntimeChoice {
        match self.runtime {
            RuntimeChoice::Auto if find_binary(&self.firecracker_bin) && kvm_present() => {
                RuntimeChoice::Firecracker
            }
            RuntimeChoice::Auto => RuntimeChoice::Process,
            chosen => chosen,
        }
    }
}

fn kvm_present() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

/// Whether `bin` names an existing file, directly or through `PATH`.
pub(crate) fn find_binary(bin: &std::path::Path) -> bool {
    if bin.components().count() > 1 {
        return bin.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(bin).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<RuntimeConfig, String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RuntimeConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_original() {
        let c = from(&[]).unwrap();
        assert_eq!(c.roots.config, PathBuf::from("/etc/mergen/vm.d"));
        assert_eq!(c.guest_cidr.to_string(), "172.30.0.0/24");
        assert_eq!(c.unit_prefix, "mergen");
        assert_eq!(c.command_timeout, Duration::from_secs(10));
        assert_eq!(c.supervisor, SupervisorChoice::Auto);
    }

    #[test]
    fn bad_values_name_the_variable() {
        assert!(from(&[("MGR_SUPERVISOR", "cron")])
            .unwrap_err()
            .contains("MGR_SUPERVISOR"));
        assert!(from(&[("MGR_STOP_TIMEOUT_SECONDS", "soon")])
            .unwrap_err()
            .contains("MGR_STOP_TIMEOUT_SECONDS"));
        assert!(from(&[("MGR_GUEST_CIDR", "x")])
            .unwrap_err()
            .contains("MGR_GUEST_CIDR"));
    }

    #[test]
    fn to_env_reproduces_the_configuration() {
        let c = from(&[
            ("MGR_RUN_ROOT", "/tmp/r"),
            ("MGR_GUEST_CIDR", "10.9.0.0/24"),
            ("MGR_SUPERVISOR", "embedded"),
            ("MGR_RUNTIME", "process"),
            ("MGR_JAILER", "0"),
            ("MGR_STOP_TIMEOUT_SECONDS", "3"),
            ("MGR_MERGEND_BIN", "/x/mergend"),
        ])
        .unwrap();
        let env: HashMap<String, String> = c.to_env().into_iter().collect();
        let again = RuntimeConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(format!("{again:?}"), format!("{c:?}"));
    }

    #[test]
    fn auto_runtime_without_a_firecracker_binary_is_process() {
        let c = from(&[("MGR_FIRECRACKER_BIN", "/nonexistent/firecracker")]).unwrap();
        assert_eq!(c.effective_runtime(), RuntimeChoice::Process);
        let c = from(&[("MGR_RUNTIME", "firecracker")]).unwrap();
        assert_eq!(c.effective_runtime(), RuntimeChoice::Firecracker);
    }
}
