//! A real registry on 127.0.0.1 with TLS from a test certificate: Debian's
//! docker-registry (the CNCF distribution registry), either with bearer tokens from a
//! token server in this process (Docker Hub's scheme: ES256 JWTs whose signing
//! certificate the registry trusts) or with htpasswd basic auth.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use mergen_testkit::{free_port, wait_for, ChildGuard, TempDir};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

pub enum Auth {
    Token,
    Basic {
        user: &'static str,
        password: &'static str,
    },
}

pub struct Registry {
    pub host: String,
    pub dir: TempDir,
    /// The CA that signed the registry's certificate.
    pub ca: PathBuf,
    /// A skopeo `--cert-dir` holding `ca.crt`.
    pub cert_dir: PathBuf,
    pub token_requests: Arc<AtomicUsize>,
    _child: ChildGuard,
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for 127.0.0.1 signed by it: (key, cert, ca).
fn server_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (_, ca) = self_signed(dir, "ca", "mergen-test-ca");
    let (key, csr, crt) = (
        dir.join("registry.key"),
        dir.join("registry.csr"),
        dir.join("registry.crt"),
    );
    let ext = dir.join("registry.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        ca.to_str().unwrap(),
        "-CAkey",
        dir.join("ca.key").to_str().unwrap(),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]);
    (key, crt, ca)
}

fn self_signed(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let (key, crt) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.crt")),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={cn}"),
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]);
    (key, crt)
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

const SERVICE: &str = "mergen-test-registry";
const ISSUER: &str = "mergen-test-issuer";

/// The token endpoint: grants every scope asked for, anonymously, as Docker Hub does
/// for public repositories (pull) and as a test needs for skopeo (push).
fn serve_tokens(
    listener: TcpListener,
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    count: Arc<AtomicUsize>,
) {
    let rng = SystemRandom::new();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            continue;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        count.fetch_add(1, Ordering::SeqCst);
        let target = request_line.split_whitespace().nth(1).unwrap_or("/");
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let mut access = Vec::new();
        for pair in query.split('&') {
            let Some(v) = pair.strip_prefix("scope=") else {
                continue;
            };
            let v = percent_decode(v);
            let parts: Vec<&str> = v.splitn(3, ':').collect();
            if parts.len() == 3 {
                let actions: Vec<&str> = parts[2].split(',').collect();
                access.push(json!({"type": parts[0], "name": parts[1], "actions": actions}));
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [base64::engine::general_purpose::STANDARD.encode(&cert_der)]});
        let claims = json!({
            "iss": ISSUER, "sub": "", "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("t{now}-{}", count.load(Ordering::SeqCst)), "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = key.sign(&rng, signing_input.as_bytes()).unwrap();
        let token = format!("{signing_input}.{}", b64url(sig.as_ref()));
        let body = json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        let dir = TempDir::new("registry");
        let (key, crt, ca) = server_cert(dir.path());
        let cert_dir = dir.join("certs.d");
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::copy(&ca, cert_dir.join("ca.crt")).unwrap();
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let token_requests = Arc::new(AtomicUsize::new(0));
        let auth_yaml = match auth {
            Auth::Token => {
                let (tkey, tcrt) = self_signed(dir.path(), "token", "mergen-test-token");
                let p8 = dir.join("token.p8");
                openssl(&[
                    "pkcs8",
                    "-topk8",
                    "-nocrypt",
                    "-in",
                    tkey.to_str().unwrap(),
                    "-outform",
                    "DER",
                    "-out",
                    p8.to_str().unwrap(),
                ]);
                let der = dir.join("token.der");
                openssl(&[
                    "x509",
                    "-in",
                    tcrt.to_str().unwrap(),
                    "-outform",
                    "DER",
                    "-out",
                    der.to_str().unwrap(),
                ]);
                let pair = EcdsaKeyPair::from_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &std::fs::read(&p8).unwrap(),
                    &SystemRandom::new(),
                )
                .unwrap();
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let tport = listener.local_addr().unwrap().port();
                let (cert_der, count) = (std::fs::read(&der).unwrap(), token_requests.clone());
                // Lives as long as the test process; it only ever listens on loopback.
                std::thread::spawn(move || serve_tokens(listener, pair, cert_der, count));
                format!(
                    "  token:\n    realm: http://127.0.0.1:{tport}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                    tcrt.display()
                )
            }
            Auth::Basic { user, password } => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("htpasswd");
                assert!(out.status.success());
                let htpasswd = dir.join("htpasswd");
                std::fs::write(&htpasswd, out.stdout).unwrap();
                format!(
                    "  htpasswd:\n    realm: basic-realm\n    path: {}\n",
                    htpasswd.display()
                )
            }
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n  tls:\n    certificate: {}\n    key: {}\nauth:\n{auth_yaml}",
            dir.join("data").display(),
            crt.display(),
            key.display()
        );
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = ChildGuard::spawn(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        wait_for("the registry to listen", Duration::from_secs(20), || {
            TcpStream::connect(&host).ok()
        });
        Registry {
            host,
            ca,
            cert_dir,
            dir,
            token_requests,
            _child: child,
        }
    }

    /// skopeo copy into this registry; every platform of a multi-platform image
    /// (`--all`), as a registry holds them.
    pub fn push(&self, source: &str, dest_repo_tag: &str, creds: Option<&str>) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--all", "--quiet"])
            .arg("--dest-cert-dir")
            .arg(&self.cert_dir);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        let out = cmd
            .arg(source)
            .arg(format!("docker://{}/{dest_repo_tag}", self.host))
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo copy {source}: {}\nregistry log: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
        );
    }

    /// The registry's stored copy of a blob (for tampering with it).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}
