//! One worker thread: a ring, its listening sockets, and the connections it accepted.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ffi_free_netns::Wake;
use rustix::event::{eventfd, EventfdFlags};

use super::conn::{Conn, Ctx, Op};
use super::ring::{Completion, Ring};
use super::Shared;
use crate::metrics::Outcome;

/// How often timers and the stop flag are looked at.
const TICK: Duration = Duration::from_millis(100);
const RING_ENTRIES: u32 = 4096;
/// Receive buffers shared by a worker's connections (a power of two), each holding one
/// maximal TLS record. Past that, receives fall back to buffers of their own.
pub const POOL_BUFFERS: u16 = 1024;
/// Tokens with this bit set belong to listeners, the rest to connections.
const LISTENER_TOKEN: u32 = 1 << 31;
/// Token of operations whose completion needs no handling (cancelling accepts).
const IGNORED_TOKEN: u32 = u32::MAX;
/// Token of the poll on the worker's eventfd, which the socket pool signals.
const WAKE_TOKEN: u32 = u32::MAX - 1;

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
    /// Signalled by the socket pool when parked dials should try again.
    wake_fd: Arc<OwnedFd>,
    wake: Wake,
    /// Slots whose dial is parked (maybe stale: a slot is checked before resuming).
    parked: Vec<u32>,
}

impl Worker {
    /// A worker whose receive pool holds `pool_buffers` buffers (a power of two).
    pub fn new(
        shared: Arc<Shared>,
        listeners: Vec<OwnedFd>,
        pool_buffers: u16,
    ) -> io::Result<Worker> {
        let mut ring = Ring::new(RING_ENTRIES, pool_buffers, super::conn::BUF_LEN)?;
        for (i, fd) in listeners.iter().enumerate() {
            ring.accept_multi(fd.as_fd(), LISTENER_TOKEN | i as u32);
        }
        let wake_fd = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?);
        ring.poll_readable_multi(wake_fd.as_fd(), WAKE_TOKEN);
        let signal = Arc::clone(&wake_fd);
        let wake: Wake = Arc::new(move || {
            // A full counter (EAGAIN) is already a pending wake.
            let _ = rustix::io::write(&*signal, &1u64.to_ne_bytes());
        });
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
            wake_fd,
            wake,
            parked: Vec::new(),
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
        if c.token == WAKE_TOKEN {
            return self.on_wake(&c, now);
        }
        if c.token & LISTENER_TOKEN != 0 {
            return self.on_accept(c, now);
        }
        let Some((slot, op)) = Op::from_token(c.token) else {
            return;
        };
        let stepped = self.step(slot, now, |conn, cx| {
            conn.on_completion(cx, op, c.result, c.received)
        });
        if !stepped {
            if let Some(buf) = c.received {
                self.ring.release_buf(buf);
            }
        }
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
            wake: &self.wake,
            parked: &mut self.parked,
        };
        let mut conn = Conn::new(&mut cx, slot, listener, client);
        conn.start(&mut cx);
        self.conns[slot as usize] = Some(conn);
        self.live += 1;
        self.reap(slot);
    }

    /// The pool signalled: resume every parked dial (those still without a socket park
    /// again and are signalled again).
    fn on_wake(&mut self, c: &Completion, now: Instant) {
        let mut count = [0u8; 8];
        // Reset the counter; every parked dial is retried below whatever it held.
        let _ = rustix::io::read(&*self.wake_fd, &mut count);
        if !c.more {
            if c.result < 0 {
                log::warn!(
                    "poll on the pool's eventfd failed: {}",
                    io::Error::from_raw_os_error(-c.result)
                );
            }
            self.ring
                .poll_readable_multi(self.wake_fd.as_fd(), WAKE_TOKEN);
        }
        let mut parked = std::mem::take(&mut self.parked);
        parked.sort_unstable();
        parked.dedup();
        for &slot in &parked {
            self.step(slot, now, Conn::resume_dial);
        }
    }

    /// Free a connection whose operations are all reaped.
    /// Run one step of the live connection in `slot`, then free it if that finished it.
    /// Returns false when the slot holds no connection (a stale completion or wake).
    fn step(&mut self, slot: u32, now: Instant, f: impl FnOnce(&mut Conn, &mut Ctx<'_>)) -> bool {
        let shared = self.shared.clone();
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        let mut cx = Ctx {
            ring: &mut self.ring,
            shared: &shared,
            now,
            wake: &self.wake,
            parked: &mut self.parked,
        };
        f(conn, &mut cx);
        self.reap(slot);
        true
    }

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
        for slot in 0..self.conns.len() as u32 {
            self.step(slot, now, |conn, cx| {
                if drain_over {
                    conn.abort(cx);
                } else {
                    conn.check_timers(cx);
                }
            });
        }
        stopping.is_some() && self.live == 0
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::OwnedFd;

    use super::*;
    use crate::config::Config;
    use crate::engine::Listener;
    use crate::metrics::Metrics;
    use crate::resolver::Resolver;
    use ffi_free_netns::{PoolConfig, SocketPool};

    /// More connections hold received data than the pool has buffers (the backend
    /// does not read yet), so receives fall back to buffers of their own; every byte
    /// still arrives.
    #[test]
    fn an_empty_pool_falls_back_to_private_buffers() {
        let dir = std::env::temp_dir().join(format!("mergen-dp-worker-{}", std::process::id()));
        let vm = dir.join("0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6");
        std::fs::create_dir_all(&vm).expect("vm dir");
        std::fs::write(
            vm.join("meta.json"),
            r#"{"id":"0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6","createdAt":"2025-01-01T00:00:00Z","guestIP":"127.0.0.1","netns":""}"#,
        )
        .expect("meta.json");
        let backend = TcpListener::bind("127.0.0.1:0").expect("backend");
        let backend_port = backend.local_addr().expect("addr").port();
        let config = Config::from_lookup(|_| None).expect("default config");
        let listener = Listener {
            name: "raw-test".into(),
            guest_port: backend_port,
            kind: crate::config::ListenerKind::Raw,
            tls: None,
        };
        let shared = Arc::new(Shared::new(
            config,
            vec![listener],
            Arc::new(Resolver::new(crate::resolver::Settings {
                config_root: dir.clone(),
                domain_suffix: "localhost".into(),
                ..Default::default()
            })),
            SocketPool::new(PoolConfig::default()),
            Arc::new(Metrics::new(&["raw-test".to_string()])),
        ));
        let front = TcpListener::bind("127.0.0.1:0").expect("front");
        let front_addr = front.local_addr().expect("addr");
        let front: OwnedFd = front.into();
        let worker_shared = shared.clone();
        let worker = std::thread::spawn(move || {
            Worker::new(worker_shared, vec![front], 2)
                .expect("worker")
                .run()
        });

        const CONNS: usize = 4;
        const BYTES: usize = 32 << 20;
        let clients: Vec<_> = (0..CONNS)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(front_addr).expect("connect");
                    s.write_all(&vec![i as u8; BYTES]).expect("upload");
                    s.shutdown(Shutdown::Write).expect("half-close");
                    let mut reply = Vec::new();
                    s.read_to_end(&mut reply).expect("reply");
                    reply
                })
            })
            .collect();
        // Accept everything first, and read only once every connection has a backlog
        // queued at the backend: by then the forwarder holds more received buffers
        // than the pool has.
        let accepted: Vec<TcpStream> = (0..CONNS)
            .map(|_| backend.accept().expect("accept").0)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !accepted
            .iter()
            .all(|s| rustix::io::ioctl_fionread(s).unwrap_or(0) >= 64 << 10)
        {
            assert!(
                Instant::now() < deadline,
                "the uploads never backed up: {:?}",
                accepted
                    .iter()
                    .map(|s| rustix::io::ioctl_fionread(s).unwrap_or(0))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let readers: Vec<_> = accepted
            .into_iter()
            .map(|mut s| {
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).expect("read upload");
                    s.write_all(b"ok").expect("reply");
                    (got.len(), got.iter().all(|&b| b == got[0]))
                })
            })
            .collect();
        for r in readers {
            assert_eq!(r.join().expect("reader"), (BYTES, true));
        }
        for c in clients {
            assert_eq!(c.join().expect("client").len(), 2);
        }
        shared.begin_shutdown(Duration::from_secs(1));
        worker.join().expect("worker thread");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
