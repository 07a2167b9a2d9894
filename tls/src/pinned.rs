//! TLS between two sidecars, which have no CA: each sidecar makes a throwaway self-signed
//! certificate when it starts ([`EphemeralCert`]); its SHA-256 travels to the peer over channels
//! that are already authenticated (the coordinators' mutual TLS), and the peer accepts exactly
//! that certificate ([`pinned_client_config`]) — no CA, no name check, no private key outside
//! the process that made it.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

use crate::cert::{crypto_provider, TlsError};

/// The SHA-256 of a certificate (DER), lowercase hex: what is pinned.
pub fn certificate_sha256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A self-signed certificate made in memory, its key never written anywhere.
#[derive(Clone)]
pub struct EphemeralCert {
    config: Arc<ServerConfig>,
    sha256: String,
}

impl std::fmt::Debug for EphemeralCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EphemeralCert")
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl EphemeralCert {
    /// A fresh ECDSA P-256 key and a certificate for `name`, valid from now for a year (the
    /// sidecar makes a new one each start).
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![name.to_owned()])
                .map_err(|e| TlsError::Generate(e.to_string()))?;
        let der: CertificateDer<'static> = cert.der().clone();
        let sha256 = certificate_sha256(&der);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![der], key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(EphemeralCert {
            config: Arc::new(config),
            sha256,
        })
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    /// The pin peers are given.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// A client configuration that accepts one server certificate: the one whose SHA-256 is `pin`
/// (hex), the handshake signed by its key. TLS 1.3 only.
pub fn pinned_client_config(pin: &str) -> Result<ClientConfig, TlsError> {
    let pin = pin.trim().to_ascii_lowercase();
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::BadPin(pin));
    }
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedServerCert {
        sha256: pin,
        provider: provider.clone(),
    });
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[derive(Debug)]
struct PinnedServerCert {
    sha256: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if certificate_sha256(end_entity) == self.sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why an HTTP client for a peer could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("the peer's certificate pin: {0}")]
    Pin(#[source] TlsError),
    #[error("failed to build HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// The HTTP client one migration agent sends to another with: over TLS, it accepts only the
/// certificate pinned by `pin` (what the peer's `GET /tls` said, passed on by the coordinator);
/// connecting gives up after 10 s.
pub fn pinned_http_client(pin: Option<&str>) -> Result<reqwest::Client, ClientError> {
    // A client without a pin (plain HTTP) takes the process's default provider.
    let _ = (*crypto_provider()).clone().install_default();
    let mut builder =
        reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10));
    if let Some(pin) = pin {
        builder =
            builder.tls_backend_preconfigured(pinned_client_config(pin).map_err(ClientError::Pin)?);
    }
    builder.build().map_err(ClientError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A handshake over loopback: the pinned certificate is accepted, any other refused.
    #[tokio::test]
    async fn a_client_accepts_the_pinned_certificate_only() {
        let server = EphemeralCert::generate("ums-sidecar").unwrap();
        let other = EphemeralCert::generate("ums-sidecar").unwrap();
        assert_ne!(server.sha256(), other.sha256());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"hello").await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        let connect = |pin: String| async move {
            let connector =
                tokio_rustls::TlsConnector::from(Arc::new(pinned_client_config(&pin).unwrap()));
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            let mut text = String::new();
            tls.read_to_string(&mut text).await?;
            Ok::<_, std::io::Error>(text)
        };
        assert_eq!(connect(server.sha256().to_owned()).await.unwrap(), "hello");
        let refused = connect(other.sha256().to_owned()).await.unwrap_err();
        assert!(
            refused.to_string().contains("invalid peer certificate"),
            "{refused}"
        );
        assert!(matches!(
            pinned_client_config("abc"),
            Err(TlsError::BadPin(_))
        ));
    }
}
