//! Hooks against a real local HTTP receiver and real commands.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use common::{Mergend, Roots};
use mergen_testkit::eventually;
use serde_json::Value;

struct Received {
    head: String,
    body: Value,
}

/// An HTTP receiver answering every request with `status`.
fn receiver(status: u16) -> (SocketAddr, Receiver<Received>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head, body) = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(i) = text.find("\r\n\r\n") {
                    let head = text[..i].to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        break (head, buf[i + 4..i + 4 + len].to_vec());
                    }
                }
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = tx.send(Received {
                head,
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            });
        }
    });
    (addr, rx)
}

fn hooks_body(roots: &Roots, hooks: &str) -> String {
    roots.body_with(&format!(
        r#","ports":[{{"guest":80,"host":0}}],"metadata":{{"team":"core"}},"hooks":{hooks}"#
    ))
}

#[test]
fn strict_http_hook_gets_the_context_before_the_response() {
    let roots = Roots::new("hookhttp");
    let (addr, rx) = receiver(200);
    let m = Mergend::start(&roots, &[]);
    let (code, v) = m.create(&hooks_body(
        &roots,
        &format!(r#"{{"onCreate":[{{"type":"http","url":"http://{addr}/created/{{{{.ID}}}}","strict":true,"headers":{{"X-Token":"abc"}}}}]}}"#),
    ));
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap();
    // Strict: the hook already ran when the response came back.
    let got = rx.try_recv().expect("strict hook ran before the response");
    assert!(
        got.head
            .starts_with(&format!("POST /created/{id} HTTP/1.1")),
        "{}",
        got.head
    );
    assert!(got.head.contains("X-Token: abc"));
    assert_eq!(got.body["id"], id);
    assert_eq!(got.body["guestIP"], "172.30.0.2");
    assert_eq!(got.body["hostPorts"][0], 20000);
    assert_eq!(got.body["guestPorts"][0], 80);
    assert_eq!(got.body["metadata"]["team"], "core");
    assert_eq!(
        got.body["paths"]["configDir"],
        roots.config().join(id).display().to_string()
    );
    assert!(got.body["createdAt"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn failed_strict_oncreate_leaves_no_vm_and_frees_the_allocation() {
    let roots = Roots::new("hookfail");
    let (addr, _rx) = receiver(500);
    let m = Mergend::start(&roots, &[]);
    let cases = [
        format!(r#"{{"onCreate":[{{"type":"http","url":"http://{addr}/","strict":true}}]}}"#),
        r#"{"onCreate":[{"type":"exec","cmd":["false"],"strict":true}]}"#.to_string(),
        r#"{"onCreate":[{"type":"exec","cmd":["echo","{{index .HostPorts 5}}"],"strict":true}]}"#
            .to_string(),
        r#"{"onCreate":[{"type":"exec","cmd":["sleep","5"],"strict":true,"timeoutMs":200}]}"#
            .to_string(),
        r#"{"onCreate":[{"type":"exec","cmd":["/no/such/binary"],"strict":true}]}"#.to_string(),
    ];
    for hooks in &cases {
        let (code, v) = m.create(&hooks_body(&roots, hooks));
        assert_eq!(code, 502, "{hooks}: {v}");
        assert_eq!(v["error"], "hook_failed");
        assert!(
            v["message"].as_str().unwrap().contains("not created"),
            "{v}"
        );
        assert!(roots.vm_dirs().is_empty(), "{hooks}: VM left behind");
        assert_eq!(std::fs::read_dir(roots.data()).unwrap().count(), 0);
    }
    let (code, v) = m.create(&hooks_body(&roots, "{}"));
    assert_eq!(code, 201);
    let (_, s) = m.get_json(&format!("/v1/vms/{}", v["id"].as_str().unwrap()));
    assert_eq!(s["network"]["guestIP"], "172.30.0.2", "allocation freed");
    assert_eq!(s["network"]["ports"][0]["host"], 20000);
    let (_, text) = m.curl("GET", "/metrics", &[]);
    assert!(
        text.contains(r#"mergend_hook_failures_total{event="onCreate",type="exec"} 4"#),
        "{text}"
    );
    assert!(
        text.contains(r#"mergend_hook_failures_total{event="onCreate",type="http"} 1"#),
        "{text}"
    );
}

#[test]
fn global_hooks_run_first_and_placeholders_render() {
    let roots = Roots::new("hookorder");
    let out = roots.dir.join("order.txt");
    let o = out.display();
    std::fs::write(
        roots.hooks().join("10-audit.json"),
        format!(r#"{{"onCreate":[{{"type":"exec","cmd":["/bin/sh","-c","echo global {{{{.GuestIP}}}} >> {o}"],"strict":true}}]}}"#),
    )
    .unwrap();
    std::fs::write(roots.hooks().join("broken.json"), "{not json").unwrap();
    let m = Mergend::start(&roots, &[]);
    let (code, v) = m.create(&hooks_body(
        &roots,
        &format!(r#"{{"onCreate":[{{"type":"exec","cmd":["/bin/sh","-c","echo vm {{{{.ID}}}} {{{{.HostPorts}}}} {{{{.Paths.DataDir}}}} {{{{.Metadata.team}}}} >> {o}"],"strict":true}}],
            "onDelete":[{{"type":"exec","cmd":["/bin/sh","-c","echo deleted {{{{.ID}}}} >> {o}"]}}]}}"#),
    ));
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap();
    let data_dir = roots.data().join(id);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!(
            "global 172.30.0.2\nvm {id} [20000] {} core\n",
            data_dir.display()
        )
    );
    // A non-strict onDelete hook runs in the background after the response.
    let (code, _) = m.curl("DELETE", &format!("/v1/vms/{id}"), &[]);
    assert_eq!(code, 200);
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&out)
            .unwrap()
            .contains(&format!("deleted {id}"))
    }));
}

#[test]
fn background_hooks_never_block_or_fail_the_request() {
    let roots = Roots::new("hookbg");
    let m = Mergend::start(&roots, &[]);
    let marker = roots.dir.join("bg.txt");
    // A slow failing hook and one that writes: the create answers at once and succeeds.
    let (code, v) = m.create(&hooks_body(
        &roots,
        &format!(
            r#"{{"onCreate":[{{"type":"exec","cmd":["/bin/sh","-c","sleep 30"],"timeoutMs":300}},{{"type":"exec","cmd":["false"]}},{{"type":"exec","cmd":["/bin/sh","-c","echo ok > {}"]}}]}}"#,
            marker.display()
        ),
    ));
    assert_eq!(code, 201, "{v}");
    assert!(eventually(Duration::from_secs(10), || marker.exists()));
    assert!(eventually(Duration::from_secs(10), || {
        let (_, text) = m.curl("GET", "/metrics", &[]);
        text.contains(r#"mergend_hook_runs_total{event="onCreate",type="exec"} 3"#)
            && text.contains(r#"mergend_hook_failures_total{event="onCreate",type="exec"} 2"#)
    }));
}

#[test]
fn failed_strict_ondelete_keeps_the_vm() {
    let roots = Roots::new("hookdel");
    let m = Mergend::start(&roots, &[]);
    let (code, v) = m.create(&hooks_body(
        &roots,
        r#"{"onDelete":[{"type":"exec","cmd":["false"],"strict":true}]}"#,
    ));
    assert_eq!(code, 201);
    let id = v["id"].as_str().unwrap();
    let (code, body) = m.curl("DELETE", &format!("/v1/vms/{id}"), &[]);
    assert_eq!(code, 502, "{body}");
    assert!(roots.config().join(id).join("meta.json").exists());
    let (code, _) = m.get_json(&format!("/v1/vms/{id}"));
    assert_eq!(code, 200);
    // The lock was released: the error path did not leak it.
    let (code, _) = m.curl("DELETE", &format!("/v1/vms/{id}"), &[]);
    assert_eq!(code, 502);
}

/// SIGTERM while a create is in flight (held in a strict hook): the request is still
/// answered, then mergend exits cleanly; past `MGR_SHUTDOWN_TIMEOUT_SECONDS` it exits
/// anyway.
#[test]
fn graceful_shutdown_answers_in_flight_requests_within_the_timeout() {
    for (hook_secs, timeout, want_answer) in [("1", "15", true), ("20", "1", false)] {
        let roots = Roots::new("graceful");
        let mut m = Mergend::start(&roots, &[("MGR_SHUTDOWN_TIMEOUT_SECONDS", timeout)]);
        let marker = roots.dir.join("in-hook");
        let body = hooks_body(
            &roots,
            &format!(
                r#"{{"onCreate":[{{"type":"exec","cmd":["/bin/sh","-c","echo $$ > {} && exec sleep {hook_secs}"],"strict":true,"timeoutMs":60000}}]}}"#,
                marker.display()
            ),
        );
        let url = m.url("/v1/vms");
        let client = std::thread::spawn(move || {
            common::try_curl(&["-X", "POST", &url, "--data-binary", &body])
        });
        assert!(eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(&marker).is_ok_and(|s| s.ends_with('\n'))
        }));
        let hook_pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let t = std::time::Instant::now();
        m.signal(rustix::process::Signal::TERM);
        let st = m
            .wait_exit(Duration::from_secs(15))
            .expect("mergend exited");
        assert!(st.success(), "{st:?}");
        let answer = client.join().unwrap();
        if want_answer {
            assert_eq!(answer.as_ref().map(|a| a.0), Ok(201), "{answer:?}");
        } else {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "shutdown timeout ignored"
            );
            assert!(
                m.log_text().contains("shutdown timeout"),
                "{}",
                m.log_text()
            );
        }
        // The abandoned hook command is ours to end.
        if let Some(pid) = rustix::process::Pid::from_raw(hook_pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

fn strict(url: &str, extra: &str) -> String {
    format!(r#"{{"onCreate":[{{"type":"http","url":"{url}","strict":true{extra}}}]}}"#)
}

/// https hooks with the system's roots (SSL_CERT_FILE, as Go's client), and redirects
/// as Go follows them: 302 becomes a GET without the body, 307 repeats the POST with
/// its body, credentials do not go on to another host, the 10th redirecting response
/// fails the hook.
#[test]
fn https_hooks_follow_redirects_like_go() {
    use common::hookserver::{HookServer, TestCa};
    let roots = Roots::new("hookhttps");
    let (ca, ca_file) = TestCa::in_dir(&roots.dir);
    let plain = HookServer::start(None, |_| (200, vec![]));
    let plain_addr = plain.addr;
    let tls = HookServer::start(Some(ca.server.clone()), move |req| {
        let path = req.path.as_str();
        let to = |l: String| (302, vec![("Location".to_string(), l)]);
        if path == "/r302" {
            to("/ok?from=302".into())
        } else if path == "/r307" {
            (
                307,
                vec![(
                    "Location".into(),
                    format!("http://127.0.0.1:{}/after307", plain_addr.port()),
                )],
            )
        } else if let Some(n) = path.strip_prefix("/chain/") {
            let n: u32 = n.parse().unwrap();
            if n == 0 {
                (200, vec![])
            } else {
                to(format!("/chain/{}", n - 1))
            }
        } else {
            (200, vec![])
        }
    });
    let port = tls.addr.port();
    let m = Mergend::start(&roots, &[("SSL_CERT_FILE", ca_file.to_str().unwrap())]);

    let (code, v) = m.create(&hooks_body(
        &roots,
        &strict(&format!("https://127.0.0.1:{port}/r302"), ""),
    ));
    assert_eq!(code, 201, "{v}");
    let seen = tls.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("POST", "/r302")
    );
    assert!(!seen[0].body.is_empty());
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("GET", "/ok?from=302")
    );
    assert!(seen[1].body.is_empty());
    assert_eq!(
        seen[1].header("Referer"),
        Some(format!("https://127.0.0.1:{port}/r302").as_str())
    );

    let (code, v) = m.create(&hooks_body(
        &roots,
        &strict(
            &format!("https://localhost:{port}/r307"),
            r#","headers":{"authorization":"Bearer t","x-other":"kept"}"#,
        ),
    ));
    assert_eq!(code, 201, "{v}");
    let first = tls.seen().pop().unwrap();
    assert_eq!(first.path, "/r307");
    // Go's canonical header case on the wire.
    assert!(
        first
            .headers
            .iter()
            .any(|(k, v)| k == "Authorization" && v == "Bearer t"),
        "{first:?}"
    );
    assert!(first.headers.iter().any(|(k, _)| k == "X-Other"));
    let after = plain.seen().pop().expect("the 307 was followed");
    assert_eq!(
        (after.method.as_str(), after.path.as_str()),
        ("POST", "/after307")
    );
    assert_eq!(after.body, first.body, "307 repeats the body");
    assert_eq!(
        after.header("Authorization"),
        None,
        "no credentials to another host"
    );
    assert_eq!(after.header("X-Other"), Some("kept"));

    // Nine redirects are followed; a tenth redirecting response fails the hook.
    let (code, v) = m.create(&hooks_body(
        &roots,
        &strict(&format!("https://127.0.0.1:{port}/chain/9"), ""),
    ));
    assert_eq!(code, 201, "{v}");
    let (code, v) = m.create(&hooks_body(
        &roots,
        &strict(&format!("https://127.0.0.1:{port}/chain/10"), ""),
    ));
    assert_eq!(code, 502, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("stopped after 10 redirects"),
        "{v}"
    );

    // A certificate from a CA nobody trusts: the hook fails.
    let stranger = HookServer::start(Some(TestCa::stranger(&roots.dir).server), |_| (200, vec![]));
    let (code, v) = m.create(&hooks_body(
        &roots,
        &strict(&format!("https://127.0.0.1:{}/", stranger.addr.port()), ""),
    ));
    assert_eq!(code, 502, "{v}");
    assert!(stranger.seen().is_empty());
}

/// HTTPS_PROXY / NO_PROXY as Go reads them: a tunnel through the proxy for a remote
/// name (which only the proxy resolves), never for loopback, not for NO_PROXY hosts.
#[test]
fn http_hooks_honour_the_proxy_variables() {
    use common::hookserver::{ConnectProxy, HookServer, TestCa};
    let roots = Roots::new("hookproxy");
    let (ca, ca_file) = TestCa::in_dir(&roots.dir);
    let tls = HookServer::start(Some(ca.server.clone()), |_| (200, vec![]));
    let port = tls.addr.port();
    let proxy = ConnectProxy::start();
    let proxy_url = format!("http://{}", proxy.addr);
    let m = Mergend::start(
        &roots,
        &[
            ("SSL_CERT_FILE", ca_file.to_str().unwrap()),
            ("HTTPS_PROXY", &proxy_url),
            ("NO_PROXY", "direct.example"),
        ],
    );
    let (code, v) = m.create(&hooks_body(
        &roots,
        &strict(&format!("https://hooks.example:{port}/via"), ""),
    ));
    assert_eq!(code, 201, "{v}");
    assert_eq!(proxy.targets(), vec![format!("hooks.example:{port}")]);
    assert_eq!(tls.seen().pop().unwrap().path, "/via");

    // Loopback is never proxied.
    let (code, v) = m.create(&hooks_body(
        &roots,
        &strict(&format!("https://127.0.0.1:{port}/direct"), ""),
    ));
    assert_eq!(code, 201, "{v}");
    assert_eq!(proxy.targets().len(), 1);
    // NO_PROXY: mergend resolves direct.example itself, which fails; the proxy is not asked.
    let (code, v) = m.create(&hooks_body(
        &roots,
        &strict(&format!("https://direct.example:{port}/"), ""),
    ));
    assert_eq!(code, 502, "{v}");
    assert_eq!(proxy.targets().len(), 1);
}

/// Non-strict hooks of one VM and event run in order; exec hooks' output is logged;
/// a hook with no timeoutMs is bounded by the event's 20 s budget.
#[test]
fn background_hooks_run_in_order_output_is_logged_and_the_event_is_bounded() {
    let roots = Roots::new("hookseq");
    let out = roots.dir.join("seq.txt");
    let o = out.display();
    let m = Mergend::start(&roots, &[]);
    let hooks = format!(
        r#"{{"onCreate":[
            {{"type":"exec","cmd":["/bin/sh","-c","sleep 0.3; echo 1 >> {o}"]}},
            {{"type":"exec","cmd":["/bin/sh","-c","echo 2 >> {o}"]}},
            {{"type":"exec","cmd":["/bin/sh","-c","echo 3 >> {o}; echo said-{{{{.ID}}}}; echo on-stderr >&2"]}}
        ]}}"#
    );
    let (code, v) = m.create(&hooks_body(&roots, &hooks));
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert!(eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.lines().count() == 3)
    }));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "1\n2\n3\n");
    let logged = eventually(Duration::from_secs(10), || {
        m.log.lock().unwrap().iter().any(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
            v["msg"] == "exec hook output"
                && v["output"] == format!("said-{id}\non-stderr").as_str()
        })
    });
    assert!(logged, "{}", m.log_text());

    // No timeoutMs: the event's 20 s budget ends it (curl gives up after 30 s).
    let (code, v) = m.create(&hooks_body(
        &roots,
        r#"{"onCreate":[{"type":"exec","cmd":["sleep","60"],"strict":true}]}"#,
    ));
    assert_eq!(code, 502, "{v}");
    assert!(v["message"].as_str().unwrap().contains("timed out"), "{v}");
}

/// Hook files as the original read them: a global file's unknown events and keys are
/// ignored with a warning, types in any case; a hooks.json written by the Go version
/// with `"type": " Exec "` runs.
#[test]
fn hook_files_are_read_leniently_with_warnings() {
    let roots = Roots::new("hookfiles");
    let out = roots.dir.join("files.txt");
    let o = out.display();
    std::fs::write(
        roots.hooks().join("10-global.json"),
        format!(
            r#"{{"onCreate":[{{"type":"EXEC","cmd":["/bin/sh","-c","echo global >> {o}"],"strict":true,"retries":3}}],
               "onReboot":[{{"type":"exec","cmd":["true"]}}]}}"#
        ),
    )
    .unwrap();
    let m = Mergend::start(&roots, &[]);
    let (code, v) = m.create(&roots.body());
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "global\n");
    let log = m.log_text();
    assert!(log.contains("retries") && log.contains("onReboot"), "{log}");

    std::fs::write(
        roots.config().join(&id).join("hooks.json"),
        format!(
            "{{\n  \"onDelete\": [\n    {{\n      \"type\": \" Exec \",\n      \"cmd\": [\n        \"/bin/sh\",\n        \"-c\",\n        \"echo deleted >> {o}\"\n      ],\n      \"strict\": true\n    }}\n  ]\n}}\n"
        ),
    )
    .unwrap();
    let (code, body) = m.curl("DELETE", &format!("/v1/vms/{id}"), &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "global\ndeleted\n");
}

/// `{{.CreatedAt}}` and `{{.Metadata}}` render exactly as Go renders a time.Time and a
/// map[string]any; index, printf, len, eq and pipelines work in hook arguments.
#[test]
fn templates_render_as_go() {
    let roots = Roots::new("hooktmpl");
    let out = roots.dir.join("tmpl.txt");
    let m = Mergend::start(&roots, &[]);
    let script = format!("printf '%s|' \"$@\" > {}", out.display());
    let hooks = serde_json::json!({"onCreate": [{"type": "exec", "strict": true, "cmd": [
        "/bin/sh", "-c", script, "sh",
        "{{.CreatedAt}}",
        "{{.Metadata}}",
        "{{index .Metadata \"team\"}}",
        "{{printf \"%s:%d\" .GuestIP (index .HostPorts 0)}}",
        "{{len .GuestPorts}}",
        "{{if eq .Metadata.team \"core\"}}yes{{else}}no{{end}}",
        "{{.ID | printf \"%.8s\"}}",
        "{{.Metadata.missing}}",
    ]}]});
    let (code, v) = m.create(&roots.body_with(&format!(
        r#","ports":[{{"guest":80,"host":0}}],"metadata":{{"team":"core","n":8080,"big":1000000,"list":[1,"a"],"nested":{{"b":true}}}},"hooks":{hooks}"#
    )));
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_str().unwrap();
    let meta: Value =
        serde_json::from_slice(&std::fs::read(roots.config().join(id).join("meta.json")).unwrap())
            .unwrap();
    // RFC 3339 with trimmed fractional seconds, as Go's String() trims them.
    let created = meta["createdAt"].as_str().unwrap();
    let go_time = format!(
        "{} +0000 UTC",
        created.trim_end_matches('Z').replace('T', " ")
    );
    let got = std::fs::read_to_string(&out).unwrap();
    let want = format!(
        "{go_time}|map[big:1e+06 list:[1 a] n:8080 nested:map[b:true] team:core]|core|172.30.0.2:20000|1|yes|{}|<no value>|",
        &id[..8]
    );
    assert_eq!(got, want);
}

/// An exec hook gets mergend's environment without its API token (a difference from
/// the original, which passed everything on).
#[test]
fn exec_hooks_do_not_inherit_the_api_token() {
    let roots = Roots::new("hookenv");
    let out = roots.dir.join("env.txt");
    let m = Mergend::start(&roots, &[("MGR_API_TOKEN", "s3cret")]);
    let hooks = format!(
        r#"{{"onCreate":[{{"type":"exec","strict":true,"cmd":["/bin/sh","-c","echo token=${{MGR_API_TOKEN:-none}} path=${{PATH:+set}} > {}"]}}]}}"#,
        out.display()
    );
    let (code, v) = m.curl(
        "POST",
        "/v1/vms",
        &[
            "-H",
            "Authorization: Bearer s3cret",
            "--data-binary",
            &hooks_body(&roots, &hooks),
        ],
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "token=none path=set\n"
    );
}
