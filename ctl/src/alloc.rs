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

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
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

/// The guest IPs and host ports the existing VMs hold, each with how many hold it (a
/// damaged store may give one address to two VMs: it stays taken until both are gone).
/// Kept up to date by the index as VMs come and go, so a create does not gather them
/// from every VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taken {
    ips: HashMap<Ipv4Addr, u32>,
    ports: HashMap<u16, u32>,
}

impl Taken {
    pub fn of(metas: &[Meta]) -> Taken {
        let mut t = Taken::default();
        for m in metas {
            t.hold(m.guest_ip, m.ports.iter().map(|p| p.host));
        }
        t
    }

    pub fn hold(&mut self, ip: Ipv4Addr, ports: impl IntoIterator<Item = u16>) {
        *self.ips.entry(ip).or_default() += 1;
        for p in ports {
            *self.ports.entry(p).or_default() += 1;
        }
    }

    /// Undo one [`Taken::hold`] of the same addresses.
    pub fn release(&mut self, ip: Ipv4Addr, ports: impl IntoIterator<Item = u16>) {
        fn drop_one<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
            if let Entry::Occupied(mut e) = map.entry(key) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
        drop_one(&mut self.ips, ip);
        for p in ports {
            drop_one(&mut self.ports, p);
        }
    }

    #[cfg(test)]
    pub fn ip_set(&self) -> HashSet<Ipv4Addr> {
        self.ips.keys().copied().collect()
    }

    #[cfg(test)]
    pub fn port_set(&self) -> HashSet<u16> {
        self.ports.keys().copied().collect()
    }

    fn has_ip(&self, ip: &Ipv4Addr) -> bool {
        self.ips.contains_key(ip)
    }

    fn has_port(&self, port: u16) -> bool {
        self.ports.contains_key(&port)
    }
}

/// A guest IP and the requested host ports, given what VMs hold (`taken`) and what host
/// processes listen on (`host`).
pub fn allocate(
    pool: &Pool,
    taken: &Taken,
    host: &HostPorts,
    requested: &[PortRequest],
) -> Result<(Ipv4Addr, Vec<PortBinding>), AllocError> {
    let cidr = pool.cidr;
    let ip = (2u32..)
        .map_while(|n| cidr.host(n))
        .find(|ip| !taken.has_ip(ip))
        .ok_or(AllocError::CidrExhausted(cidr))?;

    let (start, end) = pool.ports;
    // This request's own ports; the VMs' are in `taken`.
    let mut claimed: HashSet<u16> = HashSet::new();
    let mut claim = |port: u16| !taken.has_port(port) && claimed.insert(port);
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
        if !claim(r.host) {
            return Err(AllocError::PortTaken(r.host));
        }
        if hostports::holds(host, r.host, r.protocol) {
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
        let port = (start..=end)
            .find(|&p| !hostports::holds(host, p, r.protocol) && claim(p))
            .ok_or(AllocError::PortRangeExhausted(start, end))?;
        bindings.push(PortBinding {
            guest: r.guest,
            host: port,
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
            &HostPorts::default(),
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
        let none = HostPorts::default();
        let small = pool("10.0.0.0/30", (20000, 20001));
        let existing = Taken::of(&[vm([10, 0, 0, 2], &[20000])]);
        assert_eq!(
            allocate(&small, &existing, &none, &[]),
            Err(AllocError::CidrExhausted(small.cidr))
        );
        let wide = pool("10.0.0.0/24", (20000, 20001));
        assert_eq!(
            allocate(&wide, &existing, &none, &[req(1, 20000)]),
            Err(AllocError::PortTaken(20000))
        );
        assert_eq!(
            allocate(
                &wide,
                &Taken::default(),
                &none,
                &[req(1, 20001), req(2, 20001)]
            ),
            Err(AllocError::PortTaken(20001))
        );
        assert_eq!(
            allocate(&wide, &existing, &none, &[req(1, 0), req(2, 0)]),
            Err(AllocError::PortRangeExhausted(20000, 20001))
        );
        let top = pool("10.0.0.0/24", (65535, 65535));
        assert!(allocate(&top, &Taken::default(), &none, &[req(1, 0)]).is_ok());
    }

    #[test]
    fn host_services_are_never_captured() {
        let taken = Taken::default();
        let mut host = HostPorts::default();
        host.tcp.insert(20000);
        host.udp.insert(20001);
        host.tcp.insert(22);
        let p = pool("10.0.0.0/24", (20000, 20003));
        // Outside the range: refused unless allowed, and then still not a listener's.
        assert_eq!(
            allocate(&p, &taken, &host, &[req(80, 22)]),
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
            allocate(&open, &taken, &host, &[req(80, 22)]),
            Err(AllocError::HostPortInUse {
                port: 22,
                protocol: Protocol::Tcp
            })
        );
        assert!(allocate(&open, &taken, &host, &[req(80, 2222)]).is_ok());
        // Per protocol: 20001 is held for udp only.
        assert_eq!(
            allocate(&p, &taken, &host, &[req(80, 20000)]),
            Err(AllocError::HostPortInUse {
                port: 20000,
                protocol: Protocol::Tcp
            })
        );
        assert!(allocate(&p, &taken, &host, &[req(80, 20001)]).is_ok());
        let udp = PortRequest {
            protocol: Protocol::Udp,
            ..req(53, 0)
        };
        // Automatic ports skip the host's.
        let (_, b) = allocate(&p, &taken, &host, &[req(80, 0), udp]).unwrap();
        assert_eq!(
            b.iter().map(|b| (b.host, b.protocol)).collect::<Vec<_>>(),
            vec![(20000, Protocol::Udp), (20001, Protocol::Tcp)]
        );
    }

    #[test]
    fn an_address_held_twice_stays_taken_until_both_let_go() {
        let p = pool("10.0.0.0/24", (20000, 20010));
        let none = HostPorts::default();
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let mut taken = Taken::default();
        taken.hold(ip, [20000]);
        taken.hold(ip, [20000]);
        taken.release(ip, [20000]);
        assert_eq!(
            allocate(&p, &taken, &none, &[req(80, 20000)]),
            Err(AllocError::PortTaken(20000))
        );
        assert_eq!(
            allocate(&p, &taken, &none, &[]).unwrap().0,
            Ipv4Addr::new(10, 0, 0, 3)
        );
        taken.release(ip, [20000]);
        assert_eq!(taken, Taken::default());
        let (ip2, b) = allocate(&p, &taken, &none, &[req(80, 0)]).unwrap();
        assert_eq!((ip2, b[0].host), (ip, 20000));
    }
}
