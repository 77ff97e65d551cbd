//! SIGHUP swaps the certificate for new handshakes without touching open connections.

mod common;

use std::os::unix::fs::symlink;
use std::time::Duration;

use common::*;
use rustix::process::Signal;

#[test]
fn sighup_reloads_the_certificate_for_new_connections_only() {
    require_root!();
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
    write_app_vm(&fwd.config_root(), &ns, "echo");
    let old_der = cert_der(&real_cert);
    let port = fwd.ports[0];

    let connect = || {
        // Until the resolver has the VM the forwarder answers with an alert.
        poll(Duration::from_secs(5), || {
            try_tls_connect("echo.localhost", port).ok()
        })
        .expect("connecting through the forwarder")
    };
    let mut open = connect();
    assert_eq!(peer_cert(&open), old_der);
    assert_eq!(
        round_trip(&mut open, b"before reload").expect("echo before the reload"),
        b"before reload"
    );

    let (new_cert, new_key) = gen_cert(&certs.path().join("new"), &[]);
    let new_der = cert_der(&new_cert);
    assert_ne!(new_der, old_der);
    std::fs::copy(&new_key, &real_key).expect("replacing the key");
    std::fs::copy(&new_cert, &real_cert).expect("replacing the certificate");
    assert_eq!(peer_cert(&connect()), old_der, "reloaded before SIGHUP");

    fwd.child.signal(Signal::HUP);
    let reloaded = poll(Duration::from_secs(5), || {
        (peer_cert(&connect()) == new_der).then_some(())
    });
    assert!(
        reloaded.is_some(),
        "new handshakes still get the old certificate\n{}",
        fwd.log()
    );
    assert_eq!(
        round_trip(&mut open, b"after reload").expect("echo after the reload"),
        b"after reload",
        "the connection opened before the reload broke"
    );
}
