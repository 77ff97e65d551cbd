//! `mergen-forwarder`: the TLS edge. Reads `FWD_*` settings, starts the io_uring
//! workers and waits for a signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use ffi_free_netns::{Family, PoolConfig, SocketPool};
use mergen_dataplane::config::{Config, ListenerMode};
use mergen_dataplane::engine::{self, Listener, Shared};
use mergen_dataplane::metrics::Metrics;
use mergen_dataplane::resolver::Resolver;
use mergen_dataplane::{admin, tls};
use signal_hook::consts::{SIGINT, SIGTERM};

/// Ready sockets kept per namespace and address family; deeper than the pool's default
/// because a dial that finds its namespace's queue empty parks until the pool's thread
/// gets the CPU, which under load can take milliseconds (`mergen-bench forwarder`: at
/// depth 8 the p99 of new connections into a namespace doubled, at 32 it did not).
const FORWARDER_POOL_DEPTH: usize = 32;

const USAGE: &str = "\
mergen-forwarder: TLS SNI forwarder into VM network namespaces (io_uring)

usage:
  mergen-forwarder                 serve, configured by the environment below
  mergen-forwarder gen-cert --out-dir DIR [--prefix P] [--suffix S]
                                   write a self-signed wildcard.<suffix>.crt/.key
  mergen-forwarder --help          this text

environment (defaults in brackets):
  FWD_CONFIG_ROOT                  VM directories with meta.json [/etc/mergen/vm.d]
  FWD_NETNS_ROOT                   where namespace files are looked up first [/run/netns]
  FWD_TLS_CERT_FILE                PEM certificate chain [/etc/mergen/certs/wildcard.localhost.crt]
  FWD_TLS_KEY_FILE                 PEM key, RSA or ECDSA [/etc/mergen/certs/wildcard.localhost.key]
  FWD_DOMAIN_PREFIX                SNI is <label>.<prefix>.<suffix> when set []
  FWD_DOMAIN_SUFFIX                SNI suffix [localhost]
  FWD_LISTENERS                    addr=guestPort,... [:443=443,:2022=22,:5432=5432,:6379=6379,:9092=9092]
                                   (guest port 22 is raw TCP to the oldest VM, no TLS)
  FWD_ALLOWED_GUEST_PORTS          guest ports listeners may target [22,443,5432,6379,9092]
  FWD_DIAL_TIMEOUT_SECONDS         backend connect timeout [5]
  FWD_HANDSHAKE_TIMEOUT_SECONDS    ClientHello plus TLS handshake timeout [10]
  FWD_IDLE_TIMEOUT_SECONDS         close a connection idle this long [300]
  FWD_RESOLVER_CACHE_TTL_SECONDS   full rescan period of FWD_CONFIG_ROOT [5]
  FWD_SHUTDOWN_TIMEOUT_SECONDS     drain time on SIGINT/SIGTERM [15]
  FWD_MAX_CONNECTIONS              open connections before refusing [65536]
  FWD_WORKERS                      io_uring worker threads [number of CPUs]
  FWD_ADMIN_ADDR                   /healthz and /metrics; empty disables [127.0.0.1:9901]
  FWD_LOG_LEVEL                    debug|info|warn|error [debug]
  FWD_LOG_FORMAT                   console|json|text [console]

signals: SIGHUP reloads the certificate (so do changes to its files);
SIGINT/SIGTERM stop accepting and drain.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None => serve(),
        Some("--help" | "-h" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some("gen-cert") => gen_cert(&args[1..]),
        Some(other) => Err(format!("unknown argument {other:?} (see --help)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mergen-forwarder: {e}");
            ExitCode::FAILURE
        }
    }
}

fn gen_cert(args: &[String]) -> Result<(), String> {
    let (mut out_dir, mut prefix, mut suffix) = (None, String::new(), "localhost".to_string());
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--out-dir" => out_dir = Some(PathBuf::from(value()?)),
            "--prefix" => prefix = value()?,
            "--suffix" => suffix = value()?,
            other => return Err(format!("gen-cert: unknown option {other:?}")),
        }
    }
    let dir = out_dir.ok_or("gen-cert: --out-dir DIR is required")?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let base = format!("wildcard.{}", suffix.trim().trim_matches('.'));
    let cert = dir.join(format!("{base}.crt"));
    let key = dir.join(format!("{base}.key"));
    tls::generate_self_signed(&prefix, &suffix, &cert, &key)?;
    println!("{}\n{}", cert.display(), key.display());
    Ok(())
}

fn serve() -> Result<(), String> {
    let config = Config::from_env()?;
    mergen_log::init("mergen-forwarder", &config.log_level, &config.log_format)?;

    let store = tls::CertStore::load(&config.tls_cert_file, &config.tls_key_file)?;
    store
        .watch(true)
        .map_err(|e| format!("watching the certificate files: {e}"))?;
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for spec in &config.listeners {
        let tls_config = match &spec.mode {
            ListenerMode::Tls { alpn, .. } => Some(tls::server_config(&store, alpn)?),
            ListenerMode::Raw => None,
        };
        listeners.push(Listener::new(spec, tls_config));
    }
    let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    let metrics = Arc::new(Metrics::new(&names));

    let resolver = Arc::new(Resolver::new(
        config.config_root.clone(),
        config.domain_prefix.clone(),
        config.domain_suffix.clone(),
    ));
    resolver
        .start_watching(config.resolver_ttl)
        .map_err(|e| format!("watching {}: {e}", config.config_root.display()))?;

    // Every worker gets its own socket per listener; binding them all up front turns a
    // port in use into a startup error instead of a dead worker.
    let workers = config.workers.max(1);
    let mut sockets: Vec<Vec<_>> = (0..workers).map(|_| Vec::new()).collect();
    for spec in &config.listeners {
        let fds = engine::bind_listeners(spec.addr, workers)
            .map_err(|e| format!("cannot listen on {}: {e}", spec.addr))?;
        for (worker, fd) in sockets.iter_mut().zip(fds) {
            worker.push(fd);
        }
    }
    if let Some(addr) = config.admin_addr {
        admin::spawn_admin(addr, metrics.clone())
            .map_err(|e| format!("cannot start the admin listener on {addr}: {e}"))?;
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("installing signal handlers: {e}"))?;

    log::info!(
        "forwarding {} listener(s) on {} worker(s), {} VM(s) known",
        config.listeners.len(),
        sockets.len(),
        resolver.snapshot().len()
    );
    let grace = config.shutdown_timeout;
    let shared = Arc::new(Shared::new(
        config,
        listeners,
        resolver,
        SocketPool::new(PoolConfig {
            depth: FORWARDER_POOL_DEPTH,
            // Guests are dialled on IPv4 only: ready IPv6 sockets would only hold descriptors.
            families: vec![Family::V4],
            ..PoolConfig::default()
        }),
        metrics,
    ));
    let workers = engine::spawn_workers(shared.clone(), sockets)
        .map_err(|e| format!("starting workers: {e}"))?;

    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: no longer accepting, draining for up to {grace:?}");
    }
    shared.begin_shutdown(grace);
    for worker in workers {
        if worker.join().is_err() {
            return Err("a worker thread panicked".into());
        }
    }
    log::info!("stopped");
    Ok(())
}
