//! A TLS client for tests and benchmarks against servers with self-signed certificates.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// A client configuration (ring, rustls' safe default versions) that trusts any
/// certificate; handshake signatures are still checked. It keeps session tickets, so a
/// second connection made with the same configuration can resume.
pub fn accept_any_client_config() -> ClientConfig {
    config(true)
}

/// Like [`accept_any_client_config`], without checking the handshake signatures either:
/// for load generators, which spare themselves a signature verification per handshake
/// (the server still signs; check it once with the verifying configuration).
pub fn unverified_client_config() -> ClientConfig {
    config(false)
}

fn config(check_signatures: bool) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("rustls' default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny {
            provider,
            check_signatures,
        }))
        .with_no_client_auth()
}

/// The first flight of a real rustls client (its ClientHello, one record), asking for
/// `server` with `alpn`; TLS 1.2 only when `tls12_only`.
pub fn client_hello(server: &str, alpn: &[&[u8]], tls12_only: bool) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("rustls' protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from(server.to_string()).expect("a server name");
    let mut conn = ClientConnection::new(Arc::new(config), name).expect("a client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("writing to memory");
    }
    out
}

/// The handshake bytes of a one-record hello, re-cut into records of `size` bytes.
pub fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
    assert_eq!(hello[0], 0x16, "a handshake record");
    let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
    let mut out = Vec::new();
    for chunk in hello[5..5 + len].chunks(size) {
        out.extend_from_slice(&[0x16, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[derive(Debug)]
struct AcceptAny {
    provider: Arc<CryptoProvider>,
    check_signatures: bool,
}

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.check_signatures {
            return Ok(HandshakeSignatureValid::assertion());
        }
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.check_signatures {
            return Ok(HandshakeSignatureValid::assertion());
        }
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
