//! Connections to a VM that goes away while they stream: its namespace is deleted (a
//! stopped process VM, a deleted Firecracker VM) or its meta.json removed. The
//! forwarder ends those connections cleanly (close_notify then FIN on TLS, FIN on raw)
//! as soon as the resolver sees it, leaves every other VM's connections alone, and the
//! namespace's socket pool thread goes.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// A guest that streams a line every 20 ms to each connection until it is gone, as a
/// log tail or a server-sent event stream does. Its sockets live in the namespace, so
/// the namespace outlives its name: TCP alone would keep these connections up.
fn ticker(listener: TcpListener) {
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut sock = sock;
                while sock.write_all(b"tick\n").is_ok() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    });
}

/// A client reading a stream until it ends; `ticks` counts the bytes so far.
struct Reader {
    ticks: Arc<AtomicU64>,
    /// When the stream ended, and whether cleanly (EOF after close_notify on TLS, a FIN
    /// on raw) or how it broke.
    ended: JoinHandle<(Instant, Result<(), String>)>,
}

impl Reader {
    fn spawn(mut stream: impl Read + Send + 'static) -> Reader {
        let ticks = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&ticks);
        let ended = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return (Instant::now(), Ok(())),
                    Ok(n) => count.fetch_add(n as u64, Ordering::Relaxed),
                    Err(e) => return (Instant::now(), Err(e.to_string())),
                };
            }
        });
        Reader { ticks, ended }
    }

    fn tls(host: &str, port: u16) -> Reader {
        let stream = poll(Duration::from_secs(5), || try_tls_connect(host, port).ok())
            .unwrap_or_else(|| panic!("no TLS connection to {host}"));
        Reader::spawn(stream)
    }

    fn raw(port: u16) -> Reader {
        let sock = TcpStream::connect(("127.0.0.1", port)).expect("TCP connect");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Reader::spawn(sock)
    }

    fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    /// The end of the stream, waited for up to `limit`.
    fn end(self, limit: Duration) -> (Instant, Result<(), String>) {
        let finished = poll(limit, || self.ended.is_finished().then_some(()));
        assert!(finished.is_some(), "the stream is still running");
        self.ended.join().expect("reader thread")
    }
}

/// Two VMs streaming to their clients: `alpha` (the oldest, so also the raw
/// listener's) and `beta`.
struct TwoVms {
    alpha: Ns,
    beta: Ns,
    alpha_id: String,
    fwd: Forwarder,
}

fn two_vms() -> TwoVms {
    let (alpha, beta) = (Ns::new(), Ns::new());
    for ns in [&alpha, &beta] {
        ticker(ns.listen(443));
        ticker(ns.listen(22));
    }
    let fwd = Forwarder::start(&[443, 22], &[("FWD_LOG_LEVEL", "debug")]);
    let alpha_id = vm_id();
    let root = fwd.config_root();
    write_vm(
        &root,
        &alpha_id,
        "2025-01-01T00:00:00Z",
        &alpha,
        &[("app", "alpha")],
    );
    write_vm(
        &root,
        &vm_id(),
        "2025-06-01T00:00:00Z",
        &beta,
        &[("app", "beta")],
    );
    TwoVms {
        alpha,
        beta,
        alpha_id,
        fwd,
    }
}

fn pool_threads(fwd: &Forwarder) -> usize {
    thread_names(fwd.child.pid())
        .iter()
        .filter(|n| *n == "netns-pool")
        .count()
}

fn vm_gone(fwd: &Forwarder, port: u16) -> f64 {
    fwd.metric_answered(&format!(
        r#"mergen_forwarder_connections_total{{listener="127.0.0.1:{port}",outcome="vm_gone"}}"#
    ))
}

/// Streams to both VMs, each seen moving: 3 TLS and 1 raw to alpha, 2 TLS to beta.
fn streams(vms: &TwoVms) -> (Vec<Reader>, Vec<Reader>) {
    let (https, raw) = (vms.fwd.ports[0], vms.fwd.ports[1]);
    let mut alpha: Vec<Reader> = (0..3)
        .map(|_| Reader::tls("alpha.localhost", https))
        .collect();
    alpha.push(Reader::raw(raw));
    let beta: Vec<Reader> = (0..2)
        .map(|_| Reader::tls("beta.localhost", https))
        .collect();
    let moving = poll(Duration::from_secs(5), || {
        alpha
            .iter()
            .chain(&beta)
            .all(|r| r.ticks() > 0)
            .then_some(())
    });
    assert!(moving.is_some(), "streams not moving: {}", vms.fwd.log());
    (alpha, beta)
}

/// Alpha's streams end cleanly; beta's go on. Returns how long the last alpha stream
/// took to end after `gone`.
fn alpha_ends_beta_goes_on(
    vms: &TwoVms,
    alpha: Vec<Reader>,
    beta: &[Reader],
    gone: Instant,
) -> Duration {
    let mut slowest = Duration::ZERO;
    for r in alpha {
        let (at, how) = r.end(Duration::from_secs(5));
        assert_eq!(how, Ok(()), "not a clean close\n{}", vms.fwd.log());
        slowest = slowest.max(at.saturating_duration_since(gone));
    }
    let before: Vec<u64> = beta.iter().map(Reader::ticks).collect();
    let going_on = poll(Duration::from_secs(5), || {
        beta.iter()
            .zip(&before)
            .all(|(r, b)| r.ticks() > *b)
            .then_some(())
    });
    assert!(going_on.is_some(), "beta's streams stopped too");
    assert!(beta.iter().all(|r| !r.ended.is_finished()));
    let (https, raw) = (vms.fwd.ports[0], vms.fwd.ports[1]);
    let counted = poll(Duration::from_secs(5), || {
        (vm_gone(&vms.fwd, https) >= 3.0 && vm_gone(&vms.fwd, raw) == 1.0).then_some(())
    });
    assert!(counted.is_some(), "{}", vms.fwd.metrics());
    slowest
}

/// The namespace of a streaming VM is deleted, while new connections to it are being
/// dialed: its streams end, new ones get their 502 (or end with the rest), beta's
/// streams go on, and alpha's socket pool thread exits.
#[test]
fn deleting_a_vms_namespace_ends_its_connections_only() {
    require_root!();
    let vms = two_vms();
    let (alpha, beta) = streams(&vms);
    assert_eq!(pool_threads(&vms.fwd), 2);

    // New connections to alpha, racing with the deletion: half started before it,
    // half after.
    let https = vms.fwd.ports[0];
    let connect = move || {
        std::thread::spawn(move || {
            let mut s = try_tls_connect("alpha.localhost", https).map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .map(|_| String::from_utf8_lossy(&got).into_owned())
                .map_err(|e| e.to_string())
        })
    };
    let mut burst: Vec<JoinHandle<Result<String, String>>> = (0..12).map(|_| connect()).collect();
    let gone = Instant::now();
    run_ok(Command::new("ip").args(["netns", "delete", &vms.alpha.name]));
    burst.extend((0..12).map(|_| connect()));

    let slowest = alpha_ends_beta_goes_on(&vms, alpha, &beta, gone);
    let mut answers = (0, 0);
    for b in burst {
        let done = poll(Duration::from_secs(10), || b.is_finished().then_some(()));
        assert!(
            done.is_some(),
            "a new connection to alpha is still open\n{}",
            vms.fwd.log()
        );
        let got = b.join().expect("burst client");
        let got = got.unwrap_or_else(|e| panic!("a new connection broke: {e}\n{}", vms.fwd.log()));
        if got.starts_with("HTTP/1.1 502") {
            answers.0 += 1;
        } else {
            assert!(got.starts_with("tick"), "{got:?}");
            answers.1 += 1;
        }
    }
    let exited = poll(Duration::from_secs(5), || {
        (pool_threads(&vms.fwd) == 1).then_some(())
    });
    assert!(exited.is_some(), "{:?}", thread_names(vms.fwd.child.pid()));
    eprintln!(
        "namespace deleted: alpha's 4 streams ended within {slowest:?}; of 24 connections \
         racing with it, {} got a 502 and {} streamed until it went ({} dials parked on the way)",
        answers.0,
        answers.1,
        log_lines(&vms.fwd, "waiting for a socket from its namespace")
    );
    drop(vms.beta);
}

/// A streaming VM's meta.json is removed (the VM deleted): its streams end, beta's go
/// on, the raw listener now sends new connections to beta, and alpha's socket pool
/// thread is stopped.
#[test]
fn removing_a_vms_meta_json_ends_its_connections_only() {
    require_root!();
    let vms = two_vms();
    let (alpha, beta) = streams(&vms);
    let gone = Instant::now();
    std::fs::remove_file(vms.fwd.config_root().join(&vms.alpha_id).join("meta.json"))
        .expect("removing meta.json");
    let slowest = alpha_ends_beta_goes_on(&vms, alpha, &beta, gone);
    let exited = poll(Duration::from_secs(5), || {
        (pool_threads(&vms.fwd) == 1).then_some(())
    });
    assert!(exited.is_some(), "{:?}", thread_names(vms.fwd.child.pid()));
    let raw = Reader::raw(vms.fwd.ports[1]);
    let moving = poll(Duration::from_secs(5), || (raw.ticks() > 0).then_some(()));
    assert!(moving.is_some(), "the raw listener does not reach beta");
    eprintln!("meta.json removed: alpha's 4 streams ended within {slowest:?}");
}
