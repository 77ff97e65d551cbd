//! The data path: thread-per-core io_uring workers.
//!
//! Each worker owns one ring and one SO_REUSEPORT listening socket per listener, so the
//! kernel spreads new connections across workers and a connection never leaves the
//! worker that accepted it. No locks on the data path: routes come from an immutable
//! resolver snapshot, certificates from rustls' resolver.

mod conn;
mod dial;
mod listen;
mod prewarm;
// The only unsafe code of the workspace: the kernel shares memory with us here.
#[allow(unsafe_code)]
mod ring;
mod worker;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ffi_free_netns::SocketPool;

use crate::config::{Config, ListenerKind};
use crate::metrics::Metrics;
use crate::resolver::Resolver;

pub use listen::bind_listeners;
pub use ring::{probe, ProbeError};

/// One configured listener as the workers see it.
pub struct Listener {
    pub name: String,
    pub guest_port: u16,
    pub kind: ListenerKind,
    /// `None` for raw listeners.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Listener {
    pub fn new(
        spec: &crate::config::ListenerSpec,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Listener {
        Listener {
            name: spec.name(),
            guest_port: spec.guest_port,
            kind: spec.kind,
            tls: if spec.kind.is_tls() { tls } else { None },
        }
    }
}

/// What every worker shares, read-only except for the counters.
pub struct Shared {
    pub config: Config,
    pub listeners: Vec<Listener>,
    pub resolver: Arc<Resolver>,
    pub pool: SocketPool,
    pub metrics: Arc<Metrics>,
    /// Connections open across all workers, for `max_connections`.
    pub open: AtomicUsize,
    stop: AtomicBool,
    drain_deadline: std::sync::Mutex<Option<Instant>>,
}

impl Shared {
    pub fn new(
        config: Config,
        listeners: Vec<Listener>,
        resolver: Arc<Resolver>,
        pool: SocketPool,
        metrics: Arc<Metrics>,
    ) -> Shared {
        Shared {
            config,
            listeners,
            resolver,
            pool,
            metrics,
            open: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            drain_deadline: std::sync::Mutex::new(None),
        }
    }

    /// Stop accepting; open connections get `grace` to finish before they are closed.
    pub fn begin_shutdown(&self, grace: Duration) {
        if let Ok(mut d) = self.drain_deadline.lock() {
            d.get_or_insert(Instant::now() + grace);
        }
        self.stop.store(true, Ordering::Release);
    }

    fn stopping(&self) -> Option<Instant> {
        if !self.stop.load(Ordering::Acquire) {
            return None;
        }
        self.drain_deadline.lock().ok().and_then(|d| *d)
    }
}

/// Start `sockets.len()` workers; `sockets[w][l]` is worker `w`'s socket for listener `l`.
pub fn spawn_workers(
    shared: Arc<Shared>,
    sockets: Vec<Vec<OwnedFd>>,
) -> io::Result<Vec<JoinHandle<()>>> {
    prewarm::spawn(
        shared.pool.clone(),
        &shared.resolver.snapshot(),
        shared.resolver.subscribe(),
    )?;
    let mut handles = Vec::with_capacity(sockets.len());
    for (i, listeners) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // The ring is created on its thread: it is set up for a single issuer.
        let handle = std::thread::Builder::new()
            .name(format!("fwd-worker-{i}"))
            .spawn(
                move || match worker::Worker::new(shared, listeners, worker::POOL_BUFFERS) {
                    Ok(mut worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                },
            )?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("worker thread died while starting"))??;
        handles.push(handle);
    }
    Ok(handles)
}
