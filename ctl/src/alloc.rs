//! Guest IP and host port allocation, as the original: guest IPs from host number 2
//! upward in the guest CIDR, requested host ports must be free and unrepeated, `host: 0`
//! takes the first free port of the range, bindings sorted by host port.
//!
//! This module is pure; the caller makes it race-free by holding the host-wide
//! allocation lock around reading what the existing VMs hold ([`Taken`]), allocating
//! and writing the new VM.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use mergen_model::{Ipv4Cidr, Meta, PortBinding, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRequest {
    pub guest: u16,
    /// 0 = allocate from the range.
    pub host: u16,
    pub protocol: Protocol,
}

/// Why an allocation is impossible; every case is answered 409 `conflict`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free guest IP left in {0}")]
    CidrExhausted(Ipv4Cidr),
    #[error("host port {0} is already published by another VM")]
    PortTaken(u16),
    #[error("no free host port left in {0}..={1}")]
    PortRangeExhausted(u16, u16),
}

/// The guest IPs and host ports the existing VMs hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taken {
    pub ips: HashSet<Ipv4Addr>,
    pub ports: HashSet<u16>,
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
    cidr: Ipv4Cidr,
    port_range: (u16, u16),
    taken: &Taken,
    requested: &[PortRequest],
) -> Result<(Ipv4Addr, Vec<PortBinding>), AllocError> {
    let ip = (2u32..)
        .map_while(|n| cidr.host(n))
        .find(|ip| !taken.ips.contains(ip))
        .ok_or(AllocError::CidrExhausted(cidr))?;

    let mut used_ports = taken.ports.clone();
    let mut bindings = Vec::with_capacity(requested.len());
    // Fixed ports first, so an automatic one never takes a port asked for explicitly.
    for r in requested.iter().filter(|r| r.host != 0) {
        if !used_ports.insert(r.host) {
            return Err(AllocError::PortTaken(r.host));
        }
        bindings.push(PortBinding {
            guest: r.guest,
            host: r.host,
            protocol: r.protocol,
        });
    }
    let (start, end) = port_range;
    for r in requested.iter().filter(|r| r.host == 0) {
        let host = (start..=end)
            .find(|p| !used_ports.contains(p))
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

    #[test]
    fn first_free_ip_and_ports_sorted() {
        let cidr: Ipv4Cidr = "172.30.0.0/24".parse().unwrap();
        let existing = [vm([172, 30, 0, 2], &[20000]), vm([172, 30, 0, 4], &[20002])];
        let (ip, b) = allocate(
            cidr,
            (20000, 20010),
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
        let cidr: Ipv4Cidr = "10.0.0.0/30".parse().unwrap();
        let existing = [vm([10, 0, 0, 2], &[20000])];
        assert_eq!(
            allocate(cidr, (20000, 20001), &Taken::of(&existing), &[]),
            Err(AllocError::CidrExhausted(cidr))
        );
        let wide: Ipv4Cidr = "10.0.0.0/24".parse().unwrap();
        assert_eq!(
            allocate(
                wide,
                (20000, 20001),
                &Taken::of(&existing),
                &[req(1, 20000)]
            ),
            Err(AllocError::PortTaken(20000))
        );
        assert_eq!(
            allocate(
                wide,
                (20000, 20001),
                &Taken::default(),
                &[req(1, 5000), req(2, 5000)]
            ),
            Err(AllocError::PortTaken(5000))
        );
        assert_eq!(
            allocate(
                wide,
                (20000, 20001),
                &Taken::of(&existing),
                &[req(1, 0), req(2, 0)]
            ),
            Err(AllocError::PortRangeExhausted(20000, 20001))
        );
        assert!(allocate(wide, (65535, 65535), &Taken::default(), &[req(1, 0)]).is_ok());
    }
}
