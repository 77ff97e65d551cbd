//! Routes of the other hosts of a cluster (`FWD_ETCD_ENDPOINTS`): the VMs their
//! mergends publish in etcd, followed with one watch ([`mergen_cluster::RouteWatch`]).
//!
//! A server name no local VM answers to, but a VM of another host does, is passed
//! through at L4: the connection is relayed unread, ClientHello included, to that
//! host's forwarder, on the port of the listener the client came in on, and the owner
//! terminates TLS as for a local client. Local routes (meta.json) always win. The table
//! is an immutable snapshot swapped whole on every change, read without locks on the
//! data path and only for names the local table does not have; a lone host (no
//! endpoints) has no table and pays nothing.
//!
//! While etcd cannot be reached the last table stays: remote VMs stay reachable at the
//! addresses last known (stale but serving), and `/metrics` and `/healthz` say so.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mergen_cluster::{ClusterError, ClusterView, RouteWatch, Settings, WatchStatus};

use crate::resolver::{sni_label, Namespace, Resolver, Route};

/// What the data path routes with: the local table, and the cluster's when there is one.
pub struct Routing {
    pub(crate) local: Arc<Resolver>,
    pub(crate) remote: Option<Arc<RemoteRoutes>>,
}

impl Routing {
    pub fn new(local: Arc<Resolver>, remote: Option<Arc<RemoteRoutes>>) -> Routing {
        Routing { local, remote }
    }

    pub fn in_cluster(&self) -> bool {
        self.remote.is_some()
    }

    /// Whether `ip` is another host of the cluster.
    pub fn is_peer(&self, ip: IpAddr) -> bool {
        self.remote.as_ref().is_some_and(|r| r.is_peer(ip))
    }
}

/// Other hosts' VMs by alias, as last read from etcd.
pub struct RemoteRoutes {
    /// This host's name: its own VMs are routed from meta.json only.
    host_name: String,
    prefix: String,
    suffix: String,
    table: ArcSwap<Table>,
}

#[derive(Default)]
struct Table {
    by_alias: HashMap<String, Arc<Route>>,
    vms: usize,
    /// Other hosts' addresses: connections from them may start with a PROXY header.
    peers: HashSet<IpAddr>,
}

impl RemoteRoutes {
    /// An empty table for a forwarder on host `host_name`, whose names are
    /// `<label>.<prefix>.<suffix>` (normalized as the resolver's).
    pub fn new(host_name: &str, prefix: &str, suffix: &str) -> RemoteRoutes {
        RemoteRoutes {
            host_name: host_name.to_string(),
            prefix: mergen_model::domain::normalize(prefix),
            suffix: mergen_model::domain::normalize(suffix),
            table: ArcSwap::from_pointee(Table::default()),
        }
    }

    /// The remote VM `sni` names, if another host has one.
    pub fn by_sni(&self, sni: &str) -> Option<Arc<Route>> {
        let label = sni_label(sni, &self.prefix, &self.suffix)?;
        self.table.load().by_alias.get(&*label).cloned()
    }

    /// Whether `ip` is the address of another host of the cluster.
    pub fn is_peer(&self, ip: IpAddr) -> bool {
        self.table.load().peers.contains(&ip.to_canonical())
    }

    /// Remote VMs known.
    pub fn len(&self) -> usize {
        self.table.load().vms
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replace the table with `view`'s VMs of other hosts. An alias two records share
    /// (etcd's claims make that a passing state at most) goes to the oldest VM, as on
    /// one host.
    pub fn update(&self, view: &ClusterView) {
        let mut records: Vec<_> = view
            .vms
            .values()
            .filter(|r| r.host != self.host_name)
            .collect();
        records.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let mut table = Table::default();
        let others = view.hosts.values().filter(|h| h.name != self.host_name);
        let addrs = others
            .map(|h| &h.addr)
            .chain(records.iter().map(|r| &r.addr));
        table.peers = addrs
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .collect();
        for r in records {
            let guest_ip = match r.addr.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => ip,
                // Peers are dialled over IPv4, as guests are.
                Ok(IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                    Some(ip) => ip,
                    None => {
                        log::warn!(id = r.id.as_str(), host = r.host.as_str(), addr = r.addr.as_str(); "remote VM skipped: its host's address is IPv6");
                        continue;
                    }
                },
                Err(_) => {
                    log::warn!(id = r.id.as_str(), host = r.host.as_str(), addr = r.addr.as_str(); "remote VM skipped: its host's address is not an IP address");
                    continue;
                }
            };
            let route = Arc::new(Route {
                id: r.id.clone(),
                guest_ip,
                netns: Namespace::Host,
                created_at: r.created_at,
                http_port: None,
            });
            for alias in &r.aliases {
                table
                    .by_alias
                    .entry(alias.to_ascii_lowercase())
                    .or_insert_with(|| Arc::clone(&route));
            }
            table.vms += 1;
        }
        self.table.store(Arc::new(table));
    }
}

/// The watch that keeps a [`RemoteRoutes`] up to date; dropping it stops the watch.
pub struct ClusterRoutes {
    routes: Arc<RemoteRoutes>,
    watch: RouteWatch,
}

impl ClusterRoutes {
    /// Start following `settings`' prefix; returns at once (an etcd that is down is
    /// retried in the background, and the table starts empty).
    pub fn start(settings: &Settings, routes: RemoteRoutes) -> Result<ClusterRoutes, ClusterError> {
        let routes = Arc::new(routes);
        let table = Arc::clone(&routes);
        let watch = RouteWatch::start(
            settings,
            Box::new(move |view: &ClusterView| {
                table.update(view);
                log::info!(revision = view.revision, remote_vms = table.len(); "remote routes updated");
            }),
        )?;
        Ok(ClusterRoutes { routes, watch })
    }

    pub fn routes(&self) -> Arc<RemoteRoutes> {
        Arc::clone(&self.routes)
    }

    pub fn status(&self) -> Arc<WatchStatus> {
        self.watch.status()
    }
}

/// What `/metrics` and `/healthz` say about the cluster.
pub struct ClusterHealth {
    pub routes: Arc<RemoteRoutes>,
    pub status: Arc<WatchStatus>,
}

impl ClusterHealth {
    /// The `mergen_forwarder_cluster_*` series.
    pub fn render(&self, s: &mut String) {
        let st = &self.status;
        s.push_str("# HELP mergen_forwarder_cluster_watch_connected 1 while the etcd watch on the cluster's routes is up.\n# TYPE mergen_forwarder_cluster_watch_connected gauge\n");
        let _ = writeln!(
            s,
            "mergen_forwarder_cluster_watch_connected {}",
            u8::from(st.connected())
        );
        s.push_str("# HELP mergen_forwarder_cluster_stale_seconds How long the remote routes may have been behind etcd (0 while watching).\n# TYPE mergen_forwarder_cluster_stale_seconds gauge\n");
        let stale = st.stale_for().map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(s, "mergen_forwarder_cluster_stale_seconds {stale:.3}");
        s.push_str("# HELP mergen_forwarder_cluster_remote_vms VMs of other hosts this forwarder passes connections through to.\n# TYPE mergen_forwarder_cluster_remote_vms gauge\n");
        let _ = writeln!(
            s,
            "mergen_forwarder_cluster_remote_vms {}",
            self.routes.len()
        );
        s.push_str("# HELP mergen_forwarder_cluster_revision The etcd revision the remote routes are complete up to.\n# TYPE mergen_forwarder_cluster_revision gauge\n");
        let _ = writeln!(s, "mergen_forwarder_cluster_revision {}", st.revision());
        s.push_str("# HELP mergen_forwarder_cluster_resyncs_total Full reads of the cluster's routes (the first one included).\n# TYPE mergen_forwarder_cluster_resyncs_total counter\n");
        let _ = writeln!(s, "mergen_forwarder_cluster_resyncs_total {}", st.resyncs());
        s.push_str("# HELP mergen_forwarder_cluster_watch_lost_total Times the etcd watch was lost.\n# TYPE mergen_forwarder_cluster_watch_lost_total counter\n");
        let _ = writeln!(
            s,
            "mergen_forwarder_cluster_watch_lost_total {}",
            st.disconnects()
        );
    }

    /// The `cluster` member of `/healthz`. The forwarder stays healthy while etcd is
    /// away: it serves local VMs and the last known remote ones.
    pub fn json(&self) -> serde_json::Value {
        let st = &self.status;
        serde_json::json!({
            "watch": if st.connected() { "up" } else { "down" },
            "staleSeconds": st.stale_for().map(|d| d.as_secs()),
            "remoteVms": self.routes.len(),
            "revision": st.revision(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mergen_cluster::VmRecord;
    use std::net::Ipv4Addr;

    fn record(id: &str, host: &str, addr: &str, aliases: &[&str], created: i64) -> VmRecord {
        VmRecord {
            id: id.into(),
            host: host.into(),
            addr: addr.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            created_at: time::OffsetDateTime::from_unix_timestamp(created).unwrap(),
        }
    }

    fn view(records: &[VmRecord]) -> ClusterView {
        let hosts = [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("d", "10.0.0.4")];
        ClusterView {
            revision: 7,
            hosts: hosts
                .iter()
                .map(|(name, addr)| {
                    let h = mergen_cluster::HostRecord {
                        name: name.to_string(),
                        addr: addr.to_string(),
                    };
                    (name.to_string(), h)
                })
                .collect(),
            vms: records.iter().map(|r| (r.id.clone(), r.clone())).collect(),
        }
    }

    #[test]
    fn other_hosts_vms_by_alias() {
        let t = RemoteRoutes::new("a", "", "Example.COM.");
        t.update(&view(&[
            record("v1", "b", "10.0.0.2", &["app1", "v1"], 10),
            record("v2", "a", "10.0.0.1", &["mine"], 10),
            record("v3", "c", "::ffff:10.0.0.3", &["app3"], 10),
            record("v4", "c", "2001:db8::3", &["six"], 10),
            record("v5", "c", "not-an-ip", &["bad"], 10),
        ]));
        assert_eq!(t.len(), 2);
        let r = t.by_sni("APP1.example.com.").expect("routed");
        assert_eq!(
            (r.id.as_str(), r.guest_ip),
            ("v1", Ipv4Addr::new(10, 0, 0, 2))
        );
        assert_eq!(r.netns, Namespace::Host);
        assert_eq!(t.by_sni("v1.example.com").unwrap().id, "v1");
        assert_eq!(
            t.by_sni("app3.example.com").unwrap().guest_ip,
            Ipv4Addr::new(10, 0, 0, 3)
        );
        // This host's own VM, an IPv6-only host, a bad address: no remote route.
        for name in ["mine", "six", "bad"] {
            assert!(t.by_sni(&format!("{name}.example.com")).is_none(), "{name}");
        }
        // Not under the suffix, or one label too many.
        assert!(t.by_sni("app1.example.org").is_none());
        assert!(t.by_sni("x.app1.example.com").is_none());
        // Other hosts, with VMs or without, are peers; this host is not.
        for (ip, peer) in [
            ("10.0.0.2", true),
            ("10.0.0.3", true),
            ("::ffff:10.0.0.4", true),
            ("10.0.0.1", false),
            ("10.0.0.9", false),
        ] {
            assert_eq!(t.is_peer(ip.parse().unwrap()), peer, "{ip}");
        }
        // A new view replaces the old one whole.
        t.update(&view(&[]));
        assert!(t.by_sni("app1.example.com").is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn a_shared_alias_goes_to_the_oldest_vm() {
        let t = RemoteRoutes::new("a", "apps", "example.com");
        t.update(&view(&[
            record("young", "b", "10.0.0.2", &["app"], 20),
            record("old", "c", "10.0.0.3", &["app"], 10),
        ]));
        assert_eq!(t.by_sni("app.apps.example.com").unwrap().id, "old");
        assert!(
            t.by_sni("app.example.com").is_none(),
            "the prefix is required"
        );
    }
}
