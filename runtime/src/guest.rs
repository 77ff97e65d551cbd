//! Which guest a VM runs and the command that becomes it.

use std::process::Command;

use mergen_model::{names, Meta};

use crate::config::{RuntimeChoice, RuntimeConfig};
use crate::firecracker;
use crate::netplan::GuestLink;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    Firecracker,
    /// `meta.process.cmd` run inside the VM's namespace, on the guest IP.
    Process,
}

impl GuestKind {
    /// A VM created with a `process` spec is a process VM; any other needs Firecracker,
    /// which `MGR_RUNTIME=process` rules out.
    pub fn of(meta: &Meta, config: &RuntimeConfig) -> Result<GuestKind, String> {
        match (&meta.process, config.runtime) {
            (Some(_), _) => Ok(GuestKind::Process),
            (None, RuntimeChoice::Process) => Err(format!(
                "VM {} has no \"process\" spec, and MGR_RUNTIME=process cannot run a Firecracker VM",
                meta.id
            )),
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
pub fn command(kind: GuestKind, config: &RuntimeConfig, meta: &Meta) -> Result<Command, String> {
    match kind {
        GuestKind::Firecracker => firecracker::launch_command(config, meta),
        GuestKind::Process => {
            let spec = meta
                .process
                .as_ref()
                .ok_or_else(|| format!("VM {} has no process spec", meta.id))?;
            let Some((program, args)) = spec.cmd.split_first() else {
                return Err(format!("VM {}: process.cmd is empty", meta.id));
            };
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &names::netns_name(&meta.id)])
                .arg(program)
                .args(args)
                .envs(&spec.env);
            if let Some(dir) = &spec.workdir {
                cmd.current_dir(dir);
            }
            Ok(cmd)
        }
    }
}
