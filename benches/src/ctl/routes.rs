//! How fast the forwarder follows the VM store, seen from outside: a ClientHello for a
//! VM's name is refused with `unrecognized_name` until the forwarder knows the VM, and
//! answered otherwise (with a ServerHello, or another alert when it cannot reach the
//! VM). Needs no forwarder change and no admin endpoint.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::certs::CertFiles;
use crate::spawn::Server;
use crate::tlsclient::{self, Answer};

/// The TLS alert code for "unrecognized_name".
const UNRECOGNIZED_NAME: u8 = 112;
const DEADLINE: Duration = Duration::from_secs(30);
/// Pause between probes: fine enough for millisecond figures, light enough to leave the
/// forwarder its CPU.
const PROBE_GAP: Duration = Duration::from_micros(250);

/// Whether the forwarder at `addr` routes `sni`: Some(true) yes, Some(false) refused as
/// unknown, None not listening yet.
pub fn routes(addr: SocketAddr, hello: &[u8]) -> Option<bool> {
    match tlsclient::probe(addr, hello) {
        Ok(Answer::Alert(UNRECOGNIZED_NAME)) => Some(false),
        Ok(Answer::Alert(_) | Answer::Handshake | Answer::Closed) => Some(true),
        Err(_) => None,
    }
}

/// Probe until `want` holds; the time it took from `since`.
pub fn wait_until(
    addr: SocketAddr,
    sni: &str,
    want: bool,
    since: Instant,
) -> Result<Duration, String> {
    let hello = tlsclient::client_hello(sni)?;
    loop {
        crate::interrupt::check()?;
        if routes(addr, &hello) == Some(want) {
            return Ok(since.elapsed());
        }
        if since.elapsed() > DEADLINE {
            let what = if want { "route" } else { "refuse" };
            return Err(format!(
                "the forwarder did not {what} {sni} within {DEADLINE:?}"
            ));
        }
        std::thread::sleep(PROBE_GAP);
    }
}

/// A forwarder reading `config_root`, listening on `port`.
pub fn start_forwarder(
    bin: &Path,
    dir: &Path,
    cert: &CertFiles,
    config_root: &Path,
    port: u16,
) -> Result<Server, String> {
    Server::start(
        Command::new(bin)
            .env("FWD_CONFIG_ROOT", config_root)
            .env("FWD_TLS_CERT_FILE", &cert.cert)
            .env("FWD_TLS_KEY_FILE", &cert.key)
            .env("FWD_LISTENERS", format!("127.0.0.1:{port}=80"))
            .env("FWD_ALLOWED_GUEST_PORTS", "80")
            .env("FWD_ADMIN_ADDR", "")
            .env("FWD_WORKERS", "2")
            .env("FWD_LOG_LEVEL", "info"),
        &dir.join("forwarder.log"),
    )
}
