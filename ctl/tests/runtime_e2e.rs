//! The whole stack with the process runtime and the embedded supervisor: a real mergend
//! creates and starts VMs whose guests are real HTTP servers inside their namespaces;
//! the VMs outlive a SIGKILLed mergend, a new mergend re-adopts them, and stop leaves
//! nothing behind.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Mergend, Roots};
use mergen_runtime::embedded::EmbeddedSupervisor;
use mergen_runtime::{steps, RuntimeConfig, Supervisor};

fn skip_unless_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return false;
    }
    eprintln!("SKIP: {test} needs root");
    true
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Stops every VM it knows about through the runtime directly (supervisor, guest,
/// namespace, links, table), so a failing test leaves nothing running.
struct VmsGuard {
    config: RuntimeConfig,
    ids: Vec<String>,
}

impl Drop for VmsGuard {
    fn drop(&mut self) {
        let Ok(sup) = EmbeddedSupervisor::new(self.config.clone()) else {
            return;
        };
        for id in &self.ids {
            if let Ok(meta) = steps::load_meta(&self.config, id) {
                let _ = sup.stop(&meta);
            }
            let _ = steps::net_cleanup(&self.config, id);
        }
    }
}

fn curl_body(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "2", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_body(url: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(b) = curl_body(url) {
            return b;
        }
        assert!(Instant::now() < deadline, "{url} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
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

/// nginx (Debian's) as a guest, listening on 8080 in its namespace, files under `dir`.
fn nginx_argv(dir: &std::path::Path, www: &std::path::Path) -> Vec<String> {
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  \
         fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n  \
         server {{ listen 8080; root {www}; }}\n}}\n",
        www = www.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let s = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    vec![
        "/usr/sbin/nginx".into(),
        "-c".into(),
        s(dir.join("nginx.conf")),
        "-p".into(),
        s(dir.to_path_buf()),
        "-e".into(),
        s(dir.join("error.log")),
    ]
}

fn run_out(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn process_vms_outlive_a_killed_mergend_and_are_readopted() {
    if skip_unless_root("process_vms_outlive_a_killed_mergend_and_are_readopted") {
        return;
    }
    let roots = Roots::new("rt-e2e");
    let pid = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 50 + pid % 50, 200 + pid % 50);
    let env = [
        ("MGR_RUNTIME", "process"),
        ("MGR_SUPERVISOR", "embedded"),
        ("MGR_GUEST_CIDR", cidr.as_str()),
        ("MGR_STOP_TIMEOUT_SECONDS", "5"),
    ];
    let mut lookup: HashMap<String, String> = common::env_for(&roots).into_iter().collect();
    for (k, v) in env {
        lookup.insert(k.into(), v.into());
    }
    lookup.insert("MGR_MERGEND_BIN".into(), common::BIN.into());
    let mut guard = VmsGuard {
        config: RuntimeConfig::from_lookup(|k| lookup.get(k).cloned()).unwrap(),
        ids: Vec::new(),
    };

    let mut mergend = Mergend::start(&roots, &env);
    let mut vms = Vec::new(); // (id, host port, page)
    for n in 0..5 {
        let www = roots.dir.join(format!("www{n}"));
        std::fs::create_dir_all(&www).unwrap();
        let page = format!("guest number {n}\n");
        std::fs::write(www.join("index.html"), &page).unwrap();
        let port = free_port();
        let argv = nginx_argv(&roots.dir.join(format!("nginx{n}")), &www);
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
        assert_eq!(&wait_body(&url, Duration::from_secs(30)), page);
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
        let sup_pid = before[id]["supervisor"]["pid"].as_u64().unwrap();
        let alive = std::fs::read(format!("/proc/{sup_pid}/cmdline")).is_ok_and(|c| !c.is_empty());
        assert!(!alive, "supervisor {sup_pid} still running");
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
