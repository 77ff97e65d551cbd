//! The data path: thread-per-core io_uring workers.
//!
//! Each worker owns one ring and one SO_REUSEPORT listening socket per listener, so the
//! kernel spreads new connections across workers and a connection never leaves the
//! worker that accepted it. No locks on the data path: routes come from an immutable
//! resolver snapshot, certificates from rustls' resolver.
//!
//! A worker ([`worker`]) is the I/O shell around connections that do no I/O
//! themselves ([`conn`], see its `LIFECYCLE.md`): it turns ring completions into
//! events for a connection and the operations a connection asks for into ring
//! submissions.

mod admit;
mod buffers;
mod conn;
mod connlog;
mod dial;
mod listen;
mod prewarm;
// The only unsafe code of the workspace: the kernel shares memory with us here.
#[allow(unsafe_code)]
mod ring;
mod tcp;
mod worker;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ffi_free_netns::SocketPool;

use crate::cluster_routes::{RemoteRoutes, Routing};
use crate::config::{Config, ListenerKind, ListenerSpec};
use crate::limits::Caps;
use crate::metrics::Metrics;
use crate::resolver::{Resolver, Route};

pub use admit::Admission;
pub use conn::Timeouts;
pub use connlog::ConnLog;
pub use dial::DialError;
pub use listen::bind_listeners;
pub use ring::{probe, ProbeError};

/// One configured listener as the workers see it.
pub struct Listener {
    pub name: String,
    /// Its place in the configured list (and in the metrics).
    pub index: usize,
    /// The port it listens on: other hosts' forwarders listen on it too, and a
    /// connection passed through to one of them goes there.
    pub port: u16,
    pub guest_port: u16,
    pub kind: ListenerKind,
    /// Send the guest a PROXY protocol v2 header before the client's bytes.
    pub proxy_v2: bool,
    /// `None` for raw listeners.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Listener {
    pub fn new(
        index: usize,
        spec: &ListenerSpec,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Listener {
        Listener {
            name: spec.name(),
            index,
            port: spec.addr.port(),
            guest_port: spec.guest_port,
            kind: spec.kind,
            proxy_v2: spec.proxy_v2,
            tls: if spec.kind.is_tls() { tls } else { None },
        }
    }

    /// The guest port its connections to `route`'s VM go to: an `https` listener
    /// follows the VM's `httpPort` (the later original), every other its own.
    pub fn guest_port_for(&self, route: &Route) -> u16 {
        match (self.kind, route.http_port) {
            (ListenerKind::Https, Some(port)) => port,
            _ => self.guest_port,
        }
    }
}

impl conn::Routes for Routing {
    fn by_sni(&self, name: &str) -> Option<Arc<Route>> {
        self.local.snapshot().resolve_sni(name)
    }

    fn remote(&self, name: &str) -> Option<Arc<Route>> {
        self.remote.as_ref()?.by_sni(name)
    }

    fn peer(&self, ip: std::net::IpAddr) -> bool {
        self.is_peer(ip)
    }

    fn oldest(&self) -> Option<Arc<Route>> {
        self.local.snapshot().first()
    }
}

/// What every worker shares, read-only except for the counters.
pub struct Shared {
    pub config: Config,
    pub timeouts: Timeouts,
    pub listeners: Vec<Listener>,
    pub resolver: Arc<Resolver>,
    /// The resolver's routes, and other hosts' when in a cluster.
    pub routing: Routing,
    pub pool: SocketPool,
    pub metrics: Arc<Metrics>,
    pub log: ConnLog,
    /// The connection caps, and the connections open across all workers.
    pub admission: Admission,
    stop: AtomicBool,
    drain_deadline: std::sync::Mutex<Option<Instant>>,
}

impl Shared {
    /// `caps`: the connection caps in force (`config`'s, fitted to the open-files
    /// limit by [`Caps::fit`]).
    pub fn new(
        config: Config,
        caps: Caps,
        listeners: Vec<Listener>,
        resolver: Arc<Resolver>,
        pool: SocketPool,
        metrics: Arc<Metrics>,
        log: ConnLog,
    ) -> Shared {
        metrics.set_limits(caps.total, caps.per_ip);
        Shared {
            timeouts: Timeouts {
                dial: config.dial_timeout,
                handshake: config.handshake_timeout,
                idle: config.idle_timeout,
            },
            config,
            listeners,
            routing: Routing::new(Arc::clone(&resolver), None),
            resolver,
            pool,
            metrics,
            log,
            admission: Admission::new(caps),
            stop: AtomicBool::new(false),
            drain_deadline: std::sync::Mutex::new(None),
        }
    }

    /// Route names no local VM answers to through `remote` (a cluster's other hosts).
    pub fn with_remote(mut self, remote: Arc<RemoteRoutes>) -> Shared {
        self.routing = Routing::new(Arc::clone(&self.resolver), Some(remote));
        self
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

/// Why a worker thread ended.
#[derive(Debug)]
pub struct WorkerExit {
    pub worker: usize,
    /// It panicked (it unwound: its connections and ring were dropped cleanly).
    pub panicked: bool,
}

/// Start `sockets.len()` workers; `sockets[w][l]` is worker `w`'s socket for listener
/// `l`. Each worker reports its end on `exits`, also when it panics.
pub fn spawn_workers(
    shared: Arc<Shared>,
    sockets: Vec<Vec<OwnedFd>>,
    exits: std::sync::mpsc::Sender<WorkerExit>,
) -> io::Result<Vec<JoinHandle<()>>> {
    prewarm::spawn(
        shared.pool.clone(),
        &shared.resolver.snapshot(),
        shared.resolver.subscribe(),
    )?;
    let mut handles = Vec::with_capacity(sockets.len());
    for (i, listeners) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        let exits = exits.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // The ring is created on its thread: it is set up for a single issuer.
        let handle = std::thread::Builder::new()
            .name(format!("fwd-worker-{i}"))
            .spawn(move || {
                let _report = ReportExit { worker: i, exits };
                match worker::Worker::new(i, shared, listeners, worker::POOL_BUFFERS) {
                    Ok(mut worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("worker thread died while starting"))??;
        handles.push(handle);
    }
    Ok(handles)
}

/// Tells the main thread that a worker ended, however it ended.
struct ReportExit {
    worker: usize,
    exits: std::sync::mpsc::Sender<WorkerExit>,
}

impl Drop for ReportExit {
    fn drop(&mut self) {
        let _ = self.exits.send(WorkerExit {
            worker: self.worker,
            panicked: std::thread::panicking(),
        });
    }
}
