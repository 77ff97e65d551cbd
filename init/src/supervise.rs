//! Run the image's command and be a good parent: it gets its own process group,
//! SIGTERM/SIGINT/SIGHUP (and SIGQUIT, SIGUSR1/2, SIGWINCH) are forwarded to it,
//! every child that reaches us (the command, and every orphan re-parented to us) is
//! reaped, and when the command exits what it left behind is stopped.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::exec_as;
use crate::say;
use crate::spec::StartSpec;
use crate::system::Mode;
use crate::users::Identity;

/// Signals passed on to the command (everything else init ignores while blocked).
const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// How long what the command left behind gets between SIGTERM and SIGKILL.
const LEFTOVER_GRACE: Duration = Duration::from_secs(3);

/// The exit code of a wait status, as a shell reports it (128 + signal when killed).
fn exit_code(status: WaitStatus) -> Option<(Pid, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

/// Reap every child that has exited; returns the main process's code when it was one.
fn reap(main: Pid) -> Option<i32> {
    let mut main_code = None;
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return main_code,
            Ok(status) => {
                if let Some((pid, code)) = exit_code(status) {
                    if pid == main {
                        main_code = Some(code);
                    }
                }
            }
        }
    }
}

/// Starts the command and supervises it until it exits; returns its exit code.
pub fn run(mode: Mode, spec: &StartSpec, id: &Identity) -> Result<i32, String> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    for s in FORWARDED {
        mask.add(s);
    }
    // Blocked before the child exists, so no signal is lost between spawn and the
    // first read; the --exec-as helper clears the mask before it execs the command.
    mask.thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    let signals =
        SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC).map_err(|e| format!("signalfd: {e}"))?;
    if mode == Mode::Process {
        // Orphans of the command come to us rather than to the real init.
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| format!("becoming a child subreaper: {e}"))?;
    }

    let main = spawn(spec, id)?;
    say!(
        "started {:?} as pid {main} (uid {} gid {})",
        spec.argv,
        id.uid,
        id.gid
    );
    let code = loop {
        let info = match signals.read_signal() {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(format!("reading signals: {e}")),
        };
        let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        if sig == Signal::SIGCHLD {
            if let Some(code) = reap(main) {
                break code;
            }
        } else {
            // A command that is already gone is fine: its SIGCHLD is on its way.
            let _ = kill(main, sig);
        }
    };
    say!("main process {main} exited with code {code}");
    stop_leftovers(mode, main);
    Ok(code)
}

fn spawn(spec: &StartSpec, id: &Identity) -> Result<Pid, String> {
    let mut env: BTreeMap<String, String> = spec.env.clone();
    env.entry("HOME".into()).or_insert_with(|| id.home.clone());
    if let Err(e) = std::fs::create_dir_all(&spec.working_dir) {
        return Err(format!("working directory {}: {e}", spec.working_dir));
    }
    // Ourselves in --exec-as mode: it sets the supplementary groups, which std's
    // Command cannot without unsafe code, then execs the command. /proc/self/exe, not
    // its target's name: in a chroot that name can be a path outside our root.
    let me = if std::path::Path::new("/proc/self/exe").exists() {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::args_os()
            .next()
            .map(PathBuf::from)
            .ok_or("cannot find my own executable")?
    };
    let child = Command::new(&me)
        .arg0("mergen-init")
        .args(exec_as::helper_args(id.uid, id.gid, &id.groups, &spec.argv))
        .env_clear()
        .envs(&env)
        .current_dir(&spec.working_dir)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {:?} (through {}): {e}", spec.argv, me.display()))?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// SIGTERM to what is left (as PID 1: every process we can see; otherwise the
/// command's process group), a short grace while reaping, then SIGKILL.
fn stop_leftovers(mode: Mode, main: Pid) {
    // kill(-1) outside PID 1 would reach every process of the host: never.
    let target = if mode.is_pid1() {
        Pid::from_raw(-1)
    } else {
        Pid::from_raw(-main.as_raw())
    };
    if kill(target, Signal::SIGTERM).is_err() {
        // ESRCH: nobody left.
        reap(main);
        return;
    }
    let deadline = Instant::now() + LEFTOVER_GRACE;
    while Instant::now() < deadline {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Err(_) => return,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => {}
        }
    }
    let _ = kill(target, Signal::SIGKILL);
    while let Ok(status) = waitpid(None::<Pid>, None) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}
