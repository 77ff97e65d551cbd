//! The load generator's TLS side, one client for every terminator: rustls with ring,
//! TLS 1.3 and 1.2 offered, X25519 first, AES-256-GCM first (rustls' defaults).
//!
//! The load client does not verify the server's certificate or signature: the server
//! still makes the signature, the client just skips checking it, which takes a P-256
//! verification (the costliest step of a client's handshake) off the two shared cores.
//! Each terminator's signatures are checked once, at start-up, by [`verified_config`].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

pub type TlsStream = rustls::StreamOwned<ClientConnection, Sock>;

/// The client's TCP socket, counting its reads and the TLS records they carry: how
/// many bytes a read returns and how large the server's records are show how it sends
/// (many small writes and records, or few large ones), which the client pays for in
/// wake-ups, system calls and per-record decryption.
pub struct Sock {
    tcp: TcpStream,
    pub reads: u64,
    pub read_bytes: u64,
    pub records: u64,
    /// Where the record stream is: a header being read, or bytes left of a record.
    header: [u8; 5],
    header_have: usize,
    record_left: usize,
}

impl Sock {
    fn new(tcp: TcpStream) -> Sock {
        Sock {
            tcp,
            reads: 0,
            read_bytes: 0,
            records: 0,
            header: [0; 5],
            header_have: 0,
            record_left: 0,
        }
    }

    fn follow_records(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.record_left > 0 {
                let take = self.record_left.min(bytes.len());
                self.record_left -= take;
                bytes = &bytes[take..];
                continue;
            }
            let take = (5 - self.header_have).min(bytes.len());
            self.header[self.header_have..self.header_have + take].copy_from_slice(&bytes[..take]);
            self.header_have += take;
            bytes = &bytes[take..];
            if self.header_have == 5 {
                self.record_left =
                    usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header_have = 0;
                self.records += 1;
            }
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.tcp.read(buf)?;
        self.reads += 1;
        self.read_bytes += n as u64;
        self.follow_records(&buf[..n]);
        Ok(n)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// How long a connect or a read may block before the attempt counts as an error.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The load client's configuration; `resume` keeps session tickets (keep-alive loads
/// open one connection each, so it matters only for the new-connection loads, which
/// turn it off to measure full handshakes).
pub fn load_config(resume: bool) -> Arc<ClientConfig> {
    let mut config = mergen_testkit::tls::unverified_client_config();
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Arc::new(config)
}

/// A configuration that checks the server's handshake signatures (certificates are
/// self-signed, so any certificate is accepted): used once per terminator to make sure
/// it signs correctly before it is measured.
pub fn verified_config() -> Arc<ClientConfig> {
    let mut config = mergen_testkit::tls::accept_any_client_config();
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

pub fn tcp_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(sock)
}

/// Connect and complete the handshake (rustls finishes it on the first write or read;
/// this drives it to the end so the caller's timing of later steps excludes it).
pub fn connect(config: &Arc<ClientConfig>, addr: SocketAddr, sni: &str) -> io::Result<TlsStream> {
    let name = ServerName::try_from(sni.to_string()).map_err(io::Error::other)?;
    let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, Sock::new(tcp_connect(addr)?));
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// What the handshake agreed on, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
pub fn negotiated(stream: &TlsStream) -> String {
    let c = &stream.conn;
    let name = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    format!(
        "{} {} {}",
        name(c.protocol_version().map(|v| format!("{v:?}"))),
        name(
            c.negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
        ),
        name(
            c.negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
        )
    )
}

/// Send one `GET path` and read its whole response, handing the body's size in pieces
/// to `body` (which returns false to stop early). Returns the status code.
pub fn get(
    stream: &mut impl ReadWrite,
    host: &str,
    path: &str,
    close: bool,
    buf: &mut [u8],
    mut body: impl FnMut(usize) -> bool,
) -> io::Result<u16> {
    let connection = if close { "close" } else { "keep-alive" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n");
    stream.write_all(req.as_bytes())?;
    stream.flush()?;
    let mut have = 0;
    let (head_len, status, body_len) = loop {
        if have == buf.len() {
            return Err(io::Error::other("response head too large"));
        }
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let (status, len) = parse_head(&buf[..end])?;
            break (end + 4, status, len);
        }
    };
    let mut left = body_len;
    let first = (have - head_len).min(left);
    left -= first;
    if first > 0 && !body(first) {
        return Ok(status);
    }
    while left > 0 {
        let want = left.min(buf.len());
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n;
        if !body(n) {
            break;
        }
    }
    Ok(status)
}

fn parse_head(head: &[u8]) -> io::Result<(u16, usize)> {
    let head =
        std::str::from_utf8(head).map_err(|_| io::Error::other("response head not UTF-8"))?;
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| io::Error::other("no content-length"))?;
    Ok((status, len))
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A ClientHello for `sni` as this client sends it, to replay on many connections (a
/// server that refuses the name never gets as far as the key exchange).
pub fn client_hello(sni: &str) -> Result<Vec<u8>, String> {
    let name = ServerName::try_from(sni.to_string()).map_err(|e| format!("{sni}: {e}"))?;
    let mut conn =
        ClientConnection::new(load_config(false), name).map_err(|e| format!("{sni}: {e}"))?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// How a server answered a ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A fatal alert (its description code).
    Alert(u8),
    /// It closed without a word.
    Closed,
    /// It went on with the handshake (a ServerHello).
    Handshake,
}

/// Send `hello` on a new connection and read the first record the server answers with.
pub fn probe(addr: SocketAddr, hello: &[u8]) -> io::Result<Answer> {
    let mut sock = tcp_connect(addr)?;
    sock.write_all(hello)?;
    let mut head = [0u8; ANSWER_HEAD];
    let mut have = 0;
    loop {
        match sock.read(&mut head[have..]) {
            Ok(0) => return answer(&head[..have], true).unwrap_or(Ok(Answer::Closed)),
            Ok(n) => have += n,
            Err(e) if have == 0 && e.kind() == io::ErrorKind::ConnectionReset => {
                return Ok(Answer::Closed)
            }
            Err(e) => return Err(e),
        }
        if let Some(answer) = answer(&head[..have], false) {
            return answer;
        }
    }
}

/// What of an answer tells it: a record header and an alert's two bytes.
pub const ANSWER_HEAD: usize = 7;

/// The answer the first `head` bytes (at most [`ANSWER_HEAD`]) a server sent tell, or
/// `None` while more may come; `eof`: the server closed after them.
pub fn answer(head: &[u8], eof: bool) -> Option<io::Result<Answer>> {
    match (head.len(), head.first()) {
        (_, Some(22)) => Some(Ok(Answer::Handshake)),
        (0, _) if eof => Some(Ok(Answer::Closed)),
        (ANSWER_HEAD, Some(21)) => Some(Ok(Answer::Alert(head[6]))),
        (n, _) if n < ANSWER_HEAD && !eof => None,
        _ => Some(Err(io::Error::other(format!("unexpected answer {head:?}")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_records_across_reads() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut sock = Sock::new(TcpStream::connect(l.local_addr().unwrap()).unwrap());
        let record = |len: u16| {
            let mut r = vec![23, 3, 3];
            r.extend(len.to_be_bytes());
            r.extend(vec![0u8; len.into()]);
            r
        };
        let stream: Vec<u8> = [record(16401), record(3), record(0), record(300)].concat();
        // Split at awkward places: inside a header, at a boundary, inside a body.
        for piece in [
            &stream[..2],
            &stream[2..16406],
            &stream[16406..16410],
            &stream[16410..],
        ] {
            sock.follow_records(piece);
        }
        assert_eq!(sock.records, 4);
        assert_eq!((sock.header_have, sock.record_left), (0, 0));
    }
}
