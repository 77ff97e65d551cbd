//! Before any crypto: reading the ClientHello (after a Postgres SSLRequest), routing it
//! by SNI or refusing it with a plaintext alert, and lingering after a last word.

use std::os::fd::AsFd;

use rustls::ServerConnection;

use super::{buffer, has_data, post_recv, Conn, Ctx, Op, Phase};
use crate::config::ListenerKind;
use crate::metrics::{HandshakeFailure, Outcome};
use crate::sni::{self, Peek, PgPreamble};

impl Conn {
    pub(super) fn peek(&mut self, cx: &mut Ctx<'_>) {
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
        let kind = cx.shared.listeners[self.listener].kind;
        if kind == ListenerKind::Postgres && data[0] != 0x16 {
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
        log::debug!(
            "{name} on {} -> VM {} at {}:{}",
            cx.shared.listeners[self.listener].name,
            route.id,
            route.guest_ip,
            cx.shared.listeners[self.listener].guest_port
        );
        self.phase = Phase::Handshake;
        self.start_dial(cx, &route);
    }

    /// Queue a few bytes for the client (a one-byte Postgres answer, an alert).
    pub(super) fn say(&mut self, cx: &mut Ctx<'_>, bytes: &[u8]) {
        let cout = buffer(cx.ring, &mut self.cout);
        let _ = cx.ring.fill(cout, |tail| {
            let n = bytes.len().min(tail.len());
            tail[..n].copy_from_slice(&bytes[..n]);
            Ok::<_, ()>(n)
        });
        self.send_client(cx);
    }

    pub(super) fn pg_reply(&mut self, cx: &mut Ctx<'_>) {
        if !self.is_in_flight(Op::ClientSend) {
            if has_data(cx.ring, self.cout) {
                self.send_client(cx);
            } else {
                self.phase = Phase::Peek;
            }
        }
    }

    /// Refuse before any crypto: a plaintext fatal alert, then linger.
    pub(super) fn refuse(&mut self, cx: &mut Ctx<'_>, why: HandshakeFailure, alert: u8) {
        cx.shared.metrics.handshake_failed(why);
        self.say(cx, &sni::alert_record(alert));
        let outcome = match why {
            HandshakeFailure::NoSni => Outcome::NoSni,
            HandshakeFailure::UnknownSni => Outcome::UnknownSni,
            _ => Outcome::HandshakeFailed,
        };
        self.linger_with(cx, outcome);
    }

    pub(super) fn linger_with(&mut self, cx: &mut Ctx<'_>, outcome: Outcome) {
        self.outcome = outcome;
        self.phase = Phase::Linger;
        self.deadline = Some(cx.now + cx.shared.config.handshake_timeout);
    }

    pub(super) fn linger(&mut self, cx: &mut Ctx<'_>) {
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
        self.shut_client_write(cx.ring);
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
}
