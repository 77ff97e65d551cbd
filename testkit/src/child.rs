use std::process::{Child, Command};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};

/// A child process stopped (by its pid) and reaped on drop: first with its `stop`
/// signal if it has one, so a server can take its own children down, then SIGKILL.
pub struct ChildGuard(pub Child, Option<Signal>);

impl ChildGuard {
    /// Guards `child`, stopping it with `stop` (waiting up to 10 s) before SIGKILL.
    pub fn new(child: Child, stop: Option<Signal>) -> ChildGuard {
        ChildGuard(child, stop)
    }

    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        ChildGuard(child, None)
    }

    /// Like `spawn`, stopping the process with `stop` before SIGKILL.
    pub fn spawn_graceful(cmd: &mut Command, stop: Signal) -> ChildGuard {
        let mut guard = ChildGuard::spawn(cmd);
        guard.1 = Some(stop);
        guard
    }

    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = Pid::from_raw(self.pid()) {
            let _ = kill_process(pid, sig);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(sig) = self.1 {
            self.signal(sig);
            let exited = crate::poll(Duration::from_secs(10), || {
                matches!(self.0.try_wait(), Ok(Some(_))).then_some(())
            });
            if exited.is_some() {
                return;
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
