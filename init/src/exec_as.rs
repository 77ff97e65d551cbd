//! The last step before the image's command: drop to its user and exec it.
//!
//! std's `Command` can set uid and gid but clears the supplementary groups (setting
//! them is unstable), and a `pre_exec` hook would need `unsafe`. So init spawns
//! itself as `mergen-init --exec-as UID GID GROUPS -- ARGV...` (in the new process
//! group, with the environment and working directory already in place); this mode
//! sets groups, gid and uid with nix's safe wrappers and replaces itself with the
//! command. Exit codes follow the shells and Docker: 127 not found, 126 not runnable.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::SigSet;
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};

pub const FLAG: &str = "--exec-as";

/// The argv that makes init's child run `argv` as `uid:gid` with `groups`.
pub fn helper_args(uid: u32, gid: u32, groups: &[u32], argv: &[String]) -> Vec<String> {
    let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
    let mut out = vec![
        FLAG.to_string(),
        uid.to_string(),
        gid.to_string(),
        groups.join(","),
        "--".to_string(),
    ];
    out.extend(argv.iter().cloned());
    out
}

/// Runs the helper mode with the arguments after `--exec-as`; returns only on failure,
/// with the exit code to use.
pub fn run(args: &[String]) -> i32 {
    match exec(args) {
        Ok(never) => match never {},
        Err((code, msg)) => {
            crate::say!("{msg}");
            code
        }
    }
}

enum Never {}

fn exec(args: &[String]) -> Result<Never, (i32, String)> {
    let bad = |what: &str| (127, format!("--exec-as: bad {what} in {args:?}"));
    let [uid, gid, groups, sep, argv @ ..] = args else {
        return Err(bad("argument list"));
    };
    if sep != "--" || argv.is_empty() {
        return Err(bad("argument list"));
    }
    let uid: u32 = uid.parse().map_err(|_| bad("uid"))?;
    let gid: u32 = gid.parse().map_err(|_| bad("gid"))?;
    let groups: Vec<Gid> = groups
        .split(',')
        .filter(|g| !g.is_empty())
        .map(|g| g.parse().map(Gid::from_raw))
        .collect::<Result<_, _>>()
        .map_err(|_| bad("group list"))?;
    let fail = |what: &str, e: nix::Error| (126, format!("{what}: {e}"));
    // Groups and gid first: after setuid to a non-root user neither can change.
    if Uid::effective().is_root() {
        setgroups(&groups).map_err(|e| fail("setgroups", e))?;
        setgid(Gid::from_raw(gid)).map_err(|e| fail("setgid", e))?;
        setuid(Uid::from_raw(uid)).map_err(|e| fail("setuid", e))?;
    } else if uid != Uid::effective().as_raw() {
        return Err((126, format!("cannot become uid {uid}: not running as root")));
    }
    // init blocks the signals it forwards; std does not reset the mask, and a command
    // that starts with TERM blocked could never be stopped.
    SigSet::empty()
        .thread_set_mask()
        .map_err(|e| fail("unblocking signals", e))?;
    let err = Command::new(&argv[0]).args(&argv[1..]).exec();
    let code = if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    Err((code, format!("cannot run {:?}: {err}", argv[0])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_args_round_trip_shape() {
        let a = helper_args(
            1000,
            33,
            &[29, 33],
            &["/bin/sh".into(), "-c".into(), "x y".into()],
        );
        assert_eq!(
            a,
            [
                "--exec-as",
                "1000",
                "33",
                "29,33",
                "--",
                "/bin/sh",
                "-c",
                "x y"
            ]
        );
    }

    #[test]
    fn malformed_helper_arguments_are_refused_not_run() {
        assert_eq!(run(&["1".into()]), 127);
        assert_eq!(
            run(&[
                "x".into(),
                "0".into(),
                "".into(),
                "--".into(),
                "/bin/true".into()
            ]),
            127
        );
        assert_eq!(
            run(&[
                "0".into(),
                "0".into(),
                "".into(),
                "-".into(),
                "/bin/true".into()
            ]),
            127
        );
    }
}
