//! Serving an axum router over TLS (HTTP/1.1 and HTTP/2), one task per connection. Every request
//! carries a [`ConnectionInfo`] extension: whether it came over TLS, and the client certificate
//! chain the handshake verified, if the server asks for one (mutual TLS between coordinators).
//! Every error answer is JSON and waits for the request's body (see [`crate::answers`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::Service as _;
use tracing::Instrument as _;

use crate::answers::{json_error_answer, DrainOnError};
use crate::cert::error_chain;

/// How long a client may take to finish the TLS handshake (or, on a port that takes both, to
/// send its first byte).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connections in flight may take to finish once a shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a request's connection was, as an axum extension.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    /// The request arrived over TLS.
    pub tls: bool,
    /// The client's certificate chain, verified by the server's client verifier (end entity
    /// first); `None` when the client presented none.
    pub client_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl ConnectionInfo {
    /// The client presented a certificate the server's verifier accepted.
    pub fn has_client_certificate(&self) -> bool {
        self.client_certificates
            .as_ref()
            .is_some_and(|chain| !chain.is_empty())
    }
}

/// How a listener's connections are taken.
#[derive(Clone)]
pub enum Transport {
    /// TLS only.
    Tls(TlsAcceptor),
    /// TLS when the client starts with a TLS handshake (its first byte is 0x16), plain HTTP
    /// otherwise: one port for the kubelet's probes and local callers (plain) and for peers
    /// (TLS).
    TlsOrPlain(TlsAcceptor),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tls(_) => "Tls",
            Transport::TlsOrPlain(_) => "TlsOrPlain",
        })
    }
}

/// Accepts TLS connections on `listener` and serves `app` on each, until the task is dropped.
pub async fn serve_tls(listener: TcpListener, acceptor: TlsAcceptor, app: Router) {
    serve(
        listener,
        Transport::Tls(acceptor),
        app,
        std::future::pending::<()>(),
    )
    .await
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the connections in flight
/// finish (at most 30 s).
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let transport = transport.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(
            async move {
                let result = match accept(tcp, &transport).await {
                    Some(Accepted::Tls(tls, info)) => {
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let conn = builder.serve_connection(TokioIo::new(tls), service(app, info));
                        watcher.watch(conn).await
                    }
                    Some(Accepted::Plain(tcp)) => {
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let info = ConnectionInfo::default();
                        let conn = builder.serve_connection(TokioIo::new(tcp), service(app, info));
                        watcher.watch(conn).await
                    }
                    None => return,
                };
                if let Err(error) = result {
                    tracing::debug!(error = %error_chain(error.as_ref()), "connection ended with an error");
                }
            }
            .instrument(tracing::debug_span!("conn", %peer)),
        );
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 30 s; closing them");
    }
}

enum Accepted {
    Tls(
        Box<tokio_rustls::server::TlsStream<TcpStream>>,
        ConnectionInfo,
    ),
    Plain(TcpStream),
}

async fn accept(tcp: TcpStream, transport: &Transport) -> Option<Accepted> {
    let acceptor = match transport {
        Transport::Tls(acceptor) => acceptor,
        Transport::TlsOrPlain(acceptor) => {
            let mut first = [0u8; 1];
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == 0x16 => acceptor,
                Ok(Ok(1)) => return Some(Accepted::Plain(tcp)),
                _ => return None,
            }
        }
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return None;
        }
    };
    let info = ConnectionInfo {
        tls: true,
        client_certificates: tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|chain| Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect())),
    };
    Some(Accepted::Tls(Box::new(tls), info))
}

/// `app`, with the connection's [`ConnectionInfo`] put into every request.
fn service(
    app: Router,
    info: ConnectionInfo,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(info.clone());
        let mut app = app.clone();
        async move {
            let (parts, body) = request.into_parts();
            let (body, drain) = DrainOnError::wrap(body);
            let response = app.call(hyper::Request::from_parts(parts, body)).await?;
            let status = response.status();
            if status.is_client_error() || status.is_server_error() {
                drain.rest().await;
                Ok(json_error_answer(response).await)
            } else {
                Ok(response)
            }
        }
    })
}

/// Binds a TCP listener, with the address in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("failed to bind {addr}: {e}"))
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
}
