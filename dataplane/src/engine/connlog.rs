//! Per-connection log lines, kept off the io_uring threads.
//!
//! `FWD_LOG_LEVEL` defaults to `debug` (as in the original), and at that level every
//! connection logs a line. Formatting it and writing it to stderr on a worker thread
//! would put a `write(2)` and an allocation on the data path of every connection. So
//! a worker only builds a small [`Record`] (when its level is enabled) and hands it to
//! a bounded channel; the `fwd-log` thread formats and writes it. When that thread
//! falls behind, records are dropped and counted instead of slowing the workers, and
//! the count is logged once the thread catches up.
//!
//! Every record carries the connection's id, so the lines of one connection can be
//! found together.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use log::Level;

use super::dial::DialError;
use crate::resolver::Route;

/// Records waiting for the log thread before workers start dropping them.
const BACKLOG: usize = 16 * 1024;

/// A connection's id in log lines: unique in the process, in accept order per worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    pub worker: u16,
    pub seq: u64,
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.worker, self.seq)
    }
}

/// Something worth a line about one connection.
#[derive(Debug)]
pub enum Record {
    /// Routed by SNI to a VM.
    Routed {
        sni: Box<str>,
        vm: Arc<Route>,
        port: u16,
    },
    /// Refused before any crypto.
    Refused {
        why: &'static str,
        sni: Option<Box<str>>,
    },
    /// A raw listener with no VM at all.
    NoRoute,
    /// The VM's namespace has no ready socket: the dial waits for its pool.
    DialParked {
        vm: Arc<Route>,
    },
    DialFailed {
        vm: Arc<Route>,
        error: DialError,
    },
    /// rustls refused what the client sent.
    Tls {
        error: rustls::Error,
    },
}

impl Record {
    fn level(&self) -> Level {
        match self {
            // Our side of the dial failed (a namespace gone, no sockets): worth a warning.
            Record::DialFailed {
                error:
                    DialError::Pool { .. } | DialError::Socket(_) | DialError::InvalidNamespace(_),
                ..
            } => Level::Warn,
            _ => Level::Debug,
        }
    }

    /// The line's text; `listener` is the listener's name.
    pub fn message(&self, listener: &str) -> String {
        match self {
            Record::Routed { sni, vm, port } => {
                format!(
                    "{sni} on {listener} -> VM {} at {}:{port}",
                    vm.id, vm.guest_ip
                )
            }
            Record::Refused {
                why,
                sni: Some(sni),
            } => {
                format!("refused on {listener}: {why} {sni:?}")
            }
            Record::Refused { why, sni: None } => format!("refused on {listener}: {why}"),
            Record::NoRoute => format!("raw connection on {listener} refused: no VM to route to"),
            Record::DialParked { vm } => {
                format!(
                    "dial to VM {} waiting for a socket from its namespace",
                    vm.id
                )
            }
            Record::DialFailed { vm, error } => format!("dial to VM {} failed: {error}", vm.id),
            Record::Tls { error } => format!("TLS error on {listener}: {error}"),
        }
    }
}

/// One queued line: which connection, on which listener, what happened.
#[derive(Debug)]
pub struct Entry {
    pub conn: ConnId,
    pub listener: usize,
    pub record: Record,
}

/// The workers' end of the log channel. Cheap to clone.
#[derive(Clone)]
pub struct ConnLog {
    tx: Option<SyncSender<(Level, Entry)>>,
    /// The most verbose level that is written, read once: the level cannot change.
    max: log::LevelFilter,
    dropped: Arc<AtomicU64>,
}

impl ConnLog {
    /// A log whose lines the `fwd-log` thread writes through the `log` facade;
    /// `listeners` names the listeners by index.
    pub fn spawn(listeners: Vec<String>) -> std::io::Result<ConnLog> {
        let (log, rx) = ConnLog::channel(BACKLOG, log::max_level());
        let dropped = Arc::clone(&log.dropped);
        std::thread::Builder::new()
            .name("fwd-log".into())
            .spawn(move || write_lines(&rx, &listeners, &dropped))?;
        Ok(log)
    }

    /// A log whose entries land in the returned receiver (tests).
    pub fn channel(capacity: usize, max: log::LevelFilter) -> (ConnLog, Receiver<(Level, Entry)>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let log = ConnLog {
            tx: Some(tx),
            max,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        (log, rx)
    }

    /// A log that writes nothing.
    pub fn off() -> ConnLog {
        ConnLog {
            tx: None,
            max: log::LevelFilter::Off,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether a debug record would be written: build one only then.
    pub fn debug_enabled(&self) -> bool {
        self.tx.is_some() && Level::Debug <= self.max
    }

    pub fn record(&self, conn: ConnId, listener: usize, record: Record) {
        let level = record.level();
        let Some(tx) = self.tx.as_ref().filter(|_| level <= self.max) else {
            return;
        };
        let entry = Entry {
            conn,
            listener,
            record,
        };
        if let Err(TrySendError::Full(_)) = tx.try_send((level, entry)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records dropped because the log thread fell behind, since the last report.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn write_lines(rx: &Receiver<(Level, Entry)>, listeners: &[String], dropped: &AtomicU64) {
    for (level, entry) in rx {
        let name = listeners.get(entry.listener).map_or("?", String::as_str);
        log::log!(level, conn = entry.conn.to_string(); "{}", entry.record.message(name));
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            log::warn!("{lost} connection log line(s) dropped: the log could not keep up");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Arc<Route> {
        Arc::new(Route {
            id: "0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6".into(),
            guest_ip: std::net::Ipv4Addr::new(172, 30, 0, 2),
            netns: crate::resolver::Namespace::Host,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            http_port: None,
        })
    }

    #[test]
    fn records_carry_the_connection_and_respect_the_level() {
        let conn = ConnId { worker: 1, seq: 42 };
        assert_eq!(conn.to_string(), "1-42");
        let (log, rx) = ConnLog::channel(8, log::LevelFilter::Warn);
        assert!(!log.debug_enabled());
        log.record(conn, 0, Record::NoRoute);
        log.record(
            conn,
            0,
            Record::DialFailed {
                vm: route(),
                error: DialError::InvalidNamespace("..".into()),
            },
        );
        let (level, entry) = rx.try_recv().expect("the warning");
        assert_eq!((level, entry.conn), (Level::Warn, conn));
        assert!(rx.try_recv().is_err(), "the debug record was not filtered");
        assert_eq!(
            entry.record.message(":443"),
            "dial to VM 0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6 failed: \"..\" cannot name a network namespace"
        );
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let (log, _rx) = ConnLog::channel(2, log::LevelFilter::Debug);
        let conn = ConnId { worker: 0, seq: 1 };
        for _ in 0..5 {
            log.record(conn, 0, Record::NoRoute);
        }
        assert_eq!(log.dropped(), 3);
        let routed = Record::Routed {
            sni: "app.localhost".into(),
            vm: route(),
            port: 443,
        };
        assert_eq!(
            routed.message(":443"),
            "app.localhost on :443 -> VM 0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6 at 172.30.0.2:443"
        );
    }
}
