//! Counters the data path bumps with relaxed atomics (no locks, no allocation),
//! rendered in the Prometheus text format (version 0.0.4) for `/metrics`.
//!
//! Listeners are identified by their index in the configured list; their label is
//! the name given to [`Metrics::new`], by convention [`crate::config::ListenerSpec::name`]
//! (the listen address as configured, e.g. `:443`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How a connection ended. Each is produced by exactly the case it names (the engine's
/// tests have one per outcome).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions ended cleanly.
    Ok,
    /// Refused with an alert: no VM answers to the server name.
    UnknownSni,
    /// Refused with an alert: the ClientHello names no server.
    NoSni,
    /// The guest could not be reached (refused, timed out, no namespace or socket).
    DialFailed,
    /// The TLS handshake did not complete: rustls refused it, the ClientHello was
    /// malformed or too large, or the client closed first.
    HandshakeFailed,
    /// A deadline passed: the handshake's, the idle timeout, a last word's.
    Timeout,
    /// The forwarder's own failure (rustls would not start a session).
    Error,
    /// Refused at once: `FWD_MAX_CONNECTIONS` were open, or the forwarder was stopping.
    Refused,
    /// Refused at once: its client's address had `FWD_MAX_CONNECTIONS_PER_IP` open.
    RefusedPerIp,
    /// Ended because its VM went away: its meta.json was removed, its guest address or
    /// namespace changed, or its namespace was deleted or replaced.
    VmGone,
    /// A raw listener with no VM to send the connection to.
    NoRoute,
    /// Cut when the shutdown drain time ran out.
    Shutdown,
    /// A socket error on the client side.
    ClientError,
    /// A socket error on the guest side.
    BackendError,
    /// Not the protocol the listener speaks (not TLS, a bad PostgreSQL preamble).
    BadRequest,
    /// A TLS error after the handshake.
    TlsError,
}

impl Outcome {
    pub const ALL: [Outcome; 16] = [
        Outcome::Ok,
        Outcome::UnknownSni,
        Outcome::NoSni,
        Outcome::DialFailed,
        Outcome::HandshakeFailed,
        Outcome::Timeout,
        Outcome::Error,
        Outcome::Refused,
        Outcome::RefusedPerIp,
        Outcome::VmGone,
        Outcome::NoRoute,
        Outcome::Shutdown,
        Outcome::ClientError,
        Outcome::BackendError,
        Outcome::BadRequest,
        Outcome::TlsError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UnknownSni => "unknown_sni",
            Outcome::NoSni => "no_sni",
            Outcome::DialFailed => "dial_failed",
            Outcome::HandshakeFailed => "handshake_failed",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
            Outcome::RefusedPerIp => "refused_per_ip",
            Outcome::VmGone => "vm_gone",
            Outcome::NoRoute => "no_route",
            Outcome::Shutdown => "shutdown",
            Outcome::ClientError => "client_error",
            Outcome::BackendError => "backend_error",
            Outcome::BadRequest => "bad_request",
            Outcome::TlsError => "tls_error",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    NoSni,
    UnknownSni,
    NotTls,
    TooLarge,
    Malformed,
    Tls,
    Timeout,
    /// The client closed before its handshake was done.
    ClientClosed,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 8] = [
        HandshakeFailure::NoSni,
        HandshakeFailure::UnknownSni,
        HandshakeFailure::NotTls,
        HandshakeFailure::TooLarge,
        HandshakeFailure::Malformed,
        HandshakeFailure::Tls,
        HandshakeFailure::Timeout,
        HandshakeFailure::ClientClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NoSni => "no_sni",
            HandshakeFailure::UnknownSni => "unknown_sni",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::TooLarge => "too_large",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::Tls => "tls",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ClientClosed => "client_closed",
        }
    }
}

/// Upper bounds of the latency histogram buckets, in microseconds (then `+Inf`).
const BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        family(out, name, "histogram", help);
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = match BUCKETS_US.get(i) {
                Some(&us) => format_seconds(us),
                None => "+Inf".to_string(),
            };
            sample(
                out,
                &format!("{name}_bucket"),
                &format!("le=\"{le}\""),
                cumulative,
            );
        }
        let _ = writeln!(
            out,
            "{name}_sum {}",
            format_seconds(self.sum_us.load(Relaxed))
        );
        // The count is the +Inf bucket, so the exposition stays self-consistent even
        // while other threads are observing.
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

fn format_seconds(us: u64) -> String {
    let s = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
    let s = s.trim_end_matches('0');
    s.strip_suffix('.').unwrap_or(s).to_string()
}

struct ListenerCounters {
    name: String,
    opened: AtomicU64,
    closed: [AtomicU64; Outcome::ALL.len()],
    to_backend: AtomicU64,
    to_client: AtomicU64,
    /// In a cluster: connections passed through to another host's forwarder, and
    /// connections another host's forwarder passed through to this one.
    to_peer: AtomicU64,
    from_peer: AtomicU64,
}

/// Which way a connection crossed between the hosts of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerDirection {
    ToPeer,
    FromPeer,
}

pub struct Metrics {
    listeners: Vec<ListenerCounters>,
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Times a worker stopped accepting for a while (out of descriptors or memory).
    accept_pauses: AtomicU64,
    /// The caps in force: (total, per client address; 0 when off).
    limits: [AtomicU64; 2],
    dial: Histogram,
    handshake: Histogram,
}

impl Metrics {
    pub fn new(listener_names: &[String]) -> Metrics {
        Metrics {
            listeners: listener_names
                .iter()
                .map(|name| ListenerCounters {
                    name: name.clone(),
                    opened: AtomicU64::new(0),
                    closed: Default::default(),
                    to_backend: AtomicU64::new(0),
                    to_client: AtomicU64::new(0),
                    to_peer: AtomicU64::new(0),
                    from_peer: AtomicU64::new(0),
                })
                .collect(),
            handshake_failures: Default::default(),
            accept_pauses: AtomicU64::new(0),
            limits: Default::default(),
            dial: Histogram::default(),
            handshake: Histogram::default(),
        }
    }

    /// An index past the configured listeners is ignored: metrics never panic the
    /// data path.
    fn listener(&self, i: usize) -> Option<&ListenerCounters> {
        self.listeners.get(i)
    }

    pub fn conn_opened(&self, listener: usize) {
        if let Some(l) = self.listener(listener) {
            l.opened.fetch_add(1, Relaxed);
        }
    }

    pub fn conn_closed(&self, listener: usize, outcome: Outcome) {
        if let Some(l) = self.listener(listener) {
            l.closed[outcome as usize].fetch_add(1, Relaxed);
        }
    }

    pub fn bytes(&self, listener: usize, to_backend: u64, to_client: u64) {
        if let Some(l) = self.listener(listener) {
            if to_backend > 0 {
                l.to_backend.fetch_add(to_backend, Relaxed);
            }
            if to_client > 0 {
                l.to_client.fetch_add(to_client, Relaxed);
            }
        }
    }

    pub fn peer_connection(&self, listener: usize, direction: PeerDirection) {
        if let Some(l) = self.listener(listener) {
            match direction {
                PeerDirection::ToPeer => l.to_peer.fetch_add(1, Relaxed),
                PeerDirection::FromPeer => l.from_peer.fetch_add(1, Relaxed),
            };
        }
    }

    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn accept_paused(&self) {
        self.accept_pauses.fetch_add(1, Relaxed);
    }

    /// The connection caps in force (`per_ip`: `None` when off), shown as gauges.
    pub fn set_limits(&self, total: usize, per_ip: Option<usize>) {
        self.limits[0].store(total as u64, Relaxed);
        self.limits[1].store(per_ip.unwrap_or(0) as u64, Relaxed);
    }

    pub fn dial_latency(&self, d: Duration) {
        self.dial.observe(d);
    }

    pub fn handshake_latency(&self, d: Duration) {
        self.handshake.observe(d);
    }

    /// Connections open now on `listener`: opened minus closed.
    pub fn open_connections(&self, listener: usize) -> u64 {
        self.listeners.get(listener).map_or(0, |l| {
            let closed: u64 = l.closed.iter().map(|c| c.load(Relaxed)).sum();
            l.opened.load(Relaxed).saturating_sub(closed)
        })
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let listener = |l: &ListenerCounters| format!("listener=\"{}\"", escape(&l.name));
        series(
            &mut out,
            ("mergen_forwarder_connections_open", "gauge"),
            "Connections open now.",
            self.listeners
                .iter()
                .enumerate()
                .map(|(i, l)| (listener(l), self.open_connections(i))),
        );
        series(
            &mut out,
            ("mergen_forwarder_connections_total", "counter"),
            "Connections closed, by outcome.",
            self.listeners.iter().flat_map(|l| {
                Outcome::ALL.map(|o| {
                    let labels = format!("{},outcome=\"{}\"", listener(l), o.as_str());
                    (labels, l.closed[o as usize].load(Relaxed))
                })
            }),
        );
        series(
            &mut out,
            ("mergen_forwarder_bytes_total", "counter"),
            "Bytes forwarded, by direction.",
            self.listeners.iter().flat_map(|l| {
                [("to_backend", &l.to_backend), ("to_client", &l.to_client)].map(|(d, c)| {
                    (
                        format!("{},direction=\"{d}\"", listener(l)),
                        c.load(Relaxed),
                    )
                })
            }),
        );
        series(
            &mut out,
            ("mergen_forwarder_cluster_connections_total", "counter"),
            "Connections passed through between the hosts of a cluster: to_peer for a VM of another host, from_peer from another host's forwarder.",
            self.listeners.iter().flat_map(|l| {
                [("to_peer", &l.to_peer), ("from_peer", &l.from_peer)].map(|(d, c)| {
                    (
                        format!("{},direction=\"{d}\"", listener(l)),
                        c.load(Relaxed),
                    )
                })
            }),
        );
        series(
            &mut out,
            ("mergen_forwarder_handshake_failures_total", "counter"),
            "TLS connections refused or failed before the handshake completed, by reason.",
            HandshakeFailure::ALL.map(|r| {
                let count = self.handshake_failures[r as usize].load(Relaxed);
                (format!("reason=\"{}\"", r.as_str()), count)
            }),
        );
        series(
            &mut out,
            ("mergen_forwarder_connection_limit", "gauge"),
            "Connections allowed open: in total (FWD_MAX_CONNECTIONS, lowered to what the open-files limit allows) and per client address (0: no cap).",
            [("total", &self.limits[0]), ("per_ip", &self.limits[1])]
                .map(|(scope, v)| (format!("scope=\"{scope}\""), v.load(Relaxed))),
        );
        family(
            &mut out,
            "mergen_forwarder_accept_pauses_total",
            "counter",
            "Times a worker stopped accepting for a while because the process was out of file descriptors or memory.",
        );
        let _ = writeln!(
            out,
            "mergen_forwarder_accept_pauses_total {}",
            self.accept_pauses.load(Relaxed)
        );
        self.dial.render(
            &mut out,
            "mergen_forwarder_dial_duration_seconds",
            "Time to connect to a guest.",
        );
        self.handshake.render(
            &mut out,
            "mergen_forwarder_handshake_duration_seconds",
            "Time from accept to a completed TLS handshake.",
        );
        out
    }
}

/// The `# HELP` and `# TYPE` lines of a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family (`name`, `kind`) and its samples, each `(labels, value)`.
fn series(
    out: &mut String,
    (name, kind): (&str, &str),
    help: &str,
    samples: impl IntoIterator<Item = (String, u64)>,
) {
    family(out, name, kind, help);
    for (labels, value) in samples {
        sample(out, name, &labels, value);
    }
}

/// One sample line: `name{labels} value`.
fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{{{labels}}} {value}");
}

/// Label values escape backslash, quote and newline.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> String {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
            .to_string()
    }

    #[test]
    fn counts_render_by_listener_and_outcome() {
        let m = Metrics::new(&["0.0.0.0:443".into(), "0.0.0.0:2022".into()]);
        for _ in 0..3 {
            m.conn_opened(0);
        }
        m.conn_opened(1);
        m.conn_closed(0, Outcome::Ok);
        m.conn_closed(0, Outcome::UnknownSni);
        m.bytes(0, 100, 2000);
        m.bytes(0, 5, 0);
        m.bytes(1, 0, 7);
        m.handshake_failed(HandshakeFailure::UnknownSni);
        m.handshake_failed(HandshakeFailure::UnknownSni);
        m.handshake_failed(HandshakeFailure::TooLarge);
        assert_eq!(m.open_connections(0), 1);
        assert_eq!(m.open_connections(1), 1);
        let t = m.render();
        let cases = [
            ("mergen_forwarder_connections_open{listener=\"0.0.0.0:443\"}", "1"),
            ("mergen_forwarder_connections_open{listener=\"0.0.0.0:2022\"}", "1"),
            ("mergen_forwarder_connections_total{listener=\"0.0.0.0:443\",outcome=\"ok\"}", "1"),
            ("mergen_forwarder_connections_total{listener=\"0.0.0.0:443\",outcome=\"unknown_sni\"}", "1"),
            ("mergen_forwarder_connections_total{listener=\"0.0.0.0:443\",outcome=\"refused\"}", "0"),
            ("mergen_forwarder_connections_total{listener=\"0.0.0.0:2022\",outcome=\"ok\"}", "0"),
            ("mergen_forwarder_bytes_total{listener=\"0.0.0.0:443\",direction=\"to_backend\"}", "105"),
            ("mergen_forwarder_bytes_total{listener=\"0.0.0.0:443\",direction=\"to_client\"}", "2000"),
            ("mergen_forwarder_bytes_total{listener=\"0.0.0.0:2022\",direction=\"to_client\"}", "7"),
            ("mergen_forwarder_handshake_failures_total{reason=\"unknown_sni\"}", "2"),
            ("mergen_forwarder_handshake_failures_total{reason=\"too_large\"}", "1"),
            ("mergen_forwarder_handshake_failures_total{reason=\"no_sni\"}", "0"),
        ];
        for (series, want) in cases {
            assert_eq!(value(&t, series), want, "{series}");
        }
        // Every outcome of every listener is present, so dashboards see zeros.
        for o in Outcome::ALL {
            value(&t, &format!("mergen_forwarder_connections_total{{listener=\"0.0.0.0:2022\",outcome=\"{}\"}}", o.as_str()));
        }
        // Every sample line is `name{labels} number` or `name number`.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v == "+Inf" || v.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::new(&[]);
        m.dial_latency(Duration::from_micros(50));
        m.dial_latency(Duration::from_micros(100));
        m.dial_latency(Duration::from_millis(3));
        m.dial_latency(Duration::from_secs(60));
        m.handshake_latency(Duration::from_millis(1));
        let t = m.render();
        let d = "mergen_forwarder_dial_duration_seconds";
        let cases = [
            (format!("{d}_bucket{{le=\"0.0001\"}}"), "2"),
            (format!("{d}_bucket{{le=\"0.00025\"}}"), "2"),
            (format!("{d}_bucket{{le=\"0.0025\"}}"), "2"),
            (format!("{d}_bucket{{le=\"0.005\"}}"), "3"),
            (format!("{d}_bucket{{le=\"5\"}}"), "3"),
            (format!("{d}_bucket{{le=\"+Inf\"}}"), "4"),
            (format!("{d}_count"), "4"),
            (format!("{d}_sum"), "60.00315"),
            (
                "mergen_forwarder_handshake_duration_seconds_bucket{le=\"0.001\"}".into(),
                "1",
            ),
            (
                "mergen_forwarder_handshake_duration_seconds_bucket{le=\"0.0005\"}".into(),
                "0",
            ),
            (
                "mergen_forwarder_handshake_duration_seconds_count".into(),
                "1",
            ),
        ];
        for (series, want) in cases {
            assert_eq!(value(&t, &series), want, "{series}");
        }
    }

    #[test]
    fn label_values_are_escaped_and_bad_indexes_ignored() {
        let m = Metrics::new(&["a\"b\\c\nd".into()]);
        m.conn_opened(7);
        m.bytes(7, 1, 1);
        m.conn_closed(7, Outcome::Ok);
        assert_eq!(m.open_connections(7), 0);
        let t = m.render();
        assert!(t.contains("listener=\"a\\\"b\\\\c\\nd\""), "{t}");
        assert_eq!(format_seconds(0), "0");
        assert_eq!(format_seconds(1_500_000), "1.5");
        assert_eq!(format_seconds(250), "0.00025");
    }

    #[test]
    fn counters_are_exact_under_contention() {
        let m = std::sync::Arc::new(Metrics::new(&["l".into()]));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let m = &m;
                s.spawn(move || {
                    for _ in 0..10_000 {
                        m.conn_opened(0);
                        m.bytes(0, 1, 2);
                        m.conn_closed(0, Outcome::Ok);
                    }
                });
            }
        });
        let t = m.render();
        assert_eq!(
            value(
                &t,
                "mergen_forwarder_connections_total{listener=\"l\",outcome=\"ok\"}"
            ),
            "40000"
        );
        assert_eq!(
            value(
                &t,
                "mergen_forwarder_bytes_total{listener=\"l\",direction=\"to_client\"}"
            ),
            "80000"
        );
        assert_eq!(m.open_connections(0), 0);
    }
}
