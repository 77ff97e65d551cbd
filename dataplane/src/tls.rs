//! The wildcard certificate and the rustls server configurations built on it.
//!
//! Every listener's `ServerConfig` asks the [`CertStore`] for the current key on each
//! handshake, so a reload (SIGHUP or a change of the files) is seen by new connections
//! at once, and open connections keep the key they started with.

use std::fs;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use inotify::{Inotify, WatchMask};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;

/// TLS 1.2 session ids remembered per listener for resumption (TLS 1.3 uses tickets).
const SESSION_CACHE_SIZE: usize = 16 * 1024;
/// Cert tools write the certificate and the key one after the other: wait for this much
/// quiet before reloading, so the pair is read once, complete.
const SETTLE: Duration = Duration::from_millis(100);
/// How often the watcher thread checks that its store still exists.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

struct Inner {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// The PEM bytes behind `current`, so a change notice with identical files (a touch,
    /// an unrelated file in the same directory) does not reload.
    loaded_pem: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn parse(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, String> {
    let (cert_path, key_path) = (cert_file.display(), key_file.display());
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate file {cert_path}: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate file {cert_path}: no CERTIFICATE section"
        ));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key file {key_path}: {e}"))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("key file {key_path} with certificate file {cert_path}: {e}"))
}

impl Inner {
    /// Load the files; with `only_if_changed`, skip when they hold what is loaded.
    /// Returns whether a new key was installed.
    fn reload(&self, only_if_changed: bool) -> Result<bool, String> {
        let cert_pem = read_file(&self.cert_path, "certificate file")?;
        let key_pem = read_file(&self.key_path, "key file")?;
        let mut loaded = self.loaded_pem.lock().unwrap_or_else(|p| p.into_inner());
        if only_if_changed && loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let ck = parse(
            &self.cert_path,
            &self.key_path,
            &self.provider,
            &cert_pem,
            &key_pem,
        )?;
        self.current.store(Arc::new(ck));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }
}

impl CertStore {
    /// Load a PEM certificate chain and its key (PKCS#8, SEC1 or PKCS#1; RSA, ECDSA or
    /// Ed25519). Errors name the file at fault.
    pub fn load(cert: &Path, key: &Path) -> Result<CertStore, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_pem = read_file(cert, "certificate file")?;
        let key_pem = read_file(key, "key file")?;
        let ck = parse(cert, key, &provider, &cert_pem, &key_pem)?;
        Ok(CertStore {
            inner: Arc::new(Inner {
                cert_path: cert.to_path_buf(),
                key_path: key.to_path_buf(),
                provider,
                current: ArcSwap::from_pointee(ck),
                loaded_pem: Mutex::new((cert_pem, key_pem)),
            }),
        })
    }

    /// Re-read both files; on success new handshakes use them, on failure the old
    /// certificate stays (and a warning is logged).
    pub fn reload(&self) -> Result<(), String> {
        match self.inner.reload(false) {
            Ok(_) => {
                log::info!(cert = self.inner.cert_path.display().to_string(); "TLS certificate reloaded");
                Ok(())
            }
            Err(e) => {
                log::warn!(error = e.as_str(); "TLS certificate reload failed, keeping the old one");
                Err(e)
            }
        }
    }

    /// The certificate and key new handshakes use.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.inner.current.load_full()
    }

    /// Reload from a background thread when the files change (inotify on their
    /// directories, since editors and cert tools replace files by rename), and, with
    /// `reload_on_sighup`, on SIGHUP. The thread ends once every clone of this store
    /// is dropped.
    pub fn watch(&self, reload_on_sighup: bool) -> io::Result<()> {
        let inotify = Inotify::init()?;
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ONLYDIR;
        for path in [&self.inner.cert_path, &self.inner.key_path] {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            inotify.watches().add(dir, mask)?;
        }
        let sighup = if reload_on_sighup {
            let (rx, tx) = UnixStream::pair()?;
            rx.set_nonblocking(true)?;
            let id = signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, tx)?;
            Some((rx, id))
        } else {
            None
        };
        let weak = Arc::downgrade(&self.inner);
        std::thread::Builder::new()
            .name("fwd-cert-watch".into())
            .spawn(move || watch_loop(weak, inotify, sighup))?;
        Ok(())
    }
}

fn watch_loop(
    weak: Weak<Inner>,
    mut inotify: Inotify,
    sighup: Option<(UnixStream, signal_hook::SigId)>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (file_event, signal) = wait(
            &mut inotify,
            sighup.as_ref().map(|s| &s.0),
            LIVENESS_CHECK,
            &mut buf,
        );
        let Some(inner) = weak.upgrade() else {
            break;
        };
        if signal {
            log::info!("SIGHUP: reloading the TLS certificate");
            report(&inner, inner.reload(false));
        } else if file_event {
            // Let the writer finish the pair before reading it.
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline && wait(&mut inotify, None, SETTLE, &mut buf).0 {}
            report(&inner, inner.reload(true));
        }
    }
    if let Some((_, id)) = sighup {
        signal_hook::low_level::unregister(id);
    }
}

fn report(inner: &Inner, result: Result<bool, String>) {
    match result {
        Ok(true) => {
            log::info!(cert = inner.cert_path.display().to_string(); "TLS certificate reloaded")
        }
        Ok(false) => {}
        Err(e) => {
            log::warn!(error = e.as_str(); "TLS certificate reload failed, keeping the old one")
        }
    }
}

/// Wait up to `timeout`; returns (some file event was drained, SIGHUP arrived).
fn wait(
    inotify: &mut Inotify,
    sighup: Option<&UnixStream>,
    timeout: Duration,
    buf: &mut [u8],
) -> (bool, bool) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let ready = {
        let mut fds = vec![PollFd::new(inotify, PollFlags::IN)];
        if let Some(s) = sighup {
            fds.push(PollFd::new(s, PollFlags::IN));
        }
        if !matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0) {
            return (false, false);
        }
        fds.iter()
            .map(|f| !f.revents().is_empty())
            .collect::<Vec<_>>()
    };
    let mut file_event = false;
    if ready[0] {
        while let Ok(mut events) = inotify.read_events(buf) {
            if events.next().is_none() {
                break;
            }
            file_event = true;
        }
    }
    let mut signal = false;
    if let Some(mut s) = sighup.filter(|_| ready.get(1) == Some(&true)) {
        let mut b = [0u8; 64];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {
            signal = true;
        }
    }
    (file_event, signal)
}

#[derive(Debug)]
struct StoreResolver(Arc<Inner>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

/// A server configuration for one listener: TLS 1.2 and 1.3, resumption by tickets
/// (1.3) and by session id (1.2), `alpn` offered in that order, the certificate read
/// from `store` on every handshake.
pub fn server_config(
    store: &CertStore,
    alpn: &[Vec<u8>],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&store.inner.provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(StoreResolver(Arc::clone(&store.inner))));
    config.alpn_protocols = alpn.to_vec();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS session tickets: {e}"))?;
    Ok(Arc::new(config))
}

/// Write a self-signed certificate for `*.<prefix.>suffix` and `<prefix.>suffix`
/// (ECDSA P-256, valid ten years), the key with mode 0600. Both files are written
/// atomically, so a running forwarder's watcher never reads half a file.
pub fn generate_self_signed(
    domain_prefix: &str,
    domain_suffix: &str,
    cert_out: &Path,
    key_out: &Path,
) -> Result<(), String> {
    let norm = |s: &str| s.trim().trim_matches('.').to_ascii_lowercase();
    let (prefix, suffix) = (norm(domain_prefix), norm(domain_suffix));
    if suffix.is_empty() {
        return Err("the domain suffix is empty".to_string());
    }
    let domain = if prefix.is_empty() {
        suffix
    } else {
        format!("{prefix}.{suffix}")
    };
    let wildcard = format!("*.{domain}");
    let mut params = rcgen::CertificateParams::new(vec![wildcard.clone(), domain.clone()])
        .map_err(|e| format!("certificate names for {domain}: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, wildcard);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let key = rcgen::KeyPair::generate().map_err(|e| format!("key generation: {e}"))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("certificate signing: {e}"))?;
    for path in [cert_out, key_out] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    mergen_model::atomic::write_file(key_out, key.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| format!("key file {}: {e}", key_out.display()))?;
    mergen_model::atomic::write_file(cert_out, cert.pem().as_bytes(), 0o644)
        .map_err(|e| format!("certificate file {}: {e}", cert_out.display()))?;
    Ok(())
}
