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
mod watcher;

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

pub use keys::{Key, Keys};
pub use publisher::{LocalVm, Ops, Publisher, PublisherStatus, Source};
pub use record::{HostRecord, VmRecord};
pub use watcher::{ClusterView, RouteWatch, WatchStatus};

/// How to reach etcd, and where the cluster's keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `host:port` or `http://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// The key prefix (`/mergen`): several clusters may share one etcd.
    pub prefix: String,
    /// Bound on every request (a watch is checked for life this often too).
    pub timeout: Duration,
}

impl Settings {
    pub fn keys(&self) -> Keys {
        Keys::new(&self.prefix)
    }
}

/// Parse a comma-separated endpoint list; blank items are skipped.
pub fn parse_endpoints(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bare = item
            .strip_prefix("http://")
            .or_else(|| item.strip_prefix("https://").map(|_| ""))
            .unwrap_or(item);
        if item.starts_with("https://") {
            return Err(format!(
                "{item:?}: TLS to etcd is not supported yet (use http://)"
            ));
        }
        let port_ok = bare.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || bare.contains('/') {
            return Err(format!("{item:?}: want host:port or http://host:port"));
        }
        out.push(format!("http://{bare}"));
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
        ClusterError::Unavailable(e.to_string())
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
        assert!(parse_endpoints("").unwrap().is_empty());
        for bad in [
            "10.0.0.1",
            "host:0",
            "http://h:2379/x",
            ":2379",
            "https://h:2379",
        ] {
            assert!(parse_endpoints(bad).is_err(), "{bad}");
        }
    }
}
