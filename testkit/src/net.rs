use std::net::{IpAddr, SocketAddr, TcpStream};

use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port on 127.0.0.1")
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
