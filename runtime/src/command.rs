//! External commands (`nft`, `systemctl`, `setsid`) with a bound on how long they run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::CommandError;

/// What a finished command said.
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Run `cmd` with `stdin` fed to it, killing it once `timeout` has passed.
pub fn run(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, CommandError> {
    let shown = format!("{cmd:?}");
    let io = |source| CommandError::Io {
        command: shown.clone(),
        source,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        command: shown.clone(),
        source,
    })?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        if let Err(e) = pipe.write_all(bytes) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io(e));
        }
    }
    // Drain the pipes on their own threads so a chatty command cannot block on a full
    // pipe while we wait for it to exit.
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out = std::thread::spawn(move || drain(out_pipe.as_mut()));
    let err = std::thread::spawn(move || drain(err_pipe.as_mut()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::Timeout {
                    command: shown,
                    timeout,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(io(e)),
        }
    };
    Ok(Output {
        success: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `bin` as a path to run: as given when it has a directory part, else the first match
/// on this process's `PATH`. Commands whose environment is replaced (guests) are
/// resolved here first, so they find the same programs as their caller.
pub fn which(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_path_buf());
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

fn drain(pipe: Option<&mut impl Read>) -> String {
    let mut s = String::new();
    if let Some(p) = pipe {
        let _ = p.read_to_string(&mut s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_come_back() {
        let mut c = Command::new("sh");
        c.args(["-c", "cat; echo err >&2; exit 3"]);
        let o = run(c, Some(b"hello"), Duration::from_secs(10)).unwrap();
        assert!(!o.success);
        assert_eq!(o.stdout, "hello");
        assert_eq!(o.stderr, "err\n");
    }

    #[test]
    fn a_hung_command_is_killed_at_the_deadline() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let e = run(c, None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, CommandError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("did not finish"), "{e}");
    }

    #[test]
    fn which_finds_programs_on_path_and_keeps_paths() {
        let sh = which(Path::new("sh")).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(which(&sh), Some(sh.clone()));
        assert_eq!(which(Path::new("mergen-no-such-program")), None);
        assert_eq!(which(Path::new("/nonexistent/sh")), None);
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let c = Command::new("/nonexistent/mergen-test-binary");
        let e = run(c, None, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, CommandError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("cannot run"), "{e}");
    }
}
