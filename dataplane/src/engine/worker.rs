//! One worker thread: a ring, its listening sockets, and the connections it accepted.
//!
//! The worker is the connections' I/O shell. It owns their sockets, turns each ring
//! completion into an [`Event`] for the connection it belongs to, and carries out the
//! [`Io`] the connection asks for in return. Dials that find their namespace's socket
//! pool empty are parked here (never in the connection) and resumed when the pool
//! signals the worker's eventfd.
//!
//! It also guards the process's limits: a connection over a cap is closed at once
//! ([`Admission`](super::admit::Admission)); when accepting fails for want of
//! descriptors or memory, accepting pauses (10 ms doubling to 1 s, or until a
//! connection closes) instead of failing in a tight loop; and when the resolver says a
//! VM may have gone away, connections to it are ended ([`Event::VmGone`]).

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ffi_free_netns::Wake;
use rustix::event::{eventfd, EventfdFlags};

use super::admit::Place;
use super::conn::{Addrs, Conn, Cx, Event, Io, Op, Side, BUF_LEN};
use super::connlog::{ConnId, Record};
use super::dial::{guest_socket, DialError};
use super::listen::client_addrs;
use super::ring::{Completion, Ring};
use super::Shared;
use crate::backoff::{self, Backoff, Throttle};
use crate::metrics::Outcome;
use crate::resolver::{Namespace, NsIdentity, Route, Snapshot};

/// How often timers and the stop flag are looked at.
const TICK: Duration = Duration::from_millis(100);
const RING_ENTRIES: u32 = 4096;
/// Receive buffers shared by a worker's connections (a power of two), each holding one
/// maximal TLS record. Past that, receives fall back to buffers of their own. The kernel
/// takes them in turn, so over time every one gets written (a page at least): fewer
/// buffers, less memory that stays resident; sides in bulk read into buffers of their
/// own, so the pool serves small receives and the ClientHello.
pub const POOL_BUFFERS: u16 = 512;
/// The most connection slots a worker reserves up front (see `Worker::new`).
const MAX_RESERVED_SLOTS: usize = 1 << 16;
/// Tokens with this bit set belong to listeners, the rest to connections.
const LISTENER_TOKEN: u32 = 1 << 31;
/// Token of operations whose completion needs no handling (cancelling accepts).
const IGNORED_TOKEN: u32 = u32::MAX;
/// Token of the poll on the worker's eventfd, which the socket pool signals.
const WAKE_TOKEN: u32 = u32::MAX - 1;

/// A connection token: its slot and the operation.
fn token(slot: u32, op: Op) -> u32 {
    (slot << 4) | op as u32
}

fn from_token(token: u32) -> Option<(u32, Op)> {
    let op = *Op::ALL.get((token & 0xf) as usize)?;
    Some((token >> 4, op))
}

/// A connection and what the worker holds for it.
struct Slot {
    conn: Conn,
    listener: usize,
    client: OwnedFd,
    guest: Option<OwnedFd>,
    /// Its place under the connection caps.
    place: Place,
    /// What its VM's namespace file named when the guest socket was taken: the
    /// connection ends when the file names another namespace, or none.
    netns: Option<NsIdentity>,
}

impl Slot {
    fn fd(&self, side: Side) -> Option<BorrowedFd<'_>> {
        match side {
            Side::Client => Some(self.client.as_fd()),
            Side::Guest => self.guest.as_ref().map(AsFd::as_fd),
        }
    }
}

/// A dial waiting for its namespace's pool to have a socket.
struct Parked {
    slot: u32,
    route: Arc<Route>,
    port: u16,
    deadline: Instant,
}

pub struct Worker {
    // Dropped in this order: the connections (and their sockets) first, then the ring,
    // which cancels and reaps whatever is still in flight before freeing its memory.
    conns: Vec<Option<Slot>>,
    ring: Ring,
    index: usize,
    shared: Arc<Shared>,
    /// Indexed like `shared.listeners`; `None` once closed for shutdown.
    listeners: Vec<Option<OwnedFd>>,
    free_slots: Vec<u32>,
    live: usize,
    accepting: bool,
    /// Per listener: its multishot accept is armed.
    armed: Vec<bool>,
    /// Accepting paused until then (out of descriptors or memory), or until a
    /// connection closes, whichever comes first.
    paused_until: Option<Instant>,
    backoff: Backoff,
    /// The warning about failing accepts: one line per interval.
    accept_warning: Throttle,
    /// The resolver's generation last looked at (see `Resolver::generation`).
    routes_seen: u64,
    last_tick: Instant,
    /// Connection ids are `<worker>-<seq>`.
    next_seq: u64,
    reaped: Vec<Completion>,
    /// What the connection being stepped asked for, and what that led to.
    ios: Vec<Io>,
    spare_ios: Vec<Io>,
    events: Vec<Event>,
    /// Signalled by the socket pool when parked dials should try again.
    wake_fd: Arc<OwnedFd>,
    wake: Wake,
    parked: Vec<Parked>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker that unwinds gives its connections' places back.
        for slot in self.conns.drain(..).flatten() {
            self.shared.admission.release(slot.place);
        }
    }
}

impl Worker {
    /// Worker `index`, whose receive pool holds `pool_buffers` buffers (a power of two).
    pub fn new(
        index: usize,
        shared: Arc<Shared>,
        listeners: Vec<OwnedFd>,
        pool_buffers: u16,
    ) -> io::Result<Worker> {
        let mut ring = Ring::new(RING_ENTRIES, pool_buffers, BUF_LEN)?;
        for (i, fd) in listeners.iter().enumerate() {
            ring.accept_multi(fd.as_fd(), LISTENER_TOKEN | i as u32);
        }
        let routes_seen = shared.resolver.generation();
        let armed = vec![true; listeners.len()];
        let wake_fd = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        ring.poll_readable_multi(wake_fd.as_fd(), WAKE_TOKEN);
        let signal = Arc::clone(&wake_fd);
        let wake: Wake = Arc::new(move || {
            // A full counter (EAGAIN) is already a pending wake.
            let _ = rustix::io::write(&*signal, &1u64.to_ne_bytes());
        });
        // Address space for as many slots as the process may hold connections (the
        // kernel backs it with memory only as slots are used): a table grown by
        // doubling would copy itself at every step and leave the old copies with the
        // allocator until it returns them, which after a flood of connections was
        // about one more slot's worth of memory per connection.
        let reserved = shared.admission.caps().total.min(MAX_RESERVED_SLOTS);
        Ok(Worker {
            conns: Vec::with_capacity(reserved),
            ring,
            index,
            shared,
            listeners: listeners.into_iter().map(Some).collect(),
            free_slots: Vec::new(),
            live: 0,
            accepting: true,
            armed,
            paused_until: None,
            backoff: Backoff::accept(),
            accept_warning: Throttle::new(backoff::WARN_INTERVAL),
            routes_seen,
            last_tick: Instant::now(),
            next_seq: 0,
            reaped: Vec::new(),
            ios: Vec::new(),
            spare_ios: Vec::new(),
            events: Vec::new(),
            wake_fd,
            wake,
            parked: Vec::new(),
        })
    }

    pub fn run(&mut self) {
        loop {
            let mut reaped = std::mem::take(&mut self.reaped);
            // A pause shorter than a tick ends on time.
            let wait = self.paused_until.map_or(TICK, |t| {
                t.saturating_duration_since(Instant::now()).min(TICK)
            });
            self.ring.run_once(wait, &mut reaped);
            let now = Instant::now();
            for c in reaped.drain(..) {
                self.dispatch(c, now);
            }
            self.reaped = reaped;
            if self.paused_until.is_some_and(|t| now >= t) {
                self.resume_accepting();
            }
            if now.duration_since(self.last_tick) >= TICK {
                self.last_tick = now;
                if self.tick(now) {
                    return;
                }
            }
        }
    }

    fn dispatch(&mut self, c: Completion, now: Instant) {
        match c.token {
            IGNORED_TOKEN => {}
            WAKE_TOKEN => self.on_wake(&c, now),
            t if t & LISTENER_TOKEN != 0 => self.on_accept(c, now),
            t => {
                let Some((slot, op)) = from_token(t) else {
                    return;
                };
                let done = Event::Done {
                    op,
                    result: c.result,
                    buf: c.received,
                };
                if !self.step(slot, now, done) {
                    // No such connection (cannot happen: a slot is freed only once
                    // every operation is reaped): do not leak the buffer.
                    if let Some(buf) = c.received {
                        super::buffers::Buffers::release(&mut self.ring, buf);
                    }
                }
            }
        }
    }

    fn on_accept(&mut self, c: Completion, now: Instant) {
        let listener = (c.token & !LISTENER_TOKEN) as usize;
        if !c.more {
            // The multishot accept ended (an error ends it).
            if let Some(armed) = self.armed.get_mut(listener) {
                *armed = false;
            }
            if !self.accepting {
                if let Some(l) = self.listeners.get_mut(listener) {
                    // Stopping: the accept is over, so the socket can close.
                    *l = None;
                }
            } else if c.result < 0 && c.result != -libc::ECANCELED {
                self.accept_failed(listener, -c.result, now);
            } else {
                self.arm(listener);
            }
        }
        let Some(client) = c.accepted else { return };
        self.backoff.succeeded();
        let metrics = &self.shared.metrics;
        metrics.conn_opened(listener);
        // A PROXY header needs both addresses (so does telling a peer forwarder's
        // connection in a cluster); a client gone before they could be read (ENOTCONN)
        // is closed.
        let in_cluster = self.shared.routing.in_cluster();
        let addrs = match self.shared.listeners[listener].proxy_v2 || in_cluster {
            true => match client_addrs(&client) {
                Ok(addrs) => Some(addrs),
                Err(_) => return metrics.conn_closed(listener, Outcome::ClientError),
            },
            false => None,
        };
        let place = match self.accepting {
            true => admit(&self.shared, &client, addrs),
            false => Err(Outcome::Refused),
        };
        let place = match place {
            Ok(place) => place,
            Err(outcome) => {
                // Closed at once: `client` drops here.
                metrics.conn_closed(listener, outcome);
                return;
            }
        };
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        self.next_seq += 1;
        let id = ConnId {
            worker: self.index as u16,
            seq: self.next_seq,
        };
        let mut cx = context(&mut self.ring, &mut self.ios, &self.shared, listener, now);
        let conn = Conn::accept(id, addrs, &mut cx);
        self.conns[slot as usize] = Some(Slot {
            conn,
            listener,
            client,
            guest: None,
            place,
            netns: None,
        });
        self.live += 1;
        self.carry_out(slot, now);
        self.reap(slot);
    }

    /// Start the multishot accept of `listener` again, unless it is armed or closed.
    fn arm(&mut self, listener: usize) {
        let Some(fd) = self.listeners.get(listener).and_then(Option::as_ref) else {
            return;
        };
        if let Some(armed) = self.armed.get_mut(listener).filter(|a| !**a) {
            *armed = true;
            self.ring
                .accept_multi(fd.as_fd(), LISTENER_TOKEN | listener as u32);
        }
    }

    /// An accept failed with `errno`. Out of descriptors or memory, retrying at once
    /// would fail again at once (the connection stays in the listen queue): accepting
    /// pauses instead, on every listener of this worker, until the back-off delay
    /// passes or a connection closes. Anything else (a connection aborted while
    /// queued) is retried at once.
    fn accept_failed(&mut self, listener: usize, errno: i32, now: Instant) {
        let exhausted = matches!(
            errno,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        );
        let paused = match (exhausted, self.paused_until) {
            (false, _) => None,
            // Already paused: this listener waits with the others.
            (true, Some(_)) => return,
            (true, None) => {
                let wait = self.backoff.failed();
                self.paused_until = Some(now + wait);
                self.shared.metrics.accept_paused();
                Some(wait)
            }
        };
        if let Some(more) = self.accept_warning.hit(now) {
            let error = io::Error::from_raw_os_error(errno);
            let name = &self.shared.listeners[listener].name;
            match paused {
                Some(wait) => log::warn!(
                    "accept on {name} failed: {error}; accepting paused for {wait:?} or until a connection closes ({} open, limit {}){}",
                    self.shared.admission.open(),
                    self.shared.admission.caps().total,
                    backoff::more(more)
                ),
                None => log::warn!("accept on {name} failed: {error}{}", backoff::more(more)),
            }
        }
        if paused.is_none() {
            self.arm(listener);
        }
    }

    /// End a pause in accepting: re-arm every listener whose accept ended.
    fn resume_accepting(&mut self) {
        self.paused_until = None;
        if self.accepting {
            for listener in 0..self.listeners.len() {
                self.arm(listener);
            }
        }
    }

    /// The pool signalled: retry every parked dial (those still without a socket park
    /// again and are signalled again).
    fn on_wake(&mut self, c: &Completion, now: Instant) {
        let mut count = [0u8; 8];
        // Reset the counter; every parked dial is retried below whatever it held.
        let _ = rustix::io::read(&*self.wake_fd, &mut count);
        if !c.more {
            if c.result < 0 {
                log::warn!(
                    "poll on the pool's eventfd failed: {}",
                    io::Error::from_raw_os_error(-c.result)
                );
            }
            self.ring
                .poll_readable_multi(self.wake_fd.as_fd(), WAKE_TOKEN);
        }
        for parked in std::mem::take(&mut self.parked) {
            let slot = parked.slot;
            let wanted = self
                .conns
                .get(slot as usize)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.conn.awaits_dial());
            if wanted {
                if let Some(event) = self.dial(parked, now) {
                    self.step(slot, now, event);
                }
            }
        }
    }

    /// Feed `event` to the connection in `slot`, carry out what it asks for, and free
    /// it if that finished it. False when the slot holds no connection.
    fn step(&mut self, slot: u32, now: Instant, event: Event) -> bool {
        if self
            .conns
            .get(slot as usize)
            .and_then(Option::as_ref)
            .is_none()
        {
            return false;
        }
        self.events.push(event);
        self.carry_out(slot, now);
        self.reap(slot);
        true
    }

    /// Alternate between the connection in `slot` and the ring: events in, the
    /// operations it asks for out, and what those answer at once (a dial's outcome)
    /// back in, until it asks for nothing more.
    fn carry_out(&mut self, slot: u32, now: Instant) {
        // Three lists, kept with their capacity from one step to the next: a step on the
        // data path allocates nothing here.
        let mut events = std::mem::take(&mut self.events);
        let mut ios = std::mem::take(&mut self.spare_ios);
        loop {
            if let Some(s) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) {
                for event in events.drain(..) {
                    let mut cx =
                        context(&mut self.ring, &mut self.ios, &self.shared, s.listener, now);
                    s.conn.handle(event, &mut cx);
                }
            }
            events.clear();
            std::mem::swap(&mut ios, &mut self.ios);
            for io in ios.drain(..) {
                if let Some(event) = self.submit(slot, io, now) {
                    events.push(event);
                }
            }
            if events.is_empty() {
                break;
            }
        }
        self.events = events;
        self.spare_ios = ios;
    }

    /// Hand one operation to the ring. An operation the ring cannot take (the socket
    /// it names is missing) completes at once with an error, so the connection's
    /// account of what is in flight stays true.
    fn submit(&mut self, slot: u32, io: Io, now: Instant) -> Option<Event> {
        let s = self.conns.get_mut(slot as usize).and_then(Option::as_mut)?;
        let op = io.op();
        let submitted = match io {
            Io::Dial {
                route,
                port,
                timeout,
            } => {
                let parked = Parked {
                    slot,
                    route,
                    port,
                    deadline: now + timeout,
                };
                return self.dial(parked, now);
            }
            Io::Recv {
                side,
                into,
                max,
                wait,
            } => s.fd(side).is_some_and(|fd| {
                let t = token(slot, Op::recv(side));
                match into {
                    None => {
                        self.ring.recv_pooled(fd, max, wait, t);
                        true
                    }
                    Some(buf) => self.ring.recv(fd, buf, max, wait, t),
                }
            }),
            Io::Send {
                side,
                buf,
                fin_follows,
            } => s.fd(side).is_some_and(|fd| {
                let t = token(slot, Op::send(side));
                self.ring.send(fd, buf, fin_follows, t)
            }),
            Io::Shutdown(side) => {
                // Not through the ring: io_uring cannot shut a socket down without
                // (as it sees it) blocking, so it hands every shutdown to a thread of
                // its own, a wake-up and two context switches per FIN. Here it is one
                // short system call; the core asks for it only once no send is in
                // flight on that socket, so the FIN still follows every byte sent.
                let result = match s.fd(side) {
                    Some(fd) => match rustix::net::shutdown(fd, rustix::net::Shutdown::Write) {
                        Ok(()) => 0,
                        Err(e) => -e.raw_os_error(),
                    },
                    None => -libc::EBADF,
                };
                return Some(Event::Done {
                    op: Op::shutdown(side),
                    result,
                    buf: None,
                });
            }
            Io::Cancel(side) => s.fd(side).is_some_and(|fd| {
                let t = token(slot, Op::cancel(side));
                self.ring.cancel_fd(fd.as_raw_fd(), t);
                true
            }),
        };
        match (submitted, op) {
            (false, Some(op)) => Some(Event::Done {
                op,
                result: -libc::EBADF,
                buf: None,
            }),
            _ => None,
        }
    }

    /// Connect if the namespace's pool has a socket now; park otherwise.
    fn dial(&mut self, parked: Parked, now: Instant) -> Option<Event> {
        let Some(left) = parked
            .deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            return Some(Event::DialFailed(DialError::PoolTimeout));
        };
        let s = self
            .conns
            .get_mut(parked.slot as usize)
            .and_then(Option::as_mut)?;
        match guest_socket(&self.shared.pool, &parked.route.netns, &self.wake) {
            Ok(Some(fd)) => {
                // What the namespace file names now is what this socket was made in
                // (the pool checks its file before each refill, and at least every
                // second). No file any more: the socket is from a namespace that was
                // deleted since, whose guest is gone or going.
                s.netns = parked.route.netns.identity();
                if s.netns.is_none() && matches!(parked.route.netns, Namespace::File(_)) {
                    return Some(Event::DialFailed(DialError::VmGone));
                }
                let addr = SocketAddrV4::new(parked.route.guest_ip, parked.port);
                // Parked time counts against the dial timeout.
                let t = token(parked.slot, Op::Connect);
                self.ring.connect(fd.as_fd(), addr, left, t);
                s.guest = Some(fd);
                Some(Event::Dialing)
            }
            Ok(None) => {
                if self.shared.log.debug_enabled() {
                    let record = Record::DialParked {
                        vm: Arc::clone(&parked.route),
                    };
                    self.shared.log.record(s.conn.id(), s.listener, record);
                }
                self.parked.push(parked);
                None
            }
            Err(e) => Some(Event::DialFailed(e)),
        }
    }

    fn reap(&mut self, slot: u32) {
        let entry = &mut self.conns[slot as usize];
        let Some(outcome) = entry.as_ref().and_then(|s| s.conn.finished()) else {
            return;
        };
        if let Some(s) = entry.take() {
            self.shared.metrics.conn_closed(s.listener, outcome);
            for buf in s.conn.buffers() {
                super::buffers::Buffers::release(&mut self.ring, buf);
            }
            self.parked.retain(|p| p.slot != slot);
            self.free_slots.push(slot);
            self.live -= 1;
            let Slot {
                place,
                client,
                guest,
                ..
            } = s;
            self.shared.admission.release(place);
            // Its descriptors are free now: accepting may go on.
            drop((client, guest));
            if self.paused_until.is_some() {
                self.resume_accepting();
            }
        }
    }

    /// The resolver saw something that may have taken a VM away: end the connections
    /// whose VM no longer routes as they were routed, or whose namespace file no longer
    /// names the namespace they were dialed in.
    fn end_connections_to_gone_vms(&mut self, now: Instant) {
        let snapshot = self.shared.resolver.snapshot();
        // What each namespace file names now, looked up once per file.
        let mut names: Vec<(Arc<str>, Option<NsIdentity>)> = Vec::new();
        for slot in 0..self.conns.len() as u32 {
            let gone = match self.conns[slot as usize].as_ref() {
                Some(s) => s
                    .conn
                    .route()
                    .is_some_and(|route| vm_gone(route, s.netns, &snapshot, &mut names)),
                None => false,
            };
            if gone {
                self.step(slot, now, Event::VmGone);
            }
        }
    }

    /// Timers and shutdown; returns true when the worker is done.
    fn tick(&mut self, now: Instant) -> bool {
        let stopping = self.shared.stopping();
        if stopping.is_some() && self.accepting {
            self.accepting = false;
            for (fd, armed) in self.listeners.iter_mut().zip(&self.armed) {
                match (fd.as_ref(), armed) {
                    (Some(open), true) => self.ring.cancel_fd(open.as_raw_fd(), IGNORED_TOKEN),
                    // No accept in flight (paused): nothing to wait for.
                    _ => *fd = None,
                }
            }
        }
        let generation = self.shared.resolver.generation();
        if generation != self.routes_seen {
            self.routes_seen = generation;
            self.end_connections_to_gone_vms(now);
        }
        // Parked dials past their deadline fail.
        let (expired, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| now >= p.deadline);
        self.parked = waiting;
        for p in expired {
            self.step(p.slot, now, Event::DialFailed(DialError::PoolTimeout));
        }
        let drain_over = stopping.is_some_and(|deadline| now >= deadline);
        for slot in 0..self.conns.len() as u32 {
            let event = if drain_over {
                Event::Abort
            } else {
                Event::Tick
            };
            self.step(slot, now, event);
        }
        stopping.is_some() && self.live == 0
    }
}

/// What a connection on `listener` works with for one event.
fn context<'a>(
    ring: &'a mut Ring,
    ios: &'a mut Vec<Io>,
    shared: &'a Shared,
    listener: usize,
    now: Instant,
) -> Cx<'a, Ring> {
    Cx {
        bufs: ring,
        io: ios,
        now,
        listener: &shared.listeners[listener],
        timeouts: &shared.timeouts,
        routes: &shared.routing,
        metrics: &shared.metrics,
        log: &shared.log,
    }
}

/// A place under the caps for `client`, counted by its peer address. Another host's
/// forwarder speaks for many clients, each counted there: it is held to the total
/// cap only.
fn admit(shared: &Shared, client: &OwnedFd, addrs: Option<Addrs>) -> Result<Place, Outcome> {
    let admission = &shared.admission;
    let peer = match (addrs, admission.caps().per_ip) {
        (Some(addrs), _) => Some(addrs.client),
        // Only the per-address cap needs it.
        (None, Some(_)) => rustix::net::getpeername(client)
            .ok()
            .flatten()
            .and_then(|a| std::net::SocketAddr::try_from(a).ok()),
        (None, None) => None,
    };
    admission.admit(peer.filter(|p| !shared.routing.is_peer(p.ip())))
}

/// Whether the VM a connection was routed to (`route`, its namespace then naming
/// `dialed`) went away according to `snapshot` and the namespace files now; `names`
/// caches the files looked at.
fn vm_gone(
    route: &Route,
    dialed: Option<NsIdentity>,
    snapshot: &Snapshot,
    names: &mut Vec<(Arc<str>, Option<NsIdentity>)>,
) -> bool {
    let Some(now) = snapshot.by_id(&route.id) else {
        return true;
    };
    if now.guest_ip != route.guest_ip || now.netns != route.netns {
        return true;
    }
    let Namespace::File(path) = &route.netns else {
        return false;
    };
    let current = match names.iter().find(|(p, _)| p == path) {
        Some((_, identity)) => *identity,
        None => {
            let identity = route.netns.identity();
            names.push((Arc::clone(path), identity));
            identity
        }
    };
    // `dialed` is `None` only before the guest socket was taken (a dial still parked):
    // its namespace is gone when its file is.
    match dialed {
        Some(dialed) => current != Some(dialed),
        None => current.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::OwnedFd;

    use super::*;
    use crate::config::{Config, ListenerKind};
    use crate::engine::{ConnLog, Listener};
    use crate::metrics::Metrics;
    use crate::resolver::{Resolver, Settings};
    use ffi_free_netns::{PoolConfig, SocketPool};
    use mergen_testkit::TempDir;

    #[test]
    fn tokens_round_trip_and_reject_unknown_ops() {
        for op in Op::ALL {
            assert_eq!(from_token(token(12345, op)), Some((12345, op)));
        }
        assert_eq!(from_token(0xf), None);
    }

    /// A worker on a raw listener in front of `backend_port` on 127.0.0.1, routing to a
    /// VM in the host's namespace (no root needed); `vms` says whether there is one.
    struct Harness {
        shared: Arc<Shared>,
        front: std::net::SocketAddr,
        worker: Option<std::thread::JoinHandle<()>>,
        _dir: TempDir,
    }

    impl Harness {
        fn start(backend_port: u16, vms: bool, env: &[(&str, &str)], pool: u16) -> Harness {
            Harness::start_with(backend_port, vms, env, pool, false)
        }

        /// Like `start`, the listener sending PROXY v2 headers when `proxy_v2`.
        fn start_with(
            backend_port: u16,
            vms: bool,
            env: &[(&str, &str)],
            pool: u16,
            proxy_v2: bool,
        ) -> Harness {
            let dir = TempDir::new("dp-worker");
            if vms {
                let vm = dir.join("0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6");
                std::fs::create_dir_all(&vm).expect("vm dir");
                std::fs::write(
                    vm.join("meta.json"),
                    r#"{"id":"0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6","createdAt":"2025-01-01T00:00:00Z","guestIP":"127.0.0.1","netns":""}"#,
                )
                .expect("meta.json");
            }
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let config =
                Config::from_lookup(|k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
                    .expect("config");
            let listener = Listener {
                name: "raw-test".into(),
                index: 0,
                port: 0,
                guest_port: backend_port,
                kind: ListenerKind::Raw,
                proxy_v2,
                tls: None,
                tls_client_order: None,
            };
            let (caps, _) = crate::limits::Caps::fit(
                config.max_connections,
                config.max_connections_per_ip,
                u64::MAX,
            );
            let shared = Arc::new(Shared::new(
                config,
                caps,
                vec![listener],
                Arc::new(Resolver::new(Settings {
                    config_root: dir.path().to_path_buf(),
                    domain_suffix: "localhost".into(),
                    ..Default::default()
                })),
                SocketPool::new(PoolConfig::default()),
                Arc::new(Metrics::new(&["raw-test".to_string()])),
                ConnLog::off(),
            ));
            let front = TcpListener::bind("127.0.0.1:0").expect("front");
            let front_addr = front.local_addr().expect("addr");
            let front: OwnedFd = front.into();
            let worker_shared = shared.clone();
            let worker = std::thread::spawn(move || {
                Worker::new(0, worker_shared, vec![front], pool)
                    .expect("worker")
                    .run()
            });
            Harness {
                shared,
                front: front_addr,
                worker: Some(worker),
                _dir: dir,
            }
        }

        fn closed(&self, outcome: Outcome) -> u64 {
            let series = format!(
                "mergen_forwarder_connections_total{{listener=\"raw-test\",outcome=\"{}\"}} ",
                outcome.as_str()
            );
            self.shared
                .metrics
                .render()
                .lines()
                .find_map(|l| l.strip_prefix(&series)?.parse().ok())
                .unwrap_or(0)
        }

        fn wait_closed(&self, outcome: Outcome, n: u64) {
            let counted = mergen_testkit::poll(Duration::from_secs(5), || {
                (self.closed(outcome) >= n).then_some(())
            });
            assert!(counted.is_some(), "{}", self.shared.metrics.render());
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.shared.begin_shutdown(Duration::from_millis(100));
            if let Some(w) = self.worker.take() {
                w.join().expect("worker thread");
            }
        }
    }

    /// More connections hold received data than the pool has buffers (the backend
    /// does not read yet), so receives fall back to buffers of their own; every byte
    /// still arrives.
    #[test]
    fn an_empty_pool_falls_back_to_private_buffers() {
        let backend = TcpListener::bind("127.0.0.1:0").expect("backend");
        let backend_port = backend.local_addr().expect("addr").port();
        let h = Harness::start(backend_port, true, &[], 2);
        let front_addr = h.front;

        const CONNS: usize = 4;
        const BYTES: usize = 32 << 20;
        let clients: Vec<_> = (0..CONNS)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(front_addr).expect("connect");
                    s.write_all(&vec![i as u8; BYTES]).expect("upload");
                    s.shutdown(Shutdown::Write).expect("half-close");
                    let mut reply = Vec::new();
                    s.read_to_end(&mut reply).expect("reply");
                    reply
                })
            })
            .collect();
        // Accept everything first, and read only once every connection has a backlog
        // queued at the backend: by then the forwarder holds more received buffers
        // than the pool has.
        let accepted: Vec<TcpStream> = (0..CONNS)
            .map(|_| backend.accept().expect("accept").0)
            .collect();
        let backed_up = mergen_testkit::poll(Duration::from_secs(5), || {
            accepted
                .iter()
                .all(|s| rustix::io::ioctl_fionread(s).unwrap_or(0) >= 64 << 10)
                .then_some(())
        });
        assert!(backed_up.is_some(), "the uploads never backed up");
        let readers: Vec<_> = accepted
            .into_iter()
            .map(|mut s| {
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).expect("read upload");
                    s.write_all(b"ok").expect("reply");
                    (got.len(), got.iter().all(|&b| b == got[0]))
                })
            })
            .collect();
        for r in readers {
            assert_eq!(r.join().expect("reader"), (BYTES, true));
        }
        for c in clients {
            assert_eq!(c.join().expect("client").len(), 2);
        }
        h.wait_closed(Outcome::Ok, CONNS as u64);
    }

    /// `refused`: over `FWD_MAX_CONNECTIONS` a connection is closed at once.
    #[test]
    fn over_the_cap_is_refused() {
        let backend = TcpListener::bind("127.0.0.1:0").expect("backend");
        let port = backend.local_addr().expect("addr").port();
        let h = Harness::start(port, true, &[("FWD_MAX_CONNECTIONS", "1")], 4);
        let _first = TcpStream::connect(h.front).expect("first");
        let _held = backend.accept().expect("the first reaches the backend");
        let mut second = TcpStream::connect(h.front).expect("second");
        second
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(second.read(&mut [0u8; 8]).unwrap_or(0), 0);
        h.wait_closed(Outcome::Refused, 1);
    }

    /// `no_route`: a raw listener with no VM at all.
    #[test]
    fn a_raw_listener_without_vms_counts_no_route() {
        let h = Harness::start(9, false, &[], 4);
        let mut c = TcpStream::connect(h.front).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(c.read(&mut [0u8; 8]).unwrap_or(0), 0);
        h.wait_closed(Outcome::NoRoute, 1);
        assert_eq!(h.closed(Outcome::DialFailed), 0);
    }

    /// `dial_failed`: the guest refuses the connection.
    #[test]
    fn a_refused_guest_counts_dial_failed() {
        let closed_port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let h = Harness::start(closed_port, true, &[], 4);
        let mut c = TcpStream::connect(h.front).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(c.read(&mut [0u8; 8]).unwrap_or(0), 0);
        h.wait_closed(Outcome::DialFailed, 1);
    }

    /// `shutdown`: the drain time ran out on an open connection.
    #[test]
    fn the_drain_deadline_counts_shutdown() {
        let backend = TcpListener::bind("127.0.0.1:0").expect("backend");
        let port = backend.local_addr().expect("addr").port();
        let mut h = Harness::start(port, true, &[], 4);
        let mut c = TcpStream::connect(h.front).expect("connect");
        let _held = backend.accept().expect("accept");
        h.shared.begin_shutdown(Duration::from_millis(200));
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(c.read(&mut [0u8; 8]).unwrap_or(0), 0);
        h.worker
            .take()
            .expect("worker")
            .join()
            .expect("worker ends");
        assert_eq!(h.closed(Outcome::Shutdown), 1);
        assert_eq!(h.closed(Outcome::Error), 0);
    }

    /// `+proxy-v2`: the worker reads both addresses at accept and the guest gets them
    /// in a PROXY v2 header before the client's first byte.
    #[test]
    fn the_guest_learns_the_clients_address() {
        let backend = TcpListener::bind("127.0.0.1:0").expect("backend");
        let port = backend.local_addr().expect("addr").port();
        let h = Harness::start_with(port, true, &[], 4, true);
        let mut c = TcpStream::connect(h.front).expect("connect");
        c.write_all(b"hello").expect("write");
        let (mut guest, _) = backend.accept().expect("accept");
        guest
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut want = Vec::new();
        crate::proxy_protocol::write_header(
            c.local_addr().expect("client addr"),
            h.front,
            None,
            &mut want,
        );
        want.extend_from_slice(b"hello");
        let mut got = vec![0u8; want.len()];
        guest.read_exact(&mut got).expect("header and bytes");
        assert_eq!(got, want);
    }
}
