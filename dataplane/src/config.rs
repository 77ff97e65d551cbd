//! The forwarder's settings, read from the same `FWD_*` variables as the original plus
//! the new ones of the io_uring dataplane, through one table ([`VARS`]) that also
//! drives `--help` and the README's table. An unset or empty variable takes its default
//! (as Go's `os.Getenv` did), except `FWD_ADMIN_ADDR` and `FWD_NETNS_ROOT` where empty
//! turns the setting off. A value that does not parse is a startup error naming the
//! variable and the value.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use mergen_envtable::{Env, Var};
use mergen_model::domain;

/// A refused setting: names the variable, its value and what was expected.
pub type ConfigError = mergen_envtable::Error;

pub const DEFAULT_LISTENERS: &str = ":443=443,:2022=22,:5432=5432,:6379=6379,:9092=9092";
/// The guest port served in raw mode (no TLS, no SNI), as in the original.
pub const RAW_GUEST_PORT: u16 = 22;
/// `FWD_ALPN_<guestPort>`: one variable per guest port, so read by name outside the table.
const ALPN_PREFIX: &str = "FWD_ALPN_";

/// Every variable the forwarder reads, its default and its line of `--help`.
pub const VARS: &[Var] = &[
    Var::new("FWD_CONFIG_ROOT", "/etc/mergen/vm.d", "VM directories with meta.json"),
    Var::new(
        "FWD_NETNS_ROOT",
        "/run/netns",
        "where namespace files are looked up first",
    ),
    Var::new(
        "FWD_TLS_CERT_FILE",
        "/etc/mergen/certs/wildcard.localhost.crt",
        "PEM certificate chain",
    ),
    Var::new(
        "FWD_TLS_KEY_FILE",
        "/etc/mergen/certs/wildcard.localhost.key",
        "PEM key, RSA or ECDSA",
    ),
    Var::new(
        "FWD_DOMAIN_PREFIX",
        "",
        "SNI is <label>.<prefix>.<suffix> when set",
    ),
    Var::new("FWD_DOMAIN_SUFFIX", "localhost", "SNI suffix"),
    Var::new(
        "FWD_LISTENERS",
        DEFAULT_LISTENERS,
        "addr=guestPort,... (guest port 22 is raw TCP to the oldest VM, no TLS)",
    ),
    Var::new(
        "FWD_ALLOWED_GUEST_PORTS",
        "22,443,5432,6379,9092",
        "guest ports listeners may target",
    ),
    Var::computed(
        "FWD_ALPN_<guestPort>",
        "http/1.1 on 443, postgresql on 5432",
        "ALPN protocols offered by the listeners to that guest port, comma-separated; empty offers none",
    ),
    Var::new("FWD_DIAL_TIMEOUT_SECONDS", "5", "backend connect timeout"),
    Var::new(
        "FWD_HANDSHAKE_TIMEOUT_SECONDS",
        "10",
        "ClientHello plus TLS handshake timeout",
    ),
    Var::new(
        "FWD_IDLE_TIMEOUT_SECONDS",
        "300",
        "close a connection idle this long",
    ),
    Var::new(
        "FWD_RESOLVER_CACHE_TTL_SECONDS",
        "5",
        "full rescan period of FWD_CONFIG_ROOT",
    ),
    Var::new(
        "FWD_SHUTDOWN_TIMEOUT_SECONDS",
        "15",
        "drain time on SIGINT/SIGTERM",
    ),
    Var::new(
        "FWD_MAX_CONNECTIONS",
        "65536",
        "open connections before refusing (lowered to what the open-files limit allows)",
    ),
    Var::computed(
        "FWD_MAX_CONNECTIONS_PER_IP",
        "a quarter of FWD_MAX_CONNECTIONS",
        "open connections per client address (IPv6: per /64) before refusing; 0 turns the cap off",
    ),
    Var::computed("FWD_WORKERS", "number of CPUs", "io_uring worker threads"),
    Var::new(
        "FWD_ADMIN_ADDR",
        "127.0.0.1:9901",
        "/healthz and /metrics; empty disables",
    ),
    Var::new("FWD_LOG_LEVEL", "debug", "debug|info|warn|error"),
    Var::new("FWD_LOG_FORMAT", "console", "console|json|text"),
];

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub config_root: PathBuf,
    pub netns_root: Option<PathBuf>,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    pub domain_prefix: String,
    pub domain_suffix: String,
    pub listeners: Vec<ListenerSpec>,
    pub allowed_guest_ports: Vec<u16>,
    pub dial_timeout: Duration,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub resolver_ttl: Duration,
    pub shutdown_timeout: Duration,
    pub max_connections: usize,
    /// `None` when unset (a share of `max_connections`, see [`crate::limits::Caps`]);
    /// `Some(0)` turns the cap off.
    pub max_connections_per_ip: Option<usize>,
    pub workers: usize,
    pub admin_addr: Option<SocketAddr>,
    pub log_level: String,
    pub log_format: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerSpec {
    pub addr: ListenAddr,
    pub guest_port: u16,
    pub kind: ListenerKind,
    /// What a TLS listener offers in ALPN, in preference order (empty for raw).
    pub alpn: Vec<Vec<u8>>,
}

/// What a listener speaks to its clients, and so what the engine does before it
/// streams. Inferred from the guest port as the original did: 22 raw, 443 HTTPS,
/// 5432 PostgreSQL, anything else generic TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// TLS routed by SNI; ALPN `http/1.1`; a client whose VM cannot be reached gets a
    /// 502 page after its handshake.
    Https,
    /// TLS routed by SNI, after an optional SSLRequest/GSSENCRequest preamble
    /// (see [`crate::sni::postgres_preamble`]); ALPN `postgresql`.
    Postgres,
    /// TLS routed by SNI; a failed dial closes the connection after the handshake.
    Tls,
    /// Plain TCP, no sniffing (SSH is server-first), routed to the oldest VM.
    Raw,
}

impl ListenerKind {
    fn infer(guest_port: u16) -> ListenerKind {
        match guest_port {
            RAW_GUEST_PORT => ListenerKind::Raw,
            443 => ListenerKind::Https,
            5432 => ListenerKind::Postgres,
            _ => ListenerKind::Tls,
        }
    }

    pub fn is_tls(self) -> bool {
        self != ListenerKind::Raw
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Https => "https",
            ListenerKind::Postgres => "postgres",
            ListenerKind::Tls => "tls",
            ListenerKind::Raw => "raw",
        }
    }

    fn default_alpn(self) -> Vec<Vec<u8>> {
        match self {
            ListenerKind::Https => vec![b"http/1.1".to_vec()],
            // libpq 17 offers `postgresql` and, with `sslnegotiation=direct`, refuses a
            // server that does not select it; older clients send no ALPN at all.
            ListenerKind::Postgres => vec![b"postgresql".to_vec()],
            ListenerKind::Tls | ListenerKind::Raw => Vec::new(),
        }
    }
}

/// Where a listener listens: an empty host (`:443`) is every IPv4 and IPv6 address,
/// as Go's `net.Listen("tcp", ":443")` in the original (the type mergend's
/// `MGR_HTTP_ADDR` uses too).
pub use mergen_http::ListenAddr;

impl ListenerSpec {
    /// The listener's name in logs and in the `listener` label of the metrics: its
    /// address as configured, e.g. `:443` or `127.0.0.1:8443`, unique because two
    /// listeners cannot share an address.
    pub fn name(&self) -> String {
        self.addr.to_string()
    }
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|key| std::env::var(key).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = Env::new(VARS, &get);
        let allowed_guest_ports = env
            .with("FWD_ALLOWED_GUEST_PORTS", parse_port_list)?
            .unwrap_or_default();
        let mut listeners = env
            .with("FWD_LISTENERS", parse_listeners)?
            .unwrap_or_default();
        for l in &mut listeners {
            if !allowed_guest_ports.contains(&l.guest_port) {
                return Err(ConfigError {
                    name: "FWD_LISTENERS".into(),
                    value: env.string("FWD_LISTENERS"),
                    expected: format!(
                        "guest ports in FWD_ALLOWED_GUEST_PORTS={:?} (listener {} targets guest port {})",
                        env.string("FWD_ALLOWED_GUEST_PORTS"),
                        l.addr,
                        l.guest_port
                    ),
                });
            }
            let alpn_var = format!("{ALPN_PREFIX}{}", l.guest_port);
            if let (true, Some(v)) = (l.kind.is_tls(), get(&alpn_var)) {
                l.alpn = parse_alpn(&v).map_err(|expected| ConfigError {
                    name: alpn_var,
                    value: v.clone(),
                    expected,
                })?;
            }
        }

        // Empty turns these two off; unset takes the default.
        let off = |name: &str| env.present(name) && env.set(name).is_none();
        let admin_addr = match off("FWD_ADMIN_ADDR") {
            true => None,
            false => env.with("FWD_ADMIN_ADDR", parse_addr)?,
        };
        let netns_root = match off("FWD_NETNS_ROOT") {
            true => None,
            false => env.opt("FWD_NETNS_ROOT").map(PathBuf::from),
        };

        let log_level = env.string("FWD_LOG_LEVEL").to_ascii_lowercase();
        env.with("FWD_LOG_LEVEL", mergen_log::parse_level)?;
        let log_format = env.string("FWD_LOG_FORMAT").to_ascii_lowercase();
        env.with("FWD_LOG_FORMAT", mergen_log::Format::from_str)?;

        let workers = match env.set("FWD_WORKERS") {
            Some(_) => env.positive("FWD_WORKERS")? as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };

        Ok(Config {
            config_root: PathBuf::from(env.string("FWD_CONFIG_ROOT")),
            netns_root,
            tls_cert_file: PathBuf::from(env.string("FWD_TLS_CERT_FILE")),
            tls_key_file: PathBuf::from(env.string("FWD_TLS_KEY_FILE")),
            domain_prefix: domain::normalize(&env.string("FWD_DOMAIN_PREFIX")),
            domain_suffix: domain::normalize(&env.string("FWD_DOMAIN_SUFFIX")),
            listeners,
            allowed_guest_ports,
            dial_timeout: env.seconds("FWD_DIAL_TIMEOUT_SECONDS")?,
            handshake_timeout: env.seconds("FWD_HANDSHAKE_TIMEOUT_SECONDS")?,
            idle_timeout: env.seconds("FWD_IDLE_TIMEOUT_SECONDS")?,
            resolver_ttl: env.seconds("FWD_RESOLVER_CACHE_TTL_SECONDS")?,
            shutdown_timeout: env.seconds("FWD_SHUTDOWN_TIMEOUT_SECONDS")?,
            max_connections: env.positive("FWD_MAX_CONNECTIONS")? as usize,
            max_connections_per_ip: env
                .parse::<usize>("FWD_MAX_CONNECTIONS_PER_IP", "a whole number (0 = no cap)")?,
            workers,
            admin_addr,
            log_level,
            log_format,
        })
    }
}

/// `:443` means every IPv4 address; an address without `:` is a bare port.
fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let with_colon = if s.contains(':') {
        s.to_string()
    } else {
        format!(":{s}")
    };
    let full = match with_colon.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => with_colon,
    };
    SocketAddr::from_str(&full)
        .map_err(|_| format!("an address like :443 or 127.0.0.1:443, not {s:?}"))
}

/// Like [`parse_addr`], but an empty host means every IPv4 and IPv6 address.
fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    let addr = parse_addr(s)?;
    let s = s.trim();
    if s.starts_with(':') || !s.contains(':') {
        Ok(ListenAddr::AnyHost(addr.port()))
    } else {
        Ok(ListenAddr::Addr(addr))
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("ports (1-65535), not {:?}", s.trim())),
    }
}

fn parse_port_list(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in s.split(',').filter(|i| !i.trim().is_empty()) {
        let p = parse_port(item)?;
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    Ok(ports)
}

fn parse_listeners(s: &str) -> Result<Vec<ListenerSpec>, String> {
    let mut out: Vec<ListenerSpec> = Vec::new();
    for item in s.split(',').filter(|i| !i.trim().is_empty()) {
        let (addr, guest) = item
            .split_once('=')
            .ok_or_else(|| format!("addr=guestPort items, not {:?}", item.trim()))?;
        let addr = parse_listen_addr(addr)?;
        let guest_port = parse_port(guest)?;
        if let Some(other) = out.iter().find(|l| l.addr.overlaps(addr)) {
            return Err(format!(
                "listener addresses that do not overlap ({} and {addr} do)",
                other.addr
            ));
        }
        let kind = ListenerKind::infer(guest_port);
        out.push(ListenerSpec {
            addr,
            guest_port,
            kind,
            alpn: kind.default_alpn(),
        });
    }
    if out.is_empty() {
        return Err("at least one listener".to_string());
    }
    Ok(out)
}

/// `FWD_ALPN_<guestPort>=h2,http/1.1`: the protocols offered, in preference order;
/// an empty value offers none.
fn parse_alpn(s: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if item.len() > 255 || !item.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("protocol names, not {item:?}"));
        }
        out.push(item.as_bytes().to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    fn any(port: u16) -> ListenAddr {
        ListenAddr::AnyHost(port)
    }

    fn spec(addr: ListenAddr, guest_port: u16, kind: ListenerKind, alpn: &[&[u8]]) -> ListenerSpec {
        ListenerSpec {
            addr,
            guest_port,
            kind,
            alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        }
    }

    #[test]
    fn defaults_match_the_original() {
        let c = with(&[]).unwrap();
        assert_eq!(c.config_root, PathBuf::from("/etc/mergen/vm.d"));
        assert_eq!(c.netns_root, Some(PathBuf::from("/run/netns")));
        assert_eq!(c.domain_prefix, "");
        assert_eq!(c.domain_suffix, "localhost");
        assert_eq!(c.allowed_guest_ports, vec![22, 443, 5432, 6379, 9092]);
        let want = vec![
            spec(any(443), 443, ListenerKind::Https, &[b"http/1.1"]),
            spec(any(2022), 22, ListenerKind::Raw, &[]),
            spec(any(5432), 5432, ListenerKind::Postgres, &[b"postgresql"]),
            spec(any(6379), 6379, ListenerKind::Tls, &[]),
            spec(any(9092), 9092, ListenerKind::Tls, &[]),
        ];
        assert_eq!(c.listeners, want);
        assert_eq!(c.dial_timeout, Duration::from_secs(5));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.resolver_ttl, Duration::from_secs(5));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(15));
        assert_eq!(c.max_connections, 65536);
        assert_eq!(c.max_connections_per_ip, None);
        assert!(c.workers >= 1);
        assert_eq!(c.admin_addr, Some("127.0.0.1:9901".parse().unwrap()));
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.log_format, "console");
        assert_eq!(c.listeners[0].name(), ":443");
        // Empty is unset, as with Go's os.Getenv.
        assert_eq!(
            with(&[("FWD_LISTENERS", ""), ("FWD_DOMAIN_SUFFIX", " ")]).unwrap(),
            c
        );
    }

    #[test]
    fn overrides() {
        let c = with(&[
            ("FWD_CONFIG_ROOT", "/tmp/vm.d"),
            ("FWD_NETNS_ROOT", "/tmp/ns"),
            ("FWD_TLS_CERT_FILE", "/c.pem"),
            ("FWD_TLS_KEY_FILE", "/k.pem"),
            ("FWD_DOMAIN_PREFIX", "VM."),
            ("FWD_DOMAIN_SUFFIX", ".Example.com."),
            (
                "FWD_LISTENERS",
                "127.0.0.1:8443=443, 2022=22,[::1]:7000=6379",
            ),
            ("FWD_ALLOWED_GUEST_PORTS", "22,443,6379"),
            ("FWD_DIAL_TIMEOUT_SECONDS", "1"),
            ("FWD_HANDSHAKE_TIMEOUT_SECONDS", "2"),
            ("FWD_IDLE_TIMEOUT_SECONDS", "3"),
            ("FWD_RESOLVER_CACHE_TTL_SECONDS", "4"),
            ("FWD_SHUTDOWN_TIMEOUT_SECONDS", "6"),
            ("FWD_MAX_CONNECTIONS", "10"),
            ("FWD_MAX_CONNECTIONS_PER_IP", "4"),
            ("FWD_WORKERS", "3"),
            ("FWD_ADMIN_ADDR", ":9999"),
            ("FWD_LOG_LEVEL", "WARN"),
            ("FWD_LOG_FORMAT", "json"),
            ("FWD_ALPN_443", "h2, http/1.1"),
            ("FWD_ALPN_6379", "redis"),
        ])
        .unwrap();
        assert_eq!(c.config_root, PathBuf::from("/tmp/vm.d"));
        assert_eq!(c.netns_root, Some(PathBuf::from("/tmp/ns")));
        assert_eq!(c.tls_cert_file, PathBuf::from("/c.pem"));
        assert_eq!(c.tls_key_file, PathBuf::from("/k.pem"));
        assert_eq!(
            (c.domain_prefix.as_str(), c.domain_suffix.as_str()),
            ("vm", "example.com")
        );
        assert_eq!(
            c.listeners,
            vec![
                spec(
                    ListenAddr::Addr("127.0.0.1:8443".parse().unwrap()),
                    443,
                    ListenerKind::Https,
                    &[b"h2", b"http/1.1"]
                ),
                spec(any(2022), 22, ListenerKind::Raw, &[]),
                spec(
                    ListenAddr::Addr("[::1]:7000".parse().unwrap()),
                    6379,
                    ListenerKind::Tls,
                    &[b"redis"]
                ),
            ]
        );
        assert_eq!(c.allowed_guest_ports, vec![22, 443, 6379]);
        assert_eq!(
            [
                c.dial_timeout,
                c.handshake_timeout,
                c.idle_timeout,
                c.resolver_ttl,
                c.shutdown_timeout
            ],
            [1, 2, 3, 4, 6].map(Duration::from_secs)
        );
        assert_eq!((c.max_connections, c.workers), (10, 3));
        assert_eq!(c.max_connections_per_ip, Some(4));
        // The admin listener keeps `:PORT` as IPv4 only.
        assert_eq!(c.admin_addr, Some((Ipv4Addr::UNSPECIFIED, 9999).into()));
        assert_eq!(
            (c.log_level.as_str(), c.log_format.as_str()),
            ("warn", "json")
        );

        // Empty turns the admin listener off and drops the netns root.
        let c = with(&[
            ("FWD_ADMIN_ADDR", ""),
            ("FWD_NETNS_ROOT", ""),
            ("FWD_ALPN_443", ""),
        ])
        .unwrap();
        assert_eq!(c.admin_addr, None);
        assert_eq!(c.netns_root, None);
        assert_eq!(c.listeners[0].kind, ListenerKind::Https);
        assert!(c.listeners[0].alpn.is_empty());
    }

    #[test]
    fn only_overlapping_listeners_are_rejected() {
        let c = with(&[(
            "FWD_LISTENERS",
            "127.0.0.1:8443=443,[::1]:8443=443,:9443=443",
        )])
        .unwrap();
        let addrs: Vec<String> = c.listeners.iter().map(|l| l.name()).collect();
        assert_eq!(addrs, ["127.0.0.1:8443", "[::1]:8443", ":9443"]);
        let err = with(&[("FWD_LISTENERS", "127.0.0.1:8443=443,8443=443")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("127.0.0.1:8443 and :8443 do"), "{err}");
    }

    #[test]
    fn errors_name_the_variable_and_value() {
        let cases: &[(&str, &str)] = &[
            ("FWD_LISTENERS", ":443"),
            ("FWD_LISTENERS", ":443=http"),
            ("FWD_LISTENERS", ":443=0"),
            ("FWD_LISTENERS", ":443=70000"),
            ("FWD_LISTENERS", "nowhere:443=443"),
            ("FWD_LISTENERS", ":99999=443"),
            ("FWD_LISTENERS", ":443=443,0.0.0.0:443=443"),
            ("FWD_LISTENERS", "[::1]:443=443,443=443"),
            ("FWD_LISTENERS", ":8080=8080"),
            ("FWD_LISTENERS", ","),
            ("FWD_ALLOWED_GUEST_PORTS", "22,x"),
            ("FWD_DIAL_TIMEOUT_SECONDS", "soon"),
            ("FWD_HANDSHAKE_TIMEOUT_SECONDS", "-1"),
            ("FWD_IDLE_TIMEOUT_SECONDS", "0"),
            ("FWD_RESOLVER_CACHE_TTL_SECONDS", "1.5"),
            ("FWD_SHUTDOWN_TIMEOUT_SECONDS", "ten"),
            ("FWD_MAX_CONNECTIONS", "0"),
            ("FWD_MAX_CONNECTIONS_PER_IP", "-1"),
            ("FWD_WORKERS", "many"),
            ("FWD_ADMIN_ADDR", "localhost:9901"),
            ("FWD_LOG_LEVEL", "loud"),
            ("FWD_LOG_FORMAT", "xml"),
            ("FWD_ALPN_443", "h 2"),
        ];
        for &(var, value) in cases {
            let err = match with(&[(var, value)]) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{var}={value:?} must be refused"),
            };
            assert!(err.contains(var), "{err:?} should name {var}");
            assert!(
                err.contains(value.trim_matches(',')),
                "{err:?} should show {value:?}"
            );
        }
        // A listener on a guest port the allow-list drops.
        let err = with(&[("FWD_ALLOWED_GUEST_PORTS", "443")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("guest port 22") && err.contains("FWD_ALLOWED_GUEST_PORTS"),
            "{err}"
        );
    }

    /// The README's table is the table `--help` prints: one source, so they cannot
    /// drift. Regenerate it with `mergen_envtable::markdown(VARS)` when a variable changes.
    #[test]
    fn the_readme_table_is_the_variable_table() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md");
        let table = mergen_envtable::markdown(VARS);
        assert!(
            readme.contains(&table),
            "README.md's FWD_* table differs from config::VARS; it should read:\n{table}"
        );
    }
}
