//! What starting a VM means on the host.
//!
//! mergend (ctl) decides *whether* a VM runs; this crate decides *how*: which
//! supervisor keeps it alive (systemd units or an embedded per-VM supervisor process
//! that outlives mergend), the per-VM host steps (net-setup, the guest, configure-start,
//! graceful-stop, net-cleanup), and the guest itself (Firecracker, or a plain process
//! inside the VM's namespace on hosts without Firecracker).

#![deny(unsafe_code)]

pub mod cli;
mod command;
pub mod config;
pub mod contain;
pub mod embedded;
pub mod envfile;
pub mod error;
pub mod fc_api;
pub mod firecracker;
pub mod guest;
pub mod isolation;
pub mod net;
pub mod netplan;
pub mod nft;
pub mod procs;
pub mod smoke;
pub mod state;
pub mod status;
pub mod steps;
pub mod supervise;
pub mod supervisor;
pub mod systemd;

pub use config::{RuntimeChoice, RuntimeConfig, SupervisorChoice};
pub use error::{Error, Unavailable};
pub use status::{SupervisorInfo, SupervisorKind, SystemdInfo, VmState, VmStatus};
pub use supervisor::{select_supervisor, RuntimeError, Supervisor};
