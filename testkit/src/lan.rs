//! A LAN of network namespaces for tests of several hosts on one machine: a hub
//! namespace holding a bridge (with an address of its own, for shared services such as
//! etcd) and one namespace per "host", each joined to the bridge by a veth pair. Nothing
//! of it is in the root namespace, so its fixed addresses collide with nothing; every
//! namespace is deleted on drop (a veth goes with the namespace of either end).

use std::process::{Command, Stdio};

use crate::unique_name;

/// The LAN's network: the hub is `.254`, host `i` is `.{i + 1}`.
const NET: &str = "192.168.250";

pub struct Lan {
    /// The hub's namespace and its address on the bridge.
    pub hub: String,
    pub hub_ip: String,
    /// Each host's namespace and its address on the LAN (`eth0` there).
    pub hosts: Vec<String>,
    pub ips: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lan {
    /// A hub and `n` hosts, every link up, loopback too.
    pub fn new(n: usize) -> Lan {
        assert!(n < 250);
        let mut lan = Lan {
            hub: String::new(),
            hub_ip: format!("{NET}.254"),
            hosts: Vec::new(),
            ips: Vec::new(),
        };
        // Pushed as soon as it exists, so a failure half-way removes what was made.
        let hub = unique_name("lanh");
        ip(&["netns", "add", &hub]);
        lan.hub = hub.clone();
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{}/24", lan.hub_ip),
            "dev",
            "br0",
        ]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = unique_name("lan");
            ip(&["netns", "add", &ns]);
            lan.hosts.push(ns.clone());
            let addr = format!("{NET}.{}", i + 1);
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            lan.ips.push(addr);
        }
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain([&self.hub]) {
            let _ = Command::new("ip")
                .args(["netns", "delete", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}
