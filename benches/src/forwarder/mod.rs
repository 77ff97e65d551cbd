//! `mergen-bench forwarder`: mergen-forwarder side by side with the TLS terminators an
//! operator would otherwise put in front of the same backend: nginx's `stream` module,
//! HAProxy in `mode tcp` and hitch, all terminating TLS at L4 with the same certificate,
//! TLS versions and session settings, two workers each (one per core), no logging.
//! Extra columns, compared with those baselines only: the forwarder at the original's
//! default log level (debug), the forwarder into the backend's namespace (the VM path),
//! and nginx as an HTTP reverse proxy (not the same job: it parses HTTP and keeps its
//! own upstream connections alive).
//!
//! Every scenario is repeated, interleaved (A B C A B C …, a different terminator first
//! in each repetition) so drifting load on this shared machine hits all alike; the
//! figures are medians with their spread. Besides throughput and latency, every
//! scenario reports the CPU time the terminator's process tree used per operation
//! (/proc utime + stime, before and after), the figure that stays put on a noisy
//! machine, and the load client's own CPU so a reader can judge whether the client
//! limited the run. See docs/benchmarks.md.

mod load;
mod report;
mod scenario;
mod servers;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::interrupt;
use crate::procfs::{self, Proc};
use crate::spawn::Server;
use crate::tlsclient;
use load::{Endpoint, Meter, Outcome};
use report::{Column, Results, Role};
use scenario::{Scenario, KEEP_ALIVE_CONNS, PARALLEL};
use servers::Kind;

/// The name the unknown-SNI flood asks for: outside every terminator's certificate and
/// outside the forwarder's domain.
const UNKNOWN_NAME: &str = "unknown.example.net";
/// Descriptors a terminator needs besides two per idle connection.
const FILES_SPARE: u64 = 1500;
const USAGE: &str = "usage: mergen-bench forwarder [--quick] [--reps N] [--duration SECS] \
[--idle N] [--bulk-mib M] [--scenarios a,b,…] [--terminators a,b,…] [--forwarder PATH] \
[--compare PATH] [--json PATH] [--svg PATH] [--markdown PATH]";

struct Options {
    reps: usize,
    duration: Duration,
    idle: usize,
    /// `--idle` was given (else it may shrink to fit the open-file limit).
    idle_set: bool,
    bulk_mib: u64,
    scenarios: Vec<Scenario>,
    terminators: Option<Vec<String>>,
    forwarder: PathBuf,
    /// Another build of the forwarder, measured as an extra column beside the first.
    compare: Option<PathBuf>,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
    markdown: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        reps: 5,
        duration: Duration::from_millis(1500),
        idle: 10_000,
        idle_set: false,
        bulk_mib: 64,
        scenarios: Scenario::ALL.to_vec(),
        terminators: None,
        forwarder: std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("mergen-forwarder"),
        compare: None,
        json: None,
        svg: None,
        markdown: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--quick" {
            o.reps = 2;
            o.duration = Duration::from_millis(300);
            o.idle = 300;
            o.bulk_mib = 8;
            continue;
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |max: f64| -> Result<f64, String> {
            match value.parse::<f64>() {
                Ok(v) if v > 0.0 && v <= max => Ok(v),
                _ => Err(format!(
                    "{flag} wants a number in (0, {max}], got {value:?}"
                )),
            }
        };
        match flag.as_str() {
            "--reps" => o.reps = number(50.0)? as usize,
            "--duration" => o.duration = Duration::from_secs_f64(number(60.0)?),
            "--idle" => {
                o.idle = number(100_000.0)? as usize;
                o.idle_set = true;
            }
            "--bulk-mib" => o.bulk_mib = number(4096.0)? as u64,
            "--scenarios" => {
                o.scenarios = value
                    .split(',')
                    .map(|k| {
                        Scenario::from_key(k.trim()).ok_or_else(|| {
                            let all: Vec<_> = Scenario::ALL.iter().map(|s| s.key()).collect();
                            format!("unknown scenario {k:?}; known: {}", all.join(", "))
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            "--terminators" => {
                o.terminators = Some(value.split(',').map(|t| t.trim().to_string()).collect())
            }
            "--forwarder" => o.forwarder = PathBuf::from(value),
            "--compare" => o.compare = Some(PathBuf::from(value)),
            "--json" => o.json = Some(PathBuf::from(value)),
            "--svg" => o.svg = Some(PathBuf::from(value)),
            "--markdown" => o.markdown = Some(PathBuf::from(value)),
            _ => return Err(USAGE.into()),
        }
    }
    if o.reps == 0 || o.idle == 0 {
        return Err("--reps and --idle must be at least 1".into());
    }
    if !o.forwarder.is_file() {
        return Err(format!(
            "{} not found: build it (cargo build --release -p mergen-dataplane) or pass --forwarder",
            o.forwarder.display()
        ));
    }
    if let Some(other) = o.compare.as_ref().filter(|p| !p.is_file()) {
        return Err(format!("--compare {}: no such file", other.display()));
    }
    Ok(o)
}

/// One column of the comparison: a terminator and how to reach it.
struct Term {
    spec: &'static Spec,
    column: Column,
    ecdsa: Endpoint,
    rsa: Option<(Endpoint, Proc)>,
    proc: Proc,
    backend_port: u16,
    /// The forwarder build it runs (forwarder columns only).
    forwarder: PathBuf,
}

const ALL_SCENARIOS: &[Scenario] = &Scenario::ALL;
const REQUEST_SCENARIOS: &[Scenario] = &[
    Scenario::KeepAlive,
    Scenario::NewConn16,
    Scenario::NewConn1,
    Scenario::Bulk1,
    Scenario::Bulk16,
];
/// Logging costs per connection and per refusal, not per byte.
const LOG_LEVEL_SCENARIOS: &[Scenario] = &[
    Scenario::KeepAlive,
    Scenario::NewConn16,
    Scenario::NewConn1,
    Scenario::UnknownName,
];

/// The column of `--compare`: the other build, set up as the main forwarder is.
const COMPARE_ID: &str = "mergen-forwarder-compare";
/// The passthrough column: a second forwarder that hands connections to the owner.
const PEER_ID: &str = "mergen-forwarder-peer";

struct Spec {
    id: &'static str,
    label: &'static str,
    role: Role,
    family: &'static str,
    kind: Kind,
    log_level: &'static str,
    scenarios: &'static [Scenario],
}

const SPECS: &[Spec] = &[
    Spec {
        id: "mergen-forwarder",
        label: "forwarder",
        role: Role::Main,
        family: "mergen",
        kind: Kind::Forwarder,
        log_level: "info",
        scenarios: ALL_SCENARIOS,
    },
    Spec {
        id: "nginx-stream",
        label: "nginx stream",
        role: Role::Main,
        family: "nginx-stream",
        kind: Kind::NginxStream,
        log_level: "",
        scenarios: ALL_SCENARIOS,
    },
    Spec {
        id: "haproxy",
        label: "HAProxy",
        role: Role::Main,
        family: "haproxy",
        kind: Kind::Haproxy,
        log_level: "",
        scenarios: ALL_SCENARIOS,
    },
    Spec {
        id: "hitch",
        label: "hitch",
        role: Role::Main,
        family: "hitch",
        kind: Kind::Hitch,
        log_level: "",
        scenarios: ALL_SCENARIOS,
    },
    Spec {
        id: "mergen-forwarder-debug",
        label: "fwd, debug log",
        role: Role::Extra,
        family: "mergen",
        kind: Kind::Forwarder,
        log_level: "debug",
        scenarios: LOG_LEVEL_SCENARIOS,
    },
    Spec {
        id: "mergen-forwarder-netns",
        label: "fwd → netns",
        role: Role::Extra,
        family: "mergen",
        // Not started: the main forwarder's second VM.
        kind: Kind::Forwarder,
        log_level: "info",
        scenarios: REQUEST_SCENARIOS,
    },
    Spec {
        id: PEER_ID,
        label: "fwd via a peer",
        role: Role::Extra,
        family: "mergen",
        // Two forwarders of a cluster; the entry's CPU is the column's (see
        // `servers::start_peers`).
        kind: Kind::Forwarder,
        log_level: "info",
        scenarios: REQUEST_SCENARIOS,
    },
    Spec {
        id: COMPARE_ID,
        label: "fwd, other build",
        role: Role::Extra,
        family: "mergen",
        kind: Kind::Forwarder,
        log_level: "info",
        scenarios: ALL_SCENARIOS,
    },
    Spec {
        id: "nginx-http",
        label: "nginx HTTP proxy",
        role: Role::Extra,
        family: "nginx-http",
        kind: Kind::NginxHttp,
        log_level: "",
        scenarios: REQUEST_SCENARIOS,
    },
];

pub fn run(args: &[String]) -> Result<(), String> {
    let mut o = parse(args)?;
    if !rustix::process::geteuid().is_root() {
        return Err("needs root (it creates a network namespace and a veth pair)".into());
    }
    interrupt::install()?;
    // A terminator holds two descriptors per idle connection (client and backend).
    let files = procfs::raise_nofile()?;
    // The forwarder also keeps an eighth of its descriptors out of its connection cap
    // (`mergen_dataplane::limits`): the count must fit that cap too, or the forwarder
    // would refuse the rest.
    let spare = FILES_SPARE.max(files / 8);
    let fit = (files.saturating_sub(spare) / 2) as usize;
    if o.idle > fit {
        if o.idle_set {
            return Err(format!(
                "--idle {} needs {} open files per terminator; the hard limit here is {files}",
                o.idle,
                o.idle * 2 + spare as usize
            ));
        }
        o.idle = fit / 500 * 500;
        println!(
            "(idle connections: {} to fit the open-file limit of {files})",
            o.idle
        );
    }
    let started_at = time::OffsetDateTime::now_utc();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = mergen_testkit::TempDir::new("bench-fwd");
    let certs = crate::certs::Certs::make(dir.path())?;
    let net = servers::Net::create()?;
    let specs: Vec<&Spec> = SPECS
        .iter()
        .filter(|s| s.id != COMPARE_ID || o.compare.is_some())
        .filter(|s| {
            // `--compare` asks for its column whatever `--terminators` lists.
            s.id == COMPARE_ID
                || o.terminators
                    .as_ref()
                    .is_none_or(|only| only.iter().any(|t| t == s.id))
        })
        .collect();
    if specs.is_empty() {
        let ids: Vec<_> = SPECS.iter().map(|s| s.id).collect();
        return Err(format!("no such terminator; known: {}", ids.join(", ")));
    }
    // One backend port per terminator (the netns column shares the forwarder's).
    let backend_ports: Vec<u16> = (0..SPECS.len() as u16).map(|i| 8001 + i).collect();
    let backend = servers::start_backend(
        dir.path(),
        &net,
        &backend_ports,
        o.bulk_mib << 20,
        o.idle,
        files,
    )?;
    servers::write_vms(dir.path(), &net)?;
    let backend_proc = backend.proc();
    let mut running: Vec<Server> = vec![backend];

    let mut terms: Vec<Term> = Vec::new();
    let mut main_forwarder: Option<(Endpoint, Proc)> = None;
    // The passthrough column's etcd, kept until the end.
    let mut clusters: Vec<servers::Peers> = Vec::new();
    let mut logs = Vec::new();
    let base = servers::Plan {
        dir: dir.path(),
        certs: &certs,
        net: &net,
        backend_port: 0,
        max_conns: o.idle,
        max_files: files,
        forwarder: &o.forwarder,
    };
    for (i, spec) in SPECS.iter().enumerate() {
        if !specs.iter().any(|s| s.id == spec.id) {
            continue;
        }
        let mut backend_port = backend_ports[i];
        let forwarder = match (spec.id, &o.compare) {
            (COMPARE_ID, Some(other)) => other.clone(),
            _ => o.forwarder.clone(),
        };
        let plan = &servers::Plan {
            forwarder: &forwarder,
            ..base.with_backend(backend_port)
        };
        let (ecdsa, rsa, proc, version) = if spec.id == PEER_ID {
            let mut peers = servers::start_peers(plan)?;
            running.append(&mut peers.servers);
            logs.append(&mut peers.logs);
            let found = (peers.entry, None, peers.entry_proc, String::new());
            clusters.push(peers);
            found
        } else if spec.id == "mergen-forwarder-netns" {
            // The main forwarder's second VM, whose backend is reached from inside the
            // namespace; started here if the main column was left out.
            backend_port = backend_ports[0];
            let (ep, proc) = match main_forwarder {
                Some(f) => f,
                None => {
                    let mut started =
                        servers::start(Kind::Forwarder, &base.with_backend(backend_port), "info")?;
                    let found = (started.ecdsa, started.proc);
                    running.append(&mut started.servers);
                    logs.push(started.log);
                    found
                }
            };
            let ep = Endpoint {
                port: ep.port,
                sni: servers::NS_HOST,
            };
            (ep, None, proc, String::new())
        } else {
            let mut started = servers::start(spec.kind, plan, spec.log_level)?;
            running.append(&mut started.servers);
            logs.push(started.log);
            let mut rsa = started.rsa;
            if spec.id == "mergen-forwarder" {
                main_forwarder = Some((started.ecdsa, started.proc));
            }
            // The forwarder takes one certificate per process: RSA is a second one.
            if spec.kind == Kind::Forwarder && spec.scenarios.contains(&Scenario::Rsa) {
                let (ep, server, log) = servers::start_forwarder_rsa(plan)?;
                rsa = Some((ep, server.proc()));
                running.push(server);
                logs.push(log);
            }
            (started.ecdsa, rsa, started.proc, version_of(spec.kind))
        };
        terms.push(Term {
            spec,
            backend_port,
            forwarder,
            column: Column {
                id: spec.id,
                label: spec.label,
                role: spec.role,
                family: spec.family,
                version,
                tls: String::new(),
            },
            ecdsa,
            rsa,
            proc,
        });
    }
    for t in &mut terms {
        t.column.tls = servers::wait_ready(t.column.id, t.ecdsa, &mut running, &logs)?;
        if let Some((ep, _)) = t.rsa {
            let tls = servers::wait_ready(t.column.id, ep, &mut running, &logs)?;
            t.column.tls = format!("{}; RSA: {tls}", t.column.tls);
        }
    }

    println!(
        "TLS termination in front of one nginx backend in a network namespace ({} workers each); \
         {} interleaved repetitions of {:?} per load",
        servers::WORKERS,
        o.reps,
        o.duration
    );
    for t in &terms {
        println!(
            "  {:<24} {:<32} {}",
            t.column.id, t.column.version, t.column.tls
        );
    }
    let ctx = Ctx {
        o: &o,
        plan: base,
        keep: tlsclient::load_config(true),
        fresh: tlsclient::load_config(false),
        hello: tlsclient::client_hello(UNKNOWN_NAME)?,
        backend: backend_proc,
    };
    let columns = terms.iter().map(|t| t.column.clone()).collect();
    let mut results = Results::new(o.scenarios.clone(), columns, o.bulk_mib, o.idle);
    let started = Instant::now();
    for rep in 0..o.reps {
        for &s in &o.scenarios {
            for k in 0..terms.len() {
                let c = (k + rep) % terms.len();
                let t = &terms[c];
                if !t.spec.scenarios.contains(&s) {
                    continue;
                }
                let values = measure(s, t, &ctx)
                    .map_err(|e| format!("{} on {}: {e}", s.key(), t.column.id))?;
                eprintln!(
                    "[{:>4.0}s] rep {}/{} {:<18} {:<24} {} {:.1}",
                    started.elapsed().as_secs_f64(),
                    rep + 1,
                    o.reps,
                    s.key(),
                    t.column.id,
                    s.metrics()[0].name,
                    values[0]
                );
                results.add(s, c, &values);
                for server in &mut running {
                    if let Some(status) = server.exited() {
                        return Err(format!(
                            "a server exited ({status}) during {}; logs in {}",
                            s.key(),
                            dir.path().display()
                        ));
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();
    print!("{}", results.text_table());

    let about = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "started": started_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "measuring_seconds": elapsed.as_secs_f64(),
        "repetitions": o.reps,
        "duration_seconds": o.duration.as_secs_f64(),
        "idle_connections": o.idle,
        "bulk_mib": o.bulk_mib,
        "keep_alive_connections": KEEP_ALIVE_CONNS,
        "parallel": PARALLEL,
        "workers": servers::WORKERS,
        "machine": machine(),
        "loadavg_before": load_before.trim(),
        "loadavg_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "openssl": servers::version("openssl", "version"),
    });
    let subtitle = format!(
        "{} cores ({}) · {} · {} interleaved repetitions × {:?} · load average before: {}",
        machine()["cores"],
        machine()["cpu"].as_str().unwrap_or(""),
        started_at.date(),
        o.reps,
        o.duration,
        about["loadavg_before"].as_str().unwrap_or("")
    );
    if let Some(path) = &o.json {
        let text = serde_json::to_string_pretty(&results.json(about)).map_err(|e| e.to_string())?;
        write_out(path, text.as_bytes())?;
    }
    if let Some(path) = &o.svg {
        write_out(path, results.svg(&subtitle).as_bytes())?;
    }
    if let Some(path) = &o.markdown {
        write_out(path, results.markdown().as_bytes())?;
    }
    drop(running);
    drop(net);
    Ok(())
}

fn write_out(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn version_of(kind: Kind) -> String {
    match kind {
        Kind::Forwarder => "mergen-forwarder".into(),
        Kind::NginxStream | Kind::NginxHttp => servers::version("nginx", "-v"),
        Kind::Haproxy => servers::version("haproxy", "-v"),
        Kind::Hitch => servers::version("hitch", "--version"),
    }
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

struct Ctx<'a> {
    o: &'a Options,
    /// How to start a terminator afresh (the idle loads measure new processes).
    plan: servers::Plan<'a>,
    keep: std::sync::Arc<rustls::ClientConfig>,
    fresh: std::sync::Arc<rustls::ClientConfig>,
    hello: Vec<u8>,
    backend: Proc,
}

/// One run of one scenario against one terminator: its figures, in the order of
/// [`Scenario::metrics`].
fn measure(s: Scenario, t: &Term, ctx: &Ctx<'_>) -> Result<Vec<f64>, String> {
    let (ep, proc) = match s {
        Scenario::Rsa => t.rsa.ok_or("no RSA listener")?,
        _ => (t.ecdsa, t.proc),
    };
    let meter = Meter {
        server: proc,
        backend: ctx.backend,
    };
    quiesce(proc);
    let d = ctx.o.duration;
    let per_op = |cpu: Duration, ops: f64| cpu.as_secs_f64() * 1e6 / ops.max(1.0);
    let rate = |out: &Outcome| out.ops as f64 / out.window.as_secs_f64();
    Ok(match s {
        Scenario::KeepAlive => {
            let mut out = load::keep_alive(ep, KEEP_ALIVE_CONNS, d, &ctx.keep, &meter)?;
            let ops = out.ops as f64;
            vec![
                rate(&out),
                percentile(&mut out.latencies_us, 50.0),
                percentile(&mut out.latencies_us, 99.0),
                percentile(&mut out.latencies_us, 99.9),
                per_op(out.cpu_server, ops),
                per_op(out.cpu_client, ops),
                per_op(out.cpu_backend, ops),
                out.others_pct(),
                out.errors as f64,
            ]
        }
        Scenario::NewConn16 | Scenario::NewConn1 | Scenario::Rsa => {
            let parallel = if s == Scenario::NewConn1 { 1 } else { PARALLEL };
            let mut out = load::new_connections(ep, parallel, d, &ctx.fresh, &meter)?;
            let ops = out.ops as f64;
            vec![
                rate(&out),
                percentile(&mut out.latencies_us, 50.0),
                percentile(&mut out.latencies_us, 99.0),
                per_op(out.cpu_server, ops),
                per_op(out.cpu_client, ops),
                out.others_pct(),
                out.errors as f64,
            ]
        }
        Scenario::Bulk1 | Scenario::Bulk16 => {
            let streams = if s == Scenario::Bulk1 { 1 } else { PARALLEL };
            let out = load::bulk(ep, streams, servers::BULK_PATH, d, &ctx.keep, &meter)?;
            let mib = out.ops as f64 / (1u64 << 20) as f64;
            vec![
                mib / out.window.as_secs_f64(),
                per_op(out.cpu_server, mib),
                per_op(out.cpu_client, mib),
                out.socket_bytes as f64 / 1024.0 / out.socket_reads.max(1) as f64,
                out.socket_bytes as f64 / 1024.0 / out.records.max(1) as f64,
                out.others_pct(),
                out.errors as f64,
            ]
        }
        Scenario::UnknownName => {
            let out = load::unknown_name_flood(ep, PARALLEL, d, &ctx.hello, &meter)?;
            let conns = (out.ops + out.not_refused) as f64;
            vec![
                rate(&out),
                per_op(out.cpu_server, conns),
                per_op(out.cpu_client, conns),
                out.others_pct(),
                out.not_refused as f64 * 100.0 / conns.max(1.0),
            ]
        }
        Scenario::IdleHello | Scenario::IdleTls => {
            // A process that never held connections: one that has would hand the new
            // ones memory it kept from the earlier loads (allocator caches, HAProxy's
            // pools) and look cheaper than a connection is.
            let plan = servers::Plan {
                forwarder: &t.forwarder,
                ..ctx.plan.with_backend(t.backend_port)
            };
            let mut fresh = servers::start(t.spec.kind, &plan, t.spec.log_level)?;
            servers::wait_ready(
                t.column.id,
                fresh.ecdsa,
                &mut fresh.servers,
                &[fresh.log.clone()],
            )?;
            idle(s, fresh.ecdsa, fresh.proc, ctx)?
        }
    })
}

/// Bytes per idle connection: the tree's memory with `--idle` connections open minus
/// its memory before, each read once it stopped moving.
fn idle(s: Scenario, ep: Endpoint, proc: Proc, ctx: &Ctx<'_>) -> Result<Vec<f64>, String> {
    let n = ctx.o.idle;
    let before = settled_memory(proc);
    let (open, failed, after) = if s == Scenario::IdleHello {
        hold(n, ep, proc, || tlsclient::tcp_connect(ep.addr()))?
    } else {
        hold(n, ep, proc, || {
            let mut s = ep.connect(&ctx.keep)?;
            ep.get_small(&mut s, false, &mut [0u8; 4096])?;
            Ok(s)
        })?
    };
    let open = open.max(1) as f64;
    Ok(vec![
        (after.pss as f64 - before.pss as f64) / open,
        (after.rss as f64 - before.rss as f64) / open,
        failed as f64,
    ])
}

/// Open `n` connections made by `make`, wait until the server has accepted them all,
/// read its settled memory, then close them. Returns (opened, failed, memory).
fn hold<T: Send>(
    n: usize,
    ep: Endpoint,
    proc: Proc,
    make: impl Fn() -> std::io::Result<T> + Sync,
) -> Result<(usize, u64, procfs::Memory), String> {
    let (held, failed) = load::open_many(n, make)?;
    // None left waiting in the server's listen queue.
    let deadline = Instant::now() + Duration::from_secs(30);
    while procfs::accept_queue(ep.port) > 0 && Instant::now() < deadline {
        interrupt::check()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = settled_memory(proc);
    Ok((held.len(), failed, after))
}

/// The tree's memory once two readings 200 ms apart differ by less than 0.5% (at most 5 s).
fn settled_memory(proc: Proc) -> procfs::Memory {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = proc.tree_memory();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = proc.tree_memory();
        let moved = (now.pss as f64 - last.pss as f64).abs();
        if moved <= now.pss as f64 * 0.005 || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// Wait (at most 2 s) until the terminator has finished the work the previous load left
/// it (closing connections): its CPU time stands still for 100 ms.
fn quiesce(proc: Proc) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = proc.tree_cpu();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = proc.tree_cpu();
        if now == last {
            return;
        }
        last = now;
    }
}

/// The `p`th percentile (nearest rank) of `v`, in the same unit.
fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    // Less a hair, so that 99.9% of 1000 is rank 999 despite rounding.
    let rank = ((p / 100.0) * v.len() as f64 - 1e-9).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        assert_eq!(percentile(&mut v, 50.0), 500.0);
        assert_eq!(percentile(&mut v, 99.0), 990.0);
        assert_eq!(percentile(&mut v, 99.9), 999.0);
        assert_eq!(percentile(&mut [7], 99.9), 7.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }

    #[test]
    fn options() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let exe = std::env::current_exe().unwrap();
        let fwd = exe.to_str().unwrap();
        let o = parse(&args(&["--quick", "--forwarder", fwd])).unwrap();
        assert_eq!((o.reps, o.idle, o.bulk_mib), (2, 300, 8));
        let o = parse(&args(&[
            "--scenarios",
            "bulk1,idle-tls",
            "--forwarder",
            fwd,
        ]))
        .unwrap();
        assert_eq!(o.scenarios, vec![Scenario::Bulk1, Scenario::IdleTls]);
        assert!(parse(&args(&["--scenarios", "nope", "--forwarder", fwd])).is_err());
        assert!(parse(&args(&["--reps", "0", "--forwarder", fwd])).is_err());
        assert!(parse(&args(&["--forwarder", "/nonexistent"])).is_err());
    }
}
