//! Pacing for what fails over and over: accepting while the process is out of
//! descriptors, and the warning that says so. Both listeners (the workers' and the
//! admin's) back off as nginx and Go's net/http do, instead of retrying in a tight loop
//! that burns a core and writes millions of log lines while fixing nothing.

use std::time::{Duration, Instant};

/// A delay that doubles on each failure in a row, from `min` to `max`, and starts over
/// after a success.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

/// Accepting stops for this long after the first failure (Go's net/http: 5 ms; nginx
/// waits 500 ms, or until a connection closes).
pub const ACCEPT_MIN: Duration = Duration::from_millis(10);
pub const ACCEPT_MAX: Duration = Duration::from_secs(1);

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay for accepts: 10 ms doubling to 1 s.
    pub const fn accept() -> Backoff {
        Backoff::new(ACCEPT_MIN, ACCEPT_MAX)
    }

    /// Another failure: how long to wait before the next try.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub fn succeeded(&mut self) {
        self.next = self.min;
    }
}

/// At most one line per `interval` about a repeated event; the lines after the first
/// say how many were not written.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

/// How often a repeated warning may be written.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

impl Throttle {
    pub const fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// The event happened at `now`: `Some(n)` when a line should be written, `n` being
    /// how many happened since the last line without one.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// `" (N more like it since the last report)"` when `n` > 0, for a throttled line.
pub fn more(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} more like it since the last report)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_to_its_cap_and_starts_over() {
        let mut b = Backoff::accept();
        let waits: Vec<u64> = (0..9).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(), ACCEPT_MIN);
    }

    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.hit(start), Some(0));
        for i in 1..=1000 {
            assert_eq!(t.hit(start + Duration::from_millis(i)), None);
        }
        assert_eq!(t.hit(start + Duration::from_secs(10)), Some(1000));
        assert_eq!(t.hit(start + Duration::from_secs(11)), None);
        assert_eq!(t.hit(start + Duration::from_secs(25)), Some(1));
        assert_eq!(more(0), "");
        assert!(more(3).contains("3 more"));
    }
}
