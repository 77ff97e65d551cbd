//! Listening sockets: one per worker and listener, sharing the port with SO_REUSEPORT.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use mergen_http::listen::{any_host, tcp_socket};
use rustix::io::Errno;
use rustix::net::sockopt;

use super::conn::Addrs;
use crate::config::ListenAddr;

const BACKLOG: i32 = 4096;

/// `count` sockets listening on `addr`, one per worker. An any-host address listens on
/// `[::]` for IPv4 and IPv6 alike, or on `0.0.0.0` when the host has no IPv6.
pub fn bind_listeners(addr: ListenAddr, count: usize) -> io::Result<Vec<OwnedFd>> {
    match addr {
        // An explicit address keeps the system's default (net.ipv6.bindv6only for `[::]`).
        ListenAddr::Addr(addr) => bind_all(addr, false, count),
        ListenAddr::AnyHost(port) => {
            any_host(port, |addr, dual_stack| bind_all(addr, dual_stack, count))
        }
    }
}

/// SO_REUSEPORT would let us share a port with another process of the same user (a
/// second forwarder, say) without a word, so the port is first claimed once without
/// it: if anything listens there already, that bind fails.
fn bind_all(addr: SocketAddr, dual_stack: bool, count: usize) -> io::Result<Vec<OwnedFd>> {
    drop(socket(addr, dual_stack, false)?);
    (0..count.max(1))
        .map(|_| socket(addr, dual_stack, true))
        .collect()
}

fn socket(addr: SocketAddr, dual_stack: bool, reuse_port: bool) -> io::Result<OwnedFd> {
    let fd = tcp_socket(addr, dual_stack)?;
    sockopt::set_socket_reuseport(&fd, reuse_port)?;
    // Accepted sockets inherit them: the client leg's TCP options.
    super::tcp::set_options(&fd)?;
    rustix::net::bind(&fd, &addr)?;
    if reuse_port {
        rustix::net::listen(&fd, BACKLOG)?;
    }
    Ok(fd)
}

/// The addresses of an accepted connection: the client's, and ours it arrived at.
pub fn client_addrs(fd: &OwnedFd) -> io::Result<Addrs> {
    let client = rustix::net::getpeername(fd)?.ok_or(Errno::NOTCONN)?;
    let local = rustix::net::getsockname(fd)?;
    let inet = |a| SocketAddr::try_from(a).map_err(|_| io::Error::from(Errno::AFNOSUPPORT));
    Ok(Addrs {
        client: inet(client)?,
        local: inet(local)?,
    })
}
