//! A blocking HTTP/1.1 client over a unix socket, for local APIs such as
//! Firecracker's: one connection kept alive between calls, answers framed by
//! Content-Length, chunked encoding or the close of the connection, each call bounded
//! by a timeout.
//!
//! A kept-alive connection the server closed while it sat idle is noticed before
//! reuse; if the server closes it in the instant between that check and our request,
//! the request is sent again on a new connection, but only when not a byte of an
//! answer arrived (so the server cannot have answered it).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::chunked::ChunkedDecoder;
use crate::request::{field, keeps_alive, owned_fields};

/// Largest answer head we read.
const MAX_HEAD: usize = 64 * 1024;
/// Largest answer body we read.
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        field(&self.headers, name)
    }
}

#[derive(Debug)]
pub enum ClientError {
    Connect(io::Error),
    Send(io::Error),
    Receive(io::Error),
    /// The server closed the connection before a whole answer.
    Closed,
    /// Not an HTTP answer we can read.
    Malformed(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "connecting: {e}"),
            ClientError::Send(e) => write!(f, "sending: {e}"),
            ClientError::Receive(e) => write!(f, "reading the answer: {e}"),
            ClientError::Closed => f.write_str("connection closed before a complete answer"),
            ClientError::Malformed(m) => write!(f, "malformed HTTP answer: {m}"),
        }
    }
}

impl ClientError {
    /// The peer closed or reset the connection (not a timeout).
    fn is_closed(&self) -> bool {
        match self {
            ClientError::Closed => true,
            ClientError::Send(e) => !matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect(e) | ClientError::Send(e) | ClientError::Receive(e) => Some(e),
            _ => None,
        }
    }
}

pub struct UnixClient {
    socket: PathBuf,
    timeout: Duration,
    /// The connection kept alive from the last call.
    idle: Mutex<Option<UnixStream>>,
}

impl UnixClient {
    /// Every call (connect, send, answer) must finish within `timeout`.
    pub fn new(socket: &Path, timeout: Duration) -> UnixClient {
        UnixClient {
            socket: socket.to_path_buf(),
            timeout,
            idle: Mutex::new(None),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Connect, and keep the connection for the next call.
    pub fn connect(&self) -> io::Result<()> {
        let stream = UnixStream::connect(&self.socket)?;
        *self.idle.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
        Ok(())
    }

    /// Send one request; `body` goes with Content-Length (and `content_type`, if any).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<ClientResponse, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut message =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(ct) = content_type {
            message.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
            message.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        message.push_str("\r\n");
        let mut message = message.into_bytes();
        message.extend_from_slice(body);
        let head_only = method == "HEAD";

        let reused = self.take_idle();
        let fresh = reused.is_none();
        let mut stream = match reused {
            Some(s) => s,
            None => UnixStream::connect(&self.socket).map_err(ClientError::Connect)?,
        };
        match exchange(&mut stream, &message, head_only, deadline) {
            Err(Failure { error, answered }) if !fresh && !answered && error.is_closed() => {
                log::debug!(error:% = error; "kept-alive connection was closed; sending again on a new one");
                let mut stream = UnixStream::connect(&self.socket).map_err(ClientError::Connect)?;
                let (response, reusable) =
                    exchange(&mut stream, &message, head_only, deadline).map_err(|f| f.error)?;
                self.keep(stream, reusable);
                Ok(response)
            }
            Err(f) => Err(f.error),
            Ok((response, reusable)) => {
                self.keep(stream, reusable);
                Ok(response)
            }
        }
    }

    /// The kept-alive connection, if the server has not closed it meanwhile.
    fn take_idle(&self) -> Option<UnixStream> {
        let stream = self.idle.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let mut probe = [0u8; 1];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        // Readable while idle means closed (0) or stray bytes: either way, not reusable.
        let open =
            rustix::net::recv(&stream, &mut probe[..], flags) == Err(rustix::io::Errno::AGAIN);
        open.then_some(stream)
    }

    fn keep(&self, stream: UnixStream, reusable: bool) {
        if reusable {
            *self.idle.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
        }
    }
}

struct Failure {
    error: ClientError,
    /// Whether any byte of an answer arrived.
    answered: bool,
}

/// Send `message` and read the answer. Returns it and whether the connection may carry
/// another request.
fn exchange(
    stream: &mut UnixStream,
    message: &[u8],
    head_only: bool,
    deadline: Instant,
) -> Result<(ClientResponse, bool), Failure> {
    let fail = |error, answered| Failure { error, answered };
    set_timeouts(stream, deadline).map_err(|e| fail(ClientError::Send(e), false))?;
    stream
        .write_all(message)
        .map_err(|e| fail(ClientError::Send(e), false))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let head_len = match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(fail(
                    ClientError::Malformed("answer head too large".into()),
                    true,
                ))
            }
            Ok(httparse::Status::Partial) => {
                read_more(stream, &mut buf, deadline).map_err(|e| {
                    let answered = !buf.is_empty();
                    fail(e, answered)
                })?;
                continue;
            }
            Err(e) => return Err(fail(ClientError::Malformed(e.to_string()), true)),
        };
        let status = parsed.code.unwrap_or(0);
        let version = parsed.version.unwrap_or(1);
        let headers = owned_fields(parsed.headers);
        buf.drain(..head_len);
        if (100..200).contains(&status) {
            // An interim answer (100 Continue): the real one follows.
            continue;
        }
        let mut response = ClientResponse {
            status,
            headers,
            body: Vec::new(),
        };
        let closes = !keeps_alive(version, &response.headers);
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        let length = response.header("content-length");
        let reusable = if head_only || status == 204 || status == 304 {
            !closes
        } else if chunked {
            let mut decoder = ChunkedDecoder::new(MAX_BODY, MAX_HEAD);
            loop {
                let used = decoder
                    .decode(&buf, &mut response.body)
                    .map_err(|e| fail(ClientError::Malformed(e.to_string()), true))?;
                buf.drain(..used);
                if decoder.is_done() {
                    break;
                }
                read_more(stream, &mut buf, deadline).map_err(|e| fail(e, true))?;
            }
            !closes
        } else if let Some(length) = length {
            let length: usize = length
                .trim()
                .parse()
                .ok()
                .filter(|n| *n <= MAX_BODY)
                .ok_or_else(|| {
                    fail(
                        ClientError::Malformed(format!("Content-Length {length:?}")),
                        true,
                    )
                })?;
            while buf.len() < length {
                read_more(stream, &mut buf, deadline).map_err(|e| fail(e, true))?;
            }
            response.body = buf.drain(..length).collect();
            !closes
        } else {
            // No framing: the body runs to the close of the connection.
            loop {
                match read_more(stream, &mut buf, deadline) {
                    Ok(()) if buf.len() > MAX_BODY => {
                        return Err(fail(
                            ClientError::Malformed("answer body too large".into()),
                            true,
                        ))
                    }
                    Ok(()) => {}
                    Err(ClientError::Closed) => break,
                    Err(e) => return Err(fail(e, true)),
                }
            }
            response.body = std::mem::take(&mut buf);
            false
        };
        // Bytes beyond the answer mean we and the server disagree about framing.
        return Ok((response, reusable && buf.is_empty()));
    }
}

fn set_timeouts(stream: &UnixStream, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

/// Append what the next read brings to `buf`, before the deadline.
fn read_more(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<(), ClientError> {
    set_timeouts(stream, deadline).map_err(ClientError::Receive)?;
    let mut chunk = [0u8; 8192];
    loop {
        return match stream.read(&mut chunk) {
            Ok(0) => Err(ClientError::Closed),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(ClientError::Closed),
            Err(e) => Err(ClientError::Receive(e)),
        };
    }
}
