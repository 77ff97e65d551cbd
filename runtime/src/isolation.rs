//! The guest isolation policy: what a guest may reach on this host.
//!
//! A guest reaches the outside world (masqueraded by its VM's NAT table) and answers
//! the traffic sent to it (published ports, the forwarder's dials from inside its
//! namespace). It never reaches another guest, nor the host itself: not the host's
//! addresses (169.254.100.1, the gateway of process VMs, included), not its loopback
//! services (which `route_localnet` on the VM's veth would otherwise let a guest that
//! crafts packets to 127.0.0.1 reach), not over IPv6 link-local. `MGR_GUEST_ISOLATION=0`
//! turns the policy off; `MGR_GUEST_ALLOW_HOST_PORTS` opens chosen host ports (a DNS
//! forwarder, say).
//!
//! All of it lives in one nftables table, `inet mergen`, shared by every VM and every
//! mergend on the host. Its skeleton (two base chains that dispatch on the interface
//! through two verdict maps) is re-asserted by every net-setup and at start-up, in the
//! same atomic transaction as the VM's own part, and never removed. A VM's part is
//! keyed to its host veth `vh-<id8>`: two chains and one element in each map, added
//! and removed with the VM, so VMs (and mergends with other roots or settings) never
//! touch each other's rules.
//!
//! ```text
//! table inet mergen
//!   chain input   (filter hook input)    iifname vmap @guest_input
//!   chain forward (filter hook forward)  iifname vmap @guest_forward
//!                                        oifname vmap @guest_forward
//!   map guest_input   { "vh-<id8>" : jump in-<id8> }
//!   map guest_forward { "vh-<id8>" : jump fwd-<id8> }
//!   chain in-<id8>    established/related accept, allowed ports accept, reject
//!   chain fwd-<id8>   guest veth <-> guest veth: reject
//! ```
//!
//! Refused traffic gets an ICMP "administratively prohibited", so a client fails at
//! once instead of timing out, and can tell a policy from a dead port.

use std::fmt::{self, Write};
use std::str::FromStr;

use mergen_model::Protocol;

/// The shared table, in family `inet` (IPv4 and IPv6 alike).
pub const TABLE: &str = "mergen";
/// Every VM's host veth starts with this; `vh-*` matches all guests of all mergends.
pub const GUEST_VETH_PREFIX: &str = "vh-";

const REJECT: &str = "reject with icmpx type admin-prohibited";

/// `MGR_GUEST_ALLOW_HOST_PORTS`: host ports guests may reach despite the isolation.
/// Comma-separated entries, each `tcp/PORT`, `udp/PORT`, or a bare `PORT` for both
/// protocols, where `PORT` may be a range `LOW-HIGH`: `udp/53,tcp/53`, `53`,
/// `tcp/8000-8010`. Empty: none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPorts(pub Vec<HostPortRule>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPortRule {
    /// `None`: TCP and UDP.
    pub protocol: Option<Protocol>,
    pub low: u16,
    pub high: u16,
}

impl FromStr for HostPorts {
    type Err = String;

    fn from_str(s: &str) -> Result<HostPorts, String> {
        let mut rules = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (protocol, ports) = match entry.split_once('/') {
                Some((p, ports)) => {
                    let protocol = match p.trim().to_ascii_lowercase().as_str() {
                        "tcp" => Protocol::Tcp,
                        "udp" => Protocol::Udp,
                        other => {
                            return Err(format!(
                                "{entry:?}: protocol {other:?} is not tcp or udp \
                                 (entries look like tcp/53, udp/53, 53 or 8000-8010)"
                            ))
                        }
                    };
                    (Some(protocol), ports.trim())
                }
                None => (None, entry),
            };
            let port = |p: &str| -> Result<u16, String> {
                match p.trim().parse::<u16>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{entry:?}: {p:?} is not a port (1-65535)")),
                }
            };
            let (low, high) = match ports.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => (port(ports)?, port(ports)?),
            };
            if low > high {
                return Err(format!("{entry:?}: the range runs backwards"));
            }
            rules.push(HostPortRule {
                protocol,
                low,
                high,
            });
        }
        Ok(HostPorts(rules))
    }
}

impl fmt::Display for HostPorts {
    /// The canonical form, which parses back to the same list (handed to supervisors).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if let Some(p) = r.protocol {
                write!(f, "{}/", p.as_str())?;
            }
            match r.low == r.high {
                true => write!(f, "{}", r.low)?,
                false => write!(f, "{}-{}", r.low, r.high)?,
            }
        }
        Ok(())
    }
}

/// The table, its maps and base chains. Idempotent: `add` of what exists is a no-op,
/// and the base chains are flushed and refilled with the same rules in the same
/// transaction, so no packet ever sees them empty and no VM's part is touched.
pub fn skeleton() -> String {
    let t = format!("inet {TABLE}");
    format!(
        "add table {t}\n\
         add map {t} guest_input {{ type ifname : verdict; }}\n\
         add map {t} guest_forward {{ type ifname : verdict; }}\n\
         add chain {t} input {{ type filter hook input priority filter; policy accept; }}\n\
         add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}\n\
         flush chain {t} input\n\
         add rule {t} input iifname vmap @guest_input\n\
         flush chain {t} forward\n\
         add rule {t} forward iifname vmap @guest_forward\n\
         add rule {t} forward oifname vmap @guest_forward\n"
    )
}

/// The part of VM `id8` (host veth `veth`), installed or replaced. Run after
/// [`skeleton`] in the same transaction.
pub fn install(id8: &str, veth: &str, allow: &HostPorts) -> String {
    let t = format!("inet {TABLE}");
    let (input, forward) = (format!("in-{id8}"), format!("fwd-{id8}"));
    let mut s = String::new();
    let _ = writeln!(s, "add chain {t} {input}");
    let _ = writeln!(s, "flush chain {t} {input}");
    // Answers to what the host or the outside opened towards the guest (published
    // ports reached from the host come back to the host), and ICMP errors about it.
    let _ = writeln!(
        s,
        "add rule {t} {input} ct state established,related accept"
    );
    for r in &allow.0 {
        let protocols = match r.protocol {
            Some(p) => p.as_str().to_string(),
            None => "{ tcp, udp }".to_string(),
        };
        let ports = match r.low == r.high {
            true => r.low.to_string(),
            false => format!("{}-{}", r.low, r.high),
        };
        let _ = writeln!(
            s,
            "add rule {t} {input} meta l4proto {protocols} th dport {ports} accept"
        );
    }
    let _ = writeln!(s, "add rule {t} {input} {REJECT}");
    let _ = writeln!(s, "add chain {t} {forward}");
    let _ = writeln!(s, "flush chain {t} {forward}");
    // Jumped to when this VM's veth is the way in or the way out: refuse whenever the
    // other side is a guest as well, whichever mergend runs it.
    let _ = writeln!(
        s,
        "add rule {t} {forward} iifname \"{GUEST_VETH_PREFIX}*\" oifname \"{GUEST_VETH_PREFIX}*\" {REJECT}"
    );
    for (map, chain) in [("guest_input", &input), ("guest_forward", &forward)] {
        // add (no-op if present), delete, add: the element ends up present whatever
        // was there before.
        let _ = writeln!(s, "add element {t} {map} {{ \"{veth}\" : jump {chain} }}");
        let _ = writeln!(s, "delete element {t} {map} {{ \"{veth}\" }}");
        let _ = writeln!(s, "add element {t} {map} {{ \"{veth}\" : jump {chain} }}");
    }
    s
}

/// Remove VM `id8`'s part, present or not. Needs the table: run it only when the table
/// exists (then the maps are declared again here, so the script stands on its own).
pub fn remove(id8: &str, veth: &str) -> String {
    let t = format!("inet {TABLE}");
    let mut s = format!(
        "add table {t}\n\
         add map {t} guest_input {{ type ifname : verdict; }}\n\
         add map {t} guest_forward {{ type ifname : verdict; }}\n"
    );
    for (map, chain) in [
        ("guest_input", format!("in-{id8}")),
        ("guest_forward", format!("fwd-{id8}")),
    ] {
        // Create what may be missing so that every delete below has something to act on.
        let _ = writeln!(s, "add chain {t} {chain}");
        let _ = writeln!(s, "add element {t} {map} {{ \"{veth}\" : jump {chain} }}");
        let _ = writeln!(s, "delete element {t} {map} {{ \"{veth}\" }}");
        let _ = writeln!(s, "flush chain {t} {chain}");
        let _ = writeln!(s, "delete chain {t} {chain}");
    }
    s
}

/// The names of VM `id8`'s chains in the shared table (for leftover checks).
pub fn chains(id8: &str) -> [String; 2] {
    [format!("in-{id8}"), format!("fwd-{id8}")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_parse_print_and_refuse_nonsense() {
        let p: HostPorts = " udp/53, TCP/53 ,8000-8010,tcp/ 22 ".parse().unwrap();
        assert_eq!(
            p.0,
            [
                HostPortRule {
                    protocol: Some(Protocol::Udp),
                    low: 53,
                    high: 53
                },
                HostPortRule {
                    protocol: Some(Protocol::Tcp),
                    low: 53,
                    high: 53
                },
                HostPortRule {
                    protocol: None,
                    low: 8000,
                    high: 8010
                },
                HostPortRule {
                    protocol: Some(Protocol::Tcp),
                    low: 22,
                    high: 22
                },
            ]
        );
        assert_eq!(p.to_string(), "udp/53,tcp/53,8000-8010,tcp/22");
        assert_eq!(p.to_string().parse::<HostPorts>().unwrap(), p);
        assert_eq!("".parse::<HostPorts>().unwrap(), HostPorts::default());
        assert_eq!(HostPorts::default().to_string(), "");
        for bad in ["sctp/5", "tcp/0", "70000", "tcp/", "10-5", "dns", "1-2-3"] {
            assert!(bad.parse::<HostPorts>().is_err(), "{bad} accepted");
        }
        let e = "sctp/5".parse::<HostPorts>().unwrap_err();
        assert!(e.contains("tcp/53"), "the error shows the syntax: {e}");
    }

    #[test]
    fn a_vms_part_is_keyed_to_its_veth_and_refuses_by_default() {
        let allow: HostPorts = "udp/53,tcp/8000-8010,9000".parse().unwrap();
        let s = install("084604f6", "vh-084604f6", &allow);
        let lines: Vec<&str> = s.lines().collect();
        // Established first, then the holes, then the refusal: order is the policy.
        let pos = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing in\n{s}"))
        };
        let est = pos("in-084604f6 ct state established,related accept");
        let dns = pos("in-084604f6 meta l4proto udp th dport 53 accept");
        let range = pos("in-084604f6 meta l4proto tcp th dport 8000-8010 accept");
        let both = pos("in-084604f6 meta l4proto { tcp, udp } th dport 9000 accept");
        let reject =
            pos("add rule inet mergen in-084604f6 reject with icmpx type admin-prohibited");
        assert!(
            est < dns && dns < range && range < both && both < reject,
            "{s}"
        );
        assert!(s.contains(
            "add rule inet mergen fwd-084604f6 iifname \"vh-*\" oifname \"vh-*\" reject"
        ));
        assert_eq!(
            s.matches("add element inet mergen guest_input { \"vh-084604f6\" : jump in-084604f6 }")
                .count(),
            2
        );
        // Nothing in it touches the shared chains or another VM.
        assert!(!s.contains("flush chain inet mergen input\n"));
        assert!(!s.contains("delete table"));
        for line in &lines {
            assert!(line.contains("084604f6"), "not keyed to the VM: {line}");
        }
        let r = remove("084604f6", "vh-084604f6");
        assert!(!r.contains("flush chain inet mergen input\n") && !r.contains("delete table"));
        assert!(r.contains("delete chain inet mergen in-084604f6"));
        assert!(r.contains("delete chain inet mergen fwd-084604f6"));
        assert!(skeleton().contains("add rule inet mergen forward oifname vmap @guest_forward"));
    }
}
