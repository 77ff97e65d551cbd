//! Allocation is race-free across threads and processes: concurrent creates from many
//! curl processes against two mergend processes on the same roots.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{try_curl, Mergend, Roots};
use serde_json::Value;

#[test]
fn hundred_concurrent_creates_on_two_daemons_never_collide() {
    let roots = Roots::new("alloc");
    let a = Mergend::start(&roots, &[]);
    let b = Mergend::start(&roots, &[]);
    let urls = Arc::new([a.url("/v1/vms"), b.url("/v1/vms")]);
    let body =
        Arc::new(roots.body_with(r#","ports":[{"guest":80,"host":0},{"guest":443,"host":0}]"#));
    let clients: Vec<_> = (0..10)
        .map(|t| {
            let urls = Arc::clone(&urls);
            let body = Arc::clone(&body);
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| {
                        let url = &urls[(t + i) % 2];
                        try_curl(&["-X", "POST", url, "--data-binary", &body]).expect("curl")
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for c in clients {
        for (code, out) in c.join().unwrap() {
            assert_eq!(code, 201, "{out}");
            let v: Value = serde_json::from_str(&out).unwrap();
            ids.insert(v["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(ids.len(), 100);
    assert_eq!(roots.vm_dirs().len(), 100);
    let mut ips = HashSet::new();
    let mut ports = HashSet::new();
    for id in &ids {
        let meta: Value = serde_json::from_slice(
            &std::fs::read(roots.config().join(id).join("meta.json")).unwrap(),
        )
        .unwrap();
        assert!(
            ips.insert(meta["guestIP"].as_str().unwrap().to_string()),
            "repeated IP {}",
            meta["guestIP"]
        );
        for p in meta["ports"].as_array().unwrap() {
            assert!(
                ports.insert(p["host"].as_u64().unwrap()),
                "repeated host port {}",
                p["host"]
            );
        }
    }
    assert_eq!(ports.len(), 200);
    for m in [&a, &b] {
        let (code, list) = m.get_json("/v1/vms");
        assert_eq!(code, 200);
        assert_eq!(list["items"].as_array().unwrap().len(), 100);
    }
}

#[test]
fn exhausted_cidr_or_port_range_is_409() {
    let roots = Roots::new("exhaust");
    let m = Mergend::start(
        &roots,
        &[
            ("MGR_GUEST_CIDR", "10.99.0.0/29"),
            ("MGR_PORT_START", "30000"),
            ("MGR_PORT_END", "30002"),
        ],
    );
    // /29: hosts .2 to .6 are guests.
    for i in 2..=6 {
        let (code, v) = m.create(&roots.body());
        assert_eq!(code, 201, "{v}");
        let (_, s) = m.get_json(&format!("/v1/vms/{}", v["id"].as_str().unwrap()));
        assert_eq!(s["network"]["guestIP"], format!("10.99.0.{i}"));
    }
    let (code, v) = m.create(&roots.body());
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["error"], "conflict");
    assert!(
        v["message"].as_str().unwrap().contains("no free guest IP"),
        "{v}"
    );

    let roots = Roots::new("exhaustports");
    let m = Mergend::start(
        &roots,
        &[("MGR_PORT_START", "30000"), ("MGR_PORT_END", "30002")],
    );
    let two = roots.body_with(r#","ports":[{"guest":80,"host":0},{"guest":81,"host":0}]"#);
    assert_eq!(m.create(&two).0, 201);
    let (code, v) = m.create(&two);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("no free host port"),
        "{v}"
    );
    let (code, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"host":30000}]"#));
    assert_eq!(code, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("30000"), "{v}");
    assert_eq!(roots.vm_dirs().len(), 1, "failed creates wrote nothing");
}

/// A copy of VM `from`'s dir as VM `to`, holding `ip` and host `port`, committed as a
/// create commits (built aside, renamed into place): a VM mergend did not make.
fn copy_vm(roots: &Roots, from: &str, to: &str, ip: &str, port: u16) {
    let mut meta: Value = serde_json::from_slice(
        &std::fs::read(roots.config().join(from).join("meta.json")).unwrap(),
    )
    .unwrap();
    meta["id"] = to.into();
    meta["guestIP"] = ip.into();
    meta["ports"][0]["host"] = port.into();
    let tmp = roots.config().join(format!(".tmp-{to}"));
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(
        tmp.join("meta.json"),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .unwrap();
    std::fs::rename(&tmp, roots.config().join(to)).unwrap();
}

fn listed(m: &Mergend) -> Vec<String> {
    let (code, list) = m.get_json("/v1/vms");
    assert_eq!(code, 200, "{list}");
    let mut ids: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// (id, guest IP, first host port or 0) of a create that must succeed.
fn created(m: &Mergend, body: &str) -> (String, String, u64) {
    let (code, v) = m.create(body);
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (_, s) = m.get_json(&format!("/v1/vms/{id}"));
    (
        id,
        s["network"]["guestIP"].as_str().unwrap().to_string(),
        s["network"]["ports"][0]["host"].as_u64().unwrap_or(0),
    )
}

/// mergend allocates from what it has read, not from the disk each time: VM dirs
/// added, edited and removed behind its back, damaged or unreadable, are still in the
/// very next create and list (no waiting, no restart).
#[test]
fn files_changed_behind_mergends_back_are_in_the_next_call() {
    let roots = Roots::new("behind");
    let m = Mergend::start(
        &roots,
        &[
            ("MGR_GUEST_CIDR", "10.98.0.0/29"),
            ("MGR_PORT_START", "30000"),
            ("MGR_PORT_END", "30009"),
        ],
    );
    let body = roots.body_with(r#","ports":[{"guest":80,"host":0}]"#);
    let (a, ip, port) = created(&m, &body);
    assert_eq!((ip.as_str(), port), ("10.98.0.2", 30000));

    // Added: another VM holding .3 and 30001.
    let b = "bbbbbbbb-0000-4000-8000-000000000001";
    copy_vm(&roots, &a, b, "10.98.0.3", 30001);
    assert_eq!(listed(&m), sorted(&[&a, b]));
    let (c, ip, port) = created(&m, &body);
    assert_eq!((ip.as_str(), port), ("10.98.0.4", 30002));

    // Edited in place: b now holds .5 and 30004, so .3 and 30001 are free again.
    let path = roots.config().join(b).join("meta.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("10.98.0.3", "10.98.0.5")
            .replace("30001", "30004"),
    )
    .unwrap();
    let (d, ip, port) = created(&m, &body);
    assert_eq!((ip.as_str(), port), ("10.98.0.3", 30001));

    // Removed by hand: .5 and 30004 are free again, and b is no longer listed.
    std::fs::remove_dir_all(roots.config().join(b)).unwrap();
    assert_eq!(listed(&m), sorted(&[&a, &c, &d]));
    let (e, ip, port) = created(&m, &body);
    assert_eq!((ip.as_str(), port), ("10.98.0.5", 30003));

    // A damaged meta.json (not a VM the model can read) still holds the last IP.
    let f = roots.config().join("ffffffff-0000-4000-8000-000000000002");
    std::fs::create_dir(&f).unwrap();
    std::fs::write(
        f.join("meta.json"),
        br#"{"id":"ffffffff-0000-4000-8000-000000000002","guestIP":"10.98.0.6","createdAt":"yesterday"}"#,
    )
    .unwrap();
    let (code, v) = m.create(&body);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("no free guest IP"),
        "{v}"
    );
    assert_eq!(listed(&m), sorted(&[&a, &c, &d, &e]));

    // Not even JSON: creates are refused, naming it, until it is fixed.
    std::fs::write(f.join("meta.json"), b"{\"guestIP\": \"10.98").unwrap();
    let (code, v) = m.create(&body);
    assert_eq!(code, 500, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&f.display().to_string()),
        "{v}"
    );
    std::fs::remove_dir_all(&f).unwrap();
    let (_, ip, _) = created(&m, &body);
    assert_eq!(ip, "10.98.0.6");
}

fn sorted(ids: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// A create cut short by a crash (its dir still under its temporary name) and a
/// delete cut short after its commit hold nothing once mergend is back: start-up rolls
/// them back or finishes them before it reads the store.
#[test]
fn a_crash_mid_create_leaves_nothing_held_after_restart() {
    let roots = Roots::new("crashindex");
    let env = [("MGR_GUEST_CIDR", "10.97.0.0/29")];
    let mut m = Mergend::start(&roots, &env);
    let (a, ip, _) = created(&m, &roots.body_with(r#","ports":[{"guest":80,"host":0}]"#));
    assert_eq!(ip, "10.97.0.2");
    m.signal(rustix::process::Signal::KILL);
    m.wait_exit(std::time::Duration::from_secs(10))
        .expect("mergend killed");

    // What a crash leaves: a create built but never renamed into place (holding .3),
    // a delete renamed away but not removed (holding .4).
    let unfinished = "cccccccc-0000-4000-8000-000000000003";
    copy_vm(&roots, &a, unfinished, "10.97.0.3", 30003);
    std::fs::rename(
        roots.config().join(unfinished),
        roots.config().join(format!(".tmp-{unfinished}")),
    )
    .unwrap();
    let deleted = "dddddddd-0000-4000-8000-000000000004";
    copy_vm(&roots, &a, deleted, "10.97.0.4", 30004);
    std::fs::rename(
        roots.config().join(deleted),
        roots.config().join(format!(".del-{deleted}")),
    )
    .unwrap();

    let m = Mergend::start(&roots, &env);
    assert_eq!(listed(&m), std::slice::from_ref(&a));
    assert_eq!(roots.vm_dirs(), std::slice::from_ref(&a));
    let (_, ip, _) = created(&m, &roots.body());
    assert_eq!(ip, "10.97.0.3");
    let (_, ip, _) = created(&m, &roots.body());
    assert_eq!(ip, "10.97.0.4");
}

/// Every live VM's guest IP and host ports, read from the files: none repeated.
fn assert_unique_on_disk(roots: &Roots) -> Vec<String> {
    let dirs = roots.vm_dirs();
    let (mut ips, mut ports) = (HashSet::new(), HashSet::new());
    for id in &dirs {
        let meta: Value = serde_json::from_slice(
            &std::fs::read(roots.config().join(id).join("meta.json")).unwrap(),
        )
        .unwrap();
        let ip = meta["guestIP"].as_str().unwrap().to_string();
        assert!(ips.insert(ip.clone()), "repeated guest IP {ip}");
        for p in meta["ports"].as_array().unwrap() {
            let host = p["host"].as_u64().unwrap();
            assert!(ports.insert(host), "repeated host port {host}");
        }
    }
    dirs
}

/// Creates and deletes racing on two mergends over a range small enough that freed
/// addresses are handed out again: what each create gets is unique among the live VMs,
/// each answer is in the other daemon's very next list (a create listed, a delete
/// gone), and a restarted mergend rebuilds the same picture from the files and keeps
/// allocating without a collision.
#[test]
fn creates_and_deletes_racing_on_two_daemons_stay_unique_across_a_restart() {
    let roots = Roots::new("churn");
    // /27: guests .2 to .30 (29); 40 host ports. At most 6 threads x 2 + 8 are live.
    let env = [
        ("MGR_GUEST_CIDR", "10.96.0.0/27"),
        ("MGR_PORT_START", "31000"),
        ("MGR_PORT_END", "31039"),
    ];
    let daemons = Arc::new([Mergend::start(&roots, &env), Mergend::start(&roots, &env)]);
    let body = Arc::new(roots.body_with(r#","ports":[{"guest":80,"host":0}]"#));
    for i in 0..8 {
        created(&daemons[i % 2], &body);
    }
    let clients: Vec<_> = (0..6)
        .map(|t| {
            let daemons = Arc::clone(&daemons);
            let body = Arc::clone(&body);
            std::thread::spawn(move || {
                let mut mine: Vec<String> = Vec::new();
                for round in 0..8 {
                    let (here, there) = (&daemons[(t + round) % 2], &daemons[(t + round + 1) % 2]);
                    let (code, v) = here.create(&body);
                    assert_eq!(code, 201, "{v}");
                    let id = v["id"].as_str().unwrap().to_string();
                    assert!(listed(there).contains(&id), "{id} created, not listed");
                    mine.push(id);
                    if mine.len() == 2 {
                        let old = mine.remove(0);
                        let (code, out) = there.curl("DELETE", &format!("/v1/vms/{old}"), &[]);
                        assert_eq!(code, 200, "{out}");
                        assert!(!listed(here).contains(&old), "{old} deleted, still listed");
                        assert_eq!(here.get_json(&format!("/v1/vms/{old}")).0, 404);
                    }
                }
                mine
            })
        })
        .collect();
    let mut left = Vec::new();
    for c in clients {
        left.extend(c.join().unwrap());
    }
    assert_eq!(left.len(), 6);
    let dirs = assert_unique_on_disk(&roots);
    assert_eq!(dirs.len(), 8 + 6);
    for m in daemons.iter() {
        assert_eq!(listed(m), dirs);
    }

    // One of them restarts: the same picture, read back from the files; creates on
    // both again, concurrently, still collide with nothing.
    let [mut a, b] = Arc::into_inner(daemons).expect("clients joined");
    a.signal(rustix::process::Signal::KILL);
    a.wait_exit(std::time::Duration::from_secs(10))
        .expect("mergend killed");
    drop(a);
    let a = Mergend::start(&roots, &env);
    assert_eq!(listed(&a), dirs);
    let both = [&a, &b];
    std::thread::scope(|s| {
        for t in 0..6 {
            let (m, body) = (both[t % 2], &body);
            s.spawn(move || created(m, body));
        }
    });
    let dirs = assert_unique_on_disk(&roots);
    assert_eq!(dirs.len(), 8 + 6 + 6);
    assert_eq!(listed(&a), dirs);
    assert_eq!(listed(&b), dirs);
}
