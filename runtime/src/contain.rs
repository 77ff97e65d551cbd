//! `mergend vm contain <id>`: the guest of a process VM made from an image
//! (`process.root`, the `rootfs/` of a `mergen-image` output). The image boots as a
//! Firecracker VM would boot it: its own `/sbin/init` (mergen-init) is PID 1 of new PID,
//! mount and UTS namespaces, chrooted into the root, inside the VM's network namespace
//! (the runtime enters it with `ip netns exec` before this runs), and starts the image's
//! command from `/etc/mergen/image-meta.json` with the image's env, working dir and user.
//!
//! Two processes, because a new PID namespace only takes effect for children:
//!
//! - the **launcher** (`vm contain <id>`, the guest pid the supervisor knows) makes the
//!   namespaces, bind-mounts the root onto itself (init makes its root's mounts private,
//!   which needs a mount point), starts the child, forwards SIGTERM, SIGINT and SIGHUP to
//!   it, and exits with its code (128+N when killed by signal N). So the supervisor's
//!   stop works as for any process guest: SIGTERM, grace, SIGKILL.
//! - the **child** (`vm contain-init <launcher pid> <root>`, this binary again, never a
//!   binary of the image: image content is tenant-controlled) is PID 1 of the new PID
//!   namespace. It blocks the forwarded signals, asks for SIGKILL when the launcher dies
//!   (`PR_SET_PDEATHSIG`, which std's `Command` cannot set without unsafe code: hence this
//!   step of our own instead of `chroot(1)`), chroots and execs `/sbin/init`. Both the
//!   signal mask and the death signal survive the exec.
//!
//! Why the mask: PID 1 of a namespace drops any signal from outside that it neither
//! handles nor blocks. A blocked signal stays pending, across the exec, until init
//! reads it from its signalfd. The child is born with the launcher's mask (fork and
//! exec keep it; std's `Command` leaves it alone) and blocks the forwarded signals again
//! itself, first thing, so a spawner that cleared the mask cannot open a gap; and the
//! launcher forwards a signal only once `/proc/<pid>/status` shows the child blocking
//! it. So a stop sent while the guest is still starting is not lost.
//!
//! Why the death signal: when the supervisor has to SIGKILL the launcher (a guest that
//! ignored SIGTERM), the kernel then kills init, and with init every process of its PID
//! namespace. Nothing of the guest outlives its launcher.
//!
//! Not a security boundary: root in a chroot is root, and the guest shares the host's
//! kernel, devtmpfs and users. The process runtime is for development and CI.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use mergen_model::names;
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::error::{Error, Result};
use crate::guest::GUEST_PATH;
use crate::{procs, steps, RuntimeConfig};

/// The launcher's step name, and the child's.
pub const STEP: &str = "contain";
pub const INIT_STEP: &str = "contain-init";

/// What the launcher passes on to init (which passes them on to the command).
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// How long a forwarded signal waits for the child to block it (it does so first thing,
/// within milliseconds of starting).
const READY_WAIT: Duration = Duration::from_secs(5);

/// The init every image has (mergen-image injects it).
const INIT: &str = "/sbin/init";

/// `mergend vm contain <id>`: run the VM's image until its init exits; returns the exit
/// code to leave with.
pub fn launch(config: &RuntimeConfig, id: &str) -> Result<u8> {
    let meta = steps::load_meta(config, id)?;
    let root = meta
        .process
        .as_ref()
        .and_then(|p| p.root.clone())
        .ok_or_else(|| Error::Invalid(format!("VM {id} has no process.root to contain")))?;
    if !Path::new(&root).join("sbin/init").exists() {
        return Err(Error::Invalid(format!(
            "VM {id}: {root}/sbin/init is missing (is {root} the rootfs/ of a mergen-image output?)"
        )));
    }
    let sys = |what: &str, e: nix::Error| Error::io(what.to_string(), e.into());
    // The mount and UTS namespaces are ours from here on, the PID namespace our child's.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWPID)
        .map_err(|e| sys("unshare(mount, UTS, PID namespaces)", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| sys("making / private in the new mount namespace", e))?;
    mount(
        Some(root.as_str()),
        root.as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| sys(&format!("bind-mounting {root} onto itself"), e))?;

    // Blocked before the child exists: nothing sent to us in between is lost, and the
    // child's exit arrives on the same descriptor as the signals to forward.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    for s in FORWARDED {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| sys("blocking signals", e))?;
    let signals =
        SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).map_err(|e| sys("signalfd", e))?;

    // The child inherits the mask (see the module docs).
    let mut child = Command::new("/proc/self/exe")
        .arg0("mergend")
        .args(["vm", INIT_STEP, &std::process::id().to_string(), &root])
        .env_clear()
        .env("PATH", GUEST_PATH)
        // No `ip=`: the runtime has set up the network already, as a VM kernel would.
        .env(
            "MERGEN_INIT_CMDLINE",
            format!("mergen.hostname={}", names::netns_name(id)),
        )
        .spawn()
        .map_err(|e| Error::io("starting the image's init", e))?;
    let pid = child.id();
    log::info!("VM {id}: image {root} booting, init is pid {pid}");
    loop {
        let info = match signals.read_signal() {
            Ok(Some(info)) => info,
            Ok(None) | Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(sys("reading signals", e)),
        };
        let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        if sig == Signal::SIGCHLD {
            // Our only child: a SIGCHLD is its exit (or a stop, which try_wait skips).
            if let Some(status) = child
                .try_wait()
                .map_err(|e| Error::io("waiting for init", e))?
            {
                let code = exit_code(status);
                log::info!("VM {id}: init exited with code {code}");
                return Ok(code);
            }
        } else {
            forward(pid, sig);
        }
    }
}

/// Send `sig` to the child once it has blocked it (see the module docs); a child that
/// is gone by then needs nothing.
fn forward(pid: u32, sig: Signal) {
    let deadline = Instant::now() + READY_WAIT;
    while !blocks(pid, sig) && procs::alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig) {
        if e != nix::Error::ESRCH {
            log::warn!("forwarding {sig} to pid {pid}: {e}");
        }
    }
}

/// Whether `pid` blocks `sig` (`SigBlk` of /proc/<pid>/status).
fn blocks(pid: u32, sig: Signal) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (sig as i32 - 1)) != 0)
}

/// A shell's idea of an exit code: 128+N for a process killed by signal N.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    u8::try_from(code).unwrap_or(1)
}

/// `mergend vm contain-init <launcher pid> <root>`: the child's side (module docs).
/// Returns only on failure.
pub fn become_init(launcher: &str, root: &str) -> ExitCode {
    match exec_init(launcher, root) {
        Ok(never) => match never {},
        Err((code, msg)) => {
            eprintln!("mergend vm {INIT_STEP}: {msg}");
            ExitCode::from(code)
        }
    }
}

fn exec_init(launcher: &str, root: &str) -> std::result::Result<Infallible, (u8, String)> {
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| (1, format!("blocking signals: {e}")))?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| (1, format!("PR_SET_PDEATHSIG: {e}")))?;
    // The death signal is armed only from here: a launcher that died before has made
    // us somebody else's child.
    let launcher: u32 = launcher
        .parse()
        .map_err(|_| (2, format!("{launcher:?} is not a pid")))?;
    if parent_pid() != Some(launcher) {
        return Err((1, format!("launcher {launcher} is gone")));
    }
    nix::unistd::chroot(root).map_err(|e| (1, format!("chroot {root}: {e}")))?;
    nix::unistd::chdir("/").map_err(|e| (1, format!("chdir / in {root}: {e}")))?;
    // nix's execv is execve(2) and nothing else: the mask and the death signal do not
    // depend on what std resets before an exec.
    let init = CString::new(INIT).expect("no NUL");
    let Err(e) = nix::unistd::execv(&init, &[&init]);
    let code = if e == nix::Error::ENOENT { 127 } else { 126 };
    Err((code, format!("executing {INIT} in {root}: {e}")))
}

/// Our parent's pid from /proc/self/stat: getppid(2) says 0 to PID 1 of a namespace
/// whose parent is outside it, and /proc is still the launcher's here.
fn parent_pid() -> Option<u32> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The guest command of a VM with `process.root`: this launcher inside the VM's network
/// namespace.
pub fn command(config: &RuntimeConfig, id: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &names::netns_name(id)])
        .arg(&config.mergend_exe)
        .args(["vm", STEP, id]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_a_shells() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }
}
