//! The admin listener: `GET /healthz` and `GET /metrics` over plain HTTP, served by
//! mergen-http's event loop with small limits, so idle or slow clients cost a socket
//! each and never delay a health check (at the connection cap the oldest idle one is
//! closed to make room).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use mergen_http::{Limits, Request, Response, Running, Server, ServerConfig};

use crate::cluster_routes::ClusterHealth;
use crate::metrics::Metrics;

const MAX_HEAD: usize = 8 * 1024;
const TIMEOUT: Duration = Duration::from_secs(2);

/// Bind `addr` and serve. Returns the bound address (useful with port 0) and the
/// server, which runs for the life of the process unless shut down.
pub fn spawn_admin(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<(SocketAddr, Running)> {
    spawn_admin_with(addr, metrics, None)
}

/// [`spawn_admin`] for a forwarder in a cluster: both answers also tell how its view
/// of the other hosts' routes is doing.
pub fn spawn_admin_with(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    cluster: Option<Arc<ClusterHealth>>,
) -> io::Result<(SocketAddr, Running)> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    let config = ServerConfig {
        name: "fwd-admin".into(),
        limits: Limits {
            max_head: MAX_HEAD,
            max_body: 1024,
        },
        header_timeout: TIMEOUT,
        request_timeout: TIMEOUT,
        idle_timeout: Duration::from_secs(30),
        // Scrapers and health checkers come from few addresses, often the same one:
        // the global cap (and its closing of idle connections) is the one that matters.
        max_connections: 64,
        max_connections_per_ip: 64,
        workers: 2,
        stats: Arc::default(),
    };
    // Every answer here is a few counters: all of them come from the loop thread.
    let quick = (Arc::clone(&metrics), cluster.clone());
    let mut server = Server::new(
        config,
        Arc::new(move |req: &Request| answer(&metrics, cluster.as_deref(), req)),
    );
    server.answer_quickly(Arc::new(move |req: &Request| {
        Some(answer(&quick.0, quick.1.as_deref(), req))
    }));
    server.listen_tcp(listener)?;
    Ok((bound, server.start()?))
}

fn answer(metrics: &Metrics, cluster: Option<&ClusterHealth>, req: &Request) -> Response {
    match (req.head.method.as_str(), req.head.path.as_str()) {
        ("GET" | "HEAD", "/healthz") => {
            let mut body = serde_json::json!({"status": "ok"});
            if let Some(c) = cluster {
                body["cluster"] = c.json();
            }
            Response::json(200, &body)
        }
        ("GET" | "HEAD", "/metrics") => {
            let mut text = metrics.render();
            if let Some(c) = cluster {
                c.render(&mut text);
            }
            Response::text(200, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        (_, "/healthz" | "/metrics") => {
            let mut r = Response::error(405, "method_not_allowed", "use GET or HEAD");
            r.headers.push(("Allow", "GET, HEAD".into()));
            r
        }
        (_, path) => Response::error(404, "not_found", &format!("no such path {path}")),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::process::Command;

    use super::*;
    use crate::metrics::Outcome;

    fn start() -> (SocketAddr, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new(&["0.0.0.0:443".into()]));
        let (addr, _server) =
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
            (
                b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "HTTP/1.1 404",
            ),
            (
                b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                "HTTP/1.1 405",
            ),
            (b"DELETE /metrics HTTP/1.0\r\n\r\n", "HTTP/1.1 405"),
            (b"\x16\x03\x01\x00\x05hello\r\n\r\n", "HTTP/1.1 400"),
            (
                b"GET /healthz HTTP/1.1\r\nContent-Length: 2000\r\n\r\n",
                "HTTP/1.1 413",
            ),
            // Never a whole head: 408 at the deadline.
            (b"\r\n\r\n", "HTTP/1.1 408"),
            (b"GET /healthz HTTP/1.1\r\n", "HTTP/1.1 408"),
        ];
        for (req, want) in cases {
            let resp = raw(addr, req);
            assert!(resp.starts_with(want), "{req:?}: {resp}");
        }
        let mut big = b"GET /healthz HTTP/1.1\r\nX: ".to_vec();
        big.extend_from_slice(&vec![b'a'; MAX_HEAD]);
        let resp = raw(addr, &big);
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
        // A client that hangs up early does not stop the listener.
        drop(TcpStream::connect(addr).unwrap());
        assert!(
            raw(addr, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
                .starts_with("HTTP/1.1 200")
        );
    }

    /// Ten idle connections sit on the listener; a health check is answered while they
    /// are all still open (it did not have to wait for them to time out).
    #[test]
    fn idle_connections_do_not_delay_health_checks() {
        let (addr, _) = start();
        let mut idle: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // One more that sent half a request.
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /heal").unwrap();
        idle.push(half);
        let (head, _) = curl(&[&format!("http://{addr}/healthz")]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        for s in &mut idle {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 16];
            let err = s.read(&mut b).expect_err("closed or answered");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        }
    }
}
