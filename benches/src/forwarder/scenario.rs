//! The scenarios and the figures each one reports.

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// Reported for context (the client's CPU, errors), never ranked.
    Info,
}

#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub better: Better,
}

const fn m(name: &'static str, better: Better) -> Metric {
    Metric { name, better }
}

use Better::{Higher, Info, Lower};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    KeepAlive,
    NewConn16,
    NewConn1,
    Bulk1,
    Bulk16,
    Rsa,
    UnknownName,
    IdleHello,
    IdleTls,
}

pub const KEEP_ALIVE_CONNS: usize = 50;
pub const PARALLEL: usize = 16;

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::KeepAlive,
        Scenario::NewConn16,
        Scenario::NewConn1,
        Scenario::Bulk1,
        Scenario::Bulk16,
        Scenario::Rsa,
        Scenario::UnknownName,
        Scenario::IdleHello,
        Scenario::IdleTls,
    ];

    /// The name used on the command line and in the JSON.
    pub fn key(self) -> &'static str {
        match self {
            Scenario::KeepAlive => "keepalive",
            Scenario::NewConn16 => "newconn16",
            Scenario::NewConn1 => "newconn1",
            Scenario::Bulk1 => "bulk1",
            Scenario::Bulk16 => "bulk16",
            Scenario::Rsa => "rsa",
            Scenario::UnknownName => "unknown-sni",
            Scenario::IdleHello => "idle-prehandshake",
            Scenario::IdleTls => "idle-tls",
        }
    }

    pub fn from_key(key: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.key() == key)
    }

    pub fn title(self, bulk_mib: u64, idle: usize) -> String {
        match self {
            Scenario::KeepAlive => {
                format!("keep-alive: small requests on {KEEP_ALIVE_CONNS} TLS connections")
            }
            Scenario::NewConn16 => {
                format!("new connection per request (full ECDSA handshake), {PARALLEL} in parallel")
            }
            Scenario::NewConn1 => {
                "new connection per request (full ECDSA handshake), one at a time".into()
            }
            Scenario::Bulk1 => format!("bulk: {bulk_mib} MiB downloads, one stream"),
            Scenario::Bulk16 => format!("bulk: {bulk_mib} MiB downloads, {PARALLEL} streams"),
            Scenario::Rsa => {
                format!("new connection per request, RSA-2048 certificate, {PARALLEL} in parallel")
            }
            Scenario::UnknownName => format!(
                "unknown-SNI flood: ClientHellos for a name nobody serves, {PARALLEL} in parallel"
            ),
            Scenario::IdleHello => {
                format!("{idle} idle connections that never send a ClientHello")
            }
            Scenario::IdleTls => {
                format!("{idle} idle TLS connections (handshake and one request done)")
            }
        }
    }

    pub fn metrics(self) -> &'static [Metric] {
        const KEEP_ALIVE: &[Metric] = &[
            m("req/s", Higher),
            m("p50 µs", Lower),
            m("p99 µs", Lower),
            m("p99.9 µs", Lower),
            m("CPU µs/req", Lower),
            m("client CPU µs/req", Info),
            m("backend CPU µs/req", Info),
            m("others' CPU % (≈)", Info),
            m("errors", Info),
        ];
        const NEW_CONN: &[Metric] = &[
            m("conn/s", Higher),
            m("p50 µs", Lower),
            m("p99 µs", Lower),
            m("CPU µs/conn", Lower),
            m("client CPU µs/conn", Info),
            m("others' CPU % (≈)", Info),
            m("errors", Info),
        ];
        const BULK: &[Metric] = &[
            m("MiB/s", Higher),
            m("CPU µs/MiB", Lower),
            m("client CPU µs/MiB", Info),
            m("client KiB/read", Info),
            m("KiB/TLS record", Info),
            m("others' CPU % (≈)", Info),
            m("errors", Info),
        ];
        const FLOOD: &[Metric] = &[
            m("refused/s", Higher),
            m("CPU µs/conn", Lower),
            m("client CPU µs/conn", Info),
            m("others' CPU % (≈)", Info),
            m("not refused %", Info),
        ];
        const IDLE: &[Metric] = &[
            m("PSS B/conn", Lower),
            m("RSS B/conn", Lower),
            m("failed", Info),
        ];
        match self {
            Scenario::KeepAlive => KEEP_ALIVE,
            Scenario::NewConn16 | Scenario::NewConn1 | Scenario::Rsa => NEW_CONN,
            Scenario::Bulk1 | Scenario::Bulk16 => BULK,
            Scenario::UnknownName => FLOOD,
            Scenario::IdleHello | Scenario::IdleTls => IDLE,
        }
    }
}
