//! Backend sockets: unconnected TCP sockets created inside the VM's namespace.

use std::io;
use std::os::fd::OwnedFd;

use ffi_free_netns::Family;
use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};

use super::Shared;
use crate::resolver::{netns_path, Route};

/// A fresh socket for `route`: from the namespace's pool, or from the host namespace
/// when the VM has no namespace (a process VM on the host, or a benchmark backend).
pub fn backend_socket(shared: &Shared, route: &Route) -> io::Result<OwnedFd> {
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
        shared
            .pool
            .take(&key, Family::V4)
            .map_err(|e| io::Error::other(format!("socket in namespace {key}: {e}")))?
    };
    // TLS records and small requests must not wait for Nagle.
    sockopt::set_tcp_nodelay(&fd, true)?;
    Ok(fd)
}
