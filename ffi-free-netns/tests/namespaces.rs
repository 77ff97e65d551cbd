//! Named namespaces against the real kernel and iproute2.

mod common;

use std::process::Command;

use common::NsGuard;
use ffi_free_netns::Error;
use mergen_testkit::require_root;

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("run ip")
}

#[test]
fn create_list_delete_round_trip_seen_by_iproute2() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let name = guard.0.clone();
    assert_eq!(ns.name(), name);
    assert_eq!(ns.path(), std::path::Path::new("/run/netns").join(&name));
    assert!(ffi_free_netns::list().unwrap().contains(&name));
    assert!(ffi_free_netns::exists(&name));

    let listed = String::from_utf8(ip(&["netns", "list"]).stdout).unwrap();
    assert!(
        listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str())),
        "ip netns list does not show {name}: {listed}"
    );
    let exec = ip(&["netns", "exec", &name, "true"]);
    assert!(exec.status.success(), "ip netns exec failed: {exec:?}");
    let lo = String::from_utf8(ip(&["-n", &name, "-o", "link", "show", "lo"]).stdout).unwrap();
    assert!(lo.contains("<LOOPBACK,UP"), "lo is not up in {name}: {lo}");

    let again = ffi_free_netns::create(&name).unwrap_err();
    assert!(again.to_string().contains(&name), "{again}");

    drop(ns);
    ffi_free_netns::delete(&name).unwrap();
    assert!(!ffi_free_netns::list().unwrap().contains(&name));
    assert!(!ffi_free_netns::exists(&name));
    let listed = String::from_utf8(ip(&["netns", "list"]).stdout).unwrap();
    assert!(!listed
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name.as_str())));
    // Idempotent.
    ffi_free_netns::delete(&name).unwrap();
    drop(guard);
}

#[test]
fn namespaces_made_by_ip_netns_add_open_and_delete() {
    require_root!();
    let guard = NsGuard(common::unique_name());
    assert!(ip(&["netns", "add", &guard.0]).status.success());
    let ns = ffi_free_netns::open(&guard.0).unwrap();
    assert_eq!(ns.name(), guard.0);
    let by_path = ffi_free_netns::open_path(ns.path()).unwrap();
    assert_eq!(by_path.path(), ns.path());
    ffi_free_netns::delete(&guard.0).unwrap();
    let listed = String::from_utf8(ip(&["netns", "list"]).stdout).unwrap();
    assert!(!listed.contains(&guard.0));
}

#[test]
fn bad_names_and_missing_namespaces_are_clear_errors() {
    for bad in ["", ".", "..", "a/b", "nul\0byte"] {
        match ffi_free_netns::create(bad) {
            Err(Error::InvalidInput(msg)) => assert!(msg.contains("name"), "{msg}"),
            other => panic!("create({bad:?}) gave {other:?}"),
        }
        assert!(ffi_free_netns::delete(bad).is_err());
        assert!(ffi_free_netns::open(bad).is_err());
    }
    let missing = common::unique_name();
    match ffi_free_netns::open(&missing) {
        Err(e @ Error::NotFound(_)) => assert!(e.to_string().contains(&missing), "{e}"),
        other => panic!("open of a missing namespace gave {other:?}"),
    }
    assert!(!ffi_free_netns::exists(&missing));
    let not_ns = ffi_free_netns::open_path(std::path::Path::new("/proc/self/status"));
    assert!(matches!(not_ns, Err(Error::InvalidInput(_))), "{not_ns:?}");
}

#[test]
fn run_enters_the_namespace_and_leaves_the_caller_alone() {
    require_root!();
    let (_guard, ns) = NsGuard::create();
    let ino = |p: &str| rustix::fs::stat(p).unwrap().st_ino;
    let before = ino("/proc/thread-self/ns/net");
    let inside = ns.run(|| ino("/proc/thread-self/ns/net")).unwrap();
    assert_eq!(inside, rustix::fs::fstat(&ns).unwrap().st_ino);
    assert_ne!(inside, before);
    assert_eq!(ino("/proc/thread-self/ns/net"), before);
    let here = ffi_free_netns::Netns::current_thread().unwrap();
    assert_eq!(rustix::fs::fstat(&here).unwrap().st_ino, before);
}
