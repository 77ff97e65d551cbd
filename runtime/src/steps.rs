//! The per-VM host steps, as library calls. `mergend vm <step> <id>` (systemd's unit) and
//! the embedded supervisor both come here, so they can never differ.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mergen_model::{names, Meta};

use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::fc_api::FcClient;
use crate::firecracker::{self, StopOutcome};
use crate::guest::GuestKind;
use crate::netplan::NetPlan;
use crate::{net, procs};

/// Read the VM's meta.json. Its paths are recomputed from the configured roots: the
/// steps act on this host's layout whatever the file says.
pub fn load_meta(config: &RuntimeConfig, id: &str) -> Result<Meta> {
    if !names::is_valid_id(id) {
        return Err(Error::InvalidId(id.to_string()));
    }
    let paths = config.roots.paths(id);
    let bytes = std::fs::read(&paths.meta_path)
        .map_err(|e| Error::io(format!("reading {}", paths.meta_path), e))?;
    let mut meta = Meta::from_slice(&bytes).map_err(|source| Error::Parse {
        path: paths.meta_path.clone().into(),
        what: "meta.json",
        source,
    })?;
    if meta.id != id {
        return Err(Error::Invalid(format!(
            "{} belongs to VM {}, not {id}",
            paths.meta_path, meta.id
        )));
    }
    meta.paths = paths;
    Ok(meta)
}

pub fn net_setup(config: &RuntimeConfig, meta: &Meta) -> Result<()> {
    net_setup_for(config, meta, GuestKind::of(meta, config)?)
}

/// net-setup for a guest of `kind` (the smoke test's Firecracker guest has no VM files
/// to tell it from).
pub(crate) fn net_setup_for(config: &RuntimeConfig, meta: &Meta, kind: GuestKind) -> Result<()> {
    let mut plan = NetPlan::new(meta, &config.guest_cidr, kind.link())?;
    if kind == GuestKind::Firecracker && config.use_jailer {
        plan.tap_owner = Some((config.jailer_uid, config.jailer_gid));
    }
    plan.isolation = config
        .guest_isolation
        .then(|| config.allow_host_ports.clone());
    let changes =
        net::setup(&plan, config.command_timeout).map_err(|e| e.in_step("net-setup", &meta.id))?;
    for change in changes {
        record_host_change(config, &meta.id, &change);
    }
    Ok(())
}

/// Where net-setup notes the host-wide settings it changed, one line each.
pub fn host_changes_file(config: &RuntimeConfig) -> PathBuf {
    config.roots.run.join("host-changes.log")
}

/// Log a host-wide change and append it to [`host_changes_file`], so an operator can
/// find what mergen did to the host. It is not undone at cleanup: other VMs, other
/// mergends and other software on the host depend on it from then on.
fn record_host_change(config: &RuntimeConfig, id: &str, c: &net::HostChange) {
    log::warn!(
        "net-setup of VM {id} changed the host-wide {} from {} to {} (recorded in {})",
        c.key,
        c.was,
        c.now,
        host_changes_file(config).display()
    );
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let line = format!(
        "{now} {}={} (was {}) net-setup of VM {id}\n",
        c.key, c.now, c.was
    );
    let written = std::fs::create_dir_all(&config.roots.run).and_then(|()| {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host_changes_file(config))?
            .write_all(line.as_bytes())
    });
    if let Err(e) = written {
        log::warn!(
            "recording the host change in {}: {e}",
            host_changes_file(config).display()
        );
    }
}

/// Remove the VM's network and, under the jailer, its jail (it runs after every stop:
/// `ExecStopPost`, or the embedded supervisor's cleanup).
pub fn net_cleanup(config: &RuntimeConfig, id: &str) -> Result<()> {
    let net = net::cleanup(id, config.guest_isolation, config.command_timeout);
    let jail = firecracker::remove_jail(config, id);
    net.and(jail).map_err(|e| e.in_step("net-cleanup", id))
}

/// Replay vm.json against the VM's Firecracker (a process VM has nothing to configure).
/// A vm.json written before the guest network went into the boot args (older VMs) gets
/// its `ip=` argument here, as the later original does; the file is left as it is.
pub fn configure_start(config: &RuntimeConfig, meta: &Meta) -> Result<()> {
    if GuestKind::of(meta, config)? == GuestKind::Process {
        return Ok(());
    }
    configure_firecracker(config, meta)
}

/// configure-start of a Firecracker guest: vm.json (with the guest network in its boot
/// args) replayed against its API socket.
pub(crate) fn configure_firecracker(config: &RuntimeConfig, meta: &Meta) -> Result<()> {
    let mut vm = firecracker::read_vm_config(meta)?;
    vm.boot_source
        .ensure_ip_arg(meta.guest_ip, &config.guest_cidr);
    let api = FcClient::new(Path::new(&meta.paths.socket_path), config.command_timeout);
    firecracker::configure_start(&api, &vm, config.use_jailer)
        .map_err(|e| e.in_step("configure-start", &meta.id))
}

/// Stop the guest `pid`: Ctrl-Alt-Del then terminate for Firecracker, SIGTERM then
/// SIGKILL for a process; both wait up to `MGR_STOP_TIMEOUT_SECONDS` first.
pub fn graceful_stop(config: &RuntimeConfig, meta: &Meta, pid: u32) -> Result<StopOutcome> {
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
                false => Err(Error::Unkillable { what: "guest", pid }),
            }
        }
    }
}
