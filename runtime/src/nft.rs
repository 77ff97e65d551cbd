//! The VM's nftables rules: one table `ip mergen-<id8>` per VM (published ports,
//! masquerade) and the VM's part of the shared isolation table `inet mergen` (see
//! `isolation`), installed, replaced and removed together in one atomic `nft -f -`
//! transaction, so a rerun never duplicates a rule and a failure never leaves half of
//! them.

use std::fmt::Write;
use std::process::Command;
use std::time::Duration;

use crate::command;
use crate::error::{Error, Result};
use crate::isolation;
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

/// Install (or replace) the VM's rules: its table, and its isolation part (or, with
/// isolation off, the removal of one an earlier setup left).
pub fn apply(plan: &NetPlan, timeout: Duration) -> Result<()> {
    let mut script = String::new();
    match &plan.isolation {
        Some(allow) => {
            script.push_str(&isolation::skeleton());
            script.push_str(&isolation::install(&plan.id8, &plan.host_veth, allow));
        }
        None if shared_table_exists(timeout)? => {
            script.push_str(&isolation::remove(&plan.id8, &plan.host_veth));
        }
        None => {}
    }
    script.push_str(&render(plan));
    run(
        &script,
        timeout,
        &format!("installing the nftables rules of VM {}", plan.id8),
    )
}

/// Remove the VM's table and its isolation part; what is missing is fine. The shared
/// table itself stays: other VMs and other mergends use it. `isolation`: whether this
/// host isolates guests, so the shared table is known to be there (else it is looked
/// for, and its absence means there is no part to remove).
pub fn delete(
    id8: &str,
    host_veth: &str,
    table: &str,
    isolation: bool,
    timeout: Duration,
) -> Result<()> {
    let mut script = String::new();
    if isolation || shared_table_exists(timeout)? {
        script.push_str(&isolation::remove(id8, host_veth));
    }
    let _ = write!(script, "table ip {table} {{}}\ndelete table ip {table}\n");
    run(
        &script,
        timeout,
        &format!("removing the nftables rules of VM {id8}"),
    )
}

/// Install the isolation table's skeleton (mergend's start-up): idempotent.
pub fn install_skeleton(timeout: Duration) -> Result<()> {
    run(
        &isolation::skeleton(),
        timeout,
        &format!("installing nftables table inet {}", isolation::TABLE),
    )
}

/// What of VM `id8` is in nftables: its table and its chains in the shared table (one
/// `nft list chains`, which names every table with its chains).
pub fn leftovers(id8: &str, table: &str, timeout: Duration) -> Result<Vec<String>> {
    let listed = list(&["list", "chains"], timeout)?;
    let mut found = Vec::new();
    let mut current = "";
    for line in listed.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix("table ") {
            current = t.trim_end_matches(" {");
            if current == format!("ip {table}") {
                found.push(format!("nftables table {current}"));
            }
        } else if current == shared_table() {
            for chain in isolation::chains(id8) {
                if line == format!("chain {chain} {{") {
                    found.push(format!("nftables chain {current} {chain}"));
                }
            }
        }
    }
    Ok(found)
}

fn shared_table() -> String {
    format!("inet {}", isolation::TABLE)
}

fn shared_table_exists(timeout: Duration) -> Result<bool> {
    Ok(tables(timeout)?.contains(&shared_table()))
}

/// Every table as `<family> <name>`.
fn tables(timeout: Duration) -> Result<Vec<String>> {
    Ok(list(&["list", "tables"], timeout)?
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .map(str::to_string)
        .collect())
}

fn list(args: &[&str], timeout: Duration) -> Result<String> {
    let mut cmd = Command::new("nft");
    cmd.args(args);
    let out = command::run(cmd, None, timeout)?;
    if !out.success {
        return Err(Error::CommandFailed {
            command: format!("nft {}", args.join(" ")),
            stderr: out.stderr.trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Run `script` as one `nft -f -` transaction; `what` says what it was for.
fn run(script: &str, timeout: Duration, what: &str) -> Result<()> {
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
