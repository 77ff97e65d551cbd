//! Guest sockets: unconnected TCP sockets made inside the VM's namespace, and why a
//! dial failed.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use ffi_free_netns::{Family, SocketPool, Wake};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::resolver::Namespace;

/// Why a connection could not reach its guest.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0:?} cannot name a network namespace")]
    InvalidNamespace(String),
    #[error("no socket from network namespace {netns}: {source}")]
    Pool {
        netns: Arc<str>,
        #[source]
        source: ffi_free_netns::Error,
    },
    #[error("no socket from the VM's network namespace within the dial timeout")]
    PoolTimeout,
    #[error("cannot make a socket: {0}")]
    Socket(#[source] io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    #[error("the VM went away (its route was removed or its namespace changed)")]
    VmGone,
}

impl DialError {
    /// A connect completion's negative result.
    pub fn from_connect(res: i32) -> DialError {
        if res == -libc::ECANCELED {
            // The linked timeout cancelled it.
            DialError::ConnectTimeout
        } else {
            DialError::Connect(io::Error::from_raw_os_error(-res))
        }
    }
}

/// A fresh socket for a guest in `netns`: from the namespace's pool, or made here when
/// the guest lives in the host's namespace. `None` when the namespace's pool is empty:
/// it calls `wake` when the caller should ask again, so the worker thread never waits
/// for the pool's thread.
pub fn guest_socket(
    pool: &SocketPool,
    netns: &Namespace,
    wake: &Wake,
) -> Result<Option<OwnedFd>, DialError> {
    let fd = match netns {
        Namespace::Host => rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| DialError::Socket(e.into()))?,
        Namespace::File(key) => match pool.try_take(key, Family::V4, wake) {
            Ok(Some(fd)) => fd,
            Ok(None) => return Ok(None),
            Err(source) => {
                return Err(DialError::Pool {
                    netns: Arc::clone(key),
                    source,
                })
            }
        },
        Namespace::Invalid(name) => return Err(DialError::InvalidNamespace(name.clone())),
    };
    super::tcp::set_options(&fd).map_err(|e| DialError::Socket(e.into()))?;
    Ok(Some(fd))
}
