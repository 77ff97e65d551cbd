//! The real `mergen-forwarder` of this build in front of a test mergend's VMs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mergen_testkit::{free_port, ChildGuard};

/// The forwarder binary of this build (cargo builds every workspace binary before
/// it runs the tests of `cargo test --workspace`).
pub fn bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("mergen-forwarder");
    assert!(
        bin.is_file(),
        "{} missing: build it (cargo build -p mergen-dataplane)",
        bin.display()
    );
    bin
}

/// The forwarder on `config_root` with one HTTPS listener per (address, guest port),
/// its certificate and log in `dir`, and the `extra` settings; returns its guard and
/// its admin address.
pub fn start(
    config_root: &Path,
    dir: &Path,
    listeners: &[(SocketAddr, u16)],
    extra: &[(&str, &str)],
) -> (ChildGuard, SocketAddr) {
    let bin = bin();
    let certs = dir.join("certs");
    let out = Command::new(&bin)
        .args(["gen-cert", "--out-dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "gen-cert: {out:?}");
    let find = |ext: &str| {
        std::fs::read_dir(&certs)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == ext))
            .unwrap_or_else(|| panic!("no .{ext} from gen-cert"))
    };
    let spec: Vec<String> = listeners
        .iter()
        .map(|(addr, guest)| format!("{addr}={guest}"))
        .collect();
    let allowed: Vec<String> = listeners.iter().map(|(_, g)| g.to_string()).collect();
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = std::fs::File::create(dir.join("forwarder.log")).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.env("FWD_CONFIG_ROOT", config_root)
        .env("FWD_TLS_CERT_FILE", find("crt"))
        .env("FWD_TLS_KEY_FILE", find("key"))
        .env("FWD_LISTENERS", spec.join(","))
        .env("FWD_ALLOWED_GUEST_PORTS", allowed.join(","))
        .env("FWD_ADMIN_ADDR", admin.to_string())
        .env("FWD_WORKERS", "1")
        .env("FWD_LOG_LEVEL", "info")
        .env("FWD_RESOLVER_CACHE_TTL_SECONDS", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    (ChildGuard::spawn(&mut cmd), admin)
}

/// `curl -k` with SNI `name` to `ip:port` (a forwarder); the body of any HTTP answer.
pub fn through_at(name: &str, ip: &str, port: u16) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "5", "--resolve"])
        .arg(format!("{name}:{port}:{ip}"))
        .arg(format!("https://{name}:{port}/"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`through_at`] the forwarder on 127.0.0.1.
pub fn through(name: &str, port: u16) -> Option<String> {
    through_at(name, "127.0.0.1", port)
}
