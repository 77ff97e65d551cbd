//! SIGHUP swaps the certificate for new handshakes without touching open connections.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

/// Echo every connection on its own thread until the listener is dropped with the test.
fn echo_server(listener: TcpListener) {
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
}

fn round_trip(stream: &mut TlsStream, msg: &[u8]) -> Vec<u8> {
    stream
        .write_all(msg)
        .expect("writing through the forwarder");
    stream.flush().expect("flushing");
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).expect("reading the echo");
    got
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_only() {
    if !need_root("sighup_reloads_the_certificate_for_new_connections_only") {
        return;
    }
    let ns = Ns::new();
    echo_server(ns.listen(443));

    // The configured paths are symlinks into a directory the forwarder does not watch,
    // so rewriting the real files goes unnoticed until SIGHUP.
    let certs = TempDir::new("certs");
    let (real_cert, real_key) = gen_cert(&certs.path().join("real"), &[]);
    let links = certs.path().join("links");
    std::fs::create_dir_all(&links).expect("links dir");
    symlink(&real_cert, links.join("tls.crt")).expect("cert symlink");
    symlink(&real_key, links.join("tls.key")).expect("key symlink");
    let (cert_path, key_path) = (links.join("tls.crt"), links.join("tls.key"));
    let fwd = Forwarder::start(
        &[443],
        &[
            ("FWD_TLS_CERT_FILE", cert_path.to_str().expect("utf-8 path")),
            ("FWD_TLS_KEY_FILE", key_path.to_str().expect("utf-8 path")),
        ],
    );
    write_vm(
        &fwd.config_root(),
        &vm_id(),
        "2025-01-01T00:00:00Z",
        &ns,
        &[("app", "echo")],
    );
    let old_der = cert_der(&real_cert);
    let port = fwd.ports[0];

    let connect = || {
        // Until the resolver has the VM the forwarder answers with an alert.
        wait_for(Duration::from_secs(5), || {
            try_tls_connect("echo.localhost", port).ok()
        })
        .expect("connecting through the forwarder")
    };
    let mut open = connect();
    assert_eq!(peer_cert(&open), old_der);
    assert_eq!(round_trip(&mut open, b"before reload"), b"before reload");

    let (new_cert, new_key) = gen_cert(&certs.path().join("new"), &[]);
    let new_der = cert_der(&new_cert);
    assert_ne!(new_der, old_der);
    std::fs::copy(&new_key, &real_key).expect("replacing the key");
    std::fs::copy(&new_cert, &real_cert).expect("replacing the certificate");
    assert_eq!(peer_cert(&connect()), old_der, "reloaded before SIGHUP");

    fwd.child.signal(Signal::HUP);
    let reloaded = wait_for(Duration::from_secs(5), || {
        (peer_cert(&connect()) == new_der).then_some(())
    });
    assert!(
        reloaded.is_some(),
        "new handshakes still get the old certificate\n{}",
        fwd.log()
    );
    assert_eq!(
        round_trip(&mut open, b"after reload"),
        b"after reload",
        "the connection opened before the reload broke"
    );
}
