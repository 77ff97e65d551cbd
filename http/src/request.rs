//! Requests: the head (on httparse), body framing (Content-Length or chunked), and a
//! sans-IO reader that turns the bytes of a connection into requests, so the server's
//! event loop, the tests and the fuzzers drive the same code.

use std::fmt;

use crate::chunked::ChunkedDecoder;
use crate::response::Response;

/// Size bounds on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and header fields), in bytes; also the bound
    /// on a chunked body's trailer section.
    pub max_head: usize,
    /// Largest request body, in bytes, however it is framed.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_body: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target's path, without the query.
    pub path: String,
    /// What follows `?` in the target, without it.
    pub query: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, String)>,
}

/// Header fields as httparse found them, owned (values need not be UTF-8).
pub(crate) fn owned_fields(fields: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// The value of the first field named `name` (case-insensitive).
pub(crate) fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether the comma-separated fields named `name` list `token` (case-insensitive).
pub(crate) fn lists_token(fields: &[(String, String)], name: &str, token: &str) -> bool {
    fields
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether a message of HTTP/1.`version` with these fields leaves the connection
/// open: 1.1 unless `Connection: close`, 1.0 only with `Connection: keep-alive`.
pub(crate) fn keeps_alive(version: u8, fields: &[(String, String)]) -> bool {
    if version == 0 {
        lists_token(fields, "connection", "keep-alive")
    } else {
        !lists_token(fields, "connection", "close")
    }
}

impl Head {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }

    /// Whether a comma-separated header named `name` lists `token` (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        lists_token(&self.headers, name, token)
    }

    /// Whether the client wants the connection kept open after this request.
    pub fn keep_alive(&self) -> bool {
        keeps_alive(self.version, &self.headers)
    }

    /// How the body is framed, by RFC 9112 section 6: chunked must be the final (here:
    /// the only) transfer coding; Transfer-Encoding with Content-Length is refused
    /// rather than guessed at, as is any disagreement between Content-Length fields.
    pub fn framing(&self, max_body: usize) -> Result<Framing, RequestError> {
        let codings: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let lengths = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"));
        if !codings.is_empty() {
            if lengths.count() > 0 {
                return Err(RequestError::Malformed(
                    "both Transfer-Encoding and Content-Length".into(),
                ));
            }
            if self.version == 0 {
                return Err(RequestError::Malformed(
                    "Transfer-Encoding in an HTTP/1.0 request".into(),
                ));
            }
            let chunked = codings
                .iter()
                .filter(|c| c.eq_ignore_ascii_case("chunked"))
                .count();
            if chunked > 1 {
                return Err(RequestError::Malformed("chunked applied twice".into()));
            }
            return match codings.as_slice() {
                [c] if c.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
                [.., last] if !last.eq_ignore_ascii_case("chunked") => Err(
                    RequestError::Malformed("chunked is not the final transfer coding".into()),
                ),
                _ => Err(RequestError::UnsupportedCoding(codings.join(", "))),
            };
        }
        let mut len: Option<usize> = None;
        for (_, v) in lengths {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(RequestError::Malformed(format!(
                    "invalid Content-Length {v:?}"
                )));
            }
            // Anything too long for usize is certainly over the limit.
            let n = v.parse::<usize>().unwrap_or(usize::MAX);
            if len.is_some_and(|l| l != n) {
                return Err(RequestError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            len = Some(n);
        }
        let len = len.unwrap_or(0);
        if len > max_body {
            return Err(RequestError::BodyTooLarge { limit: max_body });
        }
        Ok(Framing::Length(len))
    }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(usize),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

/// Why a request cannot be served. Each maps to one status code and a stable error
/// code in [`RequestError::into_response`]; the connection is closed after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The head (or a chunked body's trailers) exceeds its limit: 431.
    HeadTooLarge { limit: usize },
    /// The body exceeds the limit: 413.
    BodyTooLarge { limit: usize },
    /// A transfer coding other than chunked: 501.
    UnsupportedCoding(String),
    /// The request did not arrive in time: 408.
    Timeout,
    /// Anything malformed: 400.
    Malformed(String),
}

impl RequestError {
    pub fn status(&self) -> u16 {
        match self {
            RequestError::HeadTooLarge { .. } => 431,
            RequestError::BodyTooLarge { .. } => 413,
            RequestError::UnsupportedCoding(_) => 501,
            RequestError::Timeout => 408,
            RequestError::Malformed(_) => 400,
        }
    }

    /// The machine-readable code in the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::HeadTooLarge { .. } => "header_too_large",
            RequestError::BodyTooLarge { .. } => "payload_too_large",
            RequestError::UnsupportedCoding(_) => "not_implemented",
            RequestError::Timeout => "request_timeout",
            RequestError::Malformed(_) => "bad_request",
        }
    }

    pub fn into_response(self) -> Response {
        Response::error(self.status(), self.code(), &self.to_string())
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::HeadTooLarge { limit } => {
                write!(f, "request head exceeds {limit} bytes")
            }
            RequestError::BodyTooLarge { limit } => {
                write!(f, "request body exceeds {limit} bytes")
            }
            RequestError::UnsupportedCoding(c) => {
                write!(f, "transfer coding {c:?} is not supported (only chunked)")
            }
            RequestError::Timeout => f.write_str("request not received in time"),
            RequestError::Malformed(m) => write!(f, "malformed request: {m}"),
        }
    }
}

impl std::error::Error for RequestError {}

/// Most header fields in a request head (more is 431).
pub const MAX_HEADERS: usize = 100;

/// Parse a request head from the start of `buf`. `Ok(None)` means more bytes are
/// needed; on success also returns the head's length in bytes.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(Head, usize)>, RequestError> {
    let too_large = RequestError::HeadTooLarge {
        limit: limits.max_head,
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    // Nothing past the limit is looked at, so the answer does not depend on how the
    // bytes arrived: a head cut off by the limit is too large, whatever follows.
    let buf = &buf[..buf.len().min(limits.max_head.saturating_add(1))];
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_head => Err(too_large),
        Ok(httparse::Status::Complete(n)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let head = Head {
                method: req.method.unwrap_or("").to_string(),
                path: path.to_string(),
                query: query.to_string(),
                version: req.version.unwrap_or(1),
                headers: owned_fields(req.headers),
            };
            Ok(Some((head, n)))
        }
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => Err(too_large),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(too_large),
        Err(e) => Err(RequestError::Malformed(e.to_string())),
    }
}

/// What [`RequestReader::advance`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Feed more bytes.
    NeedMore,
    /// The head asked `Expect: 100-continue` and the body has not arrived: write
    /// `HTTP/1.1 100 Continue`, then keep feeding. Reported once per request.
    SendContinue,
    /// A whole request; the reader is ready for the next one.
    Done(Request),
}

#[derive(Debug)]
enum Stage {
    Head,
    Body {
        head: Head,
        body: Vec<u8>,
        framing: BodyFraming,
        continue_due: bool,
    },
}

#[derive(Debug)]
enum BodyFraming {
    Length(usize),
    Chunked(ChunkedDecoder),
}

/// Reads requests, one after the other, from the bytes of one connection.
#[derive(Debug)]
pub struct RequestReader {
    limits: Limits,
    stage: Stage,
}

impl RequestReader {
    pub fn new(limits: Limits) -> RequestReader {
        RequestReader {
            limits,
            stage: Stage::Head,
        }
    }

    /// Whether the current request's head has been read (its body may be pending).
    pub fn head_read(&self) -> bool {
        matches!(self.stage, Stage::Body { .. })
    }

    /// Consume from the front of `buf` what belongs to the current request. Bytes of a
    /// following request (pipelining) stay in `buf`. After an error the connection's
    /// framing is lost: answer the error and close.
    pub fn advance(&mut self, buf: &mut Vec<u8>) -> Result<Progress, RequestError> {
        if let Stage::Head = self.stage {
            let Some((head, head_len)) = parse_head(buf, &self.limits)? else {
                return Ok(Progress::NeedMore);
            };
            buf.drain(..head_len);
            let framing = match head.framing(self.limits.max_body)? {
                Framing::Length(n) => BodyFraming::Length(n),
                Framing::Chunked => BodyFraming::Chunked(ChunkedDecoder::new(
                    self.limits.max_body,
                    self.limits.max_head,
                )),
            };
            let continue_due = head.has_token("expect", "100-continue");
            self.stage = Stage::Body {
                head,
                body: Vec::new(),
                framing,
                continue_due,
            };
        }
        let Stage::Body {
            body,
            framing,
            continue_due,
            ..
        } = &mut self.stage
        else {
            unreachable!("the head stage ends above");
        };
        let done = match framing {
            BodyFraming::Length(n) => {
                let take = (*n - body.len()).min(buf.len());
                body.extend(buf.drain(..take));
                body.len() == *n
            }
            BodyFraming::Chunked(decoder) => {
                let used = decoder.decode(buf, body)?;
                buf.drain(..used);
                decoder.is_done()
            }
        };
        if !done {
            if std::mem::take(continue_due) {
                return Ok(Progress::SendContinue);
            }
            return Ok(Progress::NeedMore);
        }
        let Stage::Body { head, body, .. } = std::mem::replace(&mut self.stage, Stage::Head) else {
            unreachable!("matched above");
        };
        Ok(Progress::Done(Request { head, body }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(hs: &[(&str, &str)]) -> Head {
        Head {
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            version: 1,
            headers: hs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    fn read_all(input: &[u8], limits: Limits) -> Result<Vec<Request>, RequestError> {
        let mut reader = RequestReader::new(limits);
        let mut buf = input.to_vec();
        let mut out = Vec::new();
        loop {
            match reader.advance(&mut buf)? {
                Progress::Done(r) => out.push(r),
                Progress::SendContinue => {}
                Progress::NeedMore => return Ok(out),
            }
        }
    }

    #[test]
    fn parses_target_query_and_keep_alive() {
        let raw =
            b"GET /v1/vms/x?retainData=true HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nrest";
        let (h, n) = parse_head(raw, &Limits::default()).unwrap().unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/v1/vms/x");
        assert_eq!(h.query, "retainData=true");
        assert_eq!(h.header("HOST"), Some("a"));
        assert!(!h.keep_alive());
        assert_eq!(&raw[n..], b"rest");
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\n", &Limits::default()).unwrap(),
            None
        );
        let (h10, _) = parse_head(b"GET / HTTP/1.0\r\n\r\n", &Limits::default())
            .unwrap()
            .unwrap();
        assert!(!h10.keep_alive());
        let (h10, _) = parse_head(
            b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
            &Limits::default(),
        )
        .unwrap()
        .unwrap();
        assert!(h10.keep_alive());
    }

    #[test]
    fn head_size_and_count_are_bounded() {
        let limits = Limits::default();
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 17000));
        // Refused before the head ends: the client cannot make us buffer more.
        assert_eq!(
            parse_head(&raw, &limits),
            Err(RequestError::HeadTooLarge { limit: 16384 })
        );
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_head(&raw, &limits),
            Err(RequestError::HeadTooLarge { limit: 16384 })
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_head(&many, &limits),
            Err(RequestError::HeadTooLarge { limit: 16384 })
        );
        assert!(matches!(
            parse_head(b"\x01\x02 nonsense\r\n\r\n", &limits),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn body_framing_rules() {
        use Framing::*;
        assert_eq!(head(&[]).framing(10), Ok(Length(0)));
        assert_eq!(head(&[("Content-Length", "5")]).framing(10), Ok(Length(5)));
        assert_eq!(
            head(&[("Content-Length", "5"), ("content-length", "5")]).framing(10),
            Ok(Length(5))
        );
        assert_eq!(
            head(&[("Content-Length", "11")]).framing(10),
            Err(RequestError::BodyTooLarge { limit: 10 })
        );
        assert_eq!(
            head(&[("Content-Length", "99999999999999999999999")]).framing(10),
            Err(RequestError::BodyTooLarge { limit: 10 })
        );
        for bad in [
            &[("Content-Length", "-1")][..],
            &[("Content-Length", "1"), ("content-length", "2")],
            &[("Content-Length", "")],
            &[("Content-Length", "1, 1")],
            &[("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
            &[("Transfer-Encoding", "chunked, gzip")],
            &[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked"),
            ],
        ] {
            let got = head(bad).framing(10);
            assert!(
                matches!(got, Err(RequestError::Malformed(_))),
                "{bad:?}: {got:?}"
            );
        }
        assert_eq!(
            head(&[("Transfer-Encoding", "Chunked")]).framing(10),
            Ok(Chunked)
        );
        assert_eq!(
            head(&[
                ("Transfer-Encoding", "gzip"),
                ("Transfer-Encoding", "chunked")
            ])
            .framing(10),
            Err(RequestError::UnsupportedCoding("gzip, chunked".into()))
        );
        let mut old = head(&[("Transfer-Encoding", "chunked")]);
        old.version = 0;
        assert!(matches!(old.framing(10), Err(RequestError::Malformed(_))));
    }

    #[test]
    fn reads_pipelined_requests_with_both_framings() {
        let input = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
            POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n1\r\nf\r\n0\r\n\r\n\
            GET /c HTTP/1.1\r\n\r\n";
        // Fed byte by byte and all at once, the same requests come out.
        let whole = read_all(input, Limits::default()).unwrap();
        let mut reader = RequestReader::new(Limits::default());
        let mut buf = Vec::new();
        let mut stepped = Vec::new();
        for &b in input.iter() {
            buf.push(b);
            while let Progress::Done(r) = reader.advance(&mut buf).unwrap() {
                stepped.push(r);
            }
        }
        assert_eq!(whole, stepped);
        let summary: Vec<(String, Vec<u8>)> =
            whole.into_iter().map(|r| (r.head.path, r.body)).collect();
        assert_eq!(
            summary,
            [
                ("/a".to_string(), b"abc".to_vec()),
                ("/b".to_string(), b"def".to_vec()),
                ("/c".to_string(), Vec::new()),
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn body_limits_hold_for_both_framings() {
        let limits = Limits {
            max_body: 4,
            ..Limits::default()
        };
        assert!(read_all(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd", limits).is_ok());
        assert_eq!(
            read_all(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", limits),
            Err(RequestError::BodyTooLarge { limit: 4 })
        );
        assert!(read_all(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
            limits
        )
        .is_ok());
        assert_eq!(
            read_all(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n1\r\n",
                limits
            ),
            Err(RequestError::BodyTooLarge { limit: 4 })
        );
    }

    #[test]
    fn continue_is_asked_for_once_and_only_when_the_body_is_missing() {
        let mut reader = RequestReader::new(Limits::default());
        let mut buf =
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n".to_vec();
        assert!(!reader.head_read());
        assert_eq!(reader.advance(&mut buf), Ok(Progress::SendContinue));
        assert!(reader.head_read());
        assert_eq!(reader.advance(&mut buf), Ok(Progress::NeedMore));
        buf.extend_from_slice(b"ok");
        assert!(matches!(reader.advance(&mut buf), Ok(Progress::Done(_))));
        // The body came with the head: no 100 Continue.
        let mut buf =
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok".to_vec();
        assert!(matches!(reader.advance(&mut buf), Ok(Progress::Done(_))));
    }

    #[test]
    fn errors_map_to_one_status_each() {
        let cases = [
            (
                RequestError::HeadTooLarge { limit: 1 },
                431,
                "header_too_large",
            ),
            (
                RequestError::BodyTooLarge { limit: 1 },
                413,
                "payload_too_large",
            ),
            (
                RequestError::UnsupportedCoding("gzip".into()),
                501,
                "not_implemented",
            ),
            (RequestError::Timeout, 408, "request_timeout"),
            (RequestError::Malformed("x".into()), 400, "bad_request"),
        ];
        for (e, status, code) in cases {
            let r = e.clone().into_response();
            assert_eq!(r.status, status);
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["error"], code);
            assert_eq!(v["message"], e.to_string());
        }
    }
}
