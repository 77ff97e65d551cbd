//! The server over real loopback sockets: framing, keep-alive, the worker pool, the
//! deadlines, the connection caps and shutdown. Every wait is for a condition, bounded.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use mergen_http::{
    Cap, Handler, QuickHandler, RefusedRequest, Request, Response, Running, Server, ServerConfig,
    ServerStats,
};
use mergen_testkit::{connect_from, eventually, wait_for};

const WAIT: Duration = Duration::from_secs(10);

/// A handler that counts its calls and answers by path: `/echo` the body, `/slow`
/// once released, `/panic` by panicking, anything else `ok`.
#[derive(Default)]
struct App {
    calls: AtomicUsize,
    released: Mutex<bool>,
    release: Condvar,
}

impl App {
    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.release.notify_all();
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn handler(app: Arc<App>) -> Arc<Handler> {
    Arc::new(move |req: &Request| {
        app.calls.fetch_add(1, Ordering::SeqCst);
        match req.head.path.as_str() {
            "/echo" => Response::text(200, "text/plain", String::from_utf8_lossy(&req.body).into()),
            "/slow" => {
                let released = app.released.lock().unwrap();
                let _ = app.release.wait_timeout_while(released, WAIT, |r| !*r);
                Response::text(200, "text/plain", "slow".into())
            }
            "/panic" => panic!("handler bug"),
            _ => Response::text(200, "text/plain", "ok".into()),
        }
    })
}

struct TestServer {
    addr: SocketAddr,
    app: Arc<App>,
    stats: Arc<ServerStats>,
    running: Option<Running>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(1));
        }
    }
}

fn start(config: ServerConfig) -> TestServer {
    start_with(config, None)
}

fn start_with(config: ServerConfig, quick: Option<Arc<QuickHandler>>) -> TestServer {
    let app = Arc::new(App::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::clone(&config.stats);
    let mut server = Server::new(config, handler(Arc::clone(&app)));
    if let Some(quick) = quick {
        server.answer_quickly(quick);
    }
    server.listen_tcp(listener).unwrap();
    let running = server.start().unwrap();
    TestServer {
        addr,
        app,
        stats,
        running: Some(running),
    }
}

fn config() -> ServerConfig {
    ServerConfig {
        name: "test".into(),
        workers: 4,
        ..ServerConfig::default()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn from(ip: &str, addr: SocketAddr) -> TcpStream {
    let s = connect_from(ip.parse::<IpAddr>().unwrap(), addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Read until the server closes the connection.
fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Read one answer framed by Content-Length.
fn read_answer(s: &mut TcpStream) -> String {
    let head = read_answer_head(s);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

/// Whether the server has closed `s` (EOF, or reset) without sending anything; a
/// read that times out is not a close.
fn closed_silently(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Threads of this process whose name starts with `prefix` (tests run in parallel
/// threads of one process, so the server's own are told apart by name).
fn threads(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[test]
fn framing_keep_alive_and_protocol_errors() {
    let srv = start(config());
    let mut s = connect(srv.addr);
    // Two requests pipelined in one write, then a chunked one in pieces.
    s.write_all(b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\n\r\n")
        .unwrap();
    let a = read_answer(&mut s);
    assert!(
        a.starts_with("HTTP/1.1 200 OK\r\n") && a.ends_with("\r\n\r\nok"),
        "{a}"
    );
    let mut head = [0u8; 256];
    let n = s.read(&mut head).unwrap();
    let b = String::from_utf8_lossy(&head[..n]);
    assert!(
        b.contains("Content-Length: 2\r\n") && b.ends_with("\r\n\r\n"),
        "{b}"
    );
    for piece in [
        &b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"5\r\nhel",
        b"lo\r\n6;ext\r\n world\r\n0\r\nTrailer: x\r\n",
        b"\r\n",
    ] {
        s.write_all(piece).unwrap();
    }
    let c = read_answer(&mut s);
    assert!(c.ends_with("\r\n\r\nhello world"), "{c}");

    // Expect: 100-continue is honoured before the body is sent.
    s.write_all(b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"abc").unwrap();
    assert!(read_answer(&mut s).ends_with("abc"));

    // A handler that panics is a 500; the connection and the server go on.
    s.write_all(b"GET /panic HTTP/1.1\r\n\r\n").unwrap();
    let p = read_answer(&mut s);
    assert!(
        p.starts_with("HTTP/1.1 500") && p.contains("internal_error"),
        "{p}"
    );
    s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let last = read_to_close(&mut s);
    assert!(
        last.contains("Connection: close\r\n") && last.ends_with("ok"),
        "{last}"
    );

    let calls_before = srv.app.calls();
    let mut big = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    big.extend_from_slice(b"80000\r\n");
    big.extend(std::iter::repeat_n(b'x', 0x80000));
    big.extend_from_slice(b"\r\n80001\r\n");
    let cases: &[(&[u8], &str)] = &[
        (b"\x01\x02 nonsense\r\n\r\n", "HTTP/1.1 400"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n",
            "HTTP/1.1 413",
        ),
        (&big, "HTTP/1.1 413"),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (req, want) in cases {
        let mut s = connect(srv.addr);
        s.write_all(req).unwrap();
        let resp = read_to_close(&mut s);
        assert!(
            resp.starts_with(want),
            "{:?}: {resp}",
            String::from_utf8_lossy(&req[..20])
        );
        assert!(
            resp.contains("Connection: close") && resp.contains("\"error\""),
            "{resp}"
        );
    }
    let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 17 * 1024));
    let mut s = connect(srv.addr);
    s.write_all(&huge).unwrap();
    assert!(read_to_close(&mut s).starts_with("HTTP/1.1 431"));
    // None of the refused requests reached the handler.
    assert_eq!(srv.app.calls(), calls_before);
}

/// Quick answers come from the loop thread: with every worker held by a slow request,
/// they are still answered, the workers' handler never sees them, and a panic in one
/// is a 500 like any handler's.
#[test]
fn quick_answers_skip_the_busy_workers() {
    let quick: Arc<QuickHandler> = Arc::new(|req: &Request| match req.head.path.as_str() {
        "/quick" => Some(Response::text(200, "text/plain", "quick".into())),
        "/quick-panic" => panic!("quick handler bug"),
        _ => None,
    });
    let srv = start_with(
        ServerConfig {
            name: "quick".into(),
            workers: 1,
            ..config()
        },
        Some(quick),
    );
    let mut slow = connect(srv.addr);
    slow.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
    assert!(eventually(WAIT, || srv.app.calls() == 1));
    let mut c = connect(srv.addr);
    for _ in 0..3 {
        c.write_all(b"GET /quick HTTP/1.1\r\n\r\n").unwrap();
        assert!(read_answer(&mut c).ends_with("quick"));
    }
    c.write_all(b"HEAD /quick HTTP/1.1\r\n\r\n").unwrap();
    let head = read_answer_head(&mut c);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c.write_all(b"GET /quick-panic HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let answer = read_to_close(&mut c);
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    assert_eq!(srv.app.calls(), 1, "quick requests reached the workers");
    srv.app.release();
    assert!(read_answer(&mut slow).ends_with("slow"));
}

/// Read an answer's head only (a HEAD answer announces a length it does not send).
fn read_answer_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed mid-head: {buf:?}");
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

#[test]
fn slow_handlers_block_nobody_up_to_the_worker_cap() {
    let srv = start(ServerConfig {
        name: "slowcap".into(),
        ..config()
    });
    let max = config().workers;
    // Three slow requests run at once (the pool grows past its warm workers) ...
    let mut slow: Vec<TcpStream> = (0..max - 1).map(|_| connect(srv.addr)).collect();
    for s in &mut slow {
        s.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
    }
    assert!(eventually(WAIT, || srv.app.calls() == max - 1));
    // ... while other clients are served by the last worker.
    for i in 0..20 {
        let mut s = connect(srv.addr);
        s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert!(read_to_close(&mut s).ends_with("ok"), "request {i}");
    }
    // With every worker busy, a request waits its turn; it is not refused.
    let mut last = connect(srv.addr);
    last.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
    assert!(eventually(WAIT, || srv.app.calls() == max + 20));
    let mut waiting = connect(srv.addr);
    waiting.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(threads("slowcap-") <= 1 + max);
    srv.app.release();
    slow.push(last);
    for s in &mut slow {
        assert!(read_answer(s).ends_with("slow"));
    }
    assert!(read_answer(&mut waiting).ends_with("ok"));
    assert_eq!(srv.app.calls(), max + 21);
}

#[test]
fn silent_slow_and_idle_clients_are_dropped() {
    let srv = start(ServerConfig {
        header_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(1),
        ..config()
    });
    // Nothing sent: closed without a word once the head deadline passes.
    let mut silent = connect(srv.addr);
    // Half a head: 408, then closed.
    let mut partial = connect(srv.addr);
    partial.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // One request, then idle: closed after the idle timeout.
    let mut idle = connect(srv.addr);
    idle.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(read_answer(&mut idle).ends_with("ok"));

    assert!(closed_silently(&mut silent));
    let resp = read_to_close(&mut partial);
    assert!(
        resp.starts_with("HTTP/1.1 408") && resp.contains("request_timeout"),
        "{resp}"
    );
    assert!(closed_silently(&mut idle));
    // Counted for /metrics: two quiet closes (silent, idle) and one 408. The loop
    // counts before it closes, so what the clients saw is already counted.
    let st = srv.stats.snapshot();
    assert_eq!(st.idle_timeouts, 2, "{st:?}");
    assert_eq!(st.refused_requests(RefusedRequest::Timeout), 1, "{st:?}");
    assert_eq!(st.refused_requests(RefusedRequest::Malformed), 0, "{st:?}");
    assert_eq!(st.accepted, 3, "{st:?}");
}

#[test]
fn caps_close_the_oldest_idle_connection_before_refusing() {
    let srv = start(ServerConfig {
        max_connections: 4,
        max_connections_per_ip: 2,
        header_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(30),
        workers: 8,
        ..config()
    });
    let served = |s: &mut TcpStream| {
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        read_answer(s).ends_with("ok")
    };
    // A request the handler holds until released: the connection is busy, and the
    // handler's call count says when it got there.
    let busy = |s: &mut TcpStream, calls: usize| {
        s.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
        assert!(eventually(WAIT, || srv.app.calls() == calls));
    };
    let refused = |ip: &str| {
        let resp = read_to_close(&mut from(ip, srv.addr));
        resp.starts_with("HTTP/1.1 503") && resp.contains("too_many_connections")
    };

    // Per address: a third connection from 127.0.0.1 closes its oldest idle one.
    let mut a1 = from("127.0.0.1", srv.addr);
    let mut a2 = from("127.0.0.1", srv.addr);
    assert!(served(&mut a2));
    let mut a3 = from("127.0.0.1", srv.addr);
    assert!(served(&mut a3));
    assert!(closed_silently(&mut a1));
    // With both of its connections busy, a third is refused.
    busy(&mut a2, 3);
    busy(&mut a3, 4);
    assert!(refused("127.0.0.1"));

    // Globally (4): one idle and one busy connection from two more addresses; a fifth
    // client closes the idle one.
    let mut b = from("127.0.0.2", srv.addr);
    let mut c = from("127.0.0.3", srv.addr);
    busy(&mut c, 5);
    let mut d = from("127.0.0.4", srv.addr);
    assert!(served(&mut d));
    assert!(closed_silently(&mut b));
    // With all four busy, a newcomer is refused.
    busy(&mut d, 7);
    assert!(refused("127.0.0.5"));
    // Counted for /metrics: each cap closed one idle connection and refused one.
    let st = srv.stats.snapshot();
    for cap in Cap::ALL {
        assert_eq!(
            (st.evicted(cap), st.refused(cap)),
            (1, 1),
            "{cap:?}: {st:?}"
        );
    }
    assert_eq!((st.accepted, st.open), (6, 4), "{st:?}");
    // The busy ones are answered.
    srv.app.release();
    for s in [&mut a2, &mut a3, &mut c, &mut d] {
        assert!(read_answer(s).ends_with("slow"));
    }
}

#[test]
fn idle_connections_cost_no_thread() {
    let srv = start(ServerConfig {
        name: "idlecost".into(),
        max_connections: 1000,
        max_connections_per_ip: 1000,
        header_timeout: Duration::from_secs(60),
        ..config()
    });
    let held: Vec<TcpStream> = (0..500).map(|_| connect(srv.addr)).collect();
    // They are all open (and one more is served) ...
    let mut s = connect(srv.addr);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(read_answer(&mut s).ends_with("ok"));
    // ... by the loop and at most the most workers, however many connections there are.
    let n = threads("idlecost-");
    assert!(n <= 1 + config().workers, "{n} threads for 500 connections");
    drop(held);
}

#[test]
fn unix_socket_and_the_client_keep_alive() {
    let dir = mergen_testkit::TempDir::new("http-unix");
    let path = dir.path().join("api.sock");
    let app = Arc::new(App::default());
    let mut server = Server::new(config(), handler(Arc::clone(&app)));
    server
        .listen_unix(std::os::unix::net::UnixListener::bind(&path).unwrap())
        .unwrap();
    let running = server.start().unwrap();
    let client = mergen_http::UnixClient::new(&path, WAIT);
    for body in ["one", "two", ""] {
        let r = client
            .request("PUT", "/echo", Some("text/plain"), body.as_bytes())
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, body.as_bytes()));
    }
    let r = client.request("HEAD", "/", None, b"").unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("2")));
    assert!(r.body.is_empty());
    assert!(running.shutdown(WAIT));
}

#[test]
fn shutdown_finishes_what_runs_and_closes_the_rest() {
    let mut srv = start(config());
    let mut idle = connect(srv.addr);
    idle.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(read_answer(&mut idle).ends_with("ok"));
    let mut slow = connect(srv.addr);
    slow.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
    assert!(eventually(WAIT, || srv.app.calls() == 2));

    let running = srv.running.take().unwrap();
    let stopper = std::thread::spawn(move || running.shutdown(WAIT));
    // The idle one is closed at once; new connections are not taken.
    assert!(closed_silently(&mut idle));
    wait_for("the listener to close", WAIT, || {
        TcpStream::connect(srv.addr).is_err().then_some(())
    });
    // The slow request still gets its answer, with Connection: close.
    srv.app.release();
    let resp = read_to_close(&mut slow);
    assert!(
        resp.contains("Connection: close") && resp.ends_with("slow"),
        "{resp}"
    );
    assert!(stopper.join().unwrap(), "shutdown was not clean");
}

#[test]
fn shutdown_gives_up_on_a_stuck_handler() {
    let mut srv = start(config());
    let mut slow = connect(srv.addr);
    slow.write_all(b"GET /slow HTTP/1.1\r\n\r\n").unwrap();
    assert!(eventually(WAIT, || srv.app.calls() == 1));
    let running = srv.running.take().unwrap();
    assert!(!running.shutdown(Duration::from_millis(200)));
    assert!(closed_silently(&mut slow));
}
