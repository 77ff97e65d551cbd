//! Admission: whether a connection just accepted may stay. Decided before anything is
//! spent on it, so that a connection refused costs an accept and a close: over
//! `FWD_MAX_CONNECTIONS` across all workers (`refused`), or over
//! `FWD_MAX_CONNECTIONS_PER_IP` from its client's address (`refused_per_ip`), which
//! keeps one client at the global cap from locking everyone else out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::limits::Caps;
use crate::metrics::Outcome;

/// Shards of the per-address table: workers admitting at once rarely share a lock.
const SHARDS: usize = 64;

/// Who a per-address cap counts: an IPv4 address (IPv4-mapped IPv6 included), or an
/// IPv6 /64, the least a single IPv6 client is usually given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(u128);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        // An IPv4 key has bit 32 set, an IPv6 one (its /64, the low half zero) never.
        let v4 = |v4: std::net::Ipv4Addr| ClientKey(u128::from(u32::from(v4)) | 1 << 32);
        match ip {
            IpAddr::V4(addr) => v4(addr),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(addr) => v4(addr),
                None => ClientKey(u128::from(v6) & !u128::from(u64::MAX)),
            },
        }
    }

    fn shard(self) -> usize {
        let folded = (self.0 as u64) ^ ((self.0 >> 64) as u64);
        (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % SHARDS
    }
}

/// A place taken by an admitted connection, given back with [`Admission::release`].
#[derive(Debug)]
#[must_use = "an admitted connection's place must be released when it closes"]
pub struct Place {
    client: Option<ClientKey>,
}

pub struct Admission {
    caps: Caps,
    open: AtomicUsize,
    /// Connections open per client, for `caps.per_ip`; a client with none has no entry.
    per_client: Box<[Mutex<HashMap<ClientKey, usize>>]>,
}

impl Admission {
    pub fn new(caps: Caps) -> Admission {
        Admission {
            caps,
            open: AtomicUsize::new(0),
            per_client: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Connections admitted and not yet released, across workers.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Take a place for a connection from `peer` (`None` when its address is unknown:
    /// only the total counts it), or say which cap refused it.
    pub fn admit(&self, peer: Option<SocketAddr>) -> Result<Place, Outcome> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.caps.total {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Outcome::Refused);
        }
        let client = match (self.caps.per_ip, peer) {
            (Some(cap), Some(peer)) => {
                let key = ClientKey::of(peer.ip());
                let mut shard = self.shard(key);
                let count = shard.entry(key).or_insert(0);
                if *count >= cap {
                    drop(shard);
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    return Err(Outcome::RefusedPerIp);
                }
                *count += 1;
                Some(key)
            }
            _ => None,
        };
        Ok(Place { client })
    }

    /// The connection holding `place` closed.
    pub fn release(&self, place: Place) {
        if let Some(key) = place.client {
            let mut shard = self.shard(key);
            if let Some(count) = shard.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    shard.remove(&key);
                }
            }
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    fn shard(&self, key: ClientKey) -> std::sync::MutexGuard<'_, HashMap<ClientKey, usize>> {
        self.per_client[key.shard()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Clients holding connections now (for tests).
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.per_client
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("a socket address"))
    }

    #[test]
    fn the_total_cap_counts_everyone() {
        let a = Admission::new(Caps {
            total: 2,
            per_ip: None,
        });
        let one = a.admit(addr("10.0.0.1:1")).expect("first");
        let two = a.admit(None).expect("second, address unknown");
        assert_eq!(a.admit(addr("10.0.0.2:1")).unwrap_err(), Outcome::Refused);
        assert_eq!(a.open(), 2);
        a.release(one);
        let three = a.admit(addr("10.0.0.2:1")).expect("a place freed up");
        a.release(two);
        a.release(three);
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn one_address_at_its_cap_leaves_room_for_others() {
        let a = Admission::new(Caps {
            total: 100,
            per_ip: Some(2),
        });
        let held: Vec<Place> = (0..2)
            .map(|i| {
                a.admit(addr(&format!("127.0.0.1:{}", 1000 + i)))
                    .expect("under the cap")
            })
            .collect();
        assert_eq!(
            a.admit(addr("127.0.0.1:2000")).unwrap_err(),
            Outcome::RefusedPerIp
        );
        // The same address seen as IPv4-mapped IPv6 (a dual-stack listener) is the same client.
        assert_eq!(
            a.admit(addr("[::ffff:127.0.0.1]:2001")).unwrap_err(),
            Outcome::RefusedPerIp
        );
        let other = a.admit(addr("127.0.0.2:1000")).expect("another address");
        // A refusal by the per-address cap gave its place in the total back.
        assert_eq!(a.open(), 3);
        for p in held {
            a.release(p);
        }
        a.release(other);
        assert_eq!(
            (a.open(), a.clients()),
            (0, 0),
            "no entry outlives its connections"
        );
        a.release(a.admit(addr("127.0.0.1:3000")).expect("free again"));
    }

    #[test]
    fn ipv6_clients_count_per_64() {
        let a = Admission::new(Caps {
            total: 100,
            per_ip: Some(1),
        });
        let p = a.admit(addr("[2001:db8:1:2::1]:1")).expect("first");
        assert_eq!(
            a.admit(addr("[2001:db8:1:2:ffff::9]:1")).unwrap_err(),
            Outcome::RefusedPerIp
        );
        let q = a.admit(addr("[2001:db8:1:3::1]:1")).expect("another /64");
        a.release(p);
        a.release(q);
        assert_ne!(
            ClientKey::of("::1".parse().unwrap()),
            ClientKey::of("0.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn admission_is_exact_under_contention() {
        let a = Admission::new(Caps {
            total: 1000,
            per_ip: Some(10),
        });
        std::thread::scope(|s| {
            for t in 0..4 {
                let a = &a;
                s.spawn(move || {
                    for i in 0..20_000u32 {
                        let peer = addr(&format!("10.0.{}.{}:1", t, i % 7));
                        if let Ok(p) = a.admit(peer) {
                            a.release(p);
                        }
                    }
                });
            }
        });
        assert_eq!((a.open(), a.clients()), (0, 0));
    }
}
