//! Reading the SNI of a ClientHello from the bytes received so far, before any
//! handshake: the forwarder refuses unknown names without spending crypto, and starts
//! dialing the guest while rustls does the handshake on the same bytes.
//!
//! Why our own parser rather than `rustls::server::Acceptor`: routing needs the raw
//! bytes to stay ours until the route is known (a route owned by another host will be
//! passed through at L4 with the ClientHello replayed as is, which an Acceptor, having
//! consumed them, could not do), and refusals need no allocation and no copy. This
//! parser reads only what routing needs (record framing, the server name); rustls then
//! reads the same bytes, from the same buffer, as the start of its handshake. Measured
//! (`cargo test --release -p mergen-dataplane --lib peek_cost -- --ignored --nocapture`):
//! our peek 0.3-0.7 µs, `Acceptor::accept` 4-12 µs, the server's first flight (rustls
//! reading the same hello, the key exchange, the signature) 340-740 µs: the peek is a
//! tenth of an Acceptor and under 0.2% of the handshake it saves on refusals.

use std::borrow::Cow;

/// The most bytes the engine ever needs to buffer before [`peek_client_hello`] decides:
/// with this many bytes the answer is never [`Peek::NeedMore`].
pub const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const CONTENT_ALERT: u8 = 0x15;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
/// RFC 8446 5.1: a plaintext record fragment is at most 2^14 bytes.
const MAX_FRAGMENT: usize = 1 << 14;

pub const ALERT_DECODE_ERROR: u8 = 50;
pub const ALERT_UNRECOGNIZED_NAME: u8 = 112;

#[derive(Debug, PartialEq)]
pub enum Peek<'a> {
    /// The ClientHello is incomplete: read more and call again with all bytes so far.
    NeedMore,
    /// A whole ClientHello, and the `host_name` of its server_name extension as sent
    /// (not lowercased); borrowed from the input unless the hello spans records.
    Hello {
        sni: Option<Cow<'a, str>>,
    },
    /// Not a TLS handshake record: the first byte is not 0x16 or the version is not 3.x.
    NotTls,
    /// The ClientHello does not fit in [`MAX_CLIENT_HELLO`] bytes.
    TooLarge,
    Malformed(&'static str),
}

/// Parse the ClientHello at the start of `buf`, which may be spread over several TLS
/// records, each of which may itself arrive in pieces. Bytes after the ClientHello are
/// ignored.
pub fn peek_client_hello(buf: &[u8]) -> Peek<'_> {
    // The engine calls this again after every read, so an unfinished hello costs one
    // walk over the record headers: nothing is copied until the whole message is here.
    let mut head = [0u8; 4];
    let mut have = 0;
    let mut pos = 0;
    loop {
        let header = &buf[pos..buf.len().min(pos + RECORD_HEADER)];
        if let Some(&content_type) = header.first() {
            if content_type != CONTENT_HANDSHAKE {
                return if pos == 0 {
                    Peek::NotTls
                } else {
                    Peek::Malformed("non-handshake record inside the ClientHello")
                };
            }
        }
        if let Some(&major) = header.get(1) {
            if major != 3 {
                return if pos == 0 {
                    Peek::NotTls
                } else {
                    Peek::Malformed("bad record version")
                };
            }
        }
        if header.len() < RECORD_HEADER {
            return need_more(buf);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return Peek::Malformed("empty handshake record");
        }
        if len > MAX_FRAGMENT {
            return Peek::Malformed("record longer than 2^14");
        }
        let start = pos + RECORD_HEADER;
        let payload = &buf[start..buf.len().min(start + len)];
        if have < head.len() {
            let take = (head.len() - have).min(payload.len());
            head[have..have + take].copy_from_slice(&payload[..take]);
        }
        have += payload.len();
        if have >= 1 && head[0] != HANDSHAKE_CLIENT_HELLO {
            return Peek::Malformed("first handshake message is not a ClientHello");
        }
        if have >= 4 {
            let body_len =
                usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
            // One record header at least: a hello whose own length cannot fit in
            // MAX_CLIENT_HELLO bytes of records is refused before it is read.
            if RECORD_HEADER + 4 + body_len > MAX_CLIENT_HELLO {
                return Peek::TooLarge;
            }
            if have >= 4 + body_len {
                return finish(buf, 4 + body_len);
            }
        }
        if payload.len() < len {
            return need_more(buf);
        }
        pos = start + len;
    }
}

/// Whether the ClientHello record at the start of `buf` names a ChaCha20-Poly1305
/// suite as its first choice (GREASE values skipped): clients without AES hardware do
/// so, and should get it. Reads only the first record, which
/// [`peek_client_hello`] has found whole; anything it cannot read is a no.
pub fn prefers_chacha(buf: &[u8]) -> bool {
    const CHACHA: [u16; 3] = [0x1303, 0xcca8, 0xcca9];
    let first_choice = || -> Result<Option<u16>, &'static str> {
        let mut record = Reader { buf };
        let header = record.take(RECORD_HEADER, "record header")?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let mut r = Reader {
            buf: record.take(len, "record")?,
        };
        r.take(4 + 2 + 32, "handshake header, version, random")?;
        r.vec8("session id")?;
        let suites = r.vec16("cipher suites")?;
        Ok(suites
            .chunks_exact(2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]))
            // GREASE (RFC 8701): 0x?a?a with both bytes equal.
            .find(|&s| !(s & 0x0f0f == 0x0a0a && s >> 8 == s & 0xff)))
    };
    matches!(first_choice(), Ok(Some(suite)) if CHACHA.contains(&suite))
}

fn need_more(buf: &[u8]) -> Peek<'static> {
    if buf.len() >= MAX_CLIENT_HELLO {
        Peek::TooLarge
    } else {
        Peek::NeedMore
    }
}

/// Parse the first `total` handshake bytes of `buf`'s records, known to be there and
/// to be a ClientHello header and body. The common case, one record, is not copied.
fn finish(buf: &[u8], total: usize) -> Peek<'_> {
    let mut joined: Vec<u8> = Vec::new();
    let mut pos = 0;
    while joined.len() < total {
        let len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        let start = pos + RECORD_HEADER;
        let payload = &buf[start..buf.len().min(start + len)];
        if pos == 0 && payload.len() >= total {
            return match parse_client_hello(&payload[4..total]) {
                Ok(sni) => Peek::Hello {
                    sni: sni.map(Cow::Borrowed),
                },
                Err(e) => Peek::Malformed(e),
            };
        }
        let want = (total - joined.len()).min(payload.len());
        joined.extend_from_slice(&payload[..want]);
        pos = start + len;
    }
    match parse_client_hello(&joined[4..total]) {
        Ok(sni) => Peek::Hello {
            sni: sni.map(|s| Cow::Owned(s.to_owned())),
        },
        Err(e) => Peek::Malformed(e),
    }
}

/// A cursor over big-endian, length-prefixed TLS structures.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], &'static str> {
        if self.buf.len() < n {
            return Err(what);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, &'static str> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, &'static str> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], &'static str> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], &'static str> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The server name of a ClientHello body, if it has one.
fn parse_client_hello(body: &[u8]) -> Result<Option<&str>, &'static str> {
    let mut r = Reader { buf: body };
    // legacy_version is not checked: a TLS 1.3 server must ignore it when
    // supported_versions is sent (RFC 8446 4.2.1), and rustls, which negotiates the
    // version, refuses a bad one with the right alert.
    r.take(2, "truncated version")?;
    r.take(32, "truncated random")?;
    if r.vec8("truncated session id")?.len() > 32 {
        return Err("session id longer than 32 bytes");
    }
    let suites = r.vec16("truncated cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err("bad cipher suite list");
    }
    if r.vec8("truncated compression methods")?.is_empty() {
        return Err("empty compression methods");
    }
    if r.is_empty() {
        // A hello without extensions is legal (TLS 1.2): no SNI.
        return Ok(None);
    }
    let mut exts = Reader {
        buf: r.vec16("truncated extensions")?,
    };
    if !r.is_empty() {
        return Err("trailing bytes after extensions");
    }
    let mut seen: Vec<u16> = Vec::new();
    let mut sni = None;
    while !exts.is_empty() {
        let ext_type = exts.u16("truncated extension")?;
        let data = exts.vec16("truncated extension")?;
        if seen.contains(&ext_type) {
            return Err("duplicate extension");
        }
        seen.push(ext_type);
        if ext_type == EXT_SERVER_NAME {
            sni = parse_server_name(data)?;
        }
    }
    Ok(sni)
}

fn parse_server_name(data: &[u8]) -> Result<Option<&str>, &'static str> {
    let mut outer = Reader { buf: data };
    let mut list = Reader {
        buf: outer.vec16("truncated server name list")?,
    };
    if !outer.is_empty() {
        return Err("trailing bytes after server name list");
    }
    if list.is_empty() {
        return Err("empty server name list");
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("truncated server name")?;
        let name = list.vec16("truncated server name")?;
        // RFC 6066: only host_name (0) exists; other types are skipped, and at most
        // one host_name may appear.
        if name_type != 0 {
            continue;
        }
        if host.is_some() {
            return Err("two host names");
        }
        match std::str::from_utf8(name) {
            Ok(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()) => {
                host = Some(name)
            }
            _ => return Err("host name is not printable ASCII"),
        }
    }
    Ok(host)
}

/// A fatal TLS alert record, sent in plaintext before any handshake: refusing a
/// connection this way costs no crypto.
pub fn alert_record(description: u8) -> [u8; 7] {
    const FATAL: u8 = 2;
    [CONTENT_ALERT, 3, 3, 0, 2, FATAL, description]
}

/// What a PostgreSQL client sent first on a TLS listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgPreamble {
    /// Fewer than 8 bytes, all consistent with a request: read more.
    NeedMore,
    /// SSLRequest: consume 8 bytes, answer `S`, then the ClientHello follows.
    SslRequest,
    /// GSSENCRequest: consume 8 bytes, answer `N` (no GSS encryption); the client then
    /// sends an SSLRequest (or gives up).
    GssEncRequest,
    /// A protocol 3 StartupMessage in plaintext (`sslmode=disable`): the client is
    /// told that TLS is required ([`pg_error_response`]).
    Startup,
    /// Anything else, e.g. a ClientHello from a client using direct TLS
    /// (`sslnegotiation=direct`), or a CancelRequest: nothing to consume.
    Other,
}

/// Both requests are 8 bytes: the length 8, then a magic code.
pub const PG_PREAMBLE_LEN: usize = 8;
const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]; // 80877103
const PG_GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]; // 80877104
/// The server's bound on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
const PG_MAX_STARTUP: u32 = 10_000;

pub fn postgres_preamble(buf: &[u8]) -> PgPreamble {
    let n = buf.len().min(PG_PREAMBLE_LEN);
    let head = &buf[..n];
    if n == PG_PREAMBLE_LEN {
        if head == PG_SSL_REQUEST {
            return PgPreamble::SslRequest;
        }
        if head == PG_GSSENC_REQUEST {
            return PgPreamble::GssEncRequest;
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        // Length, then the protocol version: major 3, any minor.
        if head[4..6] == [0, 3] && (8..=PG_MAX_STARTUP).contains(&len) {
            return PgPreamble::Startup;
        }
        return PgPreamble::Other;
    }
    let request = head == &PG_SSL_REQUEST[..n] || head == &PG_GSSENC_REQUEST[..n];
    // A startup packet's length starts with a zero byte; a ClientHello with 0x16.
    let startup = head.first() == Some(&0);
    if request || startup {
        PgPreamble::NeedMore
    } else {
        PgPreamble::Other
    }
}

/// A PostgreSQL `ErrorResponse` (protocol 3): severity `FATAL`, `sqlstate`, `message`.
/// libpq prints it as `FATAL:  <message>` and gives up.
pub fn pg_error_response(sqlstate: &str, message: &str) -> Vec<u8> {
    let fields: [(u8, &str); 4] = [
        (b'S', "FATAL"),
        // The same severity, never translated (protocol 3, PostgreSQL 9.6 and later).
        (b'V', "FATAL"),
        (b'C', sqlstate),
        (b'M', message),
    ];
    let mut body = Vec::new();
    for (code, value) in fields {
        body.push(code);
        // A NUL would end the field early: none of ours has one, and none may.
        body.extend(value.bytes().filter(|&b| b != 0));
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(b'E');
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mergen_testkit::tls::{client_hello as real_hello, refragment};
    use mergen_testkit::XorShift;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    /// The server name of a whole hello (`None`: a hello without one).
    fn expect_hello(p: Peek) -> Option<String> {
        match p {
            Peek::Hello { sni } => sni.map(Cow::into_owned),
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    /// Every strict prefix must ask for more; the whole buffer must give `want`.
    fn check_prefixes(buf: &[u8], want: &Option<String>) {
        for i in 0..buf.len() {
            assert_eq!(
                peek_client_hello(&buf[..i]),
                Peek::NeedMore,
                "prefix of {i} bytes"
            );
        }
        assert_eq!(&expect_hello(peek_client_hello(buf)), want);
    }

    #[test]
    fn real_hellos_give_their_sni() {
        type Case<'a> = (&'a str, &'a [&'a [u8]], bool, Option<&'a str>);
        let cases: &[Case] = &[
            (
                "app1.localhost",
                &[b"http/1.1"],
                false,
                Some("app1.localhost"),
            ),
            (
                "App1.VM.Example.com",
                &[b"h2", b"http/1.1"],
                false,
                Some("App1.VM.Example.com"),
            ),
            ("db.localhost", &[], false, Some("db.localhost")),
            (
                "legacy.localhost",
                &[b"http/1.1"],
                true,
                Some("legacy.localhost"),
            ),
            // rustls sends no SNI for an IP address.
            ("127.0.0.1", &[b"http/1.1"], false, None),
        ];
        for &(server, alpn, tls12, sni) in cases {
            let bytes = real_hello(server, alpn, tls12);
            let hello = expect_hello(peek_client_hello(&bytes));
            assert_eq!(hello.as_deref(), sni, "{server}");
            // One record: the name is borrowed from the bytes, not copied.
            if let Peek::Hello { sni: Some(name) } = peek_client_hello(&bytes) {
                assert!(matches!(name, Cow::Borrowed(_)));
            }
        }
    }

    #[test]
    fn hello_split_byte_by_byte() {
        let bytes = real_hello("app1.localhost", &[b"http/1.1"], false);
        check_prefixes(&bytes, &Some("app1.localhost".into()));
    }

    #[test]
    fn hello_split_over_many_records() {
        let bytes = real_hello("app1.localhost", &[b"h2", b"http/1.1"], false);
        let want = expect_hello(peek_client_hello(&bytes));
        let payload_len = bytes.len() - 5;
        for size in (1..=40).chain([63, 64, 100, 255, 256, payload_len - 1, payload_len]) {
            let cut = refragment(&bytes, size);
            check_prefixes(&cut, &want);
        }
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut bytes = real_hello("app1.localhost", &[], false);
        bytes.extend_from_slice(&[0x17, 3, 3, 0, 5, 1, 2, 3]);
        assert_eq!(
            expect_hello(peek_client_hello(&bytes)).as_deref(),
            Some("app1.localhost")
        );
    }

    #[test]
    fn not_tls() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            &[0x15, 3, 3, 0, 2, 2, 40],
            &[0x16, 2, 0],
            &[0x16, 0x80],
            &[0],
        ];
        for c in cases {
            assert_eq!(peek_client_hello(c), Peek::NotTls, "{c:?}");
        }
        assert_eq!(peek_client_hello(&[]), Peek::NeedMore);
        assert_eq!(peek_client_hello(&[0x16]), Peek::NeedMore);
        assert_eq!(peek_client_hello(&[0x16, 3, 1, 0]), Peek::NeedMore);
    }

    /// A ClientHello built by hand, for shapes a real client never sends.
    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
        let mut exts = Vec::new();
        for (t, data) in extensions {
            exts.extend_from_slice(&t.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(data);
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        wrap(&body)
    }

    fn wrap(body: &[u8]) -> Vec<u8> {
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (t, n) in names {
            list.push(*t);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&list);
        out
    }

    fn alpn_ext(protos: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protos {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&list);
        out
    }

    #[test]
    fn handmade_hellos() {
        let ok = |exts: &[(u16, Vec<u8>)]| expect_hello(peek_client_hello(&hello_with(exts)));
        let bad = |exts: &[(u16, Vec<u8>)]| match peek_client_hello(&hello_with(exts)) {
            Peek::Malformed(why) => why,
            other => panic!("expected malformed, got {other:?}"),
        };
        assert_eq!(ok(&[]), None);
        assert_eq!(
            ok(&[(0, sni_ext(&[(0, b"a.localhost")]))]).as_deref(),
            Some("a.localhost")
        );
        // Unknown name types are skipped.
        assert_eq!(
            ok(&[(0, sni_ext(&[(7, b"x"), (0, b"a.localhost")]))]).as_deref(),
            Some("a.localhost")
        );
        assert_eq!(ok(&[(0, sni_ext(&[(7, b"x")]))]), None);
        // Other extensions (ALPN among them) are skipped unread.
        assert_eq!(
            ok(&[
                (0xfe0d, vec![1, 2, 3]),
                (16, alpn_ext(&[b"h2"])),
                (0, sni_ext(&[(0, b"b.localhost")]))
            ])
            .as_deref(),
            Some("b.localhost")
        );
        assert_eq!(ok(&[(16, alpn_ext(&[]))]), None);
        bad(&[(0, sni_ext(&[(0, b"a"), (0, b"b")]))]);
        bad(&[(0, sni_ext(&[(0, b"")]))]);
        bad(&[(0, sni_ext(&[(0, b"caf\xc3\xa9.localhost")]))]);
        bad(&[(0, sni_ext(&[(0, b"a b")]))]);
        bad(&[(0, sni_ext(&[]))]);
        bad(&[(0, vec![0, 5, 0, 0])]);
        bad(&[(0, vec![])]);
        bad(&[(16, alpn_ext(&[b"h2"])), (16, alpn_ext(&[b"h2"]))]);
        bad(&[(0, sni_ext(&[(0, b"a")])), (0, sni_ext(&[(0, b"a")]))]);
    }

    #[test]
    fn malformed_bodies() {
        // legacy_version, random, session id, suites, compression, extensions
        let base = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut body = vec![3, 3];
            body.extend_from_slice(&[0; 32]);
            body.push(0);
            body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
            f(&mut body);
            match peek_client_hello(&wrap(&body)) {
                Peek::Hello { .. } => "hello",
                Peek::Malformed(_) => "malformed",
                _ => "other",
            }
        };
        assert_eq!(base(&|_| {}), "hello");
        // The version is rustls' to judge (fuzz/regressions/client_hello).
        assert_eq!(base(&|b| b[0] = 0x7e), "hello");
        assert_eq!(base(&|b| b.truncate(20)), "malformed");
        assert_eq!(base(&|b| b[34] = 33), "malformed");
        assert_eq!(base(&|b| b[36] = 3), "malformed");
        assert_eq!(base(&|b| b[36] = 0), "malformed");
        assert_eq!(base(&|b| b.push(0)), "malformed");
        assert_eq!(base(&|b| b.extend_from_slice(&[0, 0, 9])), "malformed");
        // Not a ClientHello at all.
        let mut server_hello = wrap(&[3, 3]);
        server_hello[5] = 2;
        assert!(matches!(
            peek_client_hello(&server_hello),
            Peek::Malformed(_)
        ));
        // ...and that is known from its first byte, before the rest arrives.
        assert!(matches!(
            peek_client_hello(&[0x16, 3, 1, 0x10, 0, 2]),
            Peek::Malformed(_)
        ));
        // An empty record and an oversized record.
        assert!(matches!(
            peek_client_hello(&[0x16, 3, 1, 0, 0]),
            Peek::Malformed(_)
        ));
        assert!(matches!(
            peek_client_hello(&[0x16, 3, 1, 0x40, 1]),
            Peek::Malformed(_)
        ));
        // A record of another type between the pieces of a hello.
        let mut cut = refragment(&real_hello("a.localhost", &[], false), 10);
        cut[15] = 0x17;
        assert!(matches!(peek_client_hello(&cut), Peek::Malformed(_)));
    }

    #[test]
    fn too_large() {
        // Declared too long: refused from the first 9 bytes.
        let declared = [0x16, 3, 1, 0x40, 0, 1, 0, 0x40, 0];
        assert_eq!(peek_client_hello(&declared), Peek::TooLarge);
        // The largest hello that fits one record is accepted...
        let fits = MAX_CLIENT_HELLO - RECORD_HEADER - 4;
        let mut body = hello_with(&[(0, sni_ext(&[(0, b"a.localhost")]))])[9..].to_vec();
        let pad = fits - body.len() - 4;
        // ...padding extension (21) grows the extensions block.
        let ext_len = u16::from_be_bytes([body[41], body[42]]) as usize + 4 + pad;
        body[41..43].copy_from_slice(&(ext_len as u16).to_be_bytes());
        body.extend_from_slice(&21u16.to_be_bytes());
        body.extend_from_slice(&(pad as u16).to_be_bytes());
        body.extend_from_slice(&vec![0; pad]);
        let big = wrap(&body);
        assert_eq!(big.len(), MAX_CLIENT_HELLO);
        assert_eq!(
            expect_hello(peek_client_hello(&big)).as_deref(),
            Some("a.localhost")
        );
        // ...but cut into small records its headers no longer fit the cap.
        let cut = refragment(&big, 1000);
        assert_eq!(peek_client_hello(&cut[..MAX_CLIENT_HELLO]), Peek::TooLarge);
        assert_eq!(
            peek_client_hello(&cut[..MAX_CLIENT_HELLO - 1]),
            Peek::NeedMore
        );
        // One byte more (so two records) is refused as soon as the length is known.
        body.push(0);
        let two_records = refragment(&wrap(&body), 1 << 14);
        assert_eq!(peek_client_hello(&two_records[..9]), Peek::TooLarge);
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let real = real_hello("app1.localhost", &[b"h2", b"http/1.1"], false);
        let cut = refragment(&real, 7);
        for round in 0..20_000 {
            let buf: Vec<u8> = match round % 3 {
                // Random bytes behind a plausible record header.
                0 => {
                    let len = (rng.next_u64() % 600) as usize;
                    let mut b: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                    if len > 2 {
                        b[0] = 0x16;
                        b[1] = 3;
                    }
                    b
                }
                // A real hello with a few bytes changed.
                1 => {
                    let mut b = if rng.next_u64() & 1 == 0 {
                        real.clone()
                    } else {
                        cut.clone()
                    };
                    for _ in 0..1 + rng.next_u64() % 4 {
                        let i = (rng.next_u64() as usize) % b.len();
                        b[i] = rng.next_u64() as u8;
                    }
                    b
                }
                // A real hello cut short anywhere.
                _ => {
                    let n = (rng.next_u64() as usize) % real.len();
                    real[..n].to_vec()
                }
            };
            let _ = peek_client_hello(&buf);
            let _ = postgres_preamble(&buf);
        }
    }

    #[test]
    fn alert_is_understood_by_a_client() {
        let record = alert_record(ALERT_UNRECOGNIZED_NAME);
        assert_eq!(record, [0x15, 3, 3, 0, 2, 2, 112]);
        let config = Arc::new(mergen_testkit::tls::accept_any_client_config());
        let name = ServerName::try_from("a.localhost").unwrap();
        let mut conn = ClientConnection::new(config, name).unwrap();
        let mut sink = Vec::new();
        conn.write_tls(&mut sink).unwrap();
        conn.read_tls(&mut &record[..]).unwrap();
        let err = conn.process_new_packets().unwrap_err();
        assert_eq!(
            err,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName)
        );
    }

    #[test]
    fn postgres_preambles() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        for i in 0..8 {
            assert_eq!(postgres_preamble(&ssl[..i]), PgPreamble::NeedMore, "{i}");
            assert_eq!(postgres_preamble(&gss[..i]), PgPreamble::NeedMore, "{i}");
        }
        assert_eq!(postgres_preamble(&ssl), PgPreamble::SslRequest);
        assert_eq!(postgres_preamble(&gss), PgPreamble::GssEncRequest);
        let mut then_hello = ssl.to_vec();
        then_hello.extend_from_slice(&real_hello("db.localhost", &[], false));
        assert_eq!(postgres_preamble(&then_hello), PgPreamble::SslRequest);
        assert_eq!(
            expect_hello(peek_client_hello(&then_hello[PG_PREAMBLE_LEN..])).as_deref(),
            Some("db.localhost")
        );
        // Direct TLS, a startup message (protocol 3.0), a cancel request.
        let direct = real_hello("db.localhost", &[b"postgresql"], false);
        assert_eq!(postgres_preamble(&direct), PgPreamble::Other);
        assert_eq!(postgres_preamble(&[0x16]), PgPreamble::Other);
        let startup = [0, 0, 0, 40, 0, 3, 0, 0];
        for i in 1..8 {
            assert_eq!(
                postgres_preamble(&startup[..i]),
                PgPreamble::NeedMore,
                "{i}"
            );
        }
        assert_eq!(postgres_preamble(&startup), PgPreamble::Startup);
        // Protocol 3.2 (PostgreSQL 18) is a startup too; 2.0, or a length no startup
        // can have, is not.
        assert_eq!(
            postgres_preamble(&[0, 0, 0, 40, 0, 3, 0, 2]),
            PgPreamble::Startup
        );
        assert_eq!(
            postgres_preamble(&[0, 0, 0, 40, 0, 2, 0, 0]),
            PgPreamble::Other
        );
        assert_eq!(
            postgres_preamble(&[0, 1, 0, 0, 0, 3, 0, 0]),
            PgPreamble::Other
        );
        assert_eq!(postgres_preamble(b"GET / HTTP/1.1"), PgPreamble::Other);
        assert_eq!(
            postgres_preamble(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e]),
            PgPreamble::Other
        );
        assert_eq!(
            postgres_preamble(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2e]),
            PgPreamble::Other
        );
    }

    /// A rustls client's first flight offering `suites` in that order.
    fn hello_with_suites(suites: Vec<rustls::SupportedCipherSuite>) -> Vec<u8> {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: suites,
            ..rustls::crypto::ring::default_provider()
        };
        let config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let name = ServerName::try_from("app.localhost").unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_clients_first_choice_of_chacha_is_seen() {
        use rustls::crypto::ring::cipher_suite as suite;
        let aes_first = hello_with_suites(vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
        ]);
        assert!(!prefers_chacha(&aes_first));
        let chacha_first = hello_with_suites(vec![
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS13_AES_128_GCM_SHA256,
        ]);
        assert!(prefers_chacha(&chacha_first));
        // A GREASE value first (as browsers send) does not count.
        let mut greased = hello_with_suites(vec![
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
        ]);
        let sid_len = usize::from(greased[5 + 4 + 2 + 32]);
        let first_suite = 5 + 4 + 2 + 32 + 1 + sid_len + 2;
        assert_eq!(&greased[first_suite..first_suite + 2], &[0x13, 0x01]);
        greased[first_suite..first_suite + 2].copy_from_slice(&[0x3a, 0x3a]);
        assert!(prefers_chacha(&greased));
        // Cut short anywhere, or not a hello: no.
        for n in 0..first_suite + 2 {
            assert!(!prefers_chacha(&chacha_first[..n]), "{n}");
        }
        assert!(!prefers_chacha(b"GET / HTTP/1.1\r\n\r\n"));
    }

    #[test]
    fn pg_error_responses_are_framed() {
        let msg = pg_error_response("28000", "TLS is required");
        assert_eq!(msg[0], b'E');
        let len = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
        assert_eq!(len, msg.len() - 1, "the length counts itself, not the type");
        assert_eq!(&msg[5..], b"SFATAL\0VFATAL\0C28000\0MTLS is required\0\0");
        // A NUL in a value cannot end its field early.
        let odd = pg_error_response("08P01", "a\0b");
        assert!(odd.ends_with(b"Mab\0\0"));
    }

    /// What reading the server name costs next to the rest of a server's first flight
    /// (not a pass/fail test: speed is measured, never asserted).
    #[test]
    #[ignore]
    fn peek_cost() {
        let hello = real_hello("app1.localhost", &[b"h2", b"http/1.1"], false);
        let dir = mergen_testkit::TempDir::new("dp-peek-cost");
        let (cert, key) = (dir.join("c"), dir.join("k"));
        crate::tls::generate_self_signed("", "localhost", &cert, &key).unwrap();
        let store = crate::tls::CertStore::load(&cert, &key).unwrap();
        let config = crate::tls::server_config(&store, &[b"http/1.1".to_vec()]).unwrap();
        let time = |n: u32, f: &mut dyn FnMut()| {
            let start = std::time::Instant::now();
            for _ in 0..n {
                f();
            }
            start.elapsed() / n
        };
        let peek = time(100_000, &mut || {
            std::hint::black_box(peek_client_hello(std::hint::black_box(&hello)));
        });
        let acceptor = time(10_000, &mut || {
            let mut a = rustls::server::Acceptor::default();
            a.read_tls(&mut &hello[..]).unwrap();
            std::hint::black_box(a.accept().unwrap().unwrap());
        });
        let first_flight = time(2_000, &mut || {
            let mut s = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
            s.read_tls(&mut &hello[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut out = Vec::new();
            s.write_tls(&mut out).unwrap();
        });
        eprintln!(
            "peek {peek:?}, Acceptor::accept {acceptor:?}, server first flight {first_flight:?}"
        );
    }
}
