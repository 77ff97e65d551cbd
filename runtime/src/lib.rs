//! What starting a VM means on the host.
//!
//! mergend (ctl) decides *whether* a VM runs; this crate decides *how*: which
//! supervisor keeps it alive (systemd units or an embedded per-VM supervisor process
//! that outlives mergend), the per-VM host steps (net-setup, the guest, configure-start,
//! graceful-stop, net-cleanup), and the guest itself (Firecracker, or a plain process
//! inside the VM's namespace on hosts without Firecracker).

pub mod cli;
pub mod config;
pub mod status;
pub mod supervisor;

pub use config::{RuntimeChoice, RuntimeConfig, SupervisorChoice};
pub use status::{SupervisorInfo, SupervisorKind, SystemdInfo, VmState, VmStatus};
pub use supervisor::{select_supervisor, RuntimeError, Supervisor};
