//! After a last word to the client (an alert, a 502, close_notify, a PostgreSQL
//! answer): flush it, shut our side, and read the client until it closes. Closing a
//! socket with unread input makes the kernel send a reset, which can destroy the very
//! words in flight.
//!
//! A whole ClientHello refused for its name (an alert for an unknown name, or none)
//! first asks, without waiting, whether the client sent anything after its hello. A client that has not
//! (every ordinary client, which waits for our answer) is not waited for: once the
//! alert is out the connection closes, and the close's FIN follows the alert as a
//! shutdown's would, with nothing unread to turn it into a reset. That spares a
//! shutdown, a receive and a wake-up per refusal, and a flood of refused clients that
//! never close holds no connection until the deadline.

use std::time::Instant;

use super::{Buffers, Cx, Ends, Flow, Next, Op, Side, Tls, BUF_LEN};
use crate::metrics::Outcome;

pub struct Linger {
    /// Decided when the last word was: how the connection ends, whatever the client
    /// does now.
    outcome: Outcome,
    deadline: Instant,
    /// rustls, while it still has records (an alert, close_notify) to write.
    tls: Option<Box<Tls>>,
    /// Client → us: read and dropped until the client's FIN.
    up: Flow,
    /// Us → client: our last word until it is flushed and shut.
    down: Flow,
    /// Whether the client has unread input, for a refusal.
    unread: Unread,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unread {
    /// A refusal: not known yet (the receive that does not wait is due or in flight).
    Asking,
    /// Nothing: close once the last word is out.
    Nothing,
    /// It sent more, or this is no refusal: shut our side and read until it closes.
    Drain,
}

impl Linger {
    /// `refusal`: a hello refused for its name, whose client is not waited for if it
    /// has nothing more to say.
    pub(super) fn new(
        outcome: Outcome,
        deadline: Instant,
        tls: Option<Box<Tls>>,
        refusal: bool,
    ) -> Linger {
        Linger {
            outcome,
            deadline,
            tls,
            up: Flow::WriteClosed,
            down: Flow::ReadClosed,
            unread: match refusal {
                true => Unread::Asking,
                false => Unread::Drain,
            },
        }
    }

    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub(super) fn step<B: Buffers>(&mut self, ends: &mut Ends, cx: &mut Cx<'_, B>) -> Next {
        if self.down == Flow::ReadClosed && !ends.busy(Op::ClientSend) {
            let session = self.tls.as_mut().map(|t| &mut t.session);
            if let Some(session) = session.filter(|s| s.wants_write()) {
                if !super::has_data(cx.bufs, ends.to_client) {
                    let buf = *ends.to_client.get_or_insert_with(|| cx.bufs.alloc(BUF_LEN));
                    let _ = cx
                        .bufs
                        .fill(buf, |tail| session.write_tls(&mut &mut tail[..]));
                }
            }
            if !ends.send_last(ends.to_client, cx) {
                match self.unread {
                    // The FIN waits for the answer: no FIN at all if we close.
                    Unread::Asking => {}
                    Unread::Nothing => return Next::Close(self.outcome),
                    Unread::Drain => {
                        ends.shutdown(Side::Client, cx);
                        self.down = Flow::Closed;
                        self.tls = None;
                    }
                }
            }
        }
        let reading = self.up == Flow::WriteClosed && self.unread != Unread::Nothing;
        if reading && !ends.busy(Op::ClientRecv) {
            if let Some(b) = ends.from_client {
                let n = cx.bufs.data(b).len();
                cx.bufs.consume(b, n);
            }
            let read = match self.unread {
                Unread::Asking => super::RecvKind::Unread,
                _ => super::RecvKind::Pooled,
            };
            ends.recv(Side::Client, read, cx);
        }
        if self.up == Flow::Closed && self.down == Flow::Closed {
            return Next::Close(self.outcome);
        }
        Next::Stay
    }

    /// A completion while lingering: only the client's matter.
    pub(super) fn done(&mut self, op: Op, result: i32) -> Next {
        match (op, result) {
            (Op::ClientRecv, err) if err == -libc::EAGAIN && self.unread == Unread::Asking => {
                self.unread = Unread::Nothing;
                Next::Stay
            }
            (Op::ClientRecv, 0) => {
                self.up = Flow::Closed;
                self.unread = Unread::Drain;
                Next::Stay
            }
            (Op::ClientRecv, n) if n > 0 => {
                self.unread = Unread::Drain;
                Next::Stay
            }
            // The client is gone: nothing more to say or hear.
            (Op::ClientRecv | Op::ClientSend, err) if err < 0 => Next::Close(self.outcome),
            _ => Next::Stay,
        }
    }
}
