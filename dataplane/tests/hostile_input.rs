//! What hostile clients send, against a running forwarder: oversized, malformed and
//! truncated ClientHellos, wrong versions, no TLS at all, garbage after the handshake,
//! a TLS 1.3 0-RTT attempt. Each gets an alert or a clean close (never a reset, never
//! a panic) and is counted under the outcome that names it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mergen_dataplane::tls;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};

/// What the guest received on each connection, in the order they ended.
type Received = Arc<Mutex<Vec<Vec<u8>>>>;

/// A guest that echoes, and records what each connection sent it once it ends.
fn recording_echo(listener: TcpListener) -> Received {
    let received: Received = Arc::default();
    let all = Arc::clone(&received);
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let all = Arc::clone(&all);
            std::thread::spawn(move || {
                let mut sock = sock;
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.read(&mut buf) {
                    if n == 0 || sock.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = sock.shutdown(Shutdown::Write);
                all.lock().expect("records").push(got);
            });
        }
    });
    received
}

struct Setup {
    _ns: Ns,
    fwd: Forwarder,
    received: Received,
}

fn setup() -> Setup {
    let ns = Ns::new();
    let received = recording_echo(ns.listen(443));
    let fwd = Forwarder::start(&[443], &[("FWD_HANDSHAKE_TIMEOUT_SECONDS", "5")]);
    write_app_vm(&fwd.config_root(), &ns, "echo");
    let routed = poll(Duration::from_secs(5), || {
        let mut s = try_tls_connect("echo.localhost", fwd.ports[0]).ok()?;
        round_trip(&mut s, b"up").ok().filter(|got| got == b"up")
    });
    assert!(routed.is_some(), "{}", fwd.log());
    Setup {
        _ns: ns,
        fwd,
        received,
    }
}

/// How the forwarder ended a connection, as its client saw it.
#[derive(Debug, PartialEq)]
enum End {
    /// A FIN after these bytes.
    Closed(Vec<u8>),
    /// A reset, or nothing within the time limit.
    Broken(String),
}

/// Send `bytes` (then a FIN when `fin`), and read until the forwarder closes.
fn exchange(port: u16, bytes: &[u8], fin: bool) -> End {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("TCP connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    // The forwarder may refuse before it has read everything: it still reads (and
    // drops) the rest, so the writes go through.
    if let Err(e) = s.write_all(bytes) {
        return End::Broken(format!("write: {e}"));
    }
    if fin {
        s.shutdown(Shutdown::Write).expect("FIN");
    }
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => End::Closed(got),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
            End::Broken(format!("still open after 15 s, having sent {got:?}"))
        }
        Err(e) => End::Broken(format!("{e} after {got:?}")),
    }
}

/// Wait until the series `series` has counted `n` more than `before`.
fn counted(fwd: &Forwarder, series: &str, before: f64, n: f64) {
    let done = poll(Duration::from_secs(10), || {
        (fwd.metric_answered(series) >= before + n).then_some(())
    });
    assert!(
        done.is_some(),
        "{series} did not count {n}:\n{}",
        fwd.metrics()
    );
}

fn outcome_series(fwd: &Forwarder, outcome: &str) -> String {
    format!(
        r#"mergen_forwarder_connections_total{{listener="127.0.0.1:{}",outcome="{outcome}"}}"#,
        fwd.ports[0]
    )
}

fn reason_series(reason: &str) -> String {
    format!(r#"mergen_forwarder_handshake_failures_total{{reason="{reason}"}}"#)
}

/// A TLS record of `content_type` around `payload`, with record version `version`.
fn record(content_type: u8, version: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![content_type];
    out.extend(version.to_be_bytes());
    out.extend((payload.len() as u16).to_be_bytes());
    out.extend(payload);
    out
}

/// A handshake message of `kind` around `body`.
fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = body.len() as u32;
    let mut out = vec![kind];
    out.extend(&len.to_be_bytes()[1..]);
    out.extend(body);
    out
}

/// A ClientHello offering only TLS 1.0 (no supported_versions), with SNI `name`.
fn tls10_hello(name: &str) -> Vec<u8> {
    let mut body = vec![0x03, 0x01];
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    body.extend([0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // AES128-SHA, AES256-SHA
    body.extend([0x01, 0x00]); // null compression
    let mut list = vec![0u8]; // host_name
    list.extend((name.len() as u16).to_be_bytes());
    list.extend(name.as_bytes());
    let mut server_name = (list.len() as u16).to_be_bytes().to_vec();
    server_name.extend(list);
    let mut extensions = 0u16.to_be_bytes().to_vec();
    extensions.extend((server_name.len() as u16).to_be_bytes());
    extensions.extend(server_name);
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    record(0x16, 0x0301, &handshake(1, &body))
}

/// A ticketer that makes none, so a server resumes from its session cache.
#[derive(Debug)]
struct StatefulOnly;

impl rustls::server::ProducesTickets for StatefulOnly {
    fn enabled(&self) -> bool {
        false
    }

    fn lifetime(&self) -> u32 {
        0
    }

    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

const DECODE_ERROR: [u8; 7] = [0x15, 3, 3, 0, 2, 2, 50];

#[test]
fn hostile_client_hellos_get_an_alert_or_a_clean_close() {
    require_root!();
    // `_ns` is bound, not `..`: the namespace must outlive the test.
    let Setup { _ns, mut fwd, .. } = setup();
    let port = fwd.ports[0];
    let failed = outcome_series(&fwd, "handshake_failed");
    let bad_request = outcome_series(&fwd, "bad_request");

    // 64 KiB of ClientHello, over four records: refused by its declared length.
    let before = (
        fwd.metric_answered(&failed),
        fwd.metric_answered(&reason_series("too_large")),
    );
    let mut big = handshake(1, &vec![0u8; 64 * 1024 - 4]);
    big = big
        .chunks(16 * 1024)
        .flat_map(|c| record(0x16, 0x0301, c))
        .collect();
    assert_eq!(
        exchange(port, &big, true),
        End::Closed(DECODE_ERROR.to_vec())
    );
    counted(&fwd, &failed, before.0, 1.0);
    counted(&fwd, &reason_series("too_large"), before.1, 1.0);

    // Malformed: a hello too short for its own fields, a ServerHello, a bad record
    // version inside the hello, a zero-length record.
    let before = (
        fwd.metric_answered(&failed),
        fwd.metric_answered(&reason_series("malformed")),
    );
    let mut full = client_hello("echo.localhost");
    full[9..12].copy_from_slice(&[0, 0, 9]); // the hello's length: 9 bytes
    let mut second_record_bad = record(0x16, 0x0301, &full[5..40]);
    second_record_bad.extend(record(0x16, 0x0200, &full[40..]));
    let cases = [
        record(0x16, 0x0301, &handshake(1, &[3, 3, 1, 2])),
        record(0x16, 0x0303, &handshake(2, &[0u8; 40])),
        second_record_bad,
        record(0x16, 0x0301, &[]),
    ];
    for case in &cases {
        assert_eq!(
            exchange(port, case, true),
            End::Closed(DECODE_ERROR.to_vec()),
            "{case:?}"
        );
    }
    counted(&fwd, &failed, before.0, cases.len() as f64);
    counted(
        &fwd,
        &reason_series("malformed"),
        before.1,
        cases.len() as f64,
    );

    // Truncated: half a hello, then the client leaves.
    let before = (
        fwd.metric_answered(&failed),
        fwd.metric_answered(&reason_series("client_closed")),
    );
    let hello = client_hello("echo.localhost");
    assert_eq!(
        exchange(port, &hello[..hello.len() / 2], true),
        End::Closed(Vec::new())
    );
    counted(&fwd, &failed, before.0, 1.0);
    counted(&fwd, &reason_series("client_closed"), before.1, 1.0);

    // Wrong versions: TLS 1.0 only (rustls answers protocol_version), and an SSLv2
    // hello (not TLS to us).
    let before = (
        fwd.metric_answered(&failed),
        fwd.metric_answered(&reason_series("tls")),
    );
    match exchange(port, &tls10_hello("echo.localhost"), true) {
        End::Closed(alert) => assert_eq!(alert[..2], [0x15, 3], "{alert:?}"),
        broken => panic!("TLS 1.0: {broken:?}"),
    }
    counted(&fwd, &failed, before.0, 1.0);
    counted(&fwd, &reason_series("tls"), before.1, 1.0);
    let before = (
        fwd.metric_answered(&bad_request),
        fwd.metric_answered(&reason_series("not_tls")),
    );
    let sslv2 = [
        0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
    ];
    assert_eq!(exchange(port, &sslv2, true), End::Closed(Vec::new()));

    // Not TLS at all: plain HTTP on the TLS port.
    let http = b"GET / HTTP/1.1\r\nHost: echo.localhost\r\n\r\n";
    assert_eq!(exchange(port, http, false), End::Closed(Vec::new()));
    counted(&fwd, &bad_request, before.0, 2.0);
    counted(&fwd, &reason_series("not_tls"), before.1, 2.0);

    assert!(fwd.child.0.try_wait().expect("try_wait").is_none());
    assert!(!fwd.log().contains("panicked"), "{}", fwd.log());
}

/// Records that do not decrypt after a completed handshake: rustls' alert, a FIN, and
/// `tls_error`; the guest got only what came before.
#[test]
fn garbage_after_the_handshake_is_a_tls_error() {
    require_root!();
    let Setup { _ns, fwd, received } = setup();
    let errors = outcome_series(&fwd, "tls_error");
    let before = fwd.metric_answered(&errors);
    let mut s = tls_connect("echo.localhost", fwd.ports[0]);
    assert_eq!(round_trip(&mut s, b"fine").expect("echo"), b"fine");
    let garbage = record(0x17, 0x0303, &[0xa5; 64]);
    s.sock.write_all(&garbage).expect("garbage");
    let mut tail = Vec::new();
    let ended = s.sock.read_to_end(&mut tail);
    assert!(ended.is_ok(), "not a clean close: {ended:?}");
    assert!(
        tail.first() == Some(&0x17),
        "no (encrypted) alert: {tail:?}"
    );
    counted(&fwd, &errors, before, 1.0);
    let guest_saw = poll(Duration::from_secs(5), || {
        received
            .lock()
            .expect("records")
            .iter()
            .find(|r| r.as_slice() == b"fine")
            .cloned()
    });
    assert!(
        guest_saw.is_some(),
        "{:?}",
        received.lock().expect("records")
    );
}

/// A TLS 1.3 client that tries 0-RTT, with a ticket from another server that allowed
/// early data: the forwarder accepts no early data, so the handshake goes on in full,
/// the early bytes never reach the guest, and the client resends them (`ok`).
#[test]
fn a_0rtt_attempt_is_rejected_and_its_data_never_reaches_the_guest() {
    require_root!();
    let Setup { _ns, fwd, received } = setup();
    let ok = outcome_series(&fwd, "ok");
    let before = fwd.metric_answered(&ok);

    // A server that issues tickets allowing 16 KiB of early data, for the same name.
    let dir = TempDir::new("early");
    let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
    tls::generate_self_signed("", "localhost", &cert, &key).expect("certificate");
    let store = tls::CertStore::load(&cert, &key).expect("store");
    let mut lenient = (*tls::server_config(&store, &[]).expect("config")).clone();
    lenient.max_early_data_size = 16 * 1024;
    // rustls allows 0-RTT only with stateful resumption (RFC 8446 8.1): no tickets.
    lenient.ticketer = Arc::new(StatefulOnly);
    let lenient = Arc::new(lenient);
    let ticket_server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let ticket_addr = ticket_server.local_addr().expect("addr");
    let serving = std::thread::spawn(move || {
        let (sock, _) = ticket_server.accept().expect("accept");
        let mut tls = StreamOwned::new(ServerConnection::new(lenient).expect("server"), sock);
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).expect("ping");
        tls.write_all(b"pong").expect("pong");
        tls.conn.send_close_notify();
        let _ = tls.flush();
    });
    let mut config = mergen_testkit::tls::accept_any_client_config();
    config.enable_early_data = true;
    let config = Arc::new(config);
    let name = ServerName::try_from("echo.localhost").expect("a name");
    let sock = TcpStream::connect(ticket_addr).expect("connect");
    let mut first = StreamOwned::new(
        ClientConnection::new(Arc::clone(&config), name.clone()).expect("client"),
        sock,
    );
    first.write_all(b"ping").expect("ping");
    let mut pong = Vec::new();
    let _ = first.read_to_end(&mut pong);
    assert_eq!(pong, b"pong");
    serving.join().expect("ticket server");

    // To the forwarder, with early data.
    let sock = TcpStream::connect(("127.0.0.1", fwd.ports[0])).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut conn = ClientConnection::new(config, name).expect("client");
    let mut early = conn
        .early_data()
        .expect("the client offers early data with this ticket");
    early.write_all(b"EARLY-DATA").expect("early data");
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("handshake");
    }
    assert!(!stream.conn.is_early_data_accepted());
    assert_eq!(round_trip(&mut stream, b"late").expect("echo"), b"late");
    stream.conn.send_close_notify();
    stream.flush().expect("close_notify");
    stream.sock.shutdown(Shutdown::Write).expect("FIN");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    counted(&fwd, &ok, before, 1.0);
    let records = received.lock().expect("records").clone();
    assert!(records.iter().any(|r| r == b"late"), "{records:?}");
    assert!(
        !records.iter().any(|r| r.windows(5).any(|w| w == b"EARLY")),
        "early data reached the guest: {records:?}"
    );
}
