//! The supervisor contract: what mergend asks of whatever keeps VMs alive.

use std::sync::Arc;

use mergen_model::Meta;

use crate::config::{RuntimeConfig, SupervisorChoice};
use crate::embedded::EmbeddedSupervisor;
use crate::status::{SupervisorKind, VmStatus};
use crate::systemd::SystemdSupervisor;

/// What supervisor calls fail with: the runtime's [`Error`](crate::Error). Its
/// [`Unavailable`](crate::Error::Unavailable) variant (no systemd, the VM's unit not
/// installed, no setsid) is what the API answers with 503 `dependency_unavailable`;
/// anything else is a failed step (500).
pub use crate::error::Error as RuntimeError;

/// Keeps VMs running independently of mergend. Every call is idempotent: starting a
/// running VM or stopping a stopped one succeeds. mergend holds the VM's lock around
/// `start`/`stop`, so implementations need no per-VM locking of their own.
pub trait Supervisor: Send + Sync {
    fn kind(&self) -> SupervisorKind;
    /// Start the VM and return once its supervisor runs it (or it failed to start).
    fn start(&self, meta: &Meta) -> Result<(), RuntimeError>;
    /// Stop the VM and return once nothing of it is left running on the host
    /// (no process, namespace, link or nftables rule).
    fn stop(&self, meta: &Meta) -> Result<(), RuntimeError>;
    /// The state of one VM, read from the supervisor.
    fn status(&self, meta: &Meta) -> Result<VmStatus, RuntimeError>;
    /// The state of many VMs with one query (one `systemctl show` for all units, one
    /// scan of pid files): listing 1,000 VMs must not cost 1,000 process spawns. By
    /// reference, so that a caller holding its VMs elsewhere copies none.
    fn status_all(&self, metas: &[&Meta]) -> Result<Vec<VmStatus>, RuntimeError>;
}

/// The supervisor `MGR_SUPERVISOR` asks for (auto = systemd when PID 1 is systemd).
/// Also puts the guest isolation policy's skeleton in place, so it holds before the
/// first VM starts (failing that is logged: each VM's net-setup installs it again and
/// reports the error there).
pub fn select_supervisor(config: &RuntimeConfig) -> Result<Arc<dyn Supervisor>, RuntimeError> {
    if let Err(e) = crate::net::prepare_host(config.guest_isolation, config.command_timeout) {
        log::warn!("guest isolation policy not installed yet: {e}");
    }
    let systemd = match config.supervisor {
        SupervisorChoice::Systemd => true,
        SupervisorChoice::Embedded => false,
        SupervisorChoice::Auto => pid1_is_systemd(),
    };
    if systemd {
        Ok(Arc::new(SystemdSupervisor::new(config.clone())))
    } else {
        Ok(Arc::new(EmbeddedSupervisor::new(config.clone())?))
    }
}

fn pid1_is_systemd() -> bool {
    std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}
