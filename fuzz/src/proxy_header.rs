//! The PROXY protocol v2 header (`mergen_dataplane::proxy_protocol`): written by a
//! `+proxy-v2` listener for its guest and by a cluster forwarder for the VM's own host,
//! read by that host's forwarder.
//!
//! The input is taken two ways. First as the writer's inputs: a byte of families, the
//! client's and the listener's addresses and ports, then the SNI; the header written
//! must carry exactly those (IPv4 when both sides are IPv4 or IPv4-mapped, IPv6
//! otherwise), its length field must match, the reader must read it back whole with the
//! same client, whatever follows it, and every shorter prefix must be `NeedMore`.
//! Second as bytes a peer (or anyone) sent: the reader never panics, and a header it
//! reads lies inside the input and reads the same with more bytes after it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mergen_dataplane::proxy_protocol::{read_header, write_header, Header, SIGNATURE};

/// Longest SNI the reader takes back: its body limit (36 + 1024) less the addresses of
/// an IPv6 header and the TLV's own 3 bytes. Routed names are far shorter (a DNS name
/// is at most 253 bytes).
const READABLE_SNI: usize = 1024 - 3;

pub fn check(data: &[u8]) {
    as_writer_inputs(data);
    as_received_bytes(data);
}

fn as_writer_inputs(data: &[u8]) {
    let mut input = Input(data);
    let families = input.byte();
    let client = input.addr(families & 1 != 0);
    let local = input.addr(families & 2 != 0);
    let sni = String::from_utf8_lossy(input.0).into_owned();
    let authority = (families & 4 != 0).then_some(sni.as_str());

    let mut out = b"already there".to_vec();
    write_header(client, local, authority, &mut out);
    assert!(out.starts_with(b"already there"), "the writer appends");
    let header = out.split_off(13);

    assert_eq!(header[..12], SIGNATURE);
    assert_eq!(header[12], 0x21, "version 2, PROXY");
    let body_len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    assert_eq!(header.len(), 16 + body_len, "length field");
    let both_v4 = matches!(
        (client.ip().to_canonical(), local.ip().to_canonical()),
        (IpAddr::V4(_), IpAddr::V4(_))
    );
    let addresses = if both_v4 { 12 } else { 36 };
    assert_eq!(header[13], if both_v4 { 0x11 } else { 0x21 }, "family");
    let body = &header[16..];
    let (ips, ports) = body[..addresses].split_at(addresses - 4);
    let want_ips: Vec<u8> = if both_v4 {
        [client.ip(), local.ip()]
            .iter()
            .flat_map(|ip| octets(ip.to_canonical()))
            .collect()
    } else {
        [client.ip(), local.ip()]
            .iter()
            .flat_map(|ip| as_v6(*ip).octets())
            .collect()
    };
    assert_eq!(ips, want_ips, "addresses");
    assert_eq!(ports[..2], client.port().to_be_bytes());
    assert_eq!(ports[2..], local.port().to_be_bytes());
    let want_client = if both_v4 {
        SocketAddr::new(client.ip().to_canonical(), client.port())
    } else {
        SocketAddr::new(IpAddr::V6(as_v6(client.ip())), client.port())
    };
    let tlv = &body[addresses..];
    match authority.filter(|a| !a.is_empty()) {
        Some(name) if addresses + 3 + name.len() <= usize::from(u16::MAX) => {
            assert_eq!(tlv[0], 0x02, "PP2_TYPE_AUTHORITY");
            assert_eq!(
                usize::from(u16::from_be_bytes([tlv[1], tlv[2]])),
                name.len()
            );
            assert_eq!(&tlv[3..], name.as_bytes());
        }
        // Empty, absent, or too long for the length field: left out.
        _ => assert!(tlv.is_empty(), "a TLV nobody asked for"),
    }

    if tlv.len() <= 3 + READABLE_SNI {
        let want = Header::Proxy {
            len: header.len(),
            client: Some(want_client),
        };
        assert_eq!(read_header(&header), want);
        let mut more = header.clone();
        more.extend_from_slice(b"\x16\x03\x01 and the ClientHello");
        assert_eq!(read_header(&more), want, "bytes after the header mattered");
        for cut in 0..header.len() {
            assert_eq!(read_header(&header[..cut]), Header::NeedMore, "{cut} bytes");
        }
    }
}

fn as_received_bytes(data: &[u8]) {
    match read_header(data) {
        Header::Proxy { len, client } => {
            assert!((16..=data.len()).contains(&len), "a header of {len} bytes");
            let mut more = data.to_vec();
            more.push(0x16);
            assert_eq!(read_header(&more), Header::Proxy { len, client });
        }
        Header::NeedMore => assert!(data.len() < 16 + 36 + 1024, "NeedMore past any header"),
        Header::Absent => {
            let n = data.len().min(SIGNATURE.len());
            assert!(
                n > 0 && data[..n] != SIGNATURE[..n],
                "a signature taken as absent"
            );
        }
        Header::Invalid(why) => assert!(!why.is_empty()),
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        first
    }

    fn addr(&mut self, v6: bool) -> SocketAddr {
        let ip = if v6 {
            let mut o = [0u8; 16];
            o.iter_mut().for_each(|b| *b = self.byte());
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                self.byte(),
                self.byte(),
                self.byte(),
                self.byte(),
            ))
        };
        SocketAddr::new(ip, u16::from_be_bytes([self.byte(), self.byte()]))
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The address as the header carries it when the other side is IPv6.
fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}
