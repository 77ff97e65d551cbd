//! mergend in a cluster: two hosts' mergends (on one machine, each with its own roots
//! and host name) publish to a real etcd on loopback. Aliases are unique across hosts,
//! calls for another host's VM are sent there, and a mergend that dies takes its routes
//! out of etcd after the lease TTL and brings them back when it returns. With each
//! host's forwarder too (host A on 127.0.0.1, host B on 127.0.0.2), curl through host
//! A reaches a process VM that runs on host B. Over TLS with client certificates too:
//! a mergend whose certificates etcd refuses runs, and says it is disconnected.

mod common;

use std::time::Duration;

use common::forwarder::{forwarder_on, through_at};
use common::vms::{process_env, VmsGuard};
use common::{Mergend, Roots};
use mergen_testkit::etcd::{EtcdCluster, MutualTlsEtcd};
use mergen_testkit::pki::TestCa;
use mergen_testkit::{eventually, free_port, nginx, require_root, wait_for};

const LONG: Duration = Duration::from_secs(20);

fn host_env<'a>(
    etcd: &'a str,
    name: &'a str,
    addr: &'a str,
    prefix: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("MGR_ETCD_ENDPOINTS", etcd),
        ("MGR_ETCD_PREFIX", prefix),
        ("MGR_ETCD_LEASE_TTL_SECONDS", "2"),
        ("MGR_ETCD_TIMEOUT_SECONDS", "2"),
        ("MGR_HOST_NAME", name),
        ("MGR_HOST_ADDR", addr),
    ]
}

/// Host a's settings for an etcd over TLS, trusting `ca`, with a client certificate.
fn tls_env<'a>(ep: &'a str, ca: &'a str, cert: &'a str, key: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut env = host_env(ep, "a", "10.9.0.1", "/tls");
    env.extend([
        ("MGR_ETCD_CA_FILE", ca),
        ("MGR_ETCD_CERT_FILE", cert),
        ("MGR_ETCD_KEY_FILE", key),
    ]);
    env
}

fn create_app(m: &Mergend, roots: &Roots, app: &str) -> (u16, serde_json::Value) {
    m.create(&roots.body_with(&format!(r#","tags":{{"app":"{app}"}}"#)))
}

/// Route keys of the VMs under `prefix`, by id.
fn routes(etcd: &EtcdCluster, prefix: &str) -> Vec<String> {
    let out = etcd.ctl(&[
        "get",
        "--prefix",
        "--keys-only",
        &format!("{prefix}/v1/vms/"),
    ]);
    let mut ids: Vec<String> = out
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    ids.sort();
    ids
}

#[test]
fn aliases_are_unique_across_hosts_and_calls_go_to_the_owner() {
    let etcd = EtcdCluster::loopback(1);
    let ep = etcd.endpoints();
    let (ra, rb) = (Roots::new("cl-a"), Roots::new("cl-b"));
    let a = Mergend::start(&ra, &host_env(&ep, "a", "10.9.0.1", "/t1"));
    let b = Mergend::start(&rb, &host_env(&ep, "b", "10.9.0.2", "/t1"));

    let (code, v) = create_app(&a, &ra, "web");
    assert_eq!(code, 201, "{v}");
    let web = v["id"].as_str().unwrap().to_string();
    // Another host may not have it; the same host may (the oldest answers, as ever).
    let (code, v) = create_app(&b, &rb, "web");
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["error"], "conflict");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("\"web\"") && msg.contains("\"a\""), "{msg}");
    assert!(rb.vm_dirs().is_empty(), "nothing written on b");
    let (code, v) = create_app(&a, &ra, "web");
    assert_eq!(code, 201, "{v}");
    let web2 = v["id"].as_str().unwrap().to_string();
    // Aliases are compared as the forwarder routes them: case does not make a new one.
    let (code, v) = create_app(&b, &rb, "WEB");
    assert_eq!(code, 409, "{v}");

    // Creates racing for one alias from both hosts: exactly one of them wins.
    for round in 0..5 {
        let app = format!("race{round}");
        let (ca, cb) = std::thread::scope(|s| {
            let ta = s.spawn(|| create_app(&a, &ra, &app).0);
            let tb = s.spawn(|| create_app(&b, &rb, &app).0);
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let mut codes = [ca, cb];
        codes.sort();
        assert_eq!(codes, [201, 409], "round {round}");
    }

    // Every host's VMs, from any host.
    let (code, v) = b.get_json("/v1/vms?scope=cluster");
    assert_eq!(code, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2 + 5, "{v}");
    let item = items.iter().find(|i| i["id"] == web.as_str()).unwrap();
    assert_eq!(item["host"], "a");
    assert_eq!(item["addr"], "10.9.0.1");
    assert!(
        item["aliases"].as_array().unwrap().contains(&"web".into()),
        "{item}"
    );
    assert!(item["createdAt"].is_string());
    // The host scope stays this host's own.
    let (_, v) = b.get_json("/v1/vms");
    let own = v["items"].as_array().unwrap().len();
    let (_, v) = b.get_json("/v1/vms?scope=host");
    assert_eq!(v["items"].as_array().unwrap().len(), own);
    let (code, _) = b.get_json("/v1/vms?scope=world");
    assert_eq!(code, 400);

    // A call on b for a's VM is told where it lives.
    for (method, path) in [
        ("GET", format!("/v1/vms/{web}")),
        ("POST", format!("/v1/vms/{web}/start")),
        ("POST", format!("/v1/vms/{web}/stop")),
        ("DELETE", format!("/v1/vms/{web}")),
    ] {
        let (code, body) = b.curl(method, &path, &[]);
        assert_eq!(code, 421, "{method} {path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "misdirected_request");
        assert!(v["message"].as_str().unwrap().contains("10.9.0.1"), "{v}");
    }
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &b.url(&format!("/v1/vms/{web}")),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.contains("x-mergen-host: a\r\n"), "{head}");
    assert!(head.contains("x-mergen-host-addr: 10.9.0.1\r\n"), "{head}");
    // Unknown everywhere is still 404.
    let (code, _) = b.get_json("/v1/vms/00000000-0000-4000-8000-000000000000");
    assert_eq!(code, 404);

    // Deleted on its host, the alias is free for another host.
    for id in [&web, &web2] {
        let (code, out) = a.curl("DELETE", &format!("/v1/vms/{id}"), &[]);
        assert_eq!(code, 200, "{out}");
    }
    let (code, v) = create_app(&b, &rb, "web");
    assert_eq!(code, 201, "{v}");

    let (code, v) = a.get_json("/healthz");
    assert_eq!(
        (code, v["cluster"].as_str()),
        (200, Some("connected")),
        "{v}"
    );
    let (_, metrics) = a.curl("GET", "/metrics", &[]);
    assert!(metrics.contains("mergend_cluster_connected 1"), "{metrics}");
    assert!(metrics.contains("mergend_cluster_routes "), "{metrics}");
}

#[test]
fn a_killed_mergend_loses_its_routes_after_the_ttl_and_gets_them_back() {
    let mut etcd = EtcdCluster::loopback(1);
    let ep = etcd.endpoints();
    let roots = Roots::new("cl-kill");
    let env = host_env(&ep, "c", "10.9.0.3", "/t2");
    let mut m = Mergend::start(&roots, &env);
    let mut ids = Vec::new();
    for app in ["one", "two"] {
        let (code, v) = create_app(&m, &roots, app);
        assert_eq!(code, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(routes(&etcd, "/t2"), ids);

    m.signal(rustix::process::Signal::KILL);
    assert!(m.wait_exit(Duration::from_secs(10)).is_some());
    assert_eq!(routes(&etcd, "/t2"), ids, "gone before the TTL");
    assert!(
        eventually(LONG, || routes(&etcd, "/t2").is_empty()),
        "the routes outlived the lease"
    );
    let alias = etcd.ctl(&["get", "--print-value-only", "/t2/v1/aliases/one"]);
    assert_eq!(alias.trim(), "", "the claim outlived the lease");

    // Back: everything on disk is published again.
    let m = Mergend::start(&roots, &env);
    wait_for("the routes back", LONG, || {
        (routes(&etcd, "/t2") == ids).then_some(())
    });
    let alias = etcd.ctl(&["get", "--print-value-only", "/t2/v1/aliases/one"]);
    assert_eq!(alias.trim(), "c");

    // etcd away: a create cannot claim its aliases (503), a delete still deletes, and
    // its route is gone once etcd is back.
    etcd.stop_all();
    let (code, v) = create_app(&m, &roots, "three");
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["error"], "dependency_unavailable");
    let (code, out) = m.curl("DELETE", &format!("/v1/vms/{}", ids[0]), &[]);
    assert_eq!(code, 200, "{out}");
    let (code, v) = m.get_json("/healthz");
    assert_eq!(code, 200);
    wait_for("disconnected in /healthz", LONG, || {
        (m.get_json("/healthz").1["cluster"] == "disconnected").then_some(())
    });
    let _ = v;
    etcd.start_all();
    etcd.wait_healthy(&[0]);
    wait_for("the deleted VM's route gone", LONG, || {
        (routes(&etcd, "/t2") == ids[1..]).then_some(())
    });
    let (code, v) = create_app(&m, &roots, "three");
    assert_eq!(code, 201, "{v}");
}

#[test]
fn mergend_publishes_over_mutual_tls_and_says_when_etcd_refuses_it() {
    let t = MutualTlsEtcd::loopback(1);
    let (etcd, ca, client) = (&t.etcd, &t.ca, &t.client);
    let ep = etcd.endpoints();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (ca_file, cert, key) = (path(&ca.ca_file), path(&client.cert), path(&client.key));
    let roots = Roots::new("cl-tls");
    let m = Mergend::start(&roots, &tls_env(&ep, &ca_file, &cert, &key));
    let (code, v) = create_app(&m, &roots, "secure");
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(routes(etcd, "/tls"), [id]);
    let (_, v) = m.get_json("/healthz");
    assert_eq!(v["cluster"], "connected", "{v}");

    // Another host's forwarder learns the route over TLS too; one with the wrong CA
    // says why it learns nothing.
    let fwd = |dir: &mergen_testkit::TempDir, ca_file: &str| {
        let env = [
            ("FWD_ETCD_ENDPOINTS", ep.as_str()),
            ("FWD_ETCD_PREFIX", "/tls"),
            ("FWD_ETCD_TIMEOUT_SECONDS", "1"),
            ("FWD_ETCD_CA_FILE", ca_file),
            ("FWD_ETCD_CERT_FILE", cert.as_str()),
            ("FWD_ETCD_KEY_FILE", key.as_str()),
            ("FWD_HOST_NAME", "b"),
        ];
        let listener = [((std::net::Ipv4Addr::LOCALHOST, free_port()).into(), 8080)];
        // Host b's own VMs: none.
        let vms = dir.path().join("vm.d");
        std::fs::create_dir_all(&vms).unwrap();
        forwarder_on(&vms, dir.path(), &listener, &env)
    };
    let fwd_log = |dir: &mergen_testkit::TempDir| {
        std::fs::read_to_string(dir.path().join("forwarder.log")).unwrap_or_default()
    };
    let other = TestCa::new(t.dir(), "other");
    let (good, bad) = (
        mergen_testkit::TempDir::new("cl-tls-fwd"),
        mergen_testkit::TempDir::new("cl-tls-fwd-bad"),
    );
    let _good = fwd(&good, &ca_file);
    let _bad = fwd(&bad, &path(&other.ca_file));
    wait_for("the remote route in the forwarder", LONG, || {
        fwd_log(&good)
            .lines()
            .any(|l| l.contains("remote routes updated") && l.contains("remote_vms=1"))
            .then_some(())
    });
    wait_for("the wrong CA in the forwarder's log", LONG, || {
        fwd_log(&bad).contains("UnknownIssuer").then_some(())
    });
    drop(m);

    // A CA that did not sign etcd's certificate: mergend runs, is disconnected, says
    // why, and refuses creates as in any etcd outage.
    let roots = Roots::new("cl-tls-bad");
    let m = Mergend::start(&roots, &tls_env(&ep, &path(&other.ca_file), &cert, &key));
    assert!(
        eventually(LONG, || m.log_text().contains("UnknownIssuer")),
        "the refused certificate is not in the log:\n{}",
        m.log_text()
    );
    let (code, v) = m.get_json("/healthz");
    assert_eq!(
        (code, v["cluster"].as_str()),
        (200, Some("disconnected")),
        "{v}"
    );
    let (code, v) = create_app(&m, &roots, "insecure");
    assert_eq!(code, 503, "{v}");

    // A file that is not there stops it at start-up, naming the variable.
    let err = refused_start(
        "cl-tls-nofile",
        &tls_env(&ep, "/nonexistent/ca.pem", &cert, &key),
    );
    assert!(err.contains("MGR_ETCD_CA_FILE"), "{err}");

    // No CA file: the system's store, which SSL_CERT_FILE stands for here. With etcd's
    // CA in it, mergend publishes; with an empty store it refuses to start.
    drop(m);
    let no_ca = tls_env(&ep, "", &cert, &key);
    let roots = Roots::new("cl-tls-system");
    let m = Mergend::start(
        &roots,
        &[&no_ca[..], &[("SSL_CERT_FILE", &ca_file)]].concat(),
    );
    let (code, v) = create_app(&m, &roots, "system");
    assert_eq!(code, 201, "{v}");
    let err = refused_start(
        "cl-tls-empty",
        &[&no_ca[..], &[("SSL_CERT_FILE", "/nonexistent/roots.pem")]].concat(),
    );
    assert!(err.contains("native certs"), "{err}");
}

/// mergend started with `extra`, which it must refuse: its standard error.
fn refused_start(roots: &str, extra: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(common::BIN)
        .env_clear()
        .envs(common::env_for(&Roots::new(roots)))
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_cluster_needs_the_hosts_address() {
    let err = refused_start("cl-cfg", &[("MGR_ETCD_ENDPOINTS", "127.0.0.1:2379")]);
    assert!(err.contains("MGR_HOST_ADDR"), "{err}");
}

/// The whole path across hosts: host B's mergend runs a VM (nginx as a process guest)
/// and publishes its route; curl through host A's forwarder reaches it, host A passing
/// the connection through to host B's forwarder. Host B's mergend killed: the VM goes
/// on serving on host B, host A stops routing to it after the TTL; back, and host A
/// routes to it again.
#[test]
fn curl_through_one_hosts_forwarder_reaches_a_vm_on_another() {
    require_root!();
    let etcd = EtcdCluster::loopback(1);
    let ep = etcd.endpoints();
    let prefix = format!("/e2e{}", std::process::id());
    let pid = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 50 + pid % 50, 100 + pid % 50);
    let (ra, rb) = (Roots::new("cl-e2e-a"), Roots::new("cl-e2e-b"));
    let mut env_b = host_env(&ep, "b", "127.0.0.2", &prefix);
    env_b.extend(process_env(&cidr));
    let mut guard = VmsGuard::new(&rb, &env_b);
    let _a = Mergend::start(&ra, &host_env(&ep, "a", "127.0.0.1", &prefix));
    let mut b = Mergend::start(&rb, &env_b);

    // Both forwarders on one port, each on its host's address.
    let port = free_port();
    let fwd_env = |host: &'static str| {
        [
            ("FWD_ETCD_ENDPOINTS", ep.as_str()),
            ("FWD_ETCD_PREFIX", prefix.as_str()),
            ("FWD_ETCD_TIMEOUT_SECONDS", "1"),
            ("FWD_HOST_NAME", host),
        ]
    };
    let dirs = (
        mergen_testkit::TempDir::new("cl-e2e-fwd-a"),
        mergen_testkit::TempDir::new("cl-e2e-fwd-b"),
    );
    let at = |ip: [u8; 4]| [((ip, port).into(), 8080)];
    let _fa = forwarder_on(
        &ra.config(),
        dirs.0.path(),
        &at([127, 0, 0, 1]),
        &fwd_env("a"),
    );
    let _fb = forwarder_on(
        &rb.config(),
        dirs.1.path(),
        &at([127, 0, 0, 2]),
        &fwd_env("b"),
    );

    // A VM on host B: nginx on guest port 8080.
    let www = rb.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "a page on host b\n").unwrap();
    let argv = nginx::guest_argv(&rb.dir.join("nginx"), "8080", &www);
    let body = serde_json::json!({"process": {"cmd": argv}, "tags": {"app": "far"}});
    let (code, v) = b.create(&body.to_string());
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    guard.ids.push(id.clone());
    let (code, out) = b.curl("POST", &format!("/v1/vms/{id}/start"), &[]);
    assert_eq!(code, 200, "{out}\n{}", b.log_text());

    let page = Some("a page on host b\n".to_string());
    let fwd_logs = || {
        let log = |d: &mergen_testkit::TempDir| {
            std::fs::read_to_string(d.path().join("forwarder.log")).unwrap_or_default()
        };
        format!("A:\n{}\nB:\n{}", log(&dirs.0), log(&dirs.1))
    };
    // On host B itself, then through host A (by alias and by short id).
    let on_b = eventually(LONG, || {
        through_at("far.localhost", "127.0.0.2", port, "/") == page
    });
    assert!(on_b, "{}", fwd_logs());
    for name in [
        "far.localhost".to_string(),
        format!("{}.localhost", &id[..8]),
    ] {
        let via_a = eventually(LONG, || through_at(&name, "127.0.0.1", port, "/") == page);
        assert!(
            via_a,
            "{name}: {:?}\n{}",
            through_at(&name, "127.0.0.1", port, "/"),
            fwd_logs()
        );
    }

    // Host B's mergend killed: its VM keeps serving on host B; host A lets go of it
    // once the lease is gone.
    b.signal(rustix::process::Signal::KILL);
    assert!(b.wait_exit(Duration::from_secs(10)).is_some());
    assert!(
        eventually(LONG, || through_at("far.localhost", "127.0.0.1", port, "/")
            .is_none()),
        "host A still routes to a host whose mergend is gone: {}",
        fwd_logs()
    );
    // As any name it does not know: a TLS unrecognized_name alert.
    let refused = std::process::Command::new("curl")
        .args(["-sSk", "--max-time", "5", "--resolve"])
        .arg(format!("far.localhost:{port}:127.0.0.1"))
        .arg(format!("https://far.localhost:{port}/"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("unrecognized name"), "{said}");
    assert_eq!(through_at("far.localhost", "127.0.0.2", port, "/"), page);

    // Back: re-published, and host A routes to it again.
    let _b = Mergend::start(&rb, &env_b);
    let back = eventually(LONG, || {
        through_at("far.localhost", "127.0.0.1", port, "/") == page
    });
    assert!(back, "{}", fwd_logs());
}
