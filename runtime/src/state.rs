//! The embedded supervisor's files in the VM's run dir: `supervisor.pid` (who supervises
//! the VM) and `state.json` (what it is doing). mergend reads both; only the supervisor
//! writes them.

use std::path::{Path, PathBuf};

use mergen_model::{atomic, Paths};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::status::VmState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupervisorState {
    pub state: VmState,
    #[serde(default)]
    pub message: String,
    pub supervisor_pid: u32,
    #[serde(default)]
    pub guest_pid: Option<u32>,
    /// Guest restarts after failures since the supervisor started.
    #[serde(default)]
    pub restarts: u32,
}

pub fn pid_file(paths: &Paths) -> PathBuf {
    Path::new(&paths.run_dir).join("supervisor.pid")
}

pub fn state_file(paths: &Paths) -> PathBuf {
    Path::new(&paths.run_dir).join("state.json")
}

pub fn read(paths: &Paths) -> Option<SupervisorState> {
    let bytes = std::fs::read(state_file(paths)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn write(paths: &Paths, state: &SupervisorState) -> Result<()> {
    let path = state_file(paths);
    atomic::write_json(&path, state)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// The argv tail that identifies VM `id`'s supervisor in `/proc/<pid>/cmdline`.
pub fn supervisor_argv(id: &str) -> [&str; 2] {
    ["supervise", id]
}

/// The pid of VM `id`'s live supervisor, if its pid file names one.
pub fn live_supervisor(paths: &Paths, id: &str) -> Option<u32> {
    let pid = crate::procs::read_pid_file(&pid_file(paths))?;
    crate::procs::runs(pid, &supervisor_argv(id)).then_some(pid)
}

pub fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", path.display());
        }
    }
}
