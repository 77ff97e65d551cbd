//! The admin listener: plain HTTP on one std thread, `GET /healthz` and `GET /metrics`.
//! It serves one short request per connection, one connection at a time, with small
//! size and time limits, so a misbehaving client can delay it but never exhaust it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Bind `addr` and serve from a new thread. Returns the bound address (useful with
/// port 0) and the thread, which runs for the life of the process.
pub fn spawn_admin(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let handle = std::thread::Builder::new()
        .name("fwd-admin".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = serve(stream, &metrics) {
                            log::debug!(error = e.to_string(); "admin request failed");
                        }
                    }
                    Err(e) => log::warn!(error = e.to_string(); "admin accept failed"),
                }
            }
        })?;
    Ok((bound, handle))
}

fn serve(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        if let Some(end) = find_head_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_REQUEST {
            return respond(
                &mut stream,
                431,
                "text/plain",
                b"request header too large\n",
            );
        }
        if Instant::now() >= deadline {
            return respond(&mut stream, 408, "text/plain", b"request timeout\n");
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_len]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/healthz") => respond(
            &mut stream,
            200,
            "application/json",
            b"{\"status\":\"ok\"}\n",
        ),
        ("GET" | "HEAD", "/metrics") => respond(
            &mut stream,
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render().as_bytes(),
        ),
        (_, "/healthz" | "/metrics") => {
            respond(&mut stream, 405, "text/plain", b"method not allowed\n")
        }
        _ => respond(&mut stream, 404, "text/plain", b"not found\n"),
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}
