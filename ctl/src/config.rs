//! mergend's configuration, from `MGR_*` variables. The runtime's variables are read by
//! `mergen_runtime::RuntimeConfig` from the same source.

use std::path::PathBuf;
use std::time::Duration;

use mergen_http::ListenAddr;
use mergen_runtime::RuntimeConfig;

/// Every variable mergend reads, with its default, for `mergend --help`.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "MGR_HTTP_ADDR",
        "127.0.0.1:8080",
        "TCP listen address (\":8080\" means every IPv4 and IPv6 address)",
    ),
    (
        "MGR_HTTP_SOCKET",
        "(unset)",
        "also listen on this unix socket",
    ),
    (
        "MGR_API_TOKEN",
        "(unset)",
        "require `Authorization: Bearer <token>` on /v1",
    ),
    (
        "MGR_ALLOW_INSECURE",
        "0",
        "1 = allow a non-loopback address without a token",
    ),
    (
        "MGR_SHUTDOWN_TIMEOUT_SECONDS",
        "15",
        "grace period for in-flight requests on SIGINT/SIGTERM",
    ),
    (
        "MGR_HTTP_MAX_CONNECTIONS",
        "256",
        "open connections; at the cap the oldest idle one is closed, else 503",
    ),
    (
        "MGR_HTTP_MAX_CONNECTIONS_PER_IP",
        "64",
        "open connections per client address (IPv4, or IPv6 /64)",
    ),
    (
        "MGR_HTTP_HEADER_TIMEOUT_SECONDS",
        "5",
        "a connection without a whole request head by then is dropped",
    ),
    (
        "MGR_HTTP_READ_TIMEOUT_SECONDS",
        "10",
        "time to send one whole request (then 408)",
    ),
    (
        "MGR_HTTP_IDLE_TIMEOUT_SECONDS",
        "60",
        "idle keep-alive connections are closed after this",
    ),
    (
        "MGR_HTTP_WORKERS",
        "16",
        "requests handled at once (the others wait their turn)",
    ),
    (
        "MGR_CONFIG_ROOT",
        "/etc/mergen/vm.d",
        "VM config dirs (vm.json, meta.json, hooks.json, env)",
    ),
    ("MGR_DATA_ROOT", "/var/lib/mergen", "VM data and log dirs"),
    (
        "MGR_RUN_ROOT",
        "/run/mergen",
        "VM run dirs, sockets and lock files",
    ),
    (
        "MGR_IMAGE_ROOTS",
        "$MGR_DATA_ROOT",
        "colon-separated dirs that rootfs/kernel/dataDisk must be inside",
    ),
    (
        "MGR_GLOBAL_HOOKS_DIR",
        "/etc/mergen/hooks.d",
        "global hook files (*.json), run before a VM's own",
    ),
    (
        "MGR_HOOK_WORKERS",
        "8",
        "background (non-strict) hooks run at most this many at once",
    ),
    (
        "MGR_PORT_START",
        "20000",
        "first host port handed out for `host: 0`",
    ),
    (
        "MGR_PORT_END",
        "40000",
        "last host port handed out for `host: 0`",
    ),
    (
        "MGR_GUEST_CIDR",
        "172.30.0.0/24",
        "guest network; .1 is the gateway, guests from .2",
    ),
    ("MGR_LOG_LEVEL", "info", "debug|info|warn|error"),
    ("MGR_LOG_FORMAT", "console", "console|json|text"),
    ("MGR_SUPERVISOR", "auto", "auto|systemd|embedded"),
    ("MGR_RUNTIME", "auto", "auto|firecracker|process"),
    (
        "MGR_UNIT_PREFIX",
        "mergen",
        "systemd units are <prefix>@<id>.service",
    ),
    ("MGR_SYSTEMCTL_PATH", "systemctl", "systemctl binary"),
    (
        "MGR_COMMAND_TIMEOUT_SECONDS",
        "10",
        "bound on every external command",
    ),
    (
        "MGR_STOP_TIMEOUT_SECONDS",
        "20",
        "graceful guest stop before it is terminated",
    ),
    ("MGR_FIRECRACKER_BIN", "firecracker", "Firecracker binary"),
    ("MGR_JAILER_BIN", "jailer", "jailer binary"),
    ("MGR_JAILER", "1", "run Firecracker under the jailer"),
    ("MGR_JAILER_UID", "0", "jailer uid"),
    ("MGR_JAILER_GID", "0", "jailer gid"),
    (
        "MGR_JAILER_CHROOT_BASE",
        "/srv/jailer",
        "jailer chroot base",
    ),
    (
        "MGR_MERGEND_BIN",
        "(this binary)",
        "binary whose `vm` subcommands run the per-VM steps",
    ),
];

#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: ListenAddr,
    pub http_socket: Option<PathBuf>,
    pub api_token: Option<String>,
    pub allow_insecure: bool,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub header_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http_workers: usize,
    pub image_roots: Vec<PathBuf>,
    pub global_hooks_dir: PathBuf,
    pub hook_workers: usize,
    pub port_start: u16,
    pub port_end: u16,
    pub log_level: String,
    pub log_format: String,
    pub runtime: RuntimeConfig,
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Build from any variable source. Errors name the variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let runtime = RuntimeConfig::from_lookup(&get)?;
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let num = |k: &str, default: u64| -> Result<u64, String> {
            match var(k) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("{k}={v:?} is not a whole number")),
            }
        };
        let flag = |k: &str| -> Result<bool, String> {
            match var(k).as_deref() {
                None | Some("0" | "false" | "no") => Ok(false),
                Some("1" | "true" | "yes") => Ok(true),
                Some(other) => Err(format!("{k}={other:?}: want 1 or 0")),
            }
        };
        let http_addr = var("MGR_HTTP_ADDR")
            .unwrap_or_else(|| "127.0.0.1:8080".into())
            .parse::<ListenAddr>()
            .map_err(|e| format!("MGR_HTTP_ADDR: {e}"))?;
        let port = |k: &str, default: u64| -> Result<u16, String> {
            let v = num(k, default)?;
            u16::try_from(v)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{k}={v} is not a port (1..65535)"))
        };
        let port_start = port("MGR_PORT_START", 20000)?;
        let port_end = port("MGR_PORT_END", 40000)?;
        if port_start > port_end {
            return Err(format!(
                "MGR_PORT_START={port_start} is above MGR_PORT_END={port_end}"
            ));
        }
        let image_roots = match var("MGR_IMAGE_ROOTS") {
            Some(v) => v
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect(),
            None => vec![runtime.roots.data.clone()],
        };
        let positive = |k: &str, default: u64| -> Result<u64, String> {
            let v = num(k, default)?;
            if v == 0 {
                return Err(format!("{k} must be above 0"));
            }
            Ok(v)
        };
        Ok(Config {
            http_addr,
            http_socket: var("MGR_HTTP_SOCKET").map(PathBuf::from),
            api_token: var("MGR_API_TOKEN"),
            allow_insecure: flag("MGR_ALLOW_INSECURE")?,
            shutdown_timeout: Duration::from_secs(num("MGR_SHUTDOWN_TIMEOUT_SECONDS", 15)?),
            max_connections: positive("MGR_HTTP_MAX_CONNECTIONS", 256)? as usize,
            max_connections_per_ip: positive("MGR_HTTP_MAX_CONNECTIONS_PER_IP", 64)? as usize,
            header_timeout: Duration::from_secs(positive("MGR_HTTP_HEADER_TIMEOUT_SECONDS", 5)?),
            read_timeout: Duration::from_secs(positive("MGR_HTTP_READ_TIMEOUT_SECONDS", 10)?),
            idle_timeout: Duration::from_secs(positive("MGR_HTTP_IDLE_TIMEOUT_SECONDS", 60)?),
            http_workers: positive("MGR_HTTP_WORKERS", 16)? as usize,
            image_roots,
            global_hooks_dir: var("MGR_GLOBAL_HOOKS_DIR")
                .unwrap_or_else(|| "/etc/mergen/hooks.d".into())
                .into(),
            hook_workers: positive("MGR_HOOK_WORKERS", 8)? as usize,
            port_start,
            port_end,
            log_level: var("MGR_LOG_LEVEL").unwrap_or_else(|| "info".into()),
            log_format: var("MGR_LOG_FORMAT").unwrap_or_else(|| "console".into()),
            runtime,
        })
    }

    /// The original listened on every interface with no authentication; mergend
    /// refuses that unless the operator says so explicitly.
    pub fn check_exposure(&self) -> Result<(), String> {
        if !self.http_addr.is_loopback() && self.api_token.is_none() && !self.allow_insecure {
            return Err(format!(
                "refusing to listen on non-loopback {} without MGR_API_TOKEN (set MGR_ALLOW_INSECURE=1 to override)",
                self.http_addr
            ));
        }
        Ok(())
    }
}

/// `mergend --help`.
pub fn help() -> String {
    let mut s = String::from(
        "mergend: the mergen control-plane daemon\n\n\
         usage: mergend                 run the HTTP API\n\
         \x20      mergend vm <step> <id>  per-VM host step (run by the supervisor)\n\
         \x20      mergend supervise <id>  embedded per-VM supervisor\n\n\
         environment (default):\n",
    );
    for (k, default, what) in VARIABLES {
        s.push_str(&format!("  {k:<30} {default:<20} {what}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config, String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_and_exposure() {
        let c = from(&[]).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.image_roots, vec![PathBuf::from("/var/lib/mergen")]);
        assert!(c.check_exposure().is_ok());
        let open = from(&[("MGR_HTTP_ADDR", ":8080")]).unwrap();
        // The original's empty host: every IPv4 and IPv6 address.
        assert_eq!(open.http_addr, ListenAddr::AnyHost(8080));
        assert!(open.check_exposure().unwrap_err().contains("MGR_API_TOKEN"));
        assert!(from(&[("MGR_HTTP_ADDR", ":8080"), ("MGR_API_TOKEN", "t")])
            .unwrap()
            .check_exposure()
            .is_ok());
        assert!(
            from(&[("MGR_HTTP_ADDR", ":8080"), ("MGR_ALLOW_INSECURE", "1")])
                .unwrap()
                .check_exposure()
                .is_ok()
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("MGR_PORT_START", "x"),
            ("MGR_PORT_END", "70000"),
            ("MGR_HTTP_ADDR", "nowhere"),
            ("MGR_ALLOW_INSECURE", "maybe"),
            ("MGR_HTTP_MAX_CONNECTIONS", "0"),
            ("MGR_HTTP_MAX_CONNECTIONS_PER_IP", "0"),
            ("MGR_HTTP_HEADER_TIMEOUT_SECONDS", "x"),
            ("MGR_HTTP_WORKERS", "0"),
        ] {
            assert!(from(&[(k, v)]).unwrap_err().contains(k), "{k}");
        }
    }

    #[test]
    fn help_lists_every_variable() {
        let h = help();
        for (k, d, _) in VARIABLES {
            assert!(h.contains(k) && h.contains(d), "{k}");
        }
    }

    /// Every `MGR_*` variable of the original's README, with its default, in `--help`
    /// and in effect (MGR_HTTP_ADDR deliberately defaults to loopback).
    #[test]
    fn original_variables_keep_their_defaults() {
        let readme = [
            ("MGR_HTTP_ADDR", "127.0.0.1:8080"),
            ("MGR_CONFIG_ROOT", "/etc/mergen/vm.d"),
            ("MGR_DATA_ROOT", "/var/lib/mergen"),
            ("MGR_RUN_ROOT", "/run/mergen"),
            ("MGR_GLOBAL_HOOKS_DIR", "/etc/mergen/hooks.d"),
            ("MGR_UNIT_PREFIX", "mergen"),
            ("MGR_SYSTEMCTL_PATH", "systemctl"),
            ("MGR_COMMAND_TIMEOUT_SECONDS", "10"),
            ("MGR_SHUTDOWN_TIMEOUT_SECONDS", "15"),
            ("MGR_PORT_START", "20000"),
            ("MGR_PORT_END", "40000"),
            ("MGR_GUEST_CIDR", "172.30.0.0/24"),
            ("MGR_LOG_LEVEL", "info"),
            ("MGR_LOG_FORMAT", "console"),
        ];
        for (k, d) in readme {
            let listed = VARIABLES.iter().find(|(name, _, _)| *name == k);
            assert_eq!(listed.map(|v| v.1), Some(d), "--help default of {k}");
        }
        let c = from(&[]).unwrap();
        let r = &c.runtime;
        let effective = [
            c.http_addr.to_string(),
            r.roots.config.display().to_string(),
            r.roots.data.display().to_string(),
            r.roots.run.display().to_string(),
            c.global_hooks_dir.display().to_string(),
            r.unit_prefix.clone(),
            r.systemctl_path.display().to_string(),
            r.command_timeout.as_secs().to_string(),
            c.shutdown_timeout.as_secs().to_string(),
            c.port_start.to_string(),
            c.port_end.to_string(),
            r.guest_cidr.to_string(),
            c.log_level.clone(),
            c.log_format.clone(),
        ];
        for ((k, d), got) in readme.iter().zip(effective) {
            assert_eq!(&got, d, "effective default of {k}");
        }
        // Each one is read from its variable.
        let c = from(&[
            ("MGR_HTTP_ADDR", "127.0.0.2:9"),
            ("MGR_CONFIG_ROOT", "/x/c"),
            ("MGR_GLOBAL_HOOKS_DIR", "/x/h"),
            ("MGR_UNIT_PREFIX", "vm"),
            ("MGR_COMMAND_TIMEOUT_SECONDS", "3"),
            ("MGR_SHUTDOWN_TIMEOUT_SECONDS", "4"),
            ("MGR_PORT_START", "100"),
            ("MGR_PORT_END", "200"),
            ("MGR_GUEST_CIDR", "10.1.0.0/16"),
            ("MGR_LOG_LEVEL", "warn"),
            ("MGR_LOG_FORMAT", "text"),
        ])
        .unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.2:9");
        assert_eq!(c.runtime.roots.config, PathBuf::from("/x/c"));
        assert_eq!(c.global_hooks_dir, PathBuf::from("/x/h"));
        assert_eq!(c.runtime.unit_prefix, "vm");
        assert_eq!(c.runtime.command_timeout, Duration::from_secs(3));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(4));
        assert_eq!((c.port_start, c.port_end), (100, 200));
        assert_eq!(c.runtime.guest_cidr.to_string(), "10.1.0.0/16");
        assert_eq!(
            (c.log_level.as_str(), c.log_format.as_str()),
            ("warn", "text")
        );
    }
}
