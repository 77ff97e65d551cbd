//! The plumbing itself: what the other crates' tests rely on.

use std::time::Duration;

use mergen_testkit::{
    eventually, first_child, mounts_naming, poll, running, unique_name, wait_for, ChildGuard,
    TempDir, XorShift,
};

#[test]
fn xorshift_is_the_reference_sequence_and_below_stays_in_range() {
    // Marsaglia's xorshift64 (13, 7, 17) from seed 1.
    let mut rng = XorShift(1);
    assert_eq!(rng.next_u64(), 1_082_269_761);
    assert_eq!(rng.next_u64(), 1_152_992_998_833_853_505);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    assert!((0..1000).all(|_| rng.below(7) < 7));
    assert_eq!(rng.below(0), 0);
}

#[test]
fn unique_names_differ_and_fit_a_link_name() {
    let (a, b) = (unique_name("tk"), unique_name("tk"));
    assert_ne!(a, b);
    assert!(a.starts_with(&format!("tk{}-", std::process::id())), "{a}");
    assert!(a.len() <= 15);
}

#[test]
#[should_panic(expected = "longer than 15 bytes")]
fn a_name_too_long_for_a_link_is_refused() {
    unique_name("much-too-long-");
}

#[test]
fn temp_dir_is_fresh_and_removed_on_drop() {
    let dir = TempDir::new("testkit");
    std::fs::write(dir.join("f"), "x").unwrap();
    let path = dir.path().to_path_buf();
    assert_ne!(path, TempDir::new("testkit").path());
    drop(dir);
    assert!(!path.exists());
}

#[test]
fn polling_returns_the_first_value_or_gives_up_at_the_deadline() {
    let mut n = 0;
    assert_eq!(
        poll(Duration::from_secs(5), || {
            n += 1;
            (n == 3).then_some(n)
        }),
        Some(3)
    );
    assert!(!eventually(Duration::from_millis(30), || false));
    assert!(eventually(Duration::ZERO, || true));
}

#[test]
#[should_panic(expected = "waiting for the impossible")]
fn wait_for_names_what_never_came() {
    wait_for("the impossible", Duration::from_millis(20), || None::<()>);
}

#[test]
fn require_root_returns_early_unless_root() {
    mergen_testkit::require_root!();
    assert!(mergen_testkit::is_root());
}

#[test]
fn running_follows_a_child_until_it_is_reaped() {
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    // Until its exec completes a child's command line may read as empty.
    assert!(eventually(Duration::from_secs(10), || {
        mergen_testkit::running(child.id())
    }));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!mergen_testkit::running(child.id()));
}

#[test]
fn child_guard_stops_its_child_on_drop() {
    use rustix::process::Signal;
    for graceful in [false, true] {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("60");
        let guard = if graceful {
            ChildGuard::spawn_graceful(&mut cmd, Signal::TERM)
        } else {
            ChildGuard::spawn(&mut cmd)
        };
        let pid = guard.0.id();
        assert!(eventually(Duration::from_secs(10), || running(pid)));
        drop(guard);
        assert!(!running(pid), "graceful={graceful}");
    }
}

#[test]
fn temp_dir_can_live_under_another_base() {
    let base = TempDir::new("testkit-base");
    let dir = TempDir::new_in(base.path(), "inner");
    assert_eq!(dir.path().parent(), Some(base.path()));
}

#[test]
fn first_child_follows_a_chain_of_processes() {
    // unshare → sleep, the sleep killed by the kernel when unshare dies (--kill-child
    // is PR_SET_PDEATHSIG), so the guard's SIGKILL takes both.
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--fork", "--kill-child", "sleep", "60"]);
    let guard = ChildGuard::spawn(&mut cmd);
    let sleep = wait_for("the sleep", Duration::from_secs(10), || {
        first_child(guard.0.id()).filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c == "sleep\n")
        })
    });
    assert_eq!(first_child(sleep), None, "sleep has no child");
    drop(guard);
    assert!(eventually(Duration::from_secs(10), || !running(sleep)));
}

#[test]
fn mounts_naming_finds_a_mount_point_and_not_a_plain_directory() {
    assert!(!mounts_naming(std::path::Path::new("/proc")).is_empty());
    let dir = TempDir::new("tk-mounts");
    assert_eq!(mounts_naming(dir.path()), Vec::<String>::new());
}
