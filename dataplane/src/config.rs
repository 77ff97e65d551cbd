//! The forwarder's settings, read from the same `FWD_*` variables as the original plus
//! the new ones of the io_uring dataplane. An unset or empty variable takes its default
//! (as Go's `os.Getenv` did), except `FWD_ADMIN_ADDR` where empty turns the admin
//! listener off. A value that does not parse is a startup error naming the variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

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
    pub workers: usize,
    pub admin_addr: Option<SocketAddr>,
    pub log_level: String,
    pub log_format: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerSpec {
    pub addr: ListenAddr,
    pub guest_port: u16,
    pub mode: ListenerMode,
}

/// Where a listener listens: an empty host (`:443`) is every IPv4 and IPv6 address,
/// as Go's `net.Listen("tcp", ":443")` in the original (the type mergend's
/// `MGR_HTTP_ADDR` uses too).
pub use mergen_http::ListenAddr;

#[derive(Clone, Debug, PartialEq)]
pub enum ListenerMode {
    /// TLS terminated here, routed by SNI; `alpn` is what the server offers.
    Tls {
        alpn: Vec<Vec<u8>>,
        protocol: Protocol,
    },
    /// Plain TCP, no sniffing (SSH is server-first), routed to the first VM by createdAt.
    Raw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Https,
    /// The client may send an 8-byte SSLRequest (or GSSENCRequest) before the
    /// ClientHello; see [`crate::sni::postgres_preamble`].
    Postgres,
    Generic,
}

pub const DEFAULT_CONFIG_ROOT: &str = "/etc/mergen/vm.d";
pub const DEFAULT_NETNS_ROOT: &str = "/run/netns";
pub const DEFAULT_TLS_CERT_FILE: &str = "/etc/mergen/certs/wildcard.localhost.crt";
pub const DEFAULT_TLS_KEY_FILE: &str = "/etc/mergen/certs/wildcard.localhost.key";
pub const DEFAULT_DOMAIN_SUFFIX: &str = "localhost";
pub const DEFAULT_LISTENERS: &str = ":443=443,:2022=22,:5432=5432,:6379=6379,:9092=9092";
pub const DEFAULT_ALLOWED_GUEST_PORTS: &str = "22,443,5432,6379,9092";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9901";
/// The guest port served in raw mode (no TLS, no SNI), as in the original.
pub const RAW_GUEST_PORT: u16 = 22;

impl ListenerSpec {
    /// The listener's name in logs and in the `listener` label of the metrics: its
    /// address as configured, e.g. `:443` or `127.0.0.1:8443`, unique because two
    /// listeners cannot share an address.
    pub fn name(&self) -> String {
        self.addr.to_string()
    }
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        Config::from_lookup(|key| std::env::var(key).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        // Unset and empty are the same, except where noted.
        let var = |key: &str| get(key).filter(|v| !v.trim().is_empty());
        let string = |key: &str, default: &str| var(key).unwrap_or_else(|| default.to_string());
        let seconds = |key: &str, default: u64| -> Result<Duration, String> {
            match var(key) {
                None => Ok(Duration::from_secs(default)),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
                    _ => Err(format!(
                        "{key}={v:?}: expected a positive whole number of seconds"
                    )),
                },
            }
        };
        let count = |key: &str, default: usize| -> Result<usize, String> {
            match var(key) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{key}={v:?}: expected a positive whole number")),
                },
            }
        };

        let allowed_raw = string("FWD_ALLOWED_GUEST_PORTS", DEFAULT_ALLOWED_GUEST_PORTS);
        let allowed_guest_ports = parse_port_list(&allowed_raw)
            .map_err(|e| format!("FWD_ALLOWED_GUEST_PORTS={allowed_raw:?}: {e}"))?;

        let listeners_raw = string("FWD_LISTENERS", DEFAULT_LISTENERS);
        let mut listeners = parse_listeners(&listeners_raw)
            .map_err(|e| format!("FWD_LISTENERS={listeners_raw:?}: {e}"))?;
        for l in &mut listeners {
            if !allowed_guest_ports.contains(&l.guest_port) {
                return Err(format!(
                    "FWD_LISTENERS={listeners_raw:?}: guest port {} of listener {} is not in FWD_ALLOWED_GUEST_PORTS={allowed_raw:?}",
                    l.guest_port, l.addr
                ));
            }
            let alpn_key = format!("FWD_ALPN_{}", l.guest_port);
            if let (ListenerMode::Tls { alpn, .. }, Some(v)) = (&mut l.mode, get(&alpn_key)) {
                *alpn = parse_alpn(&v).map_err(|e| format!("{alpn_key}={v:?}: {e}"))?;
            }
        }

        let admin_addr = match get("FWD_ADMIN_ADDR") {
            None => Some(parse_addr(DEFAULT_ADMIN_ADDR).expect("default admin address parses")),
            Some(v) if v.trim().is_empty() => None,
            Some(v) => Some(parse_addr(&v).map_err(|e| format!("FWD_ADMIN_ADDR={v:?}: {e}"))?),
        };

        let netns_root = match get("FWD_NETNS_ROOT") {
            None => Some(PathBuf::from(DEFAULT_NETNS_ROOT)),
            Some(v) if v.trim().is_empty() => None,
            Some(v) => Some(PathBuf::from(v.trim())),
        };

        let log_level = string("FWD_LOG_LEVEL", "debug").trim().to_ascii_lowercase();
        mergen_log::parse_level(&log_level)
            .map_err(|e| format!("FWD_LOG_LEVEL={log_level:?}: {e}"))?;
        let log_format = string("FWD_LOG_FORMAT", "console")
            .trim()
            .to_ascii_lowercase();
        mergen_log::Format::from_str(&log_format)
            .map_err(|e| format!("FWD_LOG_FORMAT={log_format:?}: {e}"))?;

        let default_workers = std::thread::available_parallelism().map_or(1, |n| n.get());

        Ok(Config {
            config_root: PathBuf::from(string("FWD_CONFIG_ROOT", DEFAULT_CONFIG_ROOT)),
            netns_root,
            tls_cert_file: PathBuf::from(string("FWD_TLS_CERT_FILE", DEFAULT_TLS_CERT_FILE)),
            tls_key_file: PathBuf::from(string("FWD_TLS_KEY_FILE", DEFAULT_TLS_KEY_FILE)),
            domain_prefix: normalize_domain(&get("FWD_DOMAIN_PREFIX").unwrap_or_default()),
            domain_suffix: normalize_domain(&string("FWD_DOMAIN_SUFFIX", DEFAULT_DOMAIN_SUFFIX)),
            listeners,
            allowed_guest_ports,
            dial_timeout: seconds("FWD_DIAL_TIMEOUT_SECONDS", 5)?,
            handshake_timeout: seconds("FWD_HANDSHAKE_TIMEOUT_SECONDS", 10)?,
            idle_timeout: seconds("FWD_IDLE_TIMEOUT_SECONDS", 300)?,
            resolver_ttl: seconds("FWD_RESOLVER_CACHE_TTL_SECONDS", 5)?,
            shutdown_timeout: seconds("FWD_SHUTDOWN_TIMEOUT_SECONDS", 15)?,
            max_connections: count("FWD_MAX_CONNECTIONS", 65536)?,
            workers: count("FWD_WORKERS", default_workers)?,
            admin_addr,
            log_level,
            log_format,
        })
    }
}

/// Domain parts are compared lowercase and without surrounding dots, so
/// `FWD_DOMAIN_SUFFIX=.Example.COM.` means `example.com`.
fn normalize_domain(s: &str) -> String {
    s.trim().trim_matches('.').to_ascii_lowercase()
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
        .map_err(|_| format!("{s:?} is not an address like :443 or 127.0.0.1:443"))
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
        _ => Err(format!("{:?} is not a port (1-65535)", s.trim())),
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
            .ok_or_else(|| format!("{:?} is not addr=guestPort", item.trim()))?;
        let addr = parse_listen_addr(addr)?;
        let guest_port = parse_port(guest)?;
        if let Some(other) = out.iter().find(|l| l.addr.overlaps(addr)) {
            return Err(format!(
                "listener addresses {} and {addr} overlap",
                other.addr
            ));
        }
        out.push(ListenerSpec {
            addr,
            guest_port,
            mode: default_mode(guest_port),
        });
    }
    if out.is_empty() {
        return Err("no listeners".to_string());
    }
    Ok(out)
}

fn default_mode(guest_port: u16) -> ListenerMode {
    match guest_port {
        RAW_GUEST_PORT => ListenerMode::Raw,
        443 => ListenerMode::Tls {
            alpn: vec![b"http/1.1".to_vec()],
            protocol: Protocol::Https,
        },
        // libpq 17 offers `postgresql` and, with `sslnegotiation=direct`, refuses a
        // server that does not select it; older clients send no ALPN at all.
        5432 => ListenerMode::Tls {
            alpn: vec![b"postgresql".to_vec()],
            protocol: Protocol::Postgres,
        },
        _ => ListenerMode::Tls {
            alpn: Vec::new(),
            protocol: Protocol::Generic,
        },
    }
}

/// `FWD_ALPN_<guestPort>=h2,http/1.1`: the protocols offered, in preference order;
/// an empty value offers none.
fn parse_alpn(s: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if item.len() > 255 || !item.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{item:?} is not a protocol name"));
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

    fn with(vars: &[(&str, &str)]) -> Result<Config, String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    fn any(port: u16) -> ListenAddr {
        ListenAddr::AnyHost(port)
    }

    fn https() -> ListenerMode {
        ListenerMode::Tls {
            alpn: vec![b"http/1.1".to_vec()],
            protocol: Protocol::Https,
        }
    }

    fn generic() -> ListenerMode {
        ListenerMode::Tls {
            alpn: vec![],
            protocol: Protocol::Generic,
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
            ListenerSpec {
                addr: any(443),
                guest_port: 443,
                mode: https(),
            },
            ListenerSpec {
                addr: any(2022),
                guest_port: 22,
                mode: ListenerMode::Raw,
            },
            ListenerSpec {
                addr: any(5432),
                guest_port: 5432,
                mode: ListenerMode::Tls {
                    alpn: vec![b"postgresql".to_vec()],
                    protocol: Protocol::Postgres,
                },
            },
            ListenerSpec {
                addr: any(6379),
                guest_port: 6379,
                mode: generic(),
            },
            ListenerSpec {
                addr: any(9092),
                guest_port: 9092,
                mode: generic(),
            },
        ];
        assert_eq!(c.listeners, want);
        assert_eq!(c.dial_timeout, Duration::from_secs(5));
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.resolver_ttl, Duration::from_secs(5));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(15));
        assert_eq!(c.max_connections, 65536);
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
                ListenerSpec {
                    addr: ListenAddr::Addr("127.0.0.1:8443".parse().unwrap()),
                    guest_port: 443,
                    mode: ListenerMode::Tls {
                        alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                        protocol: Protocol::Https
                    },
                },
                ListenerSpec {
                    addr: any(2022),
                    guest_port: 22,
                    mode: ListenerMode::Raw
                },
                ListenerSpec {
                    addr: ListenAddr::Addr("[::1]:7000".parse().unwrap()),
                    guest_port: 6379,
                    mode: ListenerMode::Tls {
                        alpn: vec![b"redis".to_vec()],
                        protocol: Protocol::Generic
                    },
                },
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
        assert_eq!(
            c.listeners[0].mode,
            ListenerMode::Tls {
                alpn: vec![],
                protocol: Protocol::Https
            }
        );
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
        let err = with(&[("FWD_LISTENERS", "127.0.0.1:8443=443,8443=443")]).unwrap_err();
        assert!(err.contains("127.0.0.1:8443 and :8443 overlap"), "{err}");
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
            ("FWD_WORKERS", "many"),
            ("FWD_ADMIN_ADDR", "localhost:9901"),
            ("FWD_LOG_LEVEL", "loud"),
            ("FWD_LOG_FORMAT", "xml"),
            ("FWD_ALPN_443", "h 2"),
        ];
        for &(var, value) in cases {
            let err = match with(&[(var, value)]) {
                Err(e) => e,
                Ok(_) => panic!("{var}={value:?} must be refused"),
            };
            assert!(err.contains(var), "{err:?} should name {var}");
            assert!(
                err.contains(value.trim_matches(',')),
                "{err:?} should show {value:?}"
            );
        }
        // A listener on a guest port the allow-list drops.
        let err = with(&[("FWD_ALLOWED_GUEST_PORTS", "443")]).unwrap_err();
        assert!(
            err.contains("guest port 22") && err.contains("FWD_ALLOWED_GUEST_PORTS"),
            "{err}"
        );
    }
}
