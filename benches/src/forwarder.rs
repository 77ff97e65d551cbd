//! `mergen-bench forwarder [--duration SECS] [--connections N] [--forwarder PATH]`:
//! the forwarder as a TLS terminator against nginx and HAProxy, all on 127.0.0.1 in
//! front of one plain-HTTP nginx backend, measured in one run.
//!
//! Two loads, each from `N` client threads (rustls, session resumption off):
//! - keep-alive: one TLS connection per thread, requests one after another;
//! - new connection: TCP connect + full handshake + one request per iteration.
//!
//! Terminators: mergen-forwarder (L4, io_uring), HAProxy (`mode tcp`, L4) and nginx (an
//! HTTP reverse proxy with upstream keep-alive; nginx-light has no stream module). Each
//! gets two workers/threads. Figures are printed as ratios against nginx because this
//! machine is shared and noisy; the load generator runs on the same cores.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

const HOST: &str = "bench.localhost";
/// The VM whose backend runs inside a network namespace (root only).
const NS_HOST: &str = "benchns.localhost";
const WORKERS: usize = 2;
const MAX_DURATION: u64 = 60;
const MAX_CONNECTIONS: usize = 256;
const READY_DEADLINE: Duration = Duration::from_secs(10);

struct Options {
    duration: Duration,
    connections: usize,
    forwarder: PathBuf,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let opts = parse(args)?;
    let dir = TempDir::new()?;
    let d = dir.0.clone();
    let cert_out = run_checked(
        Command::new(&opts.forwarder)
            .args(["gen-cert", "--out-dir"])
            .arg(d.join("certs")),
    )?;
    let mut files = cert_out.lines().map(PathBuf::from);
    let (cert, key) = match (files.next(), files.next()) {
        (Some(c), Some(k)) => (c, k),
        _ => return Err(format!("gen-cert printed {cert_out:?}")),
    };

    let backend_port = free_port()?;
    let _backend = start_backend(&d, backend_port, None)?;
    // The same backend inside a namespace, reached the way VMs are: through the
    // forwarder's namespace socket pool.
    let ns = if rustix::process::geteuid().is_root() {
        let ns = BenchNs::create()?;
        let backend = start_backend(&d, backend_port, Some(&ns))?;
        Some((ns, backend))
    } else {
        println!("(not root: skipping the namespace backend)");
        None
    };
    let forwarder = start_forwarder(
        &d,
        &opts.forwarder,
        backend_port,
        &cert,
        &key,
        ns.as_ref().map(|(ns, _)| ns),
    )?;
    let fwd_port = forwarder.port;
    let mut targets = vec![
        ("tls-nginx", start_nginx(&d, backend_port, &cert, &key)?),
        ("haproxy", start_haproxy(&d, backend_port, &cert, &key)?),
        ("mergen-forwarder", forwarder),
    ];
    if ns.is_some() {
        targets.push((
            "mergen-fwd→netns",
            Server {
                port: fwd_port,
                host: NS_HOST,
                _child: None,
            },
        ));
    }
    for (name, t) in &targets {
        wait_ready(name, t).map_err(|e| {
            let log = std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default();
            format!("{e}\n{log}")
        })?;
    }

    println!(
        "TLS termination in front of nginx on 127.0.0.1 ({} workers each), {} client threads, {:?} per run",
        WORKERS, opts.connections, opts.duration
    );
    if ns.is_some() {
        println!(
            "mergen-fwd→netns: the forwarder to the same backend run inside a network namespace"
        );
    }
    println!(
        "{:<14} {:<17} {:>10} {:>9} {:>9} {:>11} {:>11} {:>11}",
        "load", "terminator", "req/s", "p50 us", "p99 us", "req/s÷nginx", "p50÷nginx", "p99÷nginx"
    );
    for (load, new_conn) in [("keep-alive", false), ("new-conn", true)] {
        let mut results = Vec::new();
        for (name, t) in &targets {
            let mut stats = drive(t, opts.connections, opts.duration, new_conn)?;
            results.push((
                name,
                stats.rps(opts.duration),
                stats.percentile(50),
                stats.percentile(99),
                stats.errors,
            ));
        }
        let (_, base_rps, base_p50, base_p99, _) = results[0];
        for (name, rps, p50, p99, errors) in results {
            println!(
                "{:<14} {:<17} {:>10.0} {:>9} {:>9} {:>11.2} {:>11.2} {:>11.2}{}",
                load,
                name,
                rps,
                p50,
                p99,
                rps / base_rps.max(1.0),
                p50 as f64 / base_p50.max(1) as f64,
                p99 as f64 / base_p99.max(1) as f64,
                if errors > 0 {
                    format!("  ({errors} errors)")
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

fn parse(args: &[String]) -> Result<Options, String> {
    let usage =
        "usage: mergen-bench forwarder [--duration SECS] [--connections N] [--forwarder PATH]";
    let mut opts = Options {
        duration: Duration::from_secs(3),
        connections: 16,
        forwarder: std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("mergen-forwarder"),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(usage)?;
        match flag.as_str() {
            "--duration" => match value.parse::<u64>() {
                Ok(s) if (1..=MAX_DURATION).contains(&s) => opts.duration = Duration::from_secs(s),
                _ => return Err(format!("--duration must be 1..={MAX_DURATION} seconds")),
            },
            "--connections" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_CONNECTIONS).contains(&n) => opts.connections = n,
                _ => return Err(format!("--connections must be 1..={MAX_CONNECTIONS}")),
            },
            "--forwarder" => opts.forwarder = PathBuf::from(value),
            _ => return Err(usage.into()),
        }
    }
    if !opts.forwarder.is_file() {
        return Err(format!(
            "{} not found: build it (cargo build --release -p mergen-dataplane) or pass --forwarder",
            opts.forwarder.display()
        ));
    }
    Ok(opts)
}

// ---- servers -------------------------------------------------------------------------

struct Server {
    port: u16,
    /// The server name clients ask for.
    host: &'static str,
    /// `None` for a second route through a server listed before.
    _child: Option<ChildGuard>,
}

/// A namespace with the benchmark's guest address on its loopback, deleted on drop.
struct BenchNs {
    name: String,
    ip: &'static str,
}

impl BenchNs {
    fn create() -> Result<BenchNs, String> {
        let name = format!("mbf-{}", std::process::id());
        ffi_free_netns::create(&name).map_err(|e| e.to_string())?;
        let ns = BenchNs {
            name,
            ip: "10.251.0.2",
        };
        run_checked(Command::new("ip").args([
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/32", ns.ip),
            "dev",
            "lo",
        ]))?;
        Ok(ns)
    }
}

impl Drop for BenchNs {
    fn drop(&mut self) {
        let _ = ffi_free_netns::delete(&self.name);
    }
}

fn start_backend(d: &Path, port: u16, ns: Option<&BenchNs>) -> Result<ChildGuard, String> {
    let (name, ip) = match ns {
        Some(ns) => ("backend-ns", ns.ip),
        None => ("backend", "127.0.0.1"),
    };
    let conf = format!(
        "worker_processes 1;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 10000000;\n\
           server {{ listen {ip}:{port}; location / {{ default_type text/plain; return 200 \"hello from the backend\\n\"; }} }} }}\n",
        d = d.display()
    );
    spawn_nginx(d, name, &conf, ns)
}

fn spawn_nginx(
    d: &Path,
    name: &str,
    conf: &str,
    ns: Option<&BenchNs>,
) -> Result<ChildGuard, String> {
    let path = d.join(format!("{name}.conf"));
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(d.join(name)).map_err(|e| e.to_string())?;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, "nginx"]);
            c
        }
        None => Command::new("nginx"),
    };
    ChildGuard::spawn(
        cmd.arg("-p")
            .arg(d.join(name))
            .arg("-e")
            .arg(d.join(format!("{name}.err")))
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"]),
        &d.join(format!("{name}.log")),
    )
}

fn start_nginx(d: &Path, backend: u16, cert: &Path, key: &Path) -> Result<Server, String> {
    let port = free_port()?;
    let conf = format!(
        "worker_processes {WORKERS};\npid {d}/tls-nginx.pid;\nerror_log {d}/tls-nginx.err;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 10000000;\n\
           upstream be {{ server 127.0.0.1:{backend}; keepalive 256; }}\n\
           server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};\n\
             ssl_protocols TLSv1.2 TLSv1.3; ssl_session_tickets off;\n\
             location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
        d = d.display(),
        cert = cert.display(),
        key = key.display()
    );
    Ok(Server {
        port,
        host: HOST,
        _child: Some(spawn_nginx(d, "tls-nginx", &conf, None)?),
    })
}

fn start_haproxy(d: &Path, backend: u16, cert: &Path, key: &Path) -> Result<Server, String> {
    let port = free_port()?;
    let mut pem = std::fs::read(cert).map_err(|e| e.to_string())?;
    pem.extend(std::fs::read(key).map_err(|e| e.to_string())?);
    let pem_path = d.join("haproxy.pem");
    std::fs::write(&pem_path, pem).map_err(|e| e.to_string())?;
    let conf = format!(
        "global\n  nbthread {WORKERS}\n  maxconn 4000\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend fe\n  bind 127.0.0.1:{port} ssl crt {pem}\n  default_backend be\n\
         backend be\n  server s1 127.0.0.1:{backend}\n",
        pem = pem_path.display()
    );
    let path = d.join("haproxy.cfg");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let child = ChildGuard::spawn(
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
        &d.join("haproxy.log"),
    )?;
    Ok(Server {
        port,
        host: HOST,
        _child: Some(child),
    })
}

fn start_forwarder(
    d: &Path,
    bin: &Path,
    backend: u16,
    cert: &Path,
    key: &Path,
    ns: Option<&BenchNs>,
) -> Result<Server, String> {
    let port = free_port()?;
    // A VM without a namespace (the forwarder dials the backend on the host) and, as
    // root, one whose backend runs in a namespace.
    write_vm(
        d,
        "0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6",
        "bench",
        "127.0.0.1",
        "",
    )?;
    if let Some(ns) = ns {
        write_vm(
            d,
            "0b0c0d0f-1b2c-4d5e-8f90-a1b2c3d4e5f6",
            "benchns",
            ns.ip,
            &ns.name,
        )?;
    }
    let child = ChildGuard::spawn(
        Command::new(bin)
            .env("FWD_CONFIG_ROOT", d.join("vm.d"))
            .env("FWD_TLS_CERT_FILE", cert)
            .env("FWD_TLS_KEY_FILE", key)
            .env("FWD_LISTENERS", format!("127.0.0.1:{port}={backend}"))
            .env("FWD_ALLOWED_GUEST_PORTS", backend.to_string())
            .env("FWD_ADMIN_ADDR", "")
            .env("FWD_WORKERS", WORKERS.to_string())
            .env("FWD_LOG_LEVEL", "error"),
        &d.join("mergen-forwarder.log"),
    )?;
    Ok(Server {
        port,
        host: HOST,
        _child: Some(child),
    })
}

fn write_vm(d: &Path, id: &str, app: &str, ip: &str, netns: &str) -> Result<(), String> {
    let doc = format!(
        r#"{{"id":"{id}","createdAt":"2025-01-01T00:00:00Z","guestIP":"{ip}","netns":"{netns}","tags":{{"app":"{app}"}}}}"#
    );
    let meta = mergen_model::Meta::from_slice(doc.as_bytes()).map_err(|e| e.to_string())?;
    let vm_dir = d.join("vm.d").join(id);
    std::fs::create_dir_all(&vm_dir).map_err(|e| e.to_string())?;
    mergen_model::atomic::write_json(&vm_dir.join("meta.json"), &meta).map_err(|e| e.to_string())
}

fn wait_ready(name: &str, server: &Server) -> Result<(), String> {
    let client = client_config(false);
    let deadline = Instant::now() + READY_DEADLINE;
    let port = server.port;
    loop {
        let attempt = connect(&client, port, server.host)
            .and_then(|mut s| request(&mut s, server.host, false));
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("{name} on port {port} never answered: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---- load ----------------------------------------------------------------------------

#[derive(Default)]
struct Stats {
    /// Request latencies in microseconds.
    latencies: Vec<u64>,
    errors: u64,
}

impl Stats {
    fn rps(&self, d: Duration) -> f64 {
        self.latencies.len() as f64 / d.as_secs_f64()
    }

    fn percentile(&mut self, p: usize) -> u64 {
        self.latencies.sort_unstable();
        let rank = (self.latencies.len() * p / 100).min(self.latencies.len().saturating_sub(1));
        self.latencies.get(rank).copied().unwrap_or(0)
    }
}

fn drive(
    server: &Server,
    threads: usize,
    duration: Duration,
    new_conn: bool,
) -> Result<Stats, String> {
    let (port, host) = (server.port, server.host);
    let config = client_config(new_conn);
    let deadline = Instant::now() + duration;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let config = config.clone();
            std::thread::spawn(move || client_loop(&config, port, host, deadline, new_conn))
        })
        .collect();
    let mut total = Stats::default();
    for h in handles {
        let s = h
            .join()
            .map_err(|_| "a client thread panicked".to_string())?;
        total.latencies.extend(s.latencies);
        total.errors += s.errors;
    }
    if total.latencies.is_empty() {
        return Err(format!("no request succeeded on port {port}"));
    }
    Ok(total)
}

fn client_loop(
    config: &Arc<ClientConfig>,
    port: u16,
    host: &'static str,
    deadline: Instant,
    new_conn: bool,
) -> Stats {
    let mut stats = Stats::default();
    let mut kept: Option<StreamOwned<ClientConnection, TcpStream>> = None;
    while Instant::now() < deadline {
        let start = Instant::now();
        let result = if new_conn {
            connect(config, port, host).and_then(|mut s| request(&mut s, host, true))
        } else {
            let stream = match kept.take() {
                Some(s) => Ok(s),
                None => connect(config, port, host),
            };
            stream.and_then(|mut s| {
                request(&mut s, host, false)?;
                kept = Some(s);
                Ok(())
            })
        };
        match result {
            Ok(()) => stats.latencies.push(start.elapsed().as_micros() as u64),
            Err(_) => stats.errors += 1,
        }
    }
    stats
}

fn connect(
    config: &Arc<ClientConfig>,
    port: u16,
    host: &'static str,
) -> io::Result<StreamOwned<ClientConnection, TcpStream>> {
    let name = ServerName::try_from(host).map_err(io::Error::other)?;
    let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
    let sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(StreamOwned::new(conn, sock))
}

/// One GET and its whole response (headers, then Content-Length bytes).
fn request(
    s: &mut StreamOwned<ClientConnection, TcpStream>,
    host: &str,
    close: bool,
) -> io::Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: {connection}\r\n\r\n"
    )?;
    s.flush()?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let (head_len, body_len) = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return Err(io::Error::other("not a 200"));
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| io::Error::other("no content-length"))?;
            break (end + 4, len);
        }
    };
    while buf.len() < head_len + body_len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// The benchmark's certificate is self-signed; signatures are still checked.
fn client_config(fresh_handshakes: bool) -> Arc<ClientConfig> {
    let mut config = mergen_testkit::tls::accept_any_client_config();
    if fresh_handshakes {
        config.resumption = Resumption::disabled();
    }
    Arc::new(config)
}

// ---- plumbing ------------------------------------------------------------------------

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("picking a free port: {e}"))
}

fn run_checked(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A server process: SIGTERM on drop (nginx and HAProxy stop their workers), then SIGKILL.
struct ChildGuard(Child);

impl ChildGuard {
    /// Start `cmd` with its output in `log`.
    fn spawn(cmd: &mut Command, log: &Path) -> Result<ChildGuard, String> {
        let out =
            std::fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.spawn()
            .map(ChildGuard)
            .map_err(|e| format!("starting {cmd:?}: {e}"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        let dir = std::env::temp_dir().join(format!("mergen-bench-fwd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
