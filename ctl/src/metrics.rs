//! `GET /metrics` in the Prometheus text format: requests by route and status, what
//! the HTTP server did to its connections, VMs by state, hook runs and failures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use mergen_http::{Cap, RefusedRequest, ServerStats, StatsSnapshot};

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Counted by the HTTP server's event loop (`ServerConfig::stats`).
    pub http: Arc<ServerStats>,
    /// (event, hook type) -> (runs, failures)
    hooks: Mutex<BTreeMap<(String, String), (u64, u64)>>,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route, status))
            .or_default() += 1;
    }

    pub fn hook_result(&self, event: &str, kind: &str, ok: bool) {
        let mut h = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        let e = h.entry((event.to_string(), kind.to_string())).or_default();
        e.0 += 1;
        if !ok {
            e.1 += 1;
        }
    }

    /// The exposition text; `vms` counts VMs by state and `orphaned` names the data
    /// dirs under `.orphaned/`, both read at scrape time.
    pub fn render(&self, vms: &BTreeMap<&'static str, u64>, orphaned: &[String]) -> String {
        let mut s = String::new();
        s.push_str(
            "# HELP mergend_http_requests_total HTTP requests answered, by route and status.\n",
        );
        s.push_str("# TYPE mergend_http_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "mergend_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        self.render_http(&mut s);
        s.push_str("# HELP mergend_vms VMs by state.\n# TYPE mergend_vms gauge\n");
        for state in ["running", "starting", "stopped", "failed"] {
            let _ = writeln!(
                s,
                "mergend_vms{{state=\"{state}\"}} {}",
                vms.get(state).copied().unwrap_or(0)
            );
        }
        s.push_str("# HELP mergend_orphaned_data_dirs Data dirs without a VM, moved under $MGR_DATA_ROOT/.orphaned/ at start-up.\n# TYPE mergend_orphaned_data_dirs gauge\n");
        let _ = writeln!(s, "mergend_orphaned_data_dirs {}", orphaned.len());
        s.push_str("# HELP mergend_orphaned_data_dir One series per dir under $MGR_DATA_ROOT/.orphaned/.\n# TYPE mergend_orphaned_data_dir gauge\n");
        for name in orphaned {
            let _ = writeln!(
                s,
                "mergend_orphaned_data_dir{{name=\"{}\"}} 1",
                name.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        s.push_str("# HELP mergend_hook_runs_total Hooks run, by event and type.\n");
        s.push_str("# TYPE mergend_hook_runs_total counter\n");
        for ((event, kind), (runs, _)) in hooks.iter() {
            let _ = writeln!(
                s,
                "mergend_hook_runs_total{{event=\"{event}\",type=\"{kind}\"}} {runs}"
            );
        }
        s.push_str("# HELP mergend_hook_failures_total Hooks that failed, by event and type.\n");
        s.push_str("# TYPE mergend_hook_failures_total counter\n");
        for ((event, kind), (_, failures)) in hooks.iter() {
            let _ = writeln!(
                s,
                "mergend_hook_failures_total{{event=\"{event}\",type=\"{kind}\"}} {failures}"
            );
        }
        s
    }

    fn render_http(&self, s: &mut String) {
        let st = self.http.snapshot();
        s.push_str("# HELP mergend_http_connections_accepted_total Connections taken in by the API server.\n# TYPE mergend_http_connections_accepted_total counter\n");
        let _ = writeln!(s, "mergend_http_connections_accepted_total {}", st.accepted);
        s.push_str("# HELP mergend_http_connections_open Connections open now.\n# TYPE mergend_http_connections_open gauge\n");
        let _ = writeln!(s, "mergend_http_connections_open {}", st.open);
        type Count = fn(&StatsSnapshot, Cap) -> u64;
        let by_cap: [(&str, &str, Count); 2] = [
            (
                "refused",
                "Connections refused with 503, by the cap that was full (MGR_HTTP_MAX_CONNECTIONS_PER_IP, MGR_HTTP_MAX_CONNECTIONS) and no idle connection to close.",
                StatsSnapshot::refused,
            ),
            (
                "evicted",
                "Idle connections closed to make room for a new one, by the cap that was full.",
                StatsSnapshot::evicted,
            ),
        ];
        for (what, help, count) in by_cap {
            let name = format!("mergend_http_connections_{what}_total");
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for cap in Cap::ALL {
                let _ = writeln!(s, "{name}{{cap=\"{}\"}} {}", cap.label(), count(&st, cap));
            }
        }
        s.push_str("# HELP mergend_http_connections_timed_out_total Connections closed because no request began within the head or idle deadline.\n# TYPE mergend_http_connections_timed_out_total counter\n");
        let _ = writeln!(
            s,
            "mergend_http_connections_timed_out_total {}",
            st.idle_timeouts
        );
        s.push_str("# HELP mergend_http_requests_refused_total Requests the server answered itself with an error before any route (408, 413/431, 400/501).\n# TYPE mergend_http_requests_refused_total counter\n");
        for why in RefusedRequest::ALL {
            let _ = writeln!(
                s,
                "mergend_http_requests_refused_total{{reason=\"{}\"}} {}",
                why.label(),
                st.refused_requests(why)
            );
        }
    }
}

/// The cluster series of `/metrics` (`MGR_ETCD_ENDPOINTS` set).
pub fn render_cluster(s: &mut String, st: &mergen_cluster::PublisherStatus) {
    s.push_str("# HELP mergend_cluster_connected 1 while this host holds a live lease in etcd (its routes are published).\n# TYPE mergend_cluster_connected gauge\n");
    let _ = writeln!(s, "mergend_cluster_connected {}", u8::from(st.connected()));
    s.push_str("# HELP mergend_cluster_routes Routes of this host published in etcd.\n# TYPE mergend_cluster_routes gauge\n");
    let _ = writeln!(s, "mergend_cluster_routes {}", st.routes());
    s.push_str("# HELP mergend_cluster_republishes_total Times every route was published again (start-up, a new lease).\n# TYPE mergend_cluster_republishes_total counter\n");
    let _ = writeln!(s, "mergend_cluster_republishes_total {}", st.republishes());
    s.push_str("# HELP mergend_cluster_alias_conflicts Aliases of local VMs that another host holds (they answer on this host only).\n# TYPE mergend_cluster_alias_conflicts gauge\n");
    let _ = writeln!(s, "mergend_cluster_alias_conflicts {}", st.conflicts());
}
