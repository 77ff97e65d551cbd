//! The embedded supervisor backend: each VM gets its own `mergend supervise <id>`
//! process, detached from mergend (new session through util-linux `setsid -f`, so it is
//! not even mergend's child), found again through its pid file.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mergen_model::{Meta, Paths};
use rustix::process::Signal;

use crate::command;
use crate::config::RuntimeConfig;
use crate::error::{Error, Unavailable};
use crate::state::{self, SupervisorState};
use crate::status::{SupervisorInfo, SupervisorKind, SystemdInfo, VmState, VmStatus};
use crate::supervisor::{RuntimeError, Supervisor};
use crate::{net, procs, steps};

pub struct EmbeddedSupervisor {
    config: RuntimeConfig,
}

impl EmbeddedSupervisor {
    pub fn new(config: RuntimeConfig) -> Result<EmbeddedSupervisor, RuntimeError> {
        if command::which(Path::new("setsid")).is_none() {
            return Err(Unavailable::NoSetsid.into());
        }
        if !config.mergend_exe.is_file() {
            return Err(Unavailable::NoMergendBinary {
                path: config.mergend_exe.clone(),
            }
            .into());
        }
        Ok(EmbeddedSupervisor { config })
    }

    fn paths(&self, meta: &Meta) -> Paths {
        self.config.roots.paths(&meta.id)
    }

    /// How long start waits for the supervisor's verdict: net-setup, the launch and (for
    /// Firecracker) configure-start, each bounded by the command timeout.
    fn start_deadline(&self) -> Duration {
        self.config.command_timeout * 3 + Duration::from_secs(5)
    }

    fn spawn(&self, meta: &Meta, paths: &Paths) -> Result<(), RuntimeError> {
        for dir in [&paths.run_dir, &paths.logs_dir] {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {dir}"), e))?;
        }
        state::remove(&state::state_file(paths));
        let log_path = Path::new(&paths.logs_dir).join("supervisor.log");
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))
        };
        let mut cmd = Command::new("setsid");
        cmd.arg("-f")
            .arg(&self.config.mergend_exe)
            .args(state::supervisor_argv(&meta.id))
            .env_clear()
            .envs(supervisor_env(&self.config, |k| std::env::var(k).ok()))
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?);
        // `setsid -f` forks the supervisor into its own session and exits at once.
        let status = cmd.status().map_err(|source| Unavailable::Program {
            program: "setsid".into(),
            source: crate::error::CommandError::Spawn {
                command: format!("{cmd:?}"),
                source,
            },
        })?;
        if !status.success() {
            return Err(Error::CommandFailed {
                command: format!("setsid (the supervisor of VM {})", meta.id),
                stderr: status.to_string(),
            });
        }
        let deadline = Instant::now() + self.start_deadline();
        loop {
            match state::read(paths) {
                Some(s) if s.state == VmState::Running => return Ok(()),
                Some(s) if matches!(s.state, VmState::Failed | VmState::Stopped) => {
                    // It is on its way out: let it go before reporting.
                    procs::wait_gone(s.supervisor_pid, Duration::from_secs(5));
                    return Err(Error::NotStarted {
                        id: meta.id.clone(),
                        message: s.message,
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::StartTimeout {
                    id: meta.id.clone(),
                    waited: self.start_deadline(),
                    log: log_path,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Terminate a guest left behind by a supervisor that died without stopping it,
    /// if the pid still runs the VM's command.
    fn kill_orphan_guest(&self, meta: &Meta, last: Option<&SupervisorState>) {
        let Some(pid) = last.and_then(|s| s.guest_pid) else {
            return;
        };
        let ours = match &meta.process {
            Some(p) => procs::runs(pid, &p.cmd.iter().map(String::as_str).collect::<Vec<_>>()),
            None => procs::cmdline(pid).is_some_and(|a| a.iter().any(|x| x == &meta.id)),
        };
        if ours {
            if let Err(e) = procs::terminate(pid, Duration::from_secs(2)) {
                log::warn!("VM {}: terminating orphan guest {pid}: {e}", meta.id);
            }
        }
    }
}

impl Supervisor for EmbeddedSupervisor {
    fn kind(&self) -> SupervisorKind {
        SupervisorKind::Embedded
    }

    fn start(&self, meta: &Meta) -> Result<(), RuntimeError> {
        let paths = self.paths(meta);
        if state::live_supervisor(&paths, &meta.id).is_some() {
            return Ok(());
        }
        // A crashed supervisor may have left its guest and network behind; start clean.
        self.kill_orphan_guest(meta, state::read(&paths).as_ref());
        steps::net_cleanup(&self.config, &meta.id)?;
        self.spawn(meta, &paths)
    }

    fn stop(&self, meta: &Meta) -> Result<(), RuntimeError> {
        let paths = self.paths(meta);
        let last = state::read(&paths);
        if let Some(pid) = state::live_supervisor(&paths, &meta.id) {
            procs::signal(pid, Signal::TERM)?;
            let grace = self.config.stop_timeout + self.config.command_timeout * 2;
            if !procs::wait_gone(pid, grace) {
                log::warn!(
                    "VM {}: supervisor {pid} ignored SIGTERM for {grace:?}; killing it",
                    meta.id
                );
                procs::signal(pid, Signal::KILL)?;
                procs::wait_gone(pid, Duration::from_secs(5));
            }
        }
        self.kill_orphan_guest(meta, last.as_ref());
        let timeout = self.config.command_timeout;
        let left = net::leftovers(&meta.id, timeout)?;
        if !left.is_empty() {
            steps::net_cleanup(&self.config, &meta.id)?;
        }
        state::remove(&state::pid_file(&paths));
        state::remove(&state::state_file(&paths));
        Ok(())
    }

    fn status(&self, meta: &Meta) -> Result<VmStatus, RuntimeError> {
        Ok(status_of(&self.config, meta))
    }

    fn status_all(&self, metas: &[&Meta]) -> Result<Vec<VmStatus>, RuntimeError> {
        Ok(metas.iter().map(|m| status_of(&self.config, m)).collect())
    }
}

/// The supervisor's whole environment, built from nothing: the runtime's configuration
/// as `MGR_*` variables ([`RuntimeConfig::to_env`]), the rest of the runtime's table
/// (the log settings) as far as `get` (mergend's environment) sets them, and `PATH`, so
/// it finds the same `ip`, `nft` and Firecracker as mergend. Nothing else gets
/// through: not `MGR_API_TOKEN`, not whatever secrets the operator's shell held.
pub fn supervisor_env(
    config: &RuntimeConfig,
    get: impl Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut env = config.to_env();
    for var in crate::config::VARIABLES {
        if env.iter().any(|(k, _)| k == var.name) {
            continue;
        }
        if let Some(value) = get(var.name) {
            env.push((var.name.to_string(), value));
        }
    }
    if let Some(path) = get("PATH") {
        env.push(("PATH".to_string(), path));
    }
    env
}

/// Read from the supervisor's own files; no process is spawned.
fn status_of(config: &RuntimeConfig, meta: &Meta) -> VmStatus {
    let paths = config.roots.paths(&meta.id);
    let live = state::live_supervisor(&paths, &meta.id);
    let recorded = state::read(&paths);
    let state = match (live, &recorded) {
        // Alive and the state is its own: running, or (re)starting with back-off.
        (Some(pid), Some(s)) if s.supervisor_pid == pid && s.state == VmState::Running => {
            VmState::Running
        }
        (Some(_), _) => VmState::Starting,
        // Gone without recording a stop: it failed, or was killed (its guest may even
        // still run; `stop` and `start` clear that up).
        (None, Some(s)) if s.state != VmState::Stopped => VmState::Failed,
        (None, _) => VmState::Stopped,
    };
    VmStatus {
        state,
        supervisor: SupervisorInfo {
            kind: SupervisorKind::Embedded,
            active: live.is_some(),
            pid: live,
        },
        systemd: SystemdInfo {
            available: false,
            unit: format!("{}@{}.service", config.unit_prefix, meta.id),
            ..SystemdInfo::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_supervisor_gets_the_runtime_table_and_path_only() {
        let mergend: HashMap<&str, &str> = [
            ("MGR_RUN_ROOT", "/tmp/r"),
            ("MGR_MERGEND_BIN", "/x/mergend"),
            ("MGR_LOG_LEVEL", "debug"),
            ("MGR_API_TOKEN", "s3cret"),
            ("MGR_HTTP_ADDR", "0.0.0.0:8080"),
            ("AWS_SECRET_ACCESS_KEY", "aws"),
            ("MGR_ETCD_ENDPOINTS", "https://10.0.0.1:2379"),
            ("MGR_ETCD_KEY_FILE", "/etc/mergen/etcd-key.pem"),
            ("PATH", "/opt/fc/bin:/usr/bin"),
            ("HOME", "/root"),
        ]
        .into();
        let get = |k: &str| mergend.get(k).map(|v| v.to_string());
        let config = RuntimeConfig::from_lookup(get).unwrap();
        let env: HashMap<String, String> = supervisor_env(&config, get).into_iter().collect();
        assert_eq!(env["MGR_RUN_ROOT"], "/tmp/r");
        assert_eq!(env["MGR_LOG_LEVEL"], "debug");
        assert_eq!(env["PATH"], "/opt/fc/bin:/usr/bin");
        // Not set in mergend's environment: not invented either.
        assert!(!env.contains_key("MGR_LOG_FORMAT"));
        let table: Vec<&str> = crate::config::VARIABLES.iter().map(|v| v.name).collect();
        for k in env.keys() {
            assert!(table.contains(&k.as_str()) || k == "PATH", "{k} leaked");
        }
        for secret in [
            "MGR_API_TOKEN",
            "MGR_HTTP_ADDR",
            "AWS_SECRET_ACCESS_KEY",
            "HOME",
            "MGR_ETCD_ENDPOINTS",
            "MGR_ETCD_KEY_FILE",
        ] {
            assert!(!env.contains_key(secret), "{secret} leaked");
        }
    }
}
