//! The loads, each bounded in time: client threads set up their connections, the meter
//! reads every process's CPU, the threads run until the deadline, the meter reads again,
//! and only then are the connections closed, so set-up and tear-down stay outside the
//! measured window.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;

use crate::interrupt;
use crate::procfs::Proc;
use crate::tlsclient::{self, Answer, TlsStream};

/// Where a load goes: a terminator's port and the server name it asks for.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub port: u16,
    pub sni: &'static str,
}

impl Endpoint {
    pub fn addr(self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A new TLS connection with its handshake done.
    pub fn connect(self, config: &Arc<ClientConfig>) -> std::io::Result<TlsStream> {
        tlsclient::connect(config, self.addr(), self.sni)
    }

    /// `GET /` (the small response) on `s`; the status.
    pub fn get_small(self, s: &mut TlsStream, close: bool, buf: &mut [u8]) -> std::io::Result<u16> {
        tlsclient::get(s, self.sni, "/", close, buf, |_| true)
    }
}

/// CPU readings taken at the edges of the measured window.
#[derive(Clone, Copy, Debug)]
pub struct Reading {
    pub at: Instant,
    pub server: Duration,
    pub client: Duration,
    pub backend: Duration,
    pub machine: Duration,
}

/// What is read at the edges of a window: the terminator's and the backend's process
/// trees and this process.
#[derive(Clone, Copy)]
pub struct Meter {
    pub server: Proc,
    pub backend: Proc,
}

impl Meter {
    pub fn read(&self) -> Reading {
        Reading {
            at: Instant::now(),
            server: self.server.tree_cpu(),
            client: crate::procfs::self_cpu(),
            backend: self.backend.tree_cpu(),
            machine: crate::procfs::machine_busy(),
        }
    }
}

/// One load's outcome.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Operations completed in the window: requests, connections, rejections or bytes.
    pub ops: u64,
    /// Per-operation latencies in microseconds, where the load has them.
    pub latencies_us: Vec<u64>,
    pub errors: u64,
    /// Unknown-name flood: connections the server went on to handshake instead of refusing.
    pub not_refused: u64,
    /// Reads of the client's sockets, the bytes they returned and the TLS records in
    /// them (bulk loads).
    pub socket_reads: u64,
    pub socket_bytes: u64,
    pub records: u64,
    pub window: Duration,
    pub cpu_server: Duration,
    pub cpu_client: Duration,
    pub cpu_backend: Duration,
    /// CPU time every other process on the machine used in the window.
    pub cpu_others: Duration,
}

impl Outcome {
    /// What the rest of the machine took, as a percentage of all its cores.
    pub fn others_pct(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        self.cpu_others.as_secs_f64() * 100.0 / (self.window.as_secs_f64() * cores)
    }
}

#[derive(Default)]
struct Tally {
    ops: u64,
    latencies_us: Vec<u64>,
    errors: u64,
    not_refused: u64,
    socket_reads: u64,
    socket_bytes: u64,
    records: u64,
}

/// A socket's counters at one moment.
type Counters = (u64, u64, u64);

fn counters(s: &TlsStream) -> Counters {
    (s.sock.reads, s.sock.read_bytes, s.sock.records)
}

impl Tally {
    /// One operation done, started at `start`.
    fn done(&mut self, start: Instant) {
        self.ops += 1;
        self.latencies_us.push(start.elapsed().as_micros() as u64);
    }

    /// Count what `s` read since its counters were `from`.
    fn reads_of(&mut self, s: &TlsStream, from: Counters) {
        let now = counters(s);
        self.socket_reads += now.0 - from.0;
        self.socket_bytes += now.1 - from.1;
        self.records += now.2 - from.2;
    }
}

/// Run `threads` clients: each runs `setup` (untimed), then all wait while the meter
/// reads, then each runs `work` until the shared deadline; the meter reads again once
/// all are done, and whatever `work` returned (open connections) is dropped after it.
fn window<S: Send, K: Send>(
    threads: usize,
    duration: Duration,
    meter: &Meter,
    setup: impl Fn(usize) -> std::io::Result<S> + Sync,
    work: impl Fn(S, Instant, &mut Tally) -> K + Sync,
) -> Result<Outcome, String> {
    let ready = Barrier::new(threads + 1);
    let go = Barrier::new(threads + 1);
    let start: Mutex<Option<Instant>> = Mutex::new(None);
    let setup_errors = AtomicU64::new(0);
    let (before, after, tallies, kept) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (ready, go, start, setup, work) = (&ready, &go, &start, &setup, &work);
                let setup_errors = &setup_errors;
                scope.spawn(move || {
                    let state = setup(i);
                    ready.wait();
                    go.wait();
                    let deadline = start.lock().map(|s| s.unwrap_or_else(Instant::now)).ok();
                    let mut tally = Tally::default();
                    let kept = match (state, deadline) {
                        (Ok(s), Some(d)) => Some(work(s, d + duration, &mut tally)),
                        _ => {
                            setup_errors.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                    };
                    (tally, kept)
                })
            })
            .collect();
        ready.wait();
        let before = meter.read();
        if let Ok(mut s) = start.lock() {
            *s = Some(before.at);
        }
        go.wait();
        let mut tallies = Vec::with_capacity(threads);
        let mut kept = Vec::with_capacity(threads);
        for h in handles {
            match h.join() {
                Ok((t, k)) => {
                    tallies.push(t);
                    kept.push(k);
                }
                Err(_) => tallies.push(Tally {
                    errors: 1,
                    ..Tally::default()
                }),
            }
        }
        let after = meter.read();
        (before, after, tallies, kept)
    });
    drop(kept);
    interrupt::check()?;
    let failed = setup_errors.load(Ordering::Relaxed);
    if failed as usize == threads {
        return Err(format!("all {threads} clients failed to connect"));
    }
    let mut out = Outcome {
        window: after.at - before.at,
        cpu_server: after.server.saturating_sub(before.server),
        cpu_client: after.client.saturating_sub(before.client),
        cpu_backend: after.backend.saturating_sub(before.backend),
        cpu_others: after
            .machine
            .saturating_sub(before.machine)
            .saturating_sub(after.server.saturating_sub(before.server))
            .saturating_sub(after.client.saturating_sub(before.client))
            .saturating_sub(after.backend.saturating_sub(before.backend)),
        errors: failed,
        ..Outcome::default()
    };
    for t in tallies {
        out.ops += t.ops;
        out.errors += t.errors;
        out.not_refused += t.not_refused;
        out.socket_reads += t.socket_reads;
        out.socket_bytes += t.socket_bytes;
        out.records += t.records;
        out.latencies_us.extend(t.latencies_us);
    }
    Ok(out)
}

fn running(deadline: Instant) -> bool {
    Instant::now() < deadline && !interrupt::interrupted()
}

/// Small requests one after another on `conns` kept-alive TLS connections.
pub fn keep_alive(
    ep: Endpoint,
    conns: usize,
    duration: Duration,
    config: &Arc<ClientConfig>,
    meter: &Meter,
) -> Result<Outcome, String> {
    window(
        conns,
        duration,
        meter,
        |_| {
            let mut s = ep.connect(config)?;
            let mut buf = vec![0u8; 4096];
            ep.get_small(&mut s, false, &mut buf)?;
            Ok((s, buf))
        },
        |(mut s, mut buf): (TlsStream, Vec<u8>), deadline, t| {
            while running(deadline) {
                let start = Instant::now();
                if let Ok(200) = ep.get_small(&mut s, false, &mut buf) {
                    t.done(start);
                    continue;
                }
                t.errors += 1;
                match ep.connect(config) {
                    Ok(fresh) => s = fresh,
                    Err(_) => break,
                }
            }
            s
        },
    )
}

/// A new TCP connection, a full handshake and one request per operation, `parallel`
/// at a time; the latency runs from connect to the response's last byte.
pub fn new_connections(
    ep: Endpoint,
    parallel: usize,
    duration: Duration,
    config: &Arc<ClientConfig>,
    meter: &Meter,
) -> Result<Outcome, String> {
    window(
        parallel,
        duration,
        meter,
        |_| Ok(vec![0u8; 4096]),
        |mut buf: Vec<u8>, deadline, t| {
            while running(deadline) {
                let start = Instant::now();
                match ep
                    .connect(config)
                    .and_then(|mut s| ep.get_small(&mut s, true, &mut buf))
                {
                    Ok(200) => t.done(start),
                    _ => t.errors += 1,
                }
            }
        },
    )
}

/// `streams` connections each downloading `path` again and again; counts the body
/// bytes received before the deadline.
pub fn bulk(
    ep: Endpoint,
    streams: usize,
    path: &'static str,
    duration: Duration,
    config: &Arc<ClientConfig>,
    meter: &Meter,
) -> Result<Outcome, String> {
    window(
        streams,
        duration,
        meter,
        |_| ep.connect(config),
        |mut s: TlsStream, deadline, t| {
            let mut buf = vec![0u8; 256 * 1024];
            let mut from = counters(&s);
            while running(deadline) {
                let mut got = 0u64;
                let result = tlsclient::get(&mut s, ep.sni, path, false, &mut buf, |n| {
                    got += n as u64;
                    running(deadline)
                });
                t.ops += got;
                match result {
                    Ok(200) if running(deadline) => {}
                    // Stopped mid-body at the deadline: the connection is dropped.
                    Ok(200) => break,
                    _ => {
                        t.errors += 1;
                        t.reads_of(&s, from);
                        match ep.connect(config) {
                            Ok(fresh) => s = fresh,
                            Err(_) => break,
                        }
                        from = counters(&s);
                    }
                }
            }
            t.reads_of(&s, from);
            s
        },
    )
}

/// New connections that each send the same ClientHello for a name the terminator does
/// not serve and read its answer; `ops` counts refusals (an alert or a close).
pub fn unknown_name_flood(
    ep: Endpoint,
    parallel: usize,
    duration: Duration,
    hello: &[u8],
    meter: &Meter,
) -> Result<Outcome, String> {
    window(
        parallel,
        duration,
        meter,
        |_| Ok(()),
        |(), deadline, t| {
            while running(deadline) {
                match tlsclient::probe(ep.addr(), hello) {
                    Ok(Answer::Alert(_) | Answer::Closed) => t.ops += 1,
                    Ok(Answer::Handshake) => t.not_refused += 1,
                    Err(_) => t.errors += 1,
                }
            }
        },
    )
}

/// Open `n` connections with 16 threads, each made by `make`; returns them (closed
/// when dropped) and how many failed.
pub fn open_many<T: Send>(
    n: usize,
    make: impl Fn() -> std::io::Result<T> + Sync,
) -> Result<(Vec<T>, u64), String> {
    const THREADS: usize = 16;
    let errors = AtomicU64::new(0);
    let per = n.div_ceil(THREADS);
    let opened: Vec<T> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let count = per.min(n.saturating_sub(i * per));
                let (errors, make) = (&errors, &make);
                scope.spawn(move || {
                    let mut held = Vec::with_capacity(count);
                    for _ in 0..count {
                        if interrupt::interrupted() {
                            break;
                        }
                        match make() {
                            Ok(c) => held.push(c),
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    held
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .flatten()
            .collect()
    });
    interrupt::check()?;
    Ok((opened, errors.load(Ordering::Relaxed)))
}
