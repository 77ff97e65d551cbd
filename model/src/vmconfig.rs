//! `vm.json`: Firecracker's own config-file format. mergend renders it at create time;
//! the runtime's configure-start step replays it against Firecracker's API.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    pub drives: Vec<Drive>,
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
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
    }
}
