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
