//! Self-signed certificates for `*.localhost` and `localhost`, made by the openssl CLI so
//! every server under test loads the same files in the form operators have.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The certificates: ECDSA P-256 (every load but one) and RSA-2048 (the RSA row), both
/// for `*.localhost` and `localhost`, made by the openssl CLI.
pub struct Certs {
    pub ecdsa: CertFiles,
    pub rsa: CertFiles,
}

pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one file (HAProxy, hitch).
    pub combined: PathBuf,
}

impl Certs {
    pub fn make(dir: &Path) -> Result<Certs, String> {
        Ok(Certs {
            ecdsa: make_cert(dir, "ecdsa", &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"])?,
            rsa: make_cert(dir, "rsa", &["rsa:2048"])?,
        })
    }
}

fn make_cert(dir: &Path, name: &str, newkey: &[&str]) -> Result<CertFiles, String> {
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        combined: dir.join(format!("{name}.pem")),
    };
    crate::spawn::output(
        Command::new("openssl")
            .args(["req", "-x509", "-nodes", "-days", "30", "-newkey"])
            .args(newkey)
            .arg("-keyout")
            .arg(&files.key)
            .arg("-out")
            .arg(&files.cert)
            .args([
                "-subj",
                "/CN=*.localhost",
                "-addext",
                "subjectAltName=DNS:*.localhost,DNS:localhost",
            ]),
    )?;
    let mut pem = read(&files.cert)?;
    pem.extend(read(&files.key)?);
    write(&files.combined, &pem)?;
    Ok(files)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}
