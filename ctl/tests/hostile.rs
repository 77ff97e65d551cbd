//! mergend under hostile load: one address holding hundreds of idle and slow
//! connections neither locks out an authenticated client from another address nor
//! costs mergend a thread per connection. Loopback only (127.0.0.1 is the attacker,
//! 127.0.0.2 the client), bounded in connections and time.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Mergend, Roots};
use mergen_testkit::{connect_from, eventually};

const TOKEN: &str = "hostile-test-token";
const IDLE: usize = 300;
const SLOW: usize = 300;
/// No flood outlives this, whatever the test does.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);

/// 300 connections that never send a byte and 300 that send a request one byte a
/// second, all from 127.0.0.1. Whatever the server closes (or refuses) is opened
/// again, until stopped.
struct Flood {
    stop: Arc<AtomicBool>,
    /// Connections open right now, from our side.
    open: Arc<AtomicUsize>,
    /// Connections the server closed or refused so far.
    dropped: Arc<AtomicUsize>,
    thread: Option<JoinHandle<usize>>,
}

impl Flood {
    fn start(addr: SocketAddr) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (s, o, d) = (stop.clone(), open.clone(), dropped.clone());
        let thread = std::thread::spawn(move || flood(addr, &s, &o, &d));
        Flood {
            stop,
            open,
            dropped,
            thread: Some(thread),
        }
    }

    /// Stop, and return how many connections were opened in all.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn flood(addr: SocketAddr, stop: &AtomicBool, open: &AtomicUsize, dropped: &AtomicUsize) -> usize {
    let request = b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\r\n";
    let attacker: IpAddr = "127.0.0.1".parse().unwrap();
    // (connection, bytes of the request it has sent; `None` = never sends)
    let mut conns: Vec<(Option<TcpStream>, Option<usize>)> = (0..IDLE)
        .map(|_| (None, None))
        .chain((0..SLOW).map(|_| (None, Some(0))))
        .collect();
    let mut opened = 0;
    let started = Instant::now();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < FLOOD_LIMIT {
        let tick = Instant::now();
        for (conn, sent) in conns.iter_mut() {
            // Closed by the server (EOF, reset, or an answer: 503 or 408)?
            if let Some(s) = conn {
                let mut b = [0u8; 512];
                let closed = match s.read(&mut b) {
                    Ok(_) => true,
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                };
                if closed {
                    *conn = None;
                    dropped.fetch_add(1, Ordering::SeqCst);
                }
            }
            if conn.is_none() {
                if let Ok(s) = connect_from(attacker, addr) {
                    s.set_nonblocking(true).unwrap();
                    *conn = Some(s);
                    opened += 1;
                    if let Some(n) = sent {
                        *n = 0;
                    }
                }
            }
            // One more byte of the request, once a second.
            if let (Some(s), Some(n)) = (conn.as_mut(), sent.as_mut()) {
                if *n < request.len() && s.write(&request[*n..*n + 1]).is_ok_and(|w| w == 1) {
                    *n += 1;
                }
            }
        }
        open.store(
            conns.iter().filter(|c| c.0.is_some()).count(),
            Ordering::SeqCst,
        );
        // Pace the attack (this is the one-byte-a-second client, not a wait).
        while tick.elapsed() < Duration::from_secs(1) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    opened
}

/// An authenticated call from 127.0.0.2 on a connection of its own; its status, or 0
/// when there was no answer at all.
fn call(addr: SocketAddr, path: &str) -> u16 {
    let Ok(mut s) = connect_from("127.0.0.2".parse().unwrap(), addr) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    std::str::from_utf8(&resp)
        .ok()
        .and_then(|r| r.strip_prefix("HTTP/1.1 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `calls` authenticated calls, 100 ms apart, until `until` holds too (bounded);
/// returns the statuses.
fn client_calls(addr: SocketAddr, calls: usize, mut until: impl FnMut() -> bool) -> Vec<u16> {
    let started = Instant::now();
    let mut statuses = Vec::new();
    while (statuses.len() < calls || !until()) && started.elapsed() < Duration::from_secs(40) {
        let path = if statuses.len() % 2 == 0 {
            "/v1/vms"
        } else {
            "/healthz"
        };
        statuses.push(call(addr, path));
        std::thread::sleep(Duration::from_millis(100));
    }
    statuses
}

fn proc_status(pid: u32, field: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// With the default limits: the attacker gets at most its per-address share, its
/// silent and slow connections are dropped at the head deadline and it keeps coming
/// back, and every call of the client from the other address is answered.
#[test]
fn one_address_cannot_lock_out_another() {
    let roots = Roots::new("hostile");
    let m = Mergend::start(&roots, &[("MGR_API_TOKEN", TOKEN)]);
    let flood = Flood::start(m.addr);
    assert!(eventually(Duration::from_secs(20), || {
        flood.open.load(Ordering::SeqCst) > 0
    }));
    // Calls go on until the head deadline (5 s) has dropped the first slow ones and
    // the flood has opened them again.
    let statuses = client_calls(m.addr, 40, || {
        flood.dropped.load(Ordering::SeqCst) >= IDLE + SLOW
    });
    let dropped = flood.dropped.load(Ordering::SeqCst);
    let opened = flood.stop();
    eprintln!(
        "flood opened {opened} connections, {dropped} closed or refused by mergend; \
         client: {} calls",
        statuses.len()
    );
    assert!(dropped >= IDLE + SLOW, "the flood never hit a limit");
    let answered = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(
        answered,
        statuses.len(),
        "calls not answered 200: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
}

/// With limits raised so all 600 connections sit open in mergend at once: no thread
/// per connection, and the client is still answered every time.
#[test]
fn six_hundred_open_connections_cost_no_thread() {
    let roots = Roots::new("hostile-threads");
    let m = Mergend::start(
        &roots,
        &[
            ("MGR_API_TOKEN", TOKEN),
            ("MGR_HTTP_MAX_CONNECTIONS", "1000"),
            ("MGR_HTTP_MAX_CONNECTIONS_PER_IP", "1000"),
            ("MGR_HTTP_HEADER_TIMEOUT_SECONDS", "120"),
            ("MGR_HTTP_READ_TIMEOUT_SECONDS", "120"),
        ],
    );
    let before = proc_status(m.pid(), "Threads:");
    let flood = Flood::start(m.addr);
    let all_open = eventually(Duration::from_secs(30), || {
        flood.open.load(Ordering::SeqCst) == IDLE + SLOW && open_sockets(m.pid()) >= IDLE + SLOW
    });
    assert!(
        all_open,
        "flood: {} open, mergend: {} sockets",
        flood.open.load(Ordering::SeqCst),
        open_sockets(m.pid())
    );
    let statuses = client_calls(m.addr, 20, || true);
    let during = proc_status(m.pid(), "Threads:");
    let sockets = open_sockets(m.pid());
    let dropped = flood.dropped.load(Ordering::SeqCst);
    flood.stop();
    eprintln!("mergend threads: {before} before, {during} with {sockets} sockets open");
    assert_eq!(dropped, 0, "mergend closed flood connections");
    // A handler thread or two may start for the client's calls; never one per
    // connection.
    assert!(
        during <= before + 4,
        "{during} threads with 600 connections, {before} before"
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}
