//! The runtime's errors, typed so callers can tell them apart: ctl answers
//! [`Error::Unavailable`] with 503 `dependency_unavailable` (as the original did for a
//! missing systemd) and anything else with 500.
//!
//! As in `ffi-free-netns`, each message carries its cause (`context: cause`) so the text
//! a user sees is complete, and `source()` still hands the cause to code that wants it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something this host lacks for running VMs at all.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    #[error("{0:?} is not a VM id (a lowercase UUID)")]
    InvalidId(String),
    /// A VM's files or the settings cannot work together (a guest IP outside
    /// `MGR_GUEST_CIDR`, a drive id Firecracker would refuse, a process VM without a
    /// command...).
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid {what}: {source}", path.display())]
    Parse {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Netns(#[from] ffi_free_netns::Error),
    #[error(transparent)]
    Command(#[from] CommandError),
    /// An external command ran and said no.
    #[error("{command}: {stderr}")]
    CommandFailed { command: String, stderr: String },
    /// Firecracker's API refused a call or could not be reached.
    #[error("{0}")]
    FirecrackerApi(String),
    #[error("signalling pid {pid}: {source}")]
    Signal {
        pid: u32,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("{what} pid {pid} survived SIGKILL")]
    Unkillable { what: &'static str, pid: u32 },
    /// The embedded supervisor reported that the VM could not start.
    #[error("VM {id} did not start: {message}")]
    NotStarted { id: String, message: String },
    #[error("VM {id} not running within {waited:?}; see {}", log.display())]
    StartTimeout {
        id: String,
        waited: Duration,
        log: PathBuf,
    },
    /// One per-VM host step failed (`net-setup`, `configure-start`...).
    #[error("{step} of VM {id}: {source}")]
    Step {
        step: &'static str,
        id: String,
        #[source]
        source: Box<Error>,
    },
}

/// What this host lacks to supervise VMs: the API answers 503 `dependency_unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// systemctl runs but there is no systemd to talk to (not booted with it, no bus).
    #[error("systemd is not usable here: {command}: {detail}")]
    NoSystemd { command: String, detail: String },
    /// The VM's unit does not exist: the template `mergen@.service` is not installed.
    #[error("unit {unit} is not installed (deploy/install.sh installs the mergen@.service template): {detail}")]
    UnitMissing { unit: String, detail: String },
    /// A program the supervisor needs cannot be run (systemctl, setsid).
    #[error("cannot run {program}: {source}")]
    Program {
        program: String,
        #[source]
        source: CommandError,
    },
    #[error("the embedded supervisor needs util-linux setsid on PATH")]
    NoSetsid,
    #[error("mergend binary {} not found (set MGR_MERGEND_BIN)", path.display())]
    NoMergendBinary { path: PathBuf },
}

/// Running an external command (`nft`, `systemctl`, `setsid`, `ip`) went wrong before
/// it could answer.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("talking to {command}: {source}")]
    Io {
        command: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// This error as the failure of `step` for VM `id`.
    pub(crate) fn in_step(self, step: &'static str, id: &str) -> Error {
        Error::Step {
            step,
            id: id.to_string(),
            source: Box::new(self),
        }
    }

    /// Whether the cause is something the host lacks (503) rather than a failure (500),
    /// looking through step wrappers.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            Error::Step { source, .. } => source.is_unavailable(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn messages_carry_their_cause_and_keep_it_as_source() {
        let e = Error::io(
            "reading /x/meta.json",
            io::Error::from(io::ErrorKind::NotFound),
        )
        .in_step("net-setup", "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6");
        let text = e.to_string();
        assert!(
            text.starts_with(
                "net-setup of VM 084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6: reading /x/meta.json: "
            ),
            "{text}"
        );
        let io = e.source().unwrap().source().unwrap();
        assert!(io.downcast_ref::<io::Error>().is_some());
        assert!(!e.is_unavailable());
        let missing = Error::from(Unavailable::NoSetsid).in_step("start", "x");
        assert!(missing.is_unavailable());
    }
}
