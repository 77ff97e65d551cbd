//! What the event loop did to its connections, counted for the owner's `/metrics`: a
//! server that sheds load or drops slow clients should say so in numbers, not only in
//! (rate-limited) log lines.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::request::RequestError;

/// Counters the event loop updates and anyone may read; shared through an `Arc` put in
/// [`ServerConfig::stats`](super::ServerConfig::stats).
#[derive(Debug, Default)]
pub struct ServerStats {
    accepted: AtomicU64,
    open: AtomicU64,
    /// By [`Cap`].
    refused: [AtomicU64; Cap::ALL.len()],
    evicted: [AtomicU64; Cap::ALL.len()],
    idle_timeouts: AtomicU64,
    refused_requests: [AtomicU64; RefusedRequest::ALL.len()],
}

/// Why a connection was refused at accept, or an idle one closed to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// `max_connections_per_ip` for the client's address.
    PerAddress,
    /// `max_connections` for the whole server.
    Total,
}

impl Cap {
    pub const ALL: [Cap; 2] = [Cap::PerAddress, Cap::Total];

    pub fn label(self) -> &'static str {
        match self {
            Cap::PerAddress => "per_ip",
            Cap::Total => "total",
        }
    }
}

/// Why a request was answered by the server itself with an error, before any handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedRequest {
    /// 408: the head or the body did not arrive in time.
    Timeout,
    /// 431 / 413: head or body over its limit.
    TooLarge,
    /// 400 / 501: not a request we can read.
    Malformed,
}

impl RefusedRequest {
    pub const ALL: [RefusedRequest; 3] = [
        RefusedRequest::Timeout,
        RefusedRequest::TooLarge,
        RefusedRequest::Malformed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RefusedRequest::Timeout => "timeout",
            RefusedRequest::TooLarge => "too_large",
            RefusedRequest::Malformed => "malformed",
        }
    }

    fn of(e: &RequestError) -> RefusedRequest {
        match e {
            RequestError::Timeout => RefusedRequest::Timeout,
            RequestError::HeadTooLarge { .. } | RequestError::BodyTooLarge { .. } => {
                RefusedRequest::TooLarge
            }
            RequestError::UnsupportedCoding(_) | RequestError::Malformed(_) => {
                RefusedRequest::Malformed
            }
        }
    }
}

/// A consistent-enough copy of the counters (each read on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Connections taken in (not counting refused ones).
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections refused, by [`Cap::ALL`]'s order.
    pub refused: [u64; Cap::ALL.len()],
    /// Idle connections closed to make room for a newcomer, by [`Cap::ALL`]'s order.
    pub evicted: [u64; Cap::ALL.len()],
    /// Connections closed because nothing came within the head or idle deadline.
    pub idle_timeouts: u64,
    /// Requests the server refused itself, by [`RefusedRequest::ALL`]'s order.
    pub refused_requests: [u64; RefusedRequest::ALL.len()],
}

impl StatsSnapshot {
    pub fn refused(&self, cap: Cap) -> u64 {
        self.refused[cap as usize]
    }

    pub fn evicted(&self, cap: Cap) -> u64 {
        self.evicted[cap as usize]
    }

    pub fn refused_requests(&self, why: RefusedRequest) -> u64 {
        self.refused_requests[why as usize]
    }
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        fn get(c: &AtomicU64) -> u64 {
            c.load(Ordering::Relaxed)
        }
        StatsSnapshot {
            accepted: get(&self.accepted),
            open: get(&self.open),
            refused: self.refused.each_ref().map(get),
            evicted: self.evicted.each_ref().map(get),
            idle_timeouts: get(&self.idle_timeouts),
            refused_requests: self.refused_requests.each_ref().map(get),
        }
    }

    pub(super) fn accepted(&self, open: usize) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.set_open(open);
    }

    pub(super) fn set_open(&self, open: usize) {
        self.open.store(open as u64, Ordering::Relaxed);
    }

    pub(super) fn refused(&self, cap: Cap) {
        self.refused[cap as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn evicted(&self, cap: Cap) {
        self.evicted[cap as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn idle_timeout(&self) {
        self.idle_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn refused_request(&self, e: &RequestError) {
        self.refused_requests[RefusedRequest::of(e) as usize].fetch_add(1, Ordering::Relaxed);
    }
}
