//! mergen-init as PID 1 of new PID, mount, UTS and network namespaces, chrooted into
//! a small rootfs (busybox-static): the image's command runs with its environment,
//! working directory and user, gets the signal init receives, an orphaned grandchild
//! is reaped, the network and hostname come from the boot arguments, and init exits
//! with the command's code. Also as a plain process (not PID 1).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mergen_testkit::{
    busybox_rootfs, first_child, have_busybox, init_in_namespaces, require_root, ChildGuard,
    TempDir,
};
use rustix::process::Signal;

const SCRIPT: &str = r#"
trap 'echo got-TERM; exit 42' TERM
echo "env=$GREETING pwd=$(pwd) id=$(id -u):$(id -g) groups=$(id -G) home=$HOME host=$(hostname)"
ip -4 addr show eth0 | grep -q '10.9.0.2/24' && echo net-ok
ip route | grep -q 'default via 10.9.0.1' && echo route-ok
ip link show lo | grep -q 'LOOPBACK,UP' && echo lo-ok
orphan=$(sh -c 'sleep 0.3 >/dev/null & echo $!')
i=0
while [ $i -lt 100 ] && [ -e /proc/$orphan ]; do sleep 0.05; i=$((i+1)); done
[ $i -lt 100 ] && echo reaped || echo "zombie $(cat /proc/$orphan/stat)"
echo ready
while :; do sleep 0.05; done
"#;

/// A rootfs with busybox, users and groups, mergen-init and its metadata.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    let meta = serde_json::json!({
        "image": "test", "entrypoint": ["/bin/sh", "-c"], "cmd": [SCRIPT],
        "env": ["GREETING=hello", "PATH=/bin"], "workingDir": "/work", "user": "app"
    });
    busybox_rootfs(
        &root,
        &[
            "sh", "echo", "id", "pwd", "sleep", "grep", "hostname", "ip", "true",
        ],
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        "root:x:0:\napp:x:1000:\nwww:x:33:app\n",
        &meta.to_string(),
    );
    root
}

#[test]
fn pid1_in_a_namespace_runs_forwards_reaps_and_exits_with_the_code() {
    require_root!();
    if !have_busybox() {
        return;
    }
    let tmp = TempDir::new("init-pid1");
    let root = rootfs(tmp.path());
    // Guarded: a failing test's SIGKILL to unshare takes the namespace with it.
    let mut cmd = init_in_namespaces(
        &root,
        "ip link add eth0 type veth peer name peer0 && ip link set peer0 up",
    );
    cmd.env(
        "MERGEN_INIT_CMDLINE",
        "console=ttyS0 ip=10.9.0.2::10.9.0.1:255.255.255.0:guest1:eth0:off",
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(&mut cmd);
    let stdout = guard.0.stdout.take().unwrap();
    let stderr = guard.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let err_reader =
        std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l == "ready") {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("no `ready` from the command; got {lines:?}"),
        }
    }
    let unshare_pid = guard.pid();
    let init_pid = mergen_testkit::wait_for("init's pid", Duration::from_secs(5), || {
        first_child(unshare_pid as u32).map(|p| p as i32)
    });
    // SIGTERM to PID 1, from outside its namespace: init must pass it on.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(init_pid).unwrap(),
        Signal::TERM,
    )
    .unwrap();
    let status = mergen_testkit::wait_for("the namespace to end", Duration::from_secs(20), || {
        guard.0.try_wait().unwrap()
    });
    lines.extend(rx.try_iter());
    let err = err_reader.join().unwrap();
    let all = lines.join("\n");
    assert_eq!(status.code(), Some(42), "stdout:\n{all}\nstderr:\n{err}");
    assert!(all.contains("env=hello pwd=/work id=1000:1000"), "{all}");
    let groups = all
        .split("groups=")
        .nth(1)
        .and_then(|g| g.split(" home=").next())
        .unwrap_or_default();
    let mut groups: Vec<&str> = groups.split_whitespace().collect();
    groups.sort();
    assert_eq!(groups, ["1000", "33"], "{all}");
    assert!(all.contains("home=/home/app host=guest1"), "{all}");
    assert!(
        all.contains("net-ok") && all.contains("route-ok") && all.contains("lo-ok"),
        "network from ip=: {all}\n{err}"
    );
    assert!(all.contains("reaped"), "orphan not reaped: {all}");
    assert!(all.contains("got-TERM"), "signal not forwarded: {all}");
    assert!(err.contains("exited with code 42"), "{err}");
}

#[test]
fn not_pid1_runs_the_command_as_a_subreaper_and_touches_nothing_else() {
    let tmp = TempDir::new("init-proc");
    let meta = tmp.join("meta.json");
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    // The orphan is ours to reap (child subreaper); it then exits with 3.
    let script = "o=$(sh -c 'sleep 0.2 >/dev/null & echo $!'); i=0; while [ $i -lt 100 ] && [ -e /proc/$o ]; do sleep 0.05; i=$((i+1)); done; [ $i -lt 100 ] && echo reaped; echo \"cwd=$(pwd)\"; exit 3";
    fs::write(
        &meta,
        serde_json::json!({"startCmd": ["/bin/sh", "-c", script], "workingDir": tmp.path(), "user": format!("{uid}:{gid}")}).to_string(),
    )
    .unwrap();
    let hostname_before = rustix::system::uname().nodename().to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_mergen-init"))
        .env(
            "MERGEN_INIT_CMDLINE",
            format!(
                "mergen.meta={} mergen.hostname=must-not-change",
                meta.display()
            ),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("reaped"), "{stdout}");
    assert!(
        stdout.contains(&format!("cwd={}", tmp.path().display())),
        "{stdout}"
    );
    assert_eq!(
        rustix::system::uname().nodename(),
        hostname_before.as_c_str()
    );
}

#[test]
fn a_missing_command_exits_127_and_a_bad_user_fails() {
    let tmp = TempDir::new("init-bad");
    let run = |meta: serde_json::Value| {
        let p = tmp.join("meta.json");
        fs::write(&p, meta.to_string()).unwrap();
        Command::new(env!("CARGO_BIN_EXE_mergen-init"))
            .env(
                "MERGEN_INIT_CMDLINE",
                format!("mergen.meta={}", p.display()),
            )
            .output()
            .unwrap()
    };
    let uid = rustix::process::geteuid().as_raw();
    let out = run(serde_json::json!({"startCmd": ["/nonexistent/cmd"], "user": uid.to_string()}));
    assert_eq!(
        out.status.code(),
        Some(127),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(serde_json::json!({"startCmd": ["/bin/true"], "user": "no-such-user-here"}));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-user-here"));
}
