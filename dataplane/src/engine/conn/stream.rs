//! Moving bytes once routed: raw copies, and the TLS pump between the client, rustls
//! and the backend, with half-close in both directions.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;

use super::{buffer, has_data, post_recv, trim, Conn, Ctx, Dial, Op, Phase};
use crate::config::ListenerKind;
use crate::metrics::{HandshakeFailure, Outcome};

/// What the HTTPS listener answers when the VM cannot be reached, as the original does.
fn response_502() -> Vec<u8> {
    let body = "502 Bad Gateway: the VM did not accept the connection\n";
    format!(
        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl Conn {
    /// Raw listeners: copy both ways; what a receive returned is sent on as is.
    pub(super) fn pump_raw(&mut self, cx: &mut Ctx<'_>) {
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
            } else {
                self.shut_client_write(cx.ring);
            }
        }
        if self.client_shut && self.backend_shut && self.inflight == 0 {
            self.close(Outcome::Ok);
        }
    }

    /// TLS listeners: move bytes between the client, rustls and the backend until
    /// nothing more can happen without a completion.
    pub(super) fn pump_tls(&mut self, cx: &mut Ctx<'_>) {
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
            if cx.shared.listeners[self.listener].kind == ListenerKind::Https {
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
            } else if self.close_notify_sent && !tls.wants_write() {
                self.shut_client_write(cx.ring);
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
