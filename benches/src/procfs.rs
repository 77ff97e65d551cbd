//! What a process tree costs, read from /proc: CPU time (utime + stime of every process
//! in the tree, threads included) and memory (RSS and PSS from smaps_rollup).
//!
//! A server is measured as the tree under the process the benchmark started (nginx's
//! master and its workers, hitch's manager and its children), found afresh at every
//! reading so a respawned worker is not missed.

use std::collections::HashMap;
use std::time::Duration;

/// One process, identified by pid and start time so a reused pid is never mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    start: u64,
}

struct Stat {
    ppid: u32,
    cpu_ticks: u64,
    start: u64,
}

/// The fields of /proc/<pid>/stat after the command name (which may hold spaces).
fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12) ... starttime(19).
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: num(1)? as u32,
        cpu_ticks: num(11)? + num(12)?,
        start: num(19)?,
    })
}

impl Proc {
    /// The process `pid` as it is now, or None when it is gone.
    pub fn of(pid: u32) -> Option<Proc> {
        stat(pid).map(|s| Proc {
            pid,
            start: s.start,
        })
    }

    /// Whether this very process still exists (not a later one with the same pid).
    pub fn alive(self) -> bool {
        stat(self.pid).is_some_and(|s| s.start == self.start)
    }

    /// This process and every descendant, parents first.
    pub fn tree(self) -> Vec<Proc> {
        if !self.alive() {
            return Vec::new();
        }
        let mut children: HashMap<u32, Vec<Proc>> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if let Some(s) = stat(pid) {
                    children.entry(s.ppid).or_default().push(Proc {
                        pid,
                        start: s.start,
                    });
                }
            }
        }
        let mut out = vec![self];
        let mut i = 0;
        while i < out.len() {
            if let Some(kids) = children.get(&out[i].pid) {
                out.extend(kids.iter().copied());
            }
            i += 1;
        }
        out
    }

    /// CPU time used so far by the whole tree.
    pub fn tree_cpu(self) -> Duration {
        ticks(
            self.tree()
                .iter()
                .filter_map(|p| stat(p.pid))
                .map(|s| s.cpu_ticks)
                .sum(),
        )
    }

    /// Resident and proportional set size of the whole tree, in bytes.
    pub fn tree_memory(self) -> Memory {
        let mut total = Memory::default();
        for p in self.tree() {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", p.pid)) else {
                continue;
            };
            for line in text.lines() {
                let kib = |prefix: &str| {
                    line.strip_prefix(prefix)
                        .and_then(|v| v.trim().strip_suffix("kB"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|k| k * 1024)
                };
                if let Some(b) = kib("Rss:") {
                    total.rss += b;
                } else if let Some(b) = kib("Pss:") {
                    total.pss += b;
                }
            }
        }
        total
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss: u64,
    pub pss: u64,
}

/// CPU time used so far by this process (every thread, live or ended).
pub fn self_cpu() -> Duration {
    stat(std::process::id()).map_or(Duration::ZERO, |s| ticks(s.cpu_ticks))
}

/// CPU time the whole machine has been busy, every core: user, nice, system, irq,
/// softirq and steal (all but idle and iowait). The kernel samples these per tick and
/// files a tick that lands in a softirq under softirq even when the softirq ran in a
/// process's system call and was charged to that process too, so interrupts belong in
/// the sum for it to cover the processes' own times.
pub fn machine_busy() -> Duration {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let busy = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                // user nice system idle iowait irq softirq steal guest guest_nice
                .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0);
    ticks(busy)
}

fn ticks(n: u64) -> Duration {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_nanos(n.saturating_mul(1_000_000_000) / hz)
}

/// The kernel's accept queue of every listening TCP socket on `port` (IPv4 and IPv6):
/// connections the server has not accepted yet.
pub fn accept_queue(port: u16) -> u64 {
    let mut queued = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address(1) = ADDR:PORT in hex, st(3) 0A = LISTEN, tx:rx queue(4).
            let (Some(local), Some(state), Some(queues)) = (f.get(1), f.get(3), f.get(4)) else {
                continue;
            };
            let listening_here = *state == "0A"
                && local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port);
            if listening_here {
                queued += queues
                    .split(':')
                    .nth(1)
                    .and_then(|rx| u64::from_str_radix(rx, 16).ok())
                    .unwrap_or(0);
            }
        }
    }
    queued
}

/// Raise this process's open-file limit to its hard limit (children inherit it) and
/// return it. Raising the hard limit itself would need CAP_SYS_RESOURCE, which
/// sandboxes often drop, so the callers size their loads to fit instead.
pub fn raise_nofile() -> Result<u64, String> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(1 << 20);
    if now.current != Some(hard) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: now.maximum,
            },
        )
        .map_err(|e| format!("raising the open-file limit to {hard}: {e}"))?;
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = Proc::of(std::process::id()).expect("this process is in /proc");
        assert!(me.alive());
        assert_eq!(me.tree()[0], me);
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(self_cpu() > Duration::ZERO);
        let mem = me.tree_memory();
        assert!(mem.rss > 0 && mem.pss > 0 && mem.pss <= mem.rss);
    }

    #[test]
    fn finds_a_child_and_its_listener_queue() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _a = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _b = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        // The last ACK of a handshake may be processed just after connect returns.
        let queued =
            |n| mergen_testkit::eventually(Duration::from_secs(5), || accept_queue(port) == n);
        assert!(queued(2), "two connections wait in the queue");
        let (_s, _) = listener.accept().unwrap();
        assert!(queued(1), "one connection waits in the queue");

        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = Proc::of(std::process::id()).unwrap();
        let found = me.tree().iter().any(|p| p.pid == child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found, "the child is in this process's tree");
    }
}
