//! The forwarder's settings, read from the same `FWD_*` variables as the original plus
//! the new ones of the io_uring dataplane, through one table ([`VARS`]) that also
//! drives `--help` and the README's table. An unset or empty variable takes its default
//! (as Go's `os.Getenv` did), except `FWD_ADMIN_ADDR` and `FWD_NETNS_ROOT` where empty
//! turns the setting off. A value that does not parse is a startup error naming the
//! variable and the value.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use mergen_envtable::{Env, Var};
use mergen_model::domain;

use crate::tls;

/// A refused setting: names the variable, its value and what was expected.
pub type ConfigError = mergen_envtable::Error;

pub const DEFAULT_LISTENERS: &str = ":443=443,:2022=22,:5432=5432,:6379=6379,:9092=9092";
/// The one listener the original served in raw mode (no TLS, no SNI): listen port 2022
/// to guest port 22. Any other raw listener says `/raw`.
const RAW_LISTEN_PORT: u16 = 2022;
const RAW_GUEST_PORT: u16 = 22;
/// The guest port of the `FWD_HTTPS_ADDR` listener when a VM sets no `httpPort`.
const HTTPS_GUEST_PORT: u16 = 443;
/// Where the certificate and key are looked for unless `FWD_TLS_*_FILE` say otherwise.
pub const CERT_DIR: &str = "/etc/mergen/certs";
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
    Var::computed(
        "FWD_TLS_CERT_FILE",
        "/etc/mergen/certs/wildcard.<prefix.>suffix.crt",
        "PEM certificate chain (not read when every listener is raw)",
    ),
    Var::computed(
        "FWD_TLS_KEY_FILE",
        "/etc/mergen/certs/wildcard.<prefix.>suffix.key",
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
        "ADDR=GUESTPORT[/KIND][+proxy-v2],... (see \"listeners\" below)",
    ),
    Var::unset(
        "FWD_HTTPS_ADDR",
        "one more https listener (guest port 443, or the VM's httpPort); replaces :443=443 of the default FWD_LISTENERS",
    ),
    Var::new(
        "FWD_ALLOWED_GUEST_PORTS",
        "22,443,5432,6379,9092",
        "guest ports listeners may target",
    ),
    Var::computed(
        "FWD_ALPN_<guestPort>",
        "http/1.1 on https, postgresql on postgres",
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
        "3600",
        "close a connection idle this long; 0 = never (TCP keepalive still ends dead peers)",
    ),
    Var::new(
        "FWD_RESOLVER_CACHE_TTL_SECONDS",
        "5",
        "full rescan period of FWD_CONFIG_ROOT",
    ),
    Var::new(
        "FWD_SHUTDOWN_TIMEOUT_SECONDS",
        "15",
        "drain time on SIGINT/SIGTERM (0 = close at once, as the original)",
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
    Var::unset(
        "FWD_ETCD_ENDPOINTS",
        "etcd members (host:port, http://host:port or https://host:port, comma-separated): other hosts' VMs are learned there and their connections passed through to those hosts (docs/cluster.md)",
    ),
    Var::computed(
        "FWD_ETCD_CA_FILE",
        "the system's CAs",
        "PEM CA certificates etcd's certificate must chain to (https:// endpoints only)",
    ),
    Var::unset(
        "FWD_ETCD_CERT_FILE",
        "PEM client certificate for etcd's --client-cert-auth (with FWD_ETCD_KEY_FILE)",
    ),
    Var::unset("FWD_ETCD_KEY_FILE", "PEM key of FWD_ETCD_CERT_FILE"),
    Var::new(
        "FWD_ETCD_PREFIX",
        "/mergen",
        "key prefix in etcd (as MGR_ETCD_PREFIX)",
    ),
    Var::new(
        "FWD_ETCD_TIMEOUT_SECONDS",
        "3",
        "bound on each etcd request; a watch silent this long is checked",
    ),
    Var::computed(
        "FWD_HOST_NAME",
        "the hostname",
        "this host's name in the cluster (as MGR_HOST_NAME): its own VMs come from meta.json only",
    ),
];

/// `--help`'s and the README's account of `FWD_LISTENERS`.
pub const LISTENERS_HELP: &str = "\
listeners (FWD_LISTENERS=ADDR=GUESTPORT[/KIND][+OPTION...],...):
  ADDR       :443 (every IPv4 and IPv6 address), 127.0.0.1:443, [::1]:443, or
             localhost:443 (a host name, resolved once at start, IPv4 first)
  KIND       https     TLS routed by SNI, ALPN http/1.1, a 502 page when the VM does
                       not answer; dials the VM's httpPort when its meta.json sets one
             postgres  PostgreSQL: answers SSLRequest/GSSENCRequest, takes direct TLS
                       (ALPN postgresql), tells a plaintext client that TLS is required
             tls       TLS routed by SNI (Redis, Kafka, ...); closes when the VM does
                       not answer
             raw       plain TCP, no TLS and no SNI, to the oldest VM (by createdAt)
  OPTION     proxy-v2  send the guest a PROXY protocol v2 header first: the client's
                       address, and for TLS kinds the SNI (PP2_TYPE_AUTHORITY)
  no KIND    as the original: guest port 443 https, 5432 postgres, listen port 2022
             to guest 22 raw, anything else tls
  default    :443=443/https,:2022=22/raw,:5432=5432/postgres,:6379=6379/tls,
             :9092=9092/tls
";

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
    /// `None`: connections may stay idle forever.
    pub idle_timeout: Option<Duration>,
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
    /// `None` unless `FWD_ETCD_ENDPOINTS` is set.
    pub cluster: Option<ClusterConfig>,
}

/// Where the cluster's routes are, and which host this is.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    pub etcd: mergen_cluster::Settings,
    pub host_name: String,
}

impl Config {
    /// Whether any listener terminates TLS, i.e. whether a certificate is needed.
    pub fn needs_certificate(&self) -> bool {
        self.listeners.iter().any(|l| l.kind.is_tls())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerSpec {
    pub addr: ListenAddr,
    pub guest_port: u16,
    pub kind: ListenerKind,
    /// What a TLS listener offers in ALPN, in preference order (empty for raw).
    pub alpn: Vec<Vec<u8>>,
    /// Send a PROXY protocol v2 header to the guest before any client byte.
    pub proxy_v2: bool,
}

/// What a listener speaks to its clients, and so what the engine does before it
/// streams. Written after the guest port (`:8443=8080/https`), or inferred from the
/// ports as the original did (see [`ListenerKind::infer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// TLS routed by SNI; ALPN `http/1.1`; a client whose VM cannot be reached gets a
    /// 502 page after its handshake; the VM's `httpPort` overrides the guest port.
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
    pub const ALL: [ListenerKind; 4] = [
        ListenerKind::Https,
        ListenerKind::Postgres,
        ListenerKind::Tls,
        ListenerKind::Raw,
    ];

    /// The original's rule: guest port 443 is HTTPS, 5432 PostgreSQL, `:2022=22` raw,
    /// anything else generic TLS (so `:2222=22` is TLS, as it was there).
    pub fn infer(listen_port: u16, guest_port: u16) -> ListenerKind {
        match (listen_port, guest_port) {
            (RAW_LISTEN_PORT, RAW_GUEST_PORT) => ListenerKind::Raw,
            (_, 443) => ListenerKind::Https,
            (_, 5432) => ListenerKind::Postgres,
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

impl FromStr for ListenerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenerKind, String> {
        let s = s.trim();
        ListenerKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("a kind https|postgres|tls|raw, not {s:?}"))
    }
}

/// The one listener option: `+proxy-v2`.
const PROXY_V2: &str = "proxy-v2";

/// Where a listener listens: an empty host (`:443`) is every IPv4 and IPv6 address,
/// as Go's `net.Listen("tcp", ":443")` in the original (the type mergend's
/// `MGR_HTTP_ADDR` uses too).
pub use mergen_http::ListenAddr;

impl ListenerSpec {
    /// A listener as the original's `addr=guestPort` wrote it: the kind inferred.
    fn inferred(addr: ListenAddr, guest_port: u16) -> ListenerSpec {
        ListenerSpec::new(
            addr,
            guest_port,
            ListenerKind::infer(addr.port(), guest_port),
        )
    }

    fn new(addr: ListenAddr, guest_port: u16, kind: ListenerKind) -> ListenerSpec {
        ListenerSpec {
            addr,
            guest_port,
            kind,
            alpn: kind.default_alpn(),
            proxy_v2: false,
        }
    }

    /// The listener's name in logs and in the `listener` label of the metrics: its
    /// address, e.g. `:443` or `127.0.0.1:8443` (a host name as it resolved), unique
    /// because two listeners cannot share an address.
    pub fn name(&self) -> String {
        self.addr.to_string()
    }
}

/// The listener in `FWD_LISTENERS` syntax with its kind spelled out, as the startup
/// log shows it: `:443=443/https`, `127.0.0.1:8443=8080/https+proxy-v2`.
impl fmt::Display for ListenerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={}/{}",
            self.addr,
            self.guest_port,
            self.kind.as_str()
        )?;
        if self.proxy_v2 {
            write!(f, "+{PROXY_V2}")?;
        }
        Ok(())
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
        let mut listeners = listeners(&env)?;
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

        let domain_prefix = domain::normalize(&env.string("FWD_DOMAIN_PREFIX"));
        let domain_suffix = domain::normalize(&env.string("FWD_DOMAIN_SUFFIX"));
        // As the original's certificate script names its files.
        let stem = tls::wildcard_file_stem(&domain_prefix, &domain_suffix);
        let cert_file = |name: &str, ext: &str| match env.set(name) {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(CERT_DIR).join(format!("{stem}.{ext}")),
        };

        Ok(Config {
            config_root: PathBuf::from(env.string("FWD_CONFIG_ROOT")),
            netns_root,
            tls_cert_file: cert_file("FWD_TLS_CERT_FILE", "crt"),
            tls_key_file: cert_file("FWD_TLS_KEY_FILE", "key"),
            domain_prefix,
            domain_suffix,
            listeners,
            allowed_guest_ports,
            dial_timeout: env.seconds("FWD_DIAL_TIMEOUT_SECONDS")?,
            handshake_timeout: env.seconds("FWD_HANDSHAKE_TIMEOUT_SECONDS")?,
            idle_timeout: env.seconds_or_off("FWD_IDLE_TIMEOUT_SECONDS")?,
            resolver_ttl: env.seconds("FWD_RESOLVER_CACHE_TTL_SECONDS")?,
            // The original took 0 as "close at once"; an env file that says so still works.
            shutdown_timeout: env
                .seconds_or_off("FWD_SHUTDOWN_TIMEOUT_SECONDS")?
                .unwrap_or(Duration::ZERO),
            max_connections: env.positive("FWD_MAX_CONNECTIONS")? as usize,
            max_connections_per_ip: env
                .parse::<usize>("FWD_MAX_CONNECTIONS_PER_IP", "a whole number (0 = no cap)")?,
            workers,
            admin_addr,
            log_level,
            log_format,
            cluster: cluster_config(&env)?,
        })
    }
}

fn cluster_config(env: &Env<'_>) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(etcd) = mergen_cluster::Settings::from_env(env, "FWD_ETCD")? else {
        return Ok(None);
    };
    let host_name = env
        .opt("FWD_HOST_NAME")
        .unwrap_or_else(mergen_cluster::hostname);
    if host_name.is_empty() || host_name.contains('/') {
        return Err(ConfigError {
            name: "FWD_HOST_NAME".into(),
            value: host_name,
            expected: "a name without '/' (the hostname is used when unset)".into(),
        });
    }
    Ok(Some(ClusterConfig { etcd, host_name }))
}

/// `FWD_LISTENERS`, with the `FWD_HTTPS_ADDR` listener of the later original: it takes
/// the place of the default `:443=443`, or joins listeners set explicitly (an address
/// both use is an error).
fn listeners(env: &Env<'_>) -> Result<Vec<ListenerSpec>, ConfigError> {
    let mut listeners = env
        .with("FWD_LISTENERS", parse_listeners)?
        .unwrap_or_default();
    let Some(https_addr) = env.with("FWD_HTTPS_ADDR", parse_listen_addr)? else {
        return Ok(listeners);
    };
    let https = ListenerSpec::new(https_addr, HTTPS_GUEST_PORT, ListenerKind::Https);
    let explicit = env.set("FWD_LISTENERS").is_some();
    if !explicit {
        listeners.retain(|l| !(l.addr == ListenAddr::AnyHost(443) && l.guest_port == 443));
    }
    if let Some(other) = listeners.iter().find(|l| l.addr.overlaps(https_addr)) {
        return Err(ConfigError {
            name: "FWD_HTTPS_ADDR".into(),
            value: env.string("FWD_HTTPS_ADDR"),
            expected: format!(
                "an address no FWD_LISTENERS listener uses ({} does)",
                other.addr
            ),
        });
    }
    let at = listeners
        .iter()
        .position(|l| l.kind != ListenerKind::Https)
        .unwrap_or(listeners.len());
    listeners.insert(at, https);
    Ok(listeners)
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

/// A listener's address: `:443` or a bare `443` (every address), an IP address with
/// its port, or a host name with its port, resolved now (see [`ListenAddr`]'s
/// `FromStr`). Port 0 is refused: nobody could find such a listener.
fn parse_listen_addr(s: &str) -> Result<ListenAddr, String> {
    let s = s.trim();
    let addr = match s.contains(':') {
        true => s.parse::<ListenAddr>()?,
        false => ListenAddr::AnyHost(s.parse().map_err(|_| {
            format!("{s:?} is not an address like :443, 127.0.0.1:443 or localhost:443")
        })?),
    };
    match addr.port() {
        0 => Err(format!("a listen port above 0, not {s:?}")),
        _ => Ok(addr),
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

/// One `ADDR=GUESTPORT[/KIND][+OPTION...]` item.
fn parse_listener(item: &str) -> Result<ListenerSpec, String> {
    let item = item.trim();
    let (addr, target) = item
        .split_once('=')
        .ok_or_else(|| format!("ADDR=GUESTPORT[/KIND][+OPTION] items, not {item:?}"))?;
    let addr = parse_listen_addr(addr)?;
    let mut parts = target.split('+');
    let head = parts.next().unwrap_or("");
    let (port, kind) = match head.split_once('/') {
        Some((port, kind)) => (port, Some(kind.parse::<ListenerKind>()?)),
        None => (head, None),
    };
    let guest_port = parse_port(port)?;
    let mut spec = match kind {
        Some(kind) => ListenerSpec::new(addr, guest_port, kind),
        None => ListenerSpec::inferred(addr, guest_port),
    };
    for option in parts {
        match option.trim() {
            o if o.eq_ignore_ascii_case(PROXY_V2) => spec.proxy_v2 = true,
            o => return Err(format!("the option +{PROXY_V2}, not +{o:?}")),
        }
    }
    Ok(spec)
}

fn parse_listeners(s: &str) -> Result<Vec<ListenerSpec>, String> {
    let mut out: Vec<ListenerSpec> = Vec::new();
    for item in s.split(',').filter(|i| !i.trim().is_empty()) {
        let spec = parse_listener(item)?;
        if let Some(other) = out.iter().find(|l| l.addr.overlaps(spec.addr)) {
            return Err(format!(
                "listener addresses that do not overlap ({} and {} do)",
                other.addr, spec.addr
            ));
        }
        out.push(spec);
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

    #[test]
    fn in_a_cluster_only_with_endpoints() {
        assert_eq!(with(&[]).unwrap().cluster, None);
        assert_eq!(with(&[("FWD_ETCD_ENDPOINTS", " ")]).unwrap().cluster, None);
        let c = with(&[
            ("FWD_ETCD_ENDPOINTS", "10.0.0.1:2379,http://etcd-2:2379"),
            ("FWD_HOST_NAME", "host-a"),
        ])
        .unwrap()
        .cluster
        .expect("in a cluster");
        assert_eq!(
            c.etcd.endpoints,
            ["http://10.0.0.1:2379", "http://etcd-2:2379"]
        );
        assert_eq!(
            (c.etcd.prefix.as_str(), c.etcd.timeout, c.host_name.as_str()),
            ("/mergen", Duration::from_secs(3), "host-a")
        );
        let defaulted = with(&[("FWD_ETCD_ENDPOINTS", "10.0.0.1:2379")]).unwrap();
        assert_eq!(
            defaulted.cluster.unwrap().host_name,
            mergen_cluster::hostname()
        );
        for (name, value) in [
            ("FWD_ETCD_ENDPOINTS", "10.0.0.1"),
            ("FWD_ETCD_ENDPOINTS", "https://10.0.0.1:2379,10.0.0.2:2379"),
            ("FWD_ETCD_CA_FILE", "/etc/ssl/certs/ca-certificates.crt"),
            ("FWD_HOST_NAME", "a/b"),
            ("FWD_ETCD_TIMEOUT_SECONDS", "0"),
        ] {
            // The later of two settings of one variable wins.
            let vars = [("FWD_ETCD_ENDPOINTS", "10.0.0.1:2379"), (name, value)];
            let err = with(&vars).unwrap_err().to_string();
            assert!(err.contains(name), "{name}={value}: {err}");
        }
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
            proxy_v2: false,
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
        // An hour, as Envoy's TCP proxy: idle SSH, database and Kafka sessions stay.
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
        // The original's certificate script's names, for the default domain.
        assert_eq!(
            c.tls_cert_file,
            PathBuf::from("/etc/mergen/certs/wildcard.localhost.crt")
        );
        assert_eq!(
            c.tls_key_file,
            PathBuf::from("/etc/mergen/certs/wildcard.localhost.key")
        );
        assert!(c.needs_certificate());
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
                c.resolver_ttl,
                c.shutdown_timeout
            ],
            [1, 2, 4, 6].map(Duration::from_secs)
        );
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3)));
        let now = with(&[("FWD_SHUTDOWN_TIMEOUT_SECONDS", "0")]).unwrap();
        assert_eq!(now.shutdown_timeout, Duration::ZERO, "0 closes at once");
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

        // Zero turns the idle timeout off.
        let c = with(&[("FWD_IDLE_TIMEOUT_SECONDS", "0")]).unwrap();
        assert_eq!(c.idle_timeout, None);
    }

    #[test]
    fn certificate_paths_follow_the_domain() {
        let c = with(&[
            ("FWD_DOMAIN_PREFIX", "VM"),
            ("FWD_DOMAIN_SUFFIX", "Example.com."),
        ])
        .unwrap();
        assert_eq!(
            c.tls_cert_file,
            PathBuf::from("/etc/mergen/certs/wildcard.vm.example.com.crt")
        );
        assert_eq!(
            c.tls_key_file,
            PathBuf::from("/etc/mergen/certs/wildcard.vm.example.com.key")
        );
        // Set explicitly, they are taken as they are.
        let c = with(&[("FWD_DOMAIN_PREFIX", "vm"), ("FWD_TLS_KEY_FILE", "/k.pem")]).unwrap();
        assert_eq!(c.tls_key_file, PathBuf::from("/k.pem"));
        assert_eq!(
            c.tls_cert_file,
            PathBuf::from("/etc/mergen/certs/wildcard.vm.localhost.crt")
        );
    }

    fn listeners(value: &str) -> Vec<ListenerSpec> {
        with(&[
            ("FWD_LISTENERS", value),
            (
                "FWD_ALLOWED_GUEST_PORTS",
                "22,443,2222,3000,5432,6379,8080,9092",
            ),
        ])
        .unwrap_or_else(|e| panic!("{value}: {e}"))
        .listeners
    }

    #[test]
    fn kinds_are_inferred_as_the_original_did() {
        let kinds = |value: &str| -> Vec<ListenerKind> {
            listeners(value).iter().map(|l| l.kind).collect()
        };
        use ListenerKind::*;
        assert_eq!(
            kinds(":2022=22,:2222=22,:8443=443,:6432=5432,:9092=9092,:8080=8080"),
            [Raw, Tls, Https, Postgres, Tls, Tls]
        );
        // Raw only where the original had it: listen port 2022 to guest 22.
        assert_eq!(kinds("127.0.0.1:2022=22,127.0.0.2:2022=443"), [Raw, Https]);
    }

    /// The help text spells out the default listeners as they are parsed.
    #[test]
    fn the_help_shows_the_default_listeners_kinds() {
        let shown: Vec<String> = with(&[])
            .unwrap()
            .listeners
            .iter()
            .map(ToString::to_string)
            .collect();
        let help: String = LISTENERS_HELP
            .split_once("  default    ")
            .expect("a default line")
            .1
            .split_whitespace()
            .collect();
        assert_eq!(help, shown.join(","));
    }

    #[test]
    fn kinds_and_options_can_be_written_out() {
        let got = listeners(
            ":8443=8080/https, :2222=22/raw+proxy-v2, :6432=5432/TLS, :9443=443/postgres+Proxy-V2, :7000=6379/tls+proxy-v2",
        );
        let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                ":8443=8080/https",
                ":2222=22/raw+proxy-v2",
                ":6432=5432/tls",
                ":9443=443/postgres+proxy-v2",
                ":7000=6379/tls+proxy-v2",
            ]
        );
        // The kind brings its ALPN, whatever the guest port.
        assert_eq!(got[0].alpn, [b"http/1.1".to_vec()]);
        assert!(got[1].alpn.is_empty());
        assert!(got[2].alpn.is_empty());
        assert_eq!(got[3].alpn, [b"postgresql".to_vec()]);
        // An option without a kind keeps the inferred one.
        let got = listeners(":443=443+proxy-v2,:2022=22+proxy-v2");
        assert_eq!(
            (got[0].kind, got[0].proxy_v2, got[1].kind, got[1].proxy_v2),
            (ListenerKind::Https, true, ListenerKind::Raw, true)
        );
        // What the log shows parses back to the same listeners.
        let all = listeners(":8443=8080/https+proxy-v2,:2022=22,:5432=5432");
        let again: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(listeners(&again.join(",")), all);
    }

    #[test]
    fn host_names_are_resolved_at_start() {
        let got = listeners("localhost:8443=443,127.0.0.2:8443=443");
        assert_eq!(
            got[0].addr,
            ListenAddr::Addr("127.0.0.1:8443".parse().unwrap())
        );
        assert_eq!(got[0].name(), "127.0.0.1:8443");
        // Overlaps are seen on the resolved address.
        let err = with(&[("FWD_LISTENERS", "localhost:8443=443,127.0.0.1:8443=443")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("127.0.0.1:8443 and 127.0.0.1:8443 do"),
            "{err}"
        );
    }

    #[test]
    fn only_raw_listeners_need_no_certificate() {
        let c = with(&[("FWD_LISTENERS", ":2022=22,:2222=22/raw")]).unwrap();
        assert!(!c.needs_certificate());
        let c = with(&[("FWD_LISTENERS", ":2022=22,:2222=22")]).unwrap();
        assert!(c.needs_certificate(), ":2222=22 is TLS");
    }

    /// The later original's single HTTPS listener.
    #[test]
    fn https_addr_adds_an_https_listener() {
        // With the default listeners it takes the place of :443=443.
        let c = with(&[("FWD_HTTPS_ADDR", ":8443")]).unwrap();
        let shown: Vec<String> = c.listeners.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                ":8443=443/https",
                ":2022=22/raw",
                ":5432=5432/postgres",
                ":6379=6379/tls",
                ":9092=9092/tls"
            ]
        );
        let c = with(&[("FWD_HTTPS_ADDR", ":443")]).unwrap();
        assert_eq!(c, with(&[]).unwrap());
        // Explicit listeners keep theirs; it joins them.
        let c = with(&[
            ("FWD_LISTENERS", "127.0.0.1:8443=443,:2022=22"),
            ("FWD_HTTPS_ADDR", "127.0.0.1:9443"),
        ])
        .unwrap();
        let shown: Vec<String> = c.listeners.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "127.0.0.1:8443=443/https",
                "127.0.0.1:9443=443/https",
                ":2022=22/raw"
            ]
        );
        // But never on an address one of them uses.
        for (listeners, https) in [
            (":443=443", ":443"),
            ("127.0.0.1:8443=443", ":8443"),
            (":2022=22", "127.0.0.1:2022"),
        ] {
            let err = with(&[("FWD_LISTENERS", listeners), ("FWD_HTTPS_ADDR", https)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("FWD_HTTPS_ADDR"), "{err}");
            assert!(err.contains("does"), "{err}");
        }
        // Its guest port is allowed like any other's.
        let err = with(&[
            ("FWD_LISTENERS", ":2022=22"),
            ("FWD_ALLOWED_GUEST_PORTS", "22"),
            ("FWD_HTTPS_ADDR", ":8443"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("guest port 443"), "{err}");
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
            ("FWD_LISTENERS", "nowhere.invalid:443=443"),
            ("FWD_LISTENERS", "bad_name!:443=443"),
            ("FWD_LISTENERS", "127.0.0.1:0=443"),
            ("FWD_LISTENERS", ":443=443/http"),
            ("FWD_LISTENERS", ":443=443/https+proxy-v1"),
            ("FWD_LISTENERS", ":443=443+"),
            ("FWD_LISTENERS", ":443=/https"),
            ("FWD_HTTPS_ADDR", "nowhere.invalid:443"),
            ("FWD_HTTPS_ADDR", "127.0.0.1"),
            ("FWD_LISTENERS", ":99999=443"),
            ("FWD_LISTENERS", ":443=443,0.0.0.0:443=443"),
            ("FWD_LISTENERS", "[::1]:443=443,443=443"),
            ("FWD_LISTENERS", ":8080=8080"),
            ("FWD_LISTENERS", ","),
            ("FWD_ALLOWED_GUEST_PORTS", "22,x"),
            ("FWD_DIAL_TIMEOUT_SECONDS", "soon"),
            ("FWD_HANDSHAKE_TIMEOUT_SECONDS", "-1"),
            ("FWD_IDLE_TIMEOUT_SECONDS", "-1"),
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
        assert!(
            readme.contains(LISTENERS_HELP),
            "README.md's listener block differs from config::LISTENERS_HELP; it should read:\n{LISTENERS_HELP}"
        );
    }
}
