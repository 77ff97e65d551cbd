//! The TCP options every socket of the data path gets, on both legs of a connection:
//! the client's (set on the listening socket, which accepted sockets inherit) and the
//! guest's (set on each dialed socket).

use std::os::fd::AsFd;
use std::time::Duration;

use rustix::net::sockopt;

/// Quiet this long before the first keepalive probe: well inside the idle timeouts of
/// NAT and conntrack tables (conntrack's established default is five days, home
/// routers' often a few minutes), so idle SSH, database and Kafka sessions stay open.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel ends the connection: a peer that vanished
/// (a client that lost its network, a VM that was killed) is noticed within about two
/// minutes, even with `FWD_IDLE_TIMEOUT_SECONDS=0`.
pub const KEEPALIVE_PROBES: u32 = 6;

/// No Nagle (TLS records and small requests must not wait), and keepalive.
pub fn set_options(fd: impl AsFd) -> rustix::io::Result<()> {
    let fd = fd.as_fd();
    sockopt::set_tcp_nodelay(fd, true)?;
    sockopt::set_socket_keepalive(fd, true)?;
    sockopt::set_tcp_keepidle(fd, KEEPALIVE_IDLE)?;
    sockopt::set_tcp_keepintvl(fd, KEEPALIVE_INTERVAL)?;
    sockopt::set_tcp_keepcnt(fd, KEEPALIVE_PROBES)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::OwnedFd;

    use super::*;
    use crate::config::ListenAddr;
    use crate::engine::dial::guest_socket;
    use crate::resolver::Namespace;

    fn has_options(fd: impl AsFd, which: &str) {
        let fd = fd.as_fd();
        assert!(sockopt::tcp_nodelay(fd).unwrap(), "{which}: nodelay");
        assert!(sockopt::socket_keepalive(fd).unwrap(), "{which}: keepalive");
        assert_eq!(
            sockopt::tcp_keepidle(fd).unwrap(),
            KEEPALIVE_IDLE,
            "{which}"
        );
        assert_eq!(
            sockopt::tcp_keepintvl(fd).unwrap(),
            KEEPALIVE_INTERVAL,
            "{which}"
        );
        assert_eq!(
            sockopt::tcp_keepcnt(fd).unwrap(),
            KEEPALIVE_PROBES,
            "{which}"
        );
    }

    /// Client leg: accepted sockets inherit the listener's options.
    #[test]
    fn accepted_sockets_inherit_keepalive() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = ListenAddr::Addr(([127, 0, 0, 1], port).into());
        let listeners = crate::engine::bind_listeners(addr, 1).unwrap();
        let _client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let accepted: OwnedFd = rustix::net::accept(&listeners[0]).unwrap();
        has_options(&accepted, "accepted");
    }

    /// Guest leg: every dialed socket.
    #[test]
    fn guest_sockets_have_keepalive() {
        let wake: ffi_free_netns::Wake = std::sync::Arc::new(|| {});
        let pool = ffi_free_netns::SocketPool::new(ffi_free_netns::PoolConfig::default());
        let fd = guest_socket(&pool, &Namespace::Host, &wake)
            .unwrap()
            .expect("a socket in the host's namespace");
        has_options(&fd, "guest");
    }
}
