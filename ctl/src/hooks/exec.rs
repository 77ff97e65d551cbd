//! `exec` hooks: argv run with no shell, in their own process group, their combined
//! stdout and stderr captured (bounded) so it can be logged, as the original logged
//! a hook's output.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What is kept of a hook's output.
const MAX_OUTPUT: usize = 64 * 1024;

/// How an exec hook ended.
pub struct ExecResult {
    pub ok: Result<(), String>,
    /// Combined stdout and stderr, at most 64 KiB, lossily UTF-8.
    pub output: String,
}

/// Run `argv` until it exits or `deadline` passes (then its whole process group is
/// killed). The environment is mergend's minus its API token: a hook is the
/// operator's code, but a token has no business in its children.
pub fn run(argv: &[String], deadline: Option<Instant>) -> ExecResult {
    let Some((prog, args)) = argv.split_first() else {
        return ExecResult {
            ok: Err("empty cmd".into()),
            output: String::new(),
        };
    };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            return ExecResult {
                ok: Err(format!("{prog}: pipe: {e}")),
                output: String::new(),
            }
        }
    };
    let spawned = writer.try_clone().and_then(|w2| {
        Command::new(prog)
            .args(args)
            .env_remove("MGR_API_TOKEN")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(w2)
            .process_group(0)
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return ExecResult {
                ok: Err(format!("{prog}: {e}")),
                output: String::new(),
            }
        }
    };
    // The Command (and with it our copies of the pipe's write end) is gone: the read
    // end sees EOF when the hook and whatever it left behind close theirs.
    let (out_tx, out_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = reader;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        // Read to the end, keeping the first 64 KiB: a chatty hook never blocks on a
        // full pipe.
        loop {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(buf.len());
                    buf.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
        let _ = out_tx.send(buf);
    });
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let waited = match deadline {
        Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
    };
    let ok = match waited {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{prog}: {status}")),
        Ok(Err(e)) => Err(format!("{prog}: {e}")),
        Err(_) => {
            kill_group(pid);
            Err(format!("{prog}: timed out"))
        }
    };
    // Output still buffered after exit comes quickly; a background child that keeps
    // the pipe open gets a moment, not a wait.
    let output = out_rx
        .recv_timeout(Duration::from_millis(500))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    ExecResult { ok, output }
}

fn kill_group(pid: u32) {
    if let Some(pgid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    }
}
