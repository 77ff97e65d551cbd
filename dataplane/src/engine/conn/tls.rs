//! TLS listeners: bytes move between the client, rustls and the guest, each step on
//! its own below, in the order `pump` runs them.

use std::io::{self, Read, Write};
use std::time::Instant;

use rustls::ServerConnection;

use super::{Buffers, ConnId, Cx, Dial, Ends, Flow, Mode, Next, Op, Proxy, RecvKind, Side};
use crate::config::ListenerKind;
use crate::engine::connlog::Record;
use crate::metrics::{HandshakeFailure, Outcome};

pub struct Tls {
    pub(super) session: ServerConnection,
    phase: Phase,
    /// ClientHello bytes that arrived in pieces (see `peek`), fed to rustls before
    /// anything received later.
    pub(super) hello: Vec<u8>,
}

/// Where the handshake is.
enum Phase {
    Handshake {
        /// Accepted then: the handshake's latency counts from here.
        accepted: Instant,
        deadline: Instant,
    },
    /// Done: the idle timeout rules from here.
    Established,
}

impl Tls {
    pub(super) fn new(session: ServerConnection, accepted: Instant, deadline: Instant) -> Tls {
        Tls {
            session,
            phase: Phase::Handshake { accepted, deadline },
            hello: Vec::new(),
        }
    }

    /// The handshake's deadline while it runs.
    pub(super) fn handshake_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Handshake { deadline, .. } => Some(deadline),
            Phase::Established => None,
        }
    }

    /// The client's TCP stream ended: rustls decides whether that was clean (after
    /// close_notify) once it has handed over the plaintext before it.
    pub(super) fn client_eof(&mut self) {
        let _ = self.session.read_tls(&mut io::empty());
    }
}

/// Move whatever can move without waiting for a completion.
pub(super) fn pump<B: Buffers>(
    p: &mut Proxy,
    ends: &mut Ends,
    id: ConnId,
    cx: &mut Cx<'_, B>,
) -> Next {
    let Proxy {
        dial,
        mode: Mode::Tls(tls),
        up,
        down,
        ..
    } = p
    else {
        return Next::Stay;
    };
    let dial_up = matches!(dial, Dial::Up);
    if let Err(error) = decrypt(tls, up, dial_up, ends, cx) {
        return failed(tls, error, id, cx);
    }
    if let Some(next) = finish_handshake(tls, dial, cx) {
        return next;
    }
    encrypt(tls, *down, ends, cx);
    flush_to_client(tls, down, ends, cx);
    if dial_up {
        ends.send(Side::Guest, ends.to_guest, cx);
        if *down == Flow::Open {
            // Whole records: rustls cuts plaintext into records of at most 16 KiB, so a
            // read of 16 KiB + 512 would go out as a full record and a 512-byte one.
            ends.recv(Side::Guest, RecvKind::Records, cx);
        }
    }
    if *up == Flow::Open && tls.hello.is_empty() {
        ends.recv(Side::Client, RecvKind::Stream, cx);
    }
    ends.trim(cx);
    Next::Stay
}

/// Client ciphertext into rustls, plaintext out into `to_guest` once the guest is up.
/// When the client's plaintext has ended and all of it is out, the guest gets a FIN.
fn decrypt<B: Buffers>(
    tls: &mut Tls,
    up: &mut Flow,
    dial_up: bool,
    ends: &mut Ends,
    cx: &mut Cx<'_, B>,
) -> Result<(), rustls::Error> {
    loop {
        let mut progress = false;
        // An error from `read_tls` means rustls' buffer is full: the guest has to
        // catch up before more ciphertext goes in.
        if !tls.hello.is_empty() {
            if let Ok(n) = tls.session.read_tls(&mut &tls.hello[..]) {
                tls.hello.drain(..n);
                if tls.hello.is_empty() {
                    tls.hello = Vec::new(); // give the memory back
                }
                progress |= n > 0;
            }
        } else if let Some(b) = ends.from_client.filter(|&b| !cx.bufs.is_empty(b)) {
            if let Ok(n) = cx
                .bufs
                .drain(b, |data| tls.session.read_tls(&mut &data[..]))
            {
                progress |= n > 0;
            }
        }
        let state = tls.session.process_new_packets()?;
        let readable = state.plaintext_bytes_to_read() > 0
            || state.peer_has_closed()
            || *up == Flow::ReadClosed;
        let ready = dial_up
            && matches!(*up, Flow::Open | Flow::ReadClosed)
            && !ends.busy(Op::GuestSend)
            && !super::has_data(cx.bufs, ends.to_guest);
        if readable && ready {
            let len = ends.outbox_len(Side::Client);
            let buf = *ends.to_guest.get_or_insert_with(|| cx.bufs.alloc(len));
            match cx.bufs.fill(buf, |tail| tls.session.reader().read(tail)) {
                Ok(0) => end_of_plaintext(up, ends, cx), // close_notify
                Ok(_) => progress = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => end_of_plaintext(up, ends, cx), // TCP closed without close_notify
            }
        }
        if !progress {
            return Ok(());
        }
    }
}

/// Everything the client sent is out (`to_guest` is empty and idle here): FIN.
fn end_of_plaintext<B>(up: &mut Flow, ends: &mut Ends, cx: &mut Cx<'_, B>) {
    ends.shutdown(Side::Guest, cx);
    *up = Flow::Closed;
}

/// rustls refused what the client sent; the alert it queued is our last word.
fn failed<B>(tls: &Tls, error: rustls::Error, id: ConnId, cx: &mut Cx<'_, B>) -> Next {
    let handshaking = tls.handshake_deadline().is_some();
    cx.log.record(id, cx.listener.index, Record::Tls { error });
    if handshaking {
        cx.metrics.handshake_failed(HandshakeFailure::Tls);
        Next::Linger(Outcome::HandshakeFailed)
    } else {
        Next::Linger(Outcome::TlsError)
    }
}

/// The handshake done: count it; and if the guest cannot be reached, tell the client
/// now (HTTPS: a 502 page), then close.
fn finish_handshake<B>(tls: &mut Tls, dial: &Dial, cx: &mut Cx<'_, B>) -> Option<Next> {
    if let Phase::Handshake { accepted, .. } = tls.phase {
        if tls.session.is_handshaking() {
            return None;
        }
        cx.metrics
            .handshake_latency(cx.now.duration_since(accepted));
        tls.phase = Phase::Established;
    }
    if !matches!(dial, Dial::Failed) {
        return None;
    }
    if cx.listener.kind == ListenerKind::Https {
        let _ = tls.session.writer().write_all(&response_502());
    }
    tls.session.send_close_notify();
    Some(Next::Linger(Outcome::DialFailed))
}

/// Guest plaintext into rustls, one buffer at a time so its queue stays bounded; once
/// the guest's stream ended and all of it is in, close_notify.
fn encrypt<B: Buffers>(tls: &mut Tls, down: Flow, ends: &mut Ends, cx: &mut Cx<'_, B>) {
    if tls.session.is_handshaking() {
        return;
    }
    if let Some(b) = ends.from_guest.filter(|_| !tls.session.wants_write()) {
        let _ = cx.bufs.drain(b, |data| tls.session.writer().write(data));
    }
    if down == Flow::ReadClosed && !super::has_data(cx.bufs, ends.from_guest) {
        tls.session.send_close_notify(); // once: rustls ignores repeats
    }
}

/// rustls' records out to the client; after close_notify, a FIN.
fn flush_to_client<B: Buffers>(
    tls: &mut Tls,
    down: &mut Flow,
    ends: &mut Ends,
    cx: &mut Cx<'_, B>,
) {
    if ends.busy(Op::ClientSend) {
        return;
    }
    if !super::has_data(cx.bufs, ends.to_client) && tls.session.wants_write() {
        let len = ends.outbox_len(Side::Guest);
        let buf = *ends.to_client.get_or_insert_with(|| cx.bufs.alloc(len));
        let _ = cx
            .bufs
            .fill(buf, |tail| tls.session.write_tls(&mut &mut tail[..]));
    }
    let notified = *down == Flow::ReadClosed
        && !tls.session.is_handshaking()
        && !super::has_data(cx.bufs, ends.from_guest);
    // With close_notify queued and nothing left in rustls, only the FIN comes after
    // this send.
    let last = notified && !tls.session.wants_write();
    if ends.send_as(Side::Client, ends.to_client, last, cx) {
        return;
    }
    if notified && !tls.session.wants_write() {
        ends.shutdown(Side::Client, cx);
        *down = Flow::Closed;
    }
}

/// What the HTTPS listener answers when the VM cannot be reached, as the original does.
fn response_502() -> Vec<u8> {
    let body = "502 Bad Gateway: the VM did not accept the connection\n";
    format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_502_response_is_well_formed() {
        let text = String::from_utf8(response_502()).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a header block");
        assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
