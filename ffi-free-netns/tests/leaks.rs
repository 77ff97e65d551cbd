//! Its own test binary with a single test, so no other test's threads or fds move the
//! counts: 1,000 namespaces come and go, some with pool workers that see their namespace
//! deleted, and afterwards the process has exactly the fds and threads it started with.

mod common;

use std::time::Duration;

use common::{count_entries, NsGuard};
use ffi_free_netns::{Family, PoolConfig, SocketPool};
use mergen_testkit::{eventually, require_root};

const NAMESPACES: usize = 1000;
/// Every this many namespaces, a pool worker is started inside before deletion.
const POOLED_EVERY: usize = 10;

#[test]
fn thousand_namespaces_leak_no_fds_or_threads() {
    require_root!();
    let fds_before = count_entries("/proc/self/fd");
    let tasks_before = count_entries("/proc/self/task");
    let pool = SocketPool::new(PoolConfig {
        depth: 4,
        idle_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    });

    // An idle worker retires by itself while its namespace lives on.
    {
        let (guard, ns) = NsGuard::create();
        drop(ns);
        drop(pool.take(&guard.0, Family::V4).unwrap());
        assert!(
            eventually(Duration::from_secs(10), || count_entries("/proc/self/task")
                == tasks_before),
            "idle worker did not retire"
        );
    }

    for i in 0..NAMESPACES {
        let (guard, ns) = NsGuard::create();
        drop(ns);
        if i % POOLED_EVERY == 0 {
            drop(pool.take(&guard.0, Family::V4).unwrap());
            ffi_free_netns::delete(&guard.0).unwrap();
            let mut error = None;
            let failed = eventually(Duration::from_secs(10), || {
                pool.take(&guard.0, Family::V4)
                    .map_err(|e| error = Some(e))
                    .is_err()
            });
            assert!(
                failed,
                "takes kept succeeding after {} was deleted",
                guard.0
            );
            let error = error.unwrap().to_string();
            assert!(
                error.contains(&guard.0),
                "error does not name the namespace: {error}"
            );
        }
    }
    drop(pool);

    let mut now = (0, 0);
    let settled = eventually(Duration::from_secs(20), || {
        now = (
            count_entries("/proc/self/fd"),
            count_entries("/proc/self/task"),
        );
        now == (fds_before, tasks_before)
    });
    assert!(
        settled,
        "fds/threads before {:?}, after {now:?}",
        (fds_before, tasks_before)
    );
    let leftovers: Vec<String> = ffi_free_netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("fn-{}-", std::process::id())))
        .collect();
    assert!(
        leftovers.is_empty(),
        "namespaces left behind: {leftovers:?}"
    );
}
