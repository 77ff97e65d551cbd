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
}
