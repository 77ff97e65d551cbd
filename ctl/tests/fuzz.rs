//! Bounded random (xorshift) testing of the HTTP request reader and the create request:
//! garbage never panics, never hangs, and never writes a file.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::{Mergend, Roots};
use mergen_ctl::request::{parse_create, Images};
use mergen_http::request::parse_head;
use mergen_http::{Limits, Progress, RequestReader};
use mergen_testkit::XorShift;

const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b":",
    b" ",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"{",
    b"}",
    b"[",
    b"\"",
    b"\\u0000",
    b"\0",
    b"\xff\xfe",
    b"null",
    b"-1",
    b"1e999",
    b"\"ports\":[{\"guest\":",
    b"\"hooks\":{\"onCreate\":[",
    b"\"process\":{\"cmd\":",
];

fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => v.insert(at, rng.next_u64() as u8),
            2 if !v.is_empty() => {
                let end = (at + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            _ => {
                let end = (at + rng.below(32)).min(v.len());
                let dup: Vec<u8> = v[at.min(end)..end].to_vec();
                v.splice(at..at, dup);
            }
        }
    }
    v
}

const FIELDS: &[&str] = &[
    "rootfs",
    "kernel",
    "dataDisk",
    "vcpu",
    "memMiB",
    "ports",
    "metadata",
    "autoStart",
    "bootArgs",
    "extraEnv",
    "tags",
    "hooks",
    "process",
    "bogus",
];

/// Strings the structured generator draws from; none names a harmful command, since a
/// generated exec hook may run it.
fn strings(rng: &mut XorShift, img: &str) -> String {
    let pool = [
        "",
        "x",
        "tcp",
        "udp",
        "sctp",
        "/nonexistent",
        "../../etc/passwd",
        "{{.ID}}",
        "{{.Nope}}",
        "http://127.0.0.1:9/",
        "https://x/",
        "onCreate",
        "onBoot",
        "exec",
        "http",
        "true",
        "A B",
        "nul\0",
        "line\nbreak",
        "/tmp",
    ];
    match rng.below(4) {
        0 => format!("{img}/rootfs.ext4"),
        1 => format!("{img}/vmlinux"),
        _ => pool[rng.below(pool.len())].to_string(),
    }
}

fn random_json(rng: &mut XorShift, depth: usize, img: &str) -> serde_json::Value {
    use serde_json::{json, Value};
    match rng.below(if depth == 0 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!([0i64, 1, -1, 80, 128, 65535, 65536, i64::MAX][rng.below(8)]),
        3 => json!(1.5),
        4 => json!(strings(rng, img)),
        5 => Value::Array(
            (0..rng.below(3))
                .map(|_| random_json(rng, depth - 1, img))
                .collect(),
        ),
        _ => {
            let keys = [
                "guest",
                "host",
                "protocol",
                "type",
                "cmd",
                "url",
                "strict",
                "timeoutMs",
                "onCreate",
                "onStart",
                "env",
                "workdir",
                "k",
            ];
            Value::Object(
                (0..rng.below(4))
                    .map(|_| {
                        (
                            keys[rng.below(keys.len())].to_string(),
                            random_json(rng, depth - 1, img),
                        )
                    })
                    .collect(),
            )
        }
    }
}

/// A create body of plausible shape with random field values and types.
fn random_create(rng: &mut XorShift, img: &str) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("rootfs".into(), format!("{img}/rootfs.ext4").into());
    obj.insert("kernel".into(), format!("{img}/vmlinux").into());
    for _ in 0..rng.below(5) {
        let k = FIELDS[rng.below(FIELDS.len())];
        obj.insert(k.into(), random_json(rng, 3, img));
    }
    serde_json::to_vec(&obj).unwrap()
}

const SEED_REQUEST: &[u8] =
    b"POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\nAuthorization: Bearer t\r\n\r\n{\"rootfs\":\"/x\"}\r\nPOST /v1/vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{}\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n";

#[test]
fn request_reader_survives_garbage() {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let limits = Limits {
        max_head: 512,
        max_body: 256,
    };
    for round in 0..20_000 {
        let input: Vec<u8> = if round % 4 == 0 {
            (0..rng.below(700)).map(|_| rng.next_u64() as u8).collect()
        } else {
            mutate(&mut rng, SEED_REQUEST)
        };
        if let Ok(Some((_, n))) = parse_head(&input, &limits) {
            assert!(n <= input.len());
        }
        // Fed in random small pieces, as a slow or odd client would send them.
        let mut reader = RequestReader::new(limits);
        let mut buf = Vec::new();
        let mut fed = 0;
        'feed: while fed < input.len() {
            let n = (1 + rng.below(64)).min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + n]);
            fed += n;
            loop {
                match reader.advance(&mut buf) {
                    Ok(Progress::Done(req)) => assert!(req.body.len() <= limits.max_body),
                    Ok(Progress::SendContinue) => {}
                    Ok(Progress::NeedMore) => break,
                    Err(_) => break 'feed,
                }
                // What it keeps buffered is bounded by the limits, not by the input.
                assert!(buf.len() <= limits.max_head + 64 + 4096, "{}", buf.len());
            }
        }
    }
}

#[test]
fn create_parser_survives_garbage() {
    let roots = Roots::new("fuzzparse");
    let images = Images {
        roots: vec![std::fs::canonicalize(roots.img()).unwrap()],
        devices: Vec::new(),
    };
    let seed = roots.body_with(
        r#","vcpu":2,"memMiB":256,"ports":[{"guest":80,"host":0,"protocol":"udp"}],"metadata":{"a":[1,{"b":null}]},"tags":{"app":"x"},"extraEnv":{"K":"v"},"hooks":{"onCreate":[{"type":"exec","cmd":["true"],"timeoutMs":5,"strict":true}]},"process":{"cmd":["sleep","1"],"env":{"A":"b"}}"#,
    );
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let img = roots.img().display().to_string();
    let before: Vec<PathBuf> = walk(&roots.dir);
    for round in 0..20_000 {
        let body = if round % 5 == 0 {
            (0..rng.below(300)).map(|_| rng.next_u64() as u8).collect()
        } else if round % 5 == 1 {
            random_create(&mut rng, &img)
        } else {
            mutate(&mut rng, seed.as_bytes())
        };
        let _ = parse_create(&body, &images);
    }
    assert_eq!(walk(&roots.dir), before, "parsing wrote files");
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out.sort();
    out
}

#[test]
fn live_daemon_takes_garbage_and_writes_only_accepted_vms() {
    let roots = Roots::new("fuzzlive");
    let m = Mergend::start(&roots, &[("MGR_HTTP_READ_TIMEOUT_SECONDS", "1")]);
    let seed = roots.body_with(r#","ports":[{"guest":80,"host":0}],"metadata":{"k":"v"}"#);
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let mut created = 0;
    let img = roots.img().display().to_string();
    for round in 0..300 {
        let body = if round % 2 == 0 {
            random_create(&mut rng, &img)
        } else {
            mutate(&mut rng, seed.as_bytes())
        };
        let mut req = format!(
            "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        if round % 3 == 0 {
            req = mutate(&mut rng, &req);
        }
        let mut s = TcpStream::connect(m.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&req);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let text = String::from_utf8_lossy(&resp);
        if text.starts_with("HTTP/1.1 201") {
            created += 1;
        } else if !text.is_empty() {
            // 502 is a strict hook the garbage asked for that failed: no VM either.
            assert!(
                (text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 502"))
                    && text.contains("\"error\""),
                "garbage must get a 4xx (or hook_failed) JSON error: {text}"
            );
        }
    }
    let (code, _) = m.curl("GET", "/healthz", &[]);
    assert_eq!(code, 200, "daemon survived");
    eprintln!("{created} of 300 garbage creates were valid and accepted");
    assert!(created > 0, "the generator never produced a valid create");
    assert_eq!(
        roots.vm_dirs().len(),
        created,
        "only accepted creates wrote a VM"
    );
    let (_, list) = m.get_json("/v1/vms");
    assert_eq!(list["items"].as_array().unwrap().len(), created);
}
