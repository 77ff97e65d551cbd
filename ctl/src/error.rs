//! Errors of the control API, in two layers:
//!
//! - [`Error`]: what went wrong, as the domain (`App`) and the router say it. It knows
//!   nothing about HTTP;
//! - [`ApiError`]: the answer on the wire, a status code, a stable machine-readable
//!   code, a human message and extra headers, always sent as
//!   `{"error": CODE, "message": TEXT}`.
//!
//! The one mapping from the first to the second is `crate::respond`.

use std::io;

use mergen_runtime::RuntimeError;

use crate::alloc::AllocError;
use mergen_http::Response;

/// Why a call failed. Messages are the ones users read (they name the field, the
/// file, the port); the variant decides the status code in `crate::respond`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or names something it may not (the message says
    /// what, naming the field).
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid VM id {0:?}: want a lowercase UUID")]
    InvalidId(String),
    #[error("VM {0} not found")]
    VmNotFound(String),
    #[error("no such path {0}")]
    NoRoute(String),
    /// The path exists but not with this method; the value lists the allowed ones.
    #[error("method not allowed; allowed: {0}")]
    MethodNotAllowed(&'static str),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// Another lifecycle call holds the VM's lock.
    #[error("VM {0} is busy: another lifecycle call holds its lock")]
    Busy(String),
    /// No guest IP or host port can be given.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// A strict hook failed; the message says what became of the VM.
    #[error("{0}")]
    HookFailed(String),
    /// The supervisor or a runtime step.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Something this host lacks for running VMs (no systemd, the unit template not
    /// installed), as chosen when mergend started.
    #[error("{0}")]
    Unavailable(String),
    /// An alias of the new VM belongs to a VM of another host of the cluster.
    #[error(
        "alias {alias:?} belongs to a VM on host {host:?} (aliases are unique across the cluster)"
    )]
    AliasTaken { alias: String, host: String },
    /// The VM lives on another host of the cluster: its lifecycle calls go there.
    #[error("VM {id} is on host {host} ({addr}): send its calls to that host's mergend")]
    Misdirected {
        id: String,
        host: String,
        addr: String,
    },
    /// Reading or writing the VM store.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A meta.json so broken that the VM's guest IP and ports cannot be known: creating
    /// another VM could hand them out twice.
    #[error("{0}")]
    Unreadable(String),
    /// A bug or an impossible state; the message is for the log.
    #[error("{0}")]
    Internal(String),
    /// An error with what was already done before it (`VM x was created but not
    /// started: ...`); answered as the inner error.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

impl From<mergen_cluster::ClusterError> for Error {
    fn from(e: mergen_cluster::ClusterError) -> Error {
        match e {
            mergen_cluster::ClusterError::AliasTaken { alias, host } => {
                Error::AliasTaken { alias, host }
            }
            other => Error::Unavailable(other.to_string()),
        }
    }
}

impl Error {
    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }

    /// Prefix the message with what was done before the failure.
    pub fn context(self, context: impl Into<String>) -> Error {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

/// An answer on the wire: status, code, message, extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Extra headers (`Allow` on 405, `WWW-Authenticate` on 401).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(500, "internal_error", m)
    }

    pub fn into_response(self) -> Response {
        let mut r = Response::error(self.status, self.code, &self.message);
        r.headers = self.headers;
        r
    }
}
