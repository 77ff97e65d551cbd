#![deny(unsafe_code)]

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::Arc;

use mergen_ctl::api::App;
use mergen_ctl::config::{help, Config};
use mergen_ctl::router;
use mergen_http::{Handler, Limits, Server, ServerConfig};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        // The runtime's per-VM steps live in the same binary, so systemd units and
        // the embedded supervisor run exactly the mergend that created the VM.
        Some("vm" | "supervise") => return mergen_runtime::cli::main(&args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{}", help());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("mergend: unknown argument {other:?}\n\n{}", help());
            return ExitCode::from(2);
        }
        None => {}
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(error = e; "mergend failed");
            eprintln!("mergend: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let config = Config::from_env()?;
    mergen_log::init("mergend", &config.log_level, &config.log_format)?;
    config.check_exposure()?;
    warn_if_mounts_are_private();
    // Registered before anything is served, so an early signal is not lost.
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("cannot handle signals: {e}"))?;
    let shutdown_timeout = config.shutdown_timeout;
    let addr = config.http_addr;
    let socket = config.http_socket.clone();
    let mut server_config = ServerConfig {
        name: "mergend".into(),
        limits: Limits::default(),
        header_timeout: config.header_timeout,
        request_timeout: config.read_timeout,
        idle_timeout: config.idle_timeout,
        max_connections: config.max_connections,
        max_connections_per_ip: config.max_connections_per_ip,
        workers: config.http_workers,
        stats: Arc::default(),
    };
    let app = Arc::new(App::new(config)?);
    // The server counts into the app's metrics, so /metrics shows refusals and evictions.
    server_config.stats = Arc::clone(&app.metrics.http);
    let handler: Arc<Handler> = {
        let app = Arc::clone(&app);
        Arc::new(move |req| router::handle(&app, req))
    };
    let mut server = Server::new(server_config, handler);
    server.answer_quickly({
        let app = Arc::clone(&app);
        Arc::new(move |req| router::is_quick(req).then(|| router::handle(&app, req)))
    });
    let tcp = addr
        .bind()
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let bound = tcp.local_addr().map_err(|e| e.to_string())?;
    server
        .listen_tcp(tcp)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    if let Some(path) = &socket {
        // A socket left by a previous run would make bind fail; anything else at that
        // path is not ours to remove.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(path);
        }
        let ul = UnixListener::bind(path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        server
            .listen_unix(ul)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    }
    let server = server
        .start()
        .map_err(|e| format!("cannot start the HTTP server: {e}"))?;
    log::info!(addr:% = bound, socket:? = socket; "mergend listening");
    if let Some(sig) = signals.forever().next() {
        log::info!(signal = sig; "shutting down");
    }
    let clean = server.shutdown(shutdown_timeout);
    if let Some(path) = &socket {
        let _ = std::fs::remove_file(path);
    }
    if clean {
        log::info!("mergend stopped");
    } else {
        log::warn!(timeout_s = shutdown_timeout.as_secs(); "shutdown timeout: in-flight requests abandoned");
    }
    Ok(())
}

/// `ip netns exec` (and some service managers) start a process in a mount namespace of
/// its own, a slave of the host's: mounts propagate into it but not back. The VM
/// namespaces mergend pins under `/run/netns` would then be files that nobody else (the
/// forwarder, `ip netns`) can enter. Enter only the network namespace (`nsenter --net`)
/// to run mergend in one.
fn warn_if_mounts_are_private() {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    if let Some(master) = receives_mounts_only(&mountinfo, "/run/netns") {
        log::warn!(
            mount = master;
            "mergend runs in a mount namespace that does not pass its mounts back (started by `ip netns exec`?): the VM network namespaces it makes under /run/netns are unusable outside it; enter only the network namespace (nsenter --net)"
        );
    }
}

/// The `master:N` tag of the mount holding `path`, when that mount receives mounts
/// from another namespace's peer group but cannot send its own back.
fn receives_mounts_only<'a>(mountinfo: &'a str, path: &str) -> Option<&'a str> {
    let under = |mount_point: &str| {
        mount_point == "/"
            || path == mount_point
            || path
                .strip_prefix(mount_point)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    // Fields: id parent major:minor root mount-point options [optional...] - fs ...
    // The last matching line wins: later mounts cover earlier ones.
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            let optional = fields.skip(1).take_while(|f| *f != "-");
            Some((mount_point, optional.collect::<Vec<_>>()))
        })
        .filter(|(mount_point, _)| under(mount_point))
        .max_by_key(|(mount_point, _)| mount_point.len())
        .and_then(|(_, tags)| tags.into_iter().find(|t| t.starts_with("master:")))
}

#[cfg(test)]
mod tests {
    use super::receives_mounts_only;

    #[test]
    fn a_slave_mount_holding_run_netns_is_found() {
        let host = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
42 22 254:0 /run/netns /run/netns rw,relatime shared:5 - ext4 /dev/vda rw
43 42 0:4 net:[1] /run/netns/a rw shared:6 - nsfs nsfs rw
50 22 0:5 / /run/netns2 rw master:9 - tmpfs tmpfs rw
";
        assert_eq!(receives_mounts_only(host, "/run/netns"), None);
        // `ip netns exec`: the whole tree made a slave of the host's.
        let exec = host
            .replace("shared:1 ", "master:1 ")
            .replace("shared:5 ", "shared:7 master:5 ");
        assert_eq!(receives_mounts_only(&exec, "/run/netns"), Some("master:5"));
        // /run/netns no mount point of its own: the one holding it decides.
        let plain = "22 1 254:0 / / rw master:1 - ext4 /dev/vda rw\n";
        assert_eq!(receives_mounts_only(plain, "/run/netns"), Some("master:1"));
        let private = "22 1 254:0 / / rw - ext4 /dev/vda rw\n";
        assert_eq!(receives_mounts_only(private, "/run/netns"), None);
    }
}
