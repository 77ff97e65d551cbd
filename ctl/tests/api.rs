//! Every endpoint and every error code of mergend, with curl against a running daemon.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{try_curl, Mergend, Roots, ORIGINAL_SUMMARY_FIELDS};
use mergen_testkit::eventually;
use serde_json::Value;

/// Send `request` raw and read the answer until the server closes the connection.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id in response").to_string()
}

#[test]
fn healthz_help_and_unknown_paths() {
    let roots = Roots::new("health");
    let m = Mergend::start(&roots, &[]);
    let (code, body) = m.curl("GET", "/healthz", &[]);
    assert_eq!((code, body.trim()), (200, r#"{"status":"ok"}"#));
    let (code, body) = m.get_json("/nope");
    assert_eq!(code, 404);
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].as_str().unwrap().contains("/nope"));
    let (code, _) = m.get_json("/v1/vms/x/y/z");
    assert_eq!(code, 404);

    let out = std::process::Command::new(common::BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for var in [
        "MGR_HTTP_ADDR",
        "127.0.0.1:8080",
        "MGR_HTTP_SOCKET",
        "MGR_API_TOKEN",
        "MGR_ALLOW_INSECURE",
        "MGR_SHUTDOWN_TIMEOUT_SECONDS",
        "MGR_IMAGE_ROOTS",
        "MGR_GUEST_CIDR",
        "MGR_PORT_START",
        "MGR_LOG_FORMAT",
    ] {
        assert!(help.contains(var), "--help lacks {var}");
    }
}

#[test]
fn create_get_list_delete_with_the_original_files() {
    let roots = Roots::new("crud");
    let m = Mergend::start(&roots, &[]);
    let (code, v) = m.create(&roots.body_with(
        r#","ports":[{"guest":80,"host":0},{"guest":22,"host":0,"protocol":"udp"}],"tags":{"app":"app1"},"metadata":{"team":"core"},"extraEnv":{"FOO":"it's"},"vcpu":2,"memMiB":256"#,
    ));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["status"], "created");
    let a = id_of(&v);
    let cfg = roots.config().join(&a);

    // The files, as the original wrote them.
    let meta: Value =
        serde_json::from_slice(&std::fs::read(cfg.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["id"], a.as_str());
    assert_eq!(meta["guestIP"], "172.30.0.2");
    assert_eq!(meta["tapName"], format!("tap-{}", &a[..8]));
    assert_eq!(meta["netns"], format!("mergen-{}", &a[..8]));
    assert_eq!(meta["ports"][0]["host"], 20000);
    assert_eq!(meta["ports"][1]["host"], 20001);
    assert_eq!(meta["ports"][1]["protocol"], "udp");
    assert_eq!(
        meta["paths"]["lockPath"],
        roots.run().join(format!("{a}.lock")).display().to_string()
    );
    assert!(
        !cfg.join("hooks.json").exists(),
        "hooks.json only when the request had hooks"
    );
    let vmj: Value = serde_json::from_slice(&std::fs::read(cfg.join("vm.json")).unwrap()).unwrap();
    assert_eq!(
        vmj["boot-source"]["boot_args"],
        "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.2::172.30.0.1:255.255.255.0::eth0:off"
    );
    assert_eq!(vmj["machine-config"]["vcpu_count"], 2);
    assert_eq!(vmj["machine-config"]["mem_size_mib"], 256);
    assert_eq!(
        vmj["network-interfaces"][0]["guest_mac"]
            .as_str()
            .unwrap()
            .len(),
        17
    );
    let raw = std::fs::read_to_string(cfg.join("meta.json")).unwrap();
    assert!(
        raw.starts_with("{\n  \"id\"") && raw.ends_with("}\n"),
        "pretty JSON"
    );
    let env = std::fs::read_to_string(cfg.join("env")).unwrap();
    assert!(env.contains(&format!("MGN_VM_ID='{a}'\n")));
    assert!(env.contains("MGN_PUBLISH_80='20000/tcp'\n"));
    assert!(env.contains("MGN_PUBLISH_22='20001/udp'\n"));
    assert!(
        env.starts_with("FOO='it'\\''s'\n"),
        "sorted with the rest: {env}"
    );
    assert!(roots.data().join(&a).join("logs").is_dir());
    assert!(roots.run().join(&a).is_dir());

    // A second VM with its own boot args and hooks; it is listed first (newest).
    let (code, v) = m.create(&roots.body_with(
        r#","bootArgs":"console=ttyS0 init=/init","hooks":{"onStop":[{"type":"exec","cmd":["true"]}]}"#,
    ));
    assert_eq!(code, 201, "{v}");
    let b = id_of(&v);
    let vmj: Value =
        serde_json::from_slice(&std::fs::read(roots.config().join(&b).join("vm.json")).unwrap())
            .unwrap();
    assert_eq!(
        vmj["boot-source"]["boot_args"],
        "console=ttyS0 init=/init ip=172.30.0.3::172.30.0.1:255.255.255.0::eth0:off"
    );
    assert!(roots.config().join(&b).join("hooks.json").exists());

    let (code, list) = m.get_json("/v1/vms");
    assert_eq!(code, 200);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], b.as_str());
    assert_eq!(items[1]["id"], a.as_str());

    let (code, s) = m.get_json(&format!("/v1/vms/{a}"));
    assert_eq!(code, 200);
    for field in ORIGINAL_SUMMARY_FIELDS {
        assert!(s.get(field).is_some(), "summary lacks {field}: {s}");
    }
    assert_eq!(s["network"]["guestIP"], "172.30.0.2");
    assert_eq!(s["network"]["tapName"], format!("tap-{}", &a[..8]));
    assert_eq!(s["firecracker"]["socketPresent"], false);
    assert_eq!(s["metadata"]["team"], "core");
    assert_eq!(s["state"], "stopped");

    // Delete: gone from disk and from the API; retainData keeps the data dir.
    let (code, body) = m.curl("DELETE", &format!("/v1/vms/{a}"), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"deleted\""));
    assert!(!roots.config().join(&a).exists() && !roots.data().join(&a).exists());
    assert!(!roots.run().join(format!("{a}.lock")).exists());
    let (code, _) = m.curl("DELETE", &format!("/v1/vms/{a}"), &[]);
    assert_eq!(code, 404);
    let (code, e) = m.get_json(&format!("/v1/vms/{a}"));
    assert_eq!((code, e["error"].as_str()), (404, Some("not_found")));
    let (code, _) = m.curl("DELETE", &format!("/v1/vms/{b}?retainData=true"), &[]);
    assert_eq!(code, 200);
    assert!(!roots.config().join(&b).exists());
    assert!(
        roots.data().join(&b).is_dir(),
        "retainData keeps the data dir"
    );

    // The freed address is handed out again.
    let (_, v) = m.create(&roots.body());
    let c = id_of(&v);
    let (_, s) = m.get_json(&format!("/v1/vms/{c}"));
    assert_eq!(s["network"]["guestIP"], "172.30.0.2");

    // Ids must be UUIDs.
    let (code, e) = m.get_json("/v1/vms/not-a-uuid");
    assert_eq!((code, e["error"].as_str()), (400, Some("bad_request")));
    let (code, _) = m.curl("POST", "/v1/vms/..%2F..%2Fetc/start", &[]);
    assert_eq!(code, 400);
    let (code, _) = m.curl(
        "POST",
        "/v1/vms/00000000-0000-4000-8000-000000000000/start",
        &[],
    );
    assert_eq!(code, 404);
}

#[test]
fn validation_errors_name_the_field() {
    let roots = Roots::new("valid");
    let outside = roots.dir.join("outside.img");
    std::fs::write(&outside, b"x").unwrap();
    std::os::unix::fs::symlink(&outside, roots.img().join("link.img")).unwrap();
    let m = Mergend::start(&roots, &[]);
    let img = roots.img();
    let k = img.join("vmlinux").display().to_string();
    let cases: Vec<(String, &str)> = vec![
        (roots.body_with(r#","bogus":1"#), "bogus"),
        (roots.body_with(r#","vcpu":"two""#), "vcpu"),
        (
            roots.body_with(r#","ports":[{"guest":"x"}]"#),
            "ports[0].guest",
        ),
        (
            roots.body_with(r#","ports":[{"guest":80,"extra":1}]"#),
            "extra",
        ),
        (
            roots.body_with(
                r#","hooks":{"onCreate":[{"type":"exec","cmd":["true"],"strikt":true}]}"#,
            ),
            "strikt",
        ),
        (roots.body_with(r#","vcpu":0"#), "vcpu"),
        (roots.body_with(r#","memMiB":64"#), "memMiB"),
        (
            roots.body_with(r#","ports":[{"guest":0}]"#),
            "ports[0].guest",
        ),
        (
            roots.body_with(r#","ports":[{"guest":80,"host":70000}]"#),
            "ports[0].host",
        ),
        (
            roots.body_with(r#","ports":[{"guest":80,"protocol":"sctp"}]"#),
            "protocol",
        ),
        (
            roots.body_with(r#","ports":[{"guest":80,"host":30000},{"guest":81,"host":30000}]"#),
            "repeated",
        ),
        (roots.body_with(r#","hooks":{"onBoot":[]}"#), "onBoot"),
        (
            roots.body_with(r#","hooks":{"onCreate":[{"type":"http","url":"https://x/"}]}"#),
            "https",
        ),
        (roots.body_with(r#","extraEnv":{"A B":"x"}"#), "extraEnv"),
        (roots.body_with(r#","process":{"cmd":[]}"#), "process.cmd"),
        (format!(r#"{{"kernel":"{k}"}}"#), "rootfs"),
        (
            format!(r#"{{"rootfs":"/etc/passwd","kernel":"{k}"}}"#),
            "outside the allowed image roots",
        ),
        (
            format!(
                r#"{{"rootfs":"{}","kernel":"{k}"}}"#,
                img.join("link.img").display()
            ),
            "outside the allowed image roots",
        ),
        (
            format!(r#"{{"rootfs":"{}","kernel":"{k}"}}"#, img.display()),
            "not a regular file",
        ),
        (
            format!(r#"{{"rootfs":"{}/missing","kernel":"{k}"}}"#, img.display()),
            "rootfs",
        ),
        ("[1,2]".to_string(), "invalid request body"),
        (String::new(), "invalid request body"),
        (roots.body() + "x", "invalid request body"),
    ];
    for (body, needle) in &cases {
        let (code, v) = m.create(body);
        assert_eq!(code, 400, "{body} -> {v}");
        assert_eq!(v["error"], "bad_request");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: message {msg:?} lacks {needle:?}"
        );
    }
    assert!(roots.vm_dirs().is_empty(), "a rejected create wrote files");
    // A process VM needs no kernel or rootfs.
    let (code, v) = m.create(&format!(
        r#"{{"process":{{"cmd":["sleep","1"],"workdir":"{}"}}}}"#,
        roots.dir.display()
    ));
    assert_eq!(code, 201, "{v}");
    let id = id_of(&v);
    assert!(!roots.config().join(&id).join("vm.json").exists());
    let meta: Value =
        serde_json::from_slice(&std::fs::read(roots.config().join(&id).join("meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["process"]["cmd"][0], "sleep");
}

#[test]
fn protocol_errors_405_408_413_431_501_chunked_bodies_and_keep_alive() {
    let roots = Roots::new("proto");
    let m = Mergend::start(&roots, &[("MGR_HTTP_READ_TIMEOUT_SECONDS", "1")]);

    let out = std::process::Command::new("curl")
        .args(["-s", "-i", "-X", "PUT", &m.url("/v1/vms")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.contains("Allow: GET, POST"), "{text}");
    assert!(text.contains(r#""error":"method_not_allowed""#));
    let (code, _) = m.curl("DELETE", "/healthz", &[]);
    assert_eq!(code, 405);

    // A chunked create, as `curl -H 'Transfer-Encoding: chunked'` sends it.
    let file = roots.dir.join("create.json");
    std::fs::write(&file, roots.body()).unwrap();
    let chunked = |arg: &str| {
        m.curl(
            "POST",
            "/v1/vms",
            &["-H", "Transfer-Encoding: chunked", "--data-binary", arg],
        )
    };
    let (code, body) = chunked(&format!("@{}", file.display()));
    assert_eq!(code, 201, "{body}");
    assert_eq!(roots.vm_dirs().len(), 1);

    // Over 1 MiB, chunked or not: 413, and nothing written.
    let big = roots.dir.join("big.json");
    std::fs::write(&big, vec![b' '; 1024 * 1024 + 1]).unwrap();
    let arg = format!("@{}", big.display());
    let (code, body) = m.curl("POST", "/v1/vms", &["--data-binary", &arg]);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("payload_too_large"));
    let (code, body) = chunked(&arg);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("payload_too_large"));
    assert_eq!(roots.vm_dirs().len(), 1);

    // A transfer coding other than chunked is not implemented.
    let resp = exchange(
        m.addr,
        b"POST /v1/vms HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 501"), "{resp}");
    assert!(resp.contains("not_implemented"), "{resp}");

    let huge = format!("X-Big: {}", "a".repeat(17 * 1024));
    let (code, body) = m.curl("GET", "/healthz", &["-H", &huge]);
    assert_eq!(code, 431, "{body}");
    assert!(body.contains("header_too_large"));

    // A slow client: half a request, then silence.
    let resp = exchange(m.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("request_timeout") && resp.contains("Connection: close"));

    // Keep-alive: two requests, pipelined, on one connection.
    let resp = exchange(m.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");

    // Garbage is a 400, not a dropped connection.
    let resp = exchange(m.addr, b"\x01\x02 nonsense\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[test]
fn bearer_token_guards_v1_only() {
    let roots = Roots::new("auth");
    let m = Mergend::start(&roots, &[("MGR_API_TOKEN", "s3cret")]);
    let (code, body) = m.curl("GET", "/v1/vms", &[]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("unauthorized"));
    let (code, _) = m.curl("GET", "/v1/vms", &["-H", "Authorization: Bearer wrong"]);
    assert_eq!(code, 401);
    let (code, _) = m.curl("POST", "/v1/vms", &["--data-binary", &roots.body()]);
    assert_eq!(code, 401);
    assert!(roots.vm_dirs().is_empty());
    let (code, _) = m.curl("GET", "/v1/vms", &["-H", "Authorization: Bearer s3cret"]);
    assert_eq!(code, 200);
    let (code, _) = m.curl("GET", "/healthz", &[]);
    assert_eq!(code, 200);
}

#[test]
fn refuses_an_open_address_without_a_token() {
    let roots = Roots::new("insecure");
    let mut env = common::env_for(&roots);
    env.retain(|(k, _)| k != "MGR_HTTP_ADDR");
    let out = std::process::Command::new(common::BIN)
        .env_clear()
        .envs(env)
        .env("MGR_HTTP_ADDR", "0.0.0.0:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MGR_API_TOKEN") && err.contains("MGR_ALLOW_INSECURE"),
        "{err}"
    );
}

/// `MGR_HTTP_ADDR=:PORT`, as the original took it: every IPv4 and IPv6 address.
#[test]
fn an_empty_host_listens_on_ipv4_and_ipv6() {
    let roots = Roots::new("dualstack");
    let m = Mergend::start(&roots, &[("MGR_HTTP_ADDR", ":0"), ("MGR_API_TOKEN", "t")]);
    let port = m.addr.port();
    let (code, _) = try_curl(&[&format!("http://127.0.0.1:{port}/healthz")]).unwrap();
    assert_eq!(code, 200);
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let (code, _) = try_curl(&[&format!("http://[::1]:{port}/healthz")]).unwrap();
        assert_eq!(code, 200);
    } else {
        eprintln!("no IPv6 loopback on this host: checked IPv4 only");
    }
}

#[test]
fn lock_held_is_409_and_no_supervisor_is_503() {
    if std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd") {
        eprintln!("SKIP: lock_held_is_409_and_no_supervisor_is_503 needs a host where systemd is not PID 1");
        return;
    }
    let roots = Roots::new("lock");
    let m = Mergend::start(&roots, &[("MGR_SUPERVISOR", "systemd")]);
    let (_, v) = m.create(&roots.body());
    let id = id_of(&v);

    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(roots.run().join(format!("{id}.lock")))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    for (method, path) in [
        ("POST", format!("/v1/vms/{id}/start")),
        ("POST", format!("/v1/vms/{id}/stop")),
        ("DELETE", format!("/v1/vms/{id}")),
    ] {
        let (code, body) = m.curl(method, &path, &[]);
        assert_eq!(code, 409, "{method} {path}: {body}");
        assert!(body.contains("\"conflict\""));
    }
    drop(lock);

    let (code, body) = m.curl("POST", &format!("/v1/vms/{id}/start"), &[]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("dependency_unavailable"));
    // The lock was released on the error path: a second try is 503 again, not 409.
    let (code, _) = m.curl("POST", &format!("/v1/vms/{id}/stop"), &[]);
    assert_eq!(code, 503);
    let (_, s) = m.get_json(&format!("/v1/vms/{id}"));
    assert_eq!(s["state"], "stopped");
    assert_eq!(s["systemd"]["available"], false);
    assert_eq!(s["supervisor"]["active"], false);
    let (code, _) = m.curl("DELETE", &format!("/v1/vms/{id}"), &[]);
    assert_eq!(code, 200);
}

#[test]
fn metrics_unix_socket_connection_cap_and_graceful_shutdown() {
    let roots = Roots::new("misc");
    let sock = roots.dir.join("api.sock");
    let sock_s = sock.display().to_string();
    let mut m = Mergend::start(
        &roots,
        &[
            ("MGR_HTTP_SOCKET", &sock_s),
            ("MGR_HTTP_MAX_CONNECTIONS", "2"),
        ],
    );
    let (code, body) = try_curl(&["--unix-socket", &sock_s, "http://mergend/healthz"]).unwrap();
    assert_eq!((code, body.trim()), (200, r#"{"status":"ok"}"#));
    let (code, _) = m.create(&roots.body());
    assert_eq!(code, 201);

    let (code, text) = m.curl("GET", "/metrics", &[]);
    assert_eq!(code, 200);
    assert!(
        text.contains(r#"mergend_http_requests_total{route="/healthz",status="200"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mergend_http_requests_total{route="/v1/vms",status="201"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"mergend_vms{state="stopped"} 1"#), "{text}");
    assert!(text.contains("# TYPE mergend_hook_runs_total counter"));

    // Two idle connections fill the cap; a third client is served, and the oldest
    // idle connection was closed to make room (refusals with 503, when every
    // connection is busy, are tested in the http crate).
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(m.addr).unwrap())
        .collect();
    let (code, _) = m.curl("GET", "/healthz", &[]);
    assert_eq!(code, 200);
    held[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(matches!(held[0].read(&mut [0u8; 16]), Ok(0)));
    drop(held);
    assert!(eventually(Duration::from_secs(10), || {
        try_curl(&[&m.url("/healthz")]).is_ok_and(|(c, _)| c == 200)
    }));

    // SIGTERM: a clean exit, the socket file removed.
    let idle = TcpStream::connect(m.addr).unwrap();
    m.signal(rustix::process::Signal::TERM);
    let st = m
        .wait_exit(Duration::from_secs(10))
        .expect("mergend exits on SIGTERM");
    assert!(st.success(), "{st:?}: {}", m.log_text());
    assert!(!sock.exists());
    drop(idle);
}

#[test]
fn a_missing_systemd_unit_is_503_dependency_unavailable() {
    // A systemctl that talks to a systemd without the mergen@ template, as on a host
    // where deploy/install.sh never ran: the original answered 503, not 500.
    let roots = Roots::new("nounit");
    let systemctl = roots.dir.join("systemctl");
    std::fs::write(
        &systemctl,
        "#!/bin/sh\ncase \"$1\" in\n\
         start|stop) echo \"Failed to $1 $2: Unit $2 not found.\" >&2; exit 5;;\n\
         show) shift; shift; for u in \"$@\"; do printf 'Id=%s\\nActiveState=inactive\\nSubState=dead\\nMainPID=0\\n\\n' \"$u\"; done;;\n\
         esac\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&systemctl)
        .status()
        .unwrap();
    let m = Mergend::start(
        &roots,
        &[
            ("MGR_SUPERVISOR", "systemd"),
            ("MGR_SYSTEMCTL_PATH", &systemctl.to_string_lossy()),
        ],
    );
    let (_, v) = m.create(&roots.body());
    let id = id_of(&v);
    let (code, body) = m.curl("POST", &format!("/v1/vms/{id}/start"), &[]);
    assert_eq!(code, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "dependency_unavailable", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("not installed"),
        "{v}"
    );
}
