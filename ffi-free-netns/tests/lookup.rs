//! Its own test binary with a single test, because it sets FWD_NETNS_ROOT for the whole
//! process: the lookup order is FWD_NETNS_ROOT, then /run/netns, then /var/run/netns.

mod common;

use common::NsGuard;
use ffi_free_netns::{Family, PoolConfig, SocketPool};
use mergen_testkit::{require_root, TempDir};

#[test]
fn fwd_netns_root_is_searched_first() {
    require_root!();
    let (guard, created) = NsGuard::create();
    let dir = TempDir::new("fn-root");
    // In the custom root, the same name points at this process's own namespace instead.
    let own = format!("/proc/{}/ns/net", std::process::id());
    std::os::unix::fs::symlink(&own, dir.join(&guard.0)).unwrap();
    let only_custom = format!("{}-c", guard.0);
    std::os::unix::fs::symlink(&own, dir.join(&only_custom)).unwrap();
    let ino = |f: &ffi_free_netns::Netns| rustix::fs::fstat(f).unwrap().st_ino;
    let own_ino = rustix::fs::stat(own.as_str()).unwrap().st_ino;

    std::env::set_var("FWD_NETNS_ROOT", dir.path());
    let shadowed = ffi_free_netns::open(&guard.0).unwrap();
    assert_eq!(shadowed.path(), dir.join(&guard.0));
    assert_eq!(ino(&shadowed), own_ino);
    assert_ne!(ino(&created), own_ino);
    let listed = ffi_free_netns::list().unwrap();
    assert!(
        listed.contains(&only_custom) && listed.contains(&guard.0),
        "{listed:?}"
    );
    let pool = SocketPool::new(PoolConfig::default());
    pool.prewarm(&only_custom).unwrap();
    drop(pool.take(&only_custom, Family::V4).unwrap());
    pool.forget(&only_custom);

    std::env::remove_var("FWD_NETNS_ROOT");
    let plain = ffi_free_netns::open(&guard.0).unwrap();
    assert_eq!(ino(&plain), ino(&created));
    assert!(!ffi_free_netns::exists(&only_custom));
}
