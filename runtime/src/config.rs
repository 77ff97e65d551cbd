//! The runtime's part of mergend's configuration (`MGR_*` variables). The per-VM step
//! subcommands read the same variables, so a step run by systemd or by the embedded
//! supervisor sees exactly what mergend saw. [`VARIABLES`] is the runtime's table:
//! mergend reads it layered under its own (`mergen_ctl::config`), and both drive
//! parsing, defaults, `mergend --help` and the README's table.

use std::path::PathBuf;
use std::time::Duration;

use mergen_envtable::{Env, Var};
use mergen_model::{Ipv4Cidr, Roots};

use crate::isolation::HostPorts;

/// Every variable the runtime reads, with its default and a line of help.
pub const VARIABLES: &[Var] = &[
    Var::new(
        "MGR_CONFIG_ROOT",
        "/etc/mergen/vm.d",
        "VM config dirs (vm.json, meta.json, hooks.json, env)",
    ),
    Var::new("MGR_DATA_ROOT", "/var/lib/mergen", "VM data and log dirs"),
    Var::new(
        "MGR_RUN_ROOT",
        "/run/mergen",
        "VM run dirs, sockets and lock files",
    ),
    Var::new(
        "MGR_GUEST_CIDR",
        "172.30.0.0/24",
        "guest network; .1 is the gateway, guests from .2",
    ),
    Var::new(
        "MGR_GUEST_ISOLATION",
        "1",
        "0 = guests may reach each other and the host's own services",
    ),
    Var::unset(
        "MGR_GUEST_ALLOW_HOST_PORTS",
        "host ports guests may reach anyway: tcp/53,udp/53, 53 (both), tcp/8000-8010",
    ),
    Var::new("MGR_LOG_LEVEL", "info", "debug|info|warn|error"),
    Var::new(
        "MGR_LOG_FORMAT",
        "console",
        "console|json|text (per-VM steps write text unless it is set: their lines go to files)",
    ),
    Var::new("MGR_SUPERVISOR", "auto", "auto|systemd|embedded"),
    Var::new("MGR_RUNTIME", "auto", "auto|firecracker|process"),
    Var::new(
        "MGR_UNIT_PREFIX",
        "mergen",
        "systemd units are <prefix>@<id>.service",
    ),
    Var::new("MGR_SYSTEMCTL_PATH", "systemctl", "systemctl binary"),
    Var::new(
        "MGR_COMMAND_TIMEOUT_SECONDS",
        "10",
        "bound on every external command",
    ),
    Var::new(
        "MGR_STOP_TIMEOUT_SECONDS",
        "20",
        "graceful guest stop before it is terminated",
    ),
    Var::new("MGR_FIRECRACKER_BIN", "firecracker", "Firecracker binary"),
    Var::new("MGR_JAILER_BIN", "jailer", "jailer binary"),
    Var::new("MGR_JAILER", "1", "run Firecracker under the jailer"),
    Var::new("MGR_JAILER_UID", "0", "jailer uid"),
    Var::new("MGR_JAILER_GID", "0", "jailer gid"),
    Var::new(
        "MGR_JAILER_CHROOT_BASE",
        "/srv/jailer",
        "jailer chroot base",
    ),
    Var::computed(
        "MGR_MERGEND_BIN",
        "this binary",
        "binary whose `vm` subcommands run the per-VM steps",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorChoice {
    Auto,
    Systemd,
    Embedded,
}

impl SupervisorChoice {
    const WORDS: &'static [&'static str] = &["auto", "systemd", "embedded"];

    fn word(self) -> &'static str {
        match self {
            SupervisorChoice::Auto => "auto",
            SupervisorChoice::Systemd => "systemd",
            SupervisorChoice::Embedded => "embedded",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeChoice {
    Auto,
    Firecracker,
    Process,
}

impl RuntimeChoice {
    const WORDS: &'static [&'static str] = &["auto", "firecracker", "process"];

    fn word(self) -> &'static str {
        match self {
            RuntimeChoice::Auto => "auto",
            RuntimeChoice::Firecracker => "firecracker",
            RuntimeChoice::Process => "process",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub roots: Roots,
    /// `MGR_GUEST_CIDR` (172.30.0.0/24); its first host is every VM's gateway.
    pub guest_cidr: Ipv4Cidr,
    /// `MGR_GUEST_ISOLATION` (1): the policy of `isolation`; `MGR_GUEST_ALLOW_HOST_PORTS`
    /// (none) its holes.
    pub guest_isolation: bool,
    pub allow_host_ports: HostPorts,
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
        Self::from_vars(&Env::new(VARIABLES, get)).map_err(|e| e.to_string())
    }

    /// Read through `env`, whose tables must include [`VARIABLES`] (mergend layers its
    /// own table over this one).
    pub fn from_vars(env: &Env) -> Result<RuntimeConfig, mergen_envtable::Error> {
        let supervisor = match env
            .choice("MGR_SUPERVISOR", SupervisorChoice::WORDS)?
            .as_str()
        {
            "systemd" => SupervisorChoice::Systemd,
            "embedded" => SupervisorChoice::Embedded,
            _ => SupervisorChoice::Auto,
        };
        let runtime = match env.choice("MGR_RUNTIME", RuntimeChoice::WORDS)?.as_str() {
            "firecracker" => RuntimeChoice::Firecracker,
            "process" => RuntimeChoice::Process,
            _ => RuntimeChoice::Auto,
        };
        let guest_cidr = env.with("MGR_GUEST_CIDR", |v| {
            v.parse::<Ipv4Cidr>()
                .map_err(|e| format!("an IPv4 network such as 172.30.0.0/24 ({e})"))
        })?;
        let mergend_exe = match env.set("MGR_MERGEND_BIN") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe().map_err(|e| mergen_envtable::Error {
                name: "MGR_MERGEND_BIN".into(),
                value: String::new(),
                expected: format!("the mergend binary (this binary cannot be found: {e})"),
            })?,
        };
        let path = |k: &str| PathBuf::from(env.string(k));
        Ok(RuntimeConfig {
            roots: Roots {
                config: path("MGR_CONFIG_ROOT"),
                data: path("MGR_DATA_ROOT"),
                run: path("MGR_RUN_ROOT"),
            },
            guest_cidr: guest_cidr.expect("MGR_GUEST_CIDR has a default"),
            guest_isolation: env.bool("MGR_GUEST_ISOLATION")?,
            allow_host_ports: env
                .with("MGR_GUEST_ALLOW_HOST_PORTS", |v| {
                    v.parse()
                        .map_err(|e| format!("host ports such as tcp/53,udp/53,8000-8010 ({e})"))
                })?
                .unwrap_or_default(),
            supervisor,
            runtime,
            unit_prefix: env.string("MGR_UNIT_PREFIX"),
            systemctl_path: path("MGR_SYSTEMCTL_PATH"),
            command_timeout: env.seconds("MGR_COMMAND_TIMEOUT_SECONDS")?,
            stop_timeout: env.seconds("MGR_STOP_TIMEOUT_SECONDS")?,
            firecracker_bin: path("MGR_FIRECRACKER_BIN"),
            jailer_bin: path("MGR_JAILER_BIN"),
            use_jailer: env.bool("MGR_JAILER")?,
            jailer_uid: env.value("MGR_JAILER_UID", "a numeric user id")?,
            jailer_gid: env.value("MGR_JAILER_GID", "a numeric group id")?,
            chroot_base: path("MGR_JAILER_CHROOT_BASE"),
            mergend_exe,
        })
    }

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
                "MGR_GUEST_ISOLATION",
                if self.guest_isolation { "1" } else { "0" }.into(),
            ),
            v(
                "MGR_GUEST_ALLOW_HOST_PORTS",
                self.allow_host_ports.to_string(),
            ),
            v("MGR_SUPERVISOR", self.supervisor.word().into()),
            v("MGR_RUNTIME", self.runtime.word().into()),
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

/// The log settings of the per-VM steps (`mergend vm ...`, `mergend supervise`):
/// mergend's `MGR_LOG_LEVEL`, and its `MGR_LOG_FORMAT` when set, else `text`, since a
/// step's lines go to a file or the journal rather than a terminal.
pub fn step_log_settings(get: impl Fn(&str) -> Option<String>) -> (String, String) {
    let env = Env::new(VARIABLES, get);
    let format = env.set("MGR_LOG_FORMAT").unwrap_or_else(|| "text".into());
    (env.string("MGR_LOG_LEVEL"), format)
}

fn kvm_present() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

/// Whether `bin` names an existing file, directly or through `PATH`.
pub(crate) fn find_binary(bin: &std::path::Path) -> bool {
    crate::command::which(bin).is_some()
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
    fn shared_rules_zero_seconds_and_go_booleans() {
        for k in ["MGR_COMMAND_TIMEOUT_SECONDS", "MGR_STOP_TIMEOUT_SECONDS"] {
            assert!(from(&[(k, "0")]).unwrap_err().contains(k), "{k}");
            // Blank is unset: the default applies.
            assert!(from(&[(k, " ")]).is_ok(), "{k}");
        }
        for (v, want) in [("True", true), ("t", true), ("F", false), ("0", false)] {
            assert_eq!(from(&[("MGR_JAILER", v)]).unwrap().use_jailer, want, "{v}");
        }
        assert!(from(&[("MGR_JAILER", "maybe")])
            .unwrap_err()
            .contains("MGR_JAILER"));
        assert_eq!(
            from(&[("MGR_RUNTIME", " Process ")]).unwrap().runtime,
            RuntimeChoice::Process
        );
    }

    #[test]
    fn to_env_names_every_variable_of_the_table() {
        let c = from(&[("MGR_MERGEND_BIN", "/x/mergend")]).unwrap();
        let mut given: Vec<String> = c.to_env().into_iter().map(|(k, _)| k).collect();
        let mut table: Vec<String> = VARIABLES
            .iter()
            .map(|v| v.name.to_string())
            // Logging is not the runtime's configuration: the steps choose their own.
            .filter(|n| !n.starts_with("MGR_LOG_"))
            .collect();
        given.sort();
        table.sort();
        assert_eq!(given, table);
    }

    #[test]
    fn steps_log_text_unless_a_format_is_set() {
        assert_eq!(
            step_log_settings(|_| None),
            ("info".to_string(), "text".to_string())
        );
        let set = |k: &str| match k {
            "MGR_LOG_FORMAT" => Some("json".to_string()),
            "MGR_LOG_LEVEL" => Some("debug".to_string()),
            _ => None,
        };
        assert_eq!(
            step_log_settings(set),
            ("debug".to_string(), "json".to_string())
        );
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
        let e = from(&[("MGR_GUEST_ALLOW_HOST_PORTS", "dns")]).unwrap_err();
        assert!(
            e.contains("MGR_GUEST_ALLOW_HOST_PORTS") && e.contains("tcp/53"),
            "{e}"
        );
        assert!(from(&[("MGR_GUEST_ISOLATION", "maybe")])
            .unwrap_err()
            .contains("MGR_GUEST_ISOLATION"));
        let c = from(&[]).unwrap();
        assert!(c.guest_isolation, "isolation is on by default");
        assert!(c.allow_host_ports.0.is_empty());
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
            ("MGR_GUEST_ISOLATION", "false"),
            ("MGR_GUEST_ALLOW_HOST_PORTS", "udp/53, 8000-8001"),
        ])
        .unwrap();
        assert!(!c.guest_isolation);
        assert_eq!(c.allow_host_ports.to_string(), "udp/53,8000-8001");
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
