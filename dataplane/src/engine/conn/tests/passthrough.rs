//! A name only another host of the cluster has: the connection goes to that host's
//! forwarder unread, on this listener's port, ClientHello and all.

use super::*;

/// A VM of another host, answering to `name`.
fn remote_route() -> Arc<Route> {
    Arc::new(Route {
        id: "far-away".into(),
        guest_ip: std::net::Ipv4Addr::new(127, 0, 0, 2),
        netns: Namespace::Host,
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        http_port: None,
    })
}

impl T {
    fn with_remote(mut self, name: &str) -> T {
        self.routes
            .0
            .insert(format!("remote:{name}"), remote_route());
        self
    }
}

/// A connection on a `kind` listener for a name only another host has, accepted, and
/// the first flight of a client for it.
fn passing(kind: ListenerKind) -> (T, Vec<u8>) {
    let t = T::new(kind)
        .with_remote("far.localhost")
        .dials_to(443)
        .accept();
    (t, hello_of(&mut tls_client("far.localhost")))
}

/// The client's first flight.
fn hello_of(client: &mut ClientConnection) -> Vec<u8> {
    let mut out = Vec::new();
    client.write_tls(&mut out).expect("client write");
    out
}

#[test]
fn passed_through_unread_to_the_owner_on_the_listener_port() {
    let (mut t, hello) = passing(ListenerKind::Https);
    t.arrive(Side::Client, &hello);
    // No TLS here: nothing goes back to the client, nothing more is read from it
    // before the peer is there to take it.
    assert!(!t.pending(Op::ClientSend) && !t.pending(Op::ClientRecv));
    match t.dials.last() {
        Some(Io::Dial { route, .. }) => assert_eq!(route.id, "far-away"),
        other => panic!("{other:?}"),
    }
    t.connect(0);
    // No local VM to lose: the worker never ends it for a local route's change.
    assert!(t.conn().route().is_none());
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, hello, "the ClientHello byte for byte");
    // Then bytes both ways as they come: the peer's ServerHello reaches the client.
    t.arrive(Side::Guest, b"\x16\x03\x03server-flight");
    t.deliver(Side::Client, usize::MAX);
    assert_eq!(t.client_got, b"\x16\x03\x03server-flight");
    t.arrive(Side::Client, b"\x17\x03\x03app-data");
    t.deliver(Side::Guest, usize::MAX);
    assert!(t.guest_got.ends_with(b"\x17\x03\x03app-data"));
    t.end_recv(Side::Client, 0);
    t.shutdowns();
    t.end_recv(Side::Guest, 0);
    t.shutdowns();
    assert!(t.client_fin && t.guest_fin);
    assert_eq!(
        t.failures(HandshakeFailure::UnknownSni),
        0,
        "not refused here"
    );
    assert!(t.metrics.render().contains(
        "mergen_forwarder_cluster_connections_total{listener=\":443\",direction=\"to_peer\"} 1"
    ));
    t.ends_as(Outcome::Ok);
}

#[test]
fn a_hello_in_pieces_reaches_the_owner_whole_and_first() {
    let (mut t, hello) = passing(ListenerKind::Tls);
    let (a, b) = hello.split_at(7);
    t.arrive(Side::Client, a);
    assert!(t.dials.is_empty(), "routed before the name was read");
    t.arrive(Side::Client, b);
    t.connect(0);
    while t.pending(Op::GuestSend) {
        t.deliver(Side::Guest, 100);
    }
    assert_eq!(t.guest_got, hello);
    t.arrive(Side::Client, b"more");
    t.deliver(Side::Guest, usize::MAX);
    let mut want = hello.clone();
    want.extend_from_slice(b"more");
    assert_eq!(t.guest_got, want);
}

#[test]
fn local_routes_win_over_remote_ones() {
    // app.localhost is a local VM; another host claims it too.
    let (mut t, mut client) = T::new(ListenerKind::Https)
        .with_remote("app.localhost")
        .establish("app.localhost");
    // Terminated here: `establish` saw the handshake finish against this forwarder and
    // the dial go to the local guest's port; the guest gets plaintext.
    client.writer().write_all(b"GET /").expect("write");
    t.converse(&mut client);
    t.deliver(Side::Guest, usize::MAX);
    assert_eq!(t.guest_got, b"GET /");
}

#[test]
fn a_postgres_client_is_answered_here_then_passed_through() {
    let mut t = T::new(ListenerKind::Postgres)
        .with_remote("far.localhost")
        .dials_to(443)
        .accept();
    t.arrive(Side::Client, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    t.deliver(Side::Client, usize::MAX);
    assert_eq!(t.client_got, b"S");
    let mut client = tls_client("far.localhost");
    let hello = hello_of(&mut client);
    t.arrive(Side::Client, &hello);
    t.connect(0);
    t.deliver(Side::Guest, usize::MAX);
    // The owner gets direct TLS, which its postgres listener takes.
    assert_eq!(t.guest_got, hello);
}

#[test]
fn an_owner_out_of_reach_is_a_dial_failure() {
    let (mut t, hello) = passing(ListenerKind::Https);
    t.arrive(Side::Client, &hello);
    t.connect(-libc::ECONNREFUSED);
    assert!(
        t.client_got.is_empty(),
        "no alert or page of ours in its stream"
    );
    t.ends_as(Outcome::DialFailed);
}

#[test]
fn unknown_everywhere_is_still_refused() {
    let mut t = T::new(ListenerKind::Https)
        .with_remote("far.localhost")
        .accept();
    let mut client = tls_client("nowhere.localhost");
    t.converse(&mut client);
    assert_eq!(t.failures(HandshakeFailure::UnknownSni), 1);
    assert!(t.dials.is_empty());
}

// ---- the PROXY header between forwarders --------------------------------------------

/// The client's and the listener's addresses, as the worker reads them in a cluster
/// (the listener itself sends no header to guests).
fn with_client(mut t: T, client: &str) -> T {
    t.addrs = Some(Addrs {
        client: client.parse().expect("an address"),
        local: "127.0.0.1:2022".parse().expect("an address"),
    });
    t
}

#[test]
fn the_owner_hears_who_the_client_is_first() {
    let t = T::new(ListenerKind::Https)
        .with_remote("far.localhost")
        .dials_to(443);
    let mut t = with_client(t, "192.0.2.7:51000").accept();
    let mut client = tls_client("far.localhost");
    let hello = hello_of(&mut client);
    let (a, b) = hello.split_at(20);
    t.arrive(Side::Client, a);
    t.arrive(Side::Client, b);
    t.connect(0);
    while t.pending(Op::GuestSend) {
        t.deliver(Side::Guest, usize::MAX);
    }
    // The header names no SNI: the owner reads it from the hello.
    let mut want = super::proxy_header(None);
    want.extend_from_slice(&hello);
    assert_eq!(t.guest_got, want);
}

impl T {
    /// `ip` is another host of the cluster.
    fn with_peer(mut self, ip: &str) -> T {
        self.routes.0.insert(format!("peer:{ip}"), remote_route());
        self
    }
}

/// The owner's side: the header is read, the client it names is the one its guest
/// hears of, and TLS is terminated here as for a local client.
#[test]
fn a_peers_header_names_the_client_to_the_guest() {
    let t = T::new(ListenerKind::Https)
        .with_proxy_v2("127.0.0.9:40000", "127.0.0.1:2022")
        .with_peer("127.0.0.9");
    let mut t = t.accept();
    let header = super::proxy_header(None);
    // In pieces: the header alone, cut in two.
    t.arrive(Side::Client, &header[..5]);
    t.arrive(Side::Client, &header[5..]);
    assert!(t.pending(Op::ClientRecv), "waits for the hello");
    let mut client = tls_client("app.localhost");
    t.converse(&mut client);
    assert!(!client.is_handshaking(), "terminated here");
    client.writer().write_all(b"GET /").expect("write");
    t.connect(0);
    t.converse(&mut client);
    while t.pending(Op::GuestSend) {
        t.deliver(Side::Guest, usize::MAX);
    }
    let mut want = super::proxy_header(Some("app.localhost"));
    want.extend_from_slice(b"GET /");
    assert_eq!(t.guest_got, want, "the relayed client, not the peer");
    assert!(t.metrics.render().contains(
        "mergen_forwarder_cluster_connections_total{listener=\":443\",direction=\"from_peer\"} 1"
    ));
}

#[test]
fn a_peer_without_a_header_is_any_client() {
    let t = T::new(ListenerKind::Https).with_peer("127.0.0.9");
    let mut t = with_client(t, "127.0.0.9:40000").accept();
    let mut client = tls_client("app.localhost");
    t.converse(&mut client);
    assert!(!client.is_handshaking());
}

#[test]
fn only_peers_may_send_a_header() {
    let t = T::new(ListenerKind::Https).with_peer("127.0.0.9");
    let mut t = with_client(t, "192.0.2.7:51000").accept();
    let mut bytes = super::proxy_header(None);
    bytes.extend_from_slice(&hello_of(&mut tls_client("app.localhost")));
    t.arrive(Side::Client, &bytes);
    assert!(t.dials.is_empty());
    assert_eq!(t.failures(HandshakeFailure::NotTls), 1);
    t.ends_as(Outcome::BadRequest);
}

#[test]
fn a_connection_from_a_peer_is_never_passed_on_again() {
    // Both hosts think the other has the VM (their views of etcd disagree for a
    // moment): the connection is refused rather than sent back.
    let t = T::new(ListenerKind::Https)
        .with_peer("127.0.0.9")
        .with_remote("far.localhost");
    let mut t = with_client(t, "127.0.0.9:40000").accept();
    let mut bytes = super::proxy_header(None);
    bytes.extend_from_slice(&hello_of(&mut tls_client("far.localhost")));
    t.arrive(Side::Client, &bytes);
    assert!(t.dials.is_empty(), "passed on again");
    assert_eq!(t.failures(HandshakeFailure::UnknownSni), 1);
    t.refusal_closes(Outcome::UnknownSni);
}

#[test]
fn a_broken_header_from_a_peer_is_refused() {
    let t = T::new(ListenerKind::Https).with_peer("127.0.0.9");
    let mut t = with_client(t, "127.0.0.9:40000").accept();
    let mut bytes = super::proxy_header(None);
    bytes[13] = 0x12; // UDP
    t.arrive(Side::Client, &bytes);
    t.ends_as(Outcome::BadRequest);
}
