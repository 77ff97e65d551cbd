//! Keeps the namespace socket pools ahead of the data path: a VM that appears gets its
//! pool started before its first connection, so that connection finds a socket ready
//! instead of parking its dial until the pool's new thread has made one; a VM that
//! disappears has its pool stopped at once. The resolver tells this thread about every
//! new routing table; it sleeps otherwise.
//!
//! VMs present at startup are left to start their pools on first use (the first dial
//! parks briefly, the worker thread never waits): prewarming thousands at once would
//! start as many threads for VMs that may see no traffic.

use std::collections::HashSet;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use ffi_free_netns::SocketPool;

use crate::resolver::{Namespace, Snapshot};

/// Follow `snapshots` from a thread of its own, starting from `initial`; the thread
/// ends when the resolver goes.
pub fn spawn(
    pool: SocketPool,
    initial: &Snapshot,
    snapshots: Receiver<Arc<Snapshot>>,
) -> std::io::Result<()> {
    let known = namespaces(initial);
    std::thread::Builder::new()
        .name("fwd-prewarm".into())
        .spawn(move || run(&pool, known, &snapshots))?;
    Ok(())
}

fn run(pool: &SocketPool, mut known: HashSet<Arc<str>>, snapshots: &Receiver<Arc<Snapshot>>) {
    while let Ok(mut snapshot) = snapshots.recv() {
        // A burst of changes: only the latest table matters.
        while let Ok(newer) = snapshots.try_recv() {
            snapshot = newer;
        }
        let now = namespaces(&snapshot);
        for ns in now.difference(&known) {
            if let Err(e) = pool.prewarm(ns) {
                log::debug!("cannot prewarm sockets for namespace {ns}: {e}");
            }
        }
        for ns in known.difference(&now) {
            pool.forget(ns);
        }
        known = now;
    }
}

/// The namespace files of the VMs in `snapshot`: their socket pools' keys.
fn namespaces(snapshot: &Snapshot) -> HashSet<Arc<str>> {
    snapshot
        .routes()
        .iter()
        .filter_map(|r| match &r.netns {
            Namespace::File(key) => Some(Arc::clone(key)),
            Namespace::Host | Namespace::Invalid(_) => None,
        })
        .collect()
}
