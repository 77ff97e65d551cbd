//! Reading the SNI and ALPN of a ClientHello from the bytes received so far, before any
//! handshake: the forwarder refuses unknown names without spending crypto, and starts
//! dialing the backend while rustls does the handshake on the same bytes.

/// The most bytes the engine ever needs to buffer before [`peek_client_hello`] decides:
/// with this many bytes the answer is never [`Peek::NeedMore`].
pub const MAX_CLIENT_HELLO: usize = 16 * 1024 + 5;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const CONTENT_ALERT: u8 = 0x15;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// RFC 8446 5.1: a plaintext record fragment is at most 2^14 bytes.
const MAX_FRAGMENT: usize = 1 << 14;

pub const ALERT_CLOSE_NOTIFY: u8 = 0;
pub const ALERT_HANDSHAKE_FAILURE: u8 = 40;
pub const ALERT_DECODE_ERROR: u8 = 50;
pub const ALERT_INTERNAL_ERROR: u8 = 80;
pub const ALERT_UNRECOGNIZED_NAME: u8 = 112;
pub const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

#[derive(Debug, PartialEq)]
pub enum Peek {
    /// The ClientHello is incomplete: read more and call again with all bytes so far.
    NeedMore,
    Hello(ClientHello),
    /// Not a TLS handshake record: the first byte is not 0x16 or the version is not 3.x.
    NotTls,
    /// The ClientHello does not fit in [`MAX_CLIENT_HELLO`] bytes.
    TooLarge,
    Malformed(&'static str),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientHello {
    /// The `host_name` of the server_name extension, as sent (not lowercased).
    pub sni: Option<String>,
    /// The client's ALPN protocols, in its order.
    pub alpn: Vec<Vec<u8>>,
}

/// Parse the ClientHello at the start of `buf`, which may be spread over several TLS
/// records, each of which may itself arrive in pieces. Bytes after the ClientHello are
/// ignored.
pub fn peek_client_hello(buf: &[u8]) -> Peek {
    let mut handshake: Vec<u8> = Vec::new();
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
        let available = &buf[start..buf.len().min(start + len)];
        let complete = available.len() == len;
        // The common case, the whole hello in one record, is parsed without a copy;
        // otherwise records are joined, and a partial record is parsed as far as it
        // goes so that a bad or oversized hello is refused early.
        let step = if pos == 0 && complete {
            parse_handshake(available)
        } else {
            handshake.extend_from_slice(available);
            parse_handshake(&handshake)
        };
        if let Step::Done(p) = step {
            return p;
        }
        if !complete {
            return need_more(buf);
        }
        if pos == 0 {
            handshake.extend_from_slice(available);
        }
        pos = start + len;
    }
}

enum Step {
    Done(Peek),
    Incomplete,
}

fn need_more(buf: &[u8]) -> Peek {
    if buf.len() >= MAX_CLIENT_HELLO {
        Peek::TooLarge
    } else {
        Peek::NeedMore
    }
}

/// `hs` holds the handshake-layer bytes received so far.
fn parse_handshake(hs: &[u8]) -> Step {
    let Some(&msg_type) = hs.first() else {
        return Step::Incomplete;
    };
    if msg_type != HANDSHAKE_CLIENT_HELLO {
        return Step::Done(Peek::Malformed(
            "first handshake message is not a ClientHello",
        ));
    }
    if hs.len() < 4 {
        return Step::Incomplete;
    }
    let body_len = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
    // One record header per 2^14 bytes at least: a hello whose own length cannot fit
    // in MAX_CLIENT_HELLO bytes of records is refused before it is read.
    if RECORD_HEADER + 4 + body_len > MAX_CLIENT_HELLO {
        return Step::Done(Peek::TooLarge);
    }
    if hs.len() < 4 + body_len {
        return Step::Incomplete;
    }
    Step::Done(match parse_client_hello(&hs[4..4 + body_len]) {
        Ok(hello) => Peek::Hello(hello),
        Err(e) => Peek::Malformed(e),
    })
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

fn parse_client_hello(body: &[u8]) -> Result<ClientHello, &'static str> {
    let mut r = Reader { buf: body };
    let version = r.u16("truncated version")?;
    if version >> 8 != 3 {
        return Err("bad legacy_version");
    }
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
    let mut hello = ClientHello::default();
    if r.is_empty() {
        // A hello without extensions is legal (TLS 1.2): no SNI, no ALPN.
        return Ok(hello);
    }
    let mut exts = Reader {
        buf: r.vec16("truncated extensions")?,
    };
    if !r.is_empty() {
        return Err("trailing bytes after extensions");
    }
    let mut seen: Vec<u16> = Vec::new();
    while !exts.is_empty() {
        let ext_type = exts.u16("truncated extension")?;
        let data = exts.vec16("truncated extension")?;
        if seen.contains(&ext_type) {
            return Err("duplicate extension");
        }
        seen.push(ext_type);
        match ext_type {
            EXT_SERVER_NAME => hello.sni = parse_server_name(data)?,
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
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
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err("host name is not printable ASCII");
        }
        host = Some(String::from_utf8_lossy(name).into_owned());
    }
    Ok(host)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut outer = Reader { buf: data };
    let mut list = Reader {
        buf: outer.vec16("truncated ALPN list")?,
    };
    if !outer.is_empty() {
        return Err("trailing bytes after ALPN list");
    }
    if list.is_empty() {
        return Err("empty ALPN list");
    }
    let mut protos = Vec::new();
    while !list.is_empty() {
        let p = list.vec8("truncated ALPN protocol")?;
        if p.is_empty() {
            return Err("empty ALPN protocol");
        }
        protos.push(p.to_vec());
    }
    Ok(protos)
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
    /// Anything else, e.g. a ClientHello from a client using direct TLS
    /// (`sslnegotiation=direct`): nothing to consume.
    Other,
}

/// Both requests are 8 bytes: the length 8, then a magic code.
pub const PG_PREAMBLE_LEN: usize = 8;
const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]; // 80877103
const PG_GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]; // 80877104

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
        return PgPreamble::Other;
    }
    if head == &PG_SSL_REQUEST[..n] || head == &PG_GSSENC_REQUEST[..n] {
        PgPreamble::NeedMore
    } else {
        PgPreamble::Other
    }
}
