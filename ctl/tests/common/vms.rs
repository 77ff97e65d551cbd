//! A test mergend whose VMs really run: process guests under the embedded supervisor.

use std::collections::HashMap;

use mergen_runtime::embedded::EmbeddedSupervisor;
use mergen_runtime::{steps, RuntimeConfig, Supervisor};

use super::{env_for, Roots, BIN};

/// The settings (besides the roots) of a mergend running process guests under the
/// embedded supervisor on `cidr`, a guest network of the test's own. Tests publish
/// free ports picked by the kernel (tests running in parallel must not DNAT the same
/// host port), so ports outside the range are allowed.
pub fn process_env(cidr: &str) -> [(&'static str, &str); 5] {
    [
        ("MGR_RUNTIME", "process"),
        ("MGR_SUPERVISOR", "embedded"),
        ("MGR_GUEST_CIDR", cidr),
        ("MGR_STOP_TIMEOUT_SECONDS", "5"),
        ("MGR_ALLOW_PORTS_OUTSIDE_RANGE", "1"),
    ]
}

/// Stops every VM it knows about through the runtime directly (supervisor, guest,
/// namespace, links, table), so a failing test leaves nothing running.
pub struct VmsGuard {
    config: RuntimeConfig,
    pub ids: Vec<String>,
    /// The network namespace the mergend runs in (its VMs' links and rules are there).
    pub netns: Option<String>,
}

impl VmsGuard {
    /// For the VMs of a mergend on `roots` started with the `extra` settings.
    pub fn new(roots: &Roots, extra: &[(&str, &str)]) -> VmsGuard {
        let mut lookup: HashMap<String, String> = env_for(roots).into_iter().collect();
        for (k, v) in extra {
            lookup.insert(k.to_string(), v.to_string());
        }
        lookup.insert("MGR_MERGEND_BIN".into(), BIN.into());
        VmsGuard {
            config: RuntimeConfig::from_lookup(|k| lookup.get(k).cloned()).unwrap(),
            ids: Vec::new(),
            netns: None,
        }
    }
}

impl VmsGuard {
    fn stop_all(&self) {
        let Ok(sup) = EmbeddedSupervisor::new(self.config.clone()) else {
            return;
        };
        for id in &self.ids {
            if let Ok(meta) = steps::load_meta(&self.config, id) {
                let _ = sup.stop(&meta);
            }
            let _ = steps::net_cleanup(&self.config, id);
        }
    }
}

impl Drop for VmsGuard {
    fn drop(&mut self) {
        match &self.netns {
            // Where the mergend made them; the VM namespaces are found from anywhere,
            // so they go even when that namespace cannot be entered any more.
            Some(ns) => match ffi_free_netns::open(ns) {
                Ok(host) if host.run(|| self.stop_all()).is_ok() => {}
                _ => self.stop_all(),
            },
            None => self.stop_all(),
        }
    }
}
