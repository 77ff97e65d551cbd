//! The connection core against a stand-in for the kernel: buffers are `Vec`s, the
//! operations a connection asks for wait in a list until a test completes them, and
//! TLS clients are rustls in memory. No sockets, no root.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConfig};

use super::*;
use crate::config::ListenerKind;
use crate::engine::buffers::Window;
use crate::engine::connlog::Entry;
use crate::engine::Listener;
use crate::metrics::{HandshakeFailure, Metrics, Outcome};
use crate::resolver::{Namespace, Route};
use crate::sni;

// Connections passed through to another host of a cluster.
mod passthrough;

// ---- the stand-in kernel ----------------------------------------------------------

struct FakeBuf {
    mem: Vec<u8>,
    window: Window,
    busy: bool,
    release_when_idle: bool,
}

/// Buffers with the ring's rules: a busy buffer cannot be read or filled, and
/// releasing it waits for its operation.
#[derive(Default)]
struct FakeBufs {
    bufs: Vec<Option<FakeBuf>>,
}

impl FakeBufs {
    fn get(&self, id: BufId) -> &FakeBuf {
        self.bufs[id.0 as usize].as_ref().expect("a live buffer")
    }

    fn get_mut(&mut self, id: BufId) -> &mut FakeBuf {
        self.bufs[id.0 as usize].as_mut().expect("a live buffer")
    }

    fn held(&self) -> usize {
        self.bufs.iter().flatten().count()
    }

    /// The kernel is done with `id`.
    fn kernel_done(&mut self, id: BufId) {
        let b = self.get_mut(id);
        b.busy = false;
        if b.release_when_idle {
            self.bufs[id.0 as usize] = None;
        }
    }
}

impl Buffers for FakeBufs {
    fn alloc(&mut self, len: usize) -> BufId {
        self.bufs.push(Some(FakeBuf {
            mem: vec![0; len],
            window: Window::new(len, 0),
            busy: false,
            release_when_idle: false,
        }));
        BufId((self.bufs.len() - 1) as u32)
    }

    fn release(&mut self, id: BufId) {
        let b = self.get_mut(id);
        if b.busy {
            b.release_when_idle = true;
        } else {
            self.bufs[id.0 as usize] = None;
        }
    }

    fn idle(&self, id: BufId) -> Option<(&[u8], &Window)> {
        let b = self.get(id);
        (!b.busy).then_some((&b.mem[..], &b.window))
    }

    fn idle_mut(&mut self, id: BufId) -> Option<(&mut [u8], &mut Window)> {
        let b = self.get_mut(id);
        (!b.busy).then_some((&mut b.mem[..], &mut b.window))
    }

    fn is_empty(&self, id: BufId) -> bool {
        self.get(id).window.is_empty()
    }

    fn capacity(&self, id: BufId) -> usize {
        self.get(id).window.capacity()
    }
}

struct FakeRoutes(HashMap<String, Arc<Route>>);

impl Routes for FakeRoutes {
    fn by_sni(&self, name: &str) -> Option<Arc<Route>> {
        self.0.get(&name.to_ascii_lowercase()).cloned()
    }

    fn oldest(&self) -> Option<Arc<Route>> {
        self.0.get("app.localhost").cloned()
    }

    /// Other hosts' VMs are kept under `remote:<name>`, which no SNI can be.
    fn remote(&self, name: &str) -> Option<Arc<Route>> {
        let key = format!("remote:{}", name.to_ascii_lowercase());
        self.0.get(&key).cloned()
    }

    /// Other hosts' addresses, under `peer:<ip>`.
    fn peer(&self, ip: std::net::IpAddr) -> bool {
        self.0.contains_key(&format!("peer:{ip}"))
    }
}

fn route() -> Arc<Route> {
    Arc::new(Route {
        id: "0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6".into(),
        guest_ip: std::net::Ipv4Addr::new(172, 30, 0, 2),
        netns: Namespace::Host,
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        http_port: None,
    })
}

/// A server configuration on a fresh self-signed certificate for `*.localhost`.
fn server_config() -> Arc<ServerConfig> {
    static CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let dir = mergen_testkit::TempDir::new("dp-core");
            let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
            crate::tls::generate_self_signed("", "localhost", &cert, &key).expect("certificate");
            let store = crate::tls::CertStore::load(&cert, &key).expect("store");
            crate::tls::server_config(&store, &[b"http/1.1".to_vec()]).expect("config")
        })
        .clone()
}

fn tls_client(name: &str) -> ClientConnection {
    let config = Arc::new(mergen_testkit::tls::accept_any_client_config());
    let name = ServerName::try_from(name.to_string()).expect("a name");
    ClientConnection::new(config, name).expect("a client")
}

/// A connection, the stand-in kernel around it, and what reached each end.
struct T {
    conn: Option<Conn>,
    bufs: FakeBufs,
    /// Operations asked for and not completed yet.
    pending: Vec<Io>,
    /// Dials asked for.
    dials: Vec<Io>,
    /// A connect is in flight.
    connecting: bool,
    /// The addresses the worker read at accept.
    addrs: Option<Addrs>,
    /// The guest port dials must ask for.
    want_port: u16,
    listener: Listener,
    timeouts: Timeouts,
    routes: FakeRoutes,
    metrics: Metrics,
    log: ConnLog,
    log_rx: std::sync::mpsc::Receiver<(log::Level, Entry)>,
    now: Instant,
    /// Bytes the client received, and whether it got a FIN.
    client_got: Vec<u8>,
    client_fin: bool,
    guest_got: Vec<u8>,
    guest_fin: bool,
}

impl T {
    fn new(kind: ListenerKind) -> T {
        let (log, log_rx) = ConnLog::channel(64, log::LevelFilter::Debug);
        let mut routes = HashMap::new();
        routes.insert("app.localhost".to_string(), route());
        T {
            conn: None,
            bufs: FakeBufs::default(),
            pending: Vec::new(),
            dials: Vec::new(),
            connecting: false,
            addrs: None,
            want_port: 8080,
            listener: Listener {
                name: ":443".into(),
                index: 0,
                port: 443,
                guest_port: 8080,
                kind,
                proxy_v2: false,
                tls: kind.is_tls().then(server_config),
                tls_client_order: kind
                    .is_tls()
                    .then(|| crate::tls::client_order(&server_config())),
            },
            timeouts: Timeouts {
                dial: Duration::from_secs(5),
                handshake: Duration::from_secs(10),
                idle: Some(Duration::from_secs(300)),
            },
            routes: FakeRoutes(routes),
            metrics: Metrics::new(&[":443".into()]),
            log,
            log_rx,
            now: Instant::now(),
            client_got: Vec::new(),
            client_fin: false,
            guest_got: Vec::new(),
            guest_fin: false,
        }
    }

    fn without_vms(mut self) -> T {
        self.routes.0.clear();
        self
    }

    /// The listener sends PROXY v2 headers; the client came from `client`.
    fn with_proxy_v2(mut self, client: &str, local: &str) -> T {
        self.listener.proxy_v2 = true;
        self.addrs = Some(Addrs {
            client: client.parse().expect("an address"),
            local: local.parse().expect("an address"),
        });
        self
    }

    /// The VM sets `httpPort`.
    fn with_http_port(mut self, port: u16) -> T {
        for route in self.routes.0.values_mut() {
            Arc::make_mut(route).http_port = Some(port);
        }
        self
    }

    /// Dials must go to this guest port.
    fn dials_to(mut self, port: u16) -> T {
        self.want_port = port;
        self
    }

    /// Accept the connection.
    fn accept(mut self) -> T {
        let id = ConnId { worker: 0, seq: 1 };
        let addrs = self.addrs;
        self.run(|conn, cx| *conn = Some(Conn::accept(id, addrs, cx)));
        self
    }

    /// Run `f` with the connection and what it works with, then hand what it asked
    /// for to the stand-in kernel.
    fn run(&mut self, f: impl FnOnce(&mut Option<Conn>, &mut Cx<'_, FakeBufs>)) {
        let mut io = Vec::new();
        let mut cx = Cx {
            bufs: &mut self.bufs,
            io: &mut io,
            now: self.now,
            listener: &self.listener,
            timeouts: &self.timeouts,
            routes: &self.routes,
            metrics: &self.metrics,
            log: &self.log,
        };
        f(&mut self.conn, &mut cx);
        self.take(io);
    }

    fn conn(&self) -> &Conn {
        self.conn.as_ref().expect("accepted")
    }

    fn event(&mut self, event: Event) {
        self.run(|conn, cx| conn.as_mut().expect("accepted").handle(event, cx));
    }

    /// What the connection asked for goes to the kernel (buffers it names turn busy).
    fn take(&mut self, io: Vec<Io>) {
        for io in io {
            let busy = match &io {
                Io::Send { buf, .. } => Some(*buf),
                Io::Recv { into, .. } => *into,
                _ => None,
            };
            if let Some(b) = busy {
                assert!(!self.bufs.get(b).busy, "{io:?} on a busy buffer");
                self.bufs.get_mut(b).busy = true;
            }
            if let Some(op) = io.op() {
                assert!(
                    !self.pending.iter().any(|p| p.op() == Some(op)),
                    "{op:?} submitted twice"
                );
            }
            match io {
                Io::Dial { .. } => self.dials.push(io),
                io => self.pending.push(io),
            }
        }
    }

    fn pending(&self, op: Op) -> bool {
        self.pending.iter().any(|p| p.op() == Some(op))
    }

    fn take_pending(&mut self, op: Op) -> Io {
        let i = self
            .pending
            .iter()
            .position(|p| p.op() == Some(op))
            .unwrap_or_else(|| panic!("no {op:?} pending: {:?}", self.pending));
        self.pending.remove(i)
    }

    /// `side` sends `bytes`, received by the pending receive.
    fn arrive(&mut self, side: Side, bytes: &[u8]) {
        let op = Op::recv(side);
        let Io::Recv { into, max, .. } = self.take_pending(op) else {
            unreachable!()
        };
        assert!(
            bytes.len() <= max,
            "{} bytes arrive for a receive of at most {max}",
            bytes.len()
        );
        let (n, buf) = match into {
            // A pool receive: the kernel picks a buffer.
            None => {
                let b = self.bufs.alloc(BUF_LEN);
                let n = self.bufs.fill(b, |tail| {
                    let n = bytes.len().min(tail.len());
                    tail[..n].copy_from_slice(&bytes[..n]);
                    Ok::<_, ()>(n)
                });
                (n.expect("fill"), Some(b))
            }
            Some(b) => {
                self.bufs.kernel_done(b);
                let n = self.bufs.fill(b, |tail| {
                    let n = bytes.len().min(tail.len());
                    tail[..n].copy_from_slice(&bytes[..n]);
                    Ok::<_, ()>(n)
                });
                (n.expect("fill"), None)
            }
        };
        assert_eq!(n, bytes.len(), "a test sends at most one buffer at a time");
        self.event(Event::Done {
            op,
            result: n as i32,
            buf,
        });
    }

    /// The pending receive on `side` ends with `result` (0: EOF, or an errno).
    fn end_recv(&mut self, side: Side, result: i32) {
        let op = Op::recv(side);
        if let Io::Recv { into: Some(b), .. } = self.take_pending(op) {
            self.bufs.kernel_done(b);
        }
        self.event(Event::Done {
            op,
            result,
            buf: None,
        });
    }

    /// Complete the pending send to `side`, up to `max` bytes of it.
    fn deliver(&mut self, side: Side, max: usize) -> usize {
        let op = Op::send(side);
        let Io::Send { buf, .. } = self.take_pending(op) else {
            unreachable!()
        };
        self.bufs.kernel_done(buf);
        let data = self.bufs.data(buf);
        let n = data.len().min(max);
        let got = match side {
            Side::Client => &mut self.client_got,
            Side::Guest => &mut self.guest_got,
        };
        got.extend_from_slice(&data[..n]);
        self.bufs.consume(buf, n);
        // The ring keeps a buffer busy from submission to completion; so does this.
        self.event(Event::Done {
            op,
            result: n as i32,
            buf: None,
        });
        n
    }

    fn fail_send(&mut self, side: Side, errno: i32) {
        let op = Op::send(side);
        let Io::Send { buf, .. } = self.take_pending(op) else {
            unreachable!()
        };
        self.bufs.kernel_done(buf);
        self.event(Event::Done {
            op,
            result: -errno,
            buf: None,
        });
    }

    /// Complete every pending FIN.
    fn shutdowns(&mut self) {
        for side in [Side::Client, Side::Guest] {
            let op = Op::shutdown(side);
            if self.pending(op) {
                self.take_pending(op);
                match side {
                    Side::Client => self.client_fin = true,
                    Side::Guest => self.guest_fin = true,
                }
                self.event(Event::Done {
                    op,
                    result: 0,
                    buf: None,
                });
            }
        }
    }

    /// Cancels take effect: what they cancel completes with ECANCELED, then they do.
    fn cancels(&mut self) {
        for side in [Side::Client, Side::Guest] {
            if !self.pending(Op::cancel(side)) {
                continue;
            }
            if side == Side::Guest && std::mem::take(&mut self.connecting) {
                self.event(Event::Done {
                    op: Op::Connect,
                    result: -libc::ECANCELED,
                    buf: None,
                });
            }
            let victims: Vec<Op> = [Op::recv(side), Op::send(side)]
                .into_iter()
                .filter(|&op| self.pending(op))
                .collect();
            for op in victims {
                match self.take_pending(op) {
                    Io::Recv { into: Some(b), .. } | Io::Send { buf: b, .. } => {
                        self.bufs.kernel_done(b)
                    }
                    _ => {}
                }
                self.event(Event::Done {
                    op,
                    result: -libc::ECANCELED,
                    buf: None,
                });
            }
            self.take_pending(Op::cancel(side));
            self.event(Event::Done {
                op: Op::cancel(side),
                result: 0,
                buf: None,
            });
        }
    }

    /// The dial asked for gets its socket; its connect is in flight.
    fn dialing(&mut self) {
        let dial = self.dials.pop().expect("a dial was asked for");
        let want = self.want_port;
        assert!(
            matches!(dial, Io::Dial { port, .. } if port == want),
            "{dial:?}"
        );
        self.connecting = true;
        self.event(Event::Dialing);
    }

    /// The dial asked for gets its socket and connects with `result`.
    fn connect(&mut self, result: i32) {
        self.dialing();
        self.connecting = false;
        self.event(Event::Done {
            op: Op::Connect,
            result,
            buf: None,
        });
    }

    fn tick_after(&mut self, d: Duration) {
        self.now += d;
        self.event(Event::Tick);
    }

    fn finished(&self) -> Option<Outcome> {
        self.conn().finished()
    }

    fn failures(&self, why: HandshakeFailure) -> u64 {
        let series = format!(
            "mergen_forwarder_handshake_failures_total{{reason=\"{}\"}} ",
            why.as_str()
        );
        self.metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }

    fn logged(&self) -> Vec<String> {
        self.log_rx
            .try_iter()
            .map(|(_, e)| format!("{} {}", e.conn, e.record.message(":443")))
            .collect()
    }

    /// Cancels and FINs done, the connection must be over with `outcome`; then it is
    /// freed as the worker does, and every buffer must come back.
    fn ends_as(mut self, outcome: Outcome) {
        self.cancels();
        self.shutdowns();
        assert_eq!(self.finished(), Some(outcome));
        self.free();
    }

    /// Lingering: our last word reaches the client, which then closes; the connection
    /// ends as `outcome`.
    fn client_leaves(mut self, outcome: Outcome) {
        self.cancels();
        while self.pending(Op::ClientSend) {
            self.deliver(Side::Client, usize::MAX);
        }
        self.shutdowns();
        assert!(self.client_fin, "no FIN after the last word");
        assert_eq!(
            self.finished(),
            None,
            "closed without reading the client out"
        );
        self.end_recv(Side::Client, 0);
        self.ends_as(outcome);
    }

    /// A refusal's alert reaches the client, which said nothing after its hello (the
    /// receive that does not wait finds nothing): the connection closes at once, with
    /// no shutdown of its own (the close's FIN follows the alert) and nothing left in
    /// flight.
    fn refusal_closes(mut self, outcome: Outcome) {
        while self.pending(Op::ClientSend) {
            self.deliver(Side::Client, usize::MAX);
        }
        let asks = self.pending.iter().any(|p| {
            matches!(
                p,
                Io::Recv {
                    side: Side::Client,
                    wait: false,
                    ..
                }
            )
        });
        assert!(asks, "no receive that does not wait: {:?}", self.pending);
        assert!(!self.pending(Op::ClientShutdown), "a FIN before the answer");
        self.end_recv(Side::Client, -libc::EAGAIN);
        assert!(
            self.pending.is_empty(),
            "left in flight: {:?}",
            self.pending
        );
        assert!(!self.client_fin);
        assert_eq!(self.finished(), Some(outcome));
        self.free();
    }

    /// A TLS listener of `kind` with a client for `name` that said its first flight.
    fn tls(kind: ListenerKind, name: &str) -> (T, ClientConnection) {
        let mut t = T::new(kind).accept();
        let mut client = tls_client(name);
        t.converse(&mut client);
        (t, client)
    }

    /// Free the connection as the worker does; every buffer must come back.
    fn free(mut self) {
        let conn = self.conn.take().expect("accepted");
        assert!(conn.finished().is_some(), "freed before it finished");
        assert!(
            self.pending.is_empty() && !self.connecting,
            "freed with {:?} in flight",
            self.pending
        );
        for b in conn.buffers() {
            self.bufs.release(b);
        }
        assert_eq!(self.bufs.held(), 0, "buffers leaked");
    }

    // ---- TLS clients ---------------------------------------------------------------

    /// Move bytes between `client` and the connection until neither moves: the client
    /// writes whenever a client receive is pending, reads whatever was sent to it.
    fn converse(&mut self, client: &mut ClientConnection) {
        for _ in 0..64 {
            let mut moved = false;
            if client.wants_write() && self.pending(Op::ClientRecv) {
                let mut out = Vec::new();
                client.write_tls(&mut out).expect("client write");
                for chunk in out.chunks(BUF_LEN) {
                    if !self.pending(Op::ClientRecv) {
                        break;
                    }
                    self.arrive(Side::Client, chunk);
                }
                moved = true;
            }
            while self.pending(Op::ClientSend) {
                self.deliver(Side::Client, usize::MAX);
                moved = true;
            }
            if !self.client_got.is_empty() {
                let got = std::mem::take(&mut self.client_got);
                let mut rd = &got[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).expect("client read");
                    if client.process_new_packets().is_err() {
                        return;
                    }
                }
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("the conversation did not settle");
    }

    /// Accept and run a handshake for `name` with the guest connected.
    fn tls_established(name: &str) -> (T, ClientConnection) {
        T::new(ListenerKind::Https).establish(name)
    }

    /// Accept, and run a handshake for `name` with the guest connected.
    fn establish(self, name: &str) -> (T, ClientConnection) {
        let mut t = self.accept();
        let mut client = tls_client(name);
        t.converse(&mut client);
        t.connect(0);
        t.converse(&mut client);
        assert!(!client.is_handshaking(), "handshake incomplete");
        (t, client)
    }
}

/// The client got close_notify, and nothing it could not decrypt.
fn closed_cleanly(client: &mut ClientConnection) -> bool {
    client
        .process_new_packets()
        .expect("a clean close")
        .peer_has_closed()
}

/// The guest side of a TLS connection: everything the guest received so far.
fn plaintext_of(client: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = client.reader().read_to_end(&mut out);
    out
}

// ---- raw listeners -----------------------------------------------------------------

#[test]
fn raw_streams_both_ways_and_half_closes_client_first() {
    let mut t = T::new(ListenerKind::Raw).accept();
    // Nothing is read before the guest is connected.
    assert!(!t.pending(Op::ClientRecv));
    t.connect(0);
    t.arrive(Side::Client, b"hello");
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, b"hello");
    // The client is done sending: the guest gets a FIN, the other way stays open.
    t.end_recv(Side::Client, 0);
    t.shutdowns();
    assert!(t.guest_fin && !t.client_fin);
    t.arrive(Side::Guest, b"reply");
    t.deliver(Side::Client, usize::MAX);
    assert_eq!(t.client_got, b"reply");
    assert!(t.finished().is_none());
    t.end_recv(Side::Guest, 0);
    t.shutdowns();
    assert!(t.client_fin);
    t.ends_as(Outcome::Ok);
}

#[test]
fn raw_half_closes_guest_first() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    t.arrive(Side::Guest, b"SSH-2.0-test\r\n");
    t.deliver(Side::Client, usize::MAX);
    t.end_recv(Side::Guest, 0);
    t.shutdowns();
    assert!(t.client_fin && !t.guest_fin);
    // The client may still talk.
    t.arrive(Side::Client, b"bye");
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, b"bye");
    t.end_recv(Side::Client, 0);
    t.ends_as(Outcome::Ok);
}

/// A client that never reads: what the guest sends waits in one buffer and the guest
/// is not read again until it is passed on. Memory stays bounded.
#[test]
fn backpressure_from_a_client_that_never_reads() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    t.arrive(Side::Guest, &[7u8; 4096]);
    // The send to the client is in flight, and the kernel takes only a little of it.
    assert!(t.pending(Op::ClientSend));
    assert!(
        !t.pending(Op::GuestRecv),
        "read more while the client is stuck"
    );
    for _ in 0..100 {
        assert_eq!(t.deliver(Side::Client, 0), 0);
        assert!(!t.pending(Op::GuestRecv));
        assert!(t.bufs.held() <= 2, "{} buffers held", t.bufs.held());
    }
    // The client reads: the rest goes, and only then is the guest read again.
    t.deliver(Side::Client, usize::MAX);
    assert!(t.pending(Op::GuestRecv));
    assert_eq!(t.client_got.len(), 4096);
}

#[test]
fn raw_without_vms_is_no_route_not_a_dial_failure() {
    let t = T::new(ListenerKind::Raw).without_vms().accept();
    assert!(t.dials.is_empty());
    assert_eq!(
        t.logged(),
        ["0-1 raw connection on :443 refused: no VM to route to"]
    );
    t.ends_as(Outcome::NoRoute);
}

#[test]
fn raw_dial_failures() {
    // Refused.
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(-libc::ECONNREFUSED);
    let lines = t.logged();
    assert!(lines[0].starts_with("0-1 dial to VM"), "{lines:?}");
    assert!(lines[0].contains("Connection refused"), "{lines:?}");
    t.ends_as(Outcome::DialFailed);
    // No socket from the namespace in time.
    let mut t = T::new(ListenerKind::Raw).accept();
    t.dials.clear();
    t.event(Event::DialFailed(DialError::PoolTimeout));
    t.ends_as(Outcome::DialFailed);
}

#[test]
fn socket_errors_name_their_side() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    t.end_recv(Side::Client, -libc::ECONNRESET);
    assert_eq!(t.finished(), None, "the guest receive is still in flight");
    t.ends_as(Outcome::ClientError);

    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    t.arrive(Side::Client, b"x");
    t.fail_send(Side::Guest, libc::EPIPE);
    t.ends_as(Outcome::BackendError);
}

/// Closing while a receive on each side is in flight: both are cancelled, and the
/// connection is finished only once every completion is in.
#[test]
fn close_while_operations_are_in_flight() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    assert!(t.pending(Op::ClientRecv) && t.pending(Op::GuestRecv));
    t.event(Event::Abort);
    assert!(t.pending(Op::ClientCancel) && t.pending(Op::GuestCancel));
    assert_eq!(t.finished(), None);
    // A late completion before the cancels: still not finished.
    t.arrive(Side::Client, b"late");
    assert_eq!(t.finished(), None);
    t.ends_as(Outcome::Shutdown);
}

/// A dial that completes after the connection closed is cancelled, not leaked.
#[test]
fn a_dial_that_lands_after_the_close_is_cancelled() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.event(Event::Abort);
    assert_eq!(t.finished(), Some(Outcome::Shutdown));
    t.dialing();
    assert_eq!(t.finished(), None, "the connect is in flight");
    assert!(t.pending(Op::GuestCancel));
    t.ends_as(Outcome::Shutdown);
}

#[test]
fn idle_timeout() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    t.tick_after(Duration::from_secs(299));
    assert_eq!(t.finished(), None);
    t.arrive(Side::Client, b"x"); // activity resets the clock
    t.deliver(Side::Guest, usize::MAX);
    t.tick_after(Duration::from_secs(299));
    assert_eq!(t.finished(), None);
    t.tick_after(Duration::from_secs(2));
    t.ends_as(Outcome::Timeout);
}

#[test]
fn an_empty_pool_falls_back_to_a_buffer_of_its_own() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    t.end_recv(Side::Client, -libc::ENOBUFS);
    let own = t
        .pending
        .iter()
        .find_map(|p| match p {
            Io::Recv {
                side: Side::Client,
                into: Some(b),
                ..
            } => Some(*b),
            _ => None,
        })
        .expect("a receive into a buffer of its own");
    assert!(t.bufs.get(own).busy);
    t.arrive(Side::Client, b"data");
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, b"data");
}

// ---- peek, resolve, refuse ---------------------------------------------------------

fn hello(name: &str) -> Vec<u8> {
    let mut client = tls_client(name);
    let mut out = Vec::new();
    client.write_tls(&mut out).expect("hello");
    out
}

#[test]
fn a_connection_that_sends_nothing_holds_no_buffer() {
    let t = T::new(ListenerKind::Https).accept();
    assert!(t.pending(Op::ClientRecv));
    assert!(matches!(
        t.pending[0],
        Io::Recv {
            side: Side::Client,
            into: None,
            ..
        }
    ));
    assert_eq!(t.bufs.held(), 0);
    assert!(t.dials.is_empty(), "no dial before the ClientHello");
}

#[test]
fn a_known_name_is_routed_and_dialed() {
    let mut t = T::new(ListenerKind::Https).accept();
    t.arrive(Side::Client, &hello("app.localhost"));
    assert_eq!(t.dials.len(), 1);
    assert!(matches!(t.conn().stage, Stage::Proxy(_)));
    let lines = t.logged();
    assert_eq!(
        lines,
        ["0-1 app.localhost on :443 -> VM 0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6 at 172.30.0.2:8080"]
    );
}

/// A ClientHello that trickles in a byte at a time is kept in a buffer sized to what
/// came, and each pool buffer goes straight back.
#[test]
fn a_hello_in_pieces_is_joined_without_holding_pool_buffers() {
    let mut t = T::new(ListenerKind::Https).accept();
    let mut client = tls_client("app.localhost");
    let mut bytes = Vec::new();
    client.write_tls(&mut bytes).expect("hello");
    for b in &bytes[..bytes.len() - 1] {
        t.arrive(Side::Client, std::slice::from_ref(b));
        assert_eq!(t.bufs.held(), 0, "a pool buffer kept");
        assert!(t.dials.is_empty());
    }
    t.arrive(Side::Client, &bytes[bytes.len() - 1..]);
    assert_eq!(t.dials.len(), 1);
    // rustls got the joined hello: the handshake completes.
    t.converse(&mut client);
    t.connect(0);
    t.converse(&mut client);
    assert!(!client.is_handshaking());
    client.writer().write_all(b"after").expect("write");
    t.converse(&mut client);
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, b"after");
}

/// What a refused client does after its hello: nothing (every ordinary client, which
/// waits for the answer), nothing and we learn it before the alert is out, or more.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AfterHello {
    Quiet,
    QuietFirst,
    SaysMore,
}

#[test]
fn unknown_and_missing_names_get_an_alert_then_a_close_or_a_linger() {
    let cases = [
        (
            "nope.localhost",
            HandshakeFailure::UnknownSni,
            Outcome::UnknownSni,
        ),
        ("127.0.0.1", HandshakeFailure::NoSni, Outcome::NoSni),
    ];
    let after = [
        AfterHello::Quiet,
        AfterHello::QuietFirst,
        AfterHello::SaysMore,
    ];
    for ((name, why, outcome), after) in cases.into_iter().flat_map(|c| after.map(|a| (c, a))) {
        let mut t = T::new(ListenerKind::Https).accept();
        t.arrive(Side::Client, &hello(name));
        assert!(t.dials.is_empty(), "{name}: dialed");
        // The alert is the last word: the kernel may keep it for the FIN that follows
        // at once, so both leave in one segment.
        assert!(t.pending.iter().any(|p| matches!(
            p,
            Io::Send {
                side: Side::Client,
                fin_follows: true,
                ..
            }
        )));
        if after == AfterHello::QuietFirst {
            // Known quiet while the alert is still in flight: the close waits for it.
            t.end_recv(Side::Client, -libc::EAGAIN);
            assert_eq!(
                t.finished(),
                None,
                "{name}: closed before the alert was out"
            );
            assert!(!t.pending(Op::ClientRecv) && !t.pending(Op::ClientShutdown));
            t.deliver(Side::Client, usize::MAX);
            assert!(t.pending.is_empty(), "{name}: {:?}", t.pending);
            assert_eq!(t.finished(), Some(outcome));
            t.free();
            continue;
        }
        t.deliver(Side::Client, usize::MAX);
        assert_eq!(
            t.client_got,
            sni::alert_record(sni::ALERT_UNRECOGNIZED_NAME)
        );
        assert_eq!(t.failures(why), 1);
        match after {
            AfterHello::SaysMore => {
                // It sent more after its hello: the FIN right away, then a linger
                // that reads and drops what the client still says, until it closes.
                t.arrive(Side::Client, b"more");
                assert!(t.pending(Op::ClientShutdown), "{name}: no FIN");
                t.client_leaves(outcome);
            }
            _ => t.refusal_closes(outcome),
        }
    }
}

#[test]
fn not_tls_is_a_bad_request() {
    let mut t = T::new(ListenerKind::Https).accept();
    t.arrive(Side::Client, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(t.failures(HandshakeFailure::NotTls), 1);
    t.ends_as(Outcome::BadRequest);
}

#[test]
fn malformed_and_oversized_hellos_get_decode_error() {
    let mut malformed = hello("app.localhost");
    malformed[5] = 2; // a ServerHello
    let oversized = [0x16, 3, 1, 0x40, 0, 1, 0, 0x40, 0];
    for (bytes, why) in [
        (&malformed[..], HandshakeFailure::Malformed),
        (&oversized[..], HandshakeFailure::TooLarge),
    ] {
        let mut t = T::new(ListenerKind::Https).accept();
        t.arrive(Side::Client, bytes);
        t.deliver(Side::Client, usize::MAX);
        assert_eq!(t.client_got, sni::alert_record(sni::ALERT_DECODE_ERROR));
        assert_eq!(t.failures(why), 1);
        // The rest of a hello may still be on its way: read until the client closes.
        t.client_leaves(Outcome::HandshakeFailed);
    }
}

#[test]
fn postgres_ssl_request_is_answered_then_the_hello_routed() {
    let mut t = T::new(ListenerKind::Postgres).accept();
    t.arrive(Side::Client, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    assert!(
        t.pending.iter().any(|p| matches!(
            p,
            Io::Send {
                fin_follows: false,
                ..
            }
        )),
        "the answer is not a last word"
    );
    t.deliver(Side::Client, usize::MAX);
    assert_eq!(t.client_got, b"S");
    t.arrive(Side::Client, &hello("app.localhost"));
    assert_eq!(t.dials.len(), 1);
    assert!(matches!(t.conn().stage, Stage::Proxy(_)));
}

#[test]
fn postgres_gssenc_then_ssl_then_hello() {
    let mut t = T::new(ListenerKind::Postgres).accept();
    t.arrive(Side::Client, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]);
    t.deliver(Side::Client, usize::MAX);
    t.arrive(Side::Client, &[0, 0, 0, 8, 0x04]); // split in two
    t.arrive(Side::Client, &[0xd2, 0x16, 0x2f]);
    t.deliver(Side::Client, usize::MAX);
    assert_eq!(t.client_got, b"NS");
    t.arrive(Side::Client, &hello("app.localhost"));
    assert_eq!(t.dials.len(), 1);
}

#[test]
fn a_silent_client_times_out_in_the_handshake() {
    let mut t = T::new(ListenerKind::Https).accept();
    t.tick_after(Duration::from_secs(9));
    assert_eq!(t.finished(), None);
    t.tick_after(Duration::from_secs(1));
    assert_eq!(t.failures(HandshakeFailure::Timeout), 1);
    t.ends_as(Outcome::Timeout);
}

#[test]
fn a_client_that_leaves_before_its_handshake_is_a_failed_handshake() {
    let mut t = T::new(ListenerKind::Https).accept();
    t.end_recv(Side::Client, 0);
    assert_eq!(t.failures(HandshakeFailure::ClientClosed), 1);
    t.ends_as(Outcome::HandshakeFailed);
}

// ---- TLS ---------------------------------------------------------------------------

#[test]
fn tls_streams_both_ways_and_half_closes_with_close_notify() {
    let (mut t, mut client) = T::tls_established("app.localhost");
    client.writer().write_all(b"ping").expect("write");
    t.converse(&mut client);
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, b"ping");
    // The client closes its side cleanly: the guest gets a FIN, replies still flow.
    client.send_close_notify();
    t.converse(&mut client);
    t.shutdowns();
    assert!(t.guest_fin && !t.client_fin);
    t.arrive(Side::Guest, b"pong");
    t.converse(&mut client);
    assert_eq!(plaintext_of(&mut client), b"pong");
    // The guest closes: close_notify, then a FIN to the client, which may ride with
    // it (the send says a FIN follows).
    t.end_recv(Side::Guest, 0);
    assert!(t.pending.iter().any(|p| matches!(
        p,
        Io::Send {
            side: Side::Client,
            fin_follows: true,
            ..
        }
    )));
    t.converse(&mut client);
    t.shutdowns();
    assert!(t.client_fin);
    t.ends_as(Outcome::Ok);
}

#[test]
fn tls_half_close_guest_first_then_a_bare_fin() {
    let (mut t, mut client) = T::tls_established("app.localhost");
    t.arrive(Side::Guest, b"banner");
    t.end_recv(Side::Guest, 0);
    t.converse(&mut client);
    t.shutdowns();
    assert!(t.client_fin && !t.guest_fin);
    assert_eq!(plaintext_of(&mut client), b"banner");
    // The client still sends, then closes without close_notify.
    client.writer().write_all(b"last words").expect("write");
    t.converse(&mut client);
    t.end_recv(Side::Client, 0);
    t.deliver(Side::Guest, usize::MAX);
    t.shutdowns();
    assert_eq!(t.guest_got, b"last words");
    assert!(t.guest_fin);
    t.ends_as(Outcome::Ok);
}

/// The dial fails after the handshake: an HTTPS client gets a 502 page.
#[test]
fn dial_failure_after_the_handshake_gives_https_a_502() {
    let (mut t, mut client) = T::tls(ListenerKind::Https, "app.localhost");
    assert!(!client.is_handshaking());
    t.connect(-libc::ECONNREFUSED);
    t.converse(&mut client);
    let page = String::from_utf8(plaintext_of(&mut client)).expect("text");
    assert!(page.starts_with("HTTP/1.1 502 Bad Gateway"), "{page}");
    t.client_leaves(Outcome::DialFailed);
}

/// The dial fails while the client is still handshaking: it finishes, then learns.
#[test]
fn dial_failure_before_the_handshake_waits_for_it() {
    let mut t = T::new(ListenerKind::Https).accept();
    let mut client = tls_client("app.localhost");
    t.arrive(Side::Client, &{
        let mut out = Vec::new();
        client.write_tls(&mut out).expect("hello");
        out
    });
    t.connect(-libc::ETIMEDOUT);
    assert!(
        matches!(t.conn().stage, Stage::Proxy(_)),
        "not before the handshake"
    );
    t.converse(&mut client);
    assert!(!client.is_handshaking());
    let page = String::from_utf8(plaintext_of(&mut client)).expect("text");
    assert!(page.contains("502"), "{page}");
}

/// Not HTTPS: a failed dial closes with close_notify, no 502 page.
#[test]
fn dial_failure_on_a_generic_tls_listener_has_no_502() {
    let (mut t, mut client) = T::tls(ListenerKind::Tls, "app.localhost");
    t.connect(-libc::ECONNREFUSED);
    t.converse(&mut client);
    assert!(plaintext_of(&mut client).is_empty());
    assert!(closed_cleanly(&mut client));
    t.client_leaves(Outcome::DialFailed);
}

#[test]
fn garbage_during_the_handshake_is_a_failed_handshake() {
    let mut t = T::new(ListenerKind::Https).accept();
    let mut bytes = hello("app.localhost");
    bytes.extend_from_slice(&[0x17, 3, 3, 0, 4, 1, 2, 3, 4]);
    t.arrive(Side::Client, &bytes);
    assert!(matches!(t.conn().stage, Stage::Linger(_)));
    assert_eq!(t.failures(HandshakeFailure::Tls), 1);
    t.client_leaves(Outcome::HandshakeFailed);
}

#[test]
fn garbage_after_the_handshake_is_a_tls_error() {
    let (mut t, _client) = T::tls_established("app.localhost");
    t.arrive(Side::Client, &[0x17, 3, 3, 0, 4, 1, 2, 3, 4]);
    assert!(matches!(t.conn().stage, Stage::Linger(_)));
    assert_eq!(t.failures(HandshakeFailure::Tls), 0);
    t.client_leaves(Outcome::TlsError);
}

/// A handshake that never completes times out even when the dial is done.
#[test]
fn a_stalled_handshake_times_out() {
    let mut t = T::new(ListenerKind::Https).accept();
    t.arrive(Side::Client, &hello("app.localhost"));
    t.connect(0);
    while t.pending(Op::ClientSend) {
        t.deliver(Side::Client, usize::MAX);
    }
    t.tick_after(Duration::from_secs(11));
    assert_eq!(t.failures(HandshakeFailure::Timeout), 1);
    t.ends_as(Outcome::Timeout);
}

/// rustls will not start a session (our configuration is at fault): `error`.
#[test]
fn a_session_rustls_refuses_to_start_is_an_internal_error() {
    let mut t = T::new(ListenerKind::Https);
    let mut config = (*server_config()).clone();
    config.max_fragment_size = Some(1);
    t.listener.tls = Some(Arc::new(config));
    let mut t = t.accept();
    t.arrive(Side::Client, &hello("app.localhost"));
    assert!(t.dials.is_empty());
    t.ends_as(Outcome::Error);
}

/// A TLS client that never reads while its guest talks: rustls' queue and our
/// buffers stay bounded, and the guest is not read while they are full.
#[test]
fn tls_backpressure_from_a_client_that_never_reads() {
    let (mut t, _client) = T::tls_established("app.localhost");
    let mut guest_reads = 0;
    for _ in 0..64 {
        if !t.pending(Op::GuestRecv) {
            break;
        }
        t.arrive(Side::Guest, &[1u8; 16 * 1024]);
        guest_reads += 1;
        // The client takes nothing.
        if t.pending(Op::ClientSend) {
            t.deliver(Side::Client, 0);
        }
    }
    assert!(
        guest_reads <= 3,
        "read {guest_reads} buffers from the guest"
    );
    assert!(t.bufs.held() <= 4, "{} buffers held", t.bufs.held());
}

#[test]
fn handshake_and_dial_latencies_are_observed() {
    let (t, _client) = T::tls_established("app.localhost");
    let text = t.metrics.render();
    assert!(
        text.contains("mergen_forwarder_handshake_duration_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains("mergen_forwarder_dial_duration_seconds_count 1"),
        "{text}"
    );
}

/// The lengths of the TLS records in `bytes` (whole records only).
fn record_lengths(mut bytes: &[u8]) -> Vec<usize> {
    let mut lengths = Vec::new();
    while bytes.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
        lengths.push(len);
        bytes = &bytes[(5 + len).min(bytes.len())..];
    }
    lengths
}

/// The guest is read in whole records' worth of plaintext: a stream goes out to the
/// client in full records, not in a full record and a short one per read.
#[test]
fn guest_plaintext_is_read_in_whole_records() {
    let (mut t, mut client) = T::tls_established("app.localhost");
    let max = match t.pending.iter().find(|p| p.op() == Some(Op::GuestRecv)) {
        Some(Io::Recv { max, .. }) => *max,
        other => panic!("no guest receive: {other:?}"),
    };
    assert!(
        max >= MAX_RECORD_PLAINTEXT && max % MAX_RECORD_PLAINTEXT == 0,
        "{max}"
    );
    let reads = 3;
    for i in 0..reads {
        t.arrive(Side::Guest, &vec![i as u8; max]);
        while t.pending(Op::ClientSend) {
            t.deliver(Side::Client, usize::MAX);
        }
    }
    let records = record_lengths(&t.client_got);
    // TLS 1.3 with AES-GCM: the content type and a 16-byte tag come on top.
    let full = MAX_RECORD_PLAINTEXT + 1 + 16;
    assert_eq!(
        records.len(),
        reads * max / MAX_RECORD_PLAINTEXT,
        "{records:?}"
    );
    assert!(records.iter().all(|&l| l == full), "{records:?}");
    let mut plaintext = 0;
    let mut rd = &t.client_got[..];
    while !rd.is_empty() {
        client.read_tls(&mut rd).expect("client read");
        client.process_new_packets().expect("records");
        plaintext += plaintext_of(&mut client).len();
    }
    assert_eq!(plaintext, reads * max);
}

/// The pending guest receive: into which buffer (`None`: the pool's), and how much.
fn guest_recv(t: &T) -> (Option<BufId>, usize) {
    match t.pending.iter().find(|p| p.op() == Some(Op::GuestRecv)) {
        Some(Io::Recv { into, max, .. }) => (*into, *max),
        other => panic!("no guest receive: {other:?}"),
    }
}

/// A guest whose reads come back full is read in bulk, into a buffer of the
/// connection's own, `BULK_READ` at a time, which goes to the client as full records
/// in one send; a short read puts it back on the pool and gives that buffer back.
#[test]
fn a_guest_that_fills_its_reads_is_read_in_bulk() {
    let (mut t, _client) = T::tls_established("app.localhost");
    let idle = t.bufs.held();
    assert_eq!(guest_recv(&t), (None, MAX_RECORD_PLAINTEXT));
    t.arrive(Side::Guest, &[1u8; MAX_RECORD_PLAINTEXT]);
    t.deliver(Side::Client, usize::MAX);
    let (own, max) = guest_recv(&t);
    let own = own.expect("a bulk buffer of its own");
    assert_eq!((t.bufs.get(own).mem.len(), max), (BULK_BUF_LEN, BULK_READ));
    t.client_got.clear();
    t.arrive(Side::Guest, &vec![2u8; BULK_READ]);
    t.deliver(Side::Client, usize::MAX);
    let full = MAX_RECORD_PLAINTEXT + 1 + 16;
    assert_eq!(
        record_lengths(&t.client_got),
        vec![full; 4],
        "one send, four records"
    );
    assert_eq!(
        guest_recv(&t),
        (Some(own), BULK_READ),
        "the same buffer again"
    );
    t.arrive(Side::Guest, b"the end of it");
    t.deliver(Side::Client, usize::MAX);
    assert_eq!(
        guest_recv(&t),
        (None, MAX_RECORD_PLAINTEXT),
        "back on the pool"
    );
    assert_eq!(t.bufs.held(), idle, "the bulk buffers are given back");
}

/// The same on a raw listener: a full pool buffer's worth puts the direction in bulk.
#[test]
fn raw_directions_go_bulk_and_back() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    t.arrive(Side::Client, &vec![3u8; MAX_RECORD_PLAINTEXT]);
    t.deliver(Side::Guest, usize::MAX);
    let own = match t.pending.iter().find(|p| p.op() == Some(Op::ClientRecv)) {
        Some(Io::Recv { into: Some(b), .. }) => *b,
        other => panic!("no bulk receive: {other:?}"),
    };
    assert_eq!(t.bufs.get(own).mem.len(), BULK_BUF_LEN);
    t.arrive(Side::Client, &vec![4u8; BULK_BUF_LEN]);
    assert_eq!(t.deliver(Side::Guest, usize::MAX), BULK_BUF_LEN, "one send");
    t.arrive(Side::Client, b"x");
    t.deliver(Side::Guest, usize::MAX);
    assert!(matches!(
        t.pending.iter().find(|p| p.op() == Some(Op::ClientRecv)),
        Some(Io::Recv { into: None, .. })
    ));
    assert_eq!(t.guest_got.len(), MAX_RECORD_PLAINTEXT + BULK_BUF_LEN + 1);
}

/// The listener's configuration picks the cipher suite: AES-128-GCM for a client that
/// prefers AES-256-GCM (rustls' default order), as for any client with AES hardware.
#[test]
fn the_server_picks_aes_128_gcm() {
    let (_t, client) = T::tls_established("app.localhost");
    assert_eq!(
        client.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
}

// ---- a VM that goes away -----------------------------------------------------------

/// Streaming TLS: what the guest sent still reaches the client, then close_notify and
/// a FIN; the client is read until it leaves.
#[test]
fn a_vm_gone_while_streaming_tls_ends_with_close_notify() {
    let (mut t, mut client) = T::tls_established("app.localhost");
    t.arrive(Side::Guest, b"tail");
    t.event(Event::VmGone);
    assert!(matches!(t.conn().stage, Stage::Linger(_)));
    t.converse(&mut client);
    assert_eq!(plaintext_of(&mut client), b"tail");
    assert!(closed_cleanly(&mut client));
    t.client_leaves(Outcome::VmGone);
}

/// Streaming raw: the guest's last bytes, then a FIN.
#[test]
fn a_vm_gone_while_streaming_raw_ends_with_a_fin() {
    let mut t = T::new(ListenerKind::Raw).accept();
    t.connect(0);
    t.arrive(Side::Client, b"up");
    t.deliver(Side::Guest, usize::MAX);
    t.arrive(Side::Guest, b"last");
    t.event(Event::VmGone);
    t.deliver(Side::Client, usize::MAX);
    assert_eq!(t.client_got, b"last");
    assert!(
        !t.pending(Op::GuestShutdown),
        "the guest is gone: nothing is said to it"
    );
    t.client_leaves(Outcome::VmGone);
}

/// Not streaming yet: as if the dial had failed.
#[test]
fn a_vm_gone_while_dialing_is_a_failed_dial() {
    // Parked in the worker: no connect yet.
    let mut t = T::new(ListenerKind::Raw).accept();
    t.event(Event::VmGone);
    assert!(!t.conn().awaits_dial(), "a parked dial must not be resumed");
    t.ends_as(Outcome::DialFailed);
    // The connect in flight is cancelled, and does not come up if it lands first.
    let mut t = T::new(ListenerKind::Raw).accept();
    t.dialing();
    t.event(Event::VmGone);
    assert!(t.pending(Op::GuestCancel));
    t.connecting = false;
    t.event(Event::Done {
        op: Op::Connect,
        result: 0,
        buf: None,
    });
    t.ends_as(Outcome::DialFailed);
    // HTTPS, the guest connected but the client still handshaking: it gets its 502
    // once its handshake is done.
    let mut t = T::new(ListenerKind::Https).accept();
    let mut client = tls_client("app.localhost");
    t.arrive(Side::Client, &{
        let mut out = Vec::new();
        client.write_tls(&mut out).expect("hello");
        out
    });
    t.connect(0);
    t.event(Event::VmGone);
    t.converse(&mut client);
    let page = String::from_utf8(plaintext_of(&mut client)).expect("text");
    assert!(page.starts_with("HTTP/1.1 502"), "{page}");
    t.client_leaves(Outcome::DialFailed);
}

/// A PROXY header still on its way to a guest that goes away: the guest is told
/// nothing more, the client gets its FIN, and every buffer comes back.
#[test]
fn a_vm_gone_while_its_proxy_header_is_sent_ends_the_connection() {
    let mut t = T::new(ListenerKind::Raw)
        .with_proxy_v2("192.0.2.7:51000", "127.0.0.1:2022")
        .accept();
    t.connect(0);
    assert!(t.pending(Op::GuestSend), "the header is being sent");
    t.deliver(Side::Guest, 4);
    let sent = t.guest_got.len();
    t.event(Event::VmGone);
    assert!(matches!(t.conn().stage, Stage::Linger(_)));
    t.arrive(Side::Client, b"SSH-2.0-client\r\n");
    assert_eq!(t.guest_got.len(), sent, "the guest was told more");
    assert!(!t.pending(Op::GuestShutdown));
    t.client_leaves(Outcome::VmGone);
}

/// Before routing and once ending, there is no VM to lose.
#[test]
fn a_vm_gone_before_routing_changes_nothing() {
    let mut t = T::new(ListenerKind::Https).accept();
    assert!(t.conn().route().is_none());
    t.event(Event::VmGone);
    assert!(matches!(t.conn().stage, Stage::Peek(_)));
    let (mut t, _client) = T::tls_established("app.localhost");
    assert!(t.conn().route().is_some());
    t.event(Event::Abort);
    assert!(t.conn().route().is_none());
    t.event(Event::VmGone);
    t.ends_as(Outcome::Shutdown);
}

// ---- listener kinds and their options ----------------------------------------------

#[test]
fn no_idle_timeout_when_it_is_off() {
    let mut t = T::new(ListenerKind::Raw);
    t.timeouts.idle = None;
    let mut t = t.accept();
    t.connect(0);
    t.tick_after(Duration::from_secs(30 * 24 * 3600));
    assert_eq!(t.finished(), None, "timed out with the idle timeout off");
    t.arrive(Side::Client, b"still here");
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, b"still here");
}

/// The later original's `httpPort`: an https listener dials it, other kinds do not.
#[test]
fn https_listeners_dial_the_vms_http_port() {
    let mut t = T::new(ListenerKind::Https)
        .with_http_port(3000)
        .dials_to(3000)
        .accept();
    t.arrive(Side::Client, &hello("app.localhost"));
    assert_eq!(
        t.logged(),
        ["0-1 app.localhost on :443 -> VM 0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6 at 172.30.0.2:3000"]
    );
    t.connect(0);
    // Every other kind dials its own guest port, 8080.
    for kind in [ListenerKind::Tls, ListenerKind::Postgres] {
        let mut t = T::new(kind).with_http_port(3000).accept();
        t.arrive(Side::Client, &hello("app.localhost"));
        t.connect(0);
    }
    let mut t = T::new(ListenerKind::Raw).with_http_port(3000).accept();
    t.connect(0);
}

fn pg_startup() -> Vec<u8> {
    let body = b"\0\x03\0\0user\0postgres\0database\0postgres\0\0";
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// `sslmode=disable`: the client learns that TLS is required, in its own protocol,
/// then the connection lingers until the client closes.
#[test]
fn a_plaintext_postgres_startup_is_told_tls_is_required() {
    let mut t = T::new(ListenerKind::Postgres).accept();
    let startup = pg_startup();
    t.arrive(Side::Client, &startup[..5]); // in pieces
    t.arrive(Side::Client, &startup[5..]);
    assert!(t.dials.is_empty());
    t.deliver(Side::Client, usize::MAX);
    let got = std::mem::take(&mut t.client_got);
    assert_eq!(got[0], b'E', "an ErrorResponse: {got:?}");
    let len = u32::from_be_bytes([got[1], got[2], got[3], got[4]]) as usize;
    assert_eq!(len + 1, got.len());
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("SFATAL\0"), "{text}");
    assert!(text.contains("C28000\0"), "{text}");
    assert!(text.contains("TLS is required"), "{text}");
    assert_eq!(t.failures(HandshakeFailure::NotTls), 1);
    t.client_leaves(Outcome::BadRequest);
}

/// Anything else in plaintext on a PostgreSQL listener is closed without a word.
#[test]
fn other_plaintext_on_a_postgres_listener_is_closed() {
    let mut t = T::new(ListenerKind::Postgres).accept();
    t.arrive(Side::Client, b"GET / HTTP/1.1\r\n\r\n");
    assert!(!t.pending(Op::ClientSend));
    t.ends_as(Outcome::BadRequest);
}

/// The header PROXY v2 sends from 192.0.2.7:51000 to 127.0.0.1:2022, with `sni`.
fn proxy_header(sni: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    crate::proxy_protocol::write_header(
        "192.0.2.7:51000".parse().unwrap(),
        "127.0.0.1:2022".parse().unwrap(),
        sni,
        &mut out,
    );
    out
}

#[test]
fn raw_proxy_v2_sends_the_header_before_any_client_byte() {
    let mut t = T::new(ListenerKind::Raw)
        .with_proxy_v2("192.0.2.7:51000", "127.0.0.1:2022")
        .accept();
    t.connect(0);
    let header = proxy_header(None);
    // The guest is slow to take the header: the client is not even read until it is.
    while t.pending(Op::GuestSend) {
        assert!(
            !t.pending(Op::ClientRecv),
            "client read before the header went"
        );
        t.deliver(Side::Guest, 10);
    }
    assert_eq!(t.guest_got, header);
    t.arrive(Side::Client, b"SSH-2.0-client\r\n");
    t.deliver(Side::Guest, usize::MAX);
    let mut want = header.clone();
    want.extend_from_slice(b"SSH-2.0-client\r\n");
    assert_eq!(t.guest_got, want);
    // Its buffer went back once it was sent: one for each direction's input at most.
    assert!(t.bufs.held() <= 2, "{} buffers held", t.bufs.held());
    t.arrive(Side::Guest, b"SSH-2.0-server\r\n");
    t.deliver(Side::Client, usize::MAX);
    assert_eq!(
        t.client_got, b"SSH-2.0-server\r\n",
        "the client sees no header"
    );
}

/// TLS kinds send the SNI along, and the header goes before the first plaintext byte
/// even when the guest connects after the handshake.
#[test]
fn tls_proxy_v2_carries_the_sni() {
    let mut t = T::new(ListenerKind::Tls)
        .with_proxy_v2("192.0.2.7:51000", "127.0.0.1:2022")
        .accept();
    let mut client = tls_client("app.localhost");
    t.converse(&mut client);
    assert!(!client.is_handshaking());
    client.writer().write_all(b"PING\r\n").expect("write");
    t.converse(&mut client);
    assert!(t.guest_got.is_empty());
    t.connect(0);
    t.converse(&mut client);
    while t.pending(Op::GuestSend) {
        t.deliver(Side::Guest, usize::MAX);
    }
    let mut want = proxy_header(Some("app.localhost"));
    want.extend_from_slice(b"PING\r\n");
    assert_eq!(t.guest_got, want);
}

/// Without `+proxy-v2` the guest gets the client's bytes only.
#[test]
fn no_header_without_the_option() {
    let mut t = T::new(ListenerKind::Raw);
    t.addrs = Some(Addrs {
        client: "192.0.2.7:51000".parse().unwrap(),
        local: "127.0.0.1:2022".parse().unwrap(),
    });
    let mut t = t.accept();
    t.connect(0);
    assert!(!t.pending(Op::GuestSend));
    t.arrive(Side::Client, b"x");
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, b"x");
}
