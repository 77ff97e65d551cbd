//! Test support: namespaces, child processes, a running forwarder, a TLS client.
//! Everything a test creates is removed by a Drop guard, even when the test panics.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

pub use mergen_testkit::{free_port, next, poll, require_root, ChildGuard, TempDir};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

pub const FORWARDER: &str = env!("CARGO_BIN_EXE_mergen-forwarder");

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    out
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace with loopback up and one guest address on it.
pub struct Ns {
    pub name: String,
    pub ip: Ipv4Addr,
}

impl Ns {
    pub fn new() -> Ns {
        let n = next();
        let pid = std::process::id();
        // 15 characters at most, unique per process and call.
        let name = format!("dpt{}x{n}", pid % 100_000);
        let ip = Ipv4Addr::new(10, 100 + (pid % 100) as u8, (n % 250) as u8 + 1, 2);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Ns { name, ip };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        run_ok(Command::new("ip").args([
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/32", ns.ip),
            "dev",
            "lo",
        ]));
        ns
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Bind a TCP listener on the guest address inside the namespace.
    pub fn listen(&self, port: u16) -> TcpListener {
        let ip = self.ip;
        ffi_free_netns::open(&self.name)
            .expect("opening the test namespace")
            .run(move || TcpListener::bind((ip, port)))
            .expect("entering the test namespace")
            .expect("binding inside the test namespace")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        // Quiet: a test may have deleted it already, as a VM's stop does.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Echo every connection on its own thread until the listener is dropped with the test.
pub fn echo_server(listener: TcpListener) {
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut sock = sock;
                let mut buf = [0u8; 4096];
                while let Ok(n) = sock.read(&mut buf) {
                    if n == 0 || sock.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A forwarder (settings `env`) routing `echo.localhost` to an echo server in a
/// namespace, once it is routable.
pub fn echo_vm(env: &[(&str, &str)]) -> (Ns, Forwarder) {
    let ns = Ns::new();
    echo_server(ns.listen(443));
    let fwd = Forwarder::start(&[443], env);
    write_app_vm(&fwd.config_root(), &ns, "echo");
    let routed = poll(Duration::from_secs(5), || {
        try_tls_connect("echo.localhost", fwd.ports[0]).ok()
    });
    assert!(routed.is_some(), "echo VM never routable: {}", fwd.log());
    (ns, fwd)
}

/// Write `msg` and read as many bytes back.
pub fn round_trip(stream: &mut TlsStream, msg: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(msg)?;
    stream.flush()?;
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got)?;
    Ok(got)
}

/// A VM as the forwarder sees it: its directory with a meta.json.
pub fn write_vm(config_root: &Path, id: &str, created_at: &str, ns: &Ns, tags: &[(&str, &str)]) {
    let tags: serde_json::Map<String, serde_json::Value> = tags
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    let doc = serde_json::json!({
        "id": id,
        "createdAt": created_at,
        "guestIP": ns.ip.to_string(),
        "netns": ns.name,
        "tags": tags,
    });
    let meta =
        mergen_model::Meta::from_slice(doc.to_string().as_bytes()).expect("a valid meta.json");
    let dir = config_root.join(id);
    std::fs::create_dir_all(&dir).expect("creating the VM dir");
    mergen_model::atomic::write_json(&dir.join("meta.json"), &meta).expect("writing meta.json");
}

/// A VM without aliases (a fresh id) created at `created_at`, its guest in `ns`: what a
/// raw listener routes to when it is the oldest.
pub fn write_untagged_vm(config_root: &Path, ns: &Ns, created_at: &str) {
    write_vm(config_root, &vm_id(), created_at, ns, &[]);
}

/// A VM (a fresh id, one fixed creation time) tagged `app=<app>`, its guest in `ns`.
pub fn write_app_vm(config_root: &Path, ns: &Ns, app: &str) {
    write_vm(
        config_root,
        &vm_id(),
        "2025-01-01T00:00:00Z",
        ns,
        &[("app", app)],
    );
}

/// A VM tagged `app=<app>` whose meta.json sets `httpPort`, written as the original's
/// later version writes it.
pub fn write_app_vm_with_http_port(config_root: &Path, ns: &Ns, app: &str, http_port: u16) {
    let id = vm_id();
    let doc = serde_json::json!({
        "id": id,
        "createdAt": "2025-01-01T00:00:00Z",
        "guestIP": ns.ip.to_string(),
        "netns": ns.name,
        "tags": {"app": app},
        "httpPort": http_port,
    });
    let dir = config_root.join(&id);
    std::fs::create_dir_all(&dir).expect("creating the VM dir");
    mergen_model::atomic::write_json(&dir.join("meta.json"), &doc).expect("writing meta.json");
}

/// A random-looking VM id, unique per call.
pub fn vm_id() -> String {
    let n = next();
    let pid = std::process::id();
    format!(
        "{:08x}-1b2c-4d5e-8f90-{:012x}",
        pid.wrapping_mul(2_654_435_761) ^ (n << 24),
        n
    )
}

/// Host names for clients that cannot be told an address (kcat, wrk): a copy of
/// /etc/hosts with more entries, bind-mounted over /etc/hosts in a private mount
/// namespace of each command, so the host's own file is never touched.
pub struct HostsFile {
    dir: TempDir,
}

impl HostsFile {
    pub fn new(entries: &[(&str, &str)]) -> HostsFile {
        let dir = TempDir::new("hosts");
        let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        for (name, ip) in entries {
            text.push_str(&format!("\n{ip} {name}\n"));
        }
        std::fs::write(dir.join("hosts"), text).expect("writing the hosts file");
        HostsFile { dir }
    }

    /// `program` run with these names resolvable; add its arguments.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
        ])
        .arg(self.dir.join("hosts"))
        .arg(program);
        cmd
    }
}

/// nginx inside a namespace answering plain HTTP on guest_ip:`port` with `body`.
/// It runs as one process (no master), so killing its pid leaves nothing behind.
pub struct Nginx {
    _child: ChildGuard,
    dir: TempDir,
}

impl Nginx {
    pub fn start(ns: &Ns, port: u16, body: &str) -> Nginx {
        Nginx::start_with(ns, port, false, body)
    }

    /// With `proxy_protocol`, nginx expects a PROXY header on every connection and
    /// logs `<client addr>:<client port> <peer addr>` per request ([`Nginx::access_log`]).
    pub fn start_with(ns: &Ns, port: u16, proxy_protocol: bool, body: &str) -> Nginx {
        let dir = TempDir::new("nginx");
        let d = dir.path().display();
        let (listen, log) = match proxy_protocol {
            true => (
                " proxy_protocol",
                format!(
                    "log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr';\n  access_log {d}/access.log pp;"
                ),
            ),
            false => ("", "access_log off;".to_string()),
        };
        let conf = format!(
            "master_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  {log}\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen {ip}:{port}{listen};\n    location / {{ default_type text/plain; return 200 \"{body}\\n\"; }}\n  }}\n}}\n",
            ip = ns.ip
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("writing nginx.conf");
        let child = ChildGuard::spawn(
            ns.command("nginx")
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(&conf_path)
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let nginx = Nginx { _child: child, dir };
        let url = format!("http://{}:{port}/", ns.ip);
        let up = poll(Duration::from_secs(10), || {
            let mut curl = ns.command("curl");
            if proxy_protocol {
                curl.arg("--haproxy-protocol");
            }
            let out = run(curl.args(["-s", "--max-time", "1", &url]));
            out.status.success().then_some(())
        });
        assert!(up.is_some(), "nginx in {} did not come up", ns.name);
        nginx
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

/// `FWD_LISTENERS` targets for guest ports: the kind each implies, except that guest
/// port 22 is `raw` (the listen port is not 2022, which alone implies it).
fn targets_of(listeners: &[u16]) -> Vec<String> {
    listeners
        .iter()
        .map(|&guest| match guest {
            22 => "22/raw".to_string(),
            guest => guest.to_string(),
        })
        .collect()
}

/// A running forwarder with its own config root, certificate, ports and admin listener.
pub struct Forwarder {
    pub child: ChildGuard,
    pub dir: TempDir,
    pub admin: SocketAddr,
    /// Port of each listener, in the order given to [`Forwarder::start`].
    pub ports: Vec<u16>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Forwarder {
    /// `listeners`: guest ports; each gets a free 127.0.0.1 port and the kind the
    /// guest port implies, except that guest port 22 is `raw` (the listen port is not
    /// 2022, which alone implies it).
    pub fn start(listeners: &[u16], extra_env: &[(&str, &str)]) -> Forwarder {
        Forwarder::start_with(listeners, extra_env, |_| {})
    }

    /// Like `start`, with the open-files limit of the forwarder set to `nofile` (soft
    /// and hard) before it starts, as `ulimit -n` in the shell that runs it would.
    pub fn start_limited(listeners: &[u16], extra_env: &[(&str, &str)], nofile: u64) -> Forwarder {
        Forwarder::launch(&targets_of(listeners), extra_env, |_| {}, Some(nofile))
    }

    /// Like `start`, with `setup` given the config root before the forwarder starts
    /// (VMs written there are known at start-up, so their socket pools start cold).
    pub fn start_with(
        listeners: &[u16],
        extra_env: &[(&str, &str)],
        setup: impl FnOnce(&Path),
    ) -> Forwarder {
        Forwarder::launch(&targets_of(listeners), extra_env, setup, None)
    }

    /// `targets`: what follows `=` in `FWD_LISTENERS` (`443`, `8080/https+proxy-v2`);
    /// each gets a free 127.0.0.1 port.
    pub fn start_targets(
        targets: &[&str],
        extra_env: &[(&str, &str)],
        setup: impl FnOnce(&Path),
    ) -> Forwarder {
        let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
        Forwarder::launch(&targets, extra_env, setup, None)
    }

    fn launch(
        targets: &[String],
        extra_env: &[(&str, &str)],
        setup: impl FnOnce(&Path),
        nofile: Option<u64>,
    ) -> Forwarder {
        let dir = TempDir::new("fwd");
        let vms = dir.path().join("vm.d");
        std::fs::create_dir_all(&vms).expect("creating the config root");
        setup(&vms);
        let (cert, key) = gen_cert(&dir.path().join("certs"), extra_env);
        let ports: Vec<u16> = targets.iter().map(|_| free_port()).collect();
        let spec: Vec<String> = targets
            .iter()
            .zip(&ports)
            .map(|(target, port)| format!("127.0.0.1:{port}={target}"))
            .collect();
        let admin: SocketAddr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log =
            std::fs::File::create(dir.path().join("forwarder.log")).expect("creating the log");
        // prlimit sets the limit on itself, then execs the forwarder (same pid).
        let mut cmd = match nofile {
            Some(n) => {
                let mut cmd = Command::new("prlimit");
                cmd.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(FORWARDER);
                cmd
            }
            None => Command::new(FORWARDER),
        };
        cmd.env("FWD_CONFIG_ROOT", &vms)
            .env("FWD_TLS_CERT_FILE", &cert)
            .env("FWD_TLS_KEY_FILE", &key)
            .env("FWD_LISTENERS", spec.join(","))
            .env("FWD_ALLOWED_GUEST_PORTS", "22,443,5432,6379,9092")
            .env("FWD_ADMIN_ADDR", admin.to_string())
            .env("FWD_WORKERS", "2")
            .env("FWD_LOG_LEVEL", "info")
            .env("FWD_DIAL_TIMEOUT_SECONDS", "2")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = ChildGuard::spawn(&mut cmd);
        let fwd = Forwarder {
            child,
            dir,
            admin,
            ports,
            cert,
            key,
        };
        let ready = poll(Duration::from_secs(10), || {
            http_get(fwd.admin, "/healthz")
                .ok()
                .filter(|(s, _)| *s == 200)
        });
        assert!(ready.is_some(), "forwarder not ready: {}", fwd.log());
        fwd
    }

    pub fn config_root(&self) -> PathBuf {
        self.dir.path().join("vm.d")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("forwarder.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// The value of one metric line (`name{labels}` exactly as rendered), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.try_metric(series).unwrap_or(0.0)
    }

    /// The value of one metric line; `None` when it is absent, or when the admin
    /// listener did not answer in time (a loaded machine).
    pub fn try_metric(&self, series: &str) -> Option<f64> {
        mergen_testkit::metric_value(&self.metrics(), series)
    }

    /// The value of one metric line, asked again (for up to 10 s) until the admin
    /// listener answers with it: never a 0 that only means "no answer".
    pub fn metric_answered(&self, series: &str) -> f64 {
        poll(Duration::from_secs(10), || self.try_metric(series))
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{}", self.metrics()))
    }
}

/// `mergen-forwarder gen-cert` into `dir`, honouring FWD_DOMAIN_PREFIX/SUFFIX in `env`;
/// the certificate and key files, as it printed them.
pub fn gen_cert(dir: &Path, env: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    let prefix = get("FWD_DOMAIN_PREFIX").unwrap_or("");
    let suffix = get("FWD_DOMAIN_SUFFIX").unwrap_or("localhost");
    let out = run_ok(
        Command::new(FORWARDER)
            .args(["gen-cert", "--out-dir"])
            .arg(dir)
            .args(["--prefix", prefix, "--suffix", suffix]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut files = text.lines().map(PathBuf::from);
    match (files.next(), files.next()) {
        (Some(cert), Some(key)) => (cert, key),
        _ => panic!("gen-cert printed {text:?}"),
    }
}

/// A minimal HTTP/1.0 GET returning the status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `curl -sk` through the forwarder; returns (HTTP status, body).
pub fn curl(host: &str, port: u16) -> (String, String) {
    let out = run(Command::new("curl").args([
        "-sk",
        "--max-time",
        "5",
        "-w",
        "\n%{http_code}",
        "--resolve",
        &format!("{host}:{port}:127.0.0.1"),
        &format!("https://{host}:{port}/"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Connect to 127.0.0.1:`port` with SNI `host` and finish the handshake.
pub fn tls_connect(host: &str, port: u16) -> TlsStream {
    try_tls_connect(host, port).expect("TLS handshake through the forwarder")
}

pub fn try_tls_connect(host: &str, port: u16) -> io::Result<TlsStream> {
    let mut stream = try_tls_client_unconnected(host, port)?;
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// A TCP connection to the forwarder with a TLS client that has not said anything yet.
pub fn tls_client_unconnected(host: &str, port: u16) -> TlsStream {
    try_tls_client_unconnected(host, port).expect("connecting to the forwarder")
}

/// A client configuration that trusts any certificate; it keeps session tickets, so a
/// second connection made with the same one can resume.
pub fn client_config() -> Arc<ClientConfig> {
    Arc::new(mergen_testkit::tls::accept_any_client_config())
}

fn try_tls_client_unconnected(host: &str, port: u16) -> io::Result<TlsStream> {
    tls_client_with(client_config(), host, port)
}

/// Connect and finish the handshake with `config`.
pub fn tls_connect_with(config: Arc<ClientConfig>, host: &str, port: u16) -> io::Result<TlsStream> {
    let mut stream = tls_client_with(config, host, port)?;
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

fn tls_client_with(config: Arc<ClientConfig>, host: &str, port: u16) -> io::Result<TlsStream> {
    let name = ServerName::try_from(host.to_string()).map_err(io::Error::other)?;
    let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
    let sock = TcpStream::connect(("127.0.0.1", port))?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    sock.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(StreamOwned::new(conn, sock))
}

/// The first flight of a TLS client for `host`: its ClientHello.
pub fn client_hello(host: &str) -> Vec<u8> {
    let name = ServerName::try_from(host.to_string()).expect("a name");
    let mut client = ClientConnection::new(client_config(), name).expect("a client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("a hello");
    hello
}

/// The DER of the certificate the server presented.
pub fn peer_cert(stream: &TlsStream) -> Vec<u8> {
    stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("the server sent a certificate")
}

/// The DER of the first certificate in a PEM file.
pub fn cert_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path)
        .expect("a PEM certificate")
        .to_vec()
}

/// A deterministic pseudo-random byte stream (xorshift64*), for checking bulk
/// transfers: any split of the stream into chunks yields the same bytes.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut out = 0;
        while out < buf.len() {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            let n = (8 - self.used).min(buf.len() - out);
            buf[out..out + n].copy_from_slice(&self.word[self.used..self.used + n]);
            self.used += n;
            out += n;
        }
    }
}

// ---- what a process uses, from /proc -------------------------------------------------

/// CPU time (user + system, all threads) `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat(5), so 11 and 12 after the name.
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = run_ok(Command::new("getconf").arg("CLK_TCK"));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("CLK_TCK")
    })
}

/// Resident memory of `pid` in bytes (VmRSS).
pub fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// The names of `pid`'s threads.
pub fn thread_names(pid: i32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect()
}

/// Descriptors `pid` has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Let this test process open `n` descriptors: its soft limit is raised up to its hard
/// limit (raising the hard limit needs CAP_SYS_RESOURCE, which a container may lack).
pub fn allow_open_files(n: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(u64::MAX);
    assert!(
        hard >= n,
        "this test needs {n} open files; the hard limit is {hard}"
    );
    if now.current.is_some_and(|c| c < n) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(n),
                maximum: now.maximum,
            },
        )
        .expect("raising this test's open-files limit");
    }
}

/// A TCP connection to 127.0.0.1:`port` from the address `from` (any 127/8 address).
pub fn connect_from(from: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
    rustix::net::bind(&fd, &SocketAddr::from((from, 0)))?;
    rustix::net::connect(&fd, &SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    Ok(TcpStream::from(fd))
}

/// A TLS client from the address `from` to the forwarder's `port`, handshake done.
pub fn tls_connect_from(from: Ipv4Addr, host: &str, port: u16) -> io::Result<TlsStream> {
    let name = ServerName::try_from(host.to_string()).map_err(io::Error::other)?;
    let conn = ClientConnection::new(client_config(), name).map_err(io::Error::other)?;
    let sock = connect_from(from, port)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    sock.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// Lines of the forwarder's log containing `needle`.
pub fn log_lines(fwd: &Forwarder, needle: &str) -> usize {
    fwd.log().lines().filter(|l| l.contains(needle)).count()
}
