//! The backend and the terminators in front of it, all configured here so the settings
//! they share (certificate, TLS versions, session cache and tickets, workers, timeouts,
//! no logging) can be read side by side.
//!
//! The backend is one nginx inside a network namespace the benchmark creates, joined to
//! the host by a veth pair: every terminator reaches it over the same veth hop, and the
//! forwarder also through its namespace socket pool (the path real VMs take). Each
//! terminator gets its own backend port, so their connections to the backend never
//! share a range of ephemeral ports (connections the terminator closes first linger in
//! TIME_WAIT, and the idle loads open 10,000 of them).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ffi_free_netns::links;

use super::load::Endpoint;
use crate::certs::{CertFiles, Certs};
use crate::procfs::Proc;
use crate::spawn::Server;
use crate::tlsclient;

/// The server name every terminator serves (the certificate is for `*.localhost`).
pub const HOST: &str = "bench.localhost";
/// The forwarder's VM whose backend is reached through the namespace socket pool.
pub const NS_HOST: &str = "benchns.localhost";
/// Worker processes or threads per terminator: one per core.
pub const WORKERS: usize = 2;
/// The bulk object the backend serves (`/` is the small response).
pub const BULK_PATH: &str = "/bulk";
const READY_DEADLINE: Duration = Duration::from_secs(15);
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// The TLS 1.3 cipher suites every OpenSSL terminator is given, in the forwarder's
/// order, with the server's order ruling: each negotiates AES-128-GCM with the bench's
/// client, as the forwarder does, rather than OpenSSL's default AES-256-GCM, so the
/// bulk rows compare the same cipher.
const TLS13_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

/// The benchmark's namespace and the veth pair into it.
pub struct Net {
    pub ns: String,
    host_link: String,
    pub guest_ip: Ipv4Addr,
    _handle: ffi_free_netns::Netns,
}

impl Net {
    pub fn create() -> Result<Net, String> {
        let pid = std::process::id();
        let ns = format!("mbf-{pid}");
        // A /30 that no interface on the host uses yet (other benchmarks or tests may
        // run at the same time).
        let used = crate::spawn::output(Command::new("ip").args(["-4", "-o", "addr", "show"]))
            .unwrap_or_default();
        let third = (0..250u32)
            .map(|i| ((pid + i) % 250 + 1) as u8)
            .find(|o| !used.contains(&format!("10.253.{o}.")))
            .ok_or("no free 10.253.x.0/30 network")?;
        let handle = ffi_free_netns::create(&ns).map_err(|e| e.to_string())?;
        let net = Net {
            ns,
            host_link: format!("mbfh{pid}"),
            guest_ip: Ipv4Addr::new(10, 253, third, 2),
            _handle: handle,
        };
        let peer = format!("mbfn{pid}");
        let host_ip = Ipv4Addr::new(10, 253, third, 1);
        let inside = &net._handle;
        links::create_veth(None, &net.host_link, &peer, Some(inside))
            .and_then(|()| links::add_address(None, &net.host_link, host_ip.into(), 30))
            .and_then(|()| links::set_up(None, &net.host_link))
            .and_then(|()| links::add_address(Some(inside), &peer, net.guest_ip.into(), 30))
            .and_then(|()| links::set_up(Some(inside), &peer))
            .map_err(|e| e.to_string())?;
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = links::delete_link(None, &self.host_link);
        if let Err(e) = ffi_free_netns::delete(&self.ns) {
            eprintln!("mergen-bench: removing namespace {}: {e}", self.ns);
        }
    }
}

/// The plain-HTTP backend: nginx with one worker inside the namespace, listening on one
/// port per terminator, answering `/` with a small body and `/bulk` with a file.
pub fn start_backend(
    dir: &Path,
    net: &Net,
    ports: &[u16],
    bulk_bytes: u64,
    max_conns: usize,
    max_files: u64,
) -> Result<Server, String> {
    let root = dir.join("www");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    // Sparse: nginx sends it with sendfile from the page cache.
    let bulk = std::fs::File::create(root.join("bulk")).map_err(|e| e.to_string())?;
    bulk.set_len(bulk_bytes).map_err(|e| e.to_string())?;
    let listens: String = ports
        .iter()
        .map(|p| format!("listen {}:{p} backlog=4096; ", net.guest_ip))
        .collect();
    let conf = format!(
        "worker_processes 1;\nworker_rlimit_nofile {files};\n\
         events {{ worker_connections {conns}; }}\n\
         http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 10000000; keepalive_timeout 600s;\n\
           server {{ {listens}\n\
             location = / {{ default_type text/plain; return 200 \"hello from the backend\\n\"; }}\n\
             location = /bulk {{ root {root}; default_type application/octet-stream; }} }} }}\n",
        files = max_files,
        conns = max_conns + 1024,
        root = root.display(),
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.ns, "nginx"]);
    nginx(dir, "backend", &conf, cmd)
}

/// Run nginx with `conf` (prefix, pid and error log in `dir`), in the foreground.
fn nginx(dir: &Path, name: &str, conf: &str, mut cmd: Command) -> Result<Server, String> {
    let prefix = dir.join(name);
    std::fs::create_dir_all(&prefix).map_err(|e| e.to_string())?;
    let conf = format!(
        "pid {pid};\nerror_log {err} error;\n{conf}",
        pid = dir.join(format!("{name}.pid")).display(),
        err = dir.join(format!("{name}.err")).display(),
    );
    let path = dir.join(format!("{name}.conf"));
    write(&path, conf.as_bytes())?;
    Server::start(
        cmd.arg("-p")
            .arg(&prefix)
            .arg("-e")
            .arg(dir.join(format!("{name}.err")))
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"]),
        &dir.join(format!("{name}.log")),
    )
}

/// Which terminator software an instance runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Forwarder,
    NginxStream,
    Haproxy,
    Hitch,
    NginxHttp,
}

/// Everything a terminator needs to be configured.
#[derive(Clone, Copy)]
pub struct Plan<'a> {
    pub dir: &'a Path,
    pub certs: &'a Certs,
    pub net: &'a Net,
    pub backend_port: u16,
    /// Connections each must be able to hold (the idle loads).
    pub max_conns: usize,
    /// The open-file limit the servers inherit (and must not ask to exceed).
    pub max_files: u64,
    pub forwarder: &'a Path,
}

impl Plan<'_> {
    pub fn with_backend(&self, backend_port: u16) -> Self {
        Plan {
            backend_port,
            ..*self
        }
    }
}

/// A started terminator: its endpoints and the process tree that serves them.
pub struct Started {
    pub ecdsa: Endpoint,
    /// A second listener with the RSA certificate (in the same processes, except for
    /// the forwarder, which takes one certificate per process).
    pub rsa: Option<(Endpoint, Proc)>,
    pub proc: Proc,
    pub servers: Vec<Server>,
    /// Where its errors go.
    pub log: PathBuf,
}

pub fn start(kind: Kind, plan: &Plan<'_>, log_level: &str) -> Result<Started, String> {
    let endpoint = || Endpoint {
        port: mergen_testkit::free_port(),
        sni: HOST,
    };
    let (ecdsa, rsa) = (endpoint(), endpoint());
    // Each arm: the server, its error log, whether it has the RSA listener.
    let (server, log, with_rsa) = match kind {
        Kind::Forwarder => {
            let name = format!("forwarder-{log_level}-{}", ecdsa.port);
            let main = start_forwarder(plan, &name, ecdsa.port, &plan.certs.ecdsa, log_level)?;
            (main, plan.dir.join(format!("{name}.log")), false)
        }
        Kind::NginxStream => {
            let server = |port: u16, c: &CertFiles| {
                format!(
                    "server {{ listen 127.0.0.1:{port} ssl reuseport backlog=4096; \
                     ssl_certificate {}; ssl_certificate_key {}; proxy_pass {}:{}; }}\n",
                    c.cert.display(),
                    c.key.display(),
                    plan.net.guest_ip,
                    plan.backend_port
                )
            };
            let conf = format!(
                "load_module {NGINX_STREAM_MODULE};\nworker_processes {WORKERS};\nworker_rlimit_nofile {files};\n\
                 events {{ worker_connections {conns}; }}\n\
                 stream {{ ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; ssl_session_timeout 10m;\n\
                   ssl_session_tickets on; ssl_handshake_timeout 60s; proxy_connect_timeout 5s; proxy_timeout 300s;\n\
                   ssl_conf_command Ciphersuites {TLS13_SUITES}; ssl_prefer_server_ciphers on;\n\
                   {ecdsa_server}{rsa_server}}}\n",
                files = plan.max_files,
                conns = plan.max_conns * 2 + 1024,
                ecdsa_server = server(ecdsa.port, &plan.certs.ecdsa),
                rsa_server = server(rsa.port, &plan.certs.rsa),
            );
            let name = format!("nginx-stream-{}", ecdsa.port);
            let s = nginx(plan.dir, &name, &conf, Command::new("nginx"))?;
            (s, plan.dir.join(format!("{name}.err")), true)
        }
        Kind::NginxHttp => {
            let conf = format!(
                "worker_processes {WORKERS};\nworker_rlimit_nofile {files};\n\
                 events {{ worker_connections {conns}; }}\n\
                 http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 300s;\n\
                   ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; ssl_session_timeout 10m; ssl_session_tickets on;\n\
                   ssl_conf_command Ciphersuites {TLS13_SUITES}; ssl_prefer_server_ciphers on;\n\
                   upstream be {{ server {ip}:{port}; keepalive 256; }}\n\
                   server {{ listen 127.0.0.1:{listen} ssl reuseport backlog=4096; ssl_certificate {cert}; ssl_certificate_key {key};\n\
                     location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }} }} }}\n",
                files = plan.max_files,
                conns = plan.max_conns * 2 + 1024,
                ip = plan.net.guest_ip,
                port = plan.backend_port,
                listen = ecdsa.port,
                cert = plan.certs.ecdsa.cert.display(),
                key = plan.certs.ecdsa.key.display(),
            );
            let name = format!("nginx-http-{}", ecdsa.port);
            let s = nginx(plan.dir, &name, &conf, Command::new("nginx"))?;
            (s, plan.dir.join(format!("{name}.err")), false)
        }
        Kind::Haproxy => {
            // No `log` line: HAProxy logs nothing. strict-sni refuses names the
            // certificate does not cover, as the forwarder refuses unknown VMs.
            let conf = format!(
                "global\n  nbthread {WORKERS}\n  maxconn {maxconn}\n  tune.ssl.cachesize 20000\n\
                 \x20 ssl-default-bind-ciphersuites {TLS13_SUITES}\n\
                 defaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n\
                 frontend fe\n  bind 127.0.0.1:{p1} ssl crt {c1} strict-sni ssl-min-ver TLSv1.2 backlog 4096\n\
                 \x20 bind 127.0.0.1:{p2} ssl crt {c2} strict-sni ssl-min-ver TLSv1.2 backlog 4096\n  default_backend be\n\
                 backend be\n  server s1 {ip}:{port}\n",
                maxconn = plan.max_conns + 256,
                p1 = ecdsa.port,
                p2 = rsa.port,
                c1 = plan.certs.ecdsa.combined.display(),
                c2 = plan.certs.rsa.combined.display(),
                ip = plan.net.guest_ip,
                port = plan.backend_port,
            );
            let path = plan.dir.join(format!("haproxy-{}.cfg", ecdsa.port));
            let log = plan.dir.join(format!("haproxy-{}.log", ecdsa.port));
            write(&path, conf.as_bytes())?;
            let s = Server::start(
                Command::new("haproxy").arg("-db").arg("-f").arg(&path),
                &log,
            )?;
            (s, log, true)
        }
        Kind::Hitch => {
            // hitch 1.7 in Debian has no shared session cache (built without
            // --enable-sessioncache): each worker keeps OpenSSL's own cache, and tickets.
            let frontend = |port: u16, c: &CertFiles| {
                format!(
                    "frontend = {{\n  host = \"127.0.0.1\"\n  port = \"{port}\"\n  pem-file = \"{}\"\n  sni-nomatch-abort = on\n}}\n",
                    c.combined.display()
                )
            };
            let conf = format!(
                "{f1}{f2}backend = \"[{ip}]:{port}\"\nworkers = {WORKERS}\nbacklog = 4096\n\
                 tls-protos = TLSv1.2 TLSv1.3\nciphersuites = \"{TLS13_SUITES}\"\nprefer-server-ciphers = on\n\
                 daemon = off\nlog-level = 0\nuser = \"nobody\"\ngroup = \"nogroup\"\n",
                f1 = frontend(ecdsa.port, &plan.certs.ecdsa),
                f2 = frontend(rsa.port, &plan.certs.rsa),
                ip = plan.net.guest_ip,
                port = plan.backend_port,
            );
            let path = plan.dir.join(format!("hitch-{}.conf", ecdsa.port));
            let log = plan.dir.join(format!("hitch-{}.log", ecdsa.port));
            write(&path, conf.as_bytes())?;
            let s = Server::start(Command::new("hitch").arg("--config").arg(&path), &log)?;
            (s, log, true)
        }
    };
    let proc = server.proc();
    Ok(Started {
        ecdsa,
        rsa: with_rsa.then_some((rsa, proc)),
        proc,
        servers: vec![server],
        log,
    })
}

/// The forwarder's two VMs: `bench` (the backend reached from the host, over the veth
/// like every other terminator) and `benchns` (reached from inside the namespace).
pub fn write_vms(dir: &Path, net: &Net) -> Result<PathBuf, String> {
    let root = dir.join("vm.d");
    for (id, app, netns) in [
        ("0b0c0d0e-1b2c-4d5e-8f90-a1b2c3d4e5f6", "bench", ""),
        (
            "0b0c0d0f-1b2c-4d5e-8f90-a1b2c3d4e5f6",
            "benchns",
            net.ns.as_str(),
        ),
    ] {
        write_vm(&root, id, app, netns, net.guest_ip)?;
    }
    Ok(root)
}

/// The meta.json of VM `id` answering to `app` under `root`, its guest at `guest_ip`
/// (inside `netns` when not empty).
fn write_vm(
    root: &Path,
    id: &str,
    app: &str,
    netns: &str,
    guest_ip: Ipv4Addr,
) -> Result<(), String> {
    let doc = format!(
        r#"{{"id":"{id}","createdAt":"2025-01-01T00:00:00Z","guestIP":"{guest_ip}","netns":"{netns}","tags":{{"app":"{app}"}}}}"#
    );
    let meta = mergen_model::Meta::from_slice(doc.as_bytes()).map_err(|e| e.to_string())?;
    let vm_dir = root.join(id);
    std::fs::create_dir_all(&vm_dir).map_err(|e| e.to_string())?;
    mergen_model::atomic::write_json(&vm_dir.join("meta.json"), &meta).map_err(|e| e.to_string())
}

fn start_forwarder(
    plan: &Plan<'_>,
    name: &str,
    port: u16,
    cert: &CertFiles,
    log_level: &str,
) -> Result<Server, String> {
    let listen = format!("127.0.0.1:{port}");
    start_forwarder_at(
        plan,
        name,
        &listen,
        &plan.dir.join("vm.d"),
        cert,
        log_level,
        &[],
    )
}

/// A forwarder listening on `listen` (`addr:port`) for the VMs under `config_root`.
fn start_forwarder_at(
    plan: &Plan<'_>,
    name: &str,
    listen: &str,
    config_root: &Path,
    cert: &CertFiles,
    log_level: &str,
    extra_env: &[(&str, &str)],
) -> Result<Server, String> {
    let guest = plan.backend_port;
    let mut cmd = Command::new(plan.forwarder);
    cmd.env("FWD_CONFIG_ROOT", config_root)
        .env("FWD_TLS_CERT_FILE", &cert.cert)
        .env("FWD_TLS_KEY_FILE", &cert.key)
        .env("FWD_LISTENERS", format!("{listen}={guest}"))
        .env("FWD_ALLOWED_GUEST_PORTS", guest.to_string())
        .env("FWD_ADMIN_ADDR", "")
        .env("FWD_WORKERS", WORKERS.to_string())
        .env("FWD_HANDSHAKE_TIMEOUT_SECONDS", "60")
        .env("FWD_MAX_CONNECTIONS", (plan.max_conns + 1024).to_string())
        // Every client here is 127.0.0.1, and no baseline caps connections per
        // address: the forwarder's default cap (a quarter of the total) is off.
        .env("FWD_MAX_CONNECTIONS_PER_IP", "0")
        .env("FWD_LOG_LEVEL", log_level);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    Server::start(&mut cmd, &plan.dir.join(format!("{name}.log")))
}

/// The name the owner of the passed-through VM serves.
pub const PEER_HOST: &str = "peer.localhost";

/// Two forwarders of a cluster (a real etcd on loopback holding the routes, as the
/// hosts' mergends would publish them): the entry on 127.0.0.1 has no VM and passes
/// connections for [`PEER_HOST`] through at L4, behind a PROXY v2 header, to the owner
/// on 127.0.0.2 (same port), which terminates TLS and reaches the backend over the
/// veth like every other terminator. The column measures the entry's process: the
/// cost of the extra hop.
pub struct Peers {
    pub entry: Endpoint,
    pub entry_proc: Proc,
    pub servers: Vec<Server>,
    pub logs: Vec<PathBuf>,
    _etcd: mergen_testkit::etcd::EtcdCluster,
}

pub fn start_peers(plan: &Plan<'_>) -> Result<Peers, String> {
    use mergen_cluster::{HostRecord, Keys, VmRecord};
    if Command::new("etcd").arg("--version").output().is_err() {
        return Err("the passthrough column needs etcd (Debian's etcd-server)".into());
    }
    let etcd = mergen_testkit::etcd::EtcdCluster::loopback(1);
    let prefix = format!("/mergen-bench-{}", std::process::id());
    let keys = Keys::new(&prefix);
    for (name, addr) in [("entry", "127.0.0.1"), ("owner", "127.0.0.2")] {
        let host = HostRecord {
            name: name.into(),
            addr: addr.into(),
        };
        etcd.ctl(&["put", &keys.host(name), &host.to_json()]);
    }
    let id = "0b0c0d10-1b2c-4d5e-8f90-a1b2c3d4e5f6";
    let vm = VmRecord {
        id: id.into(),
        host: "owner".into(),
        addr: "127.0.0.2".into(),
        aliases: vec!["peer".into()],
        created_at: time::OffsetDateTime::now_utc(),
    };
    etcd.ctl(&["put", &keys.vm(id), &vm.to_json()]);

    // The owner's one VM; the entry's store is empty.
    let owner_root = plan.dir.join("vm.owner");
    write_vm(&owner_root, id, "peer", "", plan.net.guest_ip)?;
    let entry_root = plan.dir.join("vm.entry");
    std::fs::create_dir_all(&entry_root).map_err(|e| e.to_string())?;

    let port = mergen_testkit::free_port();
    let endpoints = etcd.endpoints();
    let mut servers = Vec::new();
    let mut logs = Vec::new();
    for (name, addr, root) in [
        ("owner", "127.0.0.2", &owner_root),
        ("entry", "127.0.0.1", &entry_root),
    ] {
        let log_name = format!("forwarder-{name}-{port}");
        let env = [
            ("FWD_ETCD_ENDPOINTS", endpoints.as_str()),
            ("FWD_ETCD_PREFIX", prefix.as_str()),
            ("FWD_HOST_NAME", name),
        ];
        let listen = format!("{addr}:{port}");
        let cert = &plan.certs.ecdsa;
        servers.push(start_forwarder_at(
            plan, &log_name, &listen, root, cert, "info", &env,
        )?);
        logs.push(plan.dir.join(format!("{log_name}.log")));
    }
    Ok(Peers {
        entry: Endpoint {
            port,
            sni: PEER_HOST,
        },
        entry_proc: servers[1].proc(),
        servers,
        logs,
        _etcd: etcd,
    })
}

/// The forwarder with the RSA certificate: a process of its own.
pub fn start_forwarder_rsa(plan: &Plan<'_>) -> Result<(Endpoint, Server, PathBuf), String> {
    let ep = Endpoint {
        port: mergen_testkit::free_port(),
        sni: HOST,
    };
    let name = format!("forwarder-rsa-{}", ep.port);
    let s = start_forwarder(plan, &name, ep.port, &plan.certs.rsa, "info")?;
    Ok((ep, s, plan.dir.join(format!("{name}.log"))))
}

/// Wait until `ep` completes a handshake whose signature checks out and answers a
/// request; returns what the handshake negotiated.
pub fn wait_ready(
    name: &str,
    ep: Endpoint,
    servers: &mut [Server],
    logs: &[PathBuf],
) -> Result<String, String> {
    let config = tlsclient::verified_config();
    let deadline = Instant::now() + READY_DEADLINE;
    let mut buf = vec![0u8; 4096];
    loop {
        crate::interrupt::check()?;
        let attempt = ep.connect(&config).and_then(|mut s| {
            let status = ep.get_small(&mut s, false, &mut buf)?;
            if status == 200 {
                Ok(tlsclient::negotiated(&s))
            } else {
                Err(std::io::Error::other(format!("status {status}")))
            }
        });
        let exited = servers.iter_mut().find_map(|s| s.exited());
        match attempt {
            Ok(tls) => return Ok(tls),
            Err(e) if exited.is_some() || Instant::now() >= deadline => {
                let log: String = logs
                    .iter()
                    .map(|l| std::fs::read_to_string(l).unwrap_or_default())
                    .collect();
                return Err(format!(
                    "{name} on port {} never answered ({e}; exit status {exited:?}); logs:\n{log}",
                    ep.port
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The first line a program prints about its version, e.g. `nginx version: nginx/1.22.1`.
pub fn version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}
