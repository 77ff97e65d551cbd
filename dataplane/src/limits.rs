//! What the process may hold, decided once at start-up: the open-files limit is raised
//! to its hard limit, and the connection caps are fitted to it, so that the forwarder
//! refuses connections it cannot carry instead of running out of descriptors (which
//! would also starve its admin listener, its resolver and its namespace socket pools).

use std::io;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors each connection can hold: the client's socket and the guest's.
pub const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors kept out of the connections' share, at least: listeners, rings, eventfds,
/// inotify, the admin listener and its clients, certificate and meta.json reads.
const MIN_RESERVE: u64 = 128;
/// ... and at least this fraction of the limit, for the namespace socket pools (each
/// namespace with traffic keeps a few ready sockets) and whatever else grows with VMs.
const RESERVE_FRACTION: u64 = 8;

/// The open-files limit in force after [`raise_nofile`]: what it was, and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    pub before: u64,
    pub now: u64,
}

/// Raise the soft open-files limit to the hard limit (a soft limit of 1,024 is the
/// default of most shells and service managers, far below what an edge needs; the hard
/// limit is what the administrator allows). Returns the limits before and after.
pub fn raise_nofile() -> io::Result<NoFile> {
    let limit = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY; the kernel caps descriptors at fs.nr_open anyway.
    let before = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if before >= hard {
        return Ok(NoFile {
            before,
            now: before,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(NoFile { before, now: hard })
}

/// The most connections `nofile` descriptors carry, each taking
/// [`FDS_PER_CONNECTION`], after a reserve for everything else.
pub fn connections_for(nofile: u64) -> usize {
    let reserve = MIN_RESERVE.max(nofile / RESERVE_FRACTION);
    let share = nofile.saturating_sub(reserve) / FDS_PER_CONNECTION;
    usize::try_from(share).unwrap_or(usize::MAX).max(1)
}

/// The connection caps in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Open connections across all workers.
    pub total: usize,
    /// Open connections per client address (IPv6: per /64); `None` is no cap.
    pub per_ip: Option<usize>,
}

/// Where `FWD_MAX_CONNECTIONS_PER_IP` is unset: a quarter of the total, so that no one
/// address (nor a handful) can take every connection, while clients behind one NAT
/// still get thousands.
pub const DEFAULT_PER_IP_SHARE: usize = 4;

impl Caps {
    /// The caps from the settings, the total lowered to what `nofile` descriptors
    /// carry. `per_ip` is the setting: `None` unset (a quarter of the total), `Some(0)`
    /// off. Returns the caps and, when the total was lowered, what was asked for.
    pub fn fit(total: usize, per_ip: Option<usize>, nofile: u64) -> (Caps, Option<usize>) {
        let allowed = connections_for(nofile);
        let (fitted, lowered) = match total > allowed {
            true => (allowed, Some(total)),
            false => (total, None),
        };
        let per_ip = match per_ip {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some((fitted / DEFAULT_PER_IP_SHARE).max(1)),
        };
        (
            Caps {
                total: fitted,
                per_ip,
            },
            lowered,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_a_reserve_and_take_two_descriptors_each() {
        assert_eq!(connections_for(1024), (1024 - 128) / 2);
        assert_eq!(connections_for(20_000), (20_000 - 2_500) / 2);
        assert_eq!(connections_for(1 << 20), ((1 << 20) - (1 << 17)) / 2);
        // Never zero, however small the limit.
        assert_eq!(connections_for(10), 1);
    }

    #[test]
    fn caps_fit_the_limit_and_default_the_per_ip_share() {
        let (caps, lowered) = Caps::fit(65_536, None, 1024);
        assert_eq!(caps.total, 448);
        assert_eq!(caps.per_ip, Some(112));
        assert_eq!(lowered, Some(65_536));
        let (caps, lowered) = Caps::fit(65_536, Some(0), 1 << 20);
        assert_eq!((caps.total, caps.per_ip, lowered), (65_536, None, None));
        let (caps, _) = Caps::fit(100, Some(7), 1 << 20);
        assert_eq!(caps.per_ip, Some(7));
        let (caps, _) = Caps::fit(1, None, 1 << 20);
        assert_eq!(caps.per_ip, Some(1));
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let NoFile { now, .. } = raise_nofile().expect("setrlimit");
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(limit.current.unwrap_or(u64::MAX), now);
        assert_eq!(limit.current, limit.maximum);
    }
}
