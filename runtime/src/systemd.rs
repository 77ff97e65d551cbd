//! The systemd backend: VMs are instances of `<prefix>@.service`
//! (deploy/systemd/mergen@.service), driven through `systemctl`.

use std::collections::HashMap;
use std::process::Command;

use mergen_model::Meta;

use crate::command;
use crate::config::RuntimeConfig;
use crate::error::{Error, Unavailable};
use crate::status::{SupervisorInfo, SupervisorKind, SystemdInfo, VmState, VmStatus};
use crate::supervisor::{RuntimeError, Supervisor};

pub struct SystemdSupervisor {
    config: RuntimeConfig,
}

impl SystemdSupervisor {
    pub fn new(config: RuntimeConfig) -> SystemdSupervisor {
        SystemdSupervisor { config }
    }

    pub fn unit(&self, id: &str) -> String {
        format!("{}@{id}.service", self.config.unit_prefix)
    }

    /// Run systemctl; `unit` is the VM unit the call is about, if any.
    fn systemctl(&self, args: &[&str], unit: Option<&str>) -> Result<String, RuntimeError> {
        let mut cmd = Command::new(&self.config.systemctl_path);
        cmd.args(args);
        let shown = format!("systemctl {}", args.join(" "));
        let out = command::run(cmd, None, self.config.command_timeout).map_err(|source| {
            Unavailable::Program {
                program: self.config.systemctl_path.display().to_string(),
                source,
            }
        })?;
        if out.success {
            return Ok(out.stdout);
        }
        let detail = out.stderr.trim().to_string();
        Err(classify(shown, detail, unit))
    }
}

impl Supervisor for SystemdSupervisor {
    fn kind(&self) -> SupervisorKind {
        SupervisorKind::Systemd
    }

    fn start(&self, meta: &Meta) -> Result<(), RuntimeError> {
        let unit = self.unit(&meta.id);
        self.systemctl(&["start", &unit], Some(&unit)).map(drop)
    }

    fn stop(&self, meta: &Meta) -> Result<(), RuntimeError> {
        let unit = self.unit(&meta.id);
        self.systemctl(&["stop", &unit], Some(&unit)).map(drop)
    }

    fn status(&self, meta: &Meta) -> Result<VmStatus, RuntimeError> {
        let mut all = self.status_all(&[meta])?;
        all.pop()
            .ok_or_else(|| Error::Invalid("systemctl show returned nothing".into()))
    }

    fn status_all(&self, metas: &[&Meta]) -> Result<Vec<VmStatus>, RuntimeError> {
        if metas.is_empty() {
            return Ok(Vec::new());
        }
        let units: Vec<String> = metas.iter().map(|m| self.unit(&m.id)).collect();
        let mut args = vec!["show", "--property=Id,ActiveState,SubState,MainPID"];
        args.extend(units.iter().map(String::as_str));
        let shown = parse_show(&self.systemctl(&args, None)?);
        Ok(units
            .into_iter()
            .map(|unit| {
                let info = shown.get(&unit).cloned().unwrap_or_else(|| SystemdInfo {
                    available: true,
                    unit: unit.clone(),
                    active_state: "inactive".into(),
                    sub_state: "dead".into(),
                    ..SystemdInfo::default()
                });
                status_from(info)
            })
            .collect())
    }
}

/// A failed systemctl call: no systemd to talk to, or no such unit (the template is not
/// installed), are missing dependencies (503, as the original answered); anything else
/// is a failure of the unit itself.
fn classify(command: String, detail: String, unit: Option<&str>) -> Error {
    if detail.contains("not been booted with systemd")
        || detail.contains("Failed to connect to bus")
    {
        return Unavailable::NoSystemd { command, detail }.into();
    }
    // `Unit mergen@<id>.service not found.` (start) / `... not loaded.` (stop).
    match unit {
        Some(unit)
            if detail.contains(&format!("Unit {unit} not found"))
                || detail.contains(&format!("Unit {unit} not loaded")) =>
        {
            Unavailable::UnitMissing {
                unit: unit.to_string(),
                detail,
            }
            .into()
        }
        _ => Error::CommandFailed {
            command,
            stderr: detail,
        },
    }
}

/// Parse `systemctl show` output: one `Key=Value` block per unit, blocks separated by
/// blank lines, keys in systemd's order (not the requested one). Keyed by `Id`.
pub fn parse_show(output: &str) -> HashMap<String, SystemdInfo> {
    let mut units = HashMap::new();
    for block in output.split("\n\n") {
        let mut info = SystemdInfo {
            available: true,
            ..SystemdInfo::default()
        };
        for line in block.lines() {
            match line.split_once('=') {
                Some(("Id", v)) => info.unit = v.to_string(),
                Some(("ActiveState", v)) => info.active_state = v.to_string(),
                Some(("SubState", v)) => info.sub_state = v.to_string(),
                Some(("MainPID", v)) => info.main_pid = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        if !info.unit.is_empty() {
            info.active = info.active_state == "active";
            units.insert(info.unit.clone(), info);
        }
    }
    units
}

fn status_from(systemd: SystemdInfo) -> VmStatus {
    let state = match (systemd.active_state.as_str(), systemd.sub_state.as_str()) {
        ("active", _) | ("reloading", _) | ("deactivating", _) => VmState::Running,
        ("activating", _) => VmState::Starting,
        ("failed", _) => VmState::Failed,
        _ => VmState::Stopped,
    };
    VmStatus {
        state,
        supervisor: SupervisorInfo {
            kind: SupervisorKind::Systemd,
            active: systemd.active,
            pid: (systemd.main_pid != 0).then_some(systemd.main_pid),
        },
        systemd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_parsed_by_id_whatever_the_key_order() {
        let out = "MainPID=4242\nId=mergen@a.service\nActiveState=active\nSubState=running\n\n\
                   Id=mergen@b.service\nSubState=auto-restart\nActiveState=activating\nMainPID=0\n\n\
                   Id=mergen@c.service\nActiveState=failed\nSubState=failed\nMainPID=0\n";
        let m = parse_show(out);
        assert_eq!(m.len(), 3);
        let a = &m["mergen@a.service"];
        assert!(a.available && a.active);
        assert_eq!(
            (a.active_state.as_str(), a.sub_state.as_str(), a.main_pid),
            ("active", "running", 4242)
        );
        let s = status_from(a.clone());
        assert_eq!(s.state, VmState::Running);
        assert_eq!(s.supervisor.pid, Some(4242));
        assert_eq!(
            status_from(m["mergen@b.service"].clone()).state,
            VmState::Starting
        );
        assert_eq!(
            status_from(m["mergen@c.service"].clone()).state,
            VmState::Failed
        );
    }

    #[test]
    fn a_missing_unit_or_systemd_is_unavailable_and_other_failures_are_not() {
        let unit = "mergen@084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6.service";
        let start = || format!("systemctl start {unit}");
        let missing = classify(
            start(),
            format!("Failed to start {unit}: Unit {unit} not found."),
            Some(unit),
        );
        assert!(
            matches!(&missing, Error::Unavailable(Unavailable::UnitMissing { unit: u, .. }) if u == unit),
            "{missing:?}"
        );
        assert!(
            missing.to_string().contains("deploy/install.sh"),
            "{missing}"
        );
        let not_loaded = classify(
            start(),
            format!("Failed to stop {unit}: Unit {unit} not loaded."),
            Some(unit),
        );
        assert!(matches!(
            not_loaded,
            Error::Unavailable(Unavailable::UnitMissing { .. })
        ));
        let no_systemd = classify(
            start(),
            "System has not been booted with systemd as init system (PID 1). Can't operate.".into(),
            Some(unit),
        );
        assert!(matches!(
            no_systemd,
            Error::Unavailable(Unavailable::NoSystemd { .. })
        ));
        // The unit exists but its start failed: a failure (500), not a missing dependency.
        let failed = classify(
            start(),
            format!("Job for {unit} failed because the control process exited with error code."),
            Some(unit),
        );
        assert!(matches!(failed, Error::CommandFailed { .. }), "{failed:?}");
        // Another unit's name in the message does not count.
        let other = classify(start(), "Unit dbus.service not found.".into(), Some(unit));
        assert!(!other.is_unavailable());
    }

    #[test]
    fn garbage_yields_no_units() {
        assert!(parse_show("").is_empty());
        assert!(parse_show("no equals here\n\nMainPID=x").is_empty());
    }
}
