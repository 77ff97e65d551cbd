//! The VM's nftables rules: one table `ip mergen-<id8>` per VM, replaced and deleted in
//! one atomic `nft -f -` transaction, so a rerun never duplicates a rule and a failure
//! never leaves half a table.

use std::fmt::Write;
use std::process::Command;
use std::time::Duration;

use crate::command;
use crate::error::{Error, Result};
use crate::netplan::NetPlan;

/// The whole table for a VM. Starting with "create empty, then delete" makes the script
/// succeed whether or not the table exists, and the replacement is one transaction.
pub fn render(plan: &NetPlan) -> String {
    let t = &plan.nft_table;
    let mut dnat = String::new();
    for p in &plan.ports {
        // `fib daddr type local`: any address of this host (outside traffic in
        // prerouting; the host's own connections, 127.0.0.1 included, in output).
        let _ = writeln!(
            dnat,
            "    fib daddr type local {proto} dport {host} dnat to {ip}:{guest}",
            proto = p.protocol.as_str(),
            host = p.host,
            ip = plan.guest_ip,
            guest = p.guest,
        );
    }
    format!(
        "table ip {t} {{}}\n\
         delete table ip {t}\n\
         table ip {t} {{\n\
         \x20 chain prerouting {{\n\
         \x20   type nat hook prerouting priority dstnat; policy accept;\n\
         {dnat}\
         \x20 }}\n\
         \x20 chain output {{\n\
         \x20   type nat hook output priority -100; policy accept;\n\
         {dnat}\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   oifname \"{veth}\" ip saddr 127.0.0.0/8 masquerade\n\
         \x20   ip saddr {ip} oifname != \"{veth}\" masquerade\n\
         \x20 }}\n\
         }}\n",
        veth = plan.host_veth,
        ip = plan.guest_ip,
    )
}

/// Install (or replace) the VM's table.
pub fn apply(plan: &NetPlan, timeout: Duration) -> Result<()> {
    nft_script(
        &render(plan),
        timeout,
        &format!("installing nftables table {}", plan.nft_table),
    )
}

/// Remove the VM's table; a missing table is fine.
pub fn delete(table: &str, timeout: Duration) -> Result<()> {
    nft_script(
        &format!("table ip {table} {{}}\ndelete table ip {table}\n"),
        timeout,
        &format!("removing nftables table {table}"),
    )
}

/// Whether the table exists (for tests and for stop's leftover check).
pub fn exists(table: &str, timeout: Duration) -> Result<bool> {
    let mut cmd = Command::new("nft");
    cmd.args(["list", "tables", "ip"]);
    let out = command::run(cmd, None, timeout)?;
    if !out.success {
        return Err(Error::CommandFailed {
            command: "nft list tables".into(),
            stderr: out.stderr.trim().to_string(),
        });
    }
    Ok(out
        .stdout
        .lines()
        .any(|l| l.trim() == format!("table ip {table}")))
}

/// Run `script` as one `nft -f -` transaction; `what` says what it was for.
fn nft_script(script: &str, timeout: Duration, what: &str) -> Result<()> {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]);
    let out = command::run(cmd, Some(script.as_bytes()), timeout)?;
    if out.success {
        Ok(())
    } else {
        Err(Error::CommandFailed {
            command: what.to_string(),
            stderr: out.stderr.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netplan::GuestLink;
    use mergen_model::{Meta, PortBinding, Protocol};

    #[test]
    fn every_port_is_dnatted_in_both_hooks_with_its_protocol() {
        let mut m = Meta::from_slice(
            br#"{"id":"084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6","createdAt":"2025-01-02T03:04:05Z","guestIP":"172.30.0.2"}"#,
        )
        .unwrap();
        m.ports = vec![
            PortBinding {
                guest: 80,
                host: 20001,
                protocol: Protocol::Tcp,
            },
            PortBinding {
                guest: 53,
                host: 20002,
                protocol: Protocol::Udp,
            },
        ];
        let plan = NetPlan::new(&m, &"172.30.0.0/24".parse().unwrap(), GuestLink::Veth).unwrap();
        let s = render(&plan);
        assert!(s.starts_with("table ip mergen-084604f6 {}\ndelete table ip mergen-084604f6\n"));
        assert_eq!(
            s.matches("tcp dport 20001 dnat to 172.30.0.2:80").count(),
            2,
            "{s}"
        );
        assert_eq!(
            s.matches("udp dport 20002 dnat to 172.30.0.2:53").count(),
            2,
            "{s}"
        );
        assert!(s.contains("oifname \"vh-084604f6\" ip saddr 127.0.0.0/8 masquerade"));
        assert!(s.contains("ip saddr 172.30.0.2 oifname != \"vh-084604f6\" masquerade"));
    }
}
