//! net-setup and net-cleanup: the VM's namespace, links, routes and nftables rules (see
//! `netplan` for the layout, `isolation` for the policy). Both are idempotent: every
//! piece is checked or created with "already there is fine", and cleanup ignores what
//! is already gone.
//!
//! Settings are changed per interface (the VM's host veth, or inside the VM's own
//! namespace), so they go away with the link or the namespace. The one host-wide
//! setting is `net.ipv4.ip_forward`: guests' traffic is routed through the host, and
//! IPv4 forwarding is decided by the interface a packet arrives on, which for the
//! answers to a guest's connections is the host's uplink, not a link of ours. It is
//! only written when off, and the change is reported to the caller to record.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use ffi_free_netns::{links, Netns};
use mergen_model::names;

use crate::error::{Error, Result};
use crate::netplan::{GuestLink, NetPlan, TRANSIT_HOST, TRANSIT_NS};
use crate::nft;

/// A host-wide setting that net-setup had to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostChange {
    /// The sysctl, as `net.ipv4.ip_forward`.
    pub key: String,
    pub was: String,
    pub now: String,
}

/// Build everything for the VM; a second run finds it all in place and changes nothing.
/// Returns the host-wide settings it changed (none when they were already right).
pub fn setup(plan: &NetPlan, timeout: Duration) -> Result<Vec<HostChange>> {
    // The rules first: the guest's veth never exists without its isolation.
    nft::apply(plan, timeout)?;
    let ns = open_or_create(&plan.netns)?;
    if !links::exists(None, &plan.host_veth)? {
        // The veth is the last link created on a previous, interrupted run; if only the
        // namespace end survived (namespace kept, host end gone), clear it first.
        links::delete_link(Some(&ns), &plan.ns_veth)?;
        links::create_veth(None, &plan.host_veth, &plan.ns_veth, Some(&ns))?;
    }
    let changes = root_side(plan)?;
    namespace_side(plan, &ns)?;
    Ok(changes)
}

/// Remove the VM's rules, veth and namespace (its tap goes with it). Gone is fine. Each
/// piece is tried even when an earlier one failed (the first error is returned), so a
/// failing `nft` never keeps a namespace alive. `isolation`: see [`nft::delete`].
pub fn cleanup(id: &str, isolation: bool, timeout: Duration) -> Result<()> {
    let (netns, host_veth, table) = NetPlan::for_cleanup(id);
    let rules = nft::delete(names::short_id(id), &host_veth, &table, isolation, timeout);
    let link = links::delete_link(None, &host_veth).map_err(Error::from);
    let namespace = ffi_free_netns::delete(&netns).map_err(Error::from);
    rules.and(link).and(namespace)
}

/// Whether anything of the VM is still on the host (namespace, host link, rules).
pub fn leftovers(id: &str, timeout: Duration) -> Result<Vec<String>> {
    let (netns, host_veth, table) = NetPlan::for_cleanup(id);
    let mut found = Vec::new();
    if ffi_free_netns::exists(&netns) {
        found.push(format!("network namespace {netns}"));
    }
    if links::exists(None, &host_veth)? {
        found.push(format!("link {host_veth}"));
    }
    found.extend(nft::leftovers(names::short_id(id), &table, timeout)?);
    Ok(found)
}

/// Prepare the host for guests (mergend's start-up): the isolation table's skeleton,
/// so the policy is in place before any VM is. Idempotent; nothing when it is off.
pub fn prepare_host(isolation: bool, timeout: Duration) -> Result<()> {
    match isolation {
        true => nft::install_skeleton(timeout),
        false => Ok(()),
    }
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

fn root_side(plan: &NetPlan) -> Result<Vec<HostChange>> {
    let veth = plan.host_veth.as_str();
    links::add_address(None, veth, IpAddr::V4(TRANSIT_HOST), 32)?;
    links::set_up(None, veth)?;
    links::add_route(None, IpAddr::V4(plan.guest_ip), 32, None, Some(veth))?;
    // Forwarding carries published ports from outside and the guest's own traffic (see
    // the module's note on why it is host-wide).
    let mut changes = Vec::new();
    if let Some(was) = sysctl("net/ipv4/ip_forward", "1")? {
        changes.push(HostChange {
            key: "net.ipv4.ip_forward".into(),
            was,
            now: "1".into(),
        });
    }
    // route_localnet lets a host connection to 127.0.0.1:<hostPort>, once DNATed, leave
    // through the veth (the kernel drops 127/8 sources on other links otherwise). Only
    // on this veth; what it would also let a guest reach (the host's loopback) the
    // isolation policy refuses.
    sysctl(&format!("net/ipv4/conf/{veth}/route_localnet"), "1")?;
    // Behind a tap, the namespace answers the root's ARP for the guest from its transit
    // address, which no route of the root leads back through the veth: strict
    // reverse-path filtering (rp_filter=1, many distributions' default) drops those
    // replies. Loose mode on this veth only; the kernel applies max(all, interface).
    if plan.link == GuestLink::Tap {
        sysctl(&format!("net/ipv4/conf/{veth}/rp_filter"), "2")?;
    }
    Ok(changes)
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
        // the veth), and answers the root's ARP for the guest IP on the veth. Both are
        // settings of the VM's own namespace, gone with it.
        let proxy_arp = format!("net/ipv4/conf/{veth}/proxy_arp");
        ns.run(|| {
            sysctl("net/ipv4/ip_forward", "1")?;
            sysctl(&proxy_arp, "1").map(drop)
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
/// already holds the value (keeps reruns free of side effects). Returns the previous
/// value when it changed it.
fn sysctl(key: &str, value: &str) -> Result<Option<String>> {
    let path = Path::new("/proc/sys").join(key);
    let before = std::fs::read_to_string(&path)
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    if before == value {
        return Ok(None);
    }
    std::fs::write(&path, value)
        .map_err(|e| Error::io(format!("setting {}={value}", path.display()), e))?;
    Ok(Some(before))
}
