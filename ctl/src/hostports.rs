//! Which host ports the host's own processes hold, so a published port never captures
//! one of their services (a VM publishing host port 22 would DNAT every local address's
//! sshd to its guest).
//!
//! Asked of the kernel (`ffi_free_netns::ports`, sock_diag) in mergend's own network
//! namespace, the host's: TCP sockets in LISTEN state and bound UDP sockets, on any
//! address, IPv4 and IPv6. Asking is better than trying to bind: it sees a listener on
//! one specific address as well as one on the wildcard, and it disturbs nobody. The
//! kernel filters by state, so the host's TIME_WAIT and established connections cost
//! a create nothing (reading /proc/net/tcp with 44,000 of them took ~200 ms of CPU).

use std::io;

pub use ffi_free_netns::ports::BoundPorts as HostPorts;
use mergen_model::Protocol;

/// The host's current listeners. A failure is an error, not "nothing held", since
/// guessing "free" could hijack a service.
pub fn read() -> io::Result<HostPorts> {
    ffi_free_netns::ports::bound_ports()
}

/// Whether a host process holds `port` for `proto`.
pub fn holds(host: &HostPorts, port: u16, proto: Protocol) -> bool {
    match proto {
        Protocol::Tcp => host.tcp.contains(&port),
        Protocol::Udp => host.udp.contains(&port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's own listener and UDP socket show up, each under its protocol.
    #[test]
    fn sees_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let u = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let uport = u.local_addr().unwrap().port();
        let h = read().unwrap();
        assert!(holds(&h, port, Protocol::Tcp) && !holds(&h, port, Protocol::Udp));
        assert!(holds(&h, uport, Protocol::Udp));
    }
}
