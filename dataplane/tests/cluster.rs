//! Two forwarders of a cluster on loopback (host A on 127.0.0.1, host B on 127.0.0.2,
//! the same port) and a real etcd: a name only host B has is passed through by host
//! A's forwarder, unread, to host B's, which terminates TLS and reaches its VM (nginx)
//! with the real client's address in the PROXY header; local routes win; any one
//! member of three down, routes still come in; an etcd outage leaves the last known
//! routes serving; the watch comes back after etcd does.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::*;
use mergen_cluster::{Keys, VmRecord};
use mergen_testkit::etcd::EtcdCluster;
use mergen_testkit::{eventually, wait_for};

const LONG: Duration = Duration::from_secs(20);

/// What host B's mergend would publish for its VM `id` answering to `app`.
fn record(id: &str, app: &str) -> String {
    VmRecord {
        id: id.into(),
        host: "host-b".into(),
        addr: "127.0.0.2".into(),
        aliases: vec![app.into(), id.into()],
        created_at: time::OffsetDateTime::now_utc(),
    }
    .to_json()
}

fn cluster_env(etcd: &EtcdCluster, prefix: &str, host: &str) -> Vec<(String, String)> {
    vec![
        ("FWD_ETCD_ENDPOINTS".into(), etcd.endpoints()),
        ("FWD_ETCD_PREFIX".into(), prefix.into()),
        ("FWD_ETCD_TIMEOUT_SECONDS".into(), "1".into()),
        ("FWD_HOST_NAME".into(), host.into()),
    ]
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn host_record(name: &str, addr: &str) -> String {
    mergen_cluster::HostRecord {
        name: name.into(),
        addr: addr.into(),
    }
    .to_json()
}

/// Which forwarder terminated TLS for `name` on host A's port (its certificate), when
/// the VM behind answered 200.
fn served_by(name: &str, port: u16) -> Option<Vec<u8>> {
    let mut stream = try_tls_connect(name, port).ok()?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {name}\r\n\r\n").ok()?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .starts_with("HTTP/1.1 200")
        .then(|| peer_cert(&stream))
}

/// `curl` from 127.0.0.5 through host A's forwarder: (HTTP status, body).
fn curl_from_elsewhere(name: &str, port: u16) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "--interface", "127.0.0.5"])
        .args(["-w", "\n%{http_code}", "--resolve"])
        .arg(format!("{name}:{port}:127.0.0.1"))
        .arg(format!("https://{name}:{port}/"))
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.trim().to_string())
}

#[test]
fn a_vm_on_another_host_is_reached_through_its_forwarder() {
    require_root!();
    let mut etcd = EtcdCluster::loopback(3);
    let prefix = format!("/fwdtest{}", std::process::id());
    let keys = Keys::new(&prefix);

    // Host A: no VM of its own.
    let env_a = cluster_env(&etcd, &prefix, "host-a");
    let a = Forwarder::start(&[443], &as_refs(&env_a));
    let port = a.ports[0];

    // Host B: the same port on its own address, sending its guests PROXY headers;
    // two VMs served by one nginx that reads them.
    let web_ns = Ns::new();
    let web = Nginx::start_with(&web_ns, 443, true, "content-of-a-vm-on-host-b");
    let (web_id, old_id) = (vm_id(), vm_id());
    let late: Vec<String> = (0..3).map(|_| vm_id()).collect();
    let mut env_b = cluster_env(&etcd, &prefix, "host-b");
    env_b.push((
        "FWD_LISTENERS".into(),
        format!("127.0.0.2:{port}=443/https+proxy-v2"),
    ));
    // Host A speaks for many clients: it is not held to the per-address cap.
    env_b.push(("FWD_MAX_CONNECTIONS_PER_IP".into(), "1".into()));
    let b = Forwarder::start_with(&[443], &as_refs(&env_b), |root| {
        let at = "2025-01-01T00:00:00Z";
        write_vm(root, &web_id, at, &web_ns, &[("app", "web")]);
        write_vm(root, &old_id, at, &web_ns, &[("app", "old")]);
        for (i, id) in late.iter().enumerate() {
            write_vm(root, id, at, &web_ns, &[("app", &format!("late{i}"))]);
        }
    });
    let cert_a = cert_der(&a.cert);
    let cert_b = cert_der(&b.cert);
    assert_ne!(cert_a, cert_b);

    // Unknown on host A until host B's routes are in etcd.
    assert!(try_tls_connect("web.localhost", port).is_err());
    etcd.ctl(&[
        "put",
        &keys.host("host-a"),
        &host_record("host-a", "127.0.0.1"),
    ]);
    etcd.ctl(&[
        "put",
        &keys.host("host-b"),
        &host_record("host-b", "127.0.0.2"),
    ]);
    etcd.ctl(&["put", &keys.vm(&web_id), &record(&web_id, "web")]);
    etcd.ctl(&["put", &keys.vm(&old_id), &record(&old_id, "old")]);

    // curl through host A's forwarder reaches the VM on host B ...
    let reached = poll(LONG, || {
        let (code, body) = curl_from_elsewhere("web.localhost", port);
        (code == "200").then_some(body)
    });
    assert_eq!(
        reached.as_deref(),
        Some("content-of-a-vm-on-host-b"),
        "A: {}\nB: {}",
        a.log(),
        b.log()
    );
    // ... and the VM hears of the client (127.0.0.5), not of host A's forwarder.
    // (Its own readiness probe is the only other line.)
    let log = web.access_log();
    assert!(
        log.lines().any(|l| l.starts_with("127.0.0.5:"))
            && !log.lines().any(|l| l.starts_with("127.0.0.1:")),
        "nginx saw: {log}"
    );
    // By its id too, and TLS ends on host B: host A passed the bytes through unread.
    assert_eq!(curl(&format!("{web_id}.localhost"), port).0, "200");
    assert_eq!(served_by("old.localhost", port), Some(cert_b.clone()));
    assert_eq!(a.metric("mergen_forwarder_cluster_remote_vms"), 2.0);
    assert_eq!(a.metric("mergen_forwarder_cluster_resyncs_total"), 1.0);
    assert_eq!(a.metric("mergen_forwarder_cluster_watch_connected"), 1.0);
    let (_, health) = http_get(a.admin, "/healthz").expect("healthz");
    assert!(health.contains(r#""watch":"up""#), "{health}");
    // Counted on both sides (each listener is named after its address).
    let crossed = |f: &Forwarder, ip: &str, d: &str| {
        let listener = format!("listener=\"{ip}:{port}\"");
        f.metric(&format!(
            "mergen_forwarder_cluster_connections_total{{{listener},direction=\"{d}\"}}"
        ))
    };
    assert!(
        crossed(&a, "127.0.0.1", "to_peer") >= 3.0,
        "{}",
        a.metrics()
    );
    assert!(
        crossed(&b, "127.0.0.2", "from_peer") >= 3.0,
        "{}",
        b.metrics()
    );
    assert_eq!(crossed(&a, "127.0.0.1", "from_peer"), 0.0);
    // Host B's own VMs never come back to it through etcd.
    assert_eq!(b.metric("mergen_forwarder_cluster_remote_vms"), 0.0);

    // Whichever member of three the watch uses goes down, routes still come in.
    for (i, id) in late.iter().enumerate() {
        etcd.stop_member(i);
        let others: Vec<usize> = (0..3).filter(|&j| j != i).collect();
        etcd.wait_healthy(&others); // a new leader, when it was the leader
        let name = format!("late{i}");
        etcd.ctl(&["put", &keys.vm(id), &record(id, &name)]);
        let host = format!("{name}.localhost");
        let reached = eventually(LONG, || served_by(&host, port) == Some(cert_b.clone()));
        assert!(reached, "{host} with member {i} down: {}", a.log());
        etcd.start_member(i);
        etcd.wait_healthy(&[0, 1, 2]);
    }

    // etcd gone: the last known routes keep serving, and host A says it is behind.
    etcd.stop_all();
    assert!(
        eventually(LONG, || a
            .metric("mergen_forwarder_cluster_watch_connected")
            == 0.0),
        "the watch never noticed etcd going: {}",
        a.metrics()
    );
    assert_eq!(served_by("web.localhost", port), Some(cert_b.clone()));
    let (status, health) = http_get(a.admin, "/healthz").expect("healthz");
    assert_eq!(status, 200, "serving while stale is healthy");
    assert!(health.contains(r#""watch":"down""#), "{health}");

    // etcd back: the watch resumes and follows what changed meanwhile and after.
    etcd.start_all();
    etcd.wait_healthy(&[0, 1, 2]);
    etcd.ctl(&["del", &keys.vm(&old_id)]);
    assert!(
        eventually(LONG, || curl("old.localhost", port).0 != "200"),
        "a route deleted after the restart still served: {}",
        a.log()
    );
    assert_eq!(a.metric("mergen_forwarder_cluster_watch_connected"), 1.0);
    // Refused as any unknown name: an unrecognized_name alert.
    let refused = try_tls_connect("old.localhost", port)
        .map(|_| ())
        .unwrap_err();
    assert!(
        refused.to_string().contains("UnrecognisedName"),
        "{refused}"
    );
    assert_eq!(served_by("web.localhost", port), Some(cert_b.clone()));

    // A connection passed through stays up while the local routes change (it has no
    // local VM to lose), and more come in beside it from the same peer.
    let mut held = try_tls_connect("late0.localhost", port).expect("passed through");
    let get = |stream: &mut TlsStream| {
        write!(stream, "GET / HTTP/1.1\r\nHost: late0.localhost\r\n\r\n").unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("content-of-a-vm-on-host-b") {
            let n = stream.read(&mut buf).expect("the held connection still up");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    };
    get(&mut held);

    // A local VM with the same alias wins over host B's.
    let local_ns = Ns::new();
    let _local_web = Nginx::start(&local_ns, 443, "content-of-a-vm-on-host-a");
    let local_id = vm_id();
    write_vm(
        &a.config_root(),
        &local_id,
        "2025-01-01T00:00:00Z",
        &local_ns,
        &[("app", "web")],
    );
    let local = wait_for("the local VM to win", LONG, || {
        served_by("web.localhost", port).filter(|c| *c == cert_a)
    });
    assert_eq!(local, cert_a);
    assert_eq!(
        curl("web.localhost", port).1.trim(),
        "content-of-a-vm-on-host-a"
    );
    assert_eq!(served_by("late1.localhost", port), Some(cert_b.clone()));
    // The local VM gone, host B's answers again; connections to the local VM end,
    // not the one passed through.
    std::fs::remove_dir_all(a.config_root().join(&local_id)).unwrap();
    wait_for("host B's VM back", LONG, || {
        served_by("web.localhost", port).filter(|c| *c == cert_b)
    });
    get(&mut held);
    let refused = format!(
        "mergen_forwarder_connections_total{{listener=\"127.0.0.2:{port}\",outcome=\"refused_per_ip\"}}"
    );
    assert_eq!(b.metric(&refused), 0.0, "{}", b.metrics());
}

/// A forwarder whose etcd is nowhere still starts and serves its own VMs; it says the
/// cluster is down, and stays healthy.
#[test]
fn without_etcd_local_vms_are_served_as_ever() {
    require_root!();
    let nowhere = format!("127.0.0.1:{}", free_port());
    let ns = Ns::new();
    echo_server(ns.listen(443));
    let env = [
        ("FWD_ETCD_ENDPOINTS", nowhere.as_str()),
        ("FWD_ETCD_TIMEOUT_SECONDS", "1"),
        ("FWD_HOST_NAME", "host-a"),
    ];
    let fwd = Forwarder::start_with(&[443], &env, |root| write_app_vm(root, &ns, "echo"));
    let mut stream = tls_connect("echo.localhost", fwd.ports[0]);
    assert_eq!(round_trip(&mut stream, b"ping").unwrap(), b"ping");
    let (status, health) = http_get(fwd.admin, "/healthz").expect("healthz");
    assert_eq!(status, 200);
    assert!(health.contains(r#""watch":"down""#), "{health}");
    assert_eq!(fwd.metric("mergen_forwarder_cluster_watch_connected"), 0.0);
    assert!(
        eventually(LONG, || fwd
            .metric("mergen_forwarder_cluster_stale_seconds")
            > 0.0),
        "{}",
        fwd.metrics()
    );
    // Said once, not once per retry.
    let said = |log: &str| log.matches("etcd unreachable: no remote routes").count();
    assert!(eventually(LONG, || said(&fwd.log()) > 0), "{}", fwd.log());
    assert_eq!(said(&fwd.log()), 1, "{}", fwd.log());
}
