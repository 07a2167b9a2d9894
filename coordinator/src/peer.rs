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
/// here; `https://host[:port]` is taken as is; plain `http://` is refused (coordinators talk
/// TLS only). A URL names a coordinator and nothing else: user info (it would replace the
/// migration's credential with a Basic authorization), a path, a query or a fragment are
/// refused, so are port 0 and a missing host. The message never repeats a password.
pub fn peer_base_url(destination: &str) -> Result<String, ApiError> {
    let trimmed = destination.trim();
    if trimmed.is_empty() {
        return Err(ApiError::bad_request("destinationUrl is empty"));
    }
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("https://{trimmed}")
    };
    let Ok(url) = reqwest::Url::parse(&with_scheme) else {
        return Err(ApiError::bad_request(format!(
            "destinationUrl {:?} is not a URL: write host:port or https://host:port",
            redacted(trimmed)
        )));
    };
    let shown = redacted(trimmed);
    let refuse = |why: &str| {
        Err(ApiError::bad_request(format!(
            "destinationUrl {shown:?} {why}; write host:port or https://host:port"
        )))
    };
    match url.scheme() {
        "https" => {}
        "http" => return refuse("is plain HTTP: coordinators talk HTTPS only"),
        other => return refuse(&format!("has the scheme {other:?}")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return refuse("carries user info (the migration's own credential authenticates it)");
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return refuse("has no host");
    };
    if url.port() == Some(0) {
        return refuse("has port 0");
    }
    if url.path() != "/" && !url.path().is_empty() {
        return refuse(&format!(
            "has a path ({:?}): it names the coordinator only",
            url.path()
        ));
    }
    if url.query().is_some() {
        return refuse("has a query: it names the coordinator only");
    }
    if url.fragment().is_some() {
        return refuse("has a fragment: it names the coordinator only");
    }
    Ok(match url.port() {
        Some(port) => format!("https://{host}:{port}"),
        None => format!("https://{host}"),
    })
}

/// `text` with the password of any user info replaced, for messages and logs.
fn redacted(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), text),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or("");
            let hidden = if user_info.contains(':') { ":***" } else { "" };
            format!("{scheme}{user}{hidden}@{host}{tail}")
        }
        None => text.to_owned(),
    }
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
    /// What the peer is to this coordinator, in errors.
    role: &'static str,
}

impl Peer {
    /// A migration's destination coordinator.
    pub fn new(client: reqwest::Client, base: String) -> Self {
        Peer {
            base,
            client,
            role: "destination coordinator",
        }
    }

    /// A migration's source coordinator (asked by its destination).
    pub fn source(client: reqwest::Client, base: String) -> Self {
        Peer {
            base,
            client,
            role: "source coordinator",
        }
    }

    async fn answer<T: DeserializeOwned>(
        &self,
        what: &str,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<T, ApiError> {
        let response = response.map_err(|e| {
            ApiError::unanswered(format!(
                "{} {} unreachable ({what}): {}",
                self.role,
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
                format!("{} ({what}): {status}: {message}", self.role),
            ));
        }
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_gateway(format!("{} ({what}): unreadable answer: {e}", self.role))
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
        assert_eq!(
            peer_base_url("[fd00::5]:8443").unwrap(),
            "https://[fd00::5]:8443"
        );
        assert_eq!(peer_base_url("https://cloud").unwrap(), "https://cloud");
    }

    #[test]
    fn a_url_names_the_coordinator_and_nothing_else() {
        for (url, why) in [
            ("https://user@cloud:30001", "user info"),
            ("https://u:s3cret@cloud:30001", "user info"),
            ("u:s3cret@cloud:30001", "user info"),
            ("https://cloud:30001/api", "path"),
            ("https://cloud:30001/?x=1", "query"),
            ("https://cloud:30001#frag", "fragment"),
            ("https://cloud:0", "port 0"),
            ("https://:30001", "URL"),
            ("cloud:99999", "URL"),
        ] {
            let e = peer_base_url(url).unwrap_err();
            assert_eq!(e.status, 400, "{url}");
            assert!(e.message.contains(why), "{url}: {}", e.message);
            assert!(!e.message.contains("s3cret"), "{url}: {}", e.message);
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted("https://u:s3cret@cloud:1/x"),
            "https://u:***@cloud:1/x"
        );
        assert_eq!(redacted("u@cloud:1"), "u@cloud:1");
        assert_eq!(redacted("cloud:1/a@b"), "cloud:1/a@b");
    }
}
