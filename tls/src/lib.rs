//! `ums-tls`: the TLS serving shared by UMS-rs's HTTPS servers (the admission webhook, the
//! coordinator): a certificate re-read when its mounted files change, and an axum router served
//! over it.

pub mod cert;
pub mod serve;

pub use cert::{crypto_provider, error_chain, ReloadingCert, TlsError};
pub use serve::{bind, serve_tls, shutdown_signal};
