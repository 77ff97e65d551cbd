//! Crash safety: SIGKILL mergend at random moments during concurrent creates and
//! deletes; after a restart every VM dir is whole and listed, nothing half-written or
//! orphaned is left, every answered create survived and every answered delete is
//! complete. Start-up finishes what a crash interrupted and moves data dirs that no VM
//! owns aside.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{try_curl, Mergend, Roots};
use mergen_testkit::{eventually, XorShift};
use serde_json::Value;

/// Every VM dir is whole (its four files parse), addresses are unique, the API lists
/// exactly those, nothing temporary is left, and no data dir, run dir or lock file
/// exists without its VM (a data dir kept by retainData excepted), nor in
/// `.orphaned/`: the create and delete protocols leave no orphans to move.
fn check_whole(roots: &Roots, m: &Mergend) -> HashSet<String> {
    let names = |dir: std::path::PathBuf| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let leftovers: Vec<String> = names(roots.config())
        .into_iter()
        .filter(|n| n.starts_with(".tmp-") || n.starts_with(".del-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-written dirs left: {leftovers:?}"
    );
    let mut ips = HashSet::new();
    let mut ports = HashSet::new();
    let dirs: HashSet<String> = roots.vm_dirs().into_iter().collect();
    for id in &dirs {
        let cfg = roots.config().join(id);
        let parse = |f: &str| -> Value {
            serde_json::from_slice(&std::fs::read(cfg.join(f)).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{id}: {f}: {e}"))
        };
        let meta = parse("meta.json");
        assert_eq!(meta["id"], id.as_str());
        parse("vm.json");
        assert!(parse("hooks.json")["onStop"].is_array(), "{id}: hooks.json");
        assert!(std::fs::read_to_string(cfg.join("env"))
            .unwrap()
            .contains(&format!("MGN_VM_ID='{id}'")));
        assert!(
            roots.data().join(id).join("logs").is_dir(),
            "{id}: logs dir"
        );
        assert!(roots.run().join(id).is_dir(), "{id}: run dir");
        assert!(
            ips.insert(meta["guestIP"].as_str().unwrap().to_string()),
            "{id}: IP reused"
        );
        for p in meta["ports"].as_array().unwrap() {
            assert!(
                ports.insert(p["host"].as_u64().unwrap()),
                "{id}: port reused"
            );
        }
    }
    let is_id = |n: &str| n.len() == 36 && n.bytes().filter(|b| *b == b'-').count() == 4;
    for n in names(roots.data()).into_iter().filter(|n| is_id(n)) {
        assert!(
            dirs.contains(&n) || roots.data().join(&n).join(".mergen-retained").is_file(),
            "data dir {n} without its VM"
        );
    }
    assert!(
        names(roots.data().join(".orphaned")).is_empty(),
        "orphans were made"
    );
    for n in names(roots.run()) {
        let id = n.strip_suffix(".lock").unwrap_or(&n);
        if is_id(id) {
            assert!(dirs.contains(id), "run root entry {n} without its VM");
        }
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

const CIDR: (&str, &str) = ("MGR_GUEST_CIDR", "10.98.0.0/16");

fn create_body(roots: &Roots) -> String {
    roots.body_with(
        r#","ports":[{"guest":80,"host":0}],"hooks":{"onStop":[{"type":"exec","cmd":["true"]}]}"#,
    )
}

/// Run `calls` in parallel (one thread each); SIGKILL mergend once `after` of them
/// have been answered (plus a random sub-call delay, so the kill lands at different
/// points inside one). Returns what each call answered (None: cut off by the kill).
fn kill_during(
    m: &Mergend,
    calls: Vec<Vec<String>>,
    after: usize,
    rng: &mut XorShift,
) -> Vec<Option<(u16, String)>> {
    let done = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = calls
        .into_iter()
        .map(|args| {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let r = try_curl(&args).ok();
                done.fetch_add(1, Ordering::Relaxed);
                r
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(60), || {
        done.load(Ordering::Relaxed) >= after
    }));
    std::thread::sleep(Duration::from_micros(rng.next_u64() % 3000));
    m.signal(rustix::process::Signal::KILL);
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// SIGKILL during 50 concurrent creates and during 20 concurrent deletes (half of
/// them keeping the data): after each restart every VM is whole, addresses are unique,
/// every answered create survived, every answered delete is complete, and nothing is
/// orphaned.
#[test]
fn sigkill_during_concurrent_creates_and_deletes_leaves_only_whole_vms() {
    let roots = Roots::new("crash");
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut created: HashSet<String> = HashSet::new();
    let mut deleted: Vec<(String, bool)> = Vec::new();
    let mut swept = 0;
    for round in 0..6 {
        let m = Mergend::start(&roots, &[CIDR]);
        let present = check_whole(&roots, &m);
        swept += usize::from(m.log_text().contains("removed a half-written VM dir"));
        assert!(
            created.is_subset(&present),
            "round {round}: an answered create was lost"
        );
        for (id, retained) in &deleted {
            assert!(
                !present.contains(id),
                "round {round}: answered delete of {id} undone"
            );
            let data = roots.data().join(id);
            assert_eq!(data.is_dir(), *retained, "{id}: data dir after delete");
        }
        if round % 2 == 0 {
            let url = m.url("/v1/vms");
            let body = create_body(&roots);
            let calls = (0..50)
                .map(|_| {
                    ["-X", "POST", &url, "--data-binary", &body]
                        .map(String::from)
                        .to_vec()
                })
                .collect();
            let after = (rng.next_u64() % 10) as usize;
            for (code, out) in kill_during(&m, calls, after, &mut rng)
                .into_iter()
                .flatten()
            {
                if code == 201 {
                    let v: Value = serde_json::from_str(&out).unwrap();
                    created.insert(v["id"].as_str().unwrap().to_string());
                }
            }
        } else {
            // At least 20 VMs to delete.
            for _ in present.len()..20 {
                let (code, v) = m.create(&create_body(&roots));
                assert_eq!(code, 201, "{v}");
                created.insert(v["id"].as_str().unwrap().to_string());
            }
            let victims: Vec<String> = roots.vm_dirs().into_iter().take(20).collect();
            let calls = victims
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let q = if i % 2 == 0 { "?retainData=true" } else { "" };
                    ["-X", "DELETE", &m.url(&format!("/v1/vms/{id}{q}"))]
                        .map(String::from)
                        .to_vec()
                })
                .collect();
            let after = (rng.next_u64() % 5) as usize;
            let answers = kill_during(&m, calls, after, &mut rng);
            for ((i, id), answer) in victims.iter().enumerate().zip(answers) {
                // A delete cut off by the kill may or may not have committed.
                created.remove(id);
                if matches!(answer, Some((200, _))) {
                    deleted.push((id.clone(), i % 2 == 0));
                }
            }
        }
        drop(m);
    }
    let m = Mergend::start(&roots, &[CIDR]);
    let present = check_whole(&roots, &m);
    swept += usize::from(m.log_text().contains("removed a half-written VM dir"));
    eprintln!("{swept} of 6 kills landed inside a create or delete (finished at restart)");
    assert!(created.is_subset(&present), "an answered create was lost");
    for (id, retained) in &deleted {
        assert!(!present.contains(id));
        let data = roots.data().join(id);
        assert_eq!(data.is_dir(), *retained, "{id}");
        if *retained {
            assert!(data.join(".mergen-retained").is_file(), "{id}: marker");
        }
    }
}

/// Start-up finishes an interrupted delete as it was asked (keeping or removing the
/// data), removes locks and run dirs of VMs that do not exist (a held lock excepted),
/// and moves a data dir without a VM under `.orphaned/` (never deleting it), listing
/// it in the log and in /metrics.
#[test]
fn start_up_finishes_deletes_and_moves_orphans_aside() {
    let roots = Roots::new("orphans");
    let id = |n: u8| format!("{n:x}1111111-2222-4333-8444-555555555555");
    let mk = |p: std::path::PathBuf| std::fs::create_dir_all(p).unwrap();
    // An interrupted delete that keeps the data, and one that does not.
    for (n, prefix) in [(1, ".del-retain-"), (2, ".del-")] {
        mk(roots.config().join(format!("{prefix}{}", id(n))));
        mk(roots.data().join(id(n)).join("logs"));
        mk(roots.run().join(id(n)));
    }
    // An orphan data dir (with a data disk in it), and one kept by retainData.
    mk(roots.data().join(id(3)).join("logs"));
    std::fs::write(roots.data().join(id(3)).join("disk.img"), b"precious").unwrap();
    mk(roots.data().join(id(4)));
    std::fs::write(roots.data().join(id(4)).join(".mergen-retained"), b"{}").unwrap();
    mk(roots.data().join("base"));
    // A stale lock and run dir; a lock somebody holds.
    std::fs::write(roots.run().join(format!("{}.lock", id(5))), b"").unwrap();
    mk(roots.run().join(id(5)));
    let held_path = roots.run().join(format!("{}.lock", id(6)));
    let held = std::fs::File::create(&held_path).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();

    let m = Mergend::start(&roots, &[]);
    assert!(roots.data().join(id(1)).join(".mergen-retained").is_file());
    assert!(!roots.run().join(id(1)).exists());
    assert!(!roots.data().join(id(2)).exists() && !roots.run().join(id(2)).exists());
    let moved = roots.data().join(".orphaned").join(id(3));
    assert_eq!(std::fs::read(moved.join("disk.img")).unwrap(), b"precious");
    assert!(!roots.data().join(id(3)).exists());
    assert!(roots.data().join(id(4)).is_dir() && roots.data().join("base").is_dir());
    assert!(!roots.run().join(format!("{}.lock", id(5))).exists());
    assert!(!roots.run().join(id(5)).exists());
    assert!(held_path.exists(), "a held lock is left alone");
    let log = m.log_text();
    assert!(log.contains(&id(3)) && log.contains(".orphaned"), "{log}");
    let (_, text) = m.curl("GET", "/metrics", &[]);
    assert!(text.contains("mergend_orphaned_data_dirs 1"), "{text}");
    assert!(
        text.contains(&format!(
            "mergend_orphaned_data_dir{{name=\"{}\"}} 1",
            id(3)
        )),
        "{text}"
    );
    drop(held);
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
