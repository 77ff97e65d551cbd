//! PROXY protocol version 2 (HAProxy's `proxy-protocol.txt`, section 2.2): the header a
//! `+proxy-v2` listener sends its guest before any byte of the client's, so that the
//! guest (nginx `listen ... proxy_protocol`, HAProxy `accept-proxy`, PostgreSQL poolers)
//! sees the client's address instead of the forwarder's.
//!
//! A plain function over bytes, so that it can be fuzzed and tested without sockets.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (a relayed connection, as opposed to LOCAL).
const V2_PROXY: u8 = 0x21;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;
/// The TLV that carries the host name the client asked for (for TLS: its SNI).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// Signature, version and command, family, and the 16-bit length.
const FIXED_LEN: usize = 16;

/// Append the header for a TCP connection from `client` that arrived at `local`
/// (the listener's address), with `authority` (the SNI) as a `PP2_TYPE_AUTHORITY` TLV
/// when given and non-empty.
///
/// IPv4 clients of a dual-stack listener arrive as `::ffff:a.b.c.d`; they are written
/// as IPv4, as if the listener had been IPv4 only. When one side is IPv6, both are
/// written as IPv6. An authority too long for the header's 16-bit length is left out.
pub fn write_header(
    client: SocketAddr,
    local: SocketAddr,
    authority: Option<&str>,
    out: &mut Vec<u8>,
) {
    let (src, dst) = (unmapped(client.ip()), unmapped(local.ip()));
    let mut body = Vec::with_capacity(36 + 3 + authority.map_or(0, str::len));
    let family = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            TCP_OVER_IPV4
        }
        (s, d) => {
            body.extend_from_slice(&as_v6(s).octets());
            body.extend_from_slice(&as_v6(d).octets());
            TCP_OVER_IPV6
        }
    };
    body.extend_from_slice(&client.port().to_be_bytes());
    body.extend_from_slice(&local.port().to_be_bytes());
    if let Some(name) = authority.filter(|n| !n.is_empty()) {
        let fits = u16::try_from(body.len() + 3 + name.len()).is_ok();
        if let (true, Ok(len)) = (fits, u16::try_from(name.len())) {
            body.push(PP2_TYPE_AUTHORITY);
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(name.as_bytes());
        }
    }
    out.reserve(FIXED_LEN + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(V2_PROXY);
    out.push(family);
    // At most u16::MAX: the TLV went in only if it fit.
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(client: &str, local: &str, authority: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(
            client.parse().unwrap(),
            local.parse().unwrap(),
            authority,
            &mut out,
        );
        out
    }

    #[test]
    fn ipv4_with_the_sni_byte_for_byte() {
        let got = header("192.0.2.7:51000", "10.0.0.1:443", Some("app1.localhost"));
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12 + 3 + 14]);
        want.extend_from_slice(&[192, 0, 2, 7, 10, 0, 0, 1]);
        want.extend_from_slice(&51000u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        want.extend_from_slice(&[0x02, 0, 14]);
        want.extend_from_slice(b"app1.localhost");
        assert_eq!(got, want);
    }

    #[test]
    fn raw_listeners_send_no_tlv() {
        let got = header("127.0.0.1:40000", "127.0.0.1:2022", None);
        assert_eq!(got.len(), 16 + 12);
        assert_eq!(&got[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(header("127.0.0.1:40000", "127.0.0.1:2022", Some("")), got);
    }

    #[test]
    fn mapped_ipv4_is_written_as_ipv4_and_ipv6_as_ipv6() {
        let mapped = header("[::ffff:192.0.2.7]:5000", "[::ffff:10.0.0.1]:443", None);
        let plain = header("192.0.2.7:5000", "10.0.0.1:443", None);
        assert_eq!(mapped, plain);

        let v6 = header("[2001:db8::7]:5000", "[::1]:443", None);
        assert_eq!(&v6[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &v6[16..32],
            &"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&v6[32..48], &Ipv6Addr::LOCALHOST.octets());
        assert_eq!(&v6[48..52], &[0x13, 0x88, 0x01, 0xbb]);

        // One side IPv4, the other IPv6: both as IPv6.
        let mixed = header("192.0.2.7:5000", "[::1]:443", None);
        assert_eq!(mixed[13], 0x21);
        assert_eq!(
            &mixed[16..32],
            &"::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap().octets()
        );
    }

    /// The length field always covers exactly what follows it, whatever the name.
    #[test]
    fn the_length_always_matches() {
        for len in [
            1usize,
            255,
            65_000,
            65_535 - 12 - 3,
            65_535 - 12 - 2,
            70_000,
        ] {
            let name = "a".repeat(len);
            let got = header("192.0.2.7:1", "10.0.0.1:2", Some(&name));
            let declared = u16::from_be_bytes([got[14], got[15]]) as usize;
            assert_eq!(declared, got.len() - 16, "name of {len}");
            let tlv = declared > 12;
            assert_eq!(tlv, len <= 65_535 - 12 - 3, "name of {len}");
        }
    }
}
