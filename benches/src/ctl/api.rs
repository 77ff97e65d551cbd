//! mergend as a child process, and a small keep-alive HTTP/1.1 client for its API.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::spawn::Server;

pub const CLIENTS: usize = 50;
pub const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n";
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running mergend on the benchmark's roots, listening on a fixed address so a
/// restart is reached at the same place.
pub struct Daemon {
    _server: Server,
    /// From spawning the process to the first 200 from /healthz.
    pub startup: Duration,
}

impl Daemon {
    pub fn start(bin: &Path, root: &Path, addr: SocketAddr) -> Result<Daemon, String> {
        let t = Instant::now();
        let mut server = Server::start(
            Command::new(bin)
                .env("MGR_HTTP_ADDR", addr.to_string())
                .env("MGR_CONFIG_ROOT", root.join("config"))
                .env("MGR_DATA_ROOT", root.join("data"))
                .env("MGR_RUN_ROOT", root.join("run"))
                .env("MGR_IMAGE_ROOTS", root.join("img"))
                .env("MGR_GLOBAL_HOOKS_DIR", root.join("hooks.d"))
                .env("MGR_PORT_END", "65535")
                .env("MGR_GUEST_CIDR", "10.200.0.0/16")
                .env("MGR_LOG_FORMAT", "json")
                .env("MGR_LOG_LEVEL", "info"),
            &root.join("mergend.log"),
        )?;
        // Polled every 200 µs: the figure is the start-up time.
        loop {
            crate::interrupt::check()?;
            if healthz(addr) {
                break;
            }
            if let Some(status) = server.exited() {
                let log = std::fs::read_to_string(root.join("mergend.log")).unwrap_or_default();
                return Err(format!("mergend exited ({status}):\n{log}"));
            }
            if t.elapsed() > START_DEADLINE {
                return Err(format!(
                    "mergend did not answer /healthz within {START_DEADLINE:?}"
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(Daemon {
            _server: server,
            startup: t.elapsed(),
        })
    }

    /// CPU time mergend has used so far (user and system, every thread).
    pub fn cpu(&self) -> Duration {
        self._server.proc().tree_cpu()
    }
}

fn healthz(addr: SocketAddr) -> bool {
    let Ok(mut c) = Client::connect(addr) else {
        return false;
    };
    matches!(c.request("GET", "/healthz", b""), Ok((200, _)))
}

/// A minimal keep-alive HTTP/1.1 client for Content-Length responses.
pub struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client, String> {
        let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        Ok(Client { s, buf: Vec::new() })
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.s.write_all(&req).map_err(|e| e.to_string())?;
        self.response().map_err(|e| e.to_string())
    }

    fn response(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let bad = || io::Error::other("bad response");
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let code: u16 = head
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(bad)?;
        while self.buf.len() < head_end + len {
            self.fill()?;
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Ok((code, body))
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("connection closed"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// `CLIENTS` connections each sending healthz requests back to back for `limit`;
/// `echo_len` > 0 means the peer echoes that many bytes instead of answering HTTP.
pub fn hammer(addr: SocketAddr, limit: Duration, echo_len: usize) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> Result<u64, String> {
                let mut c = Client::connect(addr)?;
                let mut n = 0u64;
                let mut echo = vec![0u8; echo_len];
                while !stop.load(Ordering::Relaxed) {
                    c.s.write_all(HEALTHZ).map_err(|e| e.to_string())?;
                    if echo_len > 0 {
                        c.s.read_exact(&mut echo).map_err(|e| e.to_string())?;
                    } else {
                        let (code, _) = c.response().map_err(|e| e.to_string())?;
                        if code != 200 {
                            return Err(format!("healthz answered {code}"));
                        }
                    }
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    std::thread::sleep(limit);
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let mut total = 0;
    for w in workers {
        total += w.join().map_err(|_| "client thread panicked")??;
    }
    Ok(total as f64 / elapsed)
}

/// Thread-per-connection echo server: the floor for a request/response over loopback.
pub struct EchoServer {
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn start() -> Result<EchoServer, String> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            for s in l.incoming().take(CLIENTS) {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(EchoServer { addr })
    }
}
