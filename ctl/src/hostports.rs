//! Which host ports the host's own processes hold, so a published port never captures
//! one of their services (a VM publishing host port 22 would DNAT every local address's
//! sshd to its guest).
//!
//! Read from `/proc/net/{tcp,tcp6,udp,udp6}` of mergend's own network namespace (the
//! host's): TCP sockets in LISTEN state and bound UDP sockets, on any address, IPv4
//! and IPv6. Reading is better than trying to bind: it sees a listener on one
//! specific address as well as one on the wildcard, and it disturbs nobody.

use std::collections::HashSet;
use std::io;
use std::path::Path;

use mergen_model::Protocol;

/// The ports host processes listen on, per protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPorts {
    pub tcp: HashSet<u16>,
    pub udp: HashSet<u16>,
}

impl HostPorts {
    /// Read the host's current sockets. A table that does not exist (no IPv6) is
    /// empty; any other failure is an error, since guessing "free" could hijack a
    /// service.
    pub fn read() -> io::Result<HostPorts> {
        Self::read_from(Path::new("/proc/net"))
    }

    pub fn read_from(dir: &Path) -> io::Result<HostPorts> {
        let mut out = HostPorts::default();
        for (file, proto) in [
            ("tcp", Protocol::Tcp),
            ("tcp6", Protocol::Tcp),
            ("udp", Protocol::Udp),
            ("udp6", Protocol::Udp),
        ] {
            let text = match std::fs::read_to_string(dir.join(file)) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let set = match proto {
                Protocol::Tcp => &mut out.tcp,
                Protocol::Udp => &mut out.udp,
            };
            set.extend(bound_ports(&text, proto));
        }
        Ok(out)
    }

    pub fn holds(&self, port: u16, proto: Protocol) -> bool {
        match proto {
            Protocol::Tcp => self.tcp.contains(&port),
            Protocol::Udp => self.udp.contains(&port),
        }
    }
}

/// TCP: sockets in LISTEN (`0A`). UDP: every bound socket (`07` unconnected, `01`
/// connected); a UDP "service" is just a bound socket.
const TCP_LISTEN: &str = "0A";

/// The local ports of the table's sockets that hold a service.
fn bound_ports(table: &str, proto: Protocol) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(move |line| {
        // `sl local_address rem_address st ...`, local_address is `ADDR:PORT` in hex.
        let mut cols = line.split_whitespace();
        let local = cols.nth(1)?;
        let state = cols.nth(1)?;
        if proto == Protocol::Tcp && state != TCP_LISTEN {
            return None;
        }
        let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
        (port != 0).then_some(port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 5 2 0000000000000000 0
";

    #[test]
    fn listeners_and_bound_udp_sockets_only() {
        let tcp: HashSet<u16> = bound_ports(TCP, Protocol::Tcp).collect();
        // 8080 and 22 listen; 40000 is the local end of an outgoing connection.
        assert_eq!(tcp, HashSet::from([8080, 22]));
        let tcp6: Vec<u16> = bound_ports(TCP6, Protocol::Tcp).collect();
        assert_eq!(tcp6, vec![443]);
        let udp: Vec<u16> = bound_ports(UDP, Protocol::Udp).collect();
        assert_eq!(udp, vec![53]);
    }

    #[test]
    fn reads_the_four_tables_and_tolerates_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("mergen-hostports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tcp"), TCP).unwrap();
        std::fs::write(dir.join("tcp6"), TCP6).unwrap();
        std::fs::write(dir.join("udp"), UDP).unwrap();
        let h = HostPorts::read_from(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(h.holds(22, Protocol::Tcp) && h.holds(443, Protocol::Tcp));
        assert!(h.holds(53, Protocol::Udp) && !h.holds(53, Protocol::Tcp));
        assert!(!h.holds(22, Protocol::Udp));
    }

    /// This process's own listener shows up in the real tables.
    #[test]
    fn sees_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(HostPorts::read().unwrap().holds(port, Protocol::Tcp));
        let u = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let uport = u.local_addr().unwrap().port();
        assert!(HostPorts::read().unwrap().holds(uport, Protocol::Udp));
    }
}
