//! The loads, each bounded in time: client threads set up their connections, the meter
//! reads every process's CPU, the threads run until the deadline, the meter reads again,
//! and only then are the connections closed, so set-up and tear-down stay outside the
//! measured window.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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

/// Event loops the unknown-name flood runs its connections on.
const FLOOD_LOOPS: usize = 2;

/// New connections that each send the same ClientHello for a name the terminator does
/// not serve and read its answer; `ops` counts refusals (an alert or a close).
///
/// Unlike the other loads, `parallel` connections are kept in flight by
/// [`FLOOD_LOOPS`] event loops (non-blocking sockets, epoll) rather than a thread each:
/// a refusal costs the terminator little, and a blocking thread per connection cost
/// the client twice the forwarder's CPU per refusal (two sleeps and wake-ups each),
/// so the rate measured was the client's. The same client runs against every
/// terminator.
pub fn unknown_name_flood(
    ep: Endpoint,
    parallel: usize,
    duration: Duration,
    hello: &[u8],
    meter: &Meter,
) -> Result<Outcome, String> {
    let loops = FLOOD_LOOPS.clamp(1, parallel.max(1));
    window(
        loops,
        duration,
        meter,
        |i| Ok(parallel / loops + usize::from(i < parallel % loops)),
        |conns: usize, deadline, t| {
            if flood(ep.addr(), hello, conns, deadline, t).is_err() {
                t.errors += 1;
            }
        },
    )
}

/// One connection of the flood: its hello sent or not, and the answer's first bytes.
struct Probe {
    sock: TcpStream,
    sent: bool,
    head: [u8; tlsclient::ANSWER_HEAD],
    have: usize,
}

/// One event loop of the flood: `conns` connections, each replaced by a new one as
/// soon as it has its answer, until the deadline.
fn flood(
    addr: SocketAddr,
    hello: &[u8],
    conns: usize,
    deadline: Instant,
    t: &mut Tally,
) -> std::io::Result<()> {
    use rustix::event::epoll;
    let poll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let mut probes: Vec<Option<Probe>> = (0..conns).map(|_| None).collect();
    let mut events = Vec::with_capacity(conns.max(1));
    // Short enough to see the deadline on time when nothing answers.
    let tick = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    while running(deadline) {
        for (i, slot) in probes.iter_mut().enumerate().filter(|(_, p)| p.is_none()) {
            match open_probe(&poll, addr, hello, i as u64) {
                Ok(p) => *slot = Some(p),
                Err(_) => t.errors += 1,
            }
        }
        events.clear();
        match epoll::wait(
            &poll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&tick),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        for event in &events {
            let i = event.data.u64() as usize;
            let Some(p) = probes.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            match advance(p, hello) {
                Step::Wait => {}
                Step::Sent => {
                    let data = epoll::EventData::new_u64(i as u64);
                    epoll::modify(&poll, &p.sock, data, epoll::EventFlags::IN)?;
                }
                Step::Done(answer) => {
                    match answer {
                        Ok(Answer::Handshake) => t.not_refused += 1,
                        Ok(Answer::Alert(_) | Answer::Closed) => t.ops += 1,
                        Err(_) => t.errors += 1,
                    }
                    probes[i] = None; // closing it takes it out of the epoll set
                }
            }
        }
    }
    Ok(())
}

/// What a probe's event led to.
enum Step {
    /// Nothing new: wait for the next event.
    Wait,
    /// The hello went: wait for the answer.
    Sent,
    Done(std::io::Result<Answer>),
}

/// A new connection with its hello sent if the connect is already done (on loopback it
/// usually is), registered for the event it waits for.
fn open_probe(
    poll: &impl std::os::fd::AsFd,
    addr: SocketAddr,
    hello: &[u8],
    token: u64,
) -> std::io::Result<Probe> {
    use rustix::event::epoll;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    let fd = rustix::net::socket_with(AddressFamily::INET, SocketType::STREAM, flags, None)?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let mut p = Probe {
        sock: TcpStream::from(fd),
        sent: false,
        head: [0; tlsclient::ANSWER_HEAD],
        have: 0,
    };
    let wait_for = match send_hello(&mut p, hello)? {
        true => epoll::EventFlags::IN,
        false => epoll::EventFlags::OUT,
    };
    epoll::add(poll, &p.sock, epoll::EventData::new_u64(token), wait_for)?;
    Ok(p)
}

/// Send the hello unless the connect is still under way (false).
fn send_hello(p: &mut Probe, hello: &[u8]) -> std::io::Result<bool> {
    match (&p.sock).write(hello) {
        Ok(n) if n == hello.len() => {
            p.sent = true;
            Ok(true)
        }
        Ok(_) => Err(std::io::Error::other(
            "the ClientHello did not fit in one write",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTCONN.raw_os_error()) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A probe's socket is ready: send its hello, or read its answer.
fn advance(p: &mut Probe, hello: &[u8]) -> Step {
    if !p.sent {
        return match send_hello(p, hello) {
            Ok(true) => Step::Sent,
            Ok(false) => Step::Wait,
            Err(e) => Step::Done(Err(e)),
        };
    }
    loop {
        match (&p.sock).read(&mut p.head[p.have..]) {
            Ok(0) => {
                let head = &p.head[..p.have];
                return Step::Done(tlsclient::answer(head, true).unwrap_or(Ok(Answer::Closed)));
            }
            Ok(n) => {
                p.have += n;
                if let Some(answer) = tlsclient::answer(&p.head[..p.have], false) {
                    return Step::Done(answer);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if p.have == 0 && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Step::Done(Ok(Answer::Closed))
            }
            Err(e) => return Step::Done(Err(e)),
        }
    }
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
