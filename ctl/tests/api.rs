//! Every endpoint and every error code of mergend, with curl against a running daemon.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{try_curl, Mergend, Roots, ORIGINAL_SUMMARY_FIELDS};
use mergen_testkit::{eventually, metric_value};
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

/// Started by `ip netns exec` (a mount namespace of its own), mergend says that the VM
/// namespaces it makes may be unusable elsewhere; started normally, it does not.
#[test]
fn a_private_mount_namespace_is_warned_about() {
    const WARNING: &str = "does not pass its mounts back";
    let roots = Roots::new("mounts");
    let m = Mergend::start_private_mounts(&roots, &[]);
    assert!(m.log_text().contains(WARNING), "{}", m.log_text());
    drop(m);
    // Only meaningful where this test's own mounts are no slave of another namespace's.
    let own = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if !own.contains(" master:") {
        let m = Mergend::start(&roots, &[]);
        assert!(!m.log_text().contains(WARNING), "{}", m.log_text());
    }
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
            roots.body_with(r#","hooks":{"onCreate":[{"type":"http","url":"ftp://x/"}]}"#),
            "http:// or https://",
        ),
        (
            roots.body_with(r#","hooks":{"onCreate":[{"type":"exec","cmd":["echo","{{.ID"]}]}"#),
            "template",
        ),
        (
            roots
                .body_with(r#","hooks":{"onCreate":[{"type":"exec","cmd":["echo","{{.Nope}}"]}]}"#),
            "can't evaluate field Nope",
        ),
        (
            roots.body_with(r#","hooks":{"onCreate":[{"type":"exec","cmd":["{{if .ID}}x"]}]}"#),
            "hooks.onCreate[0]",
        ),
        (
            roots.body_with(r#","hooks":{"onCreate":[{"type":"smtp"}]}"#),
            "hook type",
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
    // A process another test forked while the lock was open holds it until it execs
    // (close-on-exec): wait until the lock is free before counting on it.
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::File::open(roots.run().join(format!("{id}.lock"))).is_ok_and(|f| {
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
        })
    }));

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
    // ... and /metrics counted it (later curls may have closed more idle ones).
    let (_, text) = m.curl("GET", "/metrics", &[]);
    let value = |series: &str| {
        metric_value(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert!(value(r#"mergend_http_connections_evicted_total{cap="total"}"#) >= 1.0);
    assert_eq!(
        value(r#"mergend_http_connections_refused_total{cap="total"}"#),
        0.0
    );
    assert!(value("mergend_http_connections_accepted_total") >= 5.0);
    assert!(value("mergend_http_connections_open") >= 1.0);

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

/// `?retainData=` is Go's `strconv.ParseBool`: `True` and `1` keep the data dir,
/// anything else (`yes`, a typo) is 400 and deletes nothing.
#[test]
fn retain_data_parses_like_go_and_refuses_the_rest() {
    let roots = Roots::new("retain");
    let m = Mergend::start(&roots, &[]);
    for (query, keeps) in [("True", true), ("1", true), ("0", false), ("F", false)] {
        let (_, v) = m.create(&roots.body());
        let id = id_of(&v);
        let data = roots.data().join(&id);
        std::fs::write(data.join("disk.img"), b"precious").unwrap();
        for bad in ["yes", "ture"] {
            let (code, body) = m.curl("DELETE", &format!("/v1/vms/{id}?retainData={bad}"), &[]);
            assert_eq!(code, 400, "retainData={bad}: {body}");
            assert!(body.contains("bad_request") && body.contains("retainData"));
            assert!(
                roots.config().join(&id).is_dir(),
                "retainData={bad} deleted the VM"
            );
            assert!(
                data.join("disk.img").is_file(),
                "retainData={bad} deleted the data"
            );
        }
        let (code, body) = m.curl("DELETE", &format!("/v1/vms/{id}?retainData={query}"), &[]);
        assert_eq!(code, 200, "retainData={query}: {body}");
        assert!(!roots.config().join(&id).exists());
        assert_eq!(data.join("disk.img").is_file(), keeps, "retainData={query}");
    }
}

/// One trailing slash routes as in the original: `POST /v1/vms/` creates, and
/// `/v1/vms/`, `/v1/vms/<id>/`, `/v1/vms/<id>/start/` are the same resources.
#[test]
fn trailing_slash_routes_as_the_original() {
    let roots = Roots::new("slash");
    let m = Mergend::start(&roots, &[]);
    let (code, out) = m.curl(
        "POST",
        "/v1/vms/",
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &roots.body(),
        ],
    );
    assert_eq!(code, 201, "{out}");
    let id = id_of(&serde_json::from_str(&out).unwrap());
    let (code, list) = m.get_json("/v1/vms/");
    assert_eq!(code, 200);
    assert_eq!(list["items"][0]["id"], id.as_str());
    let (code, one) = m.get_json(&format!("/v1/vms/{id}/"));
    assert_eq!((code, one["id"].as_str()), (200, Some(id.as_str())));
    let (code, _) = m.get_json("/healthz/");
    assert_eq!(code, 200);
    // Two slashes are not one.
    let (code, _) = m.get_json(&format!("/v1/vms/{id}//"));
    assert_eq!(code, 404);
    let (code, body) = m.curl("DELETE", &format!("/v1/vms/{id}/"), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(roots.vm_dirs().is_empty());
}

/// Files 0640 and directories 0750, as the original, whatever the umask (hook headers
/// may hold tokens): checked under umask 000 and 077.
#[test]
fn files_are_0640_and_dirs_0750_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    for umask in ["000", "077"] {
        let roots = Roots::new(&format!("modes-{umask}"));
        let m = Mergend::start_umask(&roots, &[], umask);
        let (code, v) = m.create(&roots.body_with(
            r#","hooks":{"onStop":[{"type":"http","url":"http://127.0.0.1:9/","headers":{"Authorization":"Bearer t"}}]}"#,
        ));
        assert_eq!(code, 201, "{v}");
        let id = id_of(&v);
        let cfg = roots.config().join(&id);
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .permissions()
                .mode()
                & 0o7777
        };
        for f in ["vm.json", "meta.json", "hooks.json", "env"] {
            assert_eq!(mode(&cfg.join(f)), 0o640, "umask {umask}: {f}");
        }
        assert_eq!(
            mode(&roots.run().join(format!("{id}.lock"))),
            0o640,
            "umask {umask}: lock file"
        );
        for d in [
            cfg.clone(),
            roots.data().join(&id),
            roots.data().join(&id).join("logs"),
            roots.run().join(&id),
        ] {
            assert_eq!(mode(&d), 0o750, "umask {umask}: {}", d.display());
        }
    }
}

/// A meta.json the model cannot read still reserves its guest IP and host ports; one
/// that is not even JSON refuses creates with a 500 naming the file. A meta.json
/// written by the Go version (hook type in other case, unknown keys) keeps its VM
/// visible.
#[test]
fn damaged_or_foreign_meta_json_never_lets_addresses_collide() {
    let roots = Roots::new("damaged");
    let m = Mergend::start(&roots, &[]);
    let (_, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"host":0}]"#));
    let a = id_of(&v);
    let meta_a = roots.config().join(&a).join("meta.json");
    let text = std::fs::read_to_string(&meta_a).unwrap();
    // Damaged so that the model refuses it: a creation time that is no time.
    let damaged = text.replacen("\"createdAt\": \"", "\"createdAt\": \"yesterday ", 1);
    assert_ne!(damaged, text);
    std::fs::write(&meta_a, &damaged).unwrap();

    let (code, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"host":0}]"#));
    assert_eq!(code, 201, "{v}");
    let b = id_of(&v);
    let meta_b: Value =
        serde_json::from_slice(&std::fs::read(roots.config().join(&b).join("meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta_b["guestIP"], "172.30.0.3", "A's IP stays reserved");
    assert_eq!(meta_b["ports"][0]["host"], 20001, "A's port stays reserved");
    // An explicit request for A's port is a conflict too.
    let (code, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"host":20000}]"#));
    assert_eq!(code, 409, "{v}");

    // Not even JSON: creates are refused, naming the file, and nothing is written.
    std::fs::write(&meta_a, &text[..text.len() / 2]).unwrap();
    let before = roots.vm_dirs();
    let (code, v) = m.create(&roots.body());
    assert_eq!(code, 500, "{v}");
    assert_eq!(v["error"], "internal_error");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains(&meta_a.display().to_string()), "{msg}");
    assert_eq!(roots.vm_dirs(), before);

    // Written by the Go version: hook type "HTTP", keys this version does not know.
    let go = text
        .replacen("\"id\":", "\"goOnlyField\": {\"x\": 1},\n  \"id\":", 1)
        .replacen(
            "\"paths\":",
            "\"hooks\": {\n    \"onStop\": [\n      {\n        \"type\": \"HTTP\",\n        \"url\": \"http://127.0.0.1:9/\",\n        \"retries\": 3\n      }\n    ]\n  },\n  \"paths\":",
            1,
        );
    std::fs::write(&meta_a, &go).unwrap();
    let (code, s) = m.get_json(&format!("/v1/vms/{a}"));
    assert_eq!(code, 200, "{s}");
    let (_, list) = m.get_json("/v1/vms");
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&a.as_str()) && ids.contains(&b.as_str()),
        "{ids:?}"
    );
    let (code, v) = m.create(&roots.body());
    assert_eq!(code, 201, "{v}");
}

/// A published port cannot capture a host service: a requested port outside
/// MGR_PORT_START..=MGR_PORT_END is 400 unless MGR_ALLOW_PORTS_OUTSIDE_RANGE=1, and a
/// port a host process listens on (TCP or UDP, any address, IPv4 or IPv6) is 409 with
/// the reason, asked for or not.
#[test]
fn published_ports_never_capture_host_services() {
    use std::net::{TcpListener, UdpSocket};
    let roots = Roots::new("hostports");
    // A real TCP listener on IPv6 loopback and a UDP socket on IPv4 loopback, inside
    // the range given to mergend.
    let tcp = TcpListener::bind("[::1]:0")
        .or_else(|_| TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let tport = tcp.local_addr().unwrap().port();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let uport = udp.local_addr().unwrap().port();
    let (lo, hi) = (tport.min(uport), tport.max(uport));
    let (start, end) = (lo.to_string(), hi.max(lo + 1).to_string());
    let m = Mergend::start(
        &roots,
        &[("MGR_PORT_START", &start), ("MGR_PORT_END", &end)],
    );

    let ask = |host: u16, proto: &str| {
        m.create(&roots.body_with(&format!(
            r#","ports":[{{"guest":80,"host":{host},"protocol":"{proto}"}}]"#
        )))
    };
    let (code, v) = ask(tport, "tcp");
    assert_eq!((code, v["error"].as_str()), (409, Some("conflict")), "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("{tport}/tcp")) && msg.contains("host process"),
        "{msg}"
    );
    let (code, v) = ask(uport, "udp");
    assert_eq!(code, 409, "{v}");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains(&format!("{uport}/udp")));
    // Mergend's own API port: outside the range (400), or a listener's (409).
    let own = m.addr.port();
    let (code, v) = ask(own, "tcp");
    let want = if (lo..=hi.max(lo + 1)).contains(&own) {
        409
    } else {
        400
    };
    assert_eq!(code, want, "{v}");
    assert!(roots.vm_dirs().is_empty());
    // host: 0 skips the host's ports: with the listener on one end of the range, the
    // automatic port is a free one.
    if tport != uport {
        let (code, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"host":0}]"#));
        assert_eq!(code, 201, "{v}");
        let meta: Value = serde_json::from_slice(
            &std::fs::read(roots.config().join(id_of(&v)).join("meta.json")).unwrap(),
        )
        .unwrap();
        assert_ne!(meta["ports"][0]["host"], tport);
    }
    drop(m);

    // Outside the range when allowed: still never a listener's port.
    let roots = Roots::new("hostports-open");
    let m = Mergend::start(&roots, &[("MGR_ALLOW_PORTS_OUTSIDE_RANGE", "1")]);
    let (code, v) =
        m.create(&roots.body_with(&format!(r#","ports":[{{"guest":80,"host":{tport}}}]"#)));
    assert_eq!((code, v["error"].as_str()), (409, Some("conflict")), "{v}");
    let (code, v) = m.create(&roots.body_with(&format!(
        r#","ports":[{{"guest":80,"host":{}}}]"#,
        m.addr.port()
    )));
    assert_eq!(code, 409, "mergend's own port: {v}");
    drop(tcp);
    drop(udp);
    let free = mergen_testkit::free_port();
    let (code, v) =
        m.create(&roots.body_with(&format!(r#","ports":[{{"guest":80,"host":{free}}}]"#)));
    assert_eq!(code, 201, "{v}");
}

/// A loop device, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn new(backing: &std::path::Path) -> LoopDevice {
        std::fs::write(backing, vec![0u8; 1 << 20]).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// Block devices (LVM volumes) are accepted for rootfs and dataDisk when inside
/// MGR_IMAGE_ROOTS or listed in MGR_IMAGE_DEVICES, and stored as given (a symlink
/// such as /dev/vg/lv is resolved only for the check). Never for the kernel.
#[test]
fn block_devices_as_disks_inside_roots_or_listed() {
    if !mergen_testkit::skip_unless_root("block_devices_as_disks_inside_roots_or_listed") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let roots = Roots::new("blockdev");
    let dev = LoopDevice::new(&roots.dir.join("backing.img"));
    let kernel = roots.img().join("vmlinux").display().to_string();
    let rootfs = roots.img().join("rootfs.ext4").display().to_string();
    // A symlink in the image root to the device, as /dev/vg/lv is to /dev/dm-N.
    let link = roots.img().join("lv-data");
    std::os::unix::fs::symlink(&dev.0, &link).unwrap();
    let link = link.display().to_string();
    // A device node inside the image root itself.
    let rdev = std::fs::metadata(&dev.0).unwrap().rdev();
    let node = roots.img().join("disk0");
    let made = std::process::Command::new("mknod")
        .arg(&node)
        .arg("b")
        .arg(rustix::fs::major(rdev).to_string())
        .arg(rustix::fs::minor(rdev).to_string())
        .status()
        .unwrap();
    assert!(made.success());
    let node = node.display().to_string();
    let body = |root: &str, data: &str| {
        format!(r#"{{"rootfs":"{root}","kernel":"{kernel}","dataDisk":"{data}"}}"#)
    };

    let m = Mergend::start(&roots, &[]);
    // Outside the roots and not listed: refused, naming both settings.
    for data in [dev.0.as_str(), link.as_str()] {
        let (code, v) = m.create(&body(&rootfs, data));
        assert_eq!(code, 400, "{v}");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains("MGR_IMAGE_ROOTS") && msg.contains("MGR_IMAGE_DEVICES"),
            "{msg}"
        );
    }
    // Never a kernel.
    let (code, v) = m.create(&format!(r#"{{"rootfs":"{rootfs}","kernel":"{node}"}}"#));
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("block device"));
    // Inside the image root: accepted as rootfs and as dataDisk, stored as given.
    let (code, v) = m.create(&body(&node, &node));
    assert_eq!(code, 201, "{v}");
    let cfg = roots.config().join(id_of(&v));
    let meta: Value =
        serde_json::from_slice(&std::fs::read(cfg.join("meta.json")).unwrap()).unwrap();
    assert_eq!(
        (meta["rootfs"].as_str(), meta["dataDisk"].as_str()),
        (Some(node.as_str()), Some(node.as_str()))
    );
    drop(m);

    // Listed: accepted through its symlink, and the symlink is what is stored.
    let m = Mergend::start(
        &roots,
        &[("MGR_IMAGE_DEVICES", &format!("/dev/nonexistent:{}", dev.0))],
    );
    for data in [dev.0.as_str(), link.as_str()] {
        let (code, v) = m.create(&body(&rootfs, data));
        assert_eq!(code, 201, "{data}: {v}");
        let cfg = roots.config().join(id_of(&v));
        let meta: Value =
            serde_json::from_slice(&std::fs::read(cfg.join("meta.json")).unwrap()).unwrap();
        assert_eq!(meta["dataDisk"], data);
        let vmj: Value =
            serde_json::from_slice(&std::fs::read(cfg.join("vm.json")).unwrap()).unwrap();
        assert_eq!(vmj["drives"][1]["path_on_host"], data);
    }
}

/// The later original's `httpPort`: stored in meta.json (omitted when 0), exported as
/// MGN_HTTP_PORT, shown in the summary; outside 0..65535 is 400.
#[test]
fn http_port_is_stored_exported_and_shown() {
    let roots = Roots::new("httpport");
    let m = Mergend::start(&roots, &[]);
    let (code, v) = m.create(&roots.body_with(r#","httpPort":8080"#));
    assert_eq!(code, 201, "{v}");
    let id = id_of(&v);
    let cfg = roots.config().join(&id);
    let raw = std::fs::read_to_string(cfg.join("meta.json")).unwrap();
    assert!(
        raw.contains("\n  \"httpPort\": 8080,\n  \"guestIP\""),
        "{raw}"
    );
    let env = std::fs::read_to_string(cfg.join("env")).unwrap();
    assert!(env.contains("MGN_HTTP_PORT='8080'\n"), "{env}");
    let (_, s) = m.get_json(&format!("/v1/vms/{id}"));
    assert_eq!(s["httpPort"], 8080);

    let (code, v) = m.create(&roots.body_with(r#","httpPort":0"#));
    assert_eq!(code, 201, "{v}");
    let cfg = roots.config().join(id_of(&v));
    assert!(!std::fs::read_to_string(cfg.join("meta.json"))
        .unwrap()
        .contains("httpPort"));
    assert!(!std::fs::read_to_string(cfg.join("env"))
        .unwrap()
        .contains("MGN_HTTP_PORT"));
    for bad in ["70000", "-1", "\"80\""] {
        let (code, v) = m.create(&roots.body_with(&format!(r#","httpPort":{bad}"#)));
        assert_eq!(code, 400, "{bad}: {v}");
        assert!(v["message"].as_str().unwrap().contains("httpPort"), "{v}");
    }
}

/// The log is the original's: on stdout, JSON as Go's slog writes it (`time` in local
/// time with nanoseconds, upper-case `level`, `msg`, `component`, then attributes), and
/// the text and console formats likewise.
#[test]
fn logs_have_the_originals_shape_on_stdout() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let roots = Roots::new("logs");
    for format in ["json", "text", "console"] {
        let mut env = common::env_for(&roots);
        env.retain(|(k, _)| k != "MGR_LOG_FORMAT");
        let mut child = mergen_testkit::ChildGuard::spawn(
            Command::new(common::BIN)
                .env_clear()
                .envs(env)
                .env("MGR_LOG_FORMAT", format)
                // A zone with a half-hour offset and no daylight saving: local time
                // is visible in the offset.
                .env("TZ", "IST-5:30")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let stdout = child.0.stdout.take().unwrap();
        let line = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("mergend listening"))
            .expect("a listening line on stdout");
        match format {
            "json" => {
                let keys: Vec<&str> = line
                    .trim_start_matches('{')
                    .split(",\"")
                    .map(|kv| kv.trim_start_matches('"').split('"').next().unwrap())
                    .take(4)
                    .collect();
                assert_eq!(keys, ["time", "level", "msg", "component"], "{line}");
                let v: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["level"], "INFO");
                assert_eq!(v["component"], "mergend");
                let time = v["time"].as_str().unwrap();
                assert!(time.ends_with("+05:30"), "{time}");
                assert!(v["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
            }
            "text" => {
                assert!(line.starts_with("time="), "{line}");
                assert!(
                    line.contains("+05:30 level=INFO msg=\"mergend listening\" component=mergend addr=127.0.0.1:"),
                    "{line}"
                );
            }
            _ => {
                assert!(line.starts_with("\x1b[34m[INFO]\x1b[0m "), "{line:?}");
                assert!(
                    line.contains("+05:30 mergend listening component=mergend"),
                    "{line:?}"
                );
            }
        }
    }
}

/// MGR_METRICS_REQUIRE_TOKEN=1 puts /metrics behind the bearer token (and needs one).
#[test]
fn metrics_can_require_the_token() {
    let roots = Roots::new("metricstoken");
    let open = Mergend::start(&roots, &[("MGR_API_TOKEN", "s3cret")]);
    assert_eq!(open.curl("GET", "/metrics", &[]).0, 200);
    drop(open);
    let m = Mergend::start(
        &roots,
        &[
            ("MGR_API_TOKEN", "s3cret"),
            ("MGR_METRICS_REQUIRE_TOKEN", "1"),
        ],
    );
    let (code, body) = m.curl("GET", "/metrics", &[]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("unauthorized"));
    let (code, body) = m.curl("GET", "/metrics", &["-H", "Authorization: Bearer s3cret"]);
    assert_eq!(code, 200);
    assert!(body.contains("mergend_vms"));
    assert_eq!(m.curl("GET", "/healthz", &[]).0, 200);
    drop(m);
    let mut env = common::env_for(&roots);
    env.push(("MGR_METRICS_REQUIRE_TOKEN".into(), "1".into()));
    let out = std::process::Command::new(common::BIN)
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("MGR_METRICS_REQUIRE_TOKEN"));
}

/// A create cannot store without bound: 60,000 tags, too many metadata keys or hooks,
/// or too many bytes are each a 400 naming the limit, and nothing is written.
#[test]
fn create_bounds_name_the_limit() {
    let roots = Roots::new("bounds");
    let m = Mergend::start(&roots, &[]);
    let tags: serde_json::Map<String, Value> = (0..60_000)
        .map(|i| (format!("t{i}"), Value::from("v")))
        .collect();
    let meta: serde_json::Map<String, Value> = (0..300)
        .map(|i| (format!("k{i}"), Value::from(i)))
        .collect();
    let hook = serde_json::json!({"type": "exec", "cmd": ["true"]});
    let cases = [
        (
            format!(r#","tags":{}"#, Value::Object(tags)),
            "tags: 60000 entries, at most 256",
        ),
        (
            format!(r#","metadata":{}"#, Value::Object(meta)),
            "metadata: 300 entries, at most 256",
        ),
        (
            format!(r#","hooks":{{"onStart":{}}}"#, Value::from(vec![hook; 65])),
            "hooks: 65 hooks, at most 64",
        ),
        (
            format!(r#","metadata":{{"blob":"{}"}}"#, "x".repeat(70_000)),
            "at most 65536",
        ),
    ];
    for (extra, needle) in &cases {
        let (code, v) = m.create(&roots.body_with(extra));
        assert_eq!(code, 400, "{needle}: {v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
    }
    assert!(roots.vm_dirs().is_empty());
    let (code, v) = m.create(&roots.body_with(r#","tags":{"a":"b"},"metadata":{"k":"v"}"#));
    assert_eq!(code, 201, "{v}");
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
