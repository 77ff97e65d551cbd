//! IPv4 CIDR blocks (`MGR_GUEST_CIDR`): the guest network of every VM.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix_len))
    }
    /// Host number `n` inside the block (1 = the gateway, 2.. = guests), if it is a
    /// usable host address (not the network nor the broadcast address).
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - self.prefix_len);
        if n == 0 || u64::from(n) >= size.saturating_sub(1) {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network) + n))
    }
    /// The gateway: the first host address.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.host(1)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix_len) == u32::from(self.network)
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid IPv4 CIDR {s:?} (want a.b.c.d/len)");
        let (addr, len) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        if prefix_len > 30 {
            return Err(format!("CIDR {s:?} is too small for a gateway and a guest"));
        }
        Ok(Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix_len)),
            prefix_len,
        })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_gateway_and_bounds() {
        let c: Ipv4Cidr = "172.30.0.0/24".parse().unwrap();
        assert_eq!(c.gateway(), Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(c.host(2), Some(Ipv4Addr::new(172, 30, 0, 2)));
        assert_eq!(c.host(254), Some(Ipv4Addr::new(172, 30, 0, 254)));
        assert_eq!(c.host(255), None);
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(c.contains(Ipv4Addr::new(172, 30, 0, 9)));
        assert!(!c.contains(Ipv4Addr::new(172, 30, 1, 9)));
        assert_eq!(
            "10.1.2.3/16".parse::<Ipv4Cidr>().unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert!("10.0.0.0/31".parse::<Ipv4Cidr>().is_err());
        assert!("nope".parse::<Ipv4Cidr>().unwrap_err().contains("nope"));
    }
}
