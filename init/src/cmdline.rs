//! The kernel command line: the guest network (`ip=`), the metadata path
//! (`mergen.meta=`), the hostname and how to stop (`mergen.exit=`).

use std::net::Ipv4Addr;

/// The default place of the image metadata inside the rootfs (the converter writes it).
pub const DEFAULT_META_PATH: &str = "/etc/mergen/image-meta.json";

/// What mergen-init reads from the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootArgs {
    pub ip: Option<IpConfig>,
    pub meta_path: Option<String>,
    pub hostname: Option<String>,
    /// `mergen.exit=poweroff` asks for RB_POWER_OFF instead of a restart.
    pub power_off: bool,
}

/// The static part of the kernel's `ip=` argument
/// (`client:server:gateway:netmask:hostname:device:autoconf:dns0:dns1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub hostname: Option<String>,
    pub device: String,
    pub dns: Vec<Ipv4Addr>,
}

impl BootArgs {
    pub fn parse(cmdline: &str) -> BootArgs {
        let mut args = BootArgs::default();
        for word in cmdline.split_ascii_whitespace() {
            // Everything after `--` belongs to init's argv, not to the kernel.
            if word == "--" {
                break;
            }
            if let Some(v) = word.strip_prefix("ip=") {
                args.ip = parse_ip(v);
            } else if let Some(v) = word.strip_prefix("mergen.meta=") {
                args.meta_path = Some(v.to_string()).filter(|v| !v.is_empty());
            } else if let Some(v) = word.strip_prefix("mergen.hostname=") {
                args.hostname = Some(v.to_string()).filter(|v| !v.is_empty());
            } else if let Some(v) = word.strip_prefix("mergen.exit=") {
                args.power_off = v == "poweroff";
            }
        }
        args
    }

    pub fn meta_path(&self) -> &str {
        self.meta_path.as_deref().unwrap_or(DEFAULT_META_PATH)
    }

    /// `mergen.hostname=` wins over the hostname field of `ip=`.
    pub fn hostname(&self) -> Option<&str> {
        self.hostname
            .as_deref()
            .or(self.ip.as_ref().and_then(|ip| ip.hostname.as_deref()))
    }
}

/// A static `ip=` value; `dhcp`, `off`, `none` and values without an address are not
/// ours to configure (the kernel or a DHCP client in the image handles them).
fn parse_ip(v: &str) -> Option<IpConfig> {
    let f: Vec<&str> = v.split(':').collect();
    let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
    let address: Ipv4Addr = field(0)?.parse().ok()?;
    let gateway = field(2).and_then(|g| g.parse().ok());
    let prefix_len = match field(3) {
        Some(mask) => mask_to_prefix(mask.parse().ok()?)?,
        None => 32,
    };
    let device = field(5).unwrap_or("eth0").to_string();
    let dns = [field(7), field(8)]
        .into_iter()
        .flatten()
        .filter_map(|d| d.parse().ok())
        .collect();
    Some(IpConfig {
        address,
        prefix_len,
        gateway,
        hostname: field(4).map(str::to_string),
        device,
        dns,
    })
}

/// A contiguous netmask as a prefix length; anything else is refused.
fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let len = bits.leading_ones();
    (bits.checked_shl(len).unwrap_or(0) == 0).then_some(len as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mergend_ip_argument() {
        let a = BootArgs::parse(
            "console=ttyS0 reboot=k panic=1 pci=off init=/sbin/init ip=172.30.0.2::172.30.0.1:255.255.255.0::eth0:off",
        );
        let ip = a.ip.clone().unwrap();
        assert_eq!(ip.address, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(ip.prefix_len, 24);
        assert_eq!(ip.gateway, Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(ip.device, "eth0");
        assert_eq!(ip.hostname, None);
        assert!(ip.dns.is_empty());
        assert_eq!(a.meta_path(), DEFAULT_META_PATH);
        assert!(!a.power_off);
    }

    #[test]
    fn full_ip_argument_and_mergen_words() {
        let a = BootArgs::parse(
            "ip=10.0.0.5:10.0.0.9:10.0.0.1:255.255.0.0:box1:ens3:off:1.1.1.1:8.8.8.8 mergen.meta=/m.json mergen.exit=poweroff",
        );
        let ip = a.ip.clone().unwrap();
        assert_eq!(ip.prefix_len, 16);
        assert_eq!(ip.device, "ens3");
        assert_eq!(ip.dns.len(), 2);
        assert_eq!(a.hostname(), Some("box1"));
        assert_eq!(a.meta_path(), "/m.json");
        assert!(a.power_off);
        let b = BootArgs::parse("ip=10.0.0.5::::box1 mergen.hostname=other");
        assert_eq!(b.hostname(), Some("other"));
        assert_eq!(b.ip.unwrap().prefix_len, 32);
    }

    #[test]
    fn dynamic_and_bad_values_are_not_configured() {
        for v in [
            "ip=dhcp",
            "ip=off",
            "ip=::::::dhcp",
            "ip=10.0.0.2::10.0.0.1:255.0.255.0::eth0:off",
        ] {
            assert_eq!(BootArgs::parse(v).ip, None, "{v}");
        }
        assert_eq!(BootArgs::parse("-- ip=10.0.0.2").ip, None);
    }
}
