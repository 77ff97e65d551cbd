//! TLS 1.2 and 1.3 through the engine, and session resumption (TLS 1.2 session ids or
//! tickets with openssl, TLS 1.3 tickets with rustls).

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rustls::HandshakeKind;

fn echo_vm() -> (Ns, Forwarder) {
    let ns = Ns::new();
    let listener = ns.listen(443);
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut sock = sock;
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.read(&mut buf) {
                    if n == 0 || sock.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let fwd = Forwarder::start(&[443], &[]);
    write_vm(
        &fwd.config_root(),
        &vm_id(),
        "2025-01-01T00:00:00Z",
        &ns,
        &[("app", "echo")],
    );
    let routed = wait_for(Duration::from_secs(5), || {
        try_tls_connect("echo.localhost", fwd.ports[0]).ok()
    });
    assert!(routed.is_some(), "never routable: {}", fwd.log());
    (ns, fwd)
}

fn echo(stream: &mut TlsStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).expect("write");
    stream.flush().expect("flush");
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).expect("read the echo");
    got
}

#[test]
fn tls13_ticket_resumption() {
    if !need_root("tls13_ticket_resumption") {
        return;
    }
    let (_ns, fwd) = echo_vm();
    let config = client_config();
    let mut first =
        tls_connect_with(config.clone(), "echo.localhost", fwd.ports[0]).expect("first");
    assert_eq!(
        first.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(first.conn.handshake_kind(), Some(HandshakeKind::Full));
    // The round trip makes the client read the tickets sent after the handshake.
    assert_eq!(echo(&mut first, b"one"), b"one");
    let mut second = tls_connect_with(config, "echo.localhost", fwd.ports[0]).expect("second");
    assert_eq!(second.conn.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(echo(&mut second, b"two"), b"two");
}

#[test]
fn tls12_with_openssl_and_resumption() {
    if !need_root("tls12_with_openssl_and_resumption") {
        return;
    }
    let (_ns, fwd) = echo_vm();
    let sess = fwd.dir.path().join("tls12.session");
    let s_client = |extra: &[&str]| {
        let out = run(Command::new("openssl")
            .args([
                "s_client",
                "-tls1_2",
                "-servername",
                "echo.localhost",
                "-connect",
            ])
            .arg(format!("127.0.0.1:{}", fwd.ports[0]))
            .args(extra)
            .stdin(Stdio::null()));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = s_client(&["-sess_out", sess.to_str().expect("utf-8")]);
    assert!(first.contains("Protocol  : TLSv1.2"), "{first}");
    assert!(first.contains("New, TLSv1.2"), "{first}");
    let second = s_client(&["-sess_in", sess.to_str().expect("utf-8")]);
    assert!(second.contains("Reused, TLSv1.2"), "{second}");
}
