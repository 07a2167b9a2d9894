//! A serving certificate, re-read when the mounted files change.
//!
//! Kubernetes updates a mounted Secret by swapping a `..data` symlink, which inotify on the
//! file paths does not see. So the files are polled: their bytes are compared with what was
//! last loaded, and a changed pair is parsed, checked (key matches certificate) and swapped in
//! atomically. New TLS handshakes get the new certificate; a broken or half-written pair is
//! logged and the previous certificate stays in service.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig, SignatureScheme};

/// Failure to load the serving certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("failed to parse a PEM certificate from {path}")]
    NoCertificate { path: PathBuf },
    /// The key file holds no PEM private key.
    #[error("failed to parse a PEM private key from {path}")]
    NoKey { path: PathBuf },
    /// rustls refused the key, or the key does not belong to the certificate.
    #[error("failed to use the certificate and key")]
    Rustls(#[from] rustls::Error),
    /// The CAs that verify clients cannot be used.
    #[error("failed to use the client CAs: {0}")]
    ClientCas(String),
    /// A certificate could not be made.
    #[error("failed to generate a certificate: {0}")]
    Generate(String),
    /// A pinned certificate digest is not 64 hex digits.
    #[error("certificate pin {0:?} is not a SHA-256 in hex (64 digits)")]
    BadPin(String),
}

/// The crypto provider used everywhere in the webhook (ring: no C toolchain beyond cc needed).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves the current certificate to every handshake and reloads it when the files change.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    loaded_bytes: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair once; fails if it cannot be used.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = crypto_provider();
        let (cert_bytes, key_bytes) = read_pair(cert_path, key_path)?;
        let key = certified_key(cert_path, key_path, &cert_bytes, &key_bytes, &provider)?;
        Ok(Arc::new(ReloadingCert {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: ArcSwap::from_pointee(key),
            loaded_bytes: Mutex::new((cert_bytes, key_bytes)),
        }))
    }

    /// Re-reads the files; swaps the certificate in if they changed and are usable.
    /// Returns whether a new certificate is now served.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let (cert_bytes, key_bytes) = read_pair(&self.cert_path, &self.key_path)?;
        let mut loaded = self
            .loaded_bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if loaded.0 == cert_bytes && loaded.1 == key_bytes {
            return Ok(false);
        }
        let key = certified_key(
            &self.cert_path,
            &self.key_path,
            &cert_bytes,
            &key_bytes,
            &self.provider,
        )?;
        self.current.store(Arc::new(key));
        *loaded = (cert_bytes, key_bytes);
        Ok(true)
    }

    /// Polls the files every `interval` until the task is dropped.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(cert = %self.cert_path.display(), "reloaded serving certificate")
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(
                    error = %error_chain(&error),
                    "serving certificate changed but cannot be used yet; keeping the previous one"
                ),
            }
        }
    }

    /// A rustls server configuration that resolves to this certificate: TLS 1.3 and 1.2 only,
    /// ALPN h2 and http/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ReloadingCert {
    /// As [`ReloadingCert::server_config`], and asks clients for a certificate, verified
    /// against `client_cas`: a client may still connect without one (the handlers decide what
    /// needs it, see `ConnectionInfo`), but one that presents an unverifiable certificate is
    /// refused in the handshake.
    pub fn server_config_with_client_cas(
        self: &Arc<Self>,
        client_cas: RootCertStore,
    ) -> Result<ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(client_cas),
            self.provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::ClientCas(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The same certificate presented as a client's (a coordinator to its peers), reloaded too.
impl ResolvesClientCert for ReloadingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    Ok((read(cert_path)?, read(key_path)?))
}

fn certified_key(
    cert_path: &Path,
    key_path: &Path,
    cert_bytes: &[u8],
    key_bytes: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate {
            path: cert_path.to_owned(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_bytes).map_err(|_| TlsError::NoKey {
        path: key_path.to_owned(),
    })?;
    Ok(CertifiedKey::from_der(chain, key, provider)?)
}

/// An error and its sources on one line (one implementation for every UMS-rs crate).
pub use ums_contract::agent::error_chain;
