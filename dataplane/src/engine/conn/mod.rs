//! One proxied connection as an explicit state machine.
//!
//! ```text
//! accept ─► Peek ─► (Postgres: PgReply ─► Peek) ─► Handshake ─► Stream ─► Closing
//!             │                                      │  dial runs alongside
//!             └─► refused: alert, no crypto ─► Linger ◄┘  (502 / close_notify)
//! raw: accept ─► Dial ─► Stream ─► Closing
//! ```
//!
//! A dial whose namespace has no ready socket parks (`Dial::Parked`) instead of waiting
//! for the pool's thread: the pool signals the worker's eventfd, and the worker resumes
//! its parked connections ([`Conn::resume_dial`]). The dial timeout runs from the start
//! of the dial, parked time included.
//!
//! Every completion lands in [`Conn::on_completion`], which records what happened;
//! [`Conn::advance`] then looks at the whole state and submits whatever can run next.
//! The phases before any crypto live in `hello`, the byte pumps in `stream`.
//! Memory per connection is bounded: at most four buffers plus rustls' own bounded
//! buffers, and an idle connection holds none of ours: receives take a buffer from the
//! ring's pool only when data arrives, and outgoing buffers are allocated while they
//! hold bytes. Flow control falls out of the buffers: a side is read only when the data
//! last read from it has been passed on.

use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use ffi_free_netns::Wake;
use rustls::ServerConnection;

mod hello;
mod stream;

use super::dial::{guest_socket, DialError};
use super::ring::{BufId, Ring};
use super::Shared;
use crate::metrics::{HandshakeFailure, Outcome};
use crate::resolver::Route;
use crate::sni;

/// Size of each data buffer: one maximal TLS record with its overhead.
pub const BUF_LEN: usize = 16 * 1024 + 512;
/// The client buffer also holds a whole ClientHello (after a Postgres preamble).
const CLIENT_BUF_LEN: usize = if sni::MAX_CLIENT_HELLO + sni::PG_PREAMBLE_LEN > BUF_LEN {
    sni::MAX_CLIENT_HELLO + sni::PG_PREAMBLE_LEN
} else {
    BUF_LEN
};

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
    /// Waiting for the namespace's pool to have a socket.
    Parked,
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
    /// Where the dial goes, kept while it is parked.
    route: Option<Arc<Route>>,
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
    /// The worker's waker, handed to the pool by parked dials.
    pub wake: &'a Wake,
    /// Slots of connections that parked their dial; the worker resumes them on a wake.
    pub parked: &'a mut Vec<u32>,
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
            route: None,
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

    /// Retry a parked dial: the pool has signalled that sockets are ready (or that its
    /// worker stopped, which the retry turns into a dial failure).
    pub fn resume_dial(&mut self, cx: &mut Ctx<'_>) {
        // A connection already refused or lingering has no use for the backend.
        let wants = matches!(self.phase, Phase::Dial | Phase::Handshake | Phase::Stream);
        if wants && self.dial == Dial::Parked {
            self.dial_now(cx);
            self.advance(cx);
        }
    }

    /// Enforce the handshake, linger, idle and (while parked) dial deadlines.
    pub fn check_timers(&mut self, cx: &mut Ctx<'_>) {
        if self.phase == Phase::Closing {
            return;
        }
        if self.dial == Dial::Parked
            && cx.now.duration_since(self.dial_started) >= cx.shared.config.dial_timeout
        {
            log::debug!("backend dial failed: {}", DialError::PoolTimeout);
            self.dial_failed();
            self.advance(cx);
            if self.phase == Phase::Closing {
                return;
            }
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
        log::debug!("backend dial failed: {}", DialError::from_connect(res));
        self.dial_failed();
    }

    fn dial_failed(&mut self) {
        self.dial = Dial::Failed;
        self.backend = None;
        self.route = None;
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

    /// Half-close towards the client (FIN after everything queued), once.
    fn shut_client_write(&mut self, ring: &mut Ring) {
        if self.client_shut {
            return;
        }
        self.client_shut = true;
        ring.shutdown(
            self.client.as_fd(),
            libc::SHUT_WR,
            Op::ClientShutdown.token(self.slot),
        );
        self.submitted(Op::ClientShutdown);
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

    fn start_dial(&mut self, cx: &mut Ctx<'_>, route: &Arc<Route>) {
        self.dial_started = cx.now;
        self.route = Some(Arc::clone(route));
        self.dial_now(cx);
    }

    /// Connect if the pool has a socket now, park otherwise.
    fn dial_now(&mut self, cx: &mut Ctx<'_>) {
        let Some(route) = self.route.clone() else {
            return self.dial_failed();
        };
        match guest_socket(&cx.shared.pool, &route.netns, cx.wake) {
            Ok(Some(fd)) => {
                let port = cx.shared.listeners[self.listener].guest_port;
                // Parked time counts against the dial timeout.
                let left = cx
                    .shared
                    .config
                    .dial_timeout
                    .saturating_sub(cx.now.duration_since(self.dial_started));
                cx.ring.connect(
                    fd.as_fd(),
                    SocketAddrV4::new(route.guest_ip, port),
                    left,
                    Op::Connect.token(self.slot),
                );
                self.submitted(Op::Connect);
                self.backend = Some(fd);
                self.route = None;
                self.dial = Dial::Pending;
            }
            Ok(None) => {
                if self.dial != Dial::Parked {
                    log::debug!(
                        "dial to VM {} waiting for a socket from its namespace",
                        route.id
                    );
                }
                self.dial = Dial::Parked;
                cx.parked.push(self.slot);
            }
            Err(e) => {
                log::warn!("no backend socket for VM {}: {e}", route.id);
                self.dial_failed();
            }
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
}
