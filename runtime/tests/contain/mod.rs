//! Process VMs made from an image (`process.root`): `mergend vm contain` boots the
//! image's own mergen-init as PID 1 of new namespaces, chrooted into a small busybox
//! rootfs built here, inside the VM's network namespace. The image's command gets the
//! image's env, user and working dir and none of mergend's; SIGTERM reaches it however
//! early it is sent; the launcher exits with the command's code; and when the supervisor
//! has to SIGKILL the launcher, nothing of the guest survives.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use mergen_model::{names, Meta, ProcessSpec};
use mergen_runtime::embedded::EmbeddedSupervisor;
use mergen_runtime::guest::{self, GuestKind};
use mergen_runtime::{procs, state, steps, Supervisor, VmState};
use mergen_testkit::{
    busybox_rootfs, first_child, have_busybox, mounts_naming, require_root, wait_for, ChildGuard,
    TempDir,
};
use rustix::process::Signal;

use crate::{assert_nothing_left, unique_cidr, Host};

/// A rootfs as mergen-image makes one, starting `script` as user `app` in `/work`.
fn rootfs(dir: &Path, script: &str) -> PathBuf {
    let root = dir.join("rootfs");
    busybox_rootfs(
        &root,
        &[
            "sh", "echo", "env", "id", "pwd", "sleep", "hostname", "cat", "cut", "true",
        ],
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        "root:x:0:\napp:x:1000:\n",
        "",
    );
    std::os::unix::fs::chown(root.join("work"), Some(1000), Some(1000)).unwrap();
    set_script(&root, script);
    root
}

fn set_script(root: &Path, script: &str) {
    let meta = serde_json::json!({
        "image": "test", "entrypoint": ["/bin/sh", "-c"], "cmd": [script],
        "env": ["GREETING=hello", "PATH=/bin"], "workingDir": "/work", "user": "app"
    });
    fs::write(root.join("etc/mergen/image-meta.json"), meta.to_string()).unwrap();
}

/// A VM booting a rootfs of its own (in a temp dir) on a host of its own; its network
/// is removed on drop.
struct ImageVm {
    tmp: TempDir,
    root: PathBuf,
    host: Host,
    meta: Meta,
}

impl ImageVm {
    /// None (after a loud SKIP) without busybox-static.
    fn new(name: &str, script: &str, extra: &[(&str, &str)]) -> Option<ImageVm> {
        if !have_busybox() {
            return None;
        }
        let tmp = TempDir::new(name);
        let root = rootfs(tmp.path(), script);
        let host = Host::new(&unique_cidr(), extra);
        let spec = ProcessSpec {
            root: Some(root.to_string_lossy().into_owned()),
            ..ProcessSpec::default()
        };
        let meta = host.vm(2, vec![], Some(spec));
        Some(ImageVm {
            tmp,
            root,
            host,
            meta,
        })
    }

    fn log(&self) -> PathBuf {
        self.tmp.join("guest.log")
    }

    /// The guest command (what `vm run` and the supervisor start) after net-setup,
    /// its output in [`Self::log`].
    fn launch(&self) -> ChildGuard {
        steps::net_setup(&self.host.config, &self.meta).unwrap();
        let mut cmd = guest::command(GuestKind::Process, &self.host.config, &self.meta).unwrap();
        let out = fs::File::create(self.log()).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        ChildGuard::spawn(&mut cmd)
    }

    /// Wait for the launcher's exit; the guest's log goes to stderr (shown when an
    /// assertion after it fails).
    fn wait_exit(&self, guard: &mut ChildGuard) -> ExitStatus {
        let status = wait_for("the launcher to exit", Duration::from_secs(30), || {
            guard.0.try_wait().unwrap()
        });
        eprintln!(
            "--- guest log ({status}):\n{}",
            fs::read_to_string(self.log()).unwrap_or_default()
        );
        status
    }
}

impl Drop for ImageVm {
    fn drop(&mut self) {
        let _ = steps::net_cleanup(&self.host.config, &self.meta.id);
    }
}

fn ns_ino(pid: &str, ns: &str) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/{ns}")).unwrap().ino()
}

/// Whether `pid` blocks `sig` (from `SigBlk` in /proc/<pid>/status).
fn blocks(pid: u32, sig: Signal) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|m| m & (1 << (sig.as_raw() - 1)) != 0)
}

fn kill(pid: u32, sig: Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), sig)
        .unwrap();
}

pub fn an_image_guest_runs_its_command_as_in_a_vm_and_exits_with_its_code() {
    require_root!();
    let script = r#"
        { echo "id=$(id -u):$(id -g) pwd=$(pwd) host=$(hostname)"; env; } > /work/out
        echo "pid1=$(cat /proc/1/comm) me=$$ pgid=$(cut -d' ' -f5 /proc/$$/stat)" >> /work/out
        cat /proc/mounts > /work/mounts
        exit 7
    "#;
    let Some(vm) = ImageVm::new("contain-run", script, &[]) else {
        return;
    };
    let mut launcher = vm.launch();
    let status = vm.wait_exit(&mut launcher);
    assert_eq!(status.code(), Some(7), "the command's exit code");
    let out = fs::read_to_string(vm.root.join("work/out")).unwrap();
    let id8 = names::short_id(&vm.meta.id);
    assert!(
        out.contains(&format!("id=1000:1000 pwd=/work host=mergen-{id8}")),
        "{out}"
    );
    assert!(out.contains("GREETING=hello"), "the image's env: {out}");
    assert!(
        out.contains("pid1=init me=2 pgid=2"),
        "init is PID 1 of its namespace, the command its child in a process group of its own: {out}"
    );
    // What mergen-init mounts in a VM, it mounts here, in the guest's own mount table.
    let mounts = fs::read_to_string(vm.root.join("work/mounts")).unwrap();
    for (target, fstype) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/run", "tmpfs"),
        ("/tmp", "tmpfs"),
    ] {
        assert!(
            mounts.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&target) && f.get(2) == Some(&fstype)
            }),
            "no {fstype} on {target} in the guest:\n{mounts}"
        );
    }
    // Neither mergend's settings and secrets nor the VM's MGN_* variables: a VM's
    // command sees the image's env only.
    for leak in ["MGR_", "MGN_", "AWS_", "MERGEN_INIT"] {
        assert!(!out.contains(leak), "{leak}* reached the command: {out}");
    }
    assert!(
        mounts_naming(&vm.root).is_empty(),
        "{:?}",
        mounts_naming(&vm.root)
    );
}

pub fn an_image_guest_gets_sigterm_however_early_it_comes() {
    require_root!();
    let Some(vm) = ImageVm::new("contain-term", "exec sleep 60", &[]) else {
        return;
    };
    // SIGTERM the moment the launcher can take it, before it has even started init:
    // the launcher must hold it until init can take it (PID 1 of a namespace drops
    // signals it does not handle), and init passes it on. Lost, `sleep 60` would run
    // on and exit 0.
    let mut launcher = vm.launch();
    let pid = launcher.pid() as u32;
    wait_for(
        "the launcher to block SIGTERM",
        Duration::from_secs(20),
        || blocks(pid, Signal::TERM).then_some(()),
    );
    kill(pid, Signal::TERM);
    let status = vm.wait_exit(&mut launcher);
    assert_eq!(status.code(), Some(128 + 15), "sleep killed by SIGTERM");

    // Once running: the command's traps get SIGHUP and SIGINT (and it runs on), then
    // SIGTERM, each sent to the launcher; the last trap's exit code is the launcher's. Meanwhile init is PID 1 of its own PID namespace, in the
    // VM's network namespace, chrooted into the image.
    set_script(
        &vm.root,
        "trap 'echo hup >> /work/got' HUP; trap 'echo int >> /work/got' INT; trap 'echo term >> /work/got; exit 42' TERM; echo ready > /work/ready; while :; do sleep 0.05; done",
    );
    let mut launcher = vm.launch();
    let pid = launcher.pid() as u32;
    wait_for("the command to be ready", Duration::from_secs(20), || {
        vm.root.join("work/ready").exists().then_some(())
    });
    let init = first_child(pid)
        .expect("init is the launcher's child")
        .to_string();
    assert_ne!(ns_ino(&init, "pid"), ns_ino("self", "pid"));
    assert_ne!(ns_ino(&init, "mnt"), ns_ino("self", "mnt"));
    assert_eq!(
        ns_ino(&init, "net"),
        fs::metadata(format!("/run/netns/{}", vm.meta.netns))
            .unwrap()
            .ino()
    );
    assert_eq!(
        fs::read_link(format!("/proc/{init}/root")).unwrap(),
        vm.root.canonicalize().unwrap()
    );
    let got = || fs::read_to_string(vm.root.join("work/got")).unwrap_or_default();
    for (sig, seen) in [(Signal::HUP, "hup\n"), (Signal::INT, "hup\nint\n")] {
        kill(pid, sig);
        wait_for(seen.trim_end(), Duration::from_secs(10), || {
            (got() == seen).then_some(())
        });
    }
    kill(pid, Signal::TERM);
    let status = vm.wait_exit(&mut launcher);
    assert_eq!(status.code(), Some(42), "the trap's exit code");
    assert_eq!(got(), "hup\nint\nterm\n");
    assert!(
        mounts_naming(&vm.root).is_empty(),
        "{:?}",
        mounts_naming(&vm.root)
    );
}

pub fn a_killed_launcher_takes_the_whole_image_guest_with_it() {
    require_root!();
    // A command that ignores SIGTERM: the supervisor's stop ends with SIGKILL to the
    // launcher, which the kernel turns into SIGKILL to init, and so to the namespace.
    let script = "trap '' TERM; echo ready > /work/ready; while :; do sleep 0.05; done";
    let stop_soon = [("MGR_STOP_TIMEOUT_SECONDS", "1")];
    let Some(vm) = ImageVm::new("contain-kill", script, &stop_soon) else {
        return;
    };
    let (meta, root) = (&vm.meta, &vm.root);
    let sup = EmbeddedSupervisor::new(vm.host.config.clone()).unwrap();
    let _guard = vm.host.guard(&sup, meta);
    sup.start(meta).unwrap();
    wait_for("the command to be ready", Duration::from_secs(20), || {
        root.join("work/ready").exists().then_some(())
    });
    let launcher = state::read(&meta.paths).unwrap().guest_pid.unwrap();
    let init = first_child(launcher).expect("init");
    let command = wait_for("the command", Duration::from_secs(10), || first_child(init));
    sup.stop(meta).unwrap();
    assert_eq!(sup.status(meta).unwrap().state, VmState::Stopped);
    for (what, pid) in [("launcher", launcher), ("init", init), ("command", command)] {
        assert!(
            procs::wait_gone(pid, Duration::from_secs(10)),
            "the {what} (pid {pid}) outlived the stop"
        );
    }
    assert!(mounts_naming(root).is_empty(), "{:?}", mounts_naming(root));
    assert_nothing_left(&meta.id);
    let log = fs::read_to_string(Path::new(&meta.paths.logs_dir).join("guest.log")).unwrap();
    assert!(log.contains("booting"), "{log}");
}
