//! Talking to the other cluster's coordinator: mutual TLS, its certificate verified against the
//! configured peer CAs (never the system's roots, never unverified), ours presented to it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::ApiError;

/// Failure to set up the peer client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerConfigError {
    #[error("failed to read peer CA file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("peer CA file {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("failed to build the HTTPS client: {0}")]
    Client(String),
}

/// The peer CAs, from PEM files.
pub fn peer_roots(ca_files: &[PathBuf]) -> Result<rustls::RootCertStore, PeerConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for path in ca_files {
        let pem = std::fs::read(path).map_err(|source| PeerConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let mut found = false;
        for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
            roots
                .add(cert)
                .map_err(|e| PeerConfigError::Client(e.to_string()))?;
            found = true;
        }
        if !found {
            return Err(PeerConfigError::NoCertificate { path: path.clone() });
        }
    }
    Ok(roots)
}

/// An HTTPS client that trusts exactly the peer CAs and presents `identity` (this
/// coordinator's own certificate, reloaded with it) as its client certificate.
pub fn peer_client(
    ca_files: &[PathBuf],
    identity: Arc<ums_tls::ReloadingCert>,
) -> Result<reqwest::Client, PeerConfigError> {
    let roots = peer_roots(ca_files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PeerConfigError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(identity);
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| PeerConfigError::Client(e.to_string()))
}

/// The base URL of a peer from what a user wrote: UMS's `host:port` (no scheme) means HTTPS
/// here; `https://...` is taken as is; plain `http://` is refused (coordinators talk TLS only).
pub fn peer_base_url(destination: &str) -> Result<String, ApiError> {
    let trimmed = destination.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(ApiError::bad_request("destinationUrl is empty"));
    }
    if trimmed.starts_with("http://") {
        return Err(ApiError::bad_request(format!(
            "destinationUrl {trimmed:?}: coordinators talk HTTPS only; write host:port or https://host:port"
        )));
    }
    let url = if trimmed.starts_with("https://") {
        trimmed.to_owned()
    } else if trimmed.contains("://") {
        return Err(ApiError::bad_request(format!(
            "destinationUrl {trimmed:?} has an unsupported scheme"
        )));
    } else {
        format!("https://{trimmed}")
    };
    reqwest::Url::parse(&url)
        .map_err(|e| ApiError::bad_request(format!("destinationUrl {destination:?}: {e}")))?;
    Ok(url)
}

/// What a coordinator says about itself (`GET /`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub service: String,
    pub version: String,
    pub cluster: String,
    pub interfaces: Vec<String>,
    /// The key the cluster's webhook must hand its sidecars (`UMS_COORDINATOR_KEYS`).
    #[serde(default)]
    pub public_key: String,
}

/// The other cluster's coordinator.
#[derive(Debug, Clone)]
pub struct Peer {
    pub base: String,
    client: reqwest::Client,
}

impl Peer {
    pub fn new(client: reqwest::Client, base: String) -> Self {
        Peer { base, client }
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        what: &str,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ApiError> {
        let response = response.map_err(|e| {
            ApiError::bad_gateway(format!(
                "destination coordinator {} unreachable ({what}): {}",
                self.base,
                error_chain(&e)
            ))
        })?;
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ApiError::from_peer(
                status,
                format!("destination coordinator ({what}): {status}: {message}"),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_gateway(format!(
                "destination coordinator ({what}): unreadable answer: {e}"
            ))
        })
    }

    pub async fn identity(&self) -> Result<Identity, ApiError> {
        let response = self
            .client
            .get(format!("{}/", self.base))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        self.answer("identity", response).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        self.post_with(path, body, None, timeout).await
    }

    /// As [`Peer::post`], with the migration credential the peer issued.
    pub async fn post_with<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        credential: Option<&str>,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .timeout(timeout);
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        let response = request.send().await;
        self.answer(path, response).await
    }
}

pub use ums_tls::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ums_host_port_means_https() {
        assert_eq!(
            peer_base_url("cloud.example:30001").unwrap(),
            "https://cloud.example:30001"
        );
        assert_eq!(
            peer_base_url("https://10.0.0.5:8443/").unwrap(),
            "https://10.0.0.5:8443"
        );
        assert_eq!(peer_base_url("http://x:1").unwrap_err().status, 400);
        assert_eq!(peer_base_url("ftp://x:1").unwrap_err().status, 400);
        assert_eq!(peer_base_url(" ").unwrap_err().status, 400);
    }
}
