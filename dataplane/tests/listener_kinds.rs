//! Listener kinds and options end to end: PROXY v2 read by a real nginx, the SNI in
//! its TLV, the VM's `httpPort` and `FWD_HTTPS_ADDR`, raw listeners without a
//! certificate, host names in `FWD_LISTENERS`, keepalive on both legs.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A plain HTTP/1.0 GET on `port` (a raw listener); the whole response.
fn http_over_raw(port: u16) -> std::io::Result<(SocketAddr, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let me = s.local_addr()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: raw\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok((me, resp))
}

/// nginx with `listen ... proxy_protocol` behind a raw and an https listener, both
/// `+proxy-v2`: its log shows each client's own address and port, not the forwarder's.
#[test]
fn proxy_v2_gives_nginx_the_clients_address() {
    require_root!();
    let ns = Ns::new();
    let web = Nginx::start_with(&ns, 80, true, "behind-proxy-v2");
    let fwd = Forwarder::start_targets(
        &["80/raw+proxy-v2", "80/https+proxy-v2"],
        &[("FWD_ALLOWED_GUEST_PORTS", "80")],
        |_| {},
    );
    write_app_vm(&fwd.config_root(), &ns, "web");
    let (raw, https) = (fwd.ports[0], fwd.ports[1]);

    let (client, resp) = poll(Duration::from_secs(5), || {
        http_over_raw(raw)
            .ok()
            .filter(|(_, r)| r.contains("behind-proxy-v2"))
    })
    .unwrap_or_else(|| panic!("no answer through the raw listener: {}", fwd.log()));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (code, body) = curl("web.localhost", https);
    assert_eq!((code.as_str(), body.trim()), ("200", "behind-proxy-v2"));

    // `$proxy_protocol_addr:$proxy_protocol_port $remote_addr`: the client, then the
    // peer nginx saw (the forwarder's socket in the guest's namespace). The readiness
    // probe's lines (curl --haproxy-protocol, from the guest address) come first.
    let through_us = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.starts_with("127.0.0.1:"))
            .map(str::to_string)
            .collect()
    };
    let lines = poll(Duration::from_secs(5), || {
        let lines = through_us(&web.access_log());
        (lines.len() >= 2).then_some(lines)
    })
    .unwrap_or_else(|| panic!("nginx logged {:?}", web.access_log()));
    assert_eq!(
        lines[0],
        format!("127.0.0.1:{} {}", client.port(), ns.ip),
        "{lines:?}"
    );
    assert!(lines[1].ends_with(&format!(" {}", ns.ip)), "{lines:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
}

/// PROXY v2 on a TLS listener names the SNI the client asked for
/// (`PP2_TYPE_AUTHORITY`), read here by a guest that parses the header itself (the
/// packaged nginx, 1.22, has no variable for TLVs).
#[test]
fn the_sni_reaches_the_guest_in_the_proxy_header() {
    require_root!();
    let ns = Ns::new();
    let guest = ns.listen(6379);
    let fwd = Forwarder::start_targets(&["6379/tls+proxy-v2"], &[], |_| {});
    write_app_vm(&fwd.config_root(), &ns, "cache");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = guest.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut fixed = [0u8; 16];
        s.read_exact(&mut fixed).expect("the fixed part");
        let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let mut rest = vec![0u8; len];
        s.read_exact(&mut rest).expect("addresses and TLVs");
        let mut first = [0u8; 4];
        s.read_exact(&mut first).expect("the client's bytes");
        s.write_all(b"+OK\r\n").expect("reply");
        (fixed, rest, first)
    });
    let mut tls = poll(Duration::from_secs(5), || {
        try_tls_connect("cache.localhost", fwd.ports[0]).ok()
    })
    .unwrap_or_else(|| panic!("no handshake: {}", fwd.log()));
    let me = tls.sock.local_addr().expect("local addr");
    assert_eq!(round_trip(&mut tls, b"PING").expect("reply"), b"+OK\r");
    let (fixed, rest, first) = reader.join().expect("guest");
    assert_eq!(&fixed[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(fixed[12..14], [0x21, 0x11], "v2 PROXY, TCP over IPv4");
    assert_eq!(&rest[0..4], &Ipv4Addr::LOCALHOST.octets(), "source address");
    assert_eq!(
        &rest[4..8],
        &Ipv4Addr::LOCALHOST.octets(),
        "destination address"
    );
    assert_eq!(u16::from_be_bytes([rest[8], rest[9]]), me.port());
    assert_eq!(u16::from_be_bytes([rest[10], rest[11]]), fwd.ports[0]);
    let tlv = &rest[12..];
    assert_eq!(tlv[0], 0x02, "PP2_TYPE_AUTHORITY");
    let n = u16::from_be_bytes([tlv[1], tlv[2]]) as usize;
    assert_eq!(&tlv[3..3 + n], b"cache.localhost");
    assert_eq!(&first, b"PING");
}

/// The original's later version: a VM's `httpPort` is where https listeners send it,
/// `FWD_HTTPS_ADDR` adds such a listener, and a VM without one is dialed on the
/// listener's guest port.
#[test]
fn https_listeners_follow_the_vms_http_port() {
    require_root!();
    let (ns1, ns2, ns3) = (Ns::new(), Ns::new(), Ns::new());
    let _app = Nginx::start(&ns1, 3000, "from-http-port-3000");
    let _plain = Nginx::start(&ns2, 443, "from-guest-port-443");
    let https_port = free_port();
    let https_addr = format!("127.0.0.1:{https_port}");
    let fwd = Forwarder::start_targets(
        &["443", "443/tls"],
        &[("FWD_HTTPS_ADDR", &https_addr)],
        |_| {},
    );
    let root = fwd.config_root();
    write_app_vm_with_http_port(&root, &ns1, "app", 3000);
    write_app_vm(&root, &ns2, "plain");
    // Nothing listens on its httpPort: the https listener's 502.
    write_app_vm_with_http_port(&root, &ns3, "down", 3999);
    let routed = poll(Duration::from_secs(5), || {
        (curl("down.localhost", fwd.ports[0]).0 == "502").then_some(())
    });
    assert!(routed.is_some(), "{}", fwd.log());
    for port in [fwd.ports[0], https_port] {
        let (code, body) = curl("app.localhost", port);
        assert_eq!((code.as_str(), body.trim()), ("200", "from-http-port-3000"));
        let (code, body) = curl("plain.localhost", port);
        assert_eq!((code.as_str(), body.trim()), ("200", "from-guest-port-443"));
        assert_eq!(curl("down.localhost", port).0, "502");
    }
    // A tls listener keeps its own guest port whatever the VM says.
    let mut s = tls_connect("app.localhost", fwd.ports[1]);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("request");
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp);
    assert!(
        resp.is_empty(),
        "the tls listener reached port 3000: {resp}"
    );
    let log = fwd.log();
    assert!(
        log.contains(&format!("listening on {https_addr}=443/https")),
        "{log}"
    );
}

/// Raw listeners only: the forwarder starts without any certificate and serves.
#[test]
fn raw_listeners_need_no_certificate() {
    require_root!();
    let ns = Ns::new();
    echo_server(ns.listen(22));
    let fwd = Forwarder::start_targets(
        &["22/raw"],
        &[
            ("FWD_TLS_CERT_FILE", "/nonexistent/mergen.crt"),
            ("FWD_TLS_KEY_FILE", "/nonexistent/mergen.key"),
        ],
        |_| {},
    );
    write_untagged_vm(&fwd.config_root(), &ns, "2025-01-01T00:00:00Z");
    let echoed = poll(Duration::from_secs(5), || {
        let mut s = TcpStream::connect(("127.0.0.1", fwd.ports[0])).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"raw bytes").ok()?;
        let mut got = [0u8; 9];
        s.read_exact(&mut got).ok()?;
        Some(got)
    });
    assert_eq!(echoed.as_ref().map(|b| &b[..]), Some(&b"raw bytes"[..]));
    assert!(!fwd.log().contains("/nonexistent"), "{}", fwd.log());
}

/// `localhost:PORT=443`: the name is resolved at start, the log says to what.
#[test]
fn listeners_may_name_a_host() {
    require_root!();
    let ns = Ns::new();
    echo_server(ns.listen(443));
    let port = free_port();
    let fwd = Forwarder::start(
        &[443],
        &[("FWD_LISTENERS", &format!("localhost:{port}=443"))],
    );
    write_app_vm(&fwd.config_root(), &ns, "echo");
    let mut s = poll(Duration::from_secs(5), || {
        try_tls_connect("echo.localhost", port).ok()
    })
    .unwrap_or_else(|| panic!("nothing on 127.0.0.1:{port}: {}", fwd.log()));
    assert_eq!(round_trip(&mut s, b"named").expect("echo"), b"named");
    assert!(
        fwd.log()
            .contains(&format!("listening on 127.0.0.1:{port}=443/https")),
        "{}",
        fwd.log()
    );
}

/// The sockets of an established connection, as `ss -tno` shows them: `filter` in
/// ss's syntax, run in `ns` (the guest's namespace) or the host's.
fn ss(ns: Option<&Ns>, filter: &str) -> String {
    let mut cmd = match ns {
        Some(ns) => ns.command("ss"),
        None => Command::new("ss"),
    };
    let out = run(cmd.args(["-tnoH", "state", "established"]).arg(filter));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Both legs of a connection have TCP keepalive armed: the client's socket (accepted
/// on the listener) and the guest's (dialed in the VM's namespace).
#[test]
fn keepalive_on_both_legs() {
    require_root!();
    let (ns, fwd) = echo_vm(&[]);
    let mut s = tls_connect("echo.localhost", fwd.ports[0]);
    assert_eq!(round_trip(&mut s, b"alive").expect("echo"), b"alive");
    // ss shows the one timer that runs: a retransmit timer while bytes are unacked,
    // the keepalive timer once the connection is quiet.
    let armed = |ns: Option<&Ns>, filter: &str| {
        poll(Duration::from_secs(5), || {
            ss(ns, filter).contains("timer:(keepalive,").then_some(())
        })
        .is_some()
    };
    let client_leg = format!("( sport = :{} )", fwd.ports[0]);
    assert!(
        armed(None, &client_leg),
        "client leg: {:?}",
        ss(None, &client_leg)
    );
    // In the guest's namespace: the forwarder's socket is the one to the guest's port.
    let guest_leg = "( dport = :443 )";
    assert!(
        armed(Some(&ns), guest_leg),
        "guest leg: {:?}",
        ss(Some(&ns), guest_leg)
    );
    drop(s);
}
