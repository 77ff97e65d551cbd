//! The per-VM host steps, as library calls. `mergend vm <step> <id>` (systemd's unit) and
//! the embedded supervisor both come here, so they can never differ.

use std::path::Path;
use std::time::Duration;

use mergen_model::{names, Meta};

use crate::config::RuntimeConfig;
use crate::fc_api::FcClient;
use crate::firecracker::{self, StopOutcome};
use crate::guest::GuestKind;
use crate::netplan::NetPlan;
use crate::{net, procs};

/// Read the VM's meta.json. Its paths are recomputed from the configured roots: the
/// steps act on this host's layout whatever the file says.
pub fn load_meta(config: &RuntimeConfig, id: &str) -> Result<Meta, String> {
    if !names::is_valid_id(id) {
        return Err(format!("{id:?} is not a VM id (a lowercase UUID)"));
    }
    let paths = config.roots.paths(id);
    let bytes =
        std::fs::read(&paths.meta_path).map_err(|e| format!("reading {}: {e}", paths.meta_path))?;
    let mut meta = Meta::from_slice(&bytes)
        .map_err(|e| format!("{} is not a valid meta.json: {e}", paths.meta_path))?;
    if meta.id != id {
        return Err(format!(
            "{} belongs to VM {}, not {id}",
            paths.meta_path, meta.id
        ));
    }
    meta.paths = paths;
    Ok(meta)
}

pub fn net_setup(config: &RuntimeConfig, meta: &Meta) -> Result<(), String> {
    let kind = GuestKind::of(meta, config)?;
    let mut plan = NetPlan::new(meta, &config.guest_cidr, kind.link())?;
    if kind == GuestKind::Firecracker && config.use_jailer {
        plan.tap_owner = Some((config.jailer_uid, config.jailer_gid));
    }
    net::setup(&plan, config.command_timeout)
        .map_err(|e| format!("net-setup of VM {}: {e}", meta.id))
}

/// Remove the VM's network and, under the jailer, its jail (it runs after every stop:
/// `ExecStopPost`, or the embedded supervisor's cleanup).
pub fn net_cleanup(config: &RuntimeConfig, id: &str) -> Result<(), String> {
    let net = net::cleanup(id, config.command_timeout);
    let jail = firecracker::remove_jail(config, id);
    net.and(jail)
        .map_err(|e| format!("net-cleanup of VM {id}: {e}"))
}

/// Replay vm.json against the VM's Firecracker (a process VM has nothing to configure).
pub fn configure_start(config: &RuntimeConfig, meta: &Meta) -> Result<(), String> {
    if GuestKind::of(meta, config)? == GuestKind::Process {
        return Ok(());
    }
    let vm = firecracker::read_vm_config(meta)?;
    let api = FcClient::new(Path::new(&meta.paths.socket_path), config.command_timeout);
    firecracker::configure_start(&api, &vm, config.use_jailer)
        .map_err(|e| format!("configure-start of VM {}: {e}", meta.id))
}

/// Stop the guest `pid`: Ctrl-Alt-Del then terminate for Firecracker, SIGTERM then
/// SIGKILL for a process; both wait up to `MGR_STOP_TIMEOUT_SECONDS` first.
pub fn graceful_stop(config: &RuntimeConfig, meta: &Meta, pid: u32) -> Result<StopOutcome, String> {
    match GuestKind::of(meta, config)? {
        GuestKind::Firecracker => {
            let api = FcClient::new(Path::new(&meta.paths.socket_path), config.command_timeout);
            firecracker::graceful_stop(&api, pid, config.stop_timeout)
        }
        GuestKind::Process => {
            if !procs::alive(pid) {
                return Ok(StopOutcome::ShutDown);
            }
            procs::signal(pid, rustix::process::Signal::TERM)?;
            if procs::wait_gone(pid, config.stop_timeout) {
                return Ok(StopOutcome::ShutDown);
            }
            match procs::terminate(pid, Duration::from_secs(2))? {
                true => Ok(StopOutcome::Terminated),
                false => Err(format!(
                    "guest pid {pid} of VM {} survived SIGKILL",
                    meta.id
                )),
            }
        }
    }
}
