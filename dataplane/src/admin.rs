//! The admin listener: plain HTTP, `GET /healthz` and `GET /metrics`. It serves one
//! short request per connection, each connection on a thread of its own (up to
//! [`MAX_CONCURRENT`] at once) with small size and time limits, so idle or slow
//! clients neither delay a health check nor exhaust the listener; when the process is
//! out of descriptors it backs off instead of failing to accept in a loop.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backoff::{self, Backoff, Throttle};
use crate::metrics::Metrics;

const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once. Past that a new one is closed at once: a health checker
/// retries, and no client can make the listener hold more threads than this.
pub const MAX_CONCURRENT: usize = 64;

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
        .spawn(move || accept_loop(&listener, &metrics))?;
    Ok((bound, handle))
}

fn accept_loop(listener: &TcpListener, metrics: &Arc<Metrics>) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut backoff = Backoff::accept();
    let mut warning = Throttle::new(backoff::WARN_INTERVAL);
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(e) => {
                // Out of descriptors or memory, the next accept would fail at once too.
                let exhausted = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                let wait = exhausted.then(|| backoff.failed());
                if let Some(more) = warning.hit(Instant::now()) {
                    log::warn!("admin accept failed: {e}{}", backoff::more(more));
                }
                if let Some(wait) = wait {
                    std::thread::sleep(wait);
                }
                continue;
            }
        };
        if active.load(Ordering::Acquire) >= MAX_CONCURRENT {
            log::debug!("admin listener busy ({MAX_CONCURRENT} connections): one closed");
            continue;
        }
        let served = Served::new(&active);
        let metrics = Arc::clone(metrics);
        let spawned = std::thread::Builder::new()
            .name("fwd-admin-conn".into())
            .spawn(move || {
                let _served = served;
                if let Err(e) = serve(stream, &metrics) {
                    log::debug!(error = e.to_string(); "admin request failed");
                }
            });
        if let Err(e) = spawned {
            if let Some(more) = warning.hit(Instant::now()) {
                log::warn!(
                    "admin connection dropped: no thread for it ({e}){}",
                    backoff::more(more)
                );
            }
        }
    }
}

/// One connection counted as served until it is dropped (also when serving panics).
struct Served(Arc<AtomicUsize>);

impl Served {
    fn new(active: &Arc<AtomicUsize>) -> Served {
        active.fetch_add(1, Ordering::AcqRel);
        Served(Arc::clone(active))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => {
            (200, "application/json", b"{\"status\":\"ok\"}\n".to_vec())
        }
        ("GET" | "HEAD", "/metrics") => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render().into_bytes(),
        ),
        (_, "/healthz" | "/metrics") => (405, "text/plain", b"method not allowed\n".to_vec()),
        _ => (404, "text/plain", b"not found\n".to_vec()),
    };
    let head_only = method == "HEAD";
    respond_with(&mut stream, status, content_type, &body, head_only)
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
    respond_with(stream, status, content_type, body, false)
}

/// With `head_only` (a HEAD request) the headers describe `body` but it is not sent.
fn respond_with(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
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
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()?;
    linger_close(stream);
    Ok(())
}

/// Close after reading what the client still sends (bounded in bytes and time): closing
/// with unread input would reset the connection and could destroy the response
/// before the client reads it.
fn linger_close(stream: &mut TcpStream) {
    const MAX_DRAIN: usize = 64 * 1024;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut drained = 0;
    let mut sink = [0u8; 4096];
    while drained < MAX_DRAIN && Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::metrics::Outcome;

    fn start() -> (SocketAddr, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new(&["0.0.0.0:443".into()]));
        let (addr, _thread) =
            spawn_admin("127.0.0.1:0".parse().unwrap(), Arc::clone(&metrics)).unwrap();
        (addr, metrics)
    }

    /// Send `request` raw and return the whole response.
    fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn curl(args: &[&str]) -> (String, String) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-D", "-"])
            .args(args)
            .output()
            .expect("curl runs");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    #[test]
    fn healthz_and_metrics_with_curl() {
        let (addr, metrics) = start();
        metrics.conn_opened(0);
        metrics.conn_closed(0, Outcome::Ok);
        let (head, body) = curl(&[&format!("http://{addr}/healthz")]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        assert_eq!(body, "{\"status\":\"ok\"}\n");
        let (head, body) = curl(&[&format!("http://{addr}/metrics?x=1")]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        assert!(
            body.contains(
                "mergen_forwarder_connections_total{listener=\"0.0.0.0:443\",outcome=\"ok\"} 1"
            ),
            "{body}"
        );
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-I",
                &format!("http://{addr}/healthz"),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\n"),
            "{text:?}"
        );
        assert!(text.contains("Content-Length: 16"), "{text:?}");
    }

    #[test]
    fn other_requests_are_refused() {
        let (addr, _) = start();
        let cases: &[(&[u8], &str)] = &[
            (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 404"),
            (
                b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 405",
            ),
            (b"DELETE /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405"),
            (b"\x16\x03\x01\x00\x05hello\r\n\r\n", "HTTP/1.1 404"),
            (b"\r\n\r\n", "HTTP/1.1 404"),
        ];
        for (req, want) in cases {
            let resp = raw(addr, req);
            assert!(resp.starts_with(want), "{req:?}: {resp}");
        }
        let mut big = b"GET /healthz HTTP/1.1\r\nX: ".to_vec();
        big.extend_from_slice(&vec![b'a'; MAX_REQUEST]);
        let resp = raw(addr, &big);
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
        // A client that hangs up early does not stop the listener.
        drop(TcpStream::connect(addr).unwrap());
        assert!(raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
    }

    /// Silent clients hold connections (each up to its 2 s limit), and a health check
    /// is answered while they still do: they cost a thread each, never a turn.
    #[test]
    fn silent_clients_do_not_delay_a_health_check() {
        let (addr, _) = start();
        let silent: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        assert!(raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        for s in &silent {
            s.set_nonblocking(true).unwrap();
            let still_open = matches!(
                (&*s).read(&mut [0u8; 64]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            );
            assert!(
                still_open,
                "a silent client was timed out before the health check was answered"
            );
        }
        // Each is still closed by its own time limit.
        for mut s in silent {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).expect("closed by the listener");
        }
    }

    /// Past `MAX_CONCURRENT` connections a new one is closed at once, and the listener
    /// serves again as soon as they go.
    #[test]
    fn connections_past_the_cap_are_closed() {
        let (addr, _) = start();
        let held: Vec<TcpStream> = (0..MAX_CONCURRENT)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        // The listener has counted every held one once this is closed unanswered.
        let refused = mergen_testkit::poll(Duration::from_secs(5), || {
            let mut s = TcpStream::connect(addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).ok()?;
            out.is_empty().then_some(())
        });
        assert!(refused.is_some(), "a connection past the cap was served");
        drop(held);
        let served = mergen_testkit::poll(Duration::from_secs(10), || {
            let mut s = TcpStream::connect(addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.starts_with("HTTP/1.1 200").then_some(())
        });
        assert!(served.is_some());
    }
}
