//! Start, stop and delete through a real supervisor (embedded, process runtime): the
//! lifecycle hooks, idempotence, autoStart, and a failed strict onStart that stops the
//! VM again.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};

use common::vms::{process_env, VmsGuard};
use common::{Mergend, Roots};
use mergen_testkit::require_root;
use serde_json::json;

static NET: AtomicU32 = AtomicU32::new(0);

/// A mergend with the embedded supervisor and process guests on a CIDR of its own.
fn daemon(roots: &Roots) -> (Mergend, VmsGuard) {
    let pid = std::process::id();
    let cidr = format!(
        "10.{}.{}.0/24",
        150 + pid % 50,
        (pid / 50 % 200) as usize + NET.fetch_add(1, Ordering::Relaxed) as usize
    );
    let env = process_env(&cidr);
    (Mergend::start(roots, &env), VmsGuard::new(roots, &env))
}

fn state(m: &Mergend, id: &str) -> String {
    let (code, s) = m.get_json(&format!("/v1/vms/{id}"));
    assert_eq!(code, 200, "{s}");
    s["state"].as_str().unwrap().to_string()
}

#[test]
fn autostart_hooks_idempotence_and_delete_of_a_running_vm() {
    require_root!();
    let roots = Roots::new("life");
    let (m, mut guard) = daemon(&roots);
    let log = roots.dir.join("events.txt");
    let rec = |word: &str| {
        json!({"type": "exec", "strict": true,
               "cmd": ["/bin/sh", "-c", format!("echo {word} {{{{.ID}}}} >> {}", log.display())]})
    };
    let body = json!({
        "process": {"cmd": ["/bin/sleep", "300"]},
        "autoStart": true,
        "hooks": {"onStart": [rec("start")], "onStop": [rec("stop")], "onDelete": [rec("delete")]},
    })
    .to_string();
    let (code, v) = m.create(&body);
    let id = v["id"].as_str().unwrap_or_default().to_string();
    guard.ids.push(id.clone());
    assert_eq!(code, 201, "{v}\n{}", m.log_text());
    assert_eq!(state(&m, &id), "running");
    let events = || std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(events(), format!("start {id}\n"));

    // Idempotent: a second start neither fails nor re-runs onStart.
    let (code, out) = m.curl("POST", &format!("/v1/vms/{id}/start"), &[]);
    assert_eq!(code, 200, "{out}");
    assert_eq!(out, format!("{{\"id\":\"{id}\",\"status\":\"started\"}}\n"));
    assert_eq!(events(), format!("start {id}\n"));

    for _ in 0..2 {
        let (code, out) = m.curl("POST", &format!("/v1/vms/{id}/stop"), &[]);
        assert_eq!(code, 200, "{out}");
        assert_eq!(out, format!("{{\"id\":\"{id}\",\"status\":\"stopped\"}}\n"));
        assert_eq!(state(&m, &id), "stopped");
    }
    assert_eq!(events(), format!("start {id}\nstop {id}\n"));

    // Delete of a running VM stops it first.
    let (code, out) = m.curl("POST", &format!("/v1/vms/{id}/start"), &[]);
    assert_eq!(code, 200, "{out}");
    assert_eq!(out, format!("{{\"id\":\"{id}\",\"status\":\"started\"}}\n"));
    assert_eq!(state(&m, &id), "running");
    let (code, out) = m.curl("DELETE", &format!("/v1/vms/{id}"), &[]);
    assert_eq!(code, 200, "{out}\n{}", m.log_text());
    assert_eq!(
        events(),
        format!("start {id}\nstop {id}\nstart {id}\ndelete {id}\n")
    );
    let (code, _) = m.get_json(&format!("/v1/vms/{id}"));
    assert_eq!(code, 404);
}

#[test]
fn failed_strict_onstart_stops_the_vm_again() {
    require_root!();
    let roots = Roots::new("lifefail");
    let (m, mut guard) = daemon(&roots);
    let body = json!({
        "process": {"cmd": ["/bin/sleep", "300"]},
        "hooks": {"onStart": [{"type": "exec", "cmd": ["false"], "strict": true}]},
    })
    .to_string();
    let (code, v) = m.create(&body);
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    guard.ids.push(id.clone());
    let (code, out) = m.curl("POST", &format!("/v1/vms/{id}/start"), &[]);
    assert_eq!(code, 502, "{out}");
    assert!(
        out.contains("hook_failed") && out.contains("stopped again"),
        "{out}"
    );
    assert_eq!(state(&m, &id), "stopped");
    // The same with autoStart: the VM exists, stopped, and the error names it.
    let body = json!({
        "process": {"cmd": ["/bin/sleep", "300"]},
        "autoStart": true,
        "hooks": {"onStart": [{"type": "exec", "cmd": ["false"], "strict": true}]},
    })
    .to_string();
    let (code, v) = m.create(&body);
    assert_eq!(code, 502, "{v}");
    let msg = v["message"].as_str().unwrap();
    let id2 = roots
        .vm_dirs()
        .into_iter()
        .find(|d| *d != id)
        .expect("the created VM stays");
    guard.ids.push(id2.clone());
    assert!(msg.contains(&id2), "{msg}");
    assert_eq!(state(&m, &id2), "stopped");
}
