//! Link helpers for VM network setup, over rtnetlink. `ns` says where the link lives
//! (`None`: the calling thread's namespace); the netlink socket is opened inside it on a
//! short-lived thread, then used from the caller's thread.

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_packet_utils::nla::Nla;
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::netns::Netns;
use crate::rtnl::Rtnl;

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_LINK_NAME: usize = 15;

/// Create a veth pair `name` <-> `peer` in `ns`, with `peer` moved into `peer_ns`
/// (`None`: the calling thread's namespace).
pub fn create_veth(
    ns: Option<&Netns>,
    name: &str,
    peer: &str,
    peer_ns: Option<&Netns>,
) -> Result<()> {
    validate_link_name(name)?;
    validate_link_name(peer)?;
    let here;
    let peer_target = match peer_ns {
        Some(target) => target,
        None => {
            here = Netns::current_thread()?;
            &here
        }
    };
    let mut peer_message = LinkMessage::default();
    peer_message
        .attributes
        .push(LinkAttribute::IfName(peer.to_owned()));
    peer_message
        .attributes
        .push(LinkAttribute::NetNsFd(peer_target.as_fd().as_raw_fd()));
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    message.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_message))),
    ]));
    rtnl_in(ns)?
        .request(
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
        .map_err(|e| {
            Error::io(
                format!(
                    "creating veth {name} in {} with peer {peer} in {}",
                    where_(ns),
                    peer_target.name()
                ),
                e,
            )
        })
}

/// Create a persistent tap device `name` inside `ns`; an existing link of that name is
/// left as it is. Same as [`create_tap_owned`] without an owner.
pub fn create_tap(ns: &Netns, name: &str) -> Result<()> {
    create_tap_owned(ns, name, None, None)
}

/// Create a persistent tap device `name` inside `ns` that the user `uid` and/or the group
/// `gid` may attach to without CAP_NET_ADMIN (what a jailed, unprivileged Firecracker
/// needs). An existing tap with the requested owner is left as it is; one with another
/// owner (a previous configuration) is replaced.
///
/// A persistent tap needs the TUNSETIFF, TUNSETOWNER/TUNSETGROUP and TUNSETPERSIST
/// ioctls on /dev/net/tun: the kernel refuses tun/tap creation over rtnetlink,
/// `#![forbid(unsafe_code)]` rules out issuing the ioctls ourselves, and the crates that
/// wrap them either call them from unsafe code we would just be hiding or cannot make the
/// device persistent. So this runs `ip tuntap add` from a thread inside the namespace; the
/// child inherits that namespace.
pub fn create_tap_owned(ns: &Netns, name: &str, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
    validate_link_name(name)?;
    if exists(Some(ns), name)? {
        let (owner, group) = tap_owner(ns, name)?;
        let fits = |want: Option<u32>, have: Option<u32>| want.is_none() || want == have;
        if fits(uid, owner) && fits(gid, group) {
            return Ok(());
        }
        delete_link(Some(ns), name)?;
    }
    let context = || format!("creating tap {name} in network namespace {}", ns.name());
    let mut args = vec![
        "tuntap".to_string(),
        "add".into(),
        "dev".into(),
        name.into(),
        "mode".into(),
        "tap".into(),
    ];
    if let Some(uid) = uid {
        args.extend(["user".into(), uid.to_string()]);
    }
    if let Some(gid) = gid {
        args.extend(["group".into(), gid.to_string()]);
    }
    let output = ns
        .run(|| Command::new("ip").args(&args).output())?
        .map_err(|e| Error::io(format!("{} (running ip)", context()), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            context: context(),
            detail: format!(
                "ip tuntap add exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

/// The owning user and group of the tap `name` in `ns` (`None`: not set), from the
/// tun driver's link info (IFLA_TUN_OWNER, IFLA_TUN_GROUP).
pub fn tap_owner(ns: &Netns, name: &str) -> Result<(Option<u32>, Option<u32>)> {
    const IFLA_TUN_OWNER: u16 = 1;
    const IFLA_TUN_GROUP: u16 = 2;
    validate_link_name(name)?;
    let context = || {
        format!(
            "reading the owner of tap {name} in network namespace {}",
            ns.name()
        )
    };
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    let replies = rtnl_in(Some(ns))?
        .request(RouteNetlinkMessage::GetLink(message), 0)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == Errno::NODEV.raw_os_error() => {
                Error::NotFound(format!("link {name} not found in {}", ns.name()))
            }
            _ => Error::io(context(), e),
        })?;
    let link = replies
        .into_iter()
        .find_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(link) => Some(link),
            _ => None,
        })
        .ok_or_else(|| Error::NotFound(format!("link {name} not found in {}", ns.name())))?;
    let mut is_tun = false;
    let (mut owner, mut group) = (None, None);
    for info in link.attributes.iter().filter_map(|a| match a {
        LinkAttribute::LinkInfo(info) => Some(info),
        _ => None,
    }) {
        for item in info {
            match item {
                LinkInfo::Kind(InfoKind::Tun) => is_tun = true,
                LinkInfo::Data(InfoData::Tun(nlas)) => {
                    for nla in nlas {
                        let mut value = vec![0u8; nla.value_len()];
                        nla.emit_value(&mut value);
                        let Ok(bytes) = <[u8; 4]>::try_from(value.as_slice()) else {
                            continue;
                        };
                        match nla.kind() {
                            IFLA_TUN_OWNER => owner = Some(u32::from_ne_bytes(bytes)),
                            IFLA_TUN_GROUP => group = Some(u32::from_ne_bytes(bytes)),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    if !is_tun {
        return Err(Error::InvalidInput(format!(
            "link {name} in {} is not a tun/tap device",
            ns.name()
        )));
    }
    Ok((owner, group))
}

/// Add `addr/prefix_len` to `link`; an address already there is fine.
pub fn add_address(ns: Option<&Netns>, link: &str, addr: IpAddr, prefix_len: u8) -> Result<()> {
    validate_link_name(link)?;
    validate_prefix(addr, prefix_len)?;
    let mut rtnl = rtnl_in(ns)?;
    let index = index_of(&mut rtnl, ns, link)?;
    let mut message = AddressMessage::default();
    message.header.family = family_of(addr);
    message.header.prefix_len = prefix_len;
    message.header.index = index;
    message.attributes.push(AddressAttribute::Local(addr));
    message.attributes.push(AddressAttribute::Address(addr));
    match rtnl.request(
        RouteNetlinkMessage::NewAddress(message),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(Errno::EXIST.raw_os_error()) => Ok(()),
        Err(e) => Err(Error::io(
            format!("adding {addr}/{prefix_len} to {link} in {}", where_(ns)),
            e,
        )),
    }
}

pub fn set_up(ns: Option<&Netns>, link: &str) -> Result<()> {
    set_link_up(ns, link, true)
}

pub fn set_down(ns: Option<&Netns>, link: &str) -> Result<()> {
    set_link_up(ns, link, false)
}

/// Add a route to `dest/prefix_len` (`0.0.0.0/0` or `::/0`: the default route) via
/// `gateway` and/or out of `dev`; a route already there is fine.
pub fn add_route(
    ns: Option<&Netns>,
    dest: IpAddr,
    prefix_len: u8,
    gateway: Option<IpAddr>,
    dev: Option<&str>,
) -> Result<()> {
    validate_prefix(dest, prefix_len)?;
    if masked(dest, prefix_len) != dest {
        return Err(Error::InvalidInput(format!(
            "route destination {dest}/{prefix_len} has host bits set"
        )));
    }
    if let Some(gw) = gateway {
        if gw.is_ipv4() != dest.is_ipv4() {
            return Err(Error::InvalidInput(format!(
                "gateway {gw} is not of the same family as {dest}/{prefix_len}"
            )));
        }
    }
    if gateway.is_none() && dev.is_none() {
        return Err(Error::InvalidInput(format!(
            "route to {dest}/{prefix_len} needs a gateway or a device"
        )));
    }
    let mut rtnl = rtnl_in(ns)?;
    let mut message = RouteMessage::default();
    message.header.address_family = family_of(dest);
    message.header.destination_prefix_length = prefix_len;
    message.header.table = RouteHeader::RT_TABLE_MAIN;
    message.header.protocol = RouteProtocol::Boot;
    message.header.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    message.header.kind = RouteType::Unicast;
    if prefix_len > 0 {
        message
            .attributes
            .push(RouteAttribute::Destination(route_address(dest)));
    }
    if let Some(gw) = gateway {
        message
            .attributes
            .push(RouteAttribute::Gateway(route_address(gw)));
    }
    if let Some(dev) = dev {
        validate_link_name(dev)?;
        let index = index_of(&mut rtnl, ns, dev)?;
        message.attributes.push(RouteAttribute::Oif(index));
    }
    match rtnl.request(
        RouteNetlinkMessage::NewRoute(message),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(Errno::EXIST.raw_os_error()) => Ok(()),
        Err(e) => Err(Error::io(
            format!("adding route to {dest}/{prefix_len} in {}", where_(ns)),
            e,
        )),
    }
}

/// Delete the link `name` (for a veth, both ends go); a missing link is fine.
pub fn delete_link(ns: Option<&Netns>, name: &str) -> Result<()> {
    validate_link_name(name)?;
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    match rtnl_in(ns)?.request(RouteNetlinkMessage::DelLink(message), 0) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(Errno::NODEV.raw_os_error()) => Ok(()),
        Err(e) => Err(Error::io(
            format!("deleting link {name} in {}", where_(ns)),
            e,
        )),
    }
}

pub fn exists(ns: Option<&Netns>, name: &str) -> Result<bool> {
    validate_link_name(name)?;
    rtnl_in(ns)?
        .link_index(name)
        .map(|index| index.is_some())
        .map_err(|e| Error::io(format!("looking up link {name} in {}", where_(ns)), e))
}

fn set_link_up(ns: Option<&Netns>, link: &str, up: bool) -> Result<()> {
    validate_link_name(link)?;
    let mut rtnl = rtnl_in(ns)?;
    index_of(&mut rtnl, ns, link)?;
    let state = if up { "up" } else { "down" };
    rtnl.set_link_up(link, up)
        .map_err(|e| Error::io(format!("setting {link} {state} in {}", where_(ns)), e))
}

fn rtnl_in(ns: Option<&Netns>) -> Result<Rtnl> {
    let opened = match ns {
        None => Rtnl::open(),
        Some(ns) => ns.run(Rtnl::open)?,
    };
    opened.map_err(|e| Error::io(format!("opening a netlink socket in {}", where_(ns)), e))
}

fn index_of(rtnl: &mut Rtnl, ns: Option<&Netns>, link: &str) -> Result<u32> {
    rtnl.link_index(link)
        .map_err(|e| Error::io(format!("looking up link {link} in {}", where_(ns)), e))?
        .ok_or_else(|| Error::NotFound(format!("link {link} not found in {}", where_(ns))))
}

fn where_(ns: Option<&Netns>) -> String {
    match ns {
        Some(ns) => format!("network namespace {}", ns.name()),
        None => "the caller's network namespace".into(),
    }
}

fn validate_link_name(name: &str) -> Result<()> {
    let bad_char = name.contains(|c: char| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if name.is_empty() || name.len() > MAX_LINK_NAME || bad_char || name == "." || name == ".." {
        return Err(Error::InvalidInput(format!(
            "link name {name:?} must be 1 to {MAX_LINK_NAME} bytes without /, :, NUL or spaces"
        )));
    }
    Ok(())
}

fn validate_prefix(addr: IpAddr, prefix_len: u8) -> Result<()> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix_len > max {
        return Err(Error::InvalidInput(format!(
            "prefix length {prefix_len} is longer than {max} for {addr}"
        )));
    }
    Ok(())
}

fn masked(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

fn family_of(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_address(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}
