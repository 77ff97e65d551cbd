//! Which guest a VM runs, the command that becomes it, and the environment it gets.

use std::collections::BTreeMap;
use std::process::Command;

use mergen_model::{names, Meta};

use crate::config::{RuntimeChoice, RuntimeConfig};
use crate::error::{Error, Result};
use crate::firecracker;
use crate::netplan::GuestLink;
use crate::{contain, envfile};

/// The search path a guest gets unless its env file or `process.env` sets one: systemd's
/// default for services, so a guest sees the same under either supervisor.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    Firecracker,
    /// `meta.process.cmd` run inside the VM's namespace, on the guest IP; or the image
    /// at `meta.process.root` booted there by its own init ([`crate::contain`]).
    Process,
}

impl GuestKind {
    /// A VM created with a `process` spec is a process VM; any other needs Firecracker,
    /// which `MGR_RUNTIME=process` rules out.
    pub fn of(meta: &Meta, config: &RuntimeConfig) -> Result<GuestKind> {
        match (&meta.process, config.runtime) {
            (Some(_), _) => Ok(GuestKind::Process),
            (None, RuntimeChoice::Process) => Err(Error::Invalid(format!(
                "VM {} has no \"process\" spec, and MGR_RUNTIME=process cannot run a Firecracker VM",
                meta.id
            ))),
            (None, _) => Ok(GuestKind::Firecracker),
        }
    }

    pub fn link(self) -> GuestLink {
        match self {
            GuestKind::Firecracker => GuestLink::Tap,
            GuestKind::Process => GuestLink::Veth,
        }
    }
}

/// The guest's command: the jailer/Firecracker, or the process spec entered into the
/// VM's namespace through `ip netns exec` (which execs it: the pid stays the guest's).
/// Either way its environment is [`environment`] and nothing else: whatever the caller
/// (mergend, a supervisor, a unit) holds, such as `MGR_API_TOKEN`, stays out.
///
/// A process spec with `root` is an image booted by [`crate::contain`]: the launcher
/// gets the runtime's own settings (it reads the VM's files) and gives the image's init
/// none of them; the command gets the image's env, as in a Firecracker VM.
pub fn command(kind: GuestKind, config: &RuntimeConfig, meta: &Meta) -> Result<Command> {
    let spec = match kind {
        GuestKind::Firecracker => None,
        GuestKind::Process => Some(
            meta.process
                .as_ref()
                .ok_or_else(|| Error::Invalid(format!("VM {} has no process spec", meta.id)))?,
        ),
    };
    if spec.is_some_and(|s| s.root.is_some()) {
        let mut cmd = contain::command(config, &meta.id);
        cmd.env_clear()
            .envs(config.to_env())
            .env("PATH", GUEST_PATH);
        return Ok(cmd);
    }
    let env = environment(meta)?;
    let mut cmd = match spec {
        None => firecracker::launch_command(config, meta)?,
        Some(spec) => {
            let Some((program, args)) = spec.cmd.split_first() else {
                return Err(Error::Invalid(format!(
                    "VM {}: process.cmd is empty",
                    meta.id
                )));
            };
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &names::netns_name(&meta.id)])
                .arg(program)
                .args(args);
            if let Some(dir) = &spec.workdir {
                cmd.current_dir(dir);
            }
            cmd
        }
    };
    cmd.env_clear().envs(&env);
    Ok(cmd)
}

/// Everything the guest's environment holds: `PATH` ([`GUEST_PATH`]), then the VM's
/// env file (the `MGN_*` variables and the request's `extraEnv`), then `process.env`;
/// a later source wins. A VM without an env file just has none of its variables.
pub fn environment(meta: &Meta) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::from([("PATH".to_string(), GUEST_PATH.to_string())]);
    let path = &meta.paths.env_path;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let vars = envfile::parse(&text)
                .map_err(|e| Error::Invalid(format!("{path} is not a valid env file: {e}")))?;
            env.extend(vars);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::debug!("VM {}: no env file at {path}", meta.id);
        }
        Err(e) => return Err(Error::io(format!("reading {path}"), e)),
    }
    if let Some(spec) = &meta.process {
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Ok(env)
}
