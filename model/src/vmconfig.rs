//! `vm.json`: Firecracker's own config-file format. mergend renders it at create time;
//! the runtime's configure-start step replays it against Firecracker's API.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::Ipv4Cidr;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    pub drives: Vec<Drive>,
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The later original's optional vsock device, sent to Firecracker's `/vsock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    pub boot_args: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub smt: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
}

impl VmConfig {
    /// A VM's config as mergen writes it: the kernel with `boot_args`, the root drive
    /// (and a `data` drive when given), and `eth0` on the VM's tap with its MAC.
    pub fn new(
        id: &str,
        kernel: &str,
        boot_args: String,
        rootfs: &str,
        data_disk: Option<&str>,
        machine: MachineConfig,
    ) -> VmConfig {
        let mut drives = vec![Drive {
            drive_id: "rootfs".into(),
            path_on_host: rootfs.into(),
            is_root_device: true,
            is_read_only: false,
        }];
        if let Some(data) = data_disk.filter(|d| !d.is_empty()) {
            drives.push(Drive {
                drive_id: "data".into(),
                path_on_host: data.into(),
                is_root_device: false,
                is_read_only: false,
            });
        }
        VmConfig {
            boot_source: BootSource {
                kernel_image_path: kernel.into(),
                boot_args,
            },
            drives,
            machine_config: machine,
            network_interfaces: vec![NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: crate::names::tap_name(id),
                guest_mac: crate::names::guest_mac(id),
            }],
            vsock: None,
        }
    }
}

/// Firecracker's vsock device: the guest's context id and the host-side unix socket
/// that guest connections arrive on. `vsock_id` was required by Firecracker before
/// 1.0 and is optional since; it is kept only when the file has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}

impl BootSource {
    /// Add the guest network's `ip=` argument ([`ip_boot_arg`]) unless the boot args
    /// already have one (an `ip=dhcp` or the user's own static setting is kept).
    pub fn ensure_ip_arg(&mut self, guest_ip: Ipv4Addr, cidr: &Ipv4Cidr) {
        self.boot_args = with_ip_arg(&self.boot_args, guest_ip, cidr);
    }
}

/// The kernel's static network setting for the guest:
/// `ip=<guest>::<gateway>:<netmask>::eth0:off`, the gateway being the CIDR's first host.
pub fn ip_boot_arg(guest_ip: Ipv4Addr, cidr: &Ipv4Cidr) -> String {
    let gateway = cidr.gateway().map(|g| g.to_string()).unwrap_or_default();
    format!("ip={guest_ip}::{gateway}:{}::eth0:off", cidr.netmask())
}

/// `args` with [`ip_boot_arg`] appended unless one of its words already starts with `ip=`.
pub fn with_ip_arg(args: &str, guest_ip: Ipv4Addr, cidr: &Ipv4Cidr) -> String {
    if args.split_ascii_whitespace().any(|a| a.starts_with("ip=")) {
        return args.to_string();
    }
    let ip = ip_boot_arg(guest_ip, cidr);
    match args.trim_end() {
        "" => ip,
        rest => format!("{rest} {ip}"),
    }
}

/// The original's boot args when the request sets none.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape() {
        let doc = r#"{
          "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"},
          "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}],
          "machine-config": {"vcpu_count": 1, "mem_size_mib": 512, "smt": false},
          "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap-xxxxxxxx", "guest_mac": "02:FC:00:00:00:01"}]
        }"#;
        let c: VmConfig = serde_json::from_str(doc).unwrap();
        assert_eq!(c.boot_source.boot_args, DEFAULT_BOOT_ARGS);
        assert_eq!(c.drives[0].drive_id, "rootfs");
        assert_eq!(c.network_interfaces[0].iface_id, "eth0");
        assert_eq!(c.vsock, None);
        // No vsock block in, none out.
        assert!(!serde_json::to_string(&c).unwrap().contains("vsock"));
    }

    #[test]
    fn a_vsock_block_round_trips_exactly() {
        // As the later original writes it (two-space pretty JSON, Firecracker's keys).
        let with_id = r#"{
  "boot-source": {
    "kernel_image_path": "/k",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"
  },
  "drives": [
    {
      "drive_id": "rootfs",
      "path_on_host": "/r",
      "is_root_device": true,
      "is_read_only": false
    }
  ],
  "machine-config": {
    "vcpu_count": 1,
    "mem_size_mib": 512,
    "smt": false
  },
  "network-interfaces": [
    {
      "iface_id": "eth0",
      "host_dev_name": "tap-084604f6",
      "guest_mac": "02:FC:08:46:04:01"
    }
  ],
  "vsock": {
    "vsock_id": "vsock0",
    "guest_cid": 3,
    "uds_path": "/run/mergen/084604f6/vsock.sock"
  }
}"#;
        let without_id = with_id.replace("    \"vsock_id\": \"vsock0\",\n", "");
        for doc in [with_id, without_id.as_str()] {
            let c: VmConfig = serde_json::from_str(doc).unwrap();
            assert_eq!(c.vsock.as_ref().unwrap().guest_cid, 3);
            assert_eq!(serde_json::to_string_pretty(&c).unwrap(), doc);
        }
    }

    #[test]
    fn ip_argument_is_added_once_and_never_replaces_the_users() {
        let cidr: Ipv4Cidr = "172.30.0.0/24".parse().unwrap();
        let ip = Ipv4Addr::new(172, 30, 0, 7);
        let arg = "ip=172.30.0.7::172.30.0.1:255.255.255.0::eth0:off";
        assert_eq!(ip_boot_arg(ip, &cidr), arg);
        assert_eq!(
            with_ip_arg(DEFAULT_BOOT_ARGS, ip, &cidr),
            format!("{DEFAULT_BOOT_ARGS} {arg}")
        );
        assert_eq!(with_ip_arg("", ip, &cidr), arg);
        let mut b = BootSource {
            kernel_image_path: "/k".into(),
            boot_args: "console=ttyS0 ip=dhcp".into(),
        };
        b.ensure_ip_arg(ip, &cidr);
        assert_eq!(b.boot_args, "console=ttyS0 ip=dhcp");
        b.boot_args = format!("console=ttyS0 {arg}");
        b.ensure_ip_arg(ip, &cidr);
        assert_eq!(b.boot_args.matches("ip=").count(), 1);
        // `vip=` or `noip` are other arguments, not the network's.
        assert_eq!(with_ip_arg("vip=1", ip, &cidr), format!("vip=1 {arg}"));
    }
}
