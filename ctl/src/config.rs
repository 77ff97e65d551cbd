//! mergend's configuration, from `MGR_*` variables: [`VARIABLES`] is mergend's own
//! table, read layered over the runtime's (`mergen_runtime::config::VARIABLES`), so one
//! pair of tables drives parsing, defaults, `mergend --help` and the README's table.

use std::path::PathBuf;
use std::time::Duration;

use mergen_envtable::{Env, Var};
use mergen_http::ListenAddr;
use mergen_runtime::config::VARIABLES as RUNTIME_VARIABLES;
use mergen_runtime::RuntimeConfig;

/// Every variable mergend itself reads (the runtime's come after it in `--help`).
pub const VARIABLES: &[Var] = &[
    Var::new(
        "MGR_HTTP_ADDR",
        "127.0.0.1:8080",
        "TCP listen address (\":8080\" means every IPv4 and IPv6 address)",
    ),
    Var::unset("MGR_HTTP_SOCKET", "also listen on this unix socket"),
    Var::unset(
        "MGR_API_TOKEN",
        "require `Authorization: Bearer <token>` on /v1",
    ),
    Var::new(
        "MGR_METRICS_REQUIRE_TOKEN",
        "0",
        "1 = /metrics needs the bearer token too (MGR_API_TOKEN must be set)",
    ),
    Var::new(
        "MGR_ALLOW_INSECURE",
        "0",
        "1 = allow a non-loopback address without a token",
    ),
    Var::new(
        "MGR_SHUTDOWN_TIMEOUT_SECONDS",
        "15",
        "grace period for in-flight requests on SIGINT/SIGTERM (0 = none, as the original)",
    ),
    Var::new(
        "MGR_HTTP_MAX_CONNECTIONS",
        "256",
        "open connections; at the cap the oldest idle one is closed, else 503",
    ),
    Var::new(
        "MGR_HTTP_MAX_CONNECTIONS_PER_IP",
        "64",
        "open connections per client address (IPv4, or IPv6 /64)",
    ),
    Var::new(
        "MGR_HTTP_HEADER_TIMEOUT_SECONDS",
        "5",
        "a connection without a whole request head by then is dropped",
    ),
    Var::new(
        "MGR_HTTP_READ_TIMEOUT_SECONDS",
        "10",
        "time to send one whole request (then 408)",
    ),
    Var::new(
        "MGR_HTTP_IDLE_TIMEOUT_SECONDS",
        "60",
        "idle keep-alive connections are closed after this",
    ),
    Var::new(
        "MGR_HTTP_WORKERS",
        "64",
        "most requests handled at once (threads start as needed; more wait their turn)",
    ),
    Var::computed(
        "MGR_IMAGE_ROOTS",
        "$MGR_DATA_ROOT",
        "colon-separated dirs that rootfs/kernel/dataDisk must be inside",
    ),
    Var::unset(
        "MGR_IMAGE_DEVICES",
        "colon-separated block devices (e.g. LVM volumes) allowed as rootfs/dataDisk wherever they are",
    ),
    Var::new(
        "MGR_GLOBAL_HOOKS_DIR",
        "/etc/mergen/hooks.d",
        "global hook files (*.json), run before a VM's own",
    ),
    Var::new(
        "MGR_HOOK_WORKERS",
        "8",
        "threads running background (non-strict) hooks; one VM event's hooks run in order on one",
    ),
    Var::new(
        "MGR_PORT_START",
        "20000",
        "first host port handed out for `host: 0`",
    ),
    Var::new(
        "MGR_PORT_END",
        "40000",
        "last host port handed out for `host: 0`",
    ),
    Var::new(
        "MGR_ALLOW_PORTS_OUTSIDE_RANGE",
        "0",
        "1 = a create may ask for host ports outside MGR_PORT_START..=MGR_PORT_END (never one a host process listens on)",
    ),
    Var::unset(
        "MGR_ETCD_ENDPOINTS",
        "etcd members (host:port, http://host:port or https://host:port, comma-separated): this host publishes its VMs' routes there (docs/cluster.md)",
    ),
    Var::computed(
        "MGR_ETCD_CA_FILE",
        "the system's CAs",
        "PEM CA certificates etcd's certificate must chain to (https:// endpoints only)",
    ),
    Var::unset(
        "MGR_ETCD_CERT_FILE",
        "PEM client certificate for etcd's --client-cert-auth (with MGR_ETCD_KEY_FILE)",
    ),
    Var::unset("MGR_ETCD_KEY_FILE", "PEM key of MGR_ETCD_CERT_FILE"),
    Var::new(
        "MGR_ETCD_PREFIX",
        "/mergen",
        "key prefix in etcd; hosts of one cluster share it",
    ),
    Var::new(
        "MGR_ETCD_LEASE_TTL_SECONDS",
        "10",
        "a host whose mergend is gone loses its routes after this",
    ),
    Var::new(
        "MGR_ETCD_TIMEOUT_SECONDS",
        "3",
        "bound on each etcd request",
    ),
    Var::computed(
        "MGR_HOST_NAME",
        "the hostname",
        "this host's name in the cluster",
    ),
    Var::unset(
        "MGR_HOST_ADDR",
        "IPv4 address other hosts' forwarders dial for this host's VMs (required with MGR_ETCD_ENDPOINTS)",
    ),
];

/// This host's membership in a cluster (`MGR_ETCD_ENDPOINTS` set).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub etcd: mergen_cluster::Settings,
    pub host_name: String,
    pub host_addr: std::net::IpAddr,
    pub lease_ttl: Duration,
}

/// mergend's variables followed by the runtime's: the order of `--help` and the README.
pub fn all_variables() -> impl Iterator<Item = &'static Var> + Clone {
    VARIABLES.iter().chain(RUNTIME_VARIABLES)
}

#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: ListenAddr,
    pub http_socket: Option<PathBuf>,
    pub api_token: Option<String>,
    pub metrics_require_token: bool,
    pub allow_insecure: bool,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub header_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http_workers: usize,
    pub image_roots: Vec<PathBuf>,
    pub image_devices: Vec<PathBuf>,
    pub global_hooks_dir: PathBuf,
    pub hook_workers: usize,
    pub port_start: u16,
    pub port_end: u16,
    pub allow_ports_outside_range: bool,
    pub log_level: String,
    pub log_format: String,
    pub runtime: RuntimeConfig,
    /// `None` unless `MGR_ETCD_ENDPOINTS` is set.
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Build from any variable source. Errors name the variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let env = Env::layered(&[VARIABLES, RUNTIME_VARIABLES], get);
        Self::from_vars(&env).map_err(|e| e.to_string())
    }

    fn from_vars(env: &Env) -> Result<Config, mergen_envtable::Error> {
        let runtime = RuntimeConfig::from_vars(env)?;
        let http_addr = env
            .with("MGR_HTTP_ADDR", |text| {
                // The original's ":8080" form: every IPv4 and IPv6 address.
                text.parse::<ListenAddr>()
                    .map_err(|_| "a host:port address (or :port)".to_string())
            })?
            .expect("MGR_HTTP_ADDR has a default");
        let port_start = env.port("MGR_PORT_START")?;
        let port_end = env.port("MGR_PORT_END")?;
        if port_start > port_end {
            return Err(mergen_envtable::Error {
                name: "MGR_PORT_START".into(),
                value: port_start.to_string(),
                expected: format!("a port not above MGR_PORT_END={port_end}"),
            });
        }
        let image_roots = match env.set("MGR_IMAGE_ROOTS") {
            Some(v) => v
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect(),
            None => vec![runtime.roots.data.clone()],
        };
        let image_devices = env
            .opt("MGR_IMAGE_DEVICES")
            .map(|v| {
                v.split(':')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| PathBuf::from(s.trim()))
                    .collect()
            })
            .unwrap_or_default();
        let count = |k: &str| -> Result<usize, mergen_envtable::Error> {
            Ok(usize::try_from(env.positive(k)?).unwrap_or(usize::MAX))
        };
        let cluster = cluster_config(env)?;
        Ok(Config {
            cluster,
            http_addr,
            http_socket: env.opt("MGR_HTTP_SOCKET").map(PathBuf::from),
            api_token: env.opt("MGR_API_TOKEN"),
            metrics_require_token: env.bool("MGR_METRICS_REQUIRE_TOKEN")?,
            allow_insecure: env.bool("MGR_ALLOW_INSECURE")?,
            // The original took 0 as "close at once"; an env file that says so still works.
            shutdown_timeout: env
                .seconds_or_off("MGR_SHUTDOWN_TIMEOUT_SECONDS")?
                .unwrap_or(Duration::ZERO),
            max_connections: count("MGR_HTTP_MAX_CONNECTIONS")?,
            max_connections_per_ip: count("MGR_HTTP_MAX_CONNECTIONS_PER_IP")?,
            header_timeout: env.seconds("MGR_HTTP_HEADER_TIMEOUT_SECONDS")?,
            read_timeout: env.seconds("MGR_HTTP_READ_TIMEOUT_SECONDS")?,
            idle_timeout: env.seconds("MGR_HTTP_IDLE_TIMEOUT_SECONDS")?,
            http_workers: count("MGR_HTTP_WORKERS")?,
            image_roots,
            image_devices,
            global_hooks_dir: env.string("MGR_GLOBAL_HOOKS_DIR").into(),
            hook_workers: count("MGR_HOOK_WORKERS")?,
            port_start,
            port_end,
            allow_ports_outside_range: env.bool("MGR_ALLOW_PORTS_OUTSIDE_RANGE")?,
            log_level: env.string("MGR_LOG_LEVEL"),
            log_format: env.string("MGR_LOG_FORMAT"),
            runtime,
        })
    }

    /// The original listened on every interface with no authentication; mergend
    /// refuses that unless the operator says so explicitly. A metrics token with no
    /// token to require is a mistake, not an open endpoint.
    pub fn check_exposure(&self) -> Result<(), String> {
        if self.metrics_require_token && self.api_token.is_none() {
            return Err("MGR_METRICS_REQUIRE_TOKEN=1 needs MGR_API_TOKEN".into());
        }
        if !self.http_addr.is_loopback() && self.api_token.is_none() && !self.allow_insecure {
            return Err(format!(
                "refusing to listen on non-loopback {} without MGR_API_TOKEN (set MGR_ALLOW_INSECURE=1 to override)",
                self.http_addr
            ));
        }
        Ok(())
    }
}

fn cluster_config(env: &Env) -> Result<Option<ClusterConfig>, mergen_envtable::Error> {
    let Some(etcd) = mergen_cluster::Settings::from_env(env, "MGR_ETCD")? else {
        return Ok(None);
    };
    let host_addr = env
        .with("MGR_HOST_ADDR", |t| {
            // Forwarders dial their peers over IPv4, as they dial guests.
            t.parse::<std::net::Ipv4Addr>()
                .map(std::net::IpAddr::V4)
                .map_err(|_| "an IPv4 address".to_string())
        })?
        .ok_or_else(|| mergen_envtable::Error {
            name: "MGR_HOST_ADDR".into(),
            value: String::new(),
            expected: "the IPv4 address other hosts' forwarders dial (MGR_ETCD_ENDPOINTS is set)"
                .into(),
        })?;
    let host_name = match env.opt("MGR_HOST_NAME") {
        Some(n) => n,
        None => mergen_cluster::hostname(),
    };
    if host_name.is_empty() || host_name.contains('/') {
        return Err(mergen_envtable::Error {
            name: "MGR_HOST_NAME".into(),
            value: host_name,
            expected: "a name without '/'".into(),
        });
    }
    Ok(Some(ClusterConfig {
        etcd,
        host_name,
        host_addr,
        lease_ttl: env.seconds("MGR_ETCD_LEASE_TTL_SECONDS")?,
    }))
}

/// `mergend --help`.
pub fn help() -> String {
    format!(
        "mergend: the mergen control-plane daemon\n\n\
         usage: mergend                 run the HTTP API\n\
         \x20      mergend vm <step> <id>  per-VM host step (run by the supervisor)\n\
         \x20      mergend supervise <id>  embedded per-VM supervisor\n\n\
         environment (unset or blank = default):\n{}",
        mergen_envtable::help_text(all_variables())
    )
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
    fn a_cluster_host_has_an_ipv4_address() {
        let etcd = ("MGR_ETCD_ENDPOINTS", "127.0.0.1:2379");
        let c = from(&[etcd, ("MGR_HOST_ADDR", "10.0.0.1"), ("MGR_HOST_NAME", "a")]).unwrap();
        let cluster = c.cluster.expect("in a cluster");
        assert_eq!(cluster.host_addr.to_string(), "10.0.0.1");
        assert_eq!(cluster.host_name, "a");
        for bad in ["::1", "host-a", ""] {
            let err = from(&[etcd, ("MGR_HOST_ADDR", bad)]).unwrap_err();
            assert!(err.contains("MGR_HOST_ADDR"), "{bad}: {err}");
        }
        assert!(from(&[]).unwrap().cluster.is_none());
    }

    #[test]
    fn tls_to_etcd_is_read_from_the_etcd_variables() {
        let addr = ("MGR_HOST_ADDR", "10.0.0.1");
        let https = ("MGR_ETCD_ENDPOINTS", "https://10.0.0.1:2379");
        let c = from(&[https, addr]).unwrap().cluster.unwrap();
        assert_eq!(c.etcd.endpoints, ["https://10.0.0.1:2379"]);
        assert!(c.etcd.tls.is_some());
        for (vars, name) in [
            (
                vec![https, ("MGR_ETCD_CA_FILE", "/nonexistent.pem")],
                "MGR_ETCD_CA_FILE",
            ),
            (
                vec![https, ("MGR_ETCD_KEY_FILE", "/nonexistent.pem")],
                "MGR_ETCD_KEY_FILE",
            ),
            (
                vec![
                    ("MGR_ETCD_ENDPOINTS", "10.0.0.1:2379"),
                    ("MGR_ETCD_CERT_FILE", "/x.pem"),
                ],
                "MGR_ETCD_CERT_FILE",
            ),
        ] {
            let err = from(&[&vars[..], &[addr]].concat()).unwrap_err();
            assert!(err.starts_with(name), "{vars:?}: {err}");
        }
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
        for v in all_variables() {
            assert!(
                h.contains(v.name) && h.contains(&v.shown_default()),
                "{}",
                v.name
            );
        }
    }

    /// The README's `MGR_*` table is exactly what the tables say, so the documented
    /// defaults cannot drift from the applied ones.
    #[test]
    fn readme_table_matches_the_variable_tables() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let want = mergen_envtable::markdown(all_variables());
        let header = want.lines().next().unwrap();
        let section = &readme[readme.find("### mergend (`MGR_*`)").expect("MGR section")..];
        let start = section.find(header).expect("MGR table in the README");
        let got: String = section[start..]
            .lines()
            .take_while(|l| l.starts_with('|'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            got, want,
            "README.md's MGR_* table differs from the variable tables; paste this one:\n{want}"
        );
    }

    #[test]
    fn shared_rules() {
        // Blank is unset; values are trimmed; Go's ParseBool; zero seconds refused where
        // zero has no meaning (MGR_SHUTDOWN_TIMEOUT_SECONDS=0 means "none", as in Go).
        let c = from(&[("MGR_PORT_START", "  "), ("MGR_ALLOW_INSECURE", " True ")]).unwrap();
        assert_eq!(c.port_start, 20000);
        assert!(c.allow_insecure);
        for k in [
            "MGR_HTTP_READ_TIMEOUT_SECONDS",
            "MGR_HTTP_IDLE_TIMEOUT_SECONDS",
            "MGR_HTTP_HEADER_TIMEOUT_SECONDS",
            "MGR_COMMAND_TIMEOUT_SECONDS",
        ] {
            assert!(from(&[(k, "0")]).unwrap_err().contains(k), "{k}");
        }
        assert!(from(&[("MGR_PORT_START", "300"), ("MGR_PORT_END", "200")])
            .unwrap_err()
            .contains("MGR_PORT_START"));
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
            let listed = all_variables().find(|v| v.name == k);
            assert_eq!(
                listed.map(|v| v.shown_default()).as_deref(),
                Some(d),
                "--help default of {k}"
            );
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
        let now = from(&[("MGR_SHUTDOWN_TIMEOUT_SECONDS", "0")]).unwrap();
        assert_eq!(now.shutdown_timeout, Duration::ZERO);
        assert_eq!((c.port_start, c.port_end), (100, 200));
        assert_eq!(c.runtime.guest_cidr.to_string(), "10.1.0.0/16");
        assert_eq!(
            (c.log_level.as_str(), c.log_format.as_str()),
            ("warn", "text")
        );
    }
}
