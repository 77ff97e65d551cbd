//! Processes known by pid only (supervisors found through pid files, guests found
//! through the state file): liveness, identity, signals, waiting with a deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use crate::error::{Error, Result};

/// Whether `pid` is a live process (a zombie has exited: it only waits to be reaped).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself hold spaces.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// The argv of `pid`, if it is alive and readable.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` is alive and its argv ends with `tail` (how a pid read from a file is
/// told apart from an unrelated process that reused the number).
pub fn runs(pid: u32, tail: &[&str]) -> bool {
    alive(pid)
        && cmdline(pid).is_some_and(|argv| {
            argv.len() >= tail.len()
                && argv[argv.len() - tail.len()..]
                    .iter()
                    .zip(tail)
                    .all(|(a, b)| a == b)
        })
}

/// Send `sig` to `pid`; a process that is already gone is fine.
pub fn signal(pid: u32, sig: Signal) -> Result<()> {
    let target = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(Error::Signal {
            pid,
            source: rustix::io::Errno::SRCH,
        })?;
    match kill_process(target, sig) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(source) => Err(Error::Signal { pid, source }),
    }
}

/// Wait until `pid` is gone or `timeout` passes; true when it is gone.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL and wait for the end; true when gone.
pub fn terminate(pid: u32, grace: Duration) -> Result<bool> {
    signal(pid, Signal::TERM)?;
    if wait_gone(pid, grace) {
        return Ok(true);
    }
    signal(pid, Signal::KILL)?;
    Ok(wait_gone(pid, Duration::from_secs(5)))
}

/// Read a pid file; a missing or garbled file reads as no pid.
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_child_is_recognised_signalled_and_seen_gone() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(alive(pid));
        // The exec may not be visible in /proc the instant spawn returns: wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !runs(pid, &["sleep", "30"]) {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep never showed up"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!runs(pid, &["sleep", "31"]));
        signal(pid, Signal::TERM).unwrap();
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(!runs(pid, &["sleep", "30"]));
        // Gone already: signalling again is not an error.
        signal(pid, Signal::TERM).unwrap();
    }

    #[test]
    fn a_zombie_counts_as_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        assert!(
            wait_gone(pid, Duration::from_secs(10)),
            "exited child still alive"
        );
        child.wait().unwrap();
    }
}
