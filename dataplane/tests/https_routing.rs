//! SNI routing on the HTTPS listener, with nginx in real namespaces and curl/openssl
//! as clients.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn routes_two_vms(test: &str, env: &[(&str, &str)], domain: &str) {
    require_root!(test);
    let (ns1, ns2) = (Ns::new(), Ns::new());
    let _web1 = Nginx::start(&ns1, 443, "content-of-vm-one");
    let _web2 = Nginx::start(&ns2, 443, "content-of-vm-two");
    let fwd = Forwarder::start(&[443], env);
    let (id1, id2) = (vm_id(), vm_id());
    write_vm(
        &fwd.config_root(),
        &id1,
        "2025-01-01T00:00:00Z",
        &ns1,
        &[("app", "app1")],
    );
    write_vm(
        &fwd.config_root(),
        &id2,
        "2025-01-02T00:00:00Z",
        &ns2,
        &[("app", "app2")],
    );
    let port = fwd.ports[0];
    let host = |label: &str| format!("{label}.{domain}");

    // The resolver follows the directory: wait until the second VM is routable.
    let routed = poll(Duration::from_secs(5), || {
        (curl(&host("app2"), port).0 == "200").then_some(())
    });
    assert!(
        routed.is_some(),
        "app2 never became routable: {}",
        fwd.log()
    );

    for (label, want) in [
        ("app1".to_string(), "content-of-vm-one"),
        ("app2".to_string(), "content-of-vm-two"),
        (id1[..8].to_string(), "content-of-vm-one"),
        (id2[..8].to_string(), "content-of-vm-two"),
        (id1.clone(), "content-of-vm-one"),
    ] {
        let (code, body) = curl(&host(&label), port);
        assert_eq!(code, "200", "{label}: {body}");
        assert_eq!(body.trim(), want, "{label} reached the wrong VM");
    }
}

#[test]
fn two_vms_by_alias_and_id() {
    routes_two_vms("two_vms_by_alias_and_id", &[], "localhost");
}

#[test]
fn two_vms_with_prefix_and_suffix() {
    routes_two_vms(
        "two_vms_with_prefix_and_suffix",
        &[
            ("FWD_DOMAIN_PREFIX", "vm"),
            ("FWD_DOMAIN_SUFFIX", "example.com"),
        ],
        "vm.example.com",
    );
}

/// `openssl s_client` output for a connection with the given server name (or none).
fn s_client(port: u16, servername: Option<&str>) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    match servername {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    let out = run(cmd.stdin(std::process::Stdio::null()));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn unknown_and_missing_sni_get_an_alert_without_handshake() {
    require_root!();
    let ns = Ns::new();
    let fwd = Forwarder::start(&[443], &[]);
    write_app_vm(&fwd.config_root(), &ns, "app1");
    let port = fwd.ports[0];

    for name in [Some("nope.localhost"), Some("app1.otherdomain.test"), None] {
        let out = s_client(port, name);
        assert!(
            out.contains("unrecognized name") && out.contains("alert number 112"),
            "{name:?}: expected an unrecognized_name alert:\n{out}"
        );
        // No certificate was sent: the refusal came before any handshake crypto.
        assert!(
            out.contains("no peer certificate available"),
            "{name:?}:\n{out}"
        );
    }
    assert_eq!(
        fwd.metric(r#"mergen_forwarder_handshake_failures_total{reason="unknown_sni"}"#),
        2.0
    );
    assert_eq!(
        fwd.metric(r#"mergen_forwarder_handshake_failures_total{reason="no_sni"}"#),
        1.0
    );
    let listener = format!("127.0.0.1:{port}");
    let closed = poll(Duration::from_secs(5), || {
        let n = fwd.metric(&format!(
            r#"mergen_forwarder_connections_total{{listener="{listener}",outcome="unknown_sni"}}"#
        ));
        (n == 2.0).then_some(())
    });
    assert!(closed.is_some(), "metrics:\n{}", fwd.metrics());
}

#[test]
fn backend_down_gives_502() {
    require_root!();
    let ns = Ns::new(); // no server listens in it
    let fwd = Forwarder::start(&[443], &[]);
    write_app_vm(&fwd.config_root(), &ns, "down");
    let found = poll(Duration::from_secs(5), || {
        let (code, body) = curl("down.localhost", fwd.ports[0]);
        (code != "000").then_some((code, body))
    });
    let (code, body) = found.expect("curl never got an answer");
    assert_eq!(code, "502", "body: {body}\n{}", fwd.log());
    assert!(body.contains("Bad Gateway"), "{body}");
}

#[test]
fn vm_added_after_start_is_reachable_within_one_second() {
    require_root!();
    let fwd = Forwarder::start(&[443], &[]);
    let ns = Ns::new();
    let _web = Nginx::start(&ns, 443, "late-vm");
    let port = fwd.ports[0];
    assert_eq!(
        curl("late.localhost", port).0,
        "000",
        "routed before it existed"
    );

    let written = Instant::now();
    write_app_vm(&fwd.config_root(), &ns, "late");
    let reached = poll(Duration::from_secs(1), || {
        let (code, body) = curl("late.localhost", port);
        (code == "200" && body.trim() == "late-vm").then_some(())
    });
    assert!(
        reached.is_some(),
        "not reachable {:?} after meta.json appeared",
        written.elapsed()
    );
}
