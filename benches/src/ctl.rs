//! `mergen-bench ctl [--vms N] [--creates N] [--seconds S] [--mergend PATH]`: mergend
//! as a child process on temp roots, measured against baselines taken in the same run:
//! - create latency (p50/p99) vs one durable atomic file write (temp, fsync, rename,
//!   dir fsync): a create is several of those plus the allocation lock;
//! - `GET /v1/vms` with N VMs (default 1,000) vs reading their N meta.json files raw;
//! - healthz requests/s from 50 keep-alive clients vs a raw TCP echo server answering
//!   the same bytes on the same number of connections.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const CLIENTS: usize = 50;
const MAX_VMS: usize = 5_000;
const LIST_ROUNDS: usize = 15;
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n";

struct Options {
    vms: usize,
    creates: usize,
    seconds: u64,
    mergend: PathBuf,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        vms: 1000,
        creates: 200,
        seconds: 2,
        mergend: std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("mergend"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: &String| {
            v.parse::<usize>()
                .map_err(|_| format!("{a}: {v:?} is not a number"))
        };
        match a.as_str() {
            "--vms" => o.vms = num(val()?)?,
            "--creates" => o.creates = num(val()?)?,
            "--seconds" => o.seconds = num(val()?)? as u64,
            "--mergend" => o.mergend = val()?.into(),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.vms == 0 || o.vms > MAX_VMS || o.creates == 0 || o.creates > o.vms {
        return Err(format!("want 0 < --creates <= --vms <= {MAX_VMS}"));
    }
    if !(1..=30).contains(&o.seconds) {
        return Err("--seconds must be 1..30".into());
    }
    if !o.mergend.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --release -p mergen-ctl) or pass --mergend",
            o.mergend.display()
        ));
    }
    Ok(o)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let root = std::env::temp_dir().join(format!("mergen-bench-ctl-{}", std::process::id()));
    let _cleanup = RemoveDir(root.clone());
    for d in ["config", "data", "run", "img", "hooks.d"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::write(root.join("img/vmlinux"), b"k").map_err(|e| e.to_string())?;
    std::fs::write(root.join("img/rootfs.ext4"), b"r").map_err(|e| e.to_string())?;
    let d = Daemon::start(&o.mergend, &root)?;
    let body = format!(
        r#"{{"rootfs":"{0}/img/rootfs.ext4","kernel":"{0}/img/vmlinux","ports":[{{"guest":80,"host":0}}]}}"#,
        root.display()
    );

    // Create latency, on one keep-alive connection, interleaved with the baseline.
    let mut client = Client::connect(d.addr)?;
    let mut create = Vec::with_capacity(o.creates);
    let mut fsync = Vec::with_capacity(o.creates);
    let scratch = root.join("scratch.json");
    for _ in 0..o.creates {
        let t = Instant::now();
        let (code, resp) = client.request("POST", "/v1/vms", body.as_bytes())?;
        create.push(t.elapsed());
        if code != 201 {
            return Err(format!(
                "create answered {code}: {}",
                String::from_utf8_lossy(&resp)
            ));
        }
        let t = Instant::now();
        mergen_model::atomic::write_file(&scratch, &[b'x'; 1200], 0o644)
            .map_err(|e| e.to_string())?;
        fsync.push(t.elapsed());
    }
    for _ in o.creates..o.vms {
        let (code, _) = client.request("POST", "/v1/vms", body.as_bytes())?;
        if code != 201 {
            return Err(format!("create answered {code}"));
        }
    }

    // GET /v1/vms with every VM, vs reading their meta.json files.
    let mut list = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..LIST_ROUNDS {
        let t = Instant::now();
        let (code, resp) = client.request("GET", "/v1/vms", b"")?;
        list.push(t.elapsed());
        if code != 200 {
            return Err(format!("list answered {code}"));
        }
        let items = String::from_utf8_lossy(&resp)
            .matches("\"createdAt\"")
            .count();
        if items != o.vms {
            return Err(format!("list returned {items} VMs, want {}", o.vms));
        }
        let t = Instant::now();
        let n = read_metas(&root.join("config"))?;
        raw.push(t.elapsed());
        if n != o.vms {
            return Err(format!("found {n} meta.json files, want {}", o.vms));
        }
    }

    // healthz throughput vs a raw echo server.
    let limit = Duration::from_secs(o.seconds);
    let echo = EchoServer::start()?;
    let echo_rps = hammer(echo.addr, limit, HEALTHZ.len())?;
    let healthz_rps = hammer(d.addr, limit, 0)?;

    let (c50, c99) = (pct(&mut create, 50), pct(&mut create, 99));
    let (f50, f99) = (pct(&mut fsync, 50), pct(&mut fsync, 99));
    let (l50, l99) = (pct(&mut list, 50), pct(&mut list, 99));
    let (r50, _) = (pct(&mut raw, 50), pct(&mut raw, 99));
    println!(
        "mergend control plane ({} VMs, {} timed creates, {CLIENTS} clients x {}s)",
        o.vms, o.creates, o.seconds
    );
    println!(
        "{:<34} {:>12} {:>12} {:>16}",
        "measure", "p50", "p99", "ratio (p50)"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>16}",
        "create (POST /v1/vms)",
        ms(c50),
        ms(c99),
        format!("{:.1}x fsync", ratio(c50, f50))
    );
    println!(
        "{:<34} {:>12} {:>12} {:>16}",
        "baseline: atomic durable write",
        ms(f50),
        ms(f99),
        "1.0x"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>16}",
        format!("GET /v1/vms ({} VMs)", o.vms),
        ms(l50),
        ms(l99),
        format!("{:.1}x raw read", ratio(l50, r50))
    );
    println!(
        "{:<34} {:>12} {:>12} {:>16}",
        format!("baseline: read {} meta.json", o.vms),
        ms(r50),
        "",
        "1.0x"
    );
    println!(
        "{:<34} {:>12.0} req/s {:>16}",
        "healthz, keep-alive",
        healthz_rps,
        format!("{:.2}x echo", healthz_rps / echo_rps.max(1.0))
    );
    println!(
        "{:<34} {:>12.0} req/s {:>16}",
        "baseline: raw TCP echo", echo_rps, "1.0x"
    );
    Ok(())
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[((v.len() - 1) * p) / 100]
}

fn read_metas(config: &Path) -> Result<usize, String> {
    let mut n = 0;
    for e in std::fs::read_dir(config).map_err(|e| e.to_string())? {
        let p = e.map_err(|e| e.to_string())?.path().join("meta.json");
        if let Ok(b) = std::fs::read(&p) {
            n += usize::from(!b.is_empty());
        }
    }
    Ok(n)
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Daemon {
    fn start(bin: &Path, root: &Path) -> Result<Daemon, String> {
        let mut child = Command::new(bin)
            .env("MGR_HTTP_ADDR", "127.0.0.1:0")
            .env("MGR_CONFIG_ROOT", root.join("config"))
            .env("MGR_DATA_ROOT", root.join("data"))
            .env("MGR_RUN_ROOT", root.join("run"))
            .env("MGR_IMAGE_ROOTS", root.join("img"))
            .env("MGR_GLOBAL_HOOKS_DIR", root.join("hooks.d"))
            .env("MGR_PORT_END", "65535")
            .env("MGR_GUEST_CIDR", "10.200.0.0/16")
            .env("MGR_LOG_FORMAT", "json")
            .env("MGR_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        // mergend logs to stdout, as the original.
        let stderr = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        // Keep draining the log so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if line.contains("\"mergend listening\"") {
                    if let Some(a) = line
                        .split("\"addr\":\"")
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                    {
                        let _ = tx.send(a.to_string());
                    }
                }
            }
        });
        let mut d = Daemon {
            child,
            addr: "127.0.0.1:0".parse().map_err(|_| "addr")?,
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "mergend did not report its address".to_string())?;
        d.addr = addr.parse().map_err(|_| format!("bad address {addr:?}"))?;
        Ok(d)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal keep-alive HTTP/1.1 client for Content-Length responses.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Result<Client, String> {
        let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(Client { s, buf: Vec::new() })
    }

    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.s.write_all(&req).map_err(|e| e.to_string())?;
        self.response().map_err(|e| e.to_string())
    }

    fn response(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let bad = || io::Error::other("bad response");
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let code: u16 = head
            .get(9..12)
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(bad)?;
        while self.buf.len() < head_end + len {
            self.fill()?;
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        Ok((code, body))
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("connection closed"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// `CLIENTS` connections each sending healthz requests back to back for `limit`;
/// `echo_len` > 0 means the peer echoes that many bytes instead of answering HTTP.
fn hammer(addr: SocketAddr, limit: Duration, echo_len: usize) -> Result<f64, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || -> Result<u64, String> {
                let mut c = Client::connect(addr)?;
                let mut n = 0u64;
                let mut echo = vec![0u8; echo_len];
                while !stop.load(Ordering::Relaxed) {
                    c.s.write_all(HEALTHZ).map_err(|e| e.to_string())?;
                    if echo_len > 0 {
                        c.s.read_exact(&mut echo).map_err(|e| e.to_string())?;
                    } else {
                        let (code, _) = c.response().map_err(|e| e.to_string())?;
                        if code != 200 {
                            return Err(format!("healthz answered {code}"));
                        }
                    }
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    std::thread::sleep(limit);
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let mut total = 0;
    for w in workers {
        total += w.join().map_err(|_| "client thread panicked")??;
    }
    Ok(total as f64 / elapsed)
}

/// Thread-per-connection echo server: the floor for a request/response over loopback.
struct EchoServer {
    addr: SocketAddr,
}

impl EchoServer {
    fn start() -> Result<EchoServer, String> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            for s in l.incoming().take(CLIENTS) {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(EchoServer { addr })
    }
}
