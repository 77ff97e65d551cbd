//! First connections to a VM whose namespace socket pool is cold (the VM was there
//! when the forwarder started, so nothing prewarmed it): the worker parks the dial
//! instead of waiting for the pool's thread, and resumes it when the pool signals.

mod common;

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use mergen_testkit::eventually;

/// Debug log line of a dial that found its namespace's pool empty.
const PARKED: &str = "waiting for a socket from its namespace";

/// Whether a dial parked: its line is written by the forwarder's log thread, which may
/// come to it after the client already has its answer.
fn parked(fwd: &Forwarder) -> bool {
    eventually(Duration::from_secs(10), || fwd.log().contains(PARKED))
}

#[test]
fn first_connection_to_a_cold_namespace_succeeds() {
    require_root!();
    let ns = Ns::new();
    let _web = Nginx::start(&ns, 443, "cold-start");
    let fwd = Forwarder::start_with(&[443], &[("FWD_LOG_LEVEL", "debug")], |root| {
        write_app_vm(root, &ns, "cold");
    });
    let (code, body) = curl("cold.localhost", fwd.ports[0]);
    assert_eq!(
        (code.as_str(), body.trim()),
        ("200", "cold-start"),
        "{}",
        fwd.log()
    );
    assert!(parked(&fwd), "the dial never parked:\n{}", fwd.log());
}

#[test]
fn many_concurrent_first_connections_to_a_cold_namespace_all_succeed() {
    require_root!();
    const CLIENTS: usize = 32;
    let ns = Ns::new();
    let _web = Nginx::start(&ns, 443, "cold-crowd");
    let fwd = Forwarder::start_with(&[443], &[("FWD_LOG_LEVEL", "debug")], |root| {
        write_app_vm(root, &ns, "crowd");
    });
    let port = fwd.ports[0];
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                curl("crowd.localhost", port)
            })
        })
        .collect();
    for client in clients {
        let (code, body) = client.join().expect("client thread");
        assert_eq!(
            (code.as_str(), body.trim()),
            ("200", "cold-crowd"),
            "{}",
            fwd.log()
        );
    }
    assert!(parked(&fwd), "no dial parked:\n{}", fwd.log());
}

#[test]
fn a_namespace_missing_at_start_gives_502() {
    require_root!();
    let ns = Ns::new();
    let fwd = Forwarder::start_with(&[443], &[], |root| {
        write_app_vm(root, &ns, "gone");
    });
    // The namespace vanishes before any connection: the dial fails, the client gets 502.
    drop(ns);
    let found = poll(Duration::from_secs(5), || {
        let (code, body) = curl("gone.localhost", fwd.ports[0]);
        (code != "000").then_some((code, body))
    });
    let (code, body) = found.expect("curl never got an answer");
    assert_eq!(code, "502", "body: {body}\n{}", fwd.log());
}

#[test]
fn raw_first_connections_to_a_cold_namespace_succeed() {
    require_root!();
    const CLIENTS: usize = 8;
    let ns = Ns::new();
    // Plain HTTP behind the raw listener (guest port 22): the forwarder copies bytes.
    let _web = Nginx::start(&ns, 22, "raw-cold");
    let fwd = Forwarder::start_with(&[22], &[("FWD_LOG_LEVEL", "debug")], |root| {
        write_untagged_vm(root, &ns, "2025-01-01T00:00:00Z");
    });
    let url = format!("http://127.0.0.1:{}/", fwd.ports[0]);
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (start, url) = (Arc::clone(&start), url.clone());
            std::thread::spawn(move || {
                start.wait();
                run(Command::new("curl").args(["-s", "--max-time", "5", &url]))
            })
        })
        .collect();
    for client in clients {
        let out = client.join().expect("client thread");
        let body = String::from_utf8_lossy(&out.stdout);
        assert_eq!(body.trim(), "raw-cold", "{}", fwd.log());
    }
    assert!(parked(&fwd), "no dial parked:\n{}", fwd.log());
}
