//! Backend sockets: unconnected TCP sockets created inside the VM's namespace.

use std::io;
use std::os::fd::OwnedFd;

use ffi_free_netns::{Family, Wake};
use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};

use super::Shared;
use crate::resolver::{netns_path, Route};

/// A fresh socket for `route`: from the namespace's pool, or from the host namespace
/// when the VM has no namespace (a process VM on the host, or a benchmark backend).
/// `None` when the namespace's pool is empty: it calls `wake` when the caller should
/// ask again, so the worker thread never waits for the pool's thread.
pub fn backend_socket(shared: &Shared, route: &Route, wake: &Wake) -> io::Result<Option<OwnedFd>> {
    let fd = if route.netns.is_empty() {
        rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?
    } else {
        let path =
            netns_path(shared.config.netns_root.as_deref(), &route.netns).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("network namespace {} not found", route.netns),
                )
            })?;
        let key = path.to_string_lossy();
        let taken = shared
            .pool
            .try_take(&key, Family::V4, wake)
            .map_err(|e| io::Error::other(format!("socket in namespace {key}: {e}")))?;
        match taken {
            Some(fd) => fd,
            None => return Ok(None),
        }
    };
    // TLS records and small requests must not wait for Nagle.
    sockopt::set_tcp_nodelay(&fd, true)?;
    Ok(Some(fd))
}
