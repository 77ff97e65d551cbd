//! Crash safety: SIGKILL mergend at random moments during a stream of creates; after
//! a restart every VM dir is whole and listed, nothing half-written is left, and every
//! create that was answered 201 survived.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{try_curl, Mergend, Roots};
use mergen_testkit::{eventually, XorShift};
use serde_json::Value;

/// Every VM dir is whole, the API lists exactly those, and nothing temporary is left.
fn check_whole(roots: &Roots, m: &Mergend) -> HashSet<String> {
    let leftovers: Vec<String> = std::fs::read_dir(roots.config())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-") || n.starts_with(".del-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-written dirs left: {leftovers:?}"
    );
    let mut ips = HashSet::new();
    let dirs: HashSet<String> = roots.vm_dirs().into_iter().collect();
    for id in &dirs {
        let cfg = roots.config().join(id);
        let meta: Value = serde_json::from_slice(&std::fs::read(cfg.join("meta.json")).unwrap())
            .unwrap_or_else(|e| panic!("{id}: meta.json: {e}"));
        assert_eq!(meta["id"], id.as_str());
        let _: Value = serde_json::from_slice(&std::fs::read(cfg.join("vm.json")).unwrap())
            .unwrap_or_else(|e| panic!("{id}: vm.json: {e}"));
        assert!(std::fs::read_to_string(cfg.join("env"))
            .unwrap()
            .contains(&format!("MGN_VM_ID='{id}'")));
        assert!(
            roots.data().join(id).join("logs").is_dir(),
            "{id}: logs dir"
        );
        assert!(roots.run().join(id).is_dir(), "{id}: run dir");
        assert!(ips.insert(meta["guestIP"].as_str().unwrap().to_string()));
    }
    let (code, list) = m.get_json("/v1/vms");
    assert_eq!(code, 200);
    let listed: HashSet<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, dirs);
    dirs
}

#[test]
fn sigkill_during_creates_leaves_only_whole_vms() {
    let roots = Roots::new("crash");
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut swept = 0;
    for _round in 0..8 {
        let m = Mergend::start(&roots, &[("MGR_GUEST_CIDR", "10.98.0.0/16")]);
        let present = check_whole(&roots, &m);
        swept += usize::from(m.log_text().contains("removed a half-written VM dir"));
        for id in acked.lock().unwrap().iter() {
            assert!(
                present.contains(id),
                "acknowledged VM {id} lost by the crash"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let writers: Vec<_> = (0..3)
            .map(|_| {
                let (stop, done, acked) = (Arc::clone(&stop), Arc::clone(&done), Arc::clone(&acked));
                let url = m.url("/v1/vms");
                let body = roots.body_with(r#","ports":[{"guest":80,"host":0}],"hooks":{"onStop":[{"type":"exec","cmd":["true"]}]}"#);
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match try_curl(&["-X", "POST", &url, "--data-binary", &body]) {
                            Ok((201, out)) => {
                                let v: Value = serde_json::from_str(&out).unwrap();
                                acked.lock().unwrap().insert(v["id"].as_str().unwrap().to_string());
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => break,
                        }
                    }
                })
            })
            .collect();
        // Kill after a random number of creates plus a random sub-create delay, so the
        // kill lands at different points inside a create.
        let after = 1 + (rng.next_u64() % 8) as usize;
        assert!(eventually(Duration::from_secs(30), || done
            .load(Ordering::Relaxed)
            >= after));
        std::thread::sleep(Duration::from_micros(rng.next_u64() % 4000));
        m.signal(rustix::process::Signal::KILL);
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        drop(m);
    }
    let m = Mergend::start(&roots, &[("MGR_GUEST_CIDR", "10.98.0.0/16")]);
    let present = check_whole(&roots, &m);
    swept += usize::from(m.log_text().contains("removed a half-written VM dir"));
    eprintln!("{swept} of 8 kills landed inside a create (swept at restart)");
    let acked = acked.lock().unwrap();
    assert!(acked.is_subset(&present), "an acknowledged create was lost");
    assert!(present.len() >= 8);
}

#[test]
fn half_written_dirs_are_swept_or_reported_and_never_listed() {
    let roots = Roots::new("halfdirs");
    let tmp_id = "11111111-2222-4333-8444-555555555555";
    let tmp = roots.config().join(format!(".tmp-{tmp_id}"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("meta.json"), b"{\"id\": \"1111").unwrap();
    std::fs::create_dir_all(roots.data().join(tmp_id).join("logs")).unwrap();
    let del = roots
        .config()
        .join(".del-21111111-2222-4333-8444-555555555555");
    std::fs::create_dir_all(&del).unwrap();
    let no_meta = roots.config().join("31111111-2222-4333-8444-555555555555");
    std::fs::create_dir_all(&no_meta).unwrap();
    let bad_meta = roots.config().join("41111111-2222-4333-8444-555555555555");
    std::fs::create_dir_all(&bad_meta).unwrap();
    std::fs::write(bad_meta.join("meta.json"), b"{truncated").unwrap();

    let m = Mergend::start(&roots, &[]);
    assert!(!tmp.exists() && !del.exists(), "temporary dirs swept");
    assert!(
        !roots.data().join(tmp_id).exists(),
        "the uncommitted create's data dir swept"
    );
    assert!(
        no_meta.exists() && bad_meta.exists(),
        "unknown dirs are reported, not deleted"
    );
    let (_, list) = m.get_json("/v1/vms");
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    let log = m.log_text();
    assert!(
        log.contains("31111111-2222-4333-8444-555555555555") && log.contains("41111111"),
        "{log}"
    );
    let (code, _) = m.get_json("/v1/vms/41111111-2222-4333-8444-555555555555");
    assert_eq!(
        code, 500,
        "a dir with a corrupt meta.json is an error, not a VM"
    );
}
