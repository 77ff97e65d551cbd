//! One proxied connection, as a state machine that does no I/O. `LIFECYCLE.md` beside
//! this file draws it.
//!
//! The worker feeds a [`Conn`] [`Event`]s (an operation completed, a dial got its
//! socket or failed, time passed) and carries out the [`Io`] it asks for. The core
//! never touches a socket or the ring: it sees buffers through [`Buffers`] and routes
//! through [`Routes`], and says what it wants submitted. Its tests (`tests.rs`) run it
//! against `Vec`s and a rustls client in memory, with no sockets and no root.
//!
//! A connection is in one [`Stage`]; each stage holds only what it needs, so that a
//! combination that cannot happen (a TLS phase on a raw listener, a dial before the
//! ClientHello was read) cannot be written either:
//!
//! * [`Peek`]: TLS listeners read the ClientHello (after a PostgreSQL preamble) and
//!   route it by SNI, or refuse it without any crypto.
//! * [`Proxy`]: the guest is dialed while (TLS) rustls handshakes; then bytes stream.
//!   Each direction has its own [`Flow`]; the dial its own [`Dial`]; TLS its own phase.
//! * [`Linger`]: a last word (an alert, a 502, close_notify) is flushed, then the
//!   client is read until it closes, so unread input does not turn our close into a
//!   reset.
//! * Closing: whatever is in flight is cancelled; once all of it is reaped the worker
//!   frees the connection and counts its [`Outcome`].
//!
//! Memory per connection is bounded: at most four ring buffers (one per direction and
//! end) plus rustls' own bounded buffers. A connection waiting for input holds none of
//! ours: receives take a pool buffer only when bytes arrive, outgoing buffers are held
//! only while they hold bytes, and a ClientHello that arrives in pieces waits in a
//! `Vec` sized to what came. Flow control falls out of the buffers: a side is read only
//! once what was last read from it has been passed on.

mod linger;
mod peek;
mod relay;
mod tls;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use super::buffers::{BufId, Buffers};
use super::connlog::{ConnId, ConnLog, Record};
use super::dial::DialError;
use super::Listener;
use crate::metrics::{HandshakeFailure, Metrics, Outcome};
use crate::resolver::Route;

use linger::Linger;
use peek::Peek;
use tls::Tls;

/// Size of each data buffer: one maximal TLS record with its overhead.
pub const BUF_LEN: usize = 16 * 1024 + 512;

/// The most plaintext rustls puts in one TLS record.
pub const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;

/// What a side in bulk reads at once: four records' worth, which leave as four full
/// records in one send. Fewer, larger receives and sends cost less per byte (system
/// calls, wake-ups, TCP segments and ACKs) on both legs and for the client.
pub const BULK_READ: usize = 4 * MAX_RECORD_PLAINTEXT;

/// A buffer of a side in bulk: a bulk read, or the records it becomes (a record adds
/// at most 256 bytes to its plaintext).
pub const BULK_BUF_LEN: usize = BULK_READ + 4 * 256;

/// How much a receive may bring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecvKind {
    /// What a pool buffer holds, never more (a ClientHello, input only drained).
    #[default]
    Pooled,
    /// Any amount: a pool buffer's worth, or a bulk buffer's while the side is in bulk.
    Stream,
    /// Plaintext for TLS records, in whole records: 16 KiB, or `BULK_READ` in bulk.
    Records,
    /// Only what is already there, without waiting: a receive that finds nothing ends
    /// at once with `EAGAIN` (a refused client that said all it had to say).
    Unread,
}

impl RecvKind {
    /// The most a receive of this kind takes, into a pool buffer or a bulk buffer.
    fn max(self, bulk: bool) -> usize {
        match (self, bulk) {
            (RecvKind::Records, false) => MAX_RECORD_PLAINTEXT,
            (RecvKind::Records, true) => BULK_READ,
            _ => usize::MAX,
        }
    }

    /// Whether a side read this way goes into bulk when its receives come back full.
    fn may_bulk(self) -> bool {
        matches!(self, RecvKind::Stream | RecvKind::Records)
    }
}

/// Which socket of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Guest = 1,
}

/// The operations a connection can have in flight, at most one of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    ClientRecv = 0,
    ClientSend = 1,
    ClientShutdown = 2,
    ClientCancel = 3,
    GuestRecv = 4,
    GuestSend = 5,
    GuestShutdown = 6,
    GuestCancel = 7,
    Connect = 8,
}

impl Op {
    pub const ALL: [Op; 9] = [
        Op::ClientRecv,
        Op::ClientSend,
        Op::ClientShutdown,
        Op::ClientCancel,
        Op::GuestRecv,
        Op::GuestSend,
        Op::GuestShutdown,
        Op::GuestCancel,
        Op::Connect,
    ];

    pub fn recv(side: Side) -> Op {
        match side {
            Side::Client => Op::ClientRecv,
            Side::Guest => Op::GuestRecv,
        }
    }

    pub fn send(side: Side) -> Op {
        match side {
            Side::Client => Op::ClientSend,
            Side::Guest => Op::GuestSend,
        }
    }

    pub fn shutdown(side: Side) -> Op {
        match side {
            Side::Client => Op::ClientShutdown,
            Side::Guest => Op::GuestShutdown,
        }
    }

    pub fn cancel(side: Side) -> Op {
        match side {
            Side::Client => Op::ClientCancel,
            Side::Guest => Op::GuestCancel,
        }
    }

    pub fn side(self) -> Side {
        match self {
            Op::ClientRecv | Op::ClientSend | Op::ClientShutdown | Op::ClientCancel => Side::Client,
            _ => Side::Guest,
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u8)
    }
}

/// The set of operations in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct InFlight(u16);

impl InFlight {
    fn has(self, op: Op) -> bool {
        self.0 & op.bit() != 0
    }

    fn any(self, ops: &[Op]) -> bool {
        ops.iter().any(|&op| self.has(op))
    }

    fn add(&mut self, op: Op) {
        self.0 |= op.bit();
    }

    fn remove(&mut self, op: Op) {
        self.0 &= !op.bit();
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// What the core asks its worker to do. Every variant but `Dial` starts the one
/// [`Op`] it names, whose completion comes back as [`Event::Done`].
#[derive(Debug)]
pub enum Io {
    /// Receive on `side`, at most `max` bytes: into a buffer the ring takes from its
    /// pool when bytes arrive (`into: None`), or into the free tail of `into` when the
    /// pool ran dry.
    Recv {
        side: Side,
        into: Option<BufId>,
        max: usize,
        /// False: do not wait for bytes (`RecvKind::Unread`).
        wait: bool,
    },
    Send {
        side: Side,
        buf: BufId,
        /// Our last word: a FIN follows as soon as it is sent, so the kernel may hold
        /// it back for the FIN to ride in the same segment (`MSG_MORE`) rather than
        /// send two, each of which the peer must take in and acknowledge.
        fin_follows: bool,
    },
    /// Half-close: FIN after everything sent (asked only with no send in flight; the
    /// worker does it at once and answers with its [`Event::Done`] right away).
    Shutdown(Side),
    /// Cancel everything in flight on that side's socket.
    Cancel(Side),
    /// Take a socket in the route's namespace and connect it to the guest within
    /// `timeout`. The worker answers [`Event::Dialing`] once the connect is submitted
    /// (at once, or when the namespace's pool has a socket), or [`Event::DialFailed`].
    Dial {
        route: Arc<Route>,
        port: u16,
        timeout: Duration,
    },
}

impl Io {
    /// The operation this starts.
    pub fn op(&self) -> Option<Op> {
        match *self {
            Io::Recv { side, .. } => Some(Op::recv(side)),
            Io::Send { side, .. } => Some(Op::send(side)),
            Io::Shutdown(side) => Some(Op::shutdown(side)),
            Io::Cancel(side) => Some(Op::cancel(side)),
            Io::Dial { .. } => None,
        }
    }
}

/// What happened to a connection.
#[derive(Debug)]
pub enum Event {
    /// `op` completed with the kernel's `result` (bytes, 0, or a negative errno); a
    /// receive into a pool buffer hands that buffer over in `buf`.
    Done {
        op: Op,
        result: i32,
        buf: Option<BufId>,
    },
    /// The guest connect of an [`Io::Dial`] is submitted.
    Dialing,
    /// The dial failed before its connect was submitted (no namespace, no socket in
    /// time).
    DialFailed(DialError),
    /// Time passed: deadlines are checked.
    Tick,
    /// Its VM went away (its route was removed or re-addressed, or its namespace was
    /// deleted or replaced): a streaming connection ends the way a guest's FIN ends it
    /// (close_notify on TLS, then FIN), one still dialing or handshaking as a failed
    /// dial does.
    VmGone,
    /// The shutdown drain time ran out.
    Abort,
}

/// Where connections go.
pub trait Routes {
    /// The VM a server name routes to.
    fn by_sni(&self, name: &str) -> Option<Arc<Route>>;
    /// A VM of another host of the cluster, for a name no local VM answers to: its
    /// connections are passed through, ClientHello included, to that host's forwarder
    /// (the route's address, on the listener's own port).
    fn remote(&self, _name: &str) -> Option<Arc<Route>> {
        None
    }
    /// Whether `ip` is another host of the cluster, whose forwarder may start a
    /// connection with a PROXY header naming the client it passes through.
    fn peer(&self, _ip: std::net::IpAddr) -> bool {
        false
    }
    /// Where a raw listener sends its connections: the oldest VM.
    fn oldest(&self) -> Option<Arc<Route>>;
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub dial: Duration,
    /// ClientHello plus handshake; also how long a last word may take.
    pub handshake: Duration,
    /// `None`: streaming connections never time out (TCP keepalive still ends those
    /// whose peer is gone).
    pub idle: Option<Duration>,
}

/// Where a connection came from and where it arrived: what a PROXY header tells the
/// guest. The worker reads them only for `+proxy-v2` listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    pub client: SocketAddr,
    pub local: SocketAddr,
}

/// What a connection works with for one event, borrowed from its worker.
pub struct Cx<'a, B> {
    pub bufs: &'a mut B,
    /// Where the core puts the operations it wants submitted, in order.
    pub io: &'a mut Vec<Io>,
    pub now: Instant,
    pub listener: &'a Listener,
    pub timeouts: &'a Timeouts,
    pub routes: &'a dyn Routes,
    pub metrics: &'a Metrics,
    pub log: &'a ConnLog,
}

/// One direction of the stream (client → guest, or guest → client), as sozu's pipes
/// have it: its source can end before its sink, and either before the other direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Reading the source, writing the sink.
    Open,
    /// The source ended; what was read is still being written.
    ReadClosed,
    /// The sink is gone or shut; the source is still read, and its bytes dropped.
    WriteClosed,
    /// Nothing more moves this way (the sink got its FIN).
    Closed,
}

/// A direction whose source just ended.
fn read_closed(flow: Flow) -> Flow {
    match flow {
        Flow::Open => Flow::ReadClosed,
        Flow::WriteClosed => Flow::Closed,
        other => other,
    }
}

/// The guest connection.
#[derive(Debug)]
pub enum Dial {
    /// Asked the worker for a socket and a connect; `since` counts against timeouts.
    Pending {
        since: Instant,
    },
    Up,
    /// The guest cannot be reached; a TLS client learns it once its handshake is done.
    Failed,
}

/// What a connection does with its bytes once routed.
pub enum Mode {
    /// Copied as they come (raw listeners).
    Relay,
    /// TLS terminated here.
    Tls(Box<Tls>),
}

/// Routed: dialing, handshaking (TLS), streaming.
pub struct Proxy {
    route: Arc<Route>,
    dial: Dial,
    mode: Mode,
    /// What the guest gets before any client byte (a PROXY v2 header), until the dial
    /// is up and it is queued.
    preface: Option<Vec<u8>>,
    /// Passed through to another host's forwarder rather than to a guest.
    to_peer: bool,
    /// Client → guest.
    up: Flow,
    /// Guest → client.
    down: Flow,
}

impl Proxy {
    fn new(route: Arc<Route>, mode: Mode, preface: Option<Vec<u8>>, now: Instant) -> Proxy {
        Proxy {
            route,
            dial: Dial::Pending { since: now },
            mode,
            preface,
            to_peer: false,
            up: Flow::Open,
            down: Flow::Open,
        }
    }

    /// Until when this may go on without progress: the handshake's deadline, a raw
    /// dial's, or `None` once streaming (the idle timeout rules).
    fn deadline(&self, timeouts: &Timeouts) -> Option<Instant> {
        match (&self.mode, &self.dial) {
            (Mode::Tls(tls), _) => tls.handshake_deadline(),
            (Mode::Relay, Dial::Pending { since }) => Some(*since + timeouts.handshake),
            (Mode::Relay, _) => None,
        }
    }

    /// Passed through to another host's forwarder, unread: its bytes so far (the
    /// ClientHello, when it came in pieces) go first.
    fn to_peer(route: Arc<Route>, hello: Vec<u8>, now: Instant) -> Proxy {
        let mut p = Proxy::new(
            route,
            Mode::Relay,
            Some(hello).filter(|h| !h.is_empty()),
            now,
        );
        p.to_peer = true;
        p
    }

    fn handshaking(&self) -> bool {
        matches!(&self.mode, Mode::Tls(tls) if tls.handshake_deadline().is_some())
    }
}

pub enum Stage {
    Peek(Peek),
    Proxy(Proxy),
    Linger(Linger),
    Closing(Outcome),
}

/// Where a stage's step leads.
enum Next {
    Stay,
    Proxy(Proxy),
    /// Flush the last word already queued (and rustls' own, if any), then close with
    /// this outcome.
    Linger(Outcome),
    /// A whole ClientHello refused for its name (unknown or none): as `Linger`, but a
    /// client with nothing more to say is not waited for.
    Refuse(Outcome),
    Close(Outcome),
}

/// The connection's buffers and the operations in flight on its sockets.
#[derive(Default)]
struct Ends {
    /// Bytes received from the client (ciphertext on TLS listeners).
    from_client: Option<BufId>,
    /// Bytes for the client: rustls' records, or our own few words.
    to_client: Option<BufId>,
    /// Bytes received from the guest.
    from_guest: Option<BufId>,
    /// TLS: plaintext for the guest (raw sends straight from `from_client`).
    to_guest: Option<BufId>,
    in_flight: InFlight,
    /// What the last receive on each side (by `Side as usize`) asked for.
    reads: [RecvKind; 2],
    /// Each side's bulk mode: on while its receives come back with at least a full
    /// record's worth, when it is read into buffers of the connection's own, a
    /// `BULK_READ` at a time; off (back to the pool) after a shorter one.
    bulk: [bool; 2],
}

impl Ends {
    fn busy(&self, op: Op) -> bool {
        self.in_flight.has(op)
    }

    fn submit<B>(&mut self, cx: &mut Cx<'_, B>, io: Io) {
        if let Some(op) = io.op() {
            self.in_flight.add(op);
        }
        cx.io.push(io);
    }

    fn inbox(&mut self, side: Side) -> &mut Option<BufId> {
        match side {
            Side::Client => &mut self.from_client,
            Side::Guest => &mut self.from_guest,
        }
    }

    fn outbox(&mut self, side: Side) -> &mut Option<BufId> {
        match side {
            Side::Client => &mut self.to_client,
            Side::Guest => &mut self.to_guest,
        }
    }

    /// Receive on `side` as `read` says, unless a receive is in flight or bytes read
    /// earlier are still pending there (flow control). Outside bulk the emptied buffer
    /// of the last receive is given back first and the ring takes a pool buffer when
    /// bytes arrive, so a side waiting for input holds none; in bulk the side keeps
    /// its own large buffer and receives into it again.
    fn recv<B: Buffers>(&mut self, side: Side, read: RecvKind, cx: &mut Cx<'_, B>) {
        if self.busy(Op::recv(side)) {
            return;
        }
        let inbox = self.inbox(side);
        if inbox.is_some_and(|b| !cx.bufs.is_empty(b)) {
            return;
        }
        let held = inbox.take();
        let bulk = read.may_bulk() && self.bulk[side as usize];
        let own = match held {
            Some(b) if bulk && cx.bufs.capacity(b) == BULK_BUF_LEN => Some(b),
            Some(b) => {
                cx.bufs.release(b);
                None
            }
            None => None,
        };
        let into = bulk.then(|| own.unwrap_or_else(|| cx.bufs.alloc(BULK_BUF_LEN)));
        *self.inbox(side) = into;
        self.reads[side as usize] = read;
        self.submit(
            cx,
            Io::Recv {
                side,
                into,
                max: read.max(bulk),
                wait: read != RecvKind::Unread,
            },
        );
    }

    /// A receive on `side` brought `n` bytes: a full record's worth or more keeps (or
    /// puts) the side in bulk, less takes it out.
    fn received(&mut self, side: Side, n: usize) {
        self.bulk[side as usize] =
            self.reads[side as usize].may_bulk() && n >= MAX_RECORD_PLAINTEXT;
    }

    /// Whether `side` is read in bulk: what comes from it goes on in bulk buffers too.
    fn in_bulk(&self, side: Side) -> bool {
        self.bulk[side as usize]
    }

    /// A buffer for what goes out towards `to`, sized for what comes from `from`.
    fn outbox_len(&self, from: Side) -> usize {
        if self.in_bulk(from) {
            BULK_BUF_LEN
        } else {
            BUF_LEN
        }
    }

    /// The pool was empty: receive into a buffer of the connection's own, as much as
    /// the receive it replaces asked for.
    fn recv_fallback<B: Buffers>(&mut self, side: Side, cx: &mut Cx<'_, B>) {
        let into = *self
            .inbox(side)
            .get_or_insert_with(|| cx.bufs.alloc(BUF_LEN));
        let read = self.reads[side as usize];
        self.submit(
            cx,
            Io::Recv {
                side,
                into: Some(into),
                max: read.max(false),
                wait: read != RecvKind::Unread,
            },
        );
    }

    /// Send what `buf` holds to `side`; false when a send is in flight or it is empty.
    fn send<B: Buffers>(&mut self, side: Side, buf: Option<BufId>, cx: &mut Cx<'_, B>) -> bool {
        self.send_as(side, buf, false, cx)
    }

    /// Send our last word to the client: only a FIN comes after it (Linger).
    fn send_last<B: Buffers>(&mut self, buf: Option<BufId>, cx: &mut Cx<'_, B>) -> bool {
        self.send_as(Side::Client, buf, true, cx)
    }

    fn send_as<B: Buffers>(
        &mut self,
        side: Side,
        buf: Option<BufId>,
        fin_follows: bool,
        cx: &mut Cx<'_, B>,
    ) -> bool {
        match buf {
            Some(buf) if !self.busy(Op::send(side)) && !cx.bufs.is_empty(buf) => {
                let io = Io::Send {
                    side,
                    buf,
                    fin_follows,
                };
                self.submit(cx, io);
                true
            }
            _ => false,
        }
    }

    /// FIN to `side`, asked only once no send is in flight there: the worker shuts the
    /// socket at once, so the FIN follows whatever was sent before.
    fn shutdown<B>(&mut self, side: Side, cx: &mut Cx<'_, B>) {
        debug_assert!(!self.busy(Op::send(side)), "FIN while a send is in flight");
        self.submit(cx, Io::Shutdown(side));
    }

    /// Cancel the receives, sends and connect in flight on `side`, unless a cancel
    /// already is.
    fn cancel<B>(&mut self, side: Side, cx: &mut Cx<'_, B>) {
        let ops: &[Op] = match side {
            Side::Client => &[Op::ClientRecv, Op::ClientSend],
            Side::Guest => &[Op::GuestRecv, Op::GuestSend, Op::Connect],
        };
        if self.in_flight.any(ops) && !self.busy(Op::cancel(side)) {
            self.submit(cx, Io::Cancel(side));
        }
    }

    /// Queue a few bytes of our own for the client (a PostgreSQL answer) and send them.
    fn say<B: Buffers>(&mut self, bytes: &[u8], cx: &mut Cx<'_, B>) {
        self.queue(Side::Client, bytes, cx);
    }

    /// Our last word to the client (a refusal's alert): a FIN follows it.
    fn say_last<B: Buffers>(&mut self, bytes: &[u8], cx: &mut Cx<'_, B>) {
        self.fill_outbox(Side::Client, bytes, cx);
        self.send_last(self.to_client, cx);
    }

    /// Queue bytes of our own for `side` (at most one buffer's worth) and send them
    /// unless a send is in flight.
    fn queue<B: Buffers>(&mut self, side: Side, bytes: &[u8], cx: &mut Cx<'_, B>) {
        self.fill_outbox(side, bytes, cx);
        let out = *self.outbox(side);
        self.send(side, out, cx);
    }

    fn fill_outbox<B: Buffers>(&mut self, side: Side, bytes: &[u8], cx: &mut Cx<'_, B>) {
        let buf = *self
            .outbox(side)
            .get_or_insert_with(|| cx.bufs.alloc(BUF_LEN));
        let _ = cx.bufs.fill(buf, |tail| {
            let n = bytes.len().min(tail.len());
            tail[..n].copy_from_slice(&bytes[..n]);
            Ok::<_, ()>(n)
        });
    }

    /// Give back outgoing buffers that hold nothing.
    fn trim<B: Buffers>(&mut self, cx: &mut Cx<'_, B>) {
        for (slot, op) in [
            (&mut self.to_client, Op::ClientSend),
            (&mut self.to_guest, Op::GuestSend),
        ] {
            if !self.in_flight.has(op) && slot.is_some_and(|b| cx.bufs.is_empty(b)) {
                if let Some(b) = slot.take() {
                    cx.bufs.release(b);
                }
            }
        }
    }
}

/// Ask the worker to connect to `route`'s guest on the listener's guest port (or the
/// VM's `httpPort`, see [`Listener::guest_port_for`]); a route passed through to
/// another host goes to that host's listener on this listener's own port.
fn request_dial<B>(route: &Arc<Route>, to_peer: bool, cx: &mut Cx<'_, B>) {
    let port = match to_peer {
        true => cx.listener.port,
        false => cx.listener.guest_port_for(route),
    };
    cx.io.push(Io::Dial {
        route: Arc::clone(route),
        port,
        timeout: cx.timeouts.dial,
    });
}

/// The PROXY v2 header for a connection from `addrs`, naming `sni`; `None` unless the
/// listener sends one.
fn proxy_header(addrs: Option<Addrs>, sni: Option<&str>, listener: &Listener) -> Option<Vec<u8>> {
    let addrs = addrs.filter(|_| listener.proxy_v2)?;
    let mut out = Vec::new();
    crate::proxy_protocol::write_header(addrs.client, addrs.local, sni, &mut out);
    Some(out)
}

/// True when `buf` holds bytes not yet passed on.
fn has_data<B: Buffers>(bufs: &B, buf: Option<BufId>) -> bool {
    buf.is_some_and(|b| !bufs.is_empty(b))
}

pub struct Conn {
    id: ConnId,
    stage: Stage,
    ends: Ends,
    last_active: Instant,
}

impl Conn {
    /// A connection just accepted on `cx.listener` from `addrs` (known when the
    /// listener sends PROXY headers): a TLS listener starts reading the ClientHello, a
    /// raw one dials the oldest VM.
    pub fn accept<B: Buffers>(id: ConnId, addrs: Option<Addrs>, cx: &mut Cx<'_, B>) -> Conn {
        let stage = if cx.listener.kind.is_tls() {
            // Kept for a PROXY header to the guest (`+proxy-v2`) or to a peer.
            Stage::Peek(Peek::new(cx.now, cx.now + cx.timeouts.handshake, addrs))
        } else {
            match cx.routes.oldest() {
                Some(route) => {
                    request_dial(&route, false, cx);
                    let preface = proxy_header(addrs, None, cx.listener);
                    Stage::Proxy(Proxy::new(route, Mode::Relay, preface, cx.now))
                }
                None => {
                    cx.log.record(id, cx.listener.index, Record::NoRoute);
                    Stage::Closing(Outcome::NoRoute)
                }
            }
        };
        let mut conn = Conn {
            id,
            stage,
            ends: Ends::default(),
            last_active: cx.now,
        };
        conn.advance(cx);
        conn
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Once closed and every operation is reaped: how it ended. The worker then frees
    /// the connection ([`Conn::buffers`] go back to the ring, the sockets close).
    pub fn finished(&self) -> Option<Outcome> {
        match self.stage {
            Stage::Closing(outcome) if self.ends.in_flight.is_empty() => Some(outcome),
            _ => None,
        }
    }

    /// The buffers it holds, for the worker to release when freeing it.
    pub fn buffers(&self) -> impl Iterator<Item = BufId> {
        let e = &self.ends;
        [e.from_client, e.to_client, e.from_guest, e.to_guest]
            .into_iter()
            .flatten()
    }

    /// The local VM it was routed to, while routed (not once it is ending). A
    /// connection passed through to another host has none here: the owner's forwarder
    /// ends it when its VM goes.
    pub fn route(&self) -> Option<&Arc<Route>> {
        match &self.stage {
            Stage::Proxy(p) if !p.to_peer => Some(&p.route),
            _ => None,
        }
    }

    /// Whether a dial parked by the worker should still be resumed.
    pub fn awaits_dial(&self) -> bool {
        matches!(
            &self.stage,
            Stage::Proxy(Proxy {
                dial: Dial::Pending { .. },
                ..
            })
        ) && !self.ends.busy(Op::Connect)
    }

    /// Take one event; the operations it leads to are appended to `cx.io`.
    pub fn handle<B: Buffers>(&mut self, event: Event, cx: &mut Cx<'_, B>) {
        match event {
            Event::Done { op, result, buf } => self.done(op, result, buf, cx),
            Event::Dialing => {
                self.ends.in_flight.add(Op::Connect);
                if !matches!(self.stage, Stage::Proxy(_)) {
                    // Closed while the dial was on its way: the connect is not wanted.
                    self.ends.cancel(Side::Guest, cx);
                }
            }
            Event::DialFailed(error) => self.dial_failed(error, cx),
            Event::Tick => self.tick(cx),
            Event::VmGone => {
                if let Stage::Proxy(p) = &mut self.stage {
                    let next = p.vm_gone(&mut self.ends, self.id, cx);
                    self.enter(next, cx);
                }
            }
            Event::Abort => self.close(Outcome::Shutdown, cx),
        }
        self.advance(cx);
    }

    fn done<B: Buffers>(&mut self, op: Op, result: i32, buf: Option<BufId>, cx: &mut Cx<'_, B>) {
        self.ends.in_flight.remove(op);
        if let Some(b) = buf {
            // A pool receive completed: its buffer is the side's input now.
            if let Some(old) = self.ends.inbox(op.side()).replace(b) {
                cx.bufs.release(old);
            }
        }
        if result > 0 {
            self.last_active = cx.now;
            let n = result as u64;
            match op {
                Op::GuestSend => cx.metrics.bytes(cx.listener.index, n, 0),
                Op::ClientSend => cx.metrics.bytes(cx.listener.index, 0, n),
                Op::ClientRecv | Op::GuestRecv => self.ends.received(op.side(), n as usize),
                _ => {}
            }
        }
        match (op, &self.stage) {
            // Nothing to learn from a FIN's completion.
            (Op::ClientShutdown | Op::GuestShutdown, _) => return,
            // Whatever a cancel missed (it raced with a submission) is cancelled again.
            (_, Stage::Closing(_)) => return self.ends.cancel(op.side(), cx),
            (Op::ClientCancel | Op::GuestCancel, Stage::Linger(_)) => {
                return self.ends.cancel(Side::Guest, cx)
            }
            (Op::ClientCancel | Op::GuestCancel, _) => return,
            _ => {}
        }
        if result == -libc::ENOBUFS && matches!(op, Op::ClientRecv | Op::GuestRecv) {
            return self.ends.recv_fallback(op.side(), cx);
        }
        let next = match &mut self.stage {
            Stage::Peek(_) => peek::done(op, result, cx),
            Stage::Proxy(p) => p.done(op, result, self.id, cx),
            Stage::Linger(l) => l.done(op, result),
            Stage::Closing(_) => Next::Stay,
        };
        self.enter(next, cx);
    }

    fn dial_failed<B: Buffers>(&mut self, error: DialError, cx: &mut Cx<'_, B>) {
        if let Stage::Proxy(p) = &mut self.stage {
            p.fail_dial(error, self.id, cx);
        }
    }

    fn tick<B: Buffers>(&mut self, cx: &mut Cx<'_, B>) {
        let now = cx.now;
        let next = match &self.stage {
            Stage::Peek(p) if now >= p.deadline() => {
                cx.metrics.handshake_failed(HandshakeFailure::Timeout);
                Next::Close(Outcome::Timeout)
            }
            Stage::Proxy(p) => match p.deadline(cx.timeouts) {
                Some(deadline) if now >= deadline => {
                    if p.handshaking() {
                        cx.metrics.handshake_failed(HandshakeFailure::Timeout);
                    }
                    Next::Close(Outcome::Timeout)
                }
                None if cx
                    .timeouts
                    .idle
                    .is_some_and(|idle| now.duration_since(self.last_active) >= idle) =>
                {
                    Next::Close(Outcome::Timeout)
                }
                _ => Next::Stay,
            },
            Stage::Linger(l) if now >= l.deadline() => Next::Close(l.outcome()),
            _ => Next::Stay,
        };
        self.enter(next, cx);
    }

    fn close<B>(&mut self, outcome: Outcome, cx: &mut Cx<'_, B>) {
        self.enter(Next::Close(outcome), cx);
    }

    /// Run the current stage until it waits for a completion.
    fn advance<B: Buffers>(&mut self, cx: &mut Cx<'_, B>) {
        loop {
            let next = match &mut self.stage {
                Stage::Peek(p) => p.step(&mut self.ends, self.id, cx),
                Stage::Proxy(p) => p.step(&mut self.ends, self.id, cx),
                Stage::Linger(l) => l.step(&mut self.ends, cx),
                Stage::Closing(_) => return,
            };
            if let Next::Stay = next {
                return;
            }
            self.enter(next, cx);
        }
    }

    /// Leave the current stage for `next`, doing what entering it takes.
    fn enter<B>(&mut self, next: Next, cx: &mut Cx<'_, B>) {
        if let Stage::Closing(_) = self.stage {
            return; // The first outcome stands.
        }
        match next {
            Next::Stay => {}
            Next::Proxy(proxy) => {
                request_dial(&proxy.route, proxy.to_peer, cx);
                self.stage = Stage::Proxy(proxy);
            }
            Next::Linger(outcome) | Next::Refuse(outcome) => {
                let refusal = matches!(next, Next::Refuse(_));
                let tls = match std::mem::replace(&mut self.stage, Stage::Closing(outcome)) {
                    Stage::Proxy(Proxy {
                        mode: Mode::Tls(tls),
                        ..
                    }) => Some(tls),
                    _ => None,
                };
                let deadline = cx.now + cx.timeouts.handshake;
                self.stage = Stage::Linger(Linger::new(outcome, deadline, tls, refusal));
                // The guest has no part in a last word.
                self.ends.cancel(Side::Guest, cx);
            }
            Next::Close(outcome) => {
                self.stage = Stage::Closing(outcome);
                self.ends.cancel(Side::Client, cx);
                self.ends.cancel(Side::Guest, cx);
            }
        }
    }
}

impl Proxy {
    /// A completion while routed.
    fn done<B: Buffers>(&mut self, op: Op, result: i32, id: ConnId, cx: &mut Cx<'_, B>) -> Next {
        match (op, result) {
            (Op::Connect, 0) => {
                // Only a dial still wanted comes up (its VM may have gone meanwhile).
                if let Dial::Pending { since } = self.dial {
                    cx.metrics.dial_latency(cx.now.duration_since(since));
                    self.dial = Dial::Up;
                }
                Next::Stay
            }
            (Op::Connect, err) => {
                self.fail_dial(DialError::from_connect(err), id, cx);
                Next::Stay
            }
            (Op::ClientRecv, 0) => match &mut self.mode {
                Mode::Tls(tls) if tls.handshake_deadline().is_some() => {
                    cx.metrics.handshake_failed(HandshakeFailure::ClientClosed);
                    Next::Close(Outcome::HandshakeFailed)
                }
                Mode::Tls(tls) => {
                    tls.client_eof();
                    self.up = read_closed(self.up);
                    Next::Stay
                }
                Mode::Relay => {
                    self.up = read_closed(self.up);
                    Next::Stay
                }
            },
            (Op::GuestRecv, 0) => {
                self.down = read_closed(self.down);
                Next::Stay
            }
            (op, err) if err < 0 => match op.side() {
                Side::Client => Next::Close(Outcome::ClientError),
                Side::Guest => Next::Close(Outcome::BackendError),
            },
            _ => Next::Stay,
        }
    }

    fn fail_dial<B>(&mut self, error: DialError, id: ConnId, cx: &mut Cx<'_, B>) {
        if matches!(self.dial, Dial::Pending { .. }) {
            self.dial_failed(error, id, cx);
        }
    }

    fn dial_failed<B>(&mut self, error: DialError, id: ConnId, cx: &mut Cx<'_, B>) {
        self.dial = Dial::Failed;
        cx.log.record(
            id,
            cx.listener.index,
            Record::DialFailed {
                vm: Arc::clone(&self.route),
                error,
            },
        );
    }

    /// The VM went away. Not streaming yet (dialing, or TLS still handshaking): the
    /// dial failed, and the client learns it as it would have (an HTTPS 502 after its
    /// handshake, else a close). Streaming: what the guest sent is passed on, then
    /// close_notify (TLS) and FIN, and the client is read until it closes (Linger).
    fn vm_gone<B: Buffers>(&mut self, ends: &mut Ends, id: ConnId, cx: &mut Cx<'_, B>) -> Next {
        match (&self.dial, self.handshaking()) {
            (Dial::Failed, _) => Next::Stay,
            (Dial::Pending { .. }, _) | (Dial::Up, true) => {
                if matches!(self.dial, Dial::Pending { .. }) {
                    // A connect in flight is not wanted any more.
                    ends.cancel(Side::Guest, cx);
                }
                self.dial_failed(DialError::VmGone, id, cx);
                Next::Stay
            }
            (Dial::Up, false) => {
                let pending = ends
                    .from_guest
                    .filter(|&b| !ends.busy(Op::GuestRecv) && !cx.bufs.is_empty(b));
                match &mut self.mode {
                    Mode::Tls(tls) => {
                        if let Some(b) = pending {
                            let _ = cx.bufs.drain(b, |data| tls.session.writer().write(data));
                        }
                        tls.session.send_close_notify();
                    }
                    // Raw bytes read from the guest are the last word as they are.
                    Mode::Relay => {
                        if pending.is_some() && ends.to_client.is_none() {
                            ends.to_client = ends.from_guest.take();
                        }
                    }
                }
                Next::Linger(Outcome::VmGone)
            }
        }
    }

    fn step<B: Buffers>(&mut self, ends: &mut Ends, id: ConnId, cx: &mut Cx<'_, B>) -> Next {
        // The guest hears the preface first: the up direction sends the client's bytes
        // only once `to_guest` is empty.
        if matches!(self.dial, Dial::Up) {
            if let Some(preface) = self.preface.take() {
                ends.queue(Side::Guest, &preface, cx);
            }
        }
        let next = match &mut self.mode {
            Mode::Relay => relay::pump(self, ends, cx),
            Mode::Tls(_) => tls::pump(self, ends, id, cx),
        };
        if let Next::Stay = next {
            if self.up == Flow::Closed && self.down == Flow::Closed {
                return Next::Close(Outcome::Ok);
            }
        }
        next
    }
}
