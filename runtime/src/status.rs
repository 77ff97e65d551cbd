//! A VM's state as read from its supervisor, in the API's JSON shape.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Stopped,
    Starting,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SupervisorKind {
    Systemd,
    Embedded,
}

/// The `supervisor` block of the VM summary (new in mergen).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SupervisorInfo {
    pub kind: SupervisorKind,
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// The original's `systemd` block, kept for compatibility (`available: false` under
/// the embedded supervisor).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemdInfo {
    pub available: bool,
    pub unit: String,
    pub active: bool,
    pub active_state: String,
    pub sub_state: String,
    #[serde(rename = "mainPID")]
    pub main_pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmStatus {
    pub state: VmState,
    pub supervisor: SupervisorInfo,
    pub systemd: SystemdInfo,
}
