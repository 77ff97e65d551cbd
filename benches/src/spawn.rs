//! Server processes the benchmarks start, and stop by pid however the run ends.

use std::path::Path;
use std::process::{Command, Stdio};

use mergen_testkit::ChildGuard;
use rustix::process::{kill_process, Pid, Signal};

use crate::procfs::Proc;

/// A started server and its process tree. On drop: its stop signal (SIGTERM; nginx,
/// HAProxy and hitch stop their workers on it), then SIGKILL for the process and for
/// any descendant still there, each by pid.
pub struct Server {
    guard: Option<ChildGuard>,
    root: Proc,
}

impl Server {
    /// Start `cmd` in its own process group (so a Ctrl-C reaches only the benchmark,
    /// which stops everything in order), its output appended to `log`.
    pub fn start(cmd: &mut Command, log: &Path) -> Result<Server, String> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().map_err(|e| format!("starting {cmd:?}: {e}"))?;
        let guard = ChildGuard::new(child, Some(Signal::TERM));
        let root = Proc::of(guard.pid() as u32)
            .ok_or_else(|| format!("{cmd:?} exited at once; see {}", log.display()))?;
        Ok(Server {
            guard: Some(guard),
            root,
        })
    }

    pub fn proc(&self) -> Proc {
        self.root
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.guard
            .as_mut()
            .and_then(|g| g.0.try_wait().ok().flatten())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let tree = self.root.tree();
        // Stop signal, up to 10 s, then SIGKILL, and reaped.
        drop(self.guard.take());
        for p in tree.iter().skip(1).filter(|p| p.alive()) {
            if let Some(pid) = Pid::from_raw(p.pid as i32) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
}

/// Run `cmd` to completion; its standard output, or an error with its standard error.
pub fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
