//! One proxied connection as an explicit state machine.
//!
//! ```text
//! accept ─► Peek ─► (Postgres: PgReply ─► Peek) ─► Handshake ─► Stream ─► Closing
//!             │                                      │  dial runs alongside
//!             └─► Refuse (alert, no crypto) ─► Linger ◄┘  (502 / close_notify)
//! raw: accept ─► Dial ─► Stream ─► Closing
//! ```
//!
//! Every completion lands in [`Conn::on_completion`], which records what happened;
//! [`Conn::advance`] then looks at the whole state and submits whatever can run next.
//! Memory per connection is bounded: at most four buffers plus rustls' own bounded
//! buffers, and an idle connection holds none of ours: receives take a buffer from the
//! ring's pool only when data arrives, and outgoing buffers are allocated while they
//! hold bytes. Flow control falls out of the buffers: a side is read only when the data
//! last read from it has been passed on.

use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use rustls::ServerConnection;

use super::dial::backend_socket;
use super::ring::{BufId, Ring};
use super::Shared;
use crate::config::Protocol;
use crate::metrics::{HandshakeFailure, Outcome};
use crate::resolver::Route;
use crate::sni::{self, Peek, PgPreamble};

/// Size of each data buffer: one maximal TLS record with its overhead.
pub const BUF_LEN: usize = 16 * 1024 + 512;
/// The client buffer also holds a whole ClientHello (after a Postgres preamble).
const CLIENT_BUF_LEN: usize = if sni::MAX_CLIENT_HELLO + sni::PG_PREAMBLE_LEN > BUF_LEN {
    sni::MAX_CLIENT_HELLO + sni::PG_PREAMBLE_LEN
} else {
    BUF_LEN
};

/// What the HTTPS listener answers when the VM cannot be reached, as the original does.
fn response_502() -> Vec<u8> {
    let body = "502 Bad Gateway: the VM did not accept the connection\n";
    format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The operations a connection can have in flight, at most one of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    ClientRecv = 0,
    ClientSend = 1,
    BackendRecv = 2,
    BackendSend = 3,
    Connect = 4,
    ClientShutdown = 5,
    BackendShutdown = 6,
    CancelClient = 7,
    CancelBackend = 8,
}

impl Op {
    const ALL: [Op; 9] = [
        Op::ClientRecv,
        Op::ClientSend,
        Op::BackendRecv,
        Op::BackendSend,
        Op::Connect,
        Op::ClientShutdown,
        Op::BackendShutdown,
        Op::CancelClient,
        Op::CancelBackend,
    ];

    fn bit(self) -> u16 {
        1 << (self as u8)
    }

    pub fn token(self, slot: u32) -> u32 {
        (slot << 4) | self as u32
    }

    /// Split a connection token into its slot and operation.
    pub fn from_token(token: u32) -> Option<(u32, Op)> {
        let op = *Op::ALL.get((token & 0xf) as usize)?;
        Some((token >> 4, op))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the ClientHello (TLS listeners only).
    Peek,
    /// Sending the one-byte answer to a Postgres SSLRequest / GSSENCRequest.
    PgReply,
    /// Raw listener: waiting for the backend connect.
    Dial,
    /// rustls handshaking while the backend connect runs.
    Handshake,
    /// Both ways open (or half-closed).
    Stream,
    /// Flushing a last word (alert, 502, close_notify), then reading the client until
    /// it closes, so unread input does not turn our close into a reset.
    Linger,
    /// Waiting for in-flight operations to finish before freeing.
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dial {
    Idle,
    Pending,
    Up,
    Failed,
}

pub struct Conn {
    slot: u32,
    listener: usize,
    client: OwnedFd,
    backend: Option<OwnedFd>,
    /// Bytes from the client (ciphertext on TLS listeners). While peeking, an owned
    /// buffer that accumulates the ClientHello; afterwards whatever a receive returned.
    cin: Option<BufId>,
    /// Bytes from the backend (plaintext).
    bin: Option<BufId>,
    /// TLS listeners: ciphertext to the client, plaintext to the backend.
    cout: Option<BufId>,
    bout: Option<BufId>,
    tls: Option<Box<ServerConnection>>,
    phase: Phase,
    dial: Dial,
    outcome: Outcome,
    inflight: u16,
    cancelled: bool,
    client_eof: bool,
    backend_eof: bool,
    client_shut: bool,
    backend_shut: bool,
    close_notify_sent: bool,
    /// TLS: the client's plaintext stream ended (close_notify, or TCP EOF after it).
    client_done: bool,
    /// TLS: rustls was told about the client's TCP EOF.
    eof_fed: bool,
    /// Handshake (or linger) deadline; `None` once streaming, where the idle timeout rules.
    deadline: Option<Instant>,
    last_active: Instant,
    accepted_at: Instant,
    dial_started: Instant,
}

/// Borrowed worker state a connection works with.
pub struct Ctx<'a> {
    pub ring: &'a mut Ring,
    pub shared: &'a Shared,
    pub now: Instant,
}

impl Conn {
    pub fn new(cx: &mut Ctx<'_>, slot: u32, listener: usize, client: OwnedFd) -> Conn {
        let tls_listener = cx.shared.listeners[listener].tls.is_some();
        let now = cx.now;
        let cin = tls_listener.then(|| cx.ring.alloc_buf(CLIENT_BUF_LEN));
        Conn {
            slot,
            listener,
            client,
            backend: None,
            cin,
            bin: None,
            cout: None,
            bout: None,
            tls: None,
            phase: if tls_listener {
                Phase::Peek
            } else {
                Phase::Dial
            },
            dial: Dial::Idle,
            outcome: Outcome::Ok,
            inflight: 0,
            cancelled: false,
            client_eof: false,
            backend_eof: false,
            client_shut: false,
            backend_shut: false,
            close_notify_sent: false,
            client_done: false,
            eof_fed: false,
            deadline: Some(now + cx.shared.config.handshake_timeout),
            last_active: now,
            accepted_at: now,
            dial_started: now,
        }
    }

    pub fn listener(&self) -> usize {
        self.listener
    }

    /// Start a freshly accepted connection.
    pub fn start(&mut self, cx: &mut Ctx<'_>) {
        if self.phase == Phase::Dial {
            match cx.shared.resolver.snapshot().first() {
                Some(route) => self.start_dial(cx, &route),
                None => {
                    log::debug!("raw connection refused: no VM to route to");
                    self.close(Outcome::DialFailed);
                }
            }
        }
        self.advance(cx);
    }

    /// All operations reaped after a close: the slot can be freed.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Closing && self.inflight == 0
    }

    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Give the buffers back to the ring; the sockets close when `self` drops.
    pub fn free(self, ring: &mut Ring) {
        for id in [self.cin, self.bin, self.cout, self.bout]
            .into_iter()
            .flatten()
        {
            ring.release_buf(id);
        }
    }

    /// Enforce the handshake, linger and idle deadlines.
    pub fn check_timers(&mut self, cx: &mut Ctx<'_>) {
        if self.phase == Phase::Closing {
            return;
        }
        let expired = match self.deadline {
            Some(d) => cx.now >= d,
            None => cx.now.duration_since(self.last_active) >= cx.shared.config.idle_timeout,
        };
        if expired {
            if matches!(self.phase, Phase::Peek | Phase::PgReply | Phase::Handshake) {
                cx.shared
                    .metrics
                    .handshake_failed(HandshakeFailure::Timeout);
            }
            let outcome = if self.phase == Phase::Linger {
                self.outcome
            } else {
                Outcome::Timeout
            };
            self.close(outcome);
            self.advance(cx);
        }
    }

    /// Shutdown drain is over: close whatever is still open.
    pub fn abort(&mut self, cx: &mut Ctx<'_>) {
        if self.phase != Phase::Closing {
            self.close(Outcome::Error);
            self.advance(cx);
        }
    }

    // ---- completions ---------------------------------------------------------------

    pub fn on_completion(&mut self, cx: &mut Ctx<'_>, op: Op, res: i32, received: Option<BufId>) {
        self.inflight &= !op.bit();
        if let Some(id) = received {
            let slot = if op == Op::BackendRecv {
                &mut self.bin
            } else {
                &mut self.cin
            };
            if let Some(old) = slot.replace(id) {
                cx.ring.release_buf(old);
            }
        }
        if res > 0
            && matches!(
                op,
                Op::ClientRecv | Op::ClientSend | Op::BackendRecv | Op::BackendSend
            )
        {
            self.last_active = cx.now;
            match op {
                Op::BackendSend => cx.shared.metrics.bytes(self.listener, res as u64, 0),
                Op::ClientSend => cx.shared.metrics.bytes(self.listener, 0, res as u64),
                _ => {}
            }
        }
        if self.phase == Phase::Closing {
            return;
        }
        if res == -libc::ENOBUFS {
            // The pool ran dry: this receive gets a buffer of its own.
            return self.recv_fallback(cx, op);
        }
        match op {
            Op::ClientRecv => match res {
                0 => self.on_client_eof(),
                n if n < 0 => self.close(Outcome::Error),
                _ => {}
            },
            Op::BackendRecv => match res {
                0 => self.backend_eof = true,
                n if n < 0 => self.close(Outcome::Error),
                _ => {}
            },
            Op::ClientSend if res < 0 => self.close(Outcome::Error),
            Op::BackendSend if res < 0 => self.close(Outcome::Error),
            Op::Connect => self.on_connected(cx, res),
            _ => {}
        }
        self.advance(cx);
    }

    fn on_client_eof(&mut self) {
        self.client_eof = true;
        match self.phase {
            Phase::Peek | Phase::PgReply | Phase::Handshake => self.close(Outcome::Error),
            Phase::Linger => self.close(self.outcome),
            // Raw: `pump_raw` shuts the backend's write side; TLS: rustls is told
            // once it has consumed what came before the EOF.
            _ => {}
        }
    }

    fn on_connected(&mut self, cx: &mut Ctx<'_>, res: i32) {
        if res == 0 {
            self.dial = Dial::Up;
            cx.shared
                .metrics
                .dial_latency(cx.now.duration_since(self.dial_started));
            if self.phase == Phase::Dial {
                self.phase = Phase::Stream;
                self.deadline = None;
            }
            return;
        }
        self.dial = Dial::Failed;
        self.backend = None;
        let err = if res == -libc::ECANCELED {
            "timed out".to_string()
        } else {
            io::Error::from_raw_os_error(-res).to_string()
        };
        log::debug!("backend dial failed: {err}");
        if self.tls.is_none() {
            self.close(Outcome::DialFailed);
        }
        // A TLS connection learns of it when its handshake completes.
    }

    // ---- the state machine ---------------------------------------------------------

    fn close(&mut self, outcome: Outcome) {
        if self.phase != Phase::Closing {
            self.outcome = outcome;
            self.phase = Phase::Closing;
        }
    }

    fn is_in_flight(&self, op: Op) -> bool {
        self.inflight & op.bit() != 0
    }

    fn submitted(&mut self, op: Op) {
        self.inflight |= op.bit();
    }

    pub fn advance(&mut self, cx: &mut Ctx<'_>) {
        loop {
            let before = self.phase;
            match self.phase {
                Phase::Peek => self.peek(cx),
                Phase::PgReply => self.pg_reply(cx),
                Phase::Dial => {}
                Phase::Handshake | Phase::Stream if self.tls.is_some() => self.pump_tls(cx),
                Phase::Handshake | Phase::Stream => self.pump_raw(cx),
                Phase::Linger => self.linger(cx),
                Phase::Closing => self.closing(cx),
            }
            if self.phase == before {
                return;
            }
        }
    }

    /// While peeking: receive more into the accumulating ClientHello buffer.
    fn recv_more_hello(&mut self, cx: &mut Ctx<'_>) {
        if let Some(cin) = self.cin {
            if !self.is_in_flight(Op::ClientRecv)
                && cx
                    .ring
                    .recv(self.client.as_fd(), cin, Op::ClientRecv.token(self.slot))
            {
                self.submitted(Op::ClientRecv);
            }
        }
    }

    fn recv_fallback(&mut self, cx: &mut Ctx<'_>, op: Op) {
        let (fd, slot) = match op {
            Op::ClientRecv => (self.client.as_fd(), &mut self.cin),
            Op::BackendRecv => match self.backend.as_ref() {
                Some(fd) => (fd.as_fd(), &mut self.bin),
                None => return self.close(Outcome::Error),
            },
            _ => return,
        };
        let buf = buffer(cx.ring, slot);
        if cx.ring.recv(fd, buf, op.token(self.slot)) {
            self.inflight |= op.bit();
        }
    }

    fn send_client(&mut self, cx: &mut Ctx<'_>) {
        if let Some(cout) = self.cout {
            if !self.is_in_flight(Op::ClientSend)
                && cx
                    .ring
                    .send(self.client.as_fd(), cout, Op::ClientSend.token(self.slot))
            {
                self.submitted(Op::ClientSend);
            }
        }
    }

    fn peek(&mut self, cx: &mut Ctx<'_>) {
        let Some(cin) = self.cin else {
            return self.close(Outcome::Error);
        };
        if self.is_in_flight(Op::ClientRecv) {
            return;
        }
        let data = cx.ring.data(cin);
        if data.is_empty() {
            return self.recv_more_hello(cx);
        }
        let protocol = cx.shared.listeners[self.listener].protocol;
        if protocol == Some(Protocol::Postgres) && data[0] != 0x16 {
            let answer = match sni::postgres_preamble(data) {
                PgPreamble::NeedMore => return self.recv_more_hello(cx),
                PgPreamble::SslRequest => b'S',
                PgPreamble::GssEncRequest => b'N',
                PgPreamble::Other => {
                    cx.shared.metrics.handshake_failed(HandshakeFailure::NotTls);
                    return self.close(Outcome::HandshakeFailed);
                }
            };
            cx.ring.consume(cin, sni::PG_PREAMBLE_LEN);
            self.say(cx, &[answer]);
            self.phase = Phase::PgReply;
            return;
        }
        let hello = match sni::peek_client_hello(data) {
            Peek::NeedMore if cx.ring.is_full(cin) => {
                return self.refuse(cx, HandshakeFailure::Malformed, sni::ALERT_DECODE_ERROR);
            }
            Peek::NeedMore => return self.recv_more_hello(cx),
            Peek::Hello(hello) => hello,
            Peek::NotTls => {
                cx.shared.metrics.handshake_failed(HandshakeFailure::NotTls);
                return self.close(Outcome::HandshakeFailed);
            }
            Peek::TooLarge => {
                return self.refuse(cx, HandshakeFailure::TooLarge, sni::ALERT_DECODE_ERROR);
            }
            Peek::Malformed(_) => {
                return self.refuse(cx, HandshakeFailure::Malformed, sni::ALERT_DECODE_ERROR);
            }
        };
        let Some(name) = hello.sni else {
            return self.refuse(cx, HandshakeFailure::NoSni, sni::ALERT_UNRECOGNIZED_NAME);
        };
        let Some(route) = cx.shared.resolver.snapshot().resolve_sni(&name) else {
            log::debug!("unknown server name {name:?}");
            return self.refuse(
                cx,
                HandshakeFailure::UnknownSni,
                sni::ALERT_UNRECOGNIZED_NAME,
            );
        };
        let Some(config) = cx.shared.listeners[self.listener].tls.clone() else {
            return self.close(Outcome::HandshakeFailed);
        };
        match ServerConnection::new(config) {
            Ok(tls) => self.tls = Some(Box::new(tls)),
            Err(e) => {
                log::warn!("cannot start a TLS session: {e}");
                return self.close(Outcome::HandshakeFailed);
            }
        }
        self.phase = Phase::Handshake;
        self.start_dial(cx, &route);
    }

    /// Queue a few bytes for the client (a one-byte Postgres answer, an alert).
    fn say(&mut self, cx: &mut Ctx<'_>, bytes: &[u8]) {
        let cout = buffer(cx.ring, &mut self.cout);
        let _ = cx.ring.fill(cout, |tail| {
            let n = bytes.len().min(tail.len());
            tail[..n].copy_from_slice(&bytes[..n]);
            Ok::<_, ()>(n)
        });
        self.send_client(cx);
    }

    fn pg_reply(&mut self, cx: &mut Ctx<'_>) {
        if !self.is_in_flight(Op::ClientSend) {
            if has_data(cx.ring, self.cout) {
                self.send_client(cx);
            } else {
                self.phase = Phase::Peek;
            }
        }
    }

    /// Refuse before any crypto: a plaintext fatal alert, then linger.
    fn refuse(&mut self, cx: &mut Ctx<'_>, why: HandshakeFailure, alert: u8) {
        cx.shared.metrics.handshake_failed(why);
        self.say(cx, &sni::alert_record(alert));
        let outcome = match why {
            HandshakeFailure::NoSni => Outcome::NoSni,
            HandshakeFailure::UnknownSni => Outcome::UnknownSni,
            _ => Outcome::HandshakeFailed,
        };
        self.linger_with(cx, outcome);
    }

    fn linger_with(&mut self, cx: &mut Ctx<'_>, outcome: Outcome) {
        self.outcome = outcome;
        self.phase = Phase::Linger;
        self.deadline = Some(cx.now + cx.shared.config.handshake_timeout);
    }

    fn linger(&mut self, cx: &mut Ctx<'_>) {
        if self.is_in_flight(Op::ClientSend) {
            return;
        }
        if let Some(tls) = self.tls.as_mut() {
            if !has_data(cx.ring, self.cout) && tls.wants_write() {
                let cout = buffer(cx.ring, &mut self.cout);
                let _ = cx.ring.fill(cout, |tail| tls.write_tls(&mut &mut tail[..]));
            }
        }
        if has_data(cx.ring, self.cout) {
            return self.send_client(cx);
        }
        if !self.client_shut {
            self.client_shut = true;
            cx.ring.shutdown(
                self.client.as_fd(),
                libc::SHUT_WR,
                Op::ClientShutdown.token(self.slot),
            );
            self.submitted(Op::ClientShutdown);
        }
        // Discard whatever the client still sends until it closes.
        if !self.is_in_flight(Op::ClientRecv) {
            if let Some(cin) = self.cin {
                let pending = cx.ring.data(cin).len();
                cx.ring.consume(cin, pending);
            }
            if post_recv(
                cx.ring,
                self.client.as_fd(),
                &mut self.cin,
                Op::ClientRecv.token(self.slot),
            ) {
                self.submitted(Op::ClientRecv);
            }
        }
    }

    fn start_dial(&mut self, cx: &mut Ctx<'_>, route: &Arc<Route>) {
        self.dial_started = cx.now;
        let port = cx.shared.listeners[self.listener].guest_port;
        match backend_socket(cx.shared, route) {
            Ok(fd) => {
                cx.ring.connect(
                    fd.as_fd(),
                    SocketAddrV4::new(route.guest_ip, port),
                    cx.shared.config.dial_timeout,
                    Op::Connect.token(self.slot),
                );
                self.submitted(Op::Connect);
                self.backend = Some(fd);
                self.dial = Dial::Pending;
            }
            Err(e) => {
                log::warn!("no backend socket for VM {}: {e}", route.id);
                self.dial = Dial::Failed;
                if self.tls.is_none() {
                    self.close(Outcome::DialFailed);
                }
            }
        }
    }

    /// Raw listeners: copy both ways; what a receive returned is sent on as is.
    fn pump_raw(&mut self, cx: &mut Ctx<'_>) {
        let Some(backend) = self.backend.as_ref().map(AsFd::as_fd) else {
            return self.close(Outcome::DialFailed);
        };
        let slot = self.slot;
        let busy = |inflight: u16, op: Op| inflight & op.bit() != 0;
        // client -> backend
        if !busy(self.inflight, Op::BackendSend) && !busy(self.inflight, Op::ClientRecv) {
            if let Some(cin) = self.cin.filter(|&b| !cx.ring.is_empty(b)) {
                if cx.ring.send(backend, cin, Op::BackendSend.token(slot)) {
                    self.inflight |= Op::BackendSend.bit();
                }
            } else if !self.client_eof {
                if post_recv(
                    cx.ring,
                    self.client.as_fd(),
                    &mut self.cin,
                    Op::ClientRecv.token(slot),
                ) {
                    self.inflight |= Op::ClientRecv.bit();
                }
            } else if !self.backend_shut {
                self.backend_shut = true;
                cx.ring
                    .shutdown(backend, libc::SHUT_WR, Op::BackendShutdown.token(slot));
                self.inflight |= Op::BackendShutdown.bit();
            }
        }
        // backend -> client
        if !busy(self.inflight, Op::ClientSend) && !busy(self.inflight, Op::BackendRecv) {
            if let Some(bin) = self.bin.filter(|&b| !cx.ring.is_empty(b)) {
                if cx
                    .ring
                    .send(self.client.as_fd(), bin, Op::ClientSend.token(slot))
                {
                    self.inflight |= Op::ClientSend.bit();
                }
            } else if !self.backend_eof {
                if post_recv(cx.ring, backend, &mut self.bin, Op::BackendRecv.token(slot)) {
                    self.inflight |= Op::BackendRecv.bit();
                }
            } else if !self.client_shut {
                self.client_shut = true;
                cx.ring.shutdown(
                    self.client.as_fd(),
                    libc::SHUT_WR,
                    Op::ClientShutdown.token(slot),
                );
                self.inflight |= Op::ClientShutdown.bit();
            }
        }
        if self.client_shut && self.backend_shut && self.inflight == 0 {
            self.close(Outcome::Ok);
        }
    }

    /// TLS listeners: move bytes between the client, rustls and the backend until
    /// nothing more can happen without a completion.
    fn pump_tls(&mut self, cx: &mut Ctx<'_>) {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.close(Outcome::HandshakeFailed);
        };
        let slot = self.slot;
        let busy = |inflight: u16, op: Op| inflight & op.bit() != 0;

        // Client ciphertext into rustls; decrypted bytes into `bout` once the backend is up.
        loop {
            let mut progress = false;
            if !busy(self.inflight, Op::ClientRecv) {
                if let Some(cin) = self.cin.filter(|&b| !cx.ring.is_empty(b)) {
                    // An error here means rustls' plaintext buffer is full: the backend
                    // has to catch up before more ciphertext goes in.
                    if let Ok(n) = cx.ring.drain(cin, |data| tls.read_tls(&mut &data[..])) {
                        progress |= n > 0;
                    }
                } else if self.client_eof && !self.eof_fed {
                    self.eof_fed = true;
                    let _ = tls.read_tls(&mut io::empty());
                    progress = true;
                }
            }
            let state = match tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    log::debug!(
                        "TLS error on {}: {e}",
                        cx.shared.listeners[self.listener].name
                    );
                    if tls.is_handshaking() {
                        cx.shared.metrics.handshake_failed(HandshakeFailure::Tls);
                    }
                    // rustls queued an alert; Linger flushes it.
                    return self.linger_with(cx, Outcome::HandshakeFailed);
                }
            };
            let readable =
                state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() || self.eof_fed;
            if readable
                && self.dial == Dial::Up
                && !self.client_done
                && !busy(self.inflight, Op::BackendSend)
                && !has_data(cx.ring, self.bout)
            {
                let bout = buffer(cx.ring, &mut self.bout);
                match cx.ring.fill(bout, |tail| tls.reader().read(tail)) {
                    Ok(0) => self.client_done = true, // close_notify
                    Ok(_) => progress = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => self.client_done = true, // TCP closed without close_notify
                }
            }
            if !progress {
                break;
            }
        }

        if self.phase == Phase::Handshake && !tls.is_handshaking() {
            cx.shared
                .metrics
                .handshake_latency(cx.now.duration_since(self.accepted_at));
            self.phase = Phase::Stream;
            self.deadline = None;
        }
        if self.phase == Phase::Stream && self.dial == Dial::Failed {
            // The client finished its handshake but the VM is unreachable.
            if cx.shared.listeners[self.listener].protocol == Some(Protocol::Https) {
                let _ = tls.writer().write_all(&response_502());
            }
            tls.send_close_notify();
            self.close_notify_sent = true;
            return self.linger_with(cx, Outcome::DialFailed);
        }

        // Backend plaintext into rustls, one buffer at a time so its queue stays bounded.
        if !tls.is_handshaking() && !tls.wants_write() {
            if let Some(bin) = self.bin {
                let _ = cx.ring.drain(bin, |data| tls.writer().write(data));
            }
        }
        if self.backend_eof
            && !self.close_notify_sent
            && !tls.is_handshaking()
            && !has_data(cx.ring, self.bin)
        {
            tls.send_close_notify();
            self.close_notify_sent = true;
        }

        // Ciphertext out to the client.
        if !busy(self.inflight, Op::ClientSend) {
            if !has_data(cx.ring, self.cout) && tls.wants_write() {
                let cout = buffer(cx.ring, &mut self.cout);
                let _ = cx.ring.fill(cout, |tail| tls.write_tls(&mut &mut tail[..]));
            }
            let sent = self.cout.is_some_and(|cout| {
                cx.ring
                    .send(self.client.as_fd(), cout, Op::ClientSend.token(slot))
            });
            if sent {
                self.inflight |= Op::ClientSend.bit();
            } else if self.close_notify_sent && !self.client_shut && !tls.wants_write() {
                self.client_shut = true;
                cx.ring.shutdown(
                    self.client.as_fd(),
                    libc::SHUT_WR,
                    Op::ClientShutdown.token(slot),
                );
                self.inflight |= Op::ClientShutdown.bit();
            }
        }

        // Plaintext to and from the backend.
        if let (Dial::Up, Some(backend)) = (self.dial, self.backend.as_ref().map(AsFd::as_fd)) {
            if !busy(self.inflight, Op::BackendSend) {
                let sent = self
                    .bout
                    .is_some_and(|bout| cx.ring.send(backend, bout, Op::BackendSend.token(slot)));
                if sent {
                    self.inflight |= Op::BackendSend.bit();
                } else if self.client_done && !self.backend_shut {
                    self.backend_shut = true;
                    cx.ring
                        .shutdown(backend, libc::SHUT_WR, Op::BackendShutdown.token(slot));
                    self.inflight |= Op::BackendShutdown.bit();
                }
            }
            if !self.backend_eof
                && !busy(self.inflight, Op::BackendRecv)
                && post_recv(cx.ring, backend, &mut self.bin, Op::BackendRecv.token(slot))
            {
                self.inflight |= Op::BackendRecv.bit();
            }
        }

        if !self.client_eof
            && !busy(self.inflight, Op::ClientRecv)
            && post_recv(
                cx.ring,
                self.client.as_fd(),
                &mut self.cin,
                Op::ClientRecv.token(slot),
            )
        {
            self.inflight |= Op::ClientRecv.bit();
        }

        // Outgoing buffers are held only while they hold bytes.
        trim(cx.ring, &mut self.cout, busy(self.inflight, Op::ClientSend));
        trim(
            cx.ring,
            &mut self.bout,
            busy(self.inflight, Op::BackendSend),
        );

        let both_ways_done = self.backend_shut && self.client_shut;
        if both_ways_done
            && !busy(self.inflight, Op::ClientSend)
            && !busy(self.inflight, Op::BackendSend)
        {
            self.close(Outcome::Ok);
        }
    }

    fn closing(&mut self, cx: &mut Ctx<'_>) {
        if self.cancelled {
            return;
        }
        self.cancelled = true;
        let client_ops = Op::ClientRecv.bit() | Op::ClientSend.bit() | Op::ClientShutdown.bit();
        let backend_ops = Op::BackendRecv.bit()
            | Op::BackendSend.bit()
            | Op::BackendShutdown.bit()
            | Op::Connect.bit();
        if self.inflight & client_ops != 0 {
            cx.ring
                .cancel_fd(self.client.as_raw_fd(), Op::CancelClient.token(self.slot));
            self.submitted(Op::CancelClient);
        }
        if let Some(backend) = self.backend.as_ref() {
            if self.inflight & backend_ops != 0 {
                cx.ring
                    .cancel_fd(backend.as_raw_fd(), Op::CancelBackend.token(self.slot));
                self.submitted(Op::CancelBackend);
            }
        }
    }
}

/// True when `buf` holds bytes not yet passed on.
fn has_data(ring: &Ring, buf: Option<BufId>) -> bool {
    buf.is_some_and(|id| !ring.is_empty(id))
}

/// The buffer in `slot`, allocated on first use.
fn buffer(ring: &mut Ring, slot: &mut Option<BufId>) -> BufId {
    *slot.get_or_insert_with(|| ring.alloc_buf(BUF_LEN))
}

/// Free the buffer in `slot` if it is empty and no operation uses it.
fn trim(ring: &mut Ring, slot: &mut Option<BufId>, busy: bool) {
    if !busy && !has_data(ring, *slot) {
        if let Some(id) = slot.take() {
            ring.release_buf(id);
        }
    }
}

/// Receive from `fd` into a pool buffer, unless bytes read earlier are still pending in
/// `slot` (flow control). The emptied buffer of the last receive is given back first,
/// so a connection waiting for input holds no buffer.
fn post_recv(ring: &mut Ring, fd: BorrowedFd<'_>, slot: &mut Option<BufId>, token: u32) -> bool {
    if has_data(ring, *slot) {
        return false;
    }
    if let Some(id) = slot.take() {
        ring.release_buf(id);
    }
    ring.recv_pooled(fd, token);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_unknown_ops() {
        for op in Op::ALL {
            assert_eq!(Op::from_token(op.token(12345)), Some((12345, op)));
        }
        assert_eq!(Op::from_token(0xf), None);
    }

    #[test]
    fn the_502_response_is_well_formed() {
        let text = String::from_utf8(response_502()).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
        assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
