//! Every name and address of one VM's host networking, computed from its meta.json and
//! `MGR_GUEST_CIDR` alone, so net-setup and net-cleanup (run by different processes,
//! possibly after a reboot) always agree on what to create and what to remove.
//!
//! Layout (the namespace is `mergen-<id8>`):
//!
//! ```text
//!  root namespace                         namespace mergen-<id8>
//!  vh-<id8> 169.254.100.1/32  ==veth==  vg-<id8>  process: <guestIP>/32
//!  route <guestIP>/32 dev vh-<id8>                 firecracker: 169.254.100.2/32,
//!  nft table ip mergen-<id8>                          proxy_arp, forwarding on,
//!    (DNAT host ports, masquerade)                    tap-<id8> <gateway>/<prefix>
//!  nft table inet mergen (shared)
//!    chains in-<id8>, fwd-<id8> (isolation)
//! ```
//!
//! The transit addresses are the same for every VM: each veth pair is its own link, so
//! the root namespace never needs a per-VM transit subnet (nothing to allocate, nothing
//! to collide). The root reaches the guest through a host route to its /32; the
//! namespace reaches the root through `169.254.100.1`, its default gateway.

use std::net::Ipv4Addr;

use mergen_model::{names, Ipv4Cidr, Meta, PortBinding};

use crate::error::{Error, Result};
use crate::isolation::HostPorts;

/// The root namespace's end of every VM's veth (source of host-made connections).
pub const TRANSIT_HOST: Ipv4Addr = Ipv4Addr::new(169, 254, 100, 1);
/// The namespace's end of the veth when the guest lives behind a tap (Firecracker).
pub const TRANSIT_NS: Ipv4Addr = Ipv4Addr::new(169, 254, 100, 2);

/// How the guest is attached inside the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestLink {
    /// Firecracker: the guest sits behind `tap-<id8>`, which carries the gateway.
    Tap,
    /// Process runtime: the guest IP sits on the namespace's veth end, so a process
    /// started inside the namespace binds it directly.
    Veth,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// The first 8 characters of the VM id, which key every name below.
    pub id8: String,
    pub netns: String,
    /// Root-namespace end of the veth pair.
    pub host_veth: String,
    /// Namespace end of the veth pair.
    pub ns_veth: String,
    pub tap: String,
    pub guest_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    pub link: GuestLink,
    /// Owner (uid, gid) of the tap: the user the jailer runs Firecracker as, which opens
    /// the tap after dropping its privileges. `None`: a root Firecracker needs none.
    pub tap_owner: Option<(u32, u32)>,
    pub ports: Vec<PortBinding>,
    /// `mergen-<id8>` in family `ip`: one table per VM, replaced and deleted atomically.
    pub nft_table: String,
    /// The guest isolation policy with its allowed host ports; `None`: isolation off
    /// (`MGR_GUEST_ISOLATION=0`). On unless the caller turns it off.
    pub isolation: Option<HostPorts>,
}

impl NetPlan {
    pub fn new(meta: &Meta, guest_cidr: &Ipv4Cidr, link: GuestLink) -> Result<NetPlan> {
        let id8 = names::short_id(&meta.id);
        let gateway = guest_cidr.gateway().ok_or_else(|| {
            Error::Invalid(format!("guest CIDR {guest_cidr} has no gateway address"))
        })?;
        if !guest_cidr.contains(meta.guest_ip) || meta.guest_ip == gateway {
            return Err(Error::Invalid(format!(
                "VM {}: guest IP {} is not a guest address of MGR_GUEST_CIDR {guest_cidr}",
                meta.id, meta.guest_ip
            )));
        }
        Ok(NetPlan {
            id8: id8.to_string(),
            netns: names::netns_name(&meta.id),
            host_veth: format!("vh-{id8}"),
            ns_veth: format!("vg-{id8}"),
            tap: names::tap_name(&meta.id),
            guest_ip: meta.guest_ip,
            gateway,
            prefix_len: guest_cidr.prefix_len(),
            link,
            tap_owner: None,
            ports: meta.ports.clone(),
            nft_table: format!("mergen-{id8}"),
            isolation: Some(HostPorts::default()),
        })
    }

    /// Names that are the same whatever the guest kind: what net-cleanup removes.
    pub fn for_cleanup(id: &str) -> (String, String, String) {
        let id8 = names::short_id(id);
        (
            names::netns_name(id),
            format!("vh-{id8}"),
            format!("mergen-{id8}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mergen_model::Protocol;

    fn meta(ip: &str) -> Meta {
        let mut m = Meta::from_slice(
            br#"{"id":"084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6","createdAt":"2025-01-02T03:04:05Z","guestIP":"172.30.0.2"}"#,
        )
        .unwrap();
        m.guest_ip = ip.parse().unwrap();
        m.ports = vec![PortBinding {
            guest: 80,
            host: 20000,
            protocol: Protocol::Tcp,
        }];
        m
    }

    #[test]
    fn names_fit_interface_limits_and_match_the_model() {
        let cidr: Ipv4Cidr = "172.30.0.0/24".parse().unwrap();
        let p = NetPlan::new(&meta("172.30.0.2"), &cidr, GuestLink::Tap).unwrap();
        assert_eq!(p.netns, "mergen-084604f6");
        assert_eq!(p.tap, "tap-084604f6");
        assert_eq!(p.host_veth, "vh-084604f6");
        assert_eq!(p.ns_veth, "vg-084604f6");
        assert_eq!(p.gateway, Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(p.prefix_len, 24);
        for name in [&p.host_veth, &p.ns_veth, &p.tap] {
            assert!(name.len() <= 15, "{name} is too long for an interface");
        }
        assert_eq!(
            NetPlan::for_cleanup(&meta("172.30.0.2").id),
            (p.netns.clone(), p.host_veth.clone(), p.nft_table.clone())
        );
    }

    #[test]
    fn guest_ip_outside_the_cidr_or_on_the_gateway_is_refused() {
        let cidr: Ipv4Cidr = "172.30.0.0/24".parse().unwrap();
        let e = NetPlan::new(&meta("10.0.0.2"), &cidr, GuestLink::Veth)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.0.0.2") && e.contains("172.30.0.0/24"), "{e}");
        assert!(NetPlan::new(&meta("172.30.0.1"), &cidr, GuestLink::Veth).is_err());
    }
}
