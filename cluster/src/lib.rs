//! Routes shared between hosts through etcd.
//!
//! Each host's mergend publishes its VMs' routes (id, aliases, owning host, the host's
//! address) under one prefix, bound to a lease it keeps alive ([`Publisher`]); every
//! forwarder watches the prefix and learns the routes of the other hosts
//! ([`RouteWatch`]). Aliases are claimed cluster-wide in etcd transactions, so two
//! hosts never both win one name. `docs/cluster.md` describes the design and its
//! failure modes.
//!
//! The etcd client (tonic, tokio) runs on a runtime of its own with one thread, named
//! after its user: nothing of it runs on a forwarder worker or a mergend request thread
//! except the wait for an answer, bounded by [`Settings::timeout`].

#![deny(unsafe_code)]

pub mod keys;
mod publisher;
pub mod record;
mod tls;
mod watcher;

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use mergen_envtable::Env;

pub use keys::{Key, Keys};
pub use publisher::{LocalVm, Ops, Publisher, PublisherStatus, Source};
pub use record::{HostRecord, VmRecord};
pub use tls::{PemFile, Tls};
pub use watcher::{ClusterView, RouteWatch, WatchStatus};

/// How to reach etcd, and where the cluster's keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `http://host:port` or `https://host:port`, one per member, all of one scheme.
    pub endpoints: Vec<String>,
    /// The key prefix (`/mergen`): several clusters may share one etcd.
    pub prefix: String,
    /// Bound on every request (a watch is checked for life this often too).
    pub timeout: Duration,
    /// `Some` exactly when the endpoints are `https://`.
    pub tls: Option<Tls>,
}

impl Settings {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }

    /// The settings from a daemon's variables `<var>_ENDPOINTS`, `_PREFIX`,
    /// `_TIMEOUT_SECONDS`, `_CA_FILE`, `_CERT_FILE` and `_KEY_FILE` (`var` is
    /// `MGR_ETCD` or `FWD_ETCD`; its table declares them); `None` without endpoints.
    /// PEM files are read and checked here, at start-up.
    pub fn from_env(env: &Env, var: &str) -> Result<Option<Settings>, mergen_envtable::Error> {
        let name = |suffix: &str| format!("{var}_{suffix}");
        let endpoints = env
            .with(&name("ENDPOINTS"), parse_endpoints)?
            .unwrap_or_default();
        if endpoints.is_empty() {
            return Ok(None);
        }
        let refuse = |suffix: &str, expected: String| mergen_envtable::Error {
            name: name(suffix),
            value: env.string(&name(suffix)),
            expected,
        };
        let tls = if endpoints.iter().all(|e| e.starts_with("https://")) {
            let ca = env.with(&name("CA_FILE"), PemFile::ca)?;
            let cert = env.with(&name("CERT_FILE"), PemFile::certificate)?;
            let key = env.with(&name("KEY_FILE"), PemFile::key)?;
            let identity = match (cert, key) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(refuse(
                        "KEY_FILE",
                        format!("the key of {} (one goes with the other)", name("CERT_FILE")),
                    ))
                }
                (None, Some(_)) => {
                    return Err(refuse(
                        "CERT_FILE",
                        format!(
                            "the certificate of {} (one goes with the other)",
                            name("KEY_FILE")
                        ),
                    ))
                }
            };
            Some(Tls { ca, identity })
        } else {
            // A CA or a certificate with plain endpoints is a mistake of one or the
            // other, never a reason to send the traffic in clear.
            if let Some(suffix) = ["CA_FILE", "CERT_FILE", "KEY_FILE"]
                .into_iter()
                .find(|s| env.set(&name(s)).is_some())
            {
                return Err(refuse(
                    suffix,
                    format!("no TLS file: {} are not https://", name("ENDPOINTS")),
                ));
            }
            None
        };
        Ok(Some(Settings {
            endpoints,
            prefix: env.string(&name("PREFIX")),
            timeout: env.seconds(&name("TIMEOUT_SECONDS"))?,
            tls,
        }))
    }
}

/// Parse a comma-separated endpoint list; blank items are skipped. `host:port` means
/// `http://host:port`; `http://` and `https://` do not mix.
pub fn parse_endpoints(text: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (scheme, bare) = match item.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
            Some(_) => return Err(format!("{item:?}: want http:// or https://")),
            None => ("http", item),
        };
        let port_ok = bare.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || bare.contains('/') {
            return Err(format!(
                "{item:?}: want host:port, http://host:port or https://host:port"
            ));
        }
        let url = format!("{scheme}://{bare}");
        if let Some(first) = out.first() {
            if first.split_once("://").map(|(s, _)| s) != Some(scheme) {
                return Err(format!(
                    "{item:?} and {first:?}: all endpoints http:// or all https://"
                ));
            }
        }
        out.push(url);
    }
    Ok(out)
}

/// The kernel's host name (what `hostname` prints): a host's name in the cluster
/// unless `MGR_HOST_NAME` / `FWD_HOST_NAME` say otherwise.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Why a cluster operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Another host's VM answers to this alias.
    #[error("alias {alias:?} belongs to a VM on host {host:?}")]
    AliasTaken { alias: String, host: String },
    /// etcd could not be reached or did not answer in time, or this host holds no
    /// lease right now.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// A runtime for the client could not be made.
    #[error("cannot start the etcd client: {0}")]
    Start(#[source] std::io::Error),
}

impl From<etcd_client::Error> for ClusterError {
    fn from(e: etcd_client::Error) -> ClusterError {
        ClusterError::Unavailable(with_causes(&e))
    }
}

/// An error with its causes. etcd-client's error does not expose its source, and
/// tonic's transport error says only "transport error": the certificate etcd refused,
/// or the alert it sent, is further down.
pub(crate) fn with_causes(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut text, mut cause): (String, Option<&dyn std::error::Error>) = match e {
        etcd_client::Error::TransportError(t) => (e.to_string(), t.source()),
        // Its own text shows its source with `Debug`: the message and the causes'
        // texts say the same, readably.
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => {
            (s.message().to_string(), s.source())
        }
        etcd_client::Error::IoError(io) => (e.to_string(), io.source()),
        _ => (e.to_string(), None),
    };
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// How precisely an outage has been logged so far: its first reason is said, and once
/// more a precise one (a refused certificate, say) when the first was only a timeout,
/// so that an operator sees why without a line per retry.
pub(crate) fn outage_level(reason: &str) -> u8 {
    // Every timeout of ours says "... within <duration>".
    if reason.contains(" within ") {
        1
    } else {
        2
    }
}

/// The client and the runtime it runs on.
struct Etcd {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    timeout: Duration,
}

impl Etcd {
    /// A client for `settings.endpoints`, on a one-thread runtime named `thread`.
    /// Connections are made when first used, so an etcd that is down now is not an
    /// error here.
    fn connect(settings: &Settings, thread: &str) -> Result<Etcd, ClusterError> {
        if settings.endpoints.is_empty() {
            return Err(ClusterError::Unavailable("no endpoints".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(thread)
            .enable_all()
            .build()
            .map_err(ClusterError::Start)?;
        let options = ConnectOptions::new()
            .with_connect_timeout(settings.timeout)
            // HTTP/2 pings find a member that went away without closing the connection
            // (a partition) within about two intervals.
            .with_keep_alive(settings.timeout, settings.timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from the quorum fails requests and ends watches instead
            // of serving what it had.
            .with_require_leader(true);
        let options = match &settings.tls {
            Some(tls) => options.with_tls(tls.options()),
            None => options,
        };
        let endpoints = settings.endpoints.clone();
        let client = runtime.block_on(async move {
            tokio::time::timeout(settings.timeout, Client::connect(endpoints, Some(options))).await
        });
        let client = match client {
            Ok(c) => c?,
            Err(_) => return Err(ClusterError::Unavailable("connect timed out".into())),
        };
        Ok(Etcd {
            runtime: Some(runtime),
            client,
            timeout: settings.timeout,
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    /// Run one request from a plain thread, bounded by the timeout, trying it again
    /// while etcd answers that it cannot serve it right now (a leader election, a
    /// member that went away): every request made through here may be repeated,
    /// claims included, since their comparisons decide again.
    fn call<T, F>(&self, f: impl Fn(Client) -> F) -> Result<T, ClusterError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.runtime().block_on(async {
            let mut pause = Duration::from_millis(25);
            loop {
                let error = match tokio::time::timeout_at(deadline, f(self.client.clone())).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(e)) if transient(&e) => e,
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => {
                        return Err(ClusterError::Unavailable(format!(
                            "no answer within {:?}",
                            self.timeout
                        )))
                    }
                };
                if tokio::time::Instant::now() + pause >= deadline {
                    return Err(error.into());
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(400));
            }
        })
    }

    /// Run one request once, bounded by the timeout.
    fn call_once<T>(
        &self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClusterError> {
        match self
            .runtime()
            .block_on(async { tokio::time::timeout(self.timeout, fut).await })
        {
            Ok(result) => Ok(result?),
            Err(_) => Err(ClusterError::Unavailable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// Whether etcd may well serve the same request in a moment.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Dropped from a plain thread or from the runtime's own: never wait for it.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoints(" 10.0.0.1:2379, http://etcd-2:2379 ,,").unwrap(),
            vec!["http://10.0.0.1:2379", "http://etcd-2:2379"]
        );
        assert_eq!(
            parse_endpoints("https://10.0.0.1:2379,https://etcd-2:2379").unwrap(),
            vec!["https://10.0.0.1:2379", "https://etcd-2:2379"]
        );
        assert!(parse_endpoints("").unwrap().is_empty());
        for bad in [
            "10.0.0.1",
            "host:0",
            "http://h:2379/x",
            ":2379",
            "unix://h:2379",
            "https://a:2379,http://b:2379",
            "https://a:2379,b:2379",
        ] {
            assert!(parse_endpoints(bad).is_err(), "{bad}");
        }
    }

    const VARS: &[mergen_envtable::Var] = &[
        mergen_envtable::Var::unset("T_ETCD_ENDPOINTS", ""),
        mergen_envtable::Var::new("T_ETCD_PREFIX", "/mergen", ""),
        mergen_envtable::Var::new("T_ETCD_TIMEOUT_SECONDS", "3", ""),
        mergen_envtable::Var::unset("T_ETCD_CA_FILE", ""),
        mergen_envtable::Var::unset("T_ETCD_CERT_FILE", ""),
        mergen_envtable::Var::unset("T_ETCD_KEY_FILE", ""),
    ];

    fn from(vars: &[(&str, &str)]) -> Result<Option<Settings>, String> {
        let get = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        Settings::from_env(&Env::new(VARS, get), "T_ETCD").map_err(|e| e.to_string())
    }

    #[test]
    fn tls_settings_from_the_environment() {
        let dir = mergen_testkit::TempDir::new("cluster-settings");
        let ca = mergen_testkit::pki::TestCa::new(dir.path(), "unit");
        let client = ca.client("host", "host");
        let (ca_file, cert, key) = (
            ca.ca_file.to_str().unwrap(),
            client.cert.to_str().unwrap(),
            client.key.to_str().unwrap(),
        );
        let https = ("T_ETCD_ENDPOINTS", "https://10.0.0.1:2379");

        assert_eq!(from(&[]).unwrap(), None);
        let plain = from(&[("T_ETCD_ENDPOINTS", "10.0.0.1:2379")])
            .unwrap()
            .unwrap();
        assert_eq!(plain.tls, None);

        // https with neither CA nor certificate: the system's CAs, no client certificate.
        let tls = from(&[https]).unwrap().unwrap().tls.unwrap();
        assert_eq!((tls.ca, tls.identity), (None, None));

        let s = from(&[
            https,
            ("T_ETCD_CA_FILE", ca_file),
            ("T_ETCD_CERT_FILE", cert),
            ("T_ETCD_KEY_FILE", key),
        ])
        .unwrap()
        .unwrap();
        let tls = s.tls.as_ref().unwrap();
        assert_eq!(tls.ca.as_ref().unwrap().path, ca.ca_file);
        assert_eq!(tls.identity.as_ref().unwrap().1.path, client.key);
        // Settings are logged with `{:?}`: paths, never a key.
        let shown = format!("{s:?}");
        assert!(
            shown.contains(key) && !shown.contains("PRIVATE KEY"),
            "{shown}"
        );

        // Each refusal names the variable to fix.
        for (vars, name) in [
            (
                vec![https, ("T_ETCD_CA_FILE", "/nonexistent.pem")],
                "T_ETCD_CA_FILE",
            ),
            // A key is no CA, a certificate is no key.
            (vec![https, ("T_ETCD_CA_FILE", key)], "T_ETCD_CA_FILE"),
            (
                vec![https, ("T_ETCD_CERT_FILE", cert), ("T_ETCD_KEY_FILE", cert)],
                "T_ETCD_KEY_FILE",
            ),
            (vec![https, ("T_ETCD_CERT_FILE", cert)], "T_ETCD_KEY_FILE"),
            (vec![https, ("T_ETCD_KEY_FILE", key)], "T_ETCD_CERT_FILE"),
            // TLS files with plain endpoints: never silently in clear.
            (
                vec![("T_ETCD_ENDPOINTS", "h:2379"), ("T_ETCD_CA_FILE", ca_file)],
                "T_ETCD_CA_FILE",
            ),
            (
                vec![("T_ETCD_ENDPOINTS", "https://a:1,http://b:2")],
                "T_ETCD_ENDPOINTS",
            ),
        ] {
            let err = from(&vars).unwrap_err();
            assert!(err.starts_with(name), "{vars:?}: {err}");
        }
    }
}
