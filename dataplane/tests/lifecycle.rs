//! Limits, timeouts, graceful shutdown, startup errors and the command line.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rustix::process::Signal;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};

/// The connection is over: EOF or an error other than a read timeout.
fn ended(stream: &mut impl Read) -> bool {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn over_max_connections_is_refused() {
    require_root!();
    let (_ns, fwd) = echo_vm(&[("FWD_MAX_CONNECTIONS", "1")]);
    let port = fwd.ports[0];
    // The readiness probe's connection may still be closing: wait until one fits.
    let mut first = poll(Duration::from_secs(5), || {
        let mut s = try_tls_connect("echo.localhost", port).ok()?;
        round_trip(&mut s, b"one").ok().map(|_| s)
    })
    .expect("the first connection");
    let mut second = TcpStream::connect(("127.0.0.1", port)).expect("TCP connect");
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(ended(&mut second), "the second connection was not closed");
    assert!(
        fwd.metric(&format!(
            r#"mergen_forwarder_connections_total{{listener="127.0.0.1:{port}",outcome="refused"}}"#
        )) >= 1.0
    );
    assert_eq!(
        round_trip(&mut first, b"still here").expect("first survives"),
        b"still here"
    );
    drop(first);
    let third = poll(Duration::from_secs(5), || {
        try_tls_connect("echo.localhost", port).ok()
    });
    assert!(third.is_some(), "a slot never freed up");
}

#[test]
fn silent_client_hits_the_handshake_timeout() {
    require_root!();
    let fwd = Forwarder::start(&[443], &[("FWD_HANDSHAKE_TIMEOUT_SECONDS", "1")]);
    let mut sock = TcpStream::connect(("127.0.0.1", fwd.ports[0])).expect("TCP connect");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(ended(&mut sock), "a client that says nothing was kept open");
    let counted = poll(Duration::from_secs(2), || {
        (fwd.metric(r#"mergen_forwarder_handshake_failures_total{reason="timeout"}"#) == 1.0)
            .then_some(())
    });
    assert!(counted.is_some(), "{}", fwd.metrics());
}

#[test]
fn idle_connection_is_closed() {
    require_root!();
    let (_ns, fwd) = echo_vm(&[("FWD_IDLE_TIMEOUT_SECONDS", "1")]);
    let mut s = tls_connect("echo.localhost", fwd.ports[0]);
    assert_eq!(round_trip(&mut s, b"ping").expect("round trip"), b"ping");
    s.sock
        .set_read_timeout(Some(Duration::from_secs(6)))
        .expect("timeout");
    assert!(
        ended(&mut s),
        "an idle connection outlived the idle timeout"
    );
}

#[test]
fn sigterm_stops_accepting_and_drains_open_connections() {
    require_root!();
    let (_ns, mut fwd) = echo_vm(&[("FWD_SHUTDOWN_TIMEOUT_SECONDS", "30")]);
    let port = fwd.ports[0];
    let mut open = tls_connect("echo.localhost", port);
    fwd.child.signal(Signal::TERM);
    let refused = poll(Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    });
    assert!(refused.is_some(), "still accepting after SIGTERM");
    assert_eq!(
        round_trip(&mut open, b"draining").expect("open one works"),
        b"draining"
    );
    assert!(
        fwd.child.0.try_wait().expect("try_wait").is_none(),
        "exited before the drain"
    );
    drop(open);
    let status = poll(Duration::from_secs(5), || {
        fwd.child.0.try_wait().ok().flatten()
    });
    let status = status.expect("did not exit after its last connection closed");
    assert!(status.success(), "{status:?}\n{}", fwd.log());
}

#[test]
fn drain_deadline_closes_what_is_left() {
    require_root!();
    let (_ns, mut fwd) = echo_vm(&[("FWD_SHUTDOWN_TIMEOUT_SECONDS", "1")]);
    let mut open = tls_connect("echo.localhost", fwd.ports[0]);
    open.sock
        .set_read_timeout(Some(Duration::from_secs(8)))
        .expect("timeout");
    fwd.child.signal(Signal::INT);
    assert!(
        ended(&mut open),
        "the open connection outlived the drain deadline"
    );
    let status = poll(Duration::from_secs(5), || {
        fwd.child.0.try_wait().ok().flatten()
    });
    assert!(status.expect("still running after the drain").success());
}

/// Run the forwarder expecting it to exit by itself; returns (exit code, stderr).
fn expect_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = TempDir::new("exit");
    let err_path = dir.path().join("stderr");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut cmd = Command::new(FORWARDER);
    cmd.args(args)
        .env("FWD_ADMIN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("FWD_CONFIG_ROOT", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = ChildGuard::spawn(&mut cmd);
    let status = poll(Duration::from_secs(10), || {
        child.0.try_wait().ok().flatten()
    })
    .expect("the forwarder kept running");
    (
        status.code(),
        std::fs::read_to_string(err_path).unwrap_or_default(),
    )
}

#[test]
fn startup_errors_are_one_line_and_exit_1() {
    let certs = TempDir::new("certs");
    let (cert, key) = gen_cert(certs.path(), &[]);
    let (cert, key) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().expect("addr").port();
    let cases = [
        (
            "guest port not allowed",
            vec![
                ("FWD_LISTENERS", format!("127.0.0.1:{}=8443", free_port())),
                ("FWD_TLS_CERT_FILE", cert.into()),
                ("FWD_TLS_KEY_FILE", key.into()),
            ],
            "8443",
        ),
        (
            "missing certificate",
            vec![
                ("FWD_LISTENERS", format!("127.0.0.1:{}=443", free_port())),
                ("FWD_TLS_CERT_FILE", "/nonexistent/mergen.crt".into()),
                ("FWD_TLS_KEY_FILE", key.into()),
            ],
            "/nonexistent/mergen.crt",
        ),
        (
            "port in use",
            vec![
                ("FWD_LISTENERS", format!("127.0.0.1:{busy_port}=443")),
                ("FWD_TLS_CERT_FILE", cert.into()),
                ("FWD_TLS_KEY_FILE", key.into()),
            ],
            "cannot listen",
        ),
    ];
    for (what, env, needle) in cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, stderr) = expect_exit(&[], &env);
        assert_eq!(code, Some(1), "{what}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: expected one line, got {stderr:?}");
        assert!(
            lines[0].starts_with("mergen-forwarder: "),
            "{what}: {stderr}"
        );
        assert!(lines[0].contains(needle), "{what}: {stderr}");
    }
    drop(busy);
}

#[test]
fn help_lists_every_setting() {
    let out = run_ok(Command::new(FORWARDER).arg("--help"));
    let text = String::from_utf8_lossy(&out.stdout);
    for var in [
        "FWD_CONFIG_ROOT",
        "FWD_NETNS_ROOT",
        "FWD_TLS_CERT_FILE",
        "FWD_TLS_KEY_FILE",
        "FWD_DOMAIN_PREFIX",
        "FWD_DOMAIN_SUFFIX",
        "FWD_LISTENERS",
        "FWD_HTTPS_ADDR",
        "FWD_ALLOWED_GUEST_PORTS",
        "FWD_DIAL_TIMEOUT_SECONDS",
        "FWD_HANDSHAKE_TIMEOUT_SECONDS",
        "FWD_IDLE_TIMEOUT_SECONDS",
        "FWD_RESOLVER_CACHE_TTL_SECONDS",
        "FWD_SHUTDOWN_TIMEOUT_SECONDS",
        "FWD_MAX_CONNECTIONS",
        "FWD_MAX_CONNECTIONS_PER_IP",
        "FWD_WORKERS",
        "FWD_ADMIN_ADDR",
        "FWD_LOG_LEVEL",
        "FWD_LOG_FORMAT",
    ] {
        assert!(text.contains(var), "--help does not mention {var}");
    }
    // Every listener kind and the option, with what each does.
    for word in [
        "https ",
        "postgres ",
        "tls ",
        "raw ",
        "proxy-v2 ",
        "httpPort",
        "--rsa",
    ] {
        assert!(text.contains(word), "--help does not explain {word:?}");
    }
    let (code, stderr) = expect_exit(&["--bogus"], &[]);
    assert_eq!(code, Some(1), "{stderr}");
}

#[test]
fn gen_cert_writes_a_wildcard_pair() {
    let dir = TempDir::new("gencert");
    let (cert, key) = gen_cert(dir.path(), &[("FWD_DOMAIN_SUFFIX", "example.com")]);
    assert!(cert.ends_with("wildcard.example.com.crt"));
    assert!(std::fs::read_to_string(&cert)
        .expect("cert")
        .contains("BEGIN CERTIFICATE"));
    assert!(std::fs::read_to_string(&key)
        .expect("key")
        .contains("PRIVATE KEY"));
    let (code, stderr) = expect_exit(&["gen-cert"], &[]);
    assert_eq!(code, Some(1), "gen-cert without --out-dir: {stderr}");
    for bad in [&["--days", "0"][..], &["--days", "soon"], &["--ecdsa"]] {
        let mut args = vec!["gen-cert", "--out-dir", "/tmp"];
        args.extend_from_slice(bad);
        let (code, stderr) = expect_exit(&args, &[]);
        assert_eq!(code, Some(1), "{bad:?}: {stderr}");
        assert!(stderr.contains(bad[0]), "{bad:?}: {stderr}");
    }
}

/// The original script's names (`wildcard.<prefix.>suffix`), its two key kinds, the
/// validity asked for, and the forwarder's own domain settings as the defaults.
#[test]
fn gen_cert_names_keys_and_days() {
    let dir = TempDir::new("gencert");
    let text = |args: &[&str]| {
        let out = run_ok(Command::new("openssl").args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run_ok(
        Command::new(FORWARDER)
            .args(["gen-cert", "--out-dir"])
            .arg(dir.path())
            .args([
                "--prefix",
                "VM",
                "--suffix",
                "example.com",
                "--rsa",
                "--days",
                "30",
            ]),
    );
    let cert = dir.join("wildcard.vm.example.com.crt");
    let key = dir.join("wildcard.vm.example.com.key");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}\n{}\n", cert.display(), key.display())
    );
    let c = cert.to_str().expect("utf-8");
    let info = text(&["x509", "-noout", "-text", "-in", c]);
    assert!(info.contains("Public-Key: (2048 bit)"), "{info}");
    assert!(info.contains("rsaEncryption"), "{info}");
    assert!(
        info.contains("DNS:*.vm.example.com, DNS:vm.example.com"),
        "{info}"
    );
    assert!(text(&[
        "rsa",
        "-check",
        "-noout",
        "-in",
        key.to_str().expect("utf-8")
    ])
    .contains("RSA key ok"));
    let days = |n: u32| {
        Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-checkend",
                &(n * 86400).to_string(),
                "-in",
                c,
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("openssl")
            .success()
    };
    assert!(days(29) && !days(31), "not valid for 30 days");

    // Without --prefix/--suffix: FWD_DOMAIN_PREFIX/SUFFIX, so the files are the ones
    // the forwarder loads by default.
    let out = run_ok(
        Command::new(FORWARDER)
            .args(["gen-cert", "--out-dir"])
            .arg(dir.path())
            .env("FWD_DOMAIN_PREFIX", "apps")
            .env("FWD_DOMAIN_SUFFIX", "Example.org."),
    );
    let cert = dir.join("wildcard.apps.example.org.crt");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&cert.display().to_string()));
    let info = text(&[
        "x509",
        "-noout",
        "-text",
        "-in",
        cert.to_str().expect("utf-8"),
    ]);
    assert!(
        info.contains("prime256v1"),
        "ECDSA P-256 by default: {info}"
    );
    assert!(info.contains("DNS:*.apps.example.org"), "{info}");
}

#[test]
fn a_second_forwarder_on_the_same_port_fails_to_start() {
    let first = Forwarder::start(&[443], &[]);
    let (code, stderr) = expect_exit(
        &[],
        &[
            (
                "FWD_LISTENERS",
                &format!("127.0.0.1:{}=443", first.ports[0]),
            ),
            ("FWD_TLS_CERT_FILE", first.cert.to_str().expect("utf-8")),
            ("FWD_TLS_KEY_FILE", first.key.to_str().expect("utf-8")),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
}

/// A TLS client for SNI `host` connected to `addr`, handshake done.
fn tls_connect_to(addr: SocketAddr, host: &str) -> std::io::Result<TlsStream> {
    let name = ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
    let conn = ClientConnection::new(client_config(), name).map_err(std::io::Error::other)?;
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

#[test]
fn an_empty_host_listens_on_ipv4_and_ipv6() {
    require_root!();
    let ns = Ns::new();
    echo_server(ns.listen(443));
    let port = free_port();
    let fwd = Forwarder::start(&[443], &[("FWD_LISTENERS", &format!(":{port}=443"))]);
    write_app_vm(&fwd.config_root(), &ns, "echo");
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let routed = poll(Duration::from_secs(5), || {
        let mut s = tls_connect_to(v4, "echo.localhost").ok()?;
        round_trip(&mut s, b"v4").ok()
    });
    assert_eq!(routed.as_deref(), Some(&b"v4"[..]), "{}", fwd.log());
    let mut s = tls_connect_to(v6, "echo.localhost")
        .unwrap_or_else(|e| panic!("TLS via {v6}: {e}\n{}", fwd.log()));
    assert_eq!(
        round_trip(&mut s, b"v6").expect("round trip over ::1"),
        b"v6"
    );
    drop(s);
    let ok = format!(r#"mergen_forwarder_connections_total{{listener=":{port}",outcome="ok"}}"#);
    let counted = poll(Duration::from_secs(5), || {
        (fwd.metric(&ok) >= 2.0).then_some(())
    });
    assert!(counted.is_some(), "{}", fwd.metrics());
}
