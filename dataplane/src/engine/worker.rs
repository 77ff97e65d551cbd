//! One worker thread: a ring, its listening sockets, and the connections it accepted.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{Conn, Ctx, Op};
use super::ring::{Completion, Ring};
use super::Shared;
use crate::metrics::Outcome;

/// How often timers and the stop flag are looked at.
const TICK: Duration = Duration::from_millis(100);
const RING_ENTRIES: u32 = 4096;
/// Receive buffers shared by a worker's connections (a power of two), each holding one
/// maximal TLS record. Past that, receives fall back to buffers of their own.
const POOL_BUFFERS: u16 = 1024;
/// Tokens with this bit set belong to listeners, the rest to connections.
const LISTENER_TOKEN: u32 = 1 << 31;
/// Token of operations whose completion needs no handling (cancelling accepts).
const IGNORED_TOKEN: u32 = u32::MAX;

pub struct Worker {
    shared: Arc<Shared>,
    ring: Ring,
    /// Indexed like `shared.listeners`; `None` once closed for shutdown.
    listeners: Vec<Option<OwnedFd>>,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<u32>,
    live: usize,
    accepting: bool,
    last_tick: Instant,
    reaped: Vec<Completion>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>, listeners: Vec<OwnedFd>) -> io::Result<Worker> {
        let mut ring = Ring::new(RING_ENTRIES, POOL_BUFFERS, super::conn::BUF_LEN)?;
        for (i, fd) in listeners.iter().enumerate() {
            ring.accept_multi(fd.as_fd(), LISTENER_TOKEN | i as u32);
        }
        Ok(Worker {
            shared,
            ring,
            listeners: listeners.into_iter().map(Some).collect(),
            conns: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            accepting: true,
            last_tick: Instant::now(),
            reaped: Vec::new(),
        })
    }

    pub fn run(&mut self) {
        loop {
            let mut reaped = std::mem::take(&mut self.reaped);
            self.ring.run_once(TICK, &mut reaped);
            let now = Instant::now();
            for c in reaped.drain(..) {
                self.dispatch(c, now);
            }
            self.reaped = reaped;
            if now.duration_since(self.last_tick) >= TICK {
                self.last_tick = now;
                if self.tick(now) {
                    return;
                }
            }
        }
    }

    fn dispatch(&mut self, c: Completion, now: Instant) {
        if c.token == IGNORED_TOKEN {
            return;
        }
        if c.token & LISTENER_TOKEN != 0 {
            return self.on_accept(c, now);
        }
        let Some((slot, op)) = Op::from_token(c.token) else {
            return;
        };
        let shared = self.shared.clone();
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            if let Some(buf) = c.received {
                self.ring.release_buf(buf);
            }
            return;
        };
        let mut cx = Ctx {
            ring: &mut self.ring,
            shared: &shared,
            now,
        };
        conn.on_completion(&mut cx, op, c.result, c.received);
        self.reap(slot);
    }

    fn on_accept(&mut self, c: Completion, now: Instant) {
        let listener = (c.token & !LISTENER_TOKEN) as usize;
        if !c.more {
            if self.accepting {
                if let Some(fd) = self.listeners.get(listener).and_then(Option::as_ref) {
                    if c.result < 0 && c.result != -libc::ECANCELED {
                        log::warn!(
                            "accept on {} failed: {}",
                            self.shared.listeners[listener].name,
                            io::Error::from_raw_os_error(-c.result)
                        );
                    }
                    self.ring.accept_multi(fd.as_fd(), c.token);
                }
            } else if let Some(l) = self.listeners.get_mut(listener) {
                // Stopping: the accept is over, so the socket can close.
                *l = None;
            }
        }
        let Some(client) = c.accepted else { return };
        let metrics = &self.shared.metrics;
        metrics.conn_opened(listener);
        if !self.accepting {
            metrics.conn_closed(listener, Outcome::Refused);
            return;
        }
        let open = self.shared.open.fetch_add(1, Ordering::AcqRel);
        if open >= self.shared.config.max_connections {
            self.shared.open.fetch_sub(1, Ordering::AcqRel);
            metrics.conn_closed(listener, Outcome::Refused);
            return;
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        let shared = self.shared.clone();
        let mut cx = Ctx {
            ring: &mut self.ring,
            shared: &shared,
            now,
        };
        let mut conn = Conn::new(&mut cx, slot, listener, client);
        conn.start(&mut cx);
        self.conns[slot as usize] = Some(conn);
        self.live += 1;
        self.reap(slot);
    }

    /// Free a connection whose operations are all reaped.
    fn reap(&mut self, slot: u32) {
        let entry = &mut self.conns[slot as usize];
        if !entry.as_ref().is_some_and(Conn::finished) {
            return;
        }
        if let Some(conn) = entry.take() {
            self.shared
                .metrics
                .conn_closed(conn.listener(), conn.outcome());
            conn.free(&mut self.ring);
            self.free_slots.push(slot);
            self.live -= 1;
            self.shared.open.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Timers and shutdown; returns true when the worker is done.
    fn tick(&mut self, now: Instant) -> bool {
        let shared = self.shared.clone();
        let stopping = shared.stopping();
        if stopping.is_some() && self.accepting {
            self.accepting = false;
            for fd in self.listeners.iter().flatten() {
                self.ring.cancel_fd(fd.as_raw_fd(), IGNORED_TOKEN);
            }
        }
        let drain_over = stopping.is_some_and(|deadline| now >= deadline);
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            let mut cx = Ctx {
                ring: &mut self.ring,
                shared: &shared,
                now,
            };
            if drain_over {
                conn.abort(&mut cx);
            } else {
                conn.check_timers(&mut cx);
            }
            self.reap(slot as u32);
        }
        stopping.is_some() && self.live == 0
    }
}
