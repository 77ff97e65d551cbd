//! HTTP/1.1 request reading and response writing over any byte stream, on `httparse`.
//!
//! Only what the control API needs: Content-Length bodies (a `Transfer-Encoding` body is
//! refused with 411), keep-alive, `Expect: 100-continue`, and hard limits on header size,
//! body size and the time a client may take to send one request.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A connection the server can read with a timeout and write to.
pub trait Transport: Read + Write + Send {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Transport for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl Transport for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request head (request line and headers) in bytes.
    pub max_header: usize,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Time a client has to send a whole request once its first byte arrived.
    pub read_timeout: Duration,
    /// Time an idle keep-alive connection is kept open waiting for a request.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header: 16 * 1024,
            max_body: 1024 * 1024,
            read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the client wants the connection kept open after this request.
    pub fn keep_alive(&self) -> bool {
        if self.version == 0 {
            self.has_token("connection", "keep-alive")
        } else {
            !self.has_token("connection", "close")
        }
    }

    /// The body length the head announces, checked against `max_body`.
    pub fn body_len(&self, max_body: usize) -> Result<usize, ReadError> {
        if self.header("transfer-encoding").is_some() {
            return Err(ReadError::LengthRequired);
        }
        let mut len: Option<usize> = None;
        for (_, v) in self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ReadError::Bad(format!("invalid Content-Length {v:?}")));
            }
            // Anything too long for usize is certainly over the limit.
            let n = v.parse::<usize>().unwrap_or(usize::MAX);
            if len.is_some_and(|l| l != n) {
                return Err(ReadError::Bad("conflicting Content-Length headers".into()));
            }
            len = Some(n);
        }
        let len = len.unwrap_or(0);
        if len > max_body {
            return Err(ReadError::BodyTooLarge);
        }
        Ok(len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The peer closed or stayed idle between requests: close without answering.
    Closed,
    /// The client started a request and did not finish it in time (408).
    Timeout,
    /// The request head exceeds the limit (431).
    HeaderTooLarge,
    /// The body exceeds the limit (413).
    BodyTooLarge,
    /// A body without Content-Length, e.g. chunked (411).
    LengthRequired,
    /// Malformed request (400).
    Bad(String),
}

const MAX_HEADERS: usize = 100;

/// Parse a request head from the start of `buf`. `Ok(None)` means more bytes are
/// needed; on success also returns the head's length in bytes. Pure, so it can be
/// fuzzed without any I/O.
pub fn parse_head(buf: &[u8], max_header: usize) -> Result<Option<(Head, usize)>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            if n > max_header {
                return Err(ReadError::HeaderTooLarge);
            }
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let head = Head {
                method: req.method.unwrap_or("").to_string(),
                path: path.to_string(),
                query: query.to_string(),
                version: req.version.unwrap_or(1),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
            };
            Ok(Some((head, n)))
        }
        Ok(httparse::Status::Partial) if buf.len() > max_header => Err(ReadError::HeaderTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(ReadError::HeaderTooLarge),
        Err(e) => Err(ReadError::Bad(format!("malformed request: {e}"))),
    }
}

/// Read one request from `conn`. `buf` carries bytes already read past the previous
/// request (pipelining) and keeps bytes read past this one.
pub fn read_request<T: Transport + ?Sized>(
    conn: &mut T,
    buf: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Request, ReadError> {
    // The per-request clock starts at the first byte, so an idle keep-alive connection
    // is not mistaken for a slow client.
    let mut deadline = (!buf.is_empty()).then(|| Instant::now() + limits.read_timeout);
    let (head, head_len) = loop {
        if !buf.is_empty() {
            if let Some(done) = parse_head(buf, limits.max_header)? {
                break done;
            }
        }
        fill(conn, buf, &mut deadline, limits)?;
    };
    let body_len = head.body_len(limits.max_body)?;
    buf.drain(..head_len);
    if body_len > buf.len() && head.has_token("expect", "100-continue") {
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|_| ReadError::Closed)?;
    }
    while buf.len() < body_len {
        fill(conn, buf, &mut deadline, limits)?;
    }
    let body = buf.drain(..body_len).collect();
    Ok(Request { head, body })
}

fn fill<T: Transport + ?Sized>(
    conn: &mut T,
    buf: &mut Vec<u8>,
    deadline: &mut Option<Instant>,
    limits: &Limits,
) -> Result<(), ReadError> {
    let timeout = match deadline {
        None => limits.idle_timeout,
        Some(d) => d.saturating_duration_since(Instant::now()),
    };
    if timeout.is_zero() {
        return Err(ReadError::Timeout);
    }
    conn.set_read_timeout(Some(timeout))
        .map_err(|_| ReadError::Closed)?;
    let mut chunk = [0u8; 8192];
    match conn.read(&mut chunk) {
        Ok(0) => Err(ReadError::Closed),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            deadline.get_or_insert_with(|| Instant::now() + limits.read_timeout);
            Ok(())
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            if deadline.is_some() {
                Err(ReadError::Timeout)
            } else {
                Err(ReadError::Closed)
            }
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(_) => Err(ReadError::Closed),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Response {
        let mut body = Vec::with_capacity(4096);
        if serde_json::to_writer(&mut body, value).is_err() {
            body.clear();
        }
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into_bytes(),
        }
    }

    /// The status line and headers, with the framing headers; `keep_alive: false`
    /// adds `Connection: close`.
    fn head(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if !keep_alive {
            out.push_str("Connection: close\r\n");
        }
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    /// The whole response as bytes.
    pub fn to_bytes(&self, keep_alive: bool, head_only: bool) -> Vec<u8> {
        let mut bytes = self.head(keep_alive);
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }

    /// Write the response: a small one in one write (one segment), a large body after
    /// the head without copying it.
    pub fn write_to<W: Write + ?Sized>(
        &self,
        w: &mut W,
        keep_alive: bool,
        head_only: bool,
    ) -> io::Result<()> {
        if head_only || self.body.len() <= 16 * 1024 {
            return w.write_all(&self.to_bytes(keep_alive, head_only));
        }
        w.write_all(&self.head(keep_alive))?;
        w.write_all(&self.body)
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_target_query_and_keep_alive() {
        let raw =
            b"GET /v1/vms/x?retainData=true HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nrest";
        let (h, n) = parse_head(raw, 16384).unwrap().unwrap();
        assert_eq!(h.path, "/v1/vms/x");
        assert_eq!(h.query, "retainData=true");
        assert!(!h.keep_alive());
        assert_eq!(&raw[n..], b"rest");
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n", 16384).unwrap(), None);
    }

    #[test]
    fn body_framing_rules() {
        let head = |hs: &[(&str, &str)]| Head {
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            version: 1,
            headers: hs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        assert_eq!(head(&[]).body_len(10), Ok(0));
        assert_eq!(head(&[("Content-Length", "5")]).body_len(10), Ok(5));
        assert_eq!(
            head(&[("Content-Length", "11")]).body_len(10),
            Err(ReadError::BodyTooLarge)
        );
        assert_eq!(
            head(&[("Transfer-Encoding", "chunked")]).body_len(10),
            Err(ReadError::LengthRequired)
        );
        assert!(matches!(
            head(&[("Content-Length", "-1")]).body_len(10),
            Err(ReadError::Bad(_))
        ));
        assert!(matches!(
            head(&[("Content-Length", "1"), ("content-length", "2")]).body_len(10),
            Err(ReadError::Bad(_))
        ));
        assert_eq!(
            head(&[("Content-Length", "99999999999999999999999")]).body_len(10),
            Err(ReadError::BodyTooLarge)
        );
    }

    #[test]
    fn oversized_head_is_431() {
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 17000));
        assert_eq!(parse_head(&raw, 16384), Err(ReadError::HeaderTooLarge));
    }
}
