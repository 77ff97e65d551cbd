//! TLS 1.2 and 1.3 through the engine, and session resumption (TLS 1.2 session ids or
//! tickets with openssl, TLS 1.3 tickets with rustls).

mod common;

use std::process::{Command, Stdio};

use common::*;
use rustls::HandshakeKind;

#[test]
fn tls13_ticket_resumption() {
    require_root!();
    let (_ns, fwd) = echo_vm(&[]);
    let config = client_config();
    let mut first =
        tls_connect_with(config.clone(), "echo.localhost", fwd.ports[0]).expect("first");
    assert_eq!(
        first.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(first.conn.handshake_kind(), Some(HandshakeKind::Full));
    // The round trip makes the client read the tickets sent after the handshake.
    assert_eq!(
        round_trip(&mut first, b"one").expect("reading the echo"),
        b"one"
    );
    let mut second = tls_connect_with(config, "echo.localhost", fwd.ports[0]).expect("second");
    assert_eq!(second.conn.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(
        round_trip(&mut second, b"two").expect("reading the echo"),
        b"two"
    );
}

#[test]
fn tls12_with_openssl_and_resumption() {
    require_root!();
    let (_ns, fwd) = echo_vm(&[]);
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
