//! `mergen-forwarder`: the TLS edge. Reads `FWD_*` settings, starts the io_uring
//! workers and waits for a signal.

#![deny(unsafe_code)]

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};

use ffi_free_netns::{Family, PoolConfig, SocketPool};
use mergen_dataplane::cluster_routes::{ClusterHealth, ClusterRoutes, RemoteRoutes};
use mergen_dataplane::config::{self, Config, ListenAddr};
use mergen_dataplane::engine::{self, ConnLog, Listener, Shared, WorkerExit};
use mergen_dataplane::limits::{self, Caps};
use mergen_dataplane::metrics::Metrics;
use mergen_dataplane::resolver::{self, Resolver};
use mergen_dataplane::{admin, tls};
use signal_hook::consts::{SIGINT, SIGTERM};

/// jemalloc, with background threads that return freed memory to the system (its
/// default 10 s decay): after a flood of connections ends, the forwarder's memory goes
/// back near where it was. glibc's malloc kept what its worker-thread arenas had held
/// (+38 MiB after 5,000 TLS connections closed, never returned) and so did mimalloc;
/// docs/architecture.md has the figures.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Ready sockets kept per namespace and address family; deeper than the pool's default
/// because a dial that finds its namespace's queue empty parks until the pool's thread
/// gets the CPU, which under load can take milliseconds (`mergen-bench forwarder`: at
/// depth 8 the p99 of new connections into a namespace doubled, at 32 it did not).
const FORWARDER_POOL_DEPTH: usize = 32;

const USAGE: &str = "\
mergen-forwarder: TLS SNI forwarder into VM network namespaces (io_uring)

usage:
  mergen-forwarder                 serve, configured by the environment below
  mergen-forwarder gen-cert --out-dir DIR [--prefix P] [--suffix S] [--days N] [--rsa]
                                   write a self-signed certificate for *.<prefix.>suffix
                                   and <prefix.>suffix to DIR/wildcard.<prefix.>suffix.crt
                                   and .key (ECDSA P-256, or RSA 2048 with --rsa; valid
                                   N days, 3650 by default; prefix and suffix default to
                                   FWD_DOMAIN_PREFIX and FWD_DOMAIN_SUFFIX)
  mergen-forwarder --help          this text
";

const SIGNALS: &str = "\
signals: SIGHUP reloads the certificate (so do changes to its files);
SIGINT/SIGTERM stop accepting and drain.
";

fn usage() -> String {
    format!(
        "{USAGE}\nenvironment (variable, default, meaning):\n{}\n{}\n{SIGNALS}",
        mergen_envtable::help_text(config::VARS),
        config::LISTENERS_HELP
    )
}

/// Why the forwarder did not start, or stopped.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Logging(String),
    #[error(transparent)]
    Kernel(#[from] engine::ProbeError),
    #[error(transparent)]
    Cert(#[from] tls::CertError),
    #[error("watching the certificate files: {0}")]
    WatchCert(#[source] io::Error),
    #[error("watching {}: {source}", path.display())]
    WatchRoutes {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: ListenAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the admin listener on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start following the cluster's routes: {0}")]
    Cluster(#[from] mergen_cluster::ClusterError),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] io::Error),
    #[error("starting workers: {0}")]
    Workers(#[source] io::Error),
    #[error("worker {0} panicked; stopped so that the supervisor restarts the forwarder")]
    WorkerPanicked(usize),
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None => serve(),
        Some("--help" | "-h" | "help") => {
            print!("{}", usage());
            Ok(())
        }
        Some("gen-cert") => gen_cert(&args[1..]),
        Some(other) => Err(Error::Usage(format!(
            "unknown argument {other:?} (see --help)"
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mergen-forwarder: {e}");
            ExitCode::FAILURE
        }
    }
}

fn gen_cert(args: &[String]) -> Result<(), Error> {
    let env = mergen_envtable::Env::from_process(config::VARS);
    let mut prefix = env.string("FWD_DOMAIN_PREFIX");
    let mut suffix = env.string("FWD_DOMAIN_SUFFIX");
    let (mut out_dir, mut what) = (None, tls::SelfSigned::default());
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| Error::Usage(format!("gen-cert: {flag} needs a value")))
        };
        match flag.as_str() {
            "--out-dir" => out_dir = Some(PathBuf::from(value()?)),
            "--prefix" => prefix = value()?,
            "--suffix" => suffix = value()?,
            "--days" => {
                let days = value()?;
                what.days = days.parse().ok().filter(|&d| d > 0).ok_or_else(|| {
                    Error::Usage(format!(
                        "gen-cert: --days takes a number of days above 0, not {days:?}"
                    ))
                })?;
            }
            "--rsa" => what.key = tls::KeyKind::Rsa2048,
            other => return Err(Error::Usage(format!("gen-cert: unknown option {other:?}"))),
        }
    }
    let dir = out_dir.ok_or_else(|| Error::Usage("gen-cert: --out-dir DIR is required".into()))?;
    let stem = tls::wildcard_file_stem(&prefix, &suffix);
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    tls::generate_self_signed_with(&prefix, &suffix, &what, &cert, &key)?;
    println!("{}\n{}", cert.display(), key.display());
    Ok(())
}

/// Fit the connection caps to the open-files limit as `raised`, saying so: a forwarder
/// started from a plain shell (`ulimit -n` 1,024) must refuse the connections it cannot
/// carry, not fail to accept them in a loop.
fn connection_caps(config: &Config, raised: std::io::Result<limits::NoFile>) -> Caps {
    let nofile = match raised {
        Ok(n) => {
            if n.now > n.before {
                log::info!(
                    "open-files limit raised from {} to {} (the hard limit)",
                    n.before,
                    n.now
                );
            }
            n.now
        }
        Err(e) => {
            let now = rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .unwrap_or(u64::MAX);
            log::warn!("cannot raise the open-files limit ({e}); it stays at {now}");
            now
        }
    };
    let (caps, lowered) = Caps::fit(
        config.max_connections,
        config.max_connections_per_ip,
        nofile,
    );
    if let Some(asked) = lowered {
        log::warn!(
            "FWD_MAX_CONNECTIONS={asked} lowered to {}: the open-files limit is {nofile} and each connection takes {} (raise the hard limit, e.g. LimitNOFILE=, to allow more)",
            caps.total,
            limits::FDS_PER_CONNECTION
        );
    }
    match caps.per_ip {
        Some(per_ip) => log::info!(
            "connection caps: {} in total, {per_ip} per client address",
            caps.total
        ),
        None => log::info!(
            "connection caps: {} in total, none per client address",
            caps.total
        ),
    }
    caps
}

/// What ends the main thread's wait.
enum Stop {
    Signal(i32),
    Worker(WorkerExit),
}

fn serve() -> Result<(), Error> {
    let config = Config::from_env()?;
    mergen_log::init("mergen-forwarder", &config.log_level, &config.log_format)
        .map_err(Error::Logging)?;
    // Without it, freed memory is returned only by threads that allocate again, and
    // workers idle after a flood do not.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        log::warn!("cannot start the allocator's background thread (memory freed after a flood stays with the process): {e}");
    }
    // Before anything else is set up: an old kernel is one clear line, not a dead worker.
    engine::probe()?;
    // Raised first, for everything below; said once start-up can no longer fail, so
    // that a start-up error stays one line.
    let nofile = limits::raise_nofile();

    // Raw listeners only: no certificate to read, none to watch.
    let store = match config.needs_certificate() {
        true => {
            let store = tls::CertStore::load(&config.tls_cert_file, &config.tls_key_file)?;
            store.watch(true).map_err(Error::WatchCert)?;
            Some(store)
        }
        false => None,
    };
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for (index, spec) in config.listeners.iter().enumerate() {
        let tls_config = match (&store, spec.kind.is_tls()) {
            (Some(store), true) => Some(tls::server_config(store, &spec.alpn)?),
            _ => None,
        };
        listeners.push(Listener::new(index, spec, tls_config));
    }
    let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(&names));

    let resolver = Resolver::watching(
        resolver::Settings {
            config_root: config.config_root.clone(),
            netns_root: config.netns_root.clone(),
            domain_prefix: config.domain_prefix.clone(),
            domain_suffix: config.domain_suffix.clone(),
        },
        config.resolver_ttl,
    )
    .map(Arc::new)
    .map_err(|source| Error::WatchRoutes {
        path: config.config_root.clone(),
        source,
    })?;

    // Other hosts' VMs, when in a cluster. Kept alive until the forwarder stops.
    let cluster = match &config.cluster {
        Some(c) => {
            let table =
                RemoteRoutes::new(&c.host_name, &config.domain_prefix, &config.domain_suffix);
            let routes = ClusterRoutes::start(&c.etcd, table)?;
            log::info!(
                host = c.host_name.as_str(),
                endpoints = c.etcd.endpoints.join(","),
                prefix = c.etcd.prefix.as_str();
                "in a cluster: following other hosts' routes in etcd"
            );
            Some(routes)
        }
        None => None,
    };

    // Every worker gets its own socket per listener; binding them all up front turns a
    // port in use into a startup error instead of a dead worker.
    let workers = config.workers.max(1);
    let mut sockets: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
    for spec in &config.listeners {
        let fds = engine::bind_listeners(spec.addr, workers).map_err(|source| Error::Listen {
            addr: spec.addr,
            source,
        })?;
        for (worker, fd) in sockets.iter_mut().zip(fds) {
            worker.push(fd);
        }
    }
    if let Some(addr) = config.admin_addr {
        let health = cluster.as_ref().map(|c| {
            Arc::new(ClusterHealth {
                routes: c.routes(),
                status: c.status(),
            })
        });
        admin::spawn_admin_with(addr, metrics.clone(), health)
            .map_err(|source| Error::Admin { addr, source })?;
    }
    let (stop_tx, stop) = mpsc::channel();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(Error::Signals)?;
    let on_signal = stop_tx.clone();
    std::thread::Builder::new()
        .name("fwd-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let _ = on_signal.send(Stop::Signal(signal));
            }
        })
        .map_err(Error::Signals)?;

    let caps = connection_caps(&config, nofile);
    for spec in &config.listeners {
        let alpn: Vec<String> = spec
            .alpn
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        log::info!(
            listener = spec.name(),
            kind = spec.kind.as_str(),
            guest_port = spec.guest_port,
            proxy_v2 = spec.proxy_v2,
            alpn = alpn.join(",");
            "listening on {spec}"
        );
    }
    log::info!(
        "forwarding {} listener(s) on {} worker(s), {} VM(s) known",
        config.listeners.len(),
        sockets.len(),
        resolver.snapshot().len()
    );
    let grace = config.shutdown_timeout;
    let conn_log = ConnLog::spawn(names).map_err(Error::Workers)?;
    let shared = Shared::new(
        config,
        caps,
        listeners,
        resolver,
        SocketPool::new(PoolConfig {
            depth: FORWARDER_POOL_DEPTH,
            // Guests are dialled on IPv4 only: ready IPv6 sockets would only hold descriptors.
            families: vec![Family::V4],
            ..PoolConfig::default()
        }),
        metrics,
        conn_log,
    );
    let shared = Arc::new(match &cluster {
        Some(c) => shared.with_remote(c.routes()),
        None => shared,
    });
    let (exit_tx, exits) = mpsc::channel();
    let workers =
        engine::spawn_workers(shared.clone(), sockets, exit_tx).map_err(Error::Workers)?;
    std::thread::Builder::new()
        .name("fwd-exits".into())
        .spawn(move || {
            for exit in exits {
                let _ = stop_tx.send(Stop::Worker(exit));
            }
        })
        .map_err(Error::Workers)?;

    let mut result = Ok(());
    match stop.recv() {
        Ok(Stop::Signal(signal)) => {
            log::info!("signal {signal}: no longer accepting, draining for up to {grace:?}");
        }
        // A worker ends on its own only by panicking: the others drain, and the
        // process exits with an error so that its supervisor starts a whole one.
        Ok(Stop::Worker(exit)) => {
            log::error!(
                "worker {} ended ({}): no longer accepting, draining for up to {grace:?}",
                exit.worker,
                if exit.panicked {
                    "panicked"
                } else {
                    "returned"
                }
            );
            result = Err(Error::WorkerPanicked(exit.worker));
        }
        Err(_) => {}
    }
    shared.begin_shutdown(grace);
    for (i, worker) in workers.into_iter().enumerate() {
        if worker.join().is_err() && result.is_ok() {
            result = Err(Error::WorkerPanicked(i));
        }
    }
    drop(cluster);
    log::info!("stopped");
    result
}
