//! Receivers for http hooks: a small HTTP/HTTPS server on 127.0.0.1 that records every
//! request and answers by a route function, a test CA (its PEM is what mergend trusts
//! through SSL_CERT_FILE, as Go's client does), and a CONNECT proxy that records its
//! tunnels.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Names as sent (case preserved).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The answer: status and extra headers.
pub type Answer = (u16, Vec<(String, String)>);

type Route = dyn Fn(&Seen) -> Answer + Send + Sync;

/// A server certificate for 127.0.0.1, localhost and hooks.example from a test CA,
/// as a TLS configuration for [`HookServer`].
pub struct TestCa {
    pub server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    /// A new CA whose PEM is written to `dir`: the file for SSL_CERT_FILE.
    pub fn in_dir(dir: &Path) -> (TestCa, PathBuf) {
        TestCa::named(dir, "hooks")
    }

    /// A certificate from a CA of its own (in `dir`) that nobody is told to trust.
    pub fn stranger(dir: &Path) -> TestCa {
        TestCa::named(dir, "stranger").0
    }

    fn named(dir: &Path, name: &str) -> (TestCa, PathBuf) {
        let ca = mergen_testkit::pki::TestCa::new(dir, name);
        let loopback = "127.0.0.1".parse().unwrap();
        let issued = ca.server_named("server", &["localhost", "hooks.example"], &[loopback]);
        let chain = CertificateDer::pem_file_iter(&issued.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&issued.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        (
            TestCa {
                server: Arc::new(server),
            },
            ca.ca_file.clone(),
        )
    }
}

pub struct HookServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl HookServer {
    /// Serve on 127.0.0.1 (TLS when `tls` is given), answering by `route`.
    pub fn start(
        tls: Option<Arc<rustls::ServerConfig>>,
        route: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
    ) -> HookServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let route: Arc<Route> = Arc::new(route);
        {
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(s) = s else { return };
                    let (seen, route, tls) = (Arc::clone(&seen), Arc::clone(&route), tls.clone());
                    std::thread::spawn(move || {
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        match tls {
                            Some(cfg) => {
                                let conn = rustls::ServerConnection::new(cfg).unwrap();
                                let mut stream = rustls::StreamOwned::new(conn, s);
                                serve(&mut stream, &seen, &*route);
                                stream.conn.send_close_notify();
                                let _ = stream.flush();
                            }
                            None => {
                                let mut s = s;
                                serve(&mut s, &seen, &*route);
                            }
                        }
                    });
                }
            });
        }
        HookServer { addr, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Read one request, record it, answer it, close.
fn serve(s: &mut impl ReadWrite, seen: &Mutex<Vec<Seen>>, route: &Route) {
    let Some(req) = read_request(s) else { return };
    let (status, headers) = route(&req);
    seen.lock().unwrap().push(req);
    let mut resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n");
    for (k, v) in headers {
        resp.push_str(&format!("{k}: {v}\r\n"));
    }
    resp.push_str("\r\nok");
    let _ = s.write_all(resp.as_bytes());
    let _ = s.flush();
}

pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn read_request(s: &mut impl Read) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hs);
        if let httparse::Status::Complete(head) = req.parse(&buf).ok()? {
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let len: usize = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            let (method, path) = (req.method?.to_string(), req.path?.to_string());
            while buf.len() < head + len {
                let n = s.read(&mut chunk).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(Seen {
                method,
                path,
                headers,
                body: buf[head..head + len].to_vec(),
            });
        }
    }
}

/// A CONNECT proxy on 127.0.0.1 whose tunnels to `name:port` go to 127.0.0.1:port
/// (the name is resolved by the proxy, as a real one would). Records each target.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    pub targets: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    pub fn start() -> ConnectProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let targets = Arc::new(Mutex::new(Vec::new()));
        {
            let targets = Arc::clone(&targets);
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(s) = s else { return };
                    let targets = Arc::clone(&targets);
                    std::thread::spawn(move || tunnel(s, &targets));
                }
            });
        }
        ConnectProxy { addr, targets }
    }

    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

fn tunnel(mut client: TcpStream, targets: &Mutex<Vec<String>>) {
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte up to the end of the head, so nothing after it is swallowed.
    while !buf.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut words = head.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        targets.lock().unwrap().push(format!("not CONNECT: {head}"));
        let _ = client.write_all(b"HTTP/1.1 405 X\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    targets.lock().unwrap().push(target.to_string());
    let port = target.rsplit_once(':').map(|(_, p)| p).unwrap_or("443");
    let Ok(upstream) = TcpStream::connect(format!("127.0.0.1:{port}")) else {
        let _ = client.write_all(b"HTTP/1.1 502 X\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    let _ = client.set_read_timeout(None);
    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let (mut c, mut u) = (client, upstream);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut u, &mut c);
    let _ = c.shutdown(Shutdown::Write);
    let _ = up.join();
}
