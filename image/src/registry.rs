//! Pulling from a registry with the OCI distribution API into the blob cache (an OCI
//! image layout under `DIR/image-cache`), so that every build, `--skip-pull` included,
//! reads the image the same way: from a layout.
//!
//! Auth as Docker does it: try anonymously; on `401` with `WWW-Authenticate: Bearer
//! realm=...,service=...,scope=...` fetch a token from the realm (with the user's
//! credentials when `~/.docker/config.json` has some) and retry; on `Basic` send the
//! credentials. Every byte is checked against its digest before it is kept.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use oci_spec::distribution::Reference;
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::Deserialize;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::Agent;

use crate::digest::{hex_of, sha256, HashingReader};
use crate::error::{Error, IoContext, Result};
use crate::layout::{self, Platform, MANIFEST_ACCEPT};
use crate::progress::Progress;

/// Where credentials and trust come from.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Extra PEM CA certificates trusted besides the system's (`--ca-file`).
    pub ca_file: Option<PathBuf>,
    /// Docker's config directory (`DOCKER_CONFIG`, else `~/.docker`).
    pub docker_config_dir: Option<PathBuf>,
}

/// The API host for a reference's registry (Docker Hub's API lives elsewhere).
fn api_host(r: &Reference) -> String {
    match r.resolve_registry() {
        "index.docker.io" | "docker.io" => "registry-1.docker.io".to_string(),
        other => other.to_string(),
    }
}

fn agent(access: &Access) -> Result<Agent> {
    let mut roots: Vec<Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    if let Some(ca) = &access.ca_file {
        let pem = fs::read(ca).ctx(|| format!("reading the CA file {}", ca.display()))?;
        let before = roots.len();
        for item in ureq::tls::parse_pem(&pem) {
            if let Ok(ureq::tls::PemItem::Certificate(c)) = item {
                roots.push(c.to_owned());
            }
        }
        if roots.len() == before {
            return Err(Error::Invalid(format!(
                "no certificate in the CA file {}",
                ca.display()
            )));
        }
    }
    let root_certs = if roots.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::Specific(Arc::new(roots))
    };
    let tls = TlsConfig::builder().root_certs(root_certs).build();
    Ok(Agent::config_builder()
        .tls_config(tls)
        // Status codes are ours to read (401 carries the auth challenge).
        .http_status_as_error(false)
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("mergen-image/", env!("CARGO_PKG_VERSION")))
        .build()
        .new_agent())
}

/// `user:password` for `host` from Docker's config (`auths`, `credHelpers`,
/// `credsStore`), if it has any.
fn credentials(access: &Access, host: &str) -> Result<Option<(String, String)>> {
    let Some(dir) = &access.docker_config_dir else {
        return Ok(None);
    };
    let path = dir.join("config.json");
    let body = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", default)]
    struct Config {
        auths: BTreeMap<String, AuthEntry>,
        cred_helpers: BTreeMap<String, String>,
        creds_store: Option<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct AuthEntry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config = serde_json::from_slice(&body)
        .map_err(|e| Error::Invalid(format!("malformed {}: {e}", path.display())))?;
    // Keys may be `host`, `https://host`, `https://host/v1/`; Docker Hub's is
    // `https://index.docker.io/v1/`.
    let key_host = |k: &str| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.split('/').next().unwrap_or_default().to_string()
    };
    let hub = host == "registry-1.docker.io";
    let matches = |k: &str| {
        let h = key_host(k);
        h == host || (hub && (h == "index.docker.io" || h == "docker.io"))
    };
    if let Some(helper) = config
        .cred_helpers
        .iter()
        .find(|(k, _)| matches(k))
        .map(|(_, v)| v.clone())
        .or(config.creds_store.clone())
    {
        let server = if hub {
            "https://index.docker.io/v1/"
        } else {
            host
        };
        if let Some(c) = from_helper(&helper, server)? {
            return Ok(Some(c));
        }
    }
    for (k, entry) in &config.auths {
        if !matches(k) {
            continue;
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some((u.clone(), p.clone())));
        }
        if let Some(auth) = &entry.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| {
                    Error::Invalid(format!("{}: bad auth for {k}: {e}", path.display()))
                })?;
            let text = String::from_utf8_lossy(&decoded).into_owned();
            if let Some((u, p)) = text.split_once(':') {
                return Ok(Some((u.to_string(), p.to_string())));
            }
        }
    }
    Ok(None)
}

/// `docker-credential-<helper> get`, as Docker runs it.
fn from_helper(helper: &str, server: &str) -> Result<Option<(String, String)>> {
    let program = format!("docker-credential-{helper}");
    let child = std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Ok(None);
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child
        .wait_with_output()
        .ctx(|| format!("running {program}"))?;
    if !out.status.success() {
        return Ok(None);
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Helper {
        username: String,
        secret: String,
    }
    Ok(serde_json::from_slice::<Helper>(&out.stdout)
        .ok()
        .map(|h| (h.username, h.secret)))
}

/// `Bearer realm="...",service="..."` → ("bearer", {realm: ..., service: ...}).
pub fn parse_challenge(h: &str) -> (String, BTreeMap<String, String>) {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            // Quoted values may hold commas (scopes) and escaped quotes.
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(key, value);
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_ascii_lowercase(), params)
}

enum Auth {
    None,
    Basic(String),
    Bearer(String),
}

/// One repository on one registry.
pub struct Client {
    agent: Agent,
    host: String,
    repo: String,
    creds: Option<(String, String)>,
    auth: Auth,
}

/// The registry's `{"errors":[{code,message}]}` as one line.
fn error_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(Deserialize)]
    struct ErrorItem {
        code: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|i| {
                format!(
                    "{}: {}",
                    i.code.as_deref().unwrap_or("?"),
                    i.message.as_deref().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

type Response = ureq::http::Response<ureq::Body>;

impl Client {
    pub fn new(r: &Reference, access: &Access) -> Result<Client> {
        let host = api_host(r);
        Ok(Client {
            agent: agent(access)?,
            creds: credentials(access, &host)?,
            host,
            repo: r.repository().to_string(),
            auth: Auth::None,
        })
    }

    fn url(&self, kind: &str, what: &str) -> String {
        format!("https://{}/v2/{}/{kind}/{what}", self.host, self.repo)
    }

    fn transport(&self, e: ureq::Error, url: &str) -> Error {
        match e {
            ureq::Error::Io(io) => Error::Http(format!("GET {url}: {io}")),
            other => Error::Http(format!("GET {url}: {other}")),
        }
    }

    /// GET with the current auth; a 401 is answered once with the challenge it carries.
    fn get(&mut self, url: &str, accept: &str) -> Result<Response> {
        for attempt in 0..2 {
            let mut req = self.agent.get(url).header("Accept", accept);
            match &self.auth {
                Auth::None => {}
                Auth::Basic(h) | Auth::Bearer(h) => req = req.header("Authorization", h),
            }
            let resp = req.call().map_err(|e| self.transport(e, url))?;
            if resp.status().as_u16() != 401 || attempt == 1 {
                if resp.status().as_u16() == 401 {
                    return Err(Error::Auth(format!(
                        "{} refused {}: {}",
                        self.host,
                        if self.creds.is_some() {
                            "our credentials"
                        } else {
                            "anonymous access (no credentials for it in the Docker config)"
                        },
                        url
                    )));
                }
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            self.authenticate(&challenge)?;
        }
        unreachable!("the loop returns on its second pass")
    }

    fn basic_header(&self) -> Option<String> {
        self.creds.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    fn authenticate(&mut self, challenge: &str) -> Result<()> {
        let (scheme, params) = parse_challenge(challenge);
        match scheme.as_str() {
            "basic" => {
                self.auth = Auth::Basic(self.basic_header().ok_or_else(|| {
                    Error::Auth(format!(
                        "{} needs credentials and the Docker config has none for it",
                        self.host
                    ))
                })?);
                Ok(())
            }
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| {
                    Error::Auth(format!("{}: bearer challenge without realm", self.host))
                })?;
                let scope = params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.repo));
                let mut req = self.agent.get(realm).query("scope", &scope);
                if let Some(service) = params.get("service") {
                    req = req.query("service", service);
                }
                // Credentials only travel encrypted.
                if realm.starts_with("https://") {
                    if let Some(h) = self.basic_header() {
                        req = req.header("Authorization", &h);
                    }
                }
                let mut resp = req.call().map_err(|e| self.transport(e, realm))?;
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(1 << 20)
                    .read_to_vec()
                    .map_err(|e| self.transport(e, realm))?;
                if !resp.status().is_success() {
                    return Err(Error::Auth(format!(
                        "token endpoint {realm} answered {}: {}",
                        resp.status(),
                        error_text(&body)
                    )));
                }
                #[derive(Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|e| Error::Auth(format!("token endpoint {realm}: {e}")))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| Error::Auth(format!("token endpoint {realm} gave no token")))?;
                self.auth = Auth::Bearer(format!("Bearer {token}"));
                Ok(())
            }
            _ => Err(Error::Auth(format!(
                "{}: unsupported auth challenge {challenge:?}",
                self.host
            ))),
        }
    }

    /// A manifest or index by tag or digest: (body, media type, digest), verified.
    pub fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String, String)> {
        let url = self.url("manifests", reference);
        let mut resp = self.get(&url, &MANIFEST_ACCEPT.join(", "))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type")
            .map(|c| c.split(';').next().unwrap_or_default().trim().to_string())
            .unwrap_or_default();
        let header_digest = header("docker-content-digest");
        let body = resp
            .body_mut()
            .with_config()
            .limit(8 << 20)
            .read_to_vec()
            .map_err(|e| self.transport(e, &url))?;
        match status {
            200 => {}
            404 => {
                return Err(Error::NotFound(format!(
                    "{}/{}:{reference} ({})",
                    self.host,
                    self.repo,
                    error_text(&body)
                )))
            }
            s => {
                return Err(Error::Http(format!(
                    "GET {url}: HTTP {s}: {}",
                    error_text(&body)
                )))
            }
        }
        if !MANIFEST_ACCEPT.contains(&content_type.as_str()) {
            return Err(Error::MediaType(format!(
                "manifest type {content_type:?} from {} (readable: OCI and Docker v2 manifests and indexes)",
                self.host
            )));
        }
        let actual = sha256(&body);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            header_digest
        };
        if let Some(expected) = expected {
            if expected != actual {
                return Err(Error::Digest {
                    what: format!("manifest {}/{}:{reference}", self.host, self.repo),
                    expected,
                    actual,
                });
            }
        }
        Ok((body, content_type, actual))
    }

    /// Streams the blob `digest` into the cache; it becomes visible under its name
    /// only once its digest and size are right.
    pub fn blob(
        &mut self,
        cache: &Path,
        digest: &str,
        size: u64,
        progress: &mut Progress,
    ) -> Result<()> {
        let final_path = blob_path(cache, digest)?;
        if fs::metadata(&final_path)
            .map(|m| m.len() == size)
            .unwrap_or(false)
        {
            // Cached; the build checks its digest before using it.
            progress.add_bytes(size);
            return Ok(());
        }
        let url = self.url("blobs", digest);
        let mut resp = self.get(&url, "*/*")?;
        match resp.status().as_u16() {
            200 => {}
            404 => {
                return Err(Error::NotFound(format!(
                    "blob {digest} of {}/{}",
                    self.host, self.repo
                )))
            }
            s => {
                let body = resp.body_mut().read_to_vec().unwrap_or_default();
                return Err(Error::Http(format!(
                    "GET {url}: HTTP {s}: {}",
                    error_text(&body)
                )));
            }
        }
        let partial = final_path.with_extension(format!("partial-{}", std::process::id()));
        let result = (|| {
            let mut out =
                File::create(&partial).ctx(|| format!("creating {}", partial.display()))?;
            let mut reader = HashingReader::new(
                resp.body_mut()
                    .with_config()
                    .limit(size.saturating_add(1))
                    .reader(),
            );
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::Http(format!("GET {url}: {e}"))),
                };
                out.write_all(&buf[..n])
                    .ctx(|| format!("writing {}", partial.display()))?;
                progress.add_bytes(n as u64);
            }
            out.sync_all()
                .ctx(|| format!("writing {}", partial.display()))?;
            let (actual, n) = reader.finish().ctx(|| format!("reading {url}"))?;
            if actual != digest || n != size {
                return Err(Error::Digest {
                    what: format!("blob from {url}"),
                    expected: format!("{digest} ({size} bytes)"),
                    actual: format!("{actual} ({n} bytes)"),
                });
            }
            fs::rename(&partial, &final_path).ctx(|| format!("storing {}", final_path.display()))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&partial);
        }
        result
    }
}

pub fn blob_path(cache: &Path, digest: &str) -> Result<PathBuf> {
    Ok(cache.join("blobs/sha256").join(hex_of(digest)?))
}

/// Writes a small verified blob (manifest, index) into the cache.
fn store_small(cache: &Path, digest: &str, body: &[u8]) -> Result<()> {
    let path = blob_path(cache, digest)?;
    crate::outputs::write_atomic(&path, body)
}

/// Pulls `reference` for `platform` into the layout at `cache` and names it there.
pub fn pull(
    reference: &str,
    cache: &Path,
    platform: &Platform,
    access: &Access,
    progress: &mut Progress,
) -> Result<()> {
    let r = parse_reference(reference)?;
    let mut client = Client::new(&r, access)?;
    fs::create_dir_all(cache.join("blobs/sha256"))
        .ctx(|| format!("creating {}", cache.display()))?;
    let wanted = r.digest().or(r.tag()).unwrap_or("latest").to_string();
    let (body, media_type, digest) = client.manifest(&wanted)?;
    store_small(cache, &digest, &body)?;
    let top = (media_type.clone(), digest.clone(), body.len() as u64);
    let (mut body, mut media_type) = (body, media_type);
    if media_type == layout::MT_OCI_INDEX || media_type == layout::MT_DOCKER_LIST {
        let index: ImageIndex = serde_json::from_slice(&body)
            .map_err(|e| Error::Invalid(format!("malformed image index: {e}")))?;
        let chosen = layout::pick_platform(&index, platform)?;
        let (b, mt, d) = client.manifest(chosen.digest().as_ref())?;
        store_small(cache, &d, &b)?;
        (body, media_type) = (b, mt);
    }
    debug_assert!(
        media_type == layout::MT_OCI_MANIFEST || media_type == layout::MT_DOCKER_MANIFEST
    );
    let manifest: ImageManifest = serde_json::from_slice(&body)
        .map_err(|e| Error::Invalid(format!("malformed image manifest: {e}")))?;
    let config = manifest.config();
    let total: u64 = manifest.layers().iter().map(|l| l.size()).sum::<u64>() + config.size();
    progress.start(reference, manifest.layers().len(), total);
    client.blob(cache, config.digest().as_ref(), config.size(), progress)?;
    for layer in manifest.layers() {
        client.blob(cache, layer.digest().as_ref(), layer.size(), progress)?;
        progress.layer_done();
    }
    progress.finish();
    name_in_index(cache, &r.whole(), &top)
}

/// Docker's reference rules (`nginx` is `docker.io/library/nginx:latest`).
pub fn parse_reference(reference: &str) -> Result<Reference> {
    Reference::from_str(reference)
        .map_err(|e| Error::Invalid(format!("bad image reference {reference:?}: {e}")))
}

/// Records `name → descriptor` in the layout's index.json (replacing an older entry of
/// that name), atomically.
fn name_in_index(cache: &Path, name: &str, top: &(String, String, u64)) -> Result<()> {
    let index_path = cache.join("index.json");
    let mut index: serde_json::Value = match fs::read(&index_path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::Value::Null,
    };
    if !index.is_object() {
        index = serde_json::json!({"schemaVersion": 2, "mediaType": layout::MT_OCI_INDEX, "manifests": []});
    }
    let manifests = index["manifests"]
        .as_array_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut manifests: Vec<serde_json::Value> = manifests
        .into_iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"] != name)
        .collect();
    manifests.push(serde_json::json!({
        "mediaType": top.0,
        "digest": top.1,
        "size": top.2,
        "annotations": {"org.opencontainers.image.ref.name": name},
    }));
    index["manifests"] = serde_json::Value::Array(manifests);
    crate::outputs::write_atomic(
        &cache.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let body = serde_json::to_vec_pretty(&index).expect("a JSON value serialises");
    crate::outputs::write_atomic(&index_path, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/nginx:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("basic", "Registry Realm")
        );
        let (_, p) = parse_challenge(r#"Bearer realm=https://x/t, error="invalid_token""#);
        assert_eq!(p["realm"], "https://x/t");
        assert_eq!(p["error"], "invalid_token");
    }

    #[test]
    fn docker_config_credentials() {
        let dir = std::env::temp_dir().join(format!("mergen-image-creds-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        fs::write(
            dir.join("config.json"),
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"127.0.0.1:5000":{{"username":"bob","password":"pw"}}}}}}"#),
        )
        .unwrap();
        let access = Access {
            ca_file: None,
            docker_config_dir: Some(dir.clone()),
        };
        assert_eq!(
            credentials(&access, "registry-1.docker.io").unwrap(),
            Some(("alice".into(), "s3cret:x".into()))
        );
        assert_eq!(
            credentials(&access, "127.0.0.1:5000").unwrap(),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(credentials(&access, "ghcr.io").unwrap(), None);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn docker_hub_names() {
        let r = parse_reference("nginx:alpine").unwrap();
        assert_eq!(api_host(&r), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/nginx");
        let r = parse_reference("127.0.0.1:5000/test/img@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(api_host(&r), "127.0.0.1:5000");
        assert!(r.digest().is_some());
    }
}
