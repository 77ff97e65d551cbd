//! Keeps the namespace socket pools ahead of the data path: a VM that appears gets its
//! pool started before its first connection, so that connection finds a socket ready
//! instead of parking its dial until the pool's new thread has made one; a VM that
//! disappears has its pool stopped at once.
//!
//! VMs present at startup are left to start their pools on first use (the first dial
//! parks briefly, the worker thread never waits): prewarming thousands at once would
//! start as many threads for VMs that may see no traffic.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::resolver::netns_path;

const POLL: Duration = Duration::from_millis(50);

pub fn spawn(shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("fwd-prewarm".into())
        .spawn(move || run(&shared))?;
    Ok(())
}

fn run(shared: &Shared) {
    let mut snapshot = shared.resolver.snapshot();
    let mut known = namespaces(shared, &snapshot);
    while shared.stopping().is_none() {
        std::thread::sleep(POLL);
        let current = shared.resolver.snapshot();
        if Arc::ptr_eq(&current, &snapshot) {
            continue;
        }
        snapshot = current;
        let now = namespaces(shared, &snapshot);
        for ns in now.difference(&known) {
            if let Err(e) = shared.pool.prewarm(ns) {
                log::debug!("cannot prewarm sockets for namespace {ns}: {e}");
            }
        }
        for ns in known.difference(&now) {
            shared.pool.forget(ns);
        }
        known = now;
    }
}

/// The namespace files of the VMs in `snapshot`, as the data path names them.
fn namespaces(shared: &Shared, snapshot: &crate::resolver::Snapshot) -> HashSet<String> {
    snapshot
        .routes()
        .iter()
        .filter(|r| !r.netns.is_empty())
        .filter_map(|r| netns_path(shared.config.netns_root.as_deref(), &r.netns))
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}
