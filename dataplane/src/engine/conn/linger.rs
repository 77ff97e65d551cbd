//! After a last word to the client (an alert, a 502, close_notify, a PostgreSQL
//! answer): flush it, shut our side, and read the client until it closes. Closing a
//! socket with unread input makes the kernel send a reset, which can destroy the very
//! words in flight.

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
}

impl Linger {
    pub(super) fn new(outcome: Outcome, deadline: Instant, tls: Option<Box<Tls>>) -> Linger {
        Linger {
            outcome,
            deadline,
            tls,
            up: Flow::WriteClosed,
            down: Flow::ReadClosed,
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
                ends.shutdown(Side::Client, cx);
                self.down = Flow::Closed;
                self.tls = None;
            }
        }
        if self.up == Flow::WriteClosed && !ends.busy(Op::ClientRecv) {
            if let Some(b) = ends.from_client {
                let n = cx.bufs.data(b).len();
                cx.bufs.consume(b, n);
            }
            ends.recv(Side::Client, super::RecvKind::Pooled, cx);
        }
        if self.up == Flow::Closed && self.down == Flow::Closed {
            return Next::Close(self.outcome);
        }
        Next::Stay
    }

    /// A completion while lingering: only the client's matter.
    pub(super) fn done(&mut self, op: Op, result: i32) -> Next {
        match (op, result) {
            (Op::ClientRecv, 0) => {
                self.up = Flow::Closed;
                Next::Stay
            }
            // The client is gone: nothing more to say or hear.
            (Op::ClientRecv | Op::ClientSend, err) if err < 0 => Next::Close(self.outcome),
            _ => Next::Stay,
        }
    }
}
