//! net-setup and net-cleanup: the VM's namespace, links, routes and nftables table (see
//! `netplan` for the layout). Both are idempotent: every piece is checked or created
//! with "already there is fine", and cleanup ignores what is already gone.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use ffi_free_netns::{links, Netns};

use crate::error::{Error, Result};
use crate::netplan::{GuestLink, NetPlan, TRANSIT_HOST, TRANSIT_NS};
use crate::nft;

/// Build everything for the VM; a second run finds it all in place and changes nothing.
pub fn setup(plan: &NetPlan, timeout: Duration) -> Result<()> {
    let ns = open_or_create(&plan.netns)?;
    if !links::exists(None, &plan.host_veth)? {
        // The veth is the last link created on a previous, interrupted run; if only the
        // namespace end survived (namespace kept, host end gone), clear it first.
        links::delete_link(Some(&ns), &plan.ns_veth)?;
        links::create_veth(None, &plan.host_veth, &plan.ns_veth, Some(&ns))?;
    }
    root_side(plan)?;
    namespace_side(plan, &ns)?;
    nft::apply(plan, timeout)
}

/// Remove the VM's table, veth and namespace (its tap goes with it). Gone is fine.
pub fn cleanup(id: &str, timeout: Duration) -> Result<()> {
    let (netns, host_veth, table) = NetPlan::for_cleanup(id);
    nft::delete(&table, timeout)?;
    links::delete_link(None, &host_veth)?;
    Ok(ffi_free_netns::delete(&netns)?)
}

/// Whether anything of the VM is still on the host (namespace, host link, table).
pub fn leftovers(id: &str, timeout: Duration) -> Result<Vec<String>> {
    let (netns, host_veth, table) = NetPlan::for_cleanup(id);
    let mut found = Vec::new();
    if ffi_free_netns::exists(&netns) {
        found.push(format!("network namespace {netns}"));
    }
    if links::exists(None, &host_veth)? {
        found.push(format!("link {host_veth}"));
    }
    if nft::exists(&table, timeout)? {
        found.push(format!("nftables table ip {table}"));
    }
    Ok(found)
}

fn open_or_create(name: &str) -> Result<Netns> {
    if ffi_free_netns::exists(name) {
        return Ok(ffi_free_netns::open(name)?);
    }
    match ffi_free_netns::create(name) {
        Ok(ns) => Ok(ns),
        // Lost a race with another net-setup of the same VM: use theirs.
        Err(_) if ffi_free_netns::exists(name) => Ok(ffi_free_netns::open(name)?),
        Err(e) => Err(e.into()),
    }
}

fn root_side(plan: &NetPlan) -> Result<()> {
    let veth = plan.host_veth.as_str();
    links::add_address(None, veth, IpAddr::V4(TRANSIT_HOST), 32)?;
    links::set_up(None, veth)?;
    links::add_route(None, IpAddr::V4(plan.guest_ip), 32, None, Some(veth))?;
    // Forwarding carries published ports from outside and the guest's own traffic;
    // route_localnet lets a host connection to 127.0.0.1:<hostPort>, once DNATed, leave
    // through the veth (the kernel drops 127/8 sources on other links otherwise).
    sysctl("net/ipv4/ip_forward", "1")?;
    sysctl(&format!("net/ipv4/conf/{veth}/route_localnet"), "1")?;
    // Behind a tap, the namespace answers the root's ARP for the guest from its transit
    // address, which no route of the root leads back through the veth: strict
    // reverse-path filtering (rp_filter=1, many distributions' default) drops those
    // replies. Loose mode on this veth only; the kernel applies max(all, interface).
    if plan.link == GuestLink::Tap {
        sysctl(&format!("net/ipv4/conf/{veth}/rp_filter"), "2")?;
    }
    Ok(())
}

fn namespace_side(plan: &NetPlan, ns: &Netns) -> Result<()> {
    let veth = plan.ns_veth.as_str();
    let own_address = match plan.link {
        GuestLink::Veth => plan.guest_ip,
        GuestLink::Tap => TRANSIT_NS,
    };
    links::add_address(Some(ns), veth, IpAddr::V4(own_address), 32)?;
    links::set_up(Some(ns), veth)?;
    if plan.link == GuestLink::Tap {
        let (uid, gid) = match plan.tap_owner {
            Some((uid, gid)) => (Some(uid), Some(gid)),
            None => (None, None),
        };
        links::create_tap_owned(ns, &plan.tap, uid, gid)?;
        links::add_address(
            Some(ns),
            &plan.tap,
            IpAddr::V4(plan.gateway),
            plan.prefix_len,
        )?;
        links::set_up(Some(ns), &plan.tap)?;
        // The namespace routes between the guest (behind the tap) and the root (behind
        // the veth), and answers the root's ARP for the guest IP on the veth.
        let proxy_arp = format!("net/ipv4/conf/{veth}/proxy_arp");
        ns.run(|| {
            sysctl("net/ipv4/ip_forward", "1")?;
            sysctl(&proxy_arp, "1")
        })??;
    }
    links::add_route(Some(ns), IpAddr::V4(TRANSIT_HOST), 32, None, Some(veth))?;
    links::add_route(
        Some(ns),
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        0,
        Some(IpAddr::V4(TRANSIT_HOST)),
        Some(veth),
    )?;
    Ok(())
}

/// Write a sysctl of the calling thread's network namespace, skipping the write when it
/// already holds the value (keeps reruns free of side effects).
fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value)
        .map_err(|e| Error::io(format!("setting {}={value}", path.display()), e))
}
