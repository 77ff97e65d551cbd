//! PROXY protocol version 2 (HAProxy's `proxy-protocol.txt`, section 2.2): the header a
//! `+proxy-v2` listener sends its guest before any byte of the client's (and a peer
//! forwarder of the cluster sends the VM's own host, which reads it), so that the
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

/// What the first bytes of a connection say about a PROXY v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Too few bytes to tell.
    NeedMore,
    /// No PROXY v2 signature: the connection's own bytes start here.
    Absent,
    /// A signature, then something no sender of ours writes.
    Invalid(&'static str),
    /// A whole header of `len` bytes; `client` is the relayed client (`None` for a
    /// LOCAL command or an address family without one).
    Proxy {
        len: usize,
        client: Option<SocketAddr>,
    },
}

/// The most a header may carry after its fixed part: both IPv6 addresses and ports,
/// and TLVs up to an SNI's length with room to spare.
const MAX_BODY: usize = 36 + 1024;

/// Read a PROXY v2 header at the start of `data` (what a peer forwarder of the
/// cluster sends before the client's ClientHello).
pub fn read_header(data: &[u8]) -> Header {
    let n = data.len().min(SIGNATURE.len());
    if data[..n] != SIGNATURE[..n] {
        return Header::Absent;
    }
    if data.len() < FIXED_LEN {
        return Header::NeedMore;
    }
    let (version, command) = (data[12] >> 4, data[12] & 0x0f);
    if version != 2 {
        return Header::Invalid("not version 2");
    }
    let body_len = u16::from_be_bytes([data[14], data[15]]) as usize;
    if body_len > MAX_BODY {
        return Header::Invalid("too long");
    }
    if data.len() < FIXED_LEN + body_len {
        return Header::NeedMore;
    }
    let body = &data[FIXED_LEN..FIXED_LEN + body_len];
    let client = match (command, data[13]) {
        // LOCAL: the sender's own connection (a health check); no client.
        (0, _) => None,
        (1, TCP_OVER_IPV4) if body.len() >= 12 => {
            let ip: [u8; 4] = body[0..4].try_into().unwrap_or_default();
            let port = u16::from_be_bytes([body[8], body[9]]);
            Some(SocketAddr::new(IpAddr::from(ip), port))
        }
        (1, TCP_OVER_IPV6) if body.len() >= 36 => {
            let ip: [u8; 16] = body[0..16].try_into().unwrap_or_default();
            let port = u16::from_be_bytes([body[32], body[33]]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        (1, 0x00) => None,
        (1, _) => return Header::Invalid("not TCP, or addresses cut short"),
        _ => return Header::Invalid("unknown command"),
    };
    Header::Proxy {
        len: FIXED_LEN + body_len,
        client,
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

    #[test]
    fn what_is_written_reads_back() {
        for (client, local) in [
            ("192.0.2.7:51000", "10.0.0.1:443"),
            ("[2001:db8::7]:5000", "[::1]:443"),
        ] {
            let got = header(client, local, Some("app1.localhost"));
            let mut more = got.clone();
            more.extend_from_slice(b"\x16\x03\x01rest");
            assert_eq!(
                read_header(&more),
                Header::Proxy {
                    len: got.len(),
                    client: Some(client.parse().unwrap())
                }
            );
            for cut in [0, 1, 11, 12, 15, 16, got.len() - 1] {
                assert_eq!(read_header(&got[..cut]), Header::NeedMore, "{cut}");
            }
        }
    }

    #[test]
    fn anything_else_is_absent_or_invalid() {
        assert_eq!(read_header(b"\x16\x03\x01\x02\x00"), Header::Absent);
        assert_eq!(read_header(&[0, 0, 0, 8, 4, 210, 22, 47]), Header::Absent);
        assert_eq!(read_header(b"\r\n\r\nX"), Header::Absent);
        let mut h = header("192.0.2.7:1", "10.0.0.1:2", None);
        h[12] = 0x11; // version 1
        assert_eq!(read_header(&h), Header::Invalid("not version 2"));
        let mut h = header("192.0.2.7:1", "10.0.0.1:2", None);
        h[13] = 0x12; // UDP
        assert!(matches!(read_header(&h), Header::Invalid(_)));
        let mut h = header("192.0.2.7:1", "10.0.0.1:2", None);
        h[14] = 0xff; // 65 KiB of body
        assert_eq!(read_header(&h), Header::Invalid("too long"));
        // LOCAL: a header without a client.
        let mut h = header("192.0.2.7:1", "10.0.0.1:2", None);
        h[12] = 0x20;
        assert_eq!(
            read_header(&h),
            Header::Proxy {
                len: h.len(),
                client: None
            }
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
