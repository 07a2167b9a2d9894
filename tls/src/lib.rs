//! `ums-tls`: the TLS serving shared by UMS-rs's HTTPS servers (the admission webhook, the
//! coordinator, the sidecar): a certificate re-read when its mounted files change, an axum
//! router served over it (with the client's verified certificate, for mutual TLS between
//! coordinators), and throwaway pinned certificates for TLS between sidecars.

pub mod answers;
pub mod cert;
pub mod pinned;
pub mod serve;

pub use cert::{crypto_provider, error_chain, ReloadingCert, TlsError};
pub use pinned::{
    certificate_sha256, pinned_client_config, pinned_http_client, ClientError, EphemeralCert,
};
pub use serve::{bind, serve, serve_tls, shutdown_signal, ConnectionInfo, Transport};
