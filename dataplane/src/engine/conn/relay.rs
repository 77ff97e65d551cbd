//! Raw listeners: bytes copied both ways as they come, each direction closed on its
//! own (a FIN one way shuts only that way down).

use super::{Buffers, Cx, Dial, Ends, Flow, Next, Op, Proxy, Side};
use crate::metrics::Outcome;

/// Move whatever can move without waiting for a completion.
pub(super) fn pump<B: Buffers>(p: &mut Proxy, ends: &mut Ends, cx: &mut Cx<'_, B>) -> Next {
    match p.dial {
        // Nothing is read from the client before the guest is there to take it.
        Dial::Pending { .. } => return Next::Stay,
        Dial::Failed => return Next::Close(Outcome::DialFailed),
        Dial::Up => {}
    }
    // What a receive returned is sent on as is, from the same buffer.
    p.up = direction(p.up, Side::Client, Side::Guest, ends, cx);
    p.down = direction(p.down, Side::Guest, Side::Client, ends, cx);
    ends.trim(cx);
    Next::Stay
}

/// One direction, `from` → `to`: send what was read, else read more, else pass the end
/// of the stream on. Returns the direction's new state.
fn direction<B: Buffers>(
    flow: Flow,
    from: Side,
    to: Side,
    ends: &mut Ends,
    cx: &mut Cx<'_, B>,
) -> Flow {
    if ends.busy(Op::send(to)) || ends.busy(Op::recv(from)) {
        return flow;
    }
    // Our own bytes for `to` (a PROXY header) go before anything relayed.
    let outbox = *ends.outbox(to);
    if ends.send(to, outbox, cx) {
        return flow;
    }
    let inbox = *ends.inbox(from);
    if ends.send(to, inbox, cx) {
        return flow;
    }
    match flow {
        Flow::Open => {
            ends.recv(from, cx);
            Flow::Open
        }
        Flow::ReadClosed => {
            ends.shutdown(to, cx);
            Flow::Closed
        }
        other => other,
    }
}
