//! One error type for the crate; every message names the namespace, link or path involved.

use std::fmt;
use std::io;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug)]
pub enum Error {
    /// A system call, netlink request or file operation failed.
    Io { context: String, source: io::Error },
    /// A namespace or link does not exist.
    NotFound(String),
    /// An argument was rejected before any system call was made.
    InvalidInput(String),
    /// An external command failed (only `ip tuntap`, see `links::create_tap`).
    Command { context: String, detail: String },
    /// The socket pool's worker for a namespace stopped and will hand out no more sockets.
    Pool { netns: String, reason: String },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Error {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// The OS error code behind this error, if there is one (e.g. `EEXIST`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// A copy for handing the same failure to several waiters (`io::Error` is not `Clone`).
    pub(crate) fn replicate(&self) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::NotFound(what) => Error::NotFound(what.clone()),
            Error::InvalidInput(what) => Error::InvalidInput(what.clone()),
            Error::Command { context, detail } => Error::Command {
                context: context.clone(),
                detail: detail.clone(),
            },
            Error::Pool { netns, reason } => Error::Pool {
                netns: netns.clone(),
                reason: reason.clone(),
            },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::NotFound(what) => write!(f, "{what}"),
            Error::InvalidInput(what) => write!(f, "invalid input: {what}"),
            Error::Command { context, detail } => write!(f, "{context}: {detail}"),
            Error::Pool { netns, reason } => {
                write!(f, "socket pool for network namespace {netns}: {reason}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Error {
        Error::Io {
            context: "I/O error".into(),
            source,
        }
    }
}
