//! The converter's errors: each kind a user must tell apart (a missing image, a
//! tampered blob, a full disk, a format we do not read, a hostile layer) is its own
//! variant with a message that says what and where.

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum Error {
    /// The image, tag, manifest or blob does not exist (registry 404, missing file).
    NotFound(String),
    /// Content does not match its digest (or size): refused, nothing of it is kept.
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    /// The disk filled up (ENOSPC) while writing `what`.
    NoSpace(String),
    /// A manifest, config or layer media type this converter does not read.
    MediaType(String),
    /// A layer entry that would land outside the root filesystem.
    PathEscape(String),
    /// The registry refused our credentials or we have none.
    Auth(String),
    /// Any other registry/HTTP failure.
    Http(String),
    /// Bad input: options, JSON, archives.
    Invalid(String),
    Io {
        context: String,
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::Digest {
                what,
                expected,
                actual,
            } => write!(
                f,
                "digest mismatch for {what}: expected {expected}, got {actual} (content refused)"
            ),
            Error::NoSpace(m) => write!(f, "no space left on device while {m}"),
            Error::MediaType(m) => write!(f, "unsupported media type: {m}"),
            Error::PathEscape(m) => write!(f, "refused layer entry: {m}"),
            Error::Auth(m) => write!(f, "authentication failed: {m}"),
            Error::Http(m) => write!(f, "registry error: {m}"),
            Error::Invalid(m) => write!(f, "{m}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// An I/O error with what we were doing; a full disk becomes [`Error::NoSpace`].
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        let context = context.into();
        if rustix::io::Errno::from_io_error(&source) == Some(rustix::io::Errno::NOSPC) {
            return Error::NoSpace(context);
        }
        if let Some(inner) = source.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
            // An Error carried through an io::Read (e.g. a digest check): keep its kind.
            return inner.clone_kind(&context);
        }
        Error::Io { context, source }
    }

    fn clone_kind(&self, context: &str) -> Error {
        match self {
            Error::Digest {
                what,
                expected,
                actual,
            } => Error::Digest {
                what: what.clone(),
                expected: expected.clone(),
                actual: actual.clone(),
            },
            Error::NoSpace(m) => Error::NoSpace(m.clone()),
            other => Error::Invalid(format!("{context}: {other}")),
        }
    }
}

/// `.ctx("reading x")` on io results.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
