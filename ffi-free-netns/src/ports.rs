//! The ports that sockets of the calling thread's network namespace hold: TCP listeners
//! and bound UDP sockets, on any address, IPv4 and IPv6.
//!
//! Asked of the kernel's sock_diag netlink interface (what `ss` uses), which filters by
//! state itself: a host with tens of thousands of TIME_WAIT connections costs no more
//! than an idle one, where reading `/proc/net/tcp` meant formatting and parsing every
//! socket of the namespace.

use std::collections::HashSet;
use std::io;

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::rtnl::Rtnl;

/// Ports held in one namespace, per protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundPorts {
    /// Ports a TCP socket listens on.
    pub tcp: HashSet<u16>,
    /// Ports a UDP socket is bound to (a UDP "service" is just a bound socket).
    pub udp: HashSet<u16>,
}

/// The TCP listeners and bound UDP sockets of the calling thread's namespace.
pub fn bound_ports() -> io::Result<BoundPorts> {
    let mut diag = Rtnl::open_protocol(NETLINK_SOCK_DIAG)?;
    let mut out = BoundPorts::default();
    for family in [AF_INET, AF_INET6] {
        out.tcp
            .extend(dump(&mut diag, family, IPPROTO_TCP, StateFlags::LISTEN)?);
        out.udp
            .extend(dump(&mut diag, family, IPPROTO_UDP, StateFlags::all())?);
    }
    Ok(out)
}

/// The local ports of `protocol` sockets of `family` in `states` (port 0, an unbound
/// socket, left out).
fn dump(diag: &mut Rtnl, family: u8, protocol: u8, states: StateFlags) -> io::Result<Vec<u16>> {
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id,
    });
    let replies = match diag.request(request, NLM_F_DUMP) {
        Ok(replies) => replies,
        // No IPv6 in this kernel (or no UDP diag module): nothing of that kind is bound.
        Err(e) if e.raw_os_error() == Some(libc_enoent()) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(replies
        .into_iter()
        .filter_map(|reply| match reply {
            SockDiagMessage::InetResponse(r) => Some(r.header.socket_id.source_port),
            _ => None,
        })
        .filter(|&port| port != 0)
        .collect())
}

fn libc_enoent() -> i32 {
    rustix::io::Errno::NOENT.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, UdpSocket};

    #[test]
    fn sees_listeners_and_bound_udp_but_not_connections() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        // A connection's ports are not services.
        let client = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let (accepted, _) = v4.accept().unwrap();
        let ports = bound_ports().unwrap();
        for l in [&v4, &v6] {
            assert!(ports.tcp.contains(&l.local_addr().unwrap().port()));
        }
        assert!(ports.udp.contains(&udp.local_addr().unwrap().port()));
        let ephemeral = client.local_addr().unwrap().port();
        assert!(
            !ports.tcp.contains(&ephemeral),
            "a connection is not a listener"
        );
        drop((client, accepted));
        let gone = v6.local_addr().unwrap().port();
        drop(v6);
        assert!(
            !bound_ports().unwrap().tcp.contains(&gone),
            "a closed listener"
        );
    }
}
