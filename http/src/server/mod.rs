//! The server: one event-loop thread (mio, on epoll) owns every connection and does
//! all their I/O, handlers run on a bounded worker pool, so an idle or slow client
//! costs a socket and a few bytes, never a thread.
//!
//! What a hostile client can hold, and for how long:
//! - a connection that has not sent a whole request head within `header_timeout` (from
//!   the accept, or from the first byte of a later request) is dropped; the whole
//!   request must arrive within `request_timeout` (then 408);
//! - an idle keep-alive connection is closed after `idle_timeout`;
//! - one client address (an IPv4 address, an IPv6 /64) holds at most
//!   `max_connections_per_ip`; over it, its own oldest idle connection is closed, or
//!   the new one is refused;
//! - at `max_connections`, the oldest idle connection (one holding no byte of a
//!   request) is closed to make room; only when none is idle is a newcomer refused
//!   with 503.
//!
//! So a client from another address always finds room unless `max_connections` busy
//! (mid-request) connections exist at once, and those are bounded in time.

mod conn;
mod pool;
mod stats;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};
use slab::Slab;

use crate::request::{Limits, Progress, Request, RequestError, RequestReader};
use crate::response::Response;
use conn::{address_key, Conn, Outgoing, Phase, Stream};
use pool::{Finished, Job, Notify, Pool};
pub use stats::{Cap, RefusedRequest, ServerStats, StatsSnapshot};

/// Answers one request; called on a worker thread.
pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// Answers at once the requests that cost next to nothing (a health check, counters),
/// on the event-loop thread, so they skip the hop to a worker and back; `None` sends
/// the request to the workers. It must never block: everything else waits while it
/// runs.
pub type QuickHandler = dyn Fn(&Request) -> Option<Response> + Send + Sync;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Names the threads (`<name>-http`, `<name>-w<n>`) and the log lines.
    pub name: String,
    pub limits: Limits,
    /// A whole request head must arrive within this after the connection was accepted
    /// (or, on a kept-alive connection, after its first byte).
    pub header_timeout: Duration,
    /// A whole request (head and body) must arrive within this; an answer must be
    /// taken by the client within it too.
    pub request_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Most handler threads: at most this many requests are handled at once (threads
    /// are started as requests need them, and end when no longer needed).
    pub workers: usize,
    /// Where the loop counts what it did (accepts, refusals, evictions, timeouts):
    /// keep a clone to read them.
    pub stats: Arc<ServerStats>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: "http".into(),
            limits: Limits::default(),
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            max_connections_per_ip: 64,
            workers: 64,
            stats: Arc::default(),
        }
    }
}

enum Listener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<(Stream, Option<IpAddr>)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                // Answers are written whole: nothing is gained by holding them back.
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Some(address_key(peer))))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| (Stream::Unix(s), None)),
        }
    }
}

/// A server being set up: add listeners, then [`Server::start`].
pub struct Server {
    config: ServerConfig,
    handler: Arc<Handler>,
    quick: Option<Arc<QuickHandler>>,
    listeners: Vec<Listener>,
}

impl Server {
    pub fn new(config: ServerConfig, handler: Arc<Handler>) -> Server {
        Server {
            config,
            handler,
            quick: None,
            listeners: Vec::new(),
        }
    }

    /// Answer the requests `quick` takes on the event-loop thread (see
    /// [`QuickHandler`]).
    pub fn answer_quickly(&mut self, quick: Arc<QuickHandler>) {
        self.quick = Some(quick);
    }

    pub fn listen_tcp(&mut self, listener: std::net::TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.listeners
            .push(Listener::Tcp(mio::net::TcpListener::from_std(listener)));
        Ok(())
    }

    pub fn listen_unix(&mut self, listener: std::os::unix::net::UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        self.listeners
            .push(Listener::Unix(mio::net::UnixListener::from_std(listener)));
        Ok(())
    }

    /// Start the loop and the workers.
    pub fn start(self) -> io::Result<Running> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listeners = self.listeners;
        for (i, l) in listeners.iter_mut().enumerate() {
            let token = Token(i);
            match l {
                Listener::Tcp(l) => poll
                    .registry()
                    .register(l, token, mio::Interest::READABLE)?,
                Listener::Unix(l) => poll
                    .registry()
                    .register(l, token, mio::Interest::READABLE)?,
            }
        }
        let pending = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = mpsc::channel();
        let pool = Pool::start(
            &self.config.name,
            self.config.workers,
            self.handler,
            done_tx,
            Notify {
                waker: Arc::clone(&waker),
                pending: Arc::clone(&pending),
            },
        )?;
        let stop = Arc::new(Mutex::new(None));
        let first_conn = listeners.len();
        let mut ev = EventLoop {
            poll,
            config: self.config.clone(),
            listeners,
            first_conn,
            conns: Slab::new(),
            timers: BTreeSet::new(),
            idle: BTreeSet::new(),
            idle_seq: 0,
            per_address: HashMap::new(),
            pool: Some(pool),
            quick: self.quick,
            finished: done_rx,
            wake_pending: pending,
            stop: Arc::clone(&stop),
            draining_until: None,
            accept_paused_until: None,
            next_serial: 0,
            scratch: vec![0; 64 * 1024],
            refusals: RateLimited::default(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("{}-http", self.config.name))
            .spawn(move || ev.run())?;
        Ok(Running {
            stop,
            waker,
            thread,
        })
    }
}

/// A started server. Dropping it leaves the server running for the life of the
/// process; [`Running::shutdown`] stops it.
pub struct Running {
    stop: Arc<Mutex<Option<Instant>>>,
    waker: Arc<Waker>,
    thread: JoinHandle<bool>,
}

impl Running {
    /// Stop accepting, close idle connections, let requests in progress finish (their
    /// answers say `Connection: close`), for up to `timeout`. Returns whether every
    /// connection finished in time.
    pub fn shutdown(self, timeout: Duration) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + timeout);
        if self.waker.wake().is_err() {
            return false;
        }
        self.thread.join().unwrap_or(false)
    }
}

const WAKER: Token = Token(usize::MAX);
/// After an answer with `Connection: close`, how long we wait for the client to close.
const LINGER: Duration = Duration::from_secs(1);
/// ... and how much it may still send meanwhile.
const LINGER_BYTES: usize = 1024 * 1024;
/// Accepting pauses this long when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A warning that a flood could repeat thousands of times a second: logged at most
/// every 10 s, with how many were left out.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn warn(&mut self, name: &str, what: &str, detail: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            self.suppressed += 1;
            return;
        }
        log::warn!(server = name, detail = detail, suppressed = self.suppressed; "{what}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

struct EventLoop {
    poll: Poll,
    config: ServerConfig,
    /// Tokens `0..first_conn`; connections are `first_conn + slab key`.
    listeners: Vec<Listener>,
    first_conn: usize,
    conns: Slab<Conn>,
    /// Every connection's deadline, soonest first.
    timers: BTreeSet<(Instant, usize)>,
    /// Connections holding no byte of a request, oldest first: the ones closed to make
    /// room.
    idle: BTreeSet<(u64, usize)>,
    idle_seq: u64,
    per_address: HashMap<IpAddr, usize>,
    pool: Option<Pool>,
    quick: Option<Arc<QuickHandler>>,
    finished: Receiver<Finished>,
    wake_pending: Arc<AtomicBool>,
    stop: Arc<Mutex<Option<Instant>>>,
    /// Set once shutdown began: when it gives up on what is still running.
    draining_until: Option<Instant>,
    accept_paused_until: Option<Instant>,
    next_serial: u64,
    scratch: Vec<u8>,
    refusals: RateLimited,
}

impl EventLoop {
    fn run(&mut self) -> bool {
        let mut events = Events::with_capacity(1024);
        loop {
            // From here on a worker's answer must wake us; those sent before are in
            // the channel. While the loop works, workers need not wake it (see
            // `Notify`): busy, it takes answers without a round through epoll.
            self.wake_pending.store(false, Ordering::SeqCst);
            let answered = self.take_answers();
            let timeout = if answered {
                Some(Duration::ZERO)
            } else {
                self.next_timeout()
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!(server = self.config.name, error:% = e; "HTTP event loop failed");
                    return false;
                }
            }
            self.wake_pending.store(true, Ordering::SeqCst);
            for event in events.iter() {
                match event.token() {
                    WAKER => self.on_wake(),
                    Token(t) if t < self.first_conn => self.accept(t),
                    Token(t) => {
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        self.on_ready(t - self.first_conn, readable)
                    }
                }
            }
            self.expire_timers();
            if let Some(clean) = self.shutdown_finished() {
                let pool = self.pool.take();
                if let Some(pool) = pool {
                    pool.close(clean);
                }
                return clean;
            }
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        [
            self.timers.first().map(|(t, _)| *t),
            self.accept_paused_until,
            self.draining_until,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.saturating_duration_since(now))
    }

    // --- accepting -------------------------------------------------------------------

    fn accept(&mut self, listener: usize) {
        if self.accept_paused_until.is_some() || self.draining_until.is_some() {
            return;
        }
        loop {
            let Some(l) = self.listeners.get(listener) else {
                return;
            };
            match l.accept() {
                Ok((stream, address)) => self.admit(stream, address),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of descriptors (or memory): retrying at once would spin.
                    self.refusals.warn(
                        &self.config.name,
                        "accept failed; pausing accepts",
                        &e.to_string(),
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut stream: Stream, address: Option<IpAddr>) {
        if let Some(addr) = address {
            if self.per_address.get(&addr).copied().unwrap_or(0)
                >= self.config.max_connections_per_ip
            {
                match self.oldest_idle(Some(addr)) {
                    Some(victim) => self.evict(victim, Cap::PerAddress),
                    None => return self.refuse(stream, Cap::PerAddress),
                }
            }
        }
        if self.conns.len() >= self.config.max_connections {
            match self.oldest_idle(None) {
                Some(victim) => self.evict(victim, Cap::Total),
                None => return self.refuse(stream, Cap::Total),
            }
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = stream.register(self.poll.registry(), Token(self.first_conn + key)) {
            log::warn!(server = self.config.name, error:% = e; "cannot watch a new connection");
            return;
        }
        self.next_serial += 1;
        entry.insert(Conn {
            serial: self.next_serial,
            stream,
            address,
            phase: Phase::Reading,
            inbuf: Vec::new(),
            reader: RequestReader::new(self.config.limits),
            out: Outgoing::default(),
            since: Instant::now(),
            readable: true,
            served: 0,
            deadline: None,
            idle: None,
        });
        if let Some(addr) = address {
            *self.per_address.entry(addr).or_default() += 1;
        }
        self.config.stats.accepted(self.conns.len());
        self.enter_idle(key);
    }

    /// A best-effort 503 on a connection we will not keep: the socket is new, so the
    /// few bytes fit its buffer.
    fn refuse(&mut self, mut stream: Stream, cap: Cap) {
        self.config.stats.refused(cap);
        let why = match cap {
            Cap::PerAddress => "too many connections from this address",
            Cap::Total => "connection limit reached",
        };
        self.refusals
            .warn(&self.config.name, "connection refused", why);
        let mut out = Outgoing::default();
        out.push(Response::error(503, "too_many_connections", why).to_bytes(1, false, false));
        let _ = out.flush(&mut stream);
        stream.shutdown_write();
    }

    fn oldest_idle(&self, address: Option<IpAddr>) -> Option<usize> {
        self.idle
            .iter()
            .map(|&(_, key)| key)
            .find(|&key| address.is_none() || self.conns[key].address == address)
    }

    // --- bookkeeping -----------------------------------------------------------------

    fn set_deadline(&mut self, key: usize, deadline: Option<Instant>) {
        let conn = &mut self.conns[key];
        if conn.deadline == deadline {
            return;
        }
        if let Some(old) = conn.deadline.take() {
            self.timers.remove(&(old, key));
        }
        if let Some(new) = deadline {
            self.timers.insert((new, key));
        }
        conn.deadline = deadline;
    }

    /// The connection holds no byte of a request: it may be closed to make room, and
    /// waits under the head deadline (new) or the idle timeout (kept alive).
    fn enter_idle(&mut self, key: usize) {
        self.idle_seq += 1;
        let seq = self.idle_seq;
        let conn = &mut self.conns[key];
        debug_assert!(conn.idle.is_none());
        conn.idle = Some(seq);
        self.idle.insert((seq, key));
        let c = &self.config;
        let wait = if conn.served == 0 {
            c.header_timeout.min(c.request_timeout)
        } else {
            c.idle_timeout
        };
        let deadline = conn.since + wait;
        self.set_deadline(key, Some(deadline));
    }

    fn leave_idle(&mut self, key: usize) {
        if let Some(seq) = self.conns[key].idle.take() {
            self.idle.remove(&(seq, key));
        }
    }

    /// Close an idle connection to make room under `cap`.
    fn evict(&mut self, key: usize, cap: Cap) {
        self.config.stats.evicted(cap);
        self.close(key);
    }

    fn close(&mut self, key: usize) {
        self.set_deadline(key, None);
        self.leave_idle(key);
        let mut conn = self.conns.remove(key);
        self.config.stats.set_open(self.conns.len());
        conn.stream.deregister(self.poll.registry());
        if let Some(addr) = conn.address {
            if let Some(n) = self.per_address.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    self.per_address.remove(&addr);
                }
            }
        }
    }

    // --- connections -----------------------------------------------------------------

    fn on_ready(&mut self, key: usize, readable: bool) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.readable |= readable;
        match conn.phase {
            Phase::Reading => self.read_requests(key),
            Phase::Handling => {}
            Phase::Writing { .. } => self.write_answer(key),
            Phase::Lingering { .. } => self.linger(key),
        }
    }

    /// Parse what arrived, and read more, until a whole request goes to a worker, the
    /// socket is empty, or the request is refused.
    fn read_requests(&mut self, key: usize) {
        loop {
            let conn = &mut self.conns[key];
            if !conn.out.is_empty() {
                // A `100 Continue` still on its way.
                if let Err(e) = conn.out.flush(&mut conn.stream) {
                    log::debug!(error:% = e; "write failed");
                    return self.close(key);
                }
            }
            match conn.reader.advance(&mut conn.inbuf) {
                Ok(Progress::Done(request)) => return self.dispatch(key, request),
                Ok(Progress::SendContinue) => {
                    conn.out.push(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec());
                    continue;
                }
                Ok(Progress::NeedMore) => {}
                Err(e) => return self.refuse_request(key, e),
            }
            let conn = &mut self.conns[key];
            if !conn.readable {
                // Nothing arrived since the last read came back empty.
                break;
            }
            match conn.stream.read(&mut self.scratch) {
                // The client went away, between requests or in the middle of one.
                Ok(0) => return self.close(key),
                Ok(n) => {
                    if conn.idle.is_some() {
                        if conn.served > 0 {
                            // The clock of a kept-alive connection's next request
                            // starts at its first byte.
                            conn.since = Instant::now();
                        }
                        self.leave_idle(key);
                    }
                    self.conns[key].inbuf.extend_from_slice(&self.scratch[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!(error:% = e; "read failed");
                    return self.close(key);
                }
            }
        }
        // Waiting for more of a request: its deadline.
        let conn = &self.conns[key];
        if conn.idle.is_none() {
            let c = &self.config;
            let wait = if conn.reader.head_read() {
                c.request_timeout
            } else {
                c.header_timeout.min(c.request_timeout)
            };
            let deadline = conn.since + wait;
            self.set_deadline(key, Some(deadline));
        }
    }

    fn dispatch(&mut self, key: usize, request: Request) {
        self.set_deadline(key, None);
        let conn = &mut self.conns[key];
        conn.phase = Phase::Handling;
        let serial = conn.serial;
        if let Some(quick) = &self.quick {
            if let Some(response) = pool::run(|| quick(&request), &request) {
                self.answer(Finished::answering(key, serial, &request, response));
                return;
            }
        }
        let job = Job {
            key,
            serial: conn.serial,
            request,
        };
        if let Some(pool) = &self.pool {
            pool.submit(job);
        }
    }

    /// Answer a request we cannot serve, and close.
    fn refuse_request(&mut self, key: usize, e: RequestError) {
        log::debug!(server = self.config.name, error:% = e; "request refused");
        self.config.stats.refused_request(&e);
        self.leave_idle(key);
        let conn = &mut self.conns[key];
        conn.out.push(e.into_response().to_bytes(1, false, false));
        self.start_writing(key, false);
    }

    fn start_writing(&mut self, key: usize, keep_alive: bool) {
        self.conns[key].phase = Phase::Writing { keep_alive };
        let deadline = Instant::now() + self.config.request_timeout;
        self.set_deadline(key, Some(deadline));
        self.write_answer(key);
    }

    /// Write the answers the workers sent; whether there were any.
    fn take_answers(&mut self) -> bool {
        let mut any = false;
        while let Ok(done) = self.finished.try_recv() {
            self.answer(done);
            any = true;
        }
        any
    }

    fn on_wake(&mut self) {
        let stop = *self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(deadline), None) = (stop, self.draining_until) {
            self.begin_shutdown(deadline);
        }
    }

    fn answer(&mut self, done: Finished) {
        let shutting_down = self.draining_until.is_some();
        let Some(conn) = self.conns.get_mut(done.key) else {
            return;
        };
        if conn.serial != done.serial || conn.phase != Phase::Handling {
            return;
        }
        let keep_alive = done.keep_alive && !shutting_down;
        conn.out
            .push(done.response.head_bytes(done.version, keep_alive));
        if !done.head_only {
            conn.out.push(done.response.body);
        }
        self.start_writing(done.key, keep_alive);
    }

    fn write_answer(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let Phase::Writing { keep_alive } = conn.phase else {
            return;
        };
        match conn.out.flush(&mut conn.stream) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                log::debug!(error:% = e; "write failed");
                return self.close(key);
            }
        }
        conn.served += 1;
        // An answer that began before shutdown still promised keep-alive: the
        // connection is closed all the same, as any idle one is.
        if keep_alive && self.draining_until.is_none() {
            conn.phase = Phase::Reading;
            conn.since = Instant::now();
            if conn.inbuf.is_empty() {
                self.enter_idle(key);
            }
            // The next request may be here already (pipelined, or read with this one).
            self.read_requests(key);
        } else {
            self.start_lingering(key);
        }
    }

    /// Close after a last answer without resetting the connection: closing with unread
    /// input makes the kernel send RST, which can destroy the answer in flight.
    fn start_lingering(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.stream.shutdown_write();
        conn.phase = Phase::Lingering { drained: 0 };
        self.set_deadline(key, Some(Instant::now() + LINGER));
        self.linger(key);
    }

    fn linger(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let Phase::Lingering { mut drained } = conn.phase else {
            return;
        };
        loop {
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => return self.close(key),
                Ok(n) => {
                    drained += n;
                    if drained > LINGER_BYTES {
                        return self.close(key);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(key),
            }
        }
        conn.phase = Phase::Lingering { drained };
    }

    fn expire_timers(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            // Edge-triggered: what queued up meanwhile announces nothing more.
            for l in 0..self.listeners.len() {
                self.accept(l);
            }
        }
        while let Some(&(deadline, key)) = self.timers.first() {
            if deadline > now {
                break;
            }
            self.timers.pop_first();
            self.conns[key].deadline = None;
            self.on_timeout(key);
        }
    }

    fn on_timeout(&mut self, key: usize) {
        let conn = &self.conns[key];
        match conn.phase {
            // Nothing of a request arrived: a quiet close.
            Phase::Reading if conn.idle.is_some() => {
                self.config.stats.idle_timeout();
                self.close(key)
            }
            Phase::Reading => self.refuse_request(key, RequestError::Timeout),
            // The client does not take its answer, or does not close after it.
            Phase::Writing { .. } | Phase::Lingering { .. } => self.close(key),
            Phase::Handling => {}
        }
    }

    // --- shutdown --------------------------------------------------------------------

    fn begin_shutdown(&mut self, deadline: Instant) {
        self.draining_until = Some(deadline);
        for l in self.listeners.drain(..) {
            // Dropping a listener closes it; mio forgets it with the descriptor.
            drop(l);
        }
        let idle: Vec<usize> = self.idle.iter().map(|&(_, key)| key).collect();
        for key in idle {
            self.close(key);
        }
    }

    /// `Some(clean)` once the loop may stop: every request answered, or time is up.
    fn shutdown_finished(&mut self) -> Option<bool> {
        let deadline = self.draining_until?;
        let busy = self
            .conns
            .iter()
            .any(|(_, c)| !matches!(c.phase, Phase::Lingering { .. }));
        if busy && Instant::now() < deadline {
            return None;
        }
        Some(!busy)
    }
}
