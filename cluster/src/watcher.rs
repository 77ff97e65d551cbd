//! The forwarder's side: every host's routes, followed with one watch.
//!
//! The watcher reads the whole prefix once, then watches it from the next revision.
//! After a disconnect it resumes from the last revision it saw, so nothing is missed
//! and nothing is read twice; when that revision was compacted away (etcd no longer
//! has the events), it reads everything again. A watch that goes quiet is asked for
//! its progress; one that does not answer within the timeout is given up and made
//! again. While etcd cannot be reached the last view stays in place: the routes are
//! stale but still served, and [`WatchStatus`] says so.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};

use crate::{with_causes, ClusterError, Etcd, HostRecord, Key, Keys, Settings, VmRecord};

/// Largest answer the first read may get (gRPC's default, 4 MiB, is about 10,000 VMs).
const MAX_READ: usize = 256 << 20;

/// What etcd says the cluster has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// The revision this view is complete up to.
    pub revision: i64,
    pub hosts: BTreeMap<String, HostRecord>,
    pub vms: BTreeMap<String, VmRecord>,
}

impl ClusterView {
    /// Apply one key's new value (`None`: deleted). Returns whether anything changed.
    fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<&[u8]>) -> bool {
        let Some(key) = std::str::from_utf8(key).ok().and_then(|k| keys.parse(k)) else {
            return false;
        };
        match (key, value) {
            (Key::Host(name), Some(v)) => match serde_json::from_slice::<HostRecord>(v) {
                Ok(h) => self.hosts.insert(name.to_string(), h.clone()) != Some(h),
                Err(e) => {
                    log::warn!(host = name, error:% = e; "unreadable host record in etcd skipped");
                    self.hosts.remove(name).is_some()
                }
            },
            (Key::Host(name), None) => self.hosts.remove(name).is_some(),
            (Key::Vm(id), Some(v)) => match serde_json::from_slice::<VmRecord>(v) {
                Ok(r) => self.vms.insert(id.to_string(), r.clone()) != Some(r),
                Err(e) => {
                    log::warn!(id = id, error:% = e; "unreadable VM record in etcd skipped");
                    self.vms.remove(id).is_some()
                }
            },
            (Key::Vm(id), None) => self.vms.remove(id).is_some(),
            // Claims are mergend's business: routes carry the aliases they won.
            (Key::Alias(_), _) => false,
        }
    }

    fn from_kvs(keys: &Keys, revision: i64, kvs: &[KeyValue]) -> ClusterView {
        let mut view = ClusterView {
            revision,
            ..ClusterView::default()
        };
        for kv in kvs {
            view.apply(keys, kv.key(), Some(kv.value()));
        }
        view
    }
}

/// How the watch is doing, for `/metrics` and `/healthz`.
#[derive(Debug)]
pub struct WatchStatus {
    connected: AtomicBool,
    revision: AtomicI64,
    resyncs: AtomicU64,
    disconnects: AtomicU64,
    /// Since when the view may be behind etcd (`None`: watching).
    stale_since: Mutex<Option<Instant>>,
    /// How precisely the current outage has been logged (`outage_level`; 0: not yet).
    outage_said: AtomicU8,
}

impl WatchStatus {
    fn new() -> WatchStatus {
        WatchStatus {
            connected: AtomicBool::new(false),
            revision: AtomicI64::new(0),
            resyncs: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            stale_since: Mutex::new(Some(Instant::now())),
            outage_said: AtomicU8::new(0),
        }
    }

    /// Whether the watch is up and heard from within the timeout.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// The revision the routes are complete up to.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }
    /// Full reads of the prefix (the first one included).
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }
    /// Times the watch was lost.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }
    /// How long the routes may have been behind etcd; `None` while watching.
    pub fn stale_for(&self) -> Option<Duration> {
        self.stale_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|s| s.elapsed())
    }

    fn up(&self) {
        self.connected.store(true, Ordering::Relaxed);
        self.outage_said.store(0, Ordering::Relaxed);
        *self.stale_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Said once per outage (once more when the first reason was only a timeout): when
    /// a live watch is lost, and when etcd has not answered since start-up (a forwarder
    /// started during an outage would otherwise be silent).
    fn down(&self, why: &str) {
        let was_up = self.connected.swap(false, Ordering::Relaxed);
        if was_up {
            self.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.stale_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
        let level = crate::outage_level(why);
        if self.outage_said.fetch_max(level, Ordering::Relaxed) >= level {
            return;
        }
        if was_up {
            log::warn!(reason = why; "etcd watch lost: serving the last known remote routes");
        } else if self.resyncs.load(Ordering::Relaxed) == 0 {
            log::warn!(reason = why; "etcd unreachable: no remote routes until it answers");
        } else {
            log::warn!(reason = why; "etcd unreachable: serving the last known remote routes");
        }
    }
}

/// A running watch; dropping it stops it.
pub struct RouteWatch {
    status: Arc<WatchStatus>,
    task: tokio::task::JoinHandle<()>,
    _etcd: Etcd,
}

/// Called with the whole view after every change, on the watcher's thread.
pub type OnChange = Box<dyn FnMut(&ClusterView) + Send>;

impl RouteWatch {
    /// Start watching; returns at once (an etcd that is down is retried).
    pub fn start(settings: &Settings, on_change: OnChange) -> Result<RouteWatch, ClusterError> {
        let etcd = Etcd::connect(settings, "fwd-etcd")?;
        let status = Arc::new(WatchStatus::new());
        let task = etcd.runtime().spawn(watch(
            etcd.client.clone(),
            settings.keys(),
            settings.timeout,
            Arc::clone(&status),
            on_change,
        ));
        Ok(RouteWatch {
            status,
            task,
            _etcd: etcd,
        })
    }

    pub fn status(&self) -> Arc<WatchStatus> {
        Arc::clone(&self.status)
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a watch ended.
enum End {
    /// Lost (etcd gone, silent, or the watch cancelled): watch again from where it was.
    Lost(String),
    /// The next revision was compacted away: read everything again.
    Compacted,
}

async fn watch(
    client: Client,
    keys: Keys,
    timeout: Duration,
    status: Arc<WatchStatus>,
    mut on_change: OnChange,
) {
    let mut view: Option<ClusterView> = None;
    let mut backoff = Duration::from_millis(100);
    let max_backoff = timeout.max(Duration::from_millis(200));
    loop {
        let current = match view.take() {
            Some(v) => v,
            None => match read_all(&client, &keys, timeout).await {
                Ok(v) => {
                    status.resyncs.fetch_add(1, Ordering::Relaxed);
                    status.revision.store(v.revision, Ordering::Relaxed);
                    on_change(&v);
                    log::info!(revision = v.revision, hosts = v.hosts.len(), vms = v.vms.len(); "read the cluster's routes from etcd");
                    v
                }
                Err(e) => {
                    status.down(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                    continue;
                }
            },
        };
        let mut current = current;
        match follow(
            &client,
            &keys,
            timeout,
            &status,
            &mut current,
            &mut on_change,
        )
        .await
        {
            End::Compacted => {
                log::warn!(revision = current.revision; "etcd compacted past the watch: reading everything again");
                status.down("compacted");
                // `view` stays None: the next turn reads everything.
                backoff = Duration::from_millis(100);
            }
            End::Lost(why) => {
                status.down(&why);
                let heard = status.revision() >= current.revision;
                view = Some(current);
                if heard {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
    }
}

async fn read_all(client: &Client, keys: &Keys, timeout: Duration) -> Result<ClusterView, String> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_READ);
    let get = kv.get(keys.all(), Some(GetOptions::new().with_prefix()));
    let resp = match tokio::time::timeout(timeout, get).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(with_causes(&e)),
        Err(_) => return Err(format!("no answer within {timeout:?}")),
    };
    let revision = resp.header().map_or(0, |h| h.revision());
    Ok(ClusterView::from_kvs(keys, revision, resp.kvs()))
}

/// Watch from `view.revision + 1`, applying events to `view`, until the watch ends.
async fn follow(
    client: &Client,
    keys: &Keys,
    timeout: Duration,
    status: &WatchStatus,
    view: &mut ClusterView,
    on_change: &mut OnChange,
) -> End {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(view.revision + 1)
        .with_progress_notify();
    let mut watch_client = client.watch_client();
    let made = tokio::time::timeout(timeout, watch_client.watch(keys.all(), Some(options))).await;
    let mut stream = match made {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return End::Lost(with_causes(&e)),
        Err(_) => return End::Lost(format!("no watch within {timeout:?}")),
    };
    let mut asked_progress = false;
    loop {
        let next = tokio::time::timeout(timeout, stream.message()).await;
        let resp = match next {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return End::Lost("the watch stream ended".into()),
            Ok(Err(e)) => return End::Lost(with_causes(&e)),
            // Quiet for a whole timeout: ask for progress; quiet again, give up.
            Err(_) if !asked_progress => {
                asked_progress = true;
                if let Err(e) = stream.request_progress().await {
                    return End::Lost(with_causes(&e));
                }
                continue;
            }
            Err(_) => return End::Lost(format!("no answer from etcd within {timeout:?}")),
        };
        asked_progress = false;
        if resp.compact_revision() > 0 {
            return End::Compacted;
        }
        if resp.canceled() {
            return End::Lost(format!("watch cancelled: {}", resp.cancel_reason()));
        }
        status.up();
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let value = match event.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            changed |= view.apply(keys, kv.key(), value);
            view.revision = view.revision.max(kv.mod_revision());
        }
        if resp.events().is_empty() && !resp.created() {
            // A progress answer: every event up to its revision was delivered.
            if let Some(h) = resp.header() {
                view.revision = view.revision.max(h.revision());
            }
        }
        status.revision.store(view.revision, Ordering::Relaxed);
        if changed {
            on_change(view);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, host: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "id": id, "host": host, "addr": "10.0.0.1", "aliases": [id],
            "createdAt": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    #[test]
    fn events_apply_by_key() {
        let keys = Keys::new("/m");
        let mut v = ClusterView::default();
        assert!(v.apply(&keys, b"/m/v1/vms/x", Some(&vm("x", "a"))));
        assert!(
            !v.apply(&keys, b"/m/v1/vms/x", Some(&vm("x", "a"))),
            "same value"
        );
        assert!(v.apply(&keys, b"/m/v1/vms/x", Some(&vm("x", "b"))));
        assert_eq!(v.vms["x"].host, "b");
        assert!(v.apply(
            &keys,
            b"/m/v1/hosts/a",
            Some(br#"{"name":"a","addr":"10.0.0.1"}"#)
        ));
        assert!(!v.apply(&keys, b"/m/v1/aliases/x", Some(b"a")));
        assert!(!v.apply(&keys, b"/other/v1/vms/y", Some(&vm("y", "a"))));
        // A record that does not parse is no route.
        assert!(v.apply(&keys, b"/m/v1/vms/x", Some(b"{not json")));
        assert!(v.vms.is_empty());
        assert!(v.apply(&keys, b"/m/v1/hosts/a", None));
        assert!(!v.apply(&keys, b"/m/v1/hosts/a", None));
    }
}
