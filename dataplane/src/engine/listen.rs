//! Listening sockets: one per worker and listener, sharing the port with SO_REUSEPORT.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};

const BACKLOG: i32 = 4096;

/// `count` sockets listening on `addr`, one per worker.
///
/// SO_REUSEPORT would let us share a port with another process of the same user (a
/// second forwarder, say) without a word, so the port is first claimed once without
/// it: if anything listens there already, that bind fails.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> io::Result<Vec<OwnedFd>> {
    drop(socket(addr, false)?);
    (0..count.max(1)).map(|_| socket(addr, true)).collect()
}

fn socket(addr: SocketAddr, reuse_port: bool) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    sockopt::set_socket_reuseport(&fd, reuse_port)?;
    // Accepted sockets inherit it: TLS records and small requests must not wait.
    sockopt::set_tcp_nodelay(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    if reuse_port {
        rustix::net::listen(&fd, BACKLOG)?;
    }
    Ok(fd)
}
