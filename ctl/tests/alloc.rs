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
