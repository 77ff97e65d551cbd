//! The client of `http` hooks: ureq on rustls (ring), with the behaviour of Go's
//! `http.Client` that the original's users relied on:
//!
//! - redirects followed as Go does: 301/302/303 become a GET without the body,
//!   307/308 repeat the POST with its body, and the 10th response that still
//!   redirects fails ("stopped after 10 redirects"); `Authorization`, `Cookie` and
//!   `WWW-Authenticate` go on only to the same host or its subdomains;
//! - proxies from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (or lowercase), chosen per URL
//!   scheme, never for `localhost` or loopback addresses (Go's `ProxyFromEnvironment`);
//! - the system's trusted roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), Mozilla's
//!   when the system has none.
//!
//! ureq's own redirect and proxy logic is off: it differs from Go's on each point.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
use url::Url;

/// Go's `defaultCheckRedirect`: at most 10 requests in a chain.
const MAX_REQUESTS: usize = 10;
/// What is read of a response body (then it is dropped).
const MAX_BODY: u64 = 64 * 1024;
/// Headers Go does not forward to a different host on a redirect.
const SENSITIVE: [&str; 4] = ["authorization", "www-authenticate", "cookie", "cookie2"];

pub struct HttpClient {
    agent: ureq::Agent,
    proxies: ProxyEnv,
}

impl HttpClient {
    /// A client with the process environment's proxies and the system's roots.
    pub fn from_env() -> HttpClient {
        HttpClient::new(ProxyEnv::from_lookup(|k| std::env::var(k).ok()))
    }

    pub fn new(proxies: ProxyEnv) -> HttpClient {
        let native = rustls_native_certs::load_native_certs();
        let roots: Vec<Certificate<'static>> = native
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let root_certs = if roots.is_empty() {
            log::warn!(errors:? = native.errors; "no system CA certificates: https hooks trust Mozilla's roots");
            RootCerts::WebPki
        } else {
            RootCerts::Specific(Arc::new(roots))
        };
        let config = ureq::Agent::config_builder()
            .tls_config(
                TlsConfig::builder()
                    .provider(TlsProvider::Rustls)
                    .root_certs(root_certs)
                    .build(),
            )
            .proxy(None)
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent("mergend")
            .build();
        HttpClient {
            agent: ureq::Agent::new_with_config(config),
            proxies,
        }
    }

    /// POST `body` (JSON) to `url` and want a 2xx in the end, within `deadline`.
    pub fn post(
        &self,
        url: &str,
        headers: &BTreeMap<String, String>,
        body: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), String> {
        let first = Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
        if !matches!(first.scheme(), "http" | "https") {
            return Err(format!("url {url:?}: want http:// or https://"));
        }
        for (k, v) in headers {
            if k.is_empty() || k.contains([':', '\r', '\n', ' ']) || v.contains(['\r', '\n']) {
                return Err(format!("invalid header {k:?}"));
            }
        }
        let mut url = first.clone();
        let mut with_body = true;
        let mut referer: Option<String> = None;
        for sent in 1.. {
            // As Go: credentials go on to the same host or its subdomains only.
            let same_host = match (url.host_str(), first.host_str()) {
                (Some(d), Some(i)) => d == i || d.ends_with(&format!(".{i}")),
                _ => false,
            };
            let proxy = match self.proxies.proxy_for(&url) {
                Some(p) => Some(ureq::Proxy::new(&p).map_err(|e| format!("proxy {p:?}: {e}"))?),
                None => None,
            };
            let timeout = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(format!("{url}: timed out"));
                    }
                    Some(left)
                }
                None => None,
            };
            // Headers go out in Go's canonical case (`X-Token`), as the original sent
            // them, for receivers that compare names case-sensitively.
            let mut out: Vec<(String, &[u8])> = headers
                .iter()
                .filter(|(k, _)| same_host || !SENSITIVE.contains(&k.to_ascii_lowercase().as_str()))
                .map(|(k, v)| (canonical_header(k), v.as_bytes()))
                .collect();
            if let Some(r) = &referer {
                out.push(("Referer".into(), r.as_bytes()));
            }
            let sent_result = if with_body {
                out.push(("Content-Type".into(), b"application/json"));
                prepare(self.agent.post(url.as_str()), &out, timeout, proxy).send(body)
            } else {
                prepare(self.agent.get(url.as_str()), &out, timeout, proxy).call()
            };
            let resp = sent_result.map_err(|e| format!("{url}: {e}"))?;
            let status = resp.status().as_u16();
            let location: Option<String> = resp
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .map(str::to_string);
            // Read a little of the body so a keep-alive connection can be reused.
            let mut sink = Vec::new();
            let _ = resp
                .into_body()
                .into_reader()
                .take(MAX_BODY)
                .read_to_end(&mut sink);
            let redirect = matches!(status, 301 | 302 | 303 | 307 | 308);
            match location {
                Some(loc) if redirect => {
                    if sent >= MAX_REQUESTS {
                        return Err(format!("{first}: stopped after {MAX_REQUESTS} redirects"));
                    }
                    let next = url
                        .join(&loc)
                        .map_err(|e| format!("{url}: bad redirect to {loc:?}: {e}"))?;
                    if !matches!(next.scheme(), "http" | "https") {
                        return Err(format!("{url}: redirect to unsupported {next}"));
                    }
                    if (301..=303).contains(&status) {
                        // As Go: the POST becomes a GET without the body.
                        with_body = false;
                    }
                    // As Go: no Referer from https to http.
                    referer = (!(url.scheme() == "https" && next.scheme() == "http")).then(|| {
                        let mut r = url.clone();
                        let _ = r.set_username("");
                        let _ = r.set_password(None);
                        r.set_fragment(None);
                        r.to_string()
                    });
                    url = next;
                }
                _ if (200..300).contains(&status) => return Ok(()),
                _ => return Err(format!("{url}: answered HTTP {status}")),
            }
        }
        unreachable!("the loop returns")
    }
}

/// A request with its headers, timeout and proxy.
fn prepare<B>(
    mut rb: ureq::RequestBuilder<B>,
    headers: &[(String, &[u8])],
    timeout: Option<std::time::Duration>,
    proxy: Option<ureq::Proxy>,
) -> ureq::RequestBuilder<B> {
    for (k, v) in headers {
        rb = rb.header_raw(k, v);
    }
    rb.config().timeout_global(timeout).proxy(proxy).build()
}

/// Go's `textproto.CanonicalMIMEHeaderKey`: `x-token` becomes `X-Token`.
fn canonical_header(k: &str) -> String {
    let mut out = String::with_capacity(k.len());
    let mut upper = true;
    for c in k.chars() {
        out.push(if upper {
            c.to_ascii_uppercase()
        } else {
            c.to_ascii_lowercase()
        });
        upper = c == '-';
    }
    out
}

/// Go's `httpproxy.Config` from the environment.
#[derive(Debug, Clone, Default)]
pub struct ProxyEnv {
    http: Option<String>,
    https: Option<String>,
    no_proxy: Vec<String>,
}

impl ProxyEnv {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> ProxyEnv {
        let any = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| get(n).filter(|v| !v.trim().is_empty()))
                .map(|v| v.trim().to_string())
        };
        // As Go: under CGI, HTTP_PROXY may come from a client's Proxy header.
        let cgi = get("REQUEST_METHOD").is_some();
        ProxyEnv {
            http: if cgi {
                get("http_proxy").filter(|v| !v.trim().is_empty())
            } else {
                any(["HTTP_PROXY", "http_proxy"])
            },
            https: any(["HTTPS_PROXY", "https_proxy"]),
            no_proxy: any(["NO_PROXY", "no_proxy"])
                .map(|v| {
                    v.split(',')
                        .map(|e| e.trim().to_ascii_lowercase())
                        .filter(|e| !e.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The proxy URL for a request to `url`, if any.
    pub fn proxy_for(&self, url: &Url) -> Option<String> {
        let raw = match url.scheme() {
            "https" => self.https.as_ref(),
            "http" => self.http.as_ref(),
            _ => None,
        }?;
        let host = url
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let host = host.to_ascii_lowercase();
        if host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
            return None;
        }
        let port = url.port_or_known_default().unwrap_or(0);
        if self.no_proxy.iter().any(|e| no_proxy_match(e, &host, port)) {
            return None;
        }
        // A proxy given as host:port means http://host:port.
        Some(if raw.contains("://") {
            raw.clone()
        } else {
            format!("http://{raw}")
        })
    }
}

/// One `NO_PROXY` entry against a request host (lowercase) and port.
fn no_proxy_match(entry: &str, host: &str, port: u16) -> bool {
    if entry == "*" {
        return true;
    }
    let ip = host.parse::<IpAddr>().ok();
    if let Some((net, bits)) = entry.split_once('/') {
        if let (Ok(net), Ok(bits), Some(ip)) = (net.parse::<IpAddr>(), bits.parse::<u8>(), ip) {
            return in_cidr(ip, net, bits);
        }
        return false;
    }
    let (ehost, eport) = split_host_port(entry);
    if eport.is_some_and(|p| p != port) {
        return false;
    }
    if let (Ok(e), Some(ip)) = (ehost.parse::<IpAddr>(), ip) {
        return e == ip;
    }
    let ehost = ehost.strip_prefix('*').unwrap_or(ehost);
    // "example.com" matches it and its subdomains; ".example.com" only subdomains.
    match ehost.strip_prefix('.') {
        Some(suffix) => host.ends_with(&format!(".{suffix}")),
        None => host == ehost || host.ends_with(&format!(".{ehost}")),
    }
}

fn split_host_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(p) => (h, Some(p)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> ProxyEnv {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProxyEnv::from_lookup(|k| m.get(k).cloned())
    }

    fn proxy(e: &ProxyEnv, url: &str) -> Option<String> {
        e.proxy_for(&Url::parse(url).unwrap())
    }

    /// Go's httpproxy rules.
    #[test]
    fn proxies_chosen_like_go() {
        let e = env(&[
            ("HTTP_PROXY", "proxy.local:3128"),
            ("https_proxy", "http://tls-proxy.local:3129"),
            (
                "NO_PROXY",
                "internal.example, .corp.example,10.0.0.0/8,192.168.1.5,api.example:8443",
            ),
        ]);
        assert_eq!(
            proxy(&e, "http://hooks.example/x").as_deref(),
            Some("http://proxy.local:3128")
        );
        assert_eq!(
            proxy(&e, "https://hooks.example/x").as_deref(),
            Some("http://tls-proxy.local:3129")
        );
        for direct in [
            "http://localhost:8080/",
            "http://127.0.0.1/",
            "https://[::1]:9/",
            "http://internal.example/",
            "http://a.internal.example/",
            "http://b.corp.example/",
            "http://10.1.2.3/",
            "http://192.168.1.5/",
            "https://api.example:8443/",
        ] {
            assert_eq!(proxy(&e, direct), None, "{direct}");
        }
        // ".corp.example" matches only subdomains; a port entry only its port.
        assert!(proxy(&e, "http://corp.example/").is_some());
        assert!(proxy(&e, "https://api.example/").is_some());
        assert_eq!(
            proxy(
                &env(&[("HTTPS_PROXY", "p:1"), ("NO_PROXY", "*")]),
                "https://x.example/"
            ),
            None
        );
        assert_eq!(
            proxy(&env(&[("HTTPS_PROXY", "p:1")]), "http://x.example/"),
            None
        );
        // CGI: HTTP_PROXY is ignored.
        assert_eq!(
            proxy(
                &env(&[("HTTP_PROXY", "p:1"), ("REQUEST_METHOD", "GET")]),
                "http://x.example/"
            ),
            None
        );
    }
}
