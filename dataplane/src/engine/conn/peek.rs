//! Before any crypto: reading the ClientHello (after a PostgreSQL SSLRequest), and
//! routing it by SNI or refusing it with a plaintext alert.

use std::net::SocketAddr;
use std::time::Instant;

use rustls::ServerConnection;

use std::sync::Arc;

use super::{Addrs, Buffers, ConnId, Cx, Ends, Mode, Next, Op, Proxy, Routes, Side, Tls};
use crate::config::ListenerKind;
use crate::engine::connlog::{ConnLog, Record};
use crate::engine::Listener;
use crate::metrics::{HandshakeFailure, Outcome, PeerDirection};
use crate::proxy_protocol::{self, Header};
use crate::resolver::Route;
use crate::sni::{self, PgPreamble};

/// A client may say GSSENCRequest, then SSLRequest: more preambles than that is not
/// a PostgreSQL client.
const MAX_PG_PREAMBLES: u8 = 2;
/// What a PostgreSQL client that starts without TLS is told. 28000
/// (invalid_authorization_specification) is what PostgreSQL itself answers when
/// `pg_hba.conf` allows only `hostssl`.
const PG_TLS_REQUIRED_STATE: &str = "28000";
const PG_TLS_REQUIRED: &str = "TLS is required: this server accepts only encrypted connections (use sslmode=require or stronger, with the VM's name as host)";

pub struct Peek {
    /// When the connection was accepted: the handshake's latency counts from here.
    accepted: Instant,
    /// The ClientHello and the handshake must be done by then.
    deadline: Instant,
    /// Bytes of a ClientHello (or preamble) that came in pieces. Empty, with nothing
    /// allocated, until a piece arrives: a whole hello in one receive is read where it
    /// landed, and a client that sends nothing holds no buffer at all.
    partial: Vec<u8>,
    /// PostgreSQL preambles answered so far.
    pg_answers: u8,
    /// The client's and our address, kept for a PROXY header (`+proxy-v2`, or in a
    /// cluster). After a peer's header, the client is the one it names. Boxed: most
    /// listeners have none, and the two addresses inline (64 bytes) would make every
    /// connection's slot in its worker 56 bytes larger, whatever its stage.
    addrs: Option<Box<Addrs>>,
    /// Whether a PROXY header from a peer forwarder was looked for yet.
    peer_checked: bool,
    /// Passed through by another host's forwarder: never passed on again, so that two
    /// hosts whose views of the cluster disagree cannot bounce a connection between
    /// them.
    from_peer: bool,
}

/// What the bytes so far say.
enum Verdict {
    NeedMore,
    /// A PostgreSQL preamble, to be answered with this byte.
    Preamble(u8),
    NotTls,
    /// A PostgreSQL StartupMessage without TLS: answered with an ErrorResponse.
    PlaintextStartup,
    /// Refused before any crypto: a fatal alert, then close (unknown or no name, see
    /// `Next::Refuse`) or linger.
    Refuse(HandshakeFailure, u8),
    /// Our side failed (rustls refused our configuration).
    Failed,
    Routed {
        route: Arc<Route>,
        tls: Box<Tls>,
        /// For the guest before anything else (a PROXY header).
        preface: Option<Vec<u8>>,
    },
    /// A VM of another host: passed through unread to that host's forwarder, after
    /// this PROXY header naming the client.
    PassThrough(Arc<Route>, Vec<u8>),
    /// A peer forwarder's PROXY header of `len` bytes, relaying `client`.
    PeerHeader {
        len: usize,
        client: Option<SocketAddr>,
    },
    /// A peer's connection without a header (a health check, a direct client).
    NoPeerHeader,
}

impl Peek {
    pub fn new(accepted: Instant, deadline: Instant, addrs: Option<Addrs>) -> Peek {
        Peek {
            accepted,
            deadline,
            partial: Vec::new(),
            pg_answers: 0,
            addrs: addrs.map(Box::new),
            peer_checked: false,
            from_peer: false,
        }
    }

    /// Whether the bytes so far may start with a peer forwarder's PROXY header: only
    /// from the address of another host of the cluster (asked once), until read.
    fn peer_header_due(&mut self, routes: &dyn Routes) -> bool {
        if !self.peer_checked
            && !self
                .addrs
                .as_ref()
                .is_some_and(|a| routes.peer(a.client.ip()))
        {
            self.peer_checked = true;
        }
        !self.peer_checked
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub(super) fn step<B: Buffers>(
        &mut self,
        ends: &mut Ends,
        id: ConnId,
        cx: &mut Cx<'_, B>,
    ) -> Next {
        if ends.busy(Op::ClientRecv) {
            return Next::Stay;
        }
        loop {
            // A piece after earlier pieces joins them.
            if let Some(b) = ends.from_client.filter(|_| !self.partial.is_empty()) {
                let n = cx.bufs.data(b).len();
                self.partial.extend_from_slice(cx.bufs.data(b));
                cx.bufs.consume(b, n);
            }
            let in_buffer = self.partial.is_empty();
            let header_due = self.peer_header_due(cx.routes);
            let verdict = {
                let data = match ends.from_client {
                    Some(b) if in_buffer => cx.bufs.data(b),
                    _ => &self.partial[..],
                };
                if data.is_empty() {
                    None
                } else if header_due {
                    Some(peer_header(data))
                } else {
                    let clock = (self.accepted, self.deadline);
                    let (listener, routes, log) = (cx.listener, cx.routes, cx.log);
                    let from = (self.addrs.as_deref().copied(), self.from_peer);
                    Some(judge(data, id, clock, from, listener, routes, log))
                }
            };
            let Some(verdict) = verdict else {
                ends.recv(Side::Client, super::RecvKind::Pooled, cx);
                return Next::Stay;
            };
            match verdict {
                Verdict::NeedMore => {
                    if let Some(b) = ends.from_client.filter(|_| in_buffer) {
                        // Keep the piece, give the pool buffer back.
                        let piece = cx.bufs.data(b);
                        let n = piece.len();
                        self.partial.extend_from_slice(piece);
                        cx.bufs.consume(b, n);
                    }
                    ends.recv(Side::Client, super::RecvKind::Pooled, cx);
                    return Next::Stay;
                }
                Verdict::Preamble(answer) => {
                    self.pg_answers += 1;
                    if self.pg_answers > MAX_PG_PREAMBLES {
                        cx.metrics.handshake_failed(HandshakeFailure::NotTls);
                        return Next::Close(Outcome::BadRequest);
                    }
                    match ends.from_client {
                        Some(b) if in_buffer => cx.bufs.consume(b, sni::PG_PREAMBLE_LEN),
                        _ => drop(self.partial.drain(..sni::PG_PREAMBLE_LEN)),
                    }
                    ends.say(&[answer], cx);
                }
                Verdict::NotTls => {
                    cx.metrics.handshake_failed(HandshakeFailure::NotTls);
                    return Next::Close(Outcome::BadRequest);
                }
                Verdict::PlaintextStartup => {
                    cx.metrics.handshake_failed(HandshakeFailure::NotTls);
                    let answer = sni::pg_error_response(PG_TLS_REQUIRED_STATE, PG_TLS_REQUIRED);
                    ends.say_last(&answer, cx);
                    return Next::Linger(Outcome::BadRequest);
                }
                Verdict::Refuse(why, alert) => {
                    cx.metrics.handshake_failed(why);
                    ends.say_last(&sni::alert_record(alert), cx);
                    return match why {
                        // A whole hello for a name we do not serve: its client waits
                        // for our answer.
                        HandshakeFailure::NoSni => Next::Refuse(Outcome::NoSni),
                        HandshakeFailure::UnknownSni => Next::Refuse(Outcome::UnknownSni),
                        // One too large or malformed may still be arriving.
                        _ => Next::Linger(Outcome::HandshakeFailed),
                    };
                }
                Verdict::Failed => return Next::Close(Outcome::Error),
                Verdict::Routed {
                    route,
                    mut tls,
                    preface,
                } => {
                    // rustls reads the hello from where it is: still in the receive
                    // buffer, or joined here.
                    tls.hello = std::mem::take(&mut self.partial);
                    let proxy = Proxy::new(route, Mode::Tls(tls), preface, cx.now);
                    return Next::Proxy(proxy);
                }
                Verdict::PassThrough(route, mut preface) => {
                    // The peer hears the header, then every byte read so far: a hello
                    // joined here goes ahead of the receive buffer, which is relayed as
                    // it is. Both must fit the one buffer they are queued in.
                    if preface.len() + self.partial.len() > super::BUF_LEN {
                        cx.metrics.handshake_failed(HandshakeFailure::TooLarge);
                        return Next::Close(Outcome::HandshakeFailed);
                    }
                    preface.append(&mut self.partial);
                    cx.metrics
                        .peer_connection(cx.listener.index, PeerDirection::ToPeer);
                    return Next::Proxy(Proxy::to_peer(route, preface, cx.now));
                }
                Verdict::PeerHeader { len, client } => {
                    self.peer_checked = true;
                    self.from_peer = true;
                    cx.metrics
                        .peer_connection(cx.listener.index, PeerDirection::FromPeer);
                    match ends.from_client {
                        Some(b) if in_buffer => cx.bufs.consume(b, len),
                        _ => drop(self.partial.drain(..len)),
                    }
                    if let (Some(addrs), Some(client)) = (self.addrs.as_mut(), client) {
                        addrs.client = client;
                    }
                }
                Verdict::NoPeerHeader => self.peer_checked = true,
            }
        }
    }
}

/// The start of a connection from another host of the cluster: its forwarder's PROXY
/// header, or none.
fn peer_header(data: &[u8]) -> Verdict {
    match proxy_protocol::read_header(data) {
        Header::NeedMore => Verdict::NeedMore,
        Header::Absent => Verdict::NoPeerHeader,
        Header::Invalid(_) => Verdict::NotTls,
        Header::Proxy { len, client } => Verdict::PeerHeader { len, client },
    }
}

/// Read `data`, everything received so far; `clock` is when the connection was
/// accepted and when its handshake must be done, `from` where it came from (kept for
/// a PROXY header) and whether a peer forwarder passed it on.
fn judge(
    data: &[u8],
    id: ConnId,
    clock: (Instant, Instant),
    from: (Option<Addrs>, bool),
    listener: &Listener,
    routes: &dyn Routes,
    log: &ConnLog,
) -> Verdict {
    let (accepted, deadline) = clock;
    let (addrs, from_peer) = from;
    if listener.kind == ListenerKind::Postgres && data[0] != 0x16 {
        return match sni::postgres_preamble(data) {
            PgPreamble::NeedMore => Verdict::NeedMore,
            PgPreamble::SslRequest => Verdict::Preamble(b'S'),
            // No GSS encryption here: the client goes on with an SSLRequest.
            PgPreamble::GssEncRequest => Verdict::Preamble(b'N'),
            PgPreamble::Startup => Verdict::PlaintextStartup,
            PgPreamble::Other => Verdict::NotTls,
        };
    }
    let refuse = |why: HandshakeFailure, name: Option<&str>| {
        let alert = match why {
            HandshakeFailure::NoSni | HandshakeFailure::UnknownSni => sni::ALERT_UNRECOGNIZED_NAME,
            _ => sni::ALERT_DECODE_ERROR,
        };
        if log.debug_enabled() {
            let record = Record::Refused {
                why: why.as_str(),
                sni: name.map(Box::from),
            };
            log.record(id, listener.index, record);
        }
        Verdict::Refuse(why, alert)
    };
    let name = match sni::peek_client_hello(data) {
        sni::Peek::NeedMore => return Verdict::NeedMore,
        sni::Peek::NotTls => return Verdict::NotTls,
        sni::Peek::TooLarge => return refuse(HandshakeFailure::TooLarge, None),
        sni::Peek::Malformed(_) => return refuse(HandshakeFailure::Malformed, None),
        sni::Peek::Hello { sni: None } => return refuse(HandshakeFailure::NoSni, None),
        sni::Peek::Hello { sni: Some(name) } => name,
    };
    let Some(route) = routes.by_sni(&name) else {
        // Local routes win; a name no host has is refused here, as on a lone host, and
        // so is one a peer sent here for a VM this host no longer has.
        let Some(route) = routes.remote(&name).filter(|_| !from_peer) else {
            return refuse(HandshakeFailure::UnknownSni, Some(&name));
        };
        if log.debug_enabled() {
            let record = Record::Routed {
                sni: Box::from(&*name),
                vm: Arc::clone(&route),
                port: listener.port,
            };
            log.record(id, listener.index, record);
        }
        // The owner learns the client from this header (the SNI it reads itself).
        let mut header = Vec::new();
        if let Some(a) = addrs {
            proxy_protocol::write_header(a.client, a.local, None, &mut header);
        }
        return Verdict::PassThrough(route, header);
    };
    let Some(config) = listener.tls_for(data) else {
        return Verdict::Failed; // a TLS kind always has a configuration
    };
    let session = match ServerConnection::new(config) {
        Ok(session) => session,
        Err(error) => {
            log.record(id, listener.index, Record::Tls { error });
            return Verdict::Failed;
        }
    };
    if log.debug_enabled() {
        let record = Record::Routed {
            sni: Box::from(&*name),
            vm: Arc::clone(&route),
            port: listener.guest_port_for(&route),
        };
        log.record(id, listener.index, record);
    }
    Verdict::Routed {
        route,
        tls: Box::new(Tls::new(session, accepted, deadline)),
        preface: super::proxy_header(addrs, Some(&name), listener),
    }
}

/// A completion while peeking.
pub(super) fn done<B>(op: Op, result: i32, cx: &mut Cx<'_, B>) -> Next {
    match (op, result) {
        (Op::ClientRecv, 0) => {
            cx.metrics.handshake_failed(HandshakeFailure::ClientClosed);
            Next::Close(Outcome::HandshakeFailed)
        }
        (_, err) if err < 0 => Next::Close(Outcome::ClientError),
        _ => Next::Stay,
    }
}
