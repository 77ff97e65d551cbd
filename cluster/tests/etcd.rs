//! The publisher and the watcher against a real three-member etcd cluster on loopback:
//! alias races between hosts, leases that lapse and come back, watches that outlive
//! outages and compactions; and the same over TLS with client certificates, refused
//! with the reason when the certificates do not fit.

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use mergen_cluster::{
    ClusterError, ClusterView, HostRecord, LocalVm, PemFile, Publisher, RouteWatch, Settings,
    Source, Tls,
};
use mergen_testkit::etcd::{EtcdCluster, MutualTlsEtcd, ServerTls};
use mergen_testkit::pki::{Issued, TestCa};
use mergen_testkit::{eventually, wait_for, TempDir};
use time::OffsetDateTime;

const TTL: Duration = Duration::from_secs(2);
const LONG: Duration = Duration::from_secs(20);

fn settings(endpoints: &str, prefix: &str) -> Settings {
    Settings {
        endpoints: mergen_cluster::parse_endpoints(endpoints).unwrap(),
        prefix: prefix.to_string(),
        timeout: Duration::from_secs(2),
        tls: None,
    }
}

fn host(name: &str) -> HostRecord {
    HostRecord {
        name: name.into(),
        addr: format!("10.0.0.{}", name.len()),
    }
}

fn vm(id: &str, aliases: &[&str]) -> LocalVm {
    LocalVm {
        id: id.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        created_at: OffsetDateTime::now_utc(),
    }
}

/// A publisher whose local store is `vms` (shared, so a test can change it).
fn publisher(s: &Settings, name: &str, vms: &Arc<Mutex<Vec<LocalVm>>>) -> Publisher {
    let vms = Arc::clone(vms);
    let source: Source = Box::new(move || Ok(vms.lock().unwrap().clone()));
    let p = Publisher::start(s, host(name), TTL, source).unwrap();
    let status = p.status();
    assert!(
        eventually(LONG, || status.connected()),
        "publisher {name} never got a lease"
    );
    p
}

/// A watcher and the last view it reported.
fn watcher(s: &Settings) -> (RouteWatch, Arc<Mutex<ClusterView>>) {
    let seen = Arc::new(Mutex::new(ClusterView::default()));
    let sink = Arc::clone(&seen);
    let w = RouteWatch::start(s, Box::new(move |v| *sink.lock().unwrap() = v.clone())).unwrap();
    (w, seen)
}

fn vm_ids(view: &Mutex<ClusterView>) -> Vec<String> {
    view.lock().unwrap().vms.keys().cloned().collect()
}

#[test]
fn an_alias_raced_by_three_hosts_has_exactly_one_winner() {
    let etcd = EtcdCluster::loopback(3);
    let s = settings(&etcd.endpoints(), "/race");
    let none = Arc::new(Mutex::new(Vec::new()));
    let hosts: Vec<Publisher> = ["a", "b", "c"]
        .iter()
        .map(|n| publisher(&s, n, &none))
        .collect();
    for round in 0..10 {
        let alias = format!("app{round}");
        let barrier = Barrier::new(hosts.len());
        let results: Vec<Result<(), ClusterError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = hosts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let (alias, barrier) = (&alias, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        let id = format!("vm-{round}-{i}");
                        p.lock().claim(&id, &[alias.clone(), id.clone()])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = (0..3).filter(|&i| results[i].is_ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let winner = ["a", "b", "c"][winners[0]];
        for r in results.iter().filter(|r| r.is_err()) {
            match r {
                Err(ClusterError::AliasTaken { alias: a, host }) => {
                    assert_eq!((a.as_str(), host.as_str()), (alias.as_str(), winner));
                }
                other => panic!("round {round}: {other:?}"),
            }
        }
        // etcd holds the claim for the winner.
        let owner = etcd.ctl(&[
            "get",
            "--print-value-only",
            &format!("/race/v1/aliases/{alias}"),
        ]);
        assert_eq!(owner.trim(), winner);
        // The winner's own host may claim it again for another VM (one host's VMs may
        // share an alias, the oldest answering, as on a single host).
        let again = hosts[winners[0]]
            .lock()
            .claim("another", std::slice::from_ref(&alias));
        assert!(again.is_ok(), "{again:?}");
    }
}

#[test]
fn routes_go_with_the_lease_and_come_back_with_a_new_one() {
    let etcd = EtcdCluster::loopback(3);
    let s = settings(&etcd.endpoints(), "/lease");
    let local = Arc::new(Mutex::new(vec![
        vm("one", &["one", "web"]),
        vm("two", &["two"]),
    ]));
    let (watch, seen) = watcher(&s);
    let p = publisher(&s, "c", &local);
    wait_for("both routes", LONG, || {
        (vm_ids(&seen) == ["one", "two"]).then_some(())
    });
    {
        let view = seen.lock().unwrap();
        assert_eq!(view.vms["one"].aliases, ["one", "web"]);
        assert_eq!(view.vms["one"].host, "c");
        assert_eq!(view.hosts["c"], host("c"));
    }
    // A VM created and deleted through the lifecycle calls.
    {
        let mut ops = p.lock();
        ops.claim("three", &["three".into()]).unwrap();
        local.lock().unwrap().push(vm("three", &["three"]));
        ops.publish(&vm("three", &["three"])).unwrap();
    }
    wait_for("the new route", LONG, || {
        vm_ids(&seen).contains(&"three".into()).then_some(())
    });
    {
        local.lock().unwrap().retain(|v| v.id != "one");
        p.lock().withdraw("one").unwrap();
    }
    wait_for("the deleted route gone", LONG, || {
        (vm_ids(&seen) == ["three", "two"]).then_some(())
    });
    assert_eq!(
        etcd.ctl(&["get", "--print-value-only", "/lease/v1/aliases/web"])
            .trim(),
        ""
    );

    // The host dies without a word (no revoke): its routes and its host record go
    // when the lease runs out, not before.
    drop(p);
    assert!(!vm_ids(&seen).is_empty(), "gone before the TTL");
    wait_for("the routes to lapse", LONG, || {
        let v = seen.lock().unwrap();
        (v.vms.is_empty() && v.hosts.is_empty()).then_some(())
    });
    // Back: everything the local store has is published again.
    let _p = publisher(&s, "c", &local);
    wait_for("the routes back", LONG, || {
        (vm_ids(&seen) == ["three", "two"]).then_some(())
    });
    assert_eq!(
        watch.status().resyncs(),
        1,
        "followed by the watch, never re-read"
    );
}

#[test]
fn republishing_removes_what_was_deleted_meanwhile_and_skips_taken_aliases() {
    let etcd = EtcdCluster::loopback(3);
    let s = settings(&etcd.endpoints(), "/repub");
    let a_vms = Arc::new(Mutex::new(vec![
        vm("a1", &["a1", "shared"]),
        vm("a2", &["a2"]),
    ]));
    let b_vms = Arc::new(Mutex::new(Vec::new()));
    let (_watch, seen) = watcher(&s);
    let a = publisher(&s, "a", &a_vms);
    wait_for("a's routes", LONG, || {
        (vm_ids(&seen) == ["a1", "a2"]).then_some(())
    });
    // Host a stops; while it is away a2 is deleted on it, and host b takes `shared`.
    drop(a);
    wait_for("a's routes to lapse", LONG, || {
        vm_ids(&seen).is_empty().then_some(())
    });
    a_vms.lock().unwrap().retain(|v| v.id != "a2");
    let b = publisher(&s, "b", &b_vms);
    b.lock()
        .claim("b1", &["shared".into(), "b1".into()])
        .unwrap();
    b.lock().publish(&vm("b1", &["shared", "b1"])).unwrap();
    let _a = publisher(&s, "a", &a_vms);
    wait_for("a back", LONG, || {
        (vm_ids(&seen) == ["a1", "b1"]).then_some(())
    });
    let view = seen.lock().unwrap().clone();
    assert_eq!(view.vms["a1"].aliases, ["a1"], "the taken alias is not a's");
    assert_eq!(view.vms["b1"].aliases, ["shared", "b1"]);
    assert_eq!(_a.status().conflicts(), 1);
    assert_eq!(
        etcd.ctl(&["get", "--print-value-only", "/repub/v1/aliases/shared"])
            .trim(),
        "b"
    );
}

#[test]
fn the_watch_keeps_the_last_routes_through_an_outage_and_resumes_after_it() {
    let mut etcd = EtcdCluster::loopback(3);
    let s = settings(&etcd.endpoints(), "/outage");
    let local = Arc::new(Mutex::new(vec![vm("x", &["x"])]));
    let (watch, seen) = watcher(&s);
    let status = watch.status();
    {
        let p = publisher(&s, "a", &local);
        wait_for("the route", LONG, || (vm_ids(&seen) == ["x"]).then_some(()));
        // One member down: the watch goes on (or moves to another member).
        etcd.stop_member(0);
        p.lock().claim("y", &["y".into()]).unwrap();
        p.lock().publish(&vm("y", &["y"])).unwrap();
        wait_for("a change with one member down", LONG, || {
            (vm_ids(&seen) == ["x", "y"]).then_some(())
        });
        etcd.start_member(0);
        etcd.wait_healthy(&[0, 1, 2]);
        // Everything down: the last routes stay, and the watcher says they are stale.
        etcd.stop_all();
        wait_for("stale", LONG, || status.stale_for().map(|_| ()));
        assert!(!status.connected());
        assert_eq!(vm_ids(&seen), ["x", "y"], "kept while etcd is away");
        drop(p);
    }
    etcd.start_all();
    etcd.wait_healthy(&[0, 1, 2]);
    wait_for("connected again", LONG, || status.connected().then_some(()));
    assert!(status.disconnects() >= 1);
    // A change after the outage arrives through the resumed watch, without a re-read.
    let _q = publisher(&s, "b", &Arc::new(Mutex::new(vec![vm("z", &["z"])])));
    wait_for("the route made after the outage", LONG, || {
        vm_ids(&seen).contains(&"z".into()).then_some(())
    });
    assert_eq!(status.resyncs(), 1, "resumed, not re-read");
}

#[test]
fn a_watch_behind_a_compaction_reads_everything_again() {
    let mut etcd = EtcdCluster::loopback(3);
    let member0 = settings(&etcd.endpoint(0), "/compact");
    let all = settings(&etcd.endpoints(), "/compact");
    let (watch, seen) = watcher(&member0);
    let status = watch.status();
    let p = publisher(&all, "a", &Arc::new(Mutex::new(vec![vm("old", &["old"])])));
    wait_for("the first route", LONG, || {
        (vm_ids(&seen) == ["old"]).then_some(())
    });
    etcd.stop_member(0);
    wait_for("stale", LONG, || status.stale_for().map(|_| ()));
    // While the watcher's member is down, history moves on and is compacted away.
    p.lock().claim("new", &["new".into()]).unwrap();
    p.lock().publish(&vm("new", &["new"])).unwrap();
    p.lock().withdraw("old").unwrap();
    let rev: i64 = {
        let out = etcd.ctl(&["put", "/compact/v1/other/marker", "x", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["header"]["revision"].as_i64().unwrap()
    };
    etcd.ctl(&["compact", &rev.to_string()]);
    etcd.start_member(0);
    wait_for("the view after the compaction", LONG, || {
        (vm_ids(&seen) == ["new"]).then_some(())
    });
    assert_eq!(status.resyncs(), 2, "read again after the compaction");
    // The watch reports itself up on its first response, just after the full read.
    wait_for("the watch up again", LONG, || {
        status.connected().then_some(())
    });
}

fn tls_settings(etcd: &EtcdCluster, prefix: &str, tls: Tls) -> Settings {
    Settings {
        tls: Some(tls),
        ..settings(&etcd.endpoints(), prefix)
    }
}

fn pem(read: fn(&str) -> Result<PemFile, String>, path: &std::path::Path) -> PemFile {
    read(path.to_str().unwrap()).unwrap()
}

/// TLS trusting the CA in `ca`, with `client`'s certificate when given.
fn tls(ca: &std::path::Path, client: Option<&Issued>) -> Tls {
    Tls {
        ca: Some(pem(PemFile::ca, ca)),
        identity: client.map(|c| {
            (
                pem(PemFile::certificate, &c.cert),
                pem(PemFile::key, &c.key),
            )
        }),
    }
}

#[test]
fn routes_are_published_and_watched_over_mutual_tls() {
    let t = MutualTlsEtcd::loopback(1);
    assert!(t.etcd.endpoints().starts_with("https://"));
    let s = tls_settings(&t.etcd, "/tls", tls(&t.ca.ca_file, Some(&t.client)));
    let local = Arc::new(Mutex::new(vec![vm("one", &["one", "web"])]));
    let (_watch, seen) = watcher(&s);
    let p = publisher(&s, "a", &local);
    wait_for("the route, over TLS", LONG, || {
        (vm_ids(&seen) == ["one"]).then_some(())
    });
    p.lock().claim("two", &["two".into()]).unwrap();
    // What the publisher wrote is in etcd (read by etcdctl over TLS too).
    let owner = t
        .etcd
        .ctl(&["get", "--print-value-only", "/tls/v1/aliases/two"]);
    assert_eq!(owner.trim(), "a");
}

/// The error of `p`'s calls once it names `reason`: a call on a loaded machine may
/// first time out waiting for the client's connection, before the reason is known.
fn refused_with(p: &Publisher, what: &str, reason: &str) -> String {
    let mut last = String::new();
    let named = eventually(LONG, || {
        last = p.list().expect_err(what).to_string();
        last.contains(reason)
    });
    assert!(named, "{what}: {last}");
    last
}

#[test]
fn a_wrong_ca_or_a_missing_client_certificate_is_refused_with_the_reason() {
    let t = MutualTlsEtcd::loopback(1);
    let other = TestCa::new(t.dir(), "other");
    let stranger = other.client("stranger", "host-a");
    let none: Arc<Mutex<Vec<LocalVm>>> = Arc::default();
    let cases = [
        (
            "a CA that did not sign etcd's certificate",
            tls(&other.ca_file, Some(&t.client)),
            "invalid peer certificate: UnknownIssuer",
        ),
        ("no client certificate", tls(&t.ca.ca_file, None), ""),
        (
            "a client certificate of another CA",
            tls(&t.ca.ca_file, Some(&stranger)),
            "",
        ),
    ];
    // etcd's refusal of a client certificate comes after the client's side of the
    // handshake: its alert (BadCertificate) is usually seen, but may lose the race with
    // the closed connection, so those cases only check that nothing gets through.
    for (what, tls, reason) in cases {
        let s = tls_settings(&t.etcd, "/refused", tls);
        let vms = Arc::clone(&none);
        let source: Source = Box::new(move || Ok(vms.lock().unwrap().clone()));
        // Start-up goes on (etcd may be fixed without restarting this host) ...
        let p = Publisher::start(&s, host("a"), TTL, source).expect(what);
        // ... but nothing gets through, and the error says why.
        let err = refused_with(&p, what, reason);
        assert!(!p.status().connected(), "{what}");
        eprintln!("{what}: {err}");
    }
    // Plain HTTP to a TLS member gets nowhere either.
    let p = Publisher::start(
        &settings(&t.etcd.endpoints().replace("https", "http"), "/refused"),
        host("a"),
        TTL,
        Box::new(|| Ok(Vec::new())),
    )
    .unwrap();
    assert!(p.list().is_err());
    // Nothing was written by any of them.
    assert_eq!(
        t.etcd
            .ctl(&["get", "--prefix", "--keys-only", "/refused"])
            .trim(),
        ""
    );
}

/// With etcd's authentication on, the client certificate's common name is the user:
/// a host whose user may write the prefix publishes, a forwarder whose user may only
/// read it watches; a certificate of the same CA for a user etcd does not know gets
/// nothing in or out.
#[test]
fn with_etcd_auth_the_certificates_name_is_the_user() {
    let t = MutualTlsEtcd::loopback(1);
    // Users and roles first, as the CN "host-a" etcdctl presents (auth is still off).
    // mergend's user writes the prefix; a forwarder's only reads it.
    t.etcd.ctl(&["user", "add", "root", "--no-password"]);
    t.etcd.ctl(&["user", "grant-role", "root", "root"]);
    for (user, role, access) in [
        ("host-a", "mergen", "readwrite"),
        ("fwd-a", "reader", "read"),
    ] {
        t.etcd.ctl(&["role", "add", role]);
        t.etcd.ctl(&[
            "role",
            "grant-permission",
            role,
            "--prefix=true",
            access,
            "/auth/",
        ]);
        t.etcd.ctl(&["user", "add", user, "--no-password"]);
        t.etcd.ctl(&["user", "grant-role", user, role]);
    }
    t.etcd.ctl(&["auth", "enable"]);
    let s = tls_settings(&t.etcd, "/auth", tls(&t.ca.ca_file, Some(&t.client)));
    let local = Arc::new(Mutex::new(vec![vm("one", &["one"])]));
    let reader = t.ca.client("fwd-a", "fwd-a");
    let (_watch, seen) = watcher(&tls_settings(
        &t.etcd,
        "/auth",
        tls(&t.ca.ca_file, Some(&reader)),
    ));
    let _p = publisher(&s, "a", &local);
    wait_for("the route, as user host-a", LONG, || {
        (vm_ids(&seen) == ["one"]).then_some(())
    });

    let intruder = t.ca.client("intruder", "intruder");
    let s = tls_settings(&t.etcd, "/auth", tls(&t.ca.ca_file, Some(&intruder)));
    let vms = Arc::new(Mutex::new(vec![vm("evil", &["one"])]));
    let source: Source = Box::new(move || Ok(vms.lock().unwrap().clone()));
    let p = Publisher::start(&s, host("x"), TTL, source).unwrap();
    refused_with(&p, "a user etcd does not know", "etcdserver");
    let claim = p.lock().claim("evil", &["evil".into()]);
    assert!(claim.is_err(), "{claim:?}");
    assert_eq!(vm_ids(&seen), ["one"]);
    let keys = t
        .etcd
        .ctl(&["get", "--prefix", "--keys-only", "/auth/v1/aliases/"]);
    assert!(!keys.contains("evil"), "{keys}");
}

/// etcd presenting a certificate this host does not trust, then fixed (a new
/// certificate, the member restarted): the publisher and the watcher, never restarted,
/// connect by themselves.
#[test]
fn a_refused_etcd_certificate_fixed_on_etcd_needs_no_restart_here() {
    let dir = TempDir::new("etcd-pki-fix");
    let (right, wrong) = (
        TestCa::new(dir.path(), "right"),
        TestCa::new(dir.path(), "wrong"),
    );
    let ip = ["127.0.0.1".parse().unwrap()];
    let client = right.client("host-a", "host-a");
    let served = wrong.server("etcd", &ip);
    // etcdctl trusts both, so that the test can tell the member is up either way.
    let both = dir.path().join("both-ca.pem");
    let pems = [&right.ca_file, &wrong.ca_file].map(|f| std::fs::read_to_string(f).unwrap());
    std::fs::write(&both, pems.concat()).unwrap();
    let mut etcd = EtcdCluster::loopback_tls(
        1,
        ServerTls {
            cert: served.cert.clone(),
            key: served.key.clone(),
            ca: both,
            client_cert_auth: true,
            etcdctl_identity: Some((client.cert.clone(), client.key.clone())),
        },
    );
    let s = tls_settings(&etcd, "/fix", tls(&right.ca_file, Some(&client)));
    let vms = Arc::new(Mutex::new(vec![vm("one", &["one"])]));
    let source: Source = {
        let vms = Arc::clone(&vms);
        Box::new(move || Ok(vms.lock().unwrap().clone()))
    };
    let p = Publisher::start(&s, host("a"), TTL, source).unwrap();
    let (_watch, seen) = watcher(&s);
    refused_with(&p, "a certificate of the wrong CA", "UnknownIssuer");

    let fixed = right.server("etcd-fixed", &ip);
    std::fs::copy(&fixed.cert, &served.cert).unwrap();
    std::fs::copy(&fixed.key, &served.key).unwrap();
    etcd.stop_member(0);
    etcd.start_member(0);
    etcd.wait_healthy(&[0]);
    let status = p.status();
    assert!(
        eventually(LONG, || status.connected()),
        "the publisher never connected after the fix: {}",
        etcd.logs()
    );
    wait_for("the route, after the fix", LONG, || {
        (vm_ids(&seen) == ["one"]).then_some(())
    });
}
