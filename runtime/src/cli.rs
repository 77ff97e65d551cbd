//! `mergend vm <step> <id>` and `mergend supervise <id>`: the per-VM host steps, run by
//! a systemd unit or by the embedded supervisor; and `mergend vm smoke-test`, the
//! standalone Firecracker check built from the same steps.

use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::guest::{self, GuestKind};
use crate::{contain, smoke, state, steps, supervise};

const USAGE: &str = "usage: mergend vm <net-setup|run|jailer-start|contain|configure-start|graceful-stop|net-cleanup> <id>\n       mergend supervise <id>\n       mergend vm smoke-test --rootfs FILE --kernel FILE [--keep-run-dir] (--help for more)";

/// Entry point for the runtime subcommands; `args` excludes the program name.
pub fn main(args: &[String]) -> ExitCode {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The image's init-to-be: PID 1 of a fresh PID namespace, with an environment meant
    // for init alone (no settings, no logging of ours).
    if let ["vm", contain::INIT_STEP, launcher, root] = args.as_slice() {
        return contain::become_init(launcher, root);
    }
    // Same logging settings as mergend: a supervisor's lines land in its supervisor.log,
    // a unit's in the journal.
    let (level, format) = crate::config::step_log_settings(|k| std::env::var(k).ok());
    if let Err(e) = mergen_log::init("mergend", &level, &format) {
        eprintln!("mergend: logging: {e}");
    }
    let config = match RuntimeConfig::from_env() {
        Ok(c) => c,
        Err(e) => return fail(&format!("configuration: {e}")),
    };
    let result = match args.as_slice() {
        ["vm", "smoke-test", rest @ ..] => {
            if rest.iter().any(|a| matches!(*a, "-h" | "--help")) {
                println!("{}", smoke::USAGE);
                return ExitCode::SUCCESS;
            }
            match smoke::Options::parse(rest) {
                Ok(options) => smoke::run(&config, &options),
                Err(e) => {
                    eprintln!("mergend vm smoke-test: {e}\n{}", smoke::USAGE);
                    return ExitCode::from(2);
                }
            }
        }
        ["supervise", id] => supervise::run(&config, id),
        // The guest of an image VM: it exits with its init's code.
        ["vm", contain::STEP, id] => {
            return match contain::launch(&config, id) {
                Ok(code) => ExitCode::from(code),
                Err(e) => fail(&format!("{}: {e}", args.join(" "))),
            }
        }
        ["vm", step, id] => vm_step(&config, step, id),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("{}: {e}", args.join(" "))),
    }
}

fn vm_step(config: &RuntimeConfig, step: &str, id: &str) -> Result<()> {
    match step {
        // Needs no meta.json: cleanup must work even after the VM's files are gone.
        "net-cleanup" => {
            if !mergen_model::names::is_valid_id(id) {
                return Err(Error::InvalidId(id.to_string()));
            }
            steps::net_cleanup(config, id)
        }
        "net-setup" => steps::net_setup(config, &steps::load_meta(config, id)?),
        "configure-start" => steps::configure_start(config, &steps::load_meta(config, id)?),
        // `run` is the guest whatever its kind; `jailer-start` insists on Firecracker.
        "run" | "jailer-start" => {
            let meta = steps::load_meta(config, id)?;
            let kind = GuestKind::of(&meta, config)?;
            if step == "jailer-start" && kind != GuestKind::Firecracker {
                return Err(Error::Invalid(format!(
                    "VM {id} is a process VM: use `mergend vm run`"
                )));
            }
            let mut cmd = guest::command(kind, config, &meta)?;
            let err = cmd.exec();
            Err(Error::io(format!("executing {cmd:?}"), err))
        }
        "graceful-stop" => {
            let meta = steps::load_meta(config, id)?;
            // systemd passes the unit's main process as $MAINPID; otherwise the
            // embedded supervisor's state file knows the guest.
            let pid = std::env::var("MAINPID")
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .or_else(|| state::read(&meta.paths).and_then(|s| s.guest_pid));
            match pid {
                Some(pid) => steps::graceful_stop(config, &meta, pid).map(drop),
                None => Ok(()),
            }
        }
        other => Err(Error::Invalid(format!("unknown step {other:?}\n{USAGE}"))),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("mergend: {msg}");
    ExitCode::FAILURE
}
