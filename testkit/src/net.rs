use std::net::{IpAddr, SocketAddr, TcpStream};

use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// Ports handed out by [`free_port`]: below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768-60999 by default), so an outgoing connection
/// of another test cannot take the port between this check and the caller's bind, and
/// below mergend's default host-port range (20000-40000).
const TEST_PORTS: std::ops::Range<u32> = 11000..19999;

/// A TCP port that was free a moment ago on 127.0.0.1 and on every address (IPv4 and
/// IPv6), so a caller may listen on `127.0.0.1:P` or `:P`. Ports are spread by process
/// and by call, so parallel tests (and test binaries) rarely try the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..span {
        let n = CALLS.fetch_add(1, Ordering::Relaxed);
        let port = (TEST_PORTS.start + seed.wrapping_add(n.wrapping_mul(7919)) % span) as u16;
        let loopback = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        let any = std::net::TcpListener::bind(("::", port))
            .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))
            .is_ok();
        if loopback && any {
            return port;
        }
    }
    panic!("no free TCP port in {TEST_PORTS:?}");
}

/// A TCP connection to `to` from the local address `from`, e.g. 127.0.0.2 to look
/// like a second client host on loopback (all of 127.0.0.0/8 is local on Linux).
pub fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let family = match to {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    rustix::net::bind(&fd, &SocketAddr::new(from, 0))?;
    rustix::net::connect(&fd, &to)?;
    Ok(TcpStream::from(fd))
}
