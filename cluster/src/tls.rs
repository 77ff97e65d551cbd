//! TLS to etcd: the CA to trust and this host's client certificate, read from PEM
//! files at start-up so that a missing or unreadable file stops the daemon with the
//! name of its variable, not a handshake failing later.

use std::fmt;
use std::path::{Path, PathBuf};

use etcd_client::{Certificate, Identity, TlsOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// What `https://` endpoints are dialled with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The CA certificates etcd's certificate must chain to; `None`: the system's
    /// store (`/etc/ssl/certs`).
    pub ca: Option<PemFile>,
    /// This host's certificate and key, for members that require client certificates
    /// (`--client-cert-auth`).
    pub identity: Option<(PemFile, PemFile)>,
}

impl Tls {
    /// The client's TLS options (rustls with ring, as every TLS of ours).
    pub(crate) fn options(&self) -> TlsOptions {
        let mut options = TlsOptions::new();
        options = match &self.ca {
            Some(ca) => options.ca_certificate(Certificate::from_pem(&ca.pem)),
            None => options.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            options = options.identity(Identity::from_pem(&cert.pem, &key.pem));
        }
        options
    }
}

/// A PEM file as read at start-up. Its `Debug` shows the path only: a key's bytes
/// never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: PathBuf,
    pem: Vec<u8>,
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

impl PemFile {
    fn read(path: &str) -> Result<PemFile, String> {
        let pem = std::fs::read(path).map_err(|e| format!("a readable PEM file ({e})"))?;
        Ok(PemFile {
            path: Path::new(path).to_path_buf(),
            pem,
        })
    }

    /// One or more CA certificates.
    pub fn ca(path: &str) -> Result<PemFile, String> {
        let file = PemFile::read(path)?;
        file.certificates("CA certificates")?;
        Ok(file)
    }

    /// A certificate chain, the host's own certificate first.
    pub fn certificate(path: &str) -> Result<PemFile, String> {
        let file = PemFile::read(path)?;
        file.certificates("a certificate chain")?;
        Ok(file)
    }

    /// A private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub fn key(path: &str) -> Result<PemFile, String> {
        let file = PemFile::read(path)?;
        // The parse error names no part of the key.
        PrivateKeyDer::from_pem_slice(&file.pem)
            .map_err(|e| format!("a PEM file with a private key ({e})"))?;
        Ok(file)
    }

    fn certificates(&self, what: &str) -> Result<usize, String> {
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&self.pem) {
            cert.map_err(|e| format!("a PEM file of {what} ({e})"))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("a PEM file of {what} (it has no CERTIFICATE)"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_wrong_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("mergen-cluster-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        std::fs::write(path("empty.pem"), "").unwrap();
        std::fs::write(
            path("junk.pem"),
            "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();

        let missing = PemFile::ca(&path("missing.pem")).unwrap_err();
        assert!(missing.contains("No such file"), "{missing}");
        let empty = PemFile::ca(&path("empty.pem")).unwrap_err();
        assert!(empty.contains("no CERTIFICATE"), "{empty}");
        assert!(PemFile::certificate(&path("junk.pem")).is_err());
        let no_key = PemFile::key(&path("empty.pem")).unwrap_err();
        assert!(no_key.contains("private key"), "{no_key}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
