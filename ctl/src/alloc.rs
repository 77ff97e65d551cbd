//! Guest IP and host port allocation, as the original: guest IPs from host number 2
//! upward in the guest CIDR, requested host ports must be free and unrepeated, `host: 0`
//! takes the first free port of the range, bindings sorted by host port.
//!
//! Unlike the original, a published port cannot capture a host service: requested
//! ports must lie in the range (unless the operator allows others), and a port a host
//! process listens on is never given, asked for or not.
//!
//! This module is pure; the caller makes it race-free by holding the host-wide
//! allocation lock around reading what the existing VMs hold ([`Taken`]), allocating
//! and writing the new VM.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use mergen_model::{Ipv4Cidr, Meta, PortBinding, Protocol};

use crate::hostports::{self, HostPorts};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRequest {
    pub guest: u16,
    /// 0 = allocate from the range.
    pub host: u16,
    pub protocol: Protocol,
}

/// Why an allocation is impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free guest IP left in {0}")]
    CidrExhausted(Ipv4Cidr),
    #[error("host port {0} is already published by another VM")]
    PortTaken(u16),
    #[error("no free host port left in {0}..={1}")]
    PortRangeExhausted(u16, u16),
    /// A requested port outside the range, which mergen owns (the request is wrong
    /// for this host, not in conflict).
    #[error("host port {port} is outside MGR_PORT_START..=MGR_PORT_END ({start}..={end}); set MGR_ALLOW_PORTS_OUTSIDE_RANGE=1 to publish others")]
    OutsideRange { port: u16, start: u16, end: u16 },
    #[error("host port {port}/{} is in use by a host process: publishing it would capture that service", .protocol.as_str())]
    HostPortInUse { port: u16, protocol: Protocol },
}

/// Where addresses come from.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    pub cidr: Ipv4Cidr,
    /// `MGR_PORT_START..=MGR_PORT_END`.
    pub ports: (u16, u16),
    /// `MGR_ALLOW_PORTS_OUTSIDE_RANGE`.
    pub allow_outside_range: bool,
}

/// The guest IPs and host ports the existing VMs hold, and the ports host processes
/// listen on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taken {
    pub ips: HashSet<Ipv4Addr>,
    pub ports: HashSet<u16>,
    pub host: HostPorts,
}

impl Taken {
    pub fn of(metas: &[Meta]) -> Taken {
        let mut t = Taken::default();
        for m in metas {
            t.ips.insert(m.guest_ip);
            t.ports.extend(m.ports.iter().map(|p| p.host));
        }
        t
    }
}

pub fn allocate(
    pool: &Pool,
    taken: &Taken,
    requested: &[PortRequest],
) -> Result<(Ipv4Addr, Vec<PortBinding>), AllocError> {
    let cidr = pool.cidr;
    let ip = (2u32..)
        .map_while(|n| cidr.host(n))
        .find(|ip| !taken.ips.contains(ip))
        .ok_or(AllocError::CidrExhausted(cidr))?;

    let (start, end) = pool.ports;
    let mut used_ports = taken.ports.clone();
    let mut bindings = Vec::with_capacity(requested.len());
    // Fixed ports first, so an automatic one never takes a port asked for explicitly.
    for r in requested.iter().filter(|r| r.host != 0) {
        if !pool.allow_outside_range && !(start..=end).contains(&r.host) {
            return Err(AllocError::OutsideRange {
                port: r.host,
                start,
                end,
            });
        }
        if !used_ports.insert(r.host) {
            return Err(AllocError::PortTaken(r.host));
        }
        if hostports::holds(&taken.host, r.host, r.protocol) {
            return Err(AllocError::HostPortInUse {
                port: r.host,
                protocol: r.protocol,
            });
        }
        bindings.push(PortBinding {
            guest: r.guest,
            host: r.host,
            protocol: r.protocol,
        });
    }
    for r in requested.iter().filter(|r| r.host == 0) {
        let host = (start..=end)
            .find(|p| !used_ports.contains(p) && !hostports::holds(&taken.host, *p, r.protocol))
            .ok_or(AllocError::PortRangeExhausted(start, end))?;
        used_ports.insert(host);
        bindings.push(PortBinding {
            guest: r.guest,
            host,
            protocol: r.protocol,
        });
    }
    bindings.sort_by_key(|b| (b.host, b.guest));
    Ok((ip, bindings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(ip: [u8; 4], ports: &[u16]) -> Meta {
        let mut m = Meta::from_slice(
            br#"{"id":"a","createdAt":"2025-01-02T03:04:05Z","guestIP":"172.30.0.2"}"#,
        )
        .unwrap();
        m.guest_ip = Ipv4Addr::from(ip);
        m.ports = ports
            .iter()
            .map(|&h| PortBinding {
                guest: 80,
                host: h,
                protocol: Protocol::Tcp,
            })
            .collect();
        m
    }

    fn req(guest: u16, host: u16) -> PortRequest {
        PortRequest {
            guest,
            host,
            protocol: Protocol::Tcp,
        }
    }

    fn pool(cidr: &str, ports: (u16, u16)) -> Pool {
        Pool {
            cidr: cidr.parse().unwrap(),
            ports,
            allow_outside_range: false,
        }
    }

    #[test]
    fn first_free_ip_and_ports_sorted() {
        let existing = [vm([172, 30, 0, 2], &[20000]), vm([172, 30, 0, 4], &[20002])];
        let (ip, b) = allocate(
            &pool("172.30.0.0/24", (20000, 20010)),
            &Taken::of(&existing),
            &[req(80, 0), req(22, 20001), req(443, 0)],
        )
        .unwrap();
        assert_eq!(ip, Ipv4Addr::new(172, 30, 0, 3));
        let hosts: Vec<u16> = b.iter().map(|p| p.host).collect();
        assert_eq!(hosts, vec![20001, 20003, 20004]);
        assert_eq!(b[0].guest, 22);
    }

    #[test]
    fn conflicts_and_exhaustion() {
        let small = pool("10.0.0.0/30", (20000, 20001));
        let existing = Taken::of(&[vm([10, 0, 0, 2], &[20000])]);
        assert_eq!(
            allocate(&small, &existing, &[]),
            Err(AllocError::CidrExhausted(small.cidr))
        );
        let wide = pool("10.0.0.0/24", (20000, 20001));
        assert_eq!(
            allocate(&wide, &existing, &[req(1, 20000)]),
            Err(AllocError::PortTaken(20000))
        );
        assert_eq!(
            allocate(&wide, &Taken::default(), &[req(1, 20001), req(2, 20001)]),
            Err(AllocError::PortTaken(20001))
        );
        assert_eq!(
            allocate(&wide, &existing, &[req(1, 0), req(2, 0)]),
            Err(AllocError::PortRangeExhausted(20000, 20001))
        );
        let top = pool("10.0.0.0/24", (65535, 65535));
        assert!(allocate(&top, &Taken::default(), &[req(1, 0)]).is_ok());
    }

    #[test]
    fn host_services_are_never_captured() {
        let mut taken = Taken::default();
        taken.host.tcp.insert(20000);
        taken.host.udp.insert(20001);
        taken.host.tcp.insert(22);
        let p = pool("10.0.0.0/24", (20000, 20003));
        // Outside the range: refused unless allowed, and then still not a listener's.
        assert_eq!(
            allocate(&p, &taken, &[req(80, 22)]),
            Err(AllocError::OutsideRange {
                port: 22,
                start: 20000,
                end: 20003
            })
        );
        let open = Pool {
            allow_outside_range: true,
            ..p
        };
        assert_eq!(
            allocate(&open, &taken, &[req(80, 22)]),
            Err(AllocError::HostPortInUse {
                port: 22,
                protocol: Protocol::Tcp
            })
        );
        assert!(allocate(&open, &taken, &[req(80, 2222)]).is_ok());
        // Per protocol: 20001 is held for udp only.
        assert_eq!(
            allocate(&p, &taken, &[req(80, 20000)]),
            Err(AllocError::HostPortInUse {
                port: 20000,
                protocol: Protocol::Tcp
            })
        );
        assert!(allocate(&p, &taken, &[req(80, 20001)]).is_ok());
        let udp = PortRequest {
            protocol: Protocol::Udp,
            ..req(53, 0)
        };
        // Automatic ports skip the host's.
        let (_, b) = allocate(&p, &taken, &[req(80, 0), udp]).unwrap();
        assert_eq!(
            b.iter().map(|b| (b.host, b.protocol)).collect::<Vec<_>>(),
            vec![(20000, Protocol::Udp), (20001, Protocol::Tcp)]
        );
    }
}
