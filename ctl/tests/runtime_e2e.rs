//! The whole stack with the process runtime and the embedded supervisor: a real mergend
//! creates and starts VMs whose guests are real HTTP servers inside their namespaces;
//! the VMs outlive a SIGKILLed mergend, a new mergend re-adopts them, and stop leaves
//! nothing behind.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::vms::{process_env, VmsGuard};
use common::{Mergend, Roots};
use mergen_testkit::{curl_get, free_port, nginx, require_root, run_out, running, wait_for};

fn curl_body(url: &str) -> Option<String> {
    curl_get(None, url).ok()
}

fn listed(m: &Mergend) -> HashMap<String, serde_json::Value> {
    let (code, v) = m.get_json("/v1/vms");
    assert_eq!(code, 200, "{v}");
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_str().unwrap().to_string(), i.clone()))
        .collect()
}

#[test]
fn process_vms_outlive_a_killed_mergend_and_are_readopted() {
    require_root!();
    let roots = Roots::new("rt-e2e");
    let pid = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 50 + pid % 50, 200 + pid % 50);
    let env = process_env(&cidr);
    let mut guard = VmsGuard::new(&roots, &env);

    let mut mergend = Mergend::start(&roots, &env);
    let mut vms = Vec::new(); // (id, host port, page)
    for n in 0..5 {
        let www = roots.dir.join(format!("www{n}"));
        std::fs::create_dir_all(&www).unwrap();
        let page = format!("guest number {n}\n");
        std::fs::write(www.join("index.html"), &page).unwrap();
        let port = free_port();
        let argv = nginx::guest_argv(&roots.dir.join(format!("nginx{n}")), "8080", &www);
        let body = serde_json::json!({
            "process": {"cmd": argv},
            "ports": [{"guest": 8080, "host": port}],
            "tags": {"app": format!("e2e{n}")},
        })
        .to_string();
        let (code, v) = mergend.create(&body);
        assert_eq!(code, 201, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        guard.ids.push(id.clone());
        let (code, out) = mergend.curl("POST", &format!("/v1/vms/{id}/start"), &[]);
        assert_eq!(code, 200, "{out}\n{}", mergend.log_text());
        vms.push((id, port, page));
    }
    for (_, port, page) in &vms {
        let url = format!("http://127.0.0.1:{port}/index.html");
        let body = wait_for(&format!("{url} to answer"), Duration::from_secs(30), || {
            curl_body(&url)
        });
        assert_eq!(&body, page);
    }
    let before = listed(&mergend);
    for (id, _, _) in &vms {
        let item = &before[id];
        assert_eq!(item["state"], "running", "{item}");
        assert_eq!(item["supervisor"]["kind"], "embedded");
        assert_eq!(item["supervisor"]["active"], true);
        assert_eq!(item["systemd"]["available"], false);
    }

    mergend.signal(rustix::process::Signal::KILL);
    assert!(mergend.wait_exit(Duration::from_secs(10)).is_some());
    for (_, port, page) in &vms {
        let url = format!("http://127.0.0.1:{port}/index.html");
        assert_eq!(
            curl_body(&url).as_ref(),
            Some(page),
            "VM stopped serving with mergend gone"
        );
    }

    let mergend = Mergend::start(&roots, &env);
    let after = listed(&mergend);
    for (id, _, _) in &vms {
        assert_eq!(after[id]["state"], "running", "{}", after[id]);
        assert_eq!(
            after[id]["supervisor"]["pid"], before[id]["supervisor"]["pid"],
            "re-adopted a different supervisor"
        );
    }

    for (id, port, _) in &vms {
        let (code, out) = mergend.curl("POST", &format!("/v1/vms/{id}/stop"), &[]);
        assert_eq!(code, 200, "{out}");
        let (code, _) = mergend.curl("POST", &format!("/v1/vms/{id}/stop"), &[]);
        assert_eq!(code, 200, "stop is idempotent");
        assert!(curl_body(&format!("http://127.0.0.1:{port}/")).is_none());
        let sup_pid = before[id]["supervisor"]["pid"].as_u64().unwrap() as u32;
        assert!(!running(sup_pid), "supervisor {sup_pid} still running");
    }
    let gone = listed(&mergend);
    let netns = run_out(&["ip", "netns", "list"]);
    let links = run_out(&["ip", "-o", "link"]);
    let tables = run_out(&["nft", "list", "tables"]);
    for (id, _, _) in &vms {
        assert_eq!(gone[id]["state"], "stopped");
        let id8 = &id[..8];
        assert!(
            !netns.contains(&format!("mergen-{id8}")),
            "namespace of {id} left"
        );
        assert!(!links.contains(&format!("vh-{id8}")), "veth of {id} left");
        assert!(
            !tables.contains(&format!("mergen-{id8}")),
            "table of {id} left"
        );
    }
}
