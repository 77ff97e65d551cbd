//! The real `mergen-forwarder` in front of a test mergend's VMs, and curl through it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mergen_testkit::{free_port, in_netns, ChildGuard};

/// A binary of this build next to the test binaries' directory (`target/<profile>/`):
/// cargo builds every workspace binary before it runs the tests of
/// `cargo test --workspace`; `package` says what to build otherwise.
pub fn sibling_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        bin.is_file(),
        "{} missing: build it (cargo build -p {package})",
        bin.display()
    );
    bin
}

/// The forwarder on `config_root`, with an HTTPS listener per (guest port) on a free
/// 127.0.0.1 port; returns its guard and the ports. Its log is `dir/forwarder.log`.
pub fn forwarder(config_root: &Path, dir: &Path, guest_ports: &[u16]) -> (ChildGuard, Vec<u16>) {
    let ports: Vec<u16> = guest_ports.iter().map(|_| free_port()).collect();
    let listeners: Vec<(SocketAddr, u16)> = guest_ports
        .iter()
        .zip(&ports)
        .map(|(&g, &p)| (SocketAddr::from(([127, 0, 0, 1], p)), g))
        .collect();
    (forwarder_on(config_root, dir, &listeners, &[]), ports)
}

/// The forwarder on `config_root` with an HTTPS listener per (address, guest port) and
/// the `extra` settings (a cluster's, say). Its log is `dir/forwarder.log`.
pub fn forwarder_on(
    config_root: &Path,
    dir: &Path,
    listeners: &[(SocketAddr, u16)],
    extra: &[(&str, &str)],
) -> ChildGuard {
    forwarder_in(None, config_root, dir, listeners, extra)
}

/// [`forwarder_on`] inside the network namespace `netns` when given (its admin
/// listener on 127.0.0.1 there).
pub fn forwarder_in(
    netns: Option<&str>,
    config_root: &Path,
    dir: &Path,
    listeners: &[(SocketAddr, u16)],
    extra: &[(&str, &str)],
) -> ChildGuard {
    let bin = sibling_bin("mergen-forwarder", "mergen-dataplane");
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
    let admin = free_port();
    let log = std::fs::File::create(dir.join("forwarder.log")).unwrap();
    let mut cmd = in_netns(netns, &bin.to_string_lossy());
    cmd.env("FWD_CONFIG_ROOT", config_root)
        .env("FWD_TLS_CERT_FILE", find("crt"))
        .env("FWD_TLS_KEY_FILE", find("key"))
        .env("FWD_LISTENERS", spec.join(","))
        .env("FWD_ALLOWED_GUEST_PORTS", allowed.join(","))
        .env("FWD_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
        .env("FWD_WORKERS", "1")
        .env("FWD_LOG_LEVEL", "info")
        .env("FWD_RESOLVER_CACHE_TTL_SECONDS", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    ChildGuard::spawn(&mut cmd)
}

/// `curl -k https://<name>:<port><path>` through the forwarder on 127.0.0.1 (SNI
/// `name`): the body of a successful answer.
pub fn through(name: &str, port: u16, path: &str) -> Option<String> {
    through_at(name, "127.0.0.1", port, path)
}

/// [`through`] the forwarder listening on `ip`.
pub fn through_at(name: &str, ip: &str, port: u16, path: &str) -> Option<String> {
    through_in(None, name, ip, port, path)
}

/// [`through_at`] with curl run inside the network namespace `netns` when given.
pub fn through_in(
    netns: Option<&str>,
    name: &str,
    ip: &str,
    port: u16,
    path: &str,
) -> Option<String> {
    let out = in_netns(netns, "curl")
        .args(["-sk", "--fail", "--max-time", "5", "--resolve"])
        .arg(format!("{name}:{port}:{ip}"))
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
