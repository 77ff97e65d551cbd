//! A throw-away certificate authority for tests of TLS between our daemons and the
//! servers they talk to (etcd): it issues server and client certificates and writes
//! them as the PEM files an operator would configure.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

/// A CA whose certificate is written to `<dir>/<name>-ca.pem`.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
    name: String,
    /// The CA's certificate, PEM.
    pub ca_file: PathBuf,
}

/// A certificate and its key, as two PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA (ECDSA P-256) named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("mergen test CA {name}"));
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("writing the CA certificate");
        TestCa {
            cert,
            key,
            dir: dir.to_path_buf(),
            name: name.to_string(),
            ca_file,
        }
    }

    /// A server certificate for `ips` and `localhost`. It may serve as a client
    /// certificate too: etcd's own gateway dials etcd with the server's certificate.
    pub fn server(&self, file: &str, ips: &[IpAddr]) -> Issued {
        self.server_named(file, &["localhost"], ips)
    }

    /// A server certificate for the DNS `names` and `ips`.
    pub fn server_named(&self, file: &str, names: &[&str], ips: &[IpAddr]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(file, params)
    }

    /// A client certificate whose common name is `cn` (etcd takes it as the user name
    /// when its authentication is on).
    pub fn client(&self, file: &str, cn: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, params)
    }

    fn issue(&self, file: &str, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signing a certificate");
        let issued = Issued {
            cert: self.dir.join(format!("{}-{file}.pem", self.name)),
            key: self.dir.join(format!("{}-{file}-key.pem", self.name)),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("writing a certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("writing a key");
        issued
    }
}
