//! Listen addresses as the original's Go programs took them: `:8080` (an empty host)
//! is every IPv4 and IPv6 address, as `net.Listen("tcp", ":8080")` listens.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::str::FromStr;

use rustix::io::Errno;
use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// An empty host (`:8080`): every IPv4 and IPv6 address.
    AnyHost(u16),
    Addr(SocketAddr),
}

impl ListenAddr {
    pub fn port(self) -> u16 {
        match self {
            ListenAddr::AnyHost(port) => port,
            ListenAddr::Addr(addr) => addr.port(),
        }
    }

    /// Both cannot be bound at once: an any-host listener takes its port on every
    /// address.
    pub fn overlaps(self, other: ListenAddr) -> bool {
        self == other
            || (self.port() == other.port()
                && (matches!(self, ListenAddr::AnyHost(_))
                    || matches!(other, ListenAddr::AnyHost(_))))
    }

    /// Whether only this host can connect.
    pub fn is_loopback(self) -> bool {
        matches!(self, ListenAddr::Addr(a) if a.ip().is_loopback())
    }

    /// A listening TCP socket. An any-host address listens on `[::]` with IPv4 clients
    /// arriving as `::ffff:a.b.c.d` (whatever `net.ipv6.bindv6only` says), or on
    /// `0.0.0.0` when the host has no IPv6.
    pub fn bind(self) -> io::Result<TcpListener> {
        match self {
            ListenAddr::Addr(addr) => TcpListener::bind(addr),
            ListenAddr::AnyHost(port) => any_host(port, |addr, dual_stack| {
                let fd = tcp_socket(addr, dual_stack)?;
                rustix::net::bind(&fd, &addr)?;
                rustix::net::listen(&fd, 1024)?;
                Ok(TcpListener::from(fd))
            }),
        }
    }
}

/// Run `bind` on `[::]:port` dual-stack, falling back to `0.0.0.0:port` when the host
/// has no IPv6. `bind` gets the address and whether to turn IPV6_V6ONLY off.
pub fn any_host<T>(
    port: u16,
    mut bind: impl FnMut(SocketAddr, bool) -> io::Result<T>,
) -> io::Result<T> {
    match bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true) {
        Err(e) if no_ipv6(&e) => {
            log::info!("no IPv6 on this host ({e}): listening on 0.0.0.0:{port} only");
            bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false)
        }
        bound => bound,
    }
}

fn no_ipv6(e: &io::Error) -> bool {
    [Errno::AFNOSUPPORT, Errno::ADDRNOTAVAIL]
        .iter()
        .any(|errno| e.raw_os_error() == Some(errno.raw_os_error()))
}

/// A TCP socket for `addr`, not yet bound: close-on-exec, SO_REUSEADDR (as std and
/// Go set it), and with `dual_stack` IPv4 clients accepted on an IPv6 socket whatever
/// `net.ipv6.bindv6only` says.
pub fn tcp_socket(addr: SocketAddr, dual_stack: bool) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    if dual_stack {
        sockopt::set_ipv6_v6only(&fd, false)?;
    }
    sockopt::set_socket_reuseaddr(&fd, true)?;
    Ok(fd)
}

impl FromStr for ListenAddr {
    type Err = String;

    /// `:PORT`, `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` (resolved once: its first IPv4
    /// address, else its first, as Go's `net.Listen` picks; `localhost` is 127.0.0.1
    /// even where the resolver lists ::1 first).
    fn from_str(s: &str) -> Result<ListenAddr, String> {
        let s = s.trim();
        let bad =
            || format!("{s:?} is not an address like :8080, 127.0.0.1:8080 or localhost:8080");
        if let Some(port) = s.strip_prefix(':') {
            return port.parse().map(ListenAddr::AnyHost).map_err(|_| bad());
        }
        if let Ok(addr) = SocketAddr::from_str(s) {
            return Ok(ListenAddr::Addr(addr));
        }
        let addrs: Vec<SocketAddr> = s.to_socket_addrs().map_err(|_| bad())?.collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .map(|&a| ListenAddr::Addr(a))
            .ok_or_else(bad)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::AnyHost(port) => write!(f, ":{port}"),
            ListenAddr::Addr(addr) => addr.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn parses_the_forms_the_original_took() {
        let p = |s: &str| s.parse::<ListenAddr>();
        assert_eq!(p(":8080"), Ok(ListenAddr::AnyHost(8080)));
        assert_eq!(p(" :0 "), Ok(ListenAddr::AnyHost(0)));
        assert_eq!(
            p("127.0.0.1:8080"),
            Ok(ListenAddr::Addr("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            p("[::1]:9"),
            Ok(ListenAddr::Addr("[::1]:9".parse().unwrap()))
        );
        assert!(p("localhost:8080").unwrap().is_loopback());
        for bad in ["8080", ":99999", "nowhere.invalid:80", "", ":"] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert!(!ListenAddr::AnyHost(1).is_loopback());
        let a = |s: &str| s.parse::<ListenAddr>().unwrap();
        assert!(a("127.0.0.1:8443").overlaps(a(":8443")));
        assert!(a(":8443").overlaps(a(":8443")));
        assert!(!a("127.0.0.1:8443").overlaps(a("[::1]:8443")));
        assert!(!a(":8443").overlaps(a(":9443")));
        assert_eq!(ListenAddr::AnyHost(8080).to_string(), ":8080");
    }

    /// `:0` answers on 127.0.0.1 and, where the host has IPv6, on ::1.
    #[test]
    fn any_host_listens_on_both_families() {
        let listener = ListenAddr::AnyHost(0).bind().unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let _ = s.write_all(b"hi");
            }
        });
        let mut answered = 0;
        let v6 = TcpStream::connect(("::1", port)).is_ok_and(|mut s| {
            let mut b = [0; 2];
            s.read_exact(&mut b).is_ok()
        });
        answered += usize::from(v6);
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut b = [0; 2];
        s.read_exact(&mut b).unwrap();
        answered += 1;
        if !v6 {
            eprintln!("no IPv6 loopback here: checked IPv4 only");
            let _ = TcpStream::connect(("127.0.0.1", port));
        }
        server.join().unwrap();
        assert!(answered >= 1);
    }
}
