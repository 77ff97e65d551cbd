//! The wildcard certificate and the rustls server configurations built on it.
//!
//! Every listener's `ServerConfig` asks the [`CertStore`] for the current key on each
//! handshake, so a reload (SIGHUP or a change of the files) is seen by new connections
//! at once, and open connections keep the key they started with.

use std::fs;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use inotify::{Inotify, WatchMask};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;

use crate::watch::{self, Wake};

/// TLS 1.2 session ids remembered per listener for resumption (TLS 1.3 uses tickets).
const SESSION_CACHE_SIZE: usize = 16 * 1024;
/// Cert tools write the certificate and the key one after the other: wait for this much
/// quiet before reloading, so the pair is read once, complete.
const SETTLE: Duration = Duration::from_millis(100);
/// A burst of changes longer than this is read anyway.
const MAX_SETTLE: Duration = Duration::from_secs(2);

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

/// What went wrong with the certificate, its key, or a configuration built on them.
/// Every variant about a file names it.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("certificate file {}: {source}", path.display())]
    CertPem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("certificate file {}: no CERTIFICATE section", path.display())]
    NoCertificate { path: PathBuf },
    #[error("key file {}: {source}", path.display())]
    KeyPem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("key file {} with certificate file {}: {source}", key.display(), cert.display())]
    Mismatch {
        key: PathBuf,
        cert: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("the domain suffix is empty")]
    EmptySuffix,
    #[error("generating the certificate for {domain}: {source}")]
    Generate {
        domain: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("generating an RSA key: {0}")]
    RsaKey(String),
    #[error("{}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn parse(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, CertError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::CertPem {
            path: cert_file.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: cert_file.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| CertError::KeyPem {
        path: key_file.to_path_buf(),
        source,
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| CertError::Mismatch {
        key: key_file.to_path_buf(),
        cert: cert_file.to_path_buf(),
        source,
    })
}

impl Inner {
    /// Load the files; with `only_if_changed`, skip when they hold what is loaded.
    /// Returns whether a new key was installed.
    fn reload(&self, only_if_changed: bool) -> Result<bool, CertError> {
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
    pub fn load(cert: &Path, key: &Path) -> Result<CertStore, CertError> {
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
    pub fn reload(&self) -> Result<(), CertError> {
        let result = self.inner.reload(false);
        report(&self.inner, &result);
        result.map(drop)
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
        let (signal, sighup) = if reload_on_sighup {
            let (rx, tx) = UnixStream::pair()?;
            let id = signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, tx)?;
            (Some(rx), Some(id))
        } else {
            (None, None)
        };
        let weak = Arc::downgrade(&self.inner);
        // Since the first file event of a burst still unread: the reload waits for quiet.
        let mut burst: Option<Instant> = None;
        watch::spawn("fwd-cert-watch", inotify, signal, move |_, wake| {
            let Some(inner) = weak.upgrade() else {
                if let Some(id) = sighup {
                    signal_hook::low_level::unregister(id);
                }
                return None;
            };
            match wake {
                Wake::Signal => {
                    log::info!("SIGHUP: reloading the TLS certificate");
                    report(&inner, &inner.reload(false));
                }
                Wake::Files { .. } => {
                    let first = *burst.get_or_insert_with(Instant::now);
                    // Let the writer finish the pair before reading it, within reason.
                    if first.elapsed() < MAX_SETTLE {
                        return Some(SETTLE);
                    }
                    burst = None;
                    report(&inner, &inner.reload(true));
                }
                Wake::Timeout => {
                    if burst.take().is_some() {
                        report(&inner, &inner.reload(true));
                    }
                }
            }
            Some(watch::LIVENESS_CHECK)
        })
    }
}

fn report(inner: &Inner, result: &Result<bool, CertError>) {
    match result {
        Ok(true) => {
            log::info!(cert = inner.cert_path.display().to_string(); "TLS certificate reloaded")
        }
        Ok(false) => {}
        Err(e) => {
            log::warn!(error = e.to_string(); "TLS certificate reload failed, keeping the old one")
        }
    }
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
) -> Result<Arc<rustls::ServerConfig>, CertError> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&store.inner.provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(CertError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(StoreResolver(Arc::clone(&store.inner))));
    config.alpn_protocols = alpn.to_vec();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(CertError::Config)?;
    Ok(Arc::new(config))
}

/// The name the original's certificate script gives its files, before `.crt`/`.key`:
/// `wildcard.<prefix.>suffix` (normalised: lowercase, no outer dots).
pub fn wildcard_file_stem(domain_prefix: &str, domain_suffix: &str) -> String {
    format!("wildcard.{}", base_domain(domain_prefix, domain_suffix))
}

/// `<prefix>.<suffix>`, or the suffix alone, normalised.
fn base_domain(domain_prefix: &str, domain_suffix: &str) -> String {
    let normalize = mergen_model::domain::normalize;
    let (prefix, suffix) = (normalize(domain_prefix), normalize(domain_suffix));
    match (prefix.is_empty(), suffix.is_empty()) {
        (true, _) => suffix,
        (false, true) => prefix,
        (false, false) => format!("{prefix}.{suffix}"),
    }
}

/// The key of a generated certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256: small and fast, what every current client takes.
    EcdsaP256,
    /// RSA 2048 (`gen-cert --rsa`), for clients that take nothing else.
    Rsa2048,
}

/// What [`generate_self_signed_with`] makes.
#[derive(Clone, Copy, Debug)]
pub struct SelfSigned {
    pub key: KeyKind,
    /// Valid from a day ago (clocks differ) until this many days from now.
    pub days: u32,
}

impl Default for SelfSigned {
    fn default() -> SelfSigned {
        SelfSigned {
            key: KeyKind::EcdsaP256,
            days: 3650,
        }
    }
}

/// [`generate_self_signed_with`] an ECDSA P-256 key, valid ten years.
pub fn generate_self_signed(
    domain_prefix: &str,
    domain_suffix: &str,
    cert_out: &Path,
    key_out: &Path,
) -> Result<(), CertError> {
    let what = SelfSigned::default();
    generate_self_signed_with(domain_prefix, domain_suffix, &what, cert_out, key_out)
}

/// Write a self-signed certificate for `*.<prefix.>suffix` and `<prefix.>suffix`, the
/// key with mode 0600. Both files are written atomically, so a running forwarder's
/// watcher never reads half a file.
pub fn generate_self_signed_with(
    domain_prefix: &str,
    domain_suffix: &str,
    what: &SelfSigned,
    cert_out: &Path,
    key_out: &Path,
) -> Result<(), CertError> {
    if mergen_model::domain::normalize(domain_suffix).is_empty() {
        return Err(CertError::EmptySuffix);
    }
    let domain = base_domain(domain_prefix, domain_suffix);
    let wildcard = format!("*.{domain}");
    let generate = |source| CertError::Generate {
        domain: domain.clone(),
        source,
    };
    let mut params =
        rcgen::CertificateParams::new(vec![wildcard.clone(), domain.clone()]).map_err(generate)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, wildcard);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(what.days));
    let key = match what.key {
        KeyKind::EcdsaP256 => rcgen::KeyPair::generate().map_err(generate)?,
        KeyKind::Rsa2048 => rsa_2048()?,
    };
    let cert = params.self_signed(&key).map_err(generate)?;
    for path in [cert_out, key_out] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(written(dir))?;
        }
    }
    mergen_model::atomic::write_file(key_out, key.serialize_pem().as_bytes(), 0o600)
        .map_err(written(key_out))?;
    mergen_model::atomic::write_file(cert_out, cert.pem().as_bytes(), 0o644)
        .map_err(written(cert_out))?;
    Ok(())
}

/// ring signs with RSA keys but cannot make them: the `rsa` crate makes the key, ring
/// (through rcgen) signs the certificate with it.
fn rsa_2048() -> Result<rcgen::KeyPair, CertError> {
    use rsa::pkcs8::EncodePrivateKey;
    let rsa_error = |e: &dyn std::fmt::Display| CertError::RsaKey(e.to_string());
    let key =
        rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(|e| rsa_error(&e))?;
    let der = key.to_pkcs8_der().map_err(|e| rsa_error(&e))?;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(der.as_bytes());
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
        .map_err(|e| rsa_error(&e))
}

/// The error of writing `path`.
fn written(path: &Path) -> impl FnOnce(io::Error) -> CertError + '_ {
    move |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use mergen_testkit::{eventually, TempDir};
    use rustls::client::Resumption;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, ServerConnection};

    use super::*;

    fn temp_dir() -> TempDir {
        TempDir::new("dp-tls")
    }

    fn openssl(args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A key of the given kind and a self-signed certificate for `*.vm.example.com`, made
    /// by the openssl CLI so the PEM forms are the ones operators have.
    fn openssl_pair(dir: &TempDir, kind: &str) -> (PathBuf, PathBuf) {
        let key = dir.join(format!("{kind}.key"));
        let cert = dir.join(format!("{kind}.crt"));
        let k = key.to_str().unwrap();
        match kind {
            "rsa-pkcs8" => openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                k,
            ]),
            "rsa-pkcs1" => openssl(&["genrsa", "-traditional", "-out", k, "2048"]),
            "ec-sec1" => openssl(&[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                k,
            ]),
            "ec-pkcs8" => openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
                k,
            ]),
            "ed25519" => openssl(&["genpkey", "-algorithm", "ED25519", "-out", k]),
            other => panic!("unknown key kind {other}"),
        }
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            k,
            "-out",
            cert.to_str().unwrap(),
            "-days",
            "2",
            "-subj",
            "/CN=*.vm.example.com",
            "-addext",
            "subjectAltName=DNS:*.vm.example.com,DNS:vm.example.com",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ]);
        (cert, key)
    }

    fn client_config(
        trust: &CertificateDer<'static>,
        alpn: &[&[u8]],
        tls12: bool,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(trust.clone()).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = Resumption::in_memory_sessions(16);
        Arc::new(config)
    }

    /// Move bytes between the two ends until neither has anything to say.
    fn pump(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..32 {
            let mut progressed = false;
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                progressed = true;
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).unwrap();
                    server.process_new_packets()?;
                }
            }
            buf.clear();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                progressed = true;
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).unwrap();
                    client.process_new_packets()?;
                }
            }
            if !progressed {
                return Ok(());
            }
        }
        panic!("handshake did not settle");
    }

    fn connect(
        client: &Arc<ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
        name: &str,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut c = ClientConnection::new(Arc::clone(client), name).unwrap();
        let mut s = ServerConnection::new(Arc::clone(server)).unwrap();
        pump(&mut c, &mut s)?;
        assert!(!c.is_handshaking() && !s.is_handshaking());
        Ok((c, s))
    }

    fn leaf(store: &CertStore) -> CertificateDer<'static> {
        store.current().cert[0].clone()
    }

    #[test]
    fn self_signed_serves_wildcard_names() {
        // webpki (like browsers) refuses a wildcard right under a single label, so
        // `*.localhost` is checked by its SAN list and the bare name by a handshake.
        type Case<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                "",
                "localhost",
                "DNS:*.localhost, DNS:localhost",
                &["localhost"],
                &["app1.example.com"],
            ),
            (
                "vm",
                "example.com",
                "DNS:*.vm.example.com, DNS:vm.example.com",
                &[
                    "app1.vm.example.com",
                    "0846abcd.vm.example.com",
                    "vm.example.com",
                ],
                &["app1.example.com", "a.b.vm.example.com"],
            ),
            (
                ".VM.",
                "Example.COM",
                "DNS:*.vm.example.com, DNS:vm.example.com",
                &["app1.vm.example.com"],
                &["app1.localhost"],
            ),
        ];
        for &(prefix, suffix, sans, good, bad) in cases {
            let dir = temp_dir();
            let (cert, key) = (dir.join("sub/wild.crt"), dir.join("sub/wild.key"));
            generate_self_signed(prefix, suffix, &cert, &key).unwrap();
            let out = Command::new("openssl")
                .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
                .arg(&cert)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(sans), "{prefix}/{suffix}: {text}");
            assert_eq!(
                fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let store = CertStore::load(&cert, &key).unwrap();
            let server = server_config(&store, &[b"http/1.1".to_vec()]).unwrap();
            let client = client_config(&leaf(&store), &[b"h2", b"http/1.1"], false);
            for name in good {
                let (c, _) =
                    connect(&client, &server, name).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(c.alpn_protocol(), Some(&b"http/1.1"[..]));
            }
            for name in bad {
                assert!(
                    connect(&client, &server, name).is_err(),
                    "{name} must not verify"
                );
            }
        }
        let dir = temp_dir();
        assert!(generate_self_signed("", " . ", &dir.join("c"), &dir.join("k")).is_err());
    }

    /// `gen-cert`'s two key kinds, checked by webpki as a client would with the
    /// certificate as its root: one label under the base verifies, two do not.
    #[test]
    fn generated_certificates_verify_for_one_label_only() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::client::WebPkiServerVerifier;
        use rustls::pki_types::UnixTime;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        for key in [KeyKind::EcdsaP256, KeyKind::Rsa2048] {
            let dir = temp_dir();
            let (cert, key_file) = (dir.join("c.crt"), dir.join("c.key"));
            let what = SelfSigned { key, days: 30 };
            generate_self_signed_with("vm", "example.com", &what, &cert, &key_file).unwrap();
            let pem = fs::read_to_string(&key_file).unwrap();
            let algorithm = match key {
                KeyKind::EcdsaP256 => "id-ecPublicKey",
                KeyKind::Rsa2048 => "rsaEncryption",
            };
            let out = Command::new("openssl")
                .args(["x509", "-noout", "-text", "-in"])
                .arg(&cert)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(algorithm), "{key:?}: {text}");
            if key == KeyKind::Rsa2048 {
                assert!(text.contains("(2048 bit)"), "{text}");
            } else {
                assert!(text.contains("prime256v1"), "{text}");
            }
            assert!(pem.contains("PRIVATE KEY"), "{key:?}");
            // It loads, and serves a handshake.
            let store = CertStore::load(&cert, &key_file).unwrap();
            let server = server_config(&store, &[]).unwrap();
            let client = client_config(&leaf(&store), &[], false);
            connect(&client, &server, "app1.vm.example.com").unwrap();

            let mut roots = RootCertStore::empty();
            roots.add(leaf(&store)).unwrap();
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .unwrap();
            let verify = |name: &str| {
                verifier.verify_server_cert(
                    &leaf(&store),
                    &[],
                    &ServerName::try_from(name.to_string()).unwrap(),
                    &[],
                    UnixTime::now(),
                )
            };
            for good in ["app1.vm.example.com", "0846abcd.vm.example.com"] {
                verify(good).unwrap_or_else(|e| panic!("{key:?} {good}: {e}"));
            }
            for bad in [
                "a.b.vm.example.com",
                "app1.example.com",
                "app1.vm.example.org",
            ] {
                assert!(verify(bad).is_err(), "{key:?}: {bad} must not verify");
            }
            // Valid for the days asked, not ten years.
            let not_after = Command::new("openssl")
                .args([
                    "x509",
                    "-noout",
                    "-checkend",
                    &(31 * 24 * 3600).to_string(),
                    "-in",
                ])
                .arg(&cert)
                .status()
                .unwrap();
            assert!(!not_after.success(), "{key:?}: valid past 31 days");
        }
    }

    #[test]
    fn file_names_are_the_original_scripts() {
        assert_eq!(wildcard_file_stem("", "localhost"), "wildcard.localhost");
        assert_eq!(
            wildcard_file_stem(".VM.", "Example.com."),
            "wildcard.vm.example.com"
        );
    }

    #[test]
    fn loads_rsa_and_ecdsa_keys_in_every_pem_form() {
        let dir = temp_dir();
        for kind in ["rsa-pkcs8", "rsa-pkcs1", "ec-sec1", "ec-pkcs8", "ed25519"] {
            let (cert, key) = openssl_pair(&dir, kind);
            let store = CertStore::load(&cert, &key).unwrap_or_else(|e| panic!("{kind}: {e}"));
            let server = server_config(&store, &[]).unwrap();
            // Ed25519 certificates exist only in TLS 1.3.
            let versions: &[bool] = if kind == "ed25519" {
                &[false]
            } else {
                &[false, true]
            };
            for &tls12 in versions {
                let client = client_config(&leaf(&store), &[], tls12);
                let (c, _) = connect(&client, &server, "db.vm.example.com")
                    .unwrap_or_else(|e| panic!("{kind} tls12={tls12}: {e}"));
                assert_eq!(c.alpn_protocol(), None);
            }
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = temp_dir();
        let (cert, key) = openssl_pair(&dir, "ec-sec1");
        let (other_cert, _) = openssl_pair(&dir, "rsa-pkcs8");
        let empty = dir.join("empty.pem");
        fs::write(&empty, b"").unwrap();
        let garbage = dir.join("garbage.pem");
        fs::write(
            &garbage,
            b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let missing = dir.join("missing.pem");
        let cases: &[(&Path, &Path, &Path)] = &[
            (&missing, &key, &missing),
            (&cert, &missing, &missing),
            (&empty, &key, &empty),
            (&garbage, &key, &garbage),
            (&cert, &empty, &empty),
            // The certificate's PEM holds no key.
            (&cert, &cert, &cert),
            // A key that does not belong to the certificate.
            (&other_cert, &key, &key),
        ];
        for &(c, k, named) in cases {
            let err = match CertStore::load(c, k) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{} + {} must fail", c.display(), k.display()),
            };
            assert!(
                err.contains(&named.display().to_string()),
                "{err:?} should name {}",
                named.display()
            );
        }
    }

    #[test]
    fn reload_swaps_and_keeps_the_old_one_on_failure() {
        let dir = temp_dir();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        generate_self_signed("vm", "example.com", &cert, &key).unwrap();
        let store = CertStore::load(&cert, &key).unwrap();
        let server = server_config(&store, &[b"http/1.1".to_vec()]).unwrap();
        let first = leaf(&store);
        let (mut open_client, mut open_server) = connect(
            &client_config(&first, &[], false),
            &server,
            "a.vm.example.com",
        )
        .unwrap();

        // A broken key: the old certificate stays.
        fs::write(
            &key,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(store.reload().is_err());
        assert_eq!(leaf(&store), first);
        // A certificate whose key is not there yet (written one after the other).
        let next = temp_dir();
        generate_self_signed("vm", "example.com", &next.join("c"), &next.join("k")).unwrap();
        fs::copy(next.join("c"), &cert).unwrap();
        assert!(store.reload().is_err());
        assert_eq!(leaf(&store), first);
        // The pair complete: new handshakes get it, from the config built before.
        fs::copy(next.join("k"), &key).unwrap();
        store.reload().unwrap();
        let second = leaf(&store);
        assert_ne!(second, first);
        let (c, _) = connect(
            &client_config(&second, &[], false),
            &server,
            "b.vm.example.com",
        )
        .unwrap();
        assert_eq!(c.peer_certificates().unwrap()[0], second);
        assert!(connect(
            &client_config(&first, &[], false),
            &server,
            "b.vm.example.com"
        )
        .is_err());

        // The connection opened before the reload still works both ways.
        open_client.writer().write_all(b"ping").unwrap();
        open_server.writer().write_all(b"pong").unwrap();
        pump(&mut open_client, &mut open_server).unwrap();
        let mut got = [0u8; 4];
        open_server.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        open_client.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
    }

    #[test]
    fn sessions_resume() {
        let dir = temp_dir();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        generate_self_signed("vm", "example.com", &cert, &key).unwrap();
        let store = CertStore::load(&cert, &key).unwrap();
        let server = server_config(&store, &[b"http/1.1".to_vec()]).unwrap();
        for tls12 in [false, true] {
            let client = client_config(&leaf(&store), &[b"http/1.1"], tls12);
            let (c, _) = connect(&client, &server, "a.vm.example.com").unwrap();
            assert_eq!(c.handshake_kind(), Some(HandshakeKind::Full));
            let (c, _) = connect(&client, &server, "a.vm.example.com").unwrap();
            assert_eq!(
                c.handshake_kind(),
                Some(HandshakeKind::Resumed),
                "tls12={tls12}"
            );
        }
    }

    #[test]
    fn watch_reloads_when_files_are_replaced() {
        let dir = temp_dir();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        generate_self_signed("vm", "example.com", &cert, &key).unwrap();
        let store = CertStore::load(&cert, &key).unwrap();
        store.watch(false).unwrap();
        let first = leaf(&store);
        // generate_self_signed replaces both files by rename, as cert tools do.
        generate_self_signed("vm", "example.com", &cert, &key).unwrap();
        let on_disk = CertificateDer::from_pem_file(&cert).unwrap();
        assert_ne!(on_disk, first);
        assert!(eventually(Duration::from_secs(5), || leaf(&store) == on_disk));
        // In-place rewrites are followed too.
        let other = temp_dir();
        generate_self_signed("vm", "example.com", &other.join("c"), &other.join("k")).unwrap();
        fs::write(&cert, fs::read(other.join("c")).unwrap()).unwrap();
        fs::write(&key, fs::read(other.join("k")).unwrap()).unwrap();
        let on_disk = CertificateDer::from_pem_file(&cert).unwrap();
        assert!(eventually(Duration::from_secs(5), || leaf(&store) == on_disk));
    }

    #[test]
    fn sighup_reloads() {
        // The files are symlinks into a directory the watcher does not follow, so only
        // the signal can make the store notice the change.
        let dir = temp_dir();
        let hidden = temp_dir();
        let (real_cert, real_key) = (hidden.join("c"), hidden.join("k"));
        generate_self_signed("vm", "example.com", &real_cert, &real_key).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::os::unix::fs::symlink(&real_cert, &cert).unwrap();
        std::os::unix::fs::symlink(&real_key, &key).unwrap();
        let store = CertStore::load(&cert, &key).unwrap();
        store.watch(true).unwrap();
        let first = leaf(&store);
        generate_self_signed("vm", "example.com", &real_cert, &real_key).unwrap();
        let on_disk = CertificateDer::from_pem_file(&cert).unwrap();
        assert_ne!(on_disk, first);
        signal_hook::low_level::raise(signal_hook::consts::SIGHUP).unwrap();
        assert!(eventually(Duration::from_secs(5), || leaf(&store) == on_disk));
    }
}
