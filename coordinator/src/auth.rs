//! Who may call what on the coordinator's API:
//! - anyone: `GET /` (identity, public key), `GET /healthz`, `GET /metrics`;
//! - operators: `POST /migrate`, `GET /migrations`, `GET /migrations/{id}`, with
//!   `Authorization: Bearer <token>`, one of the tokens in `--api-tokens` (a Secret);
//! - peer coordinators: `POST /create`, `/restore`, `/delete`, `/outcome`, over mutual TLS (a client
//!   certificate signed by one of the `--peer-ca` CAs); `/restore` also needs the migration
//!   credential this coordinator returned from that migration's `/create` (`Authorization:
//!   Bearer`), which opens nothing but that one migration; `/delete` acts only on a copy that
//!   is still passive and carries the migration id it names; `/outcome` only answers.
//!
//! No credential, or one that does not verify: 401; a valid credential on a route it does not
//! open: 403.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ums_contract::credential::{constant_time_eq, now_unix, verify, Claims, Scope};
use ums_tls::ConnectionInfo;

use crate::error::ApiError;
use crate::state::Coordinator;

/// Failure to read the operators' tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("failed to read the API tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API tokens file {path} holds no token (one per line)")]
    Empty { path: PathBuf },
}

/// The operators' bearer tokens: one per line, blank lines and `#` comments ignored. Read on
/// each check, so a rotated Secret takes effect without a restart.
#[derive(Debug, Clone)]
pub struct ApiTokens {
    path: PathBuf,
}

impl ApiTokens {
    /// Checks that the file is readable and holds a token.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let tokens = ApiTokens {
            path: path.to_owned(),
        };
        if tokens.read()?.is_empty() {
            return Err(AuthError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(tokens)
    }

    fn read(&self) -> Result<Vec<String>, AuthError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| AuthError::Read {
            path: self.path.clone(),
            source,
        })?;
        Ok(parse_tokens(&text))
    }

    /// Whether `presented` is one of the tokens (a file that cannot be read now opens nothing).
    pub fn accepts(&self, presented: &str) -> bool {
        match self.read() {
            Ok(tokens) => tokens
                .iter()
                .any(|t| constant_time_eq(t.as_bytes(), presented.as_bytes())),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check an operator's token");
                false
            }
        }
    }
}

fn parse_tokens(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Which caller a route is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Anyone,
    Operator,
    /// A peer coordinator (mutual TLS); `with_credential`: also the migration's credential.
    Peer {
        with_credential: bool,
    },
    /// The sender of a migration's checkpoint archives (the source's node): the upload
    /// credential this coordinator issued for it, and nothing else.
    Uploader,
}

/// The audience of a request (unknown routes are left to the router's 404).
pub fn audience(method: &axum::http::Method, path: &str) -> Audience {
    use axum::http::Method;
    match (method, path) {
        (&Method::POST, "/migrate") => Audience::Operator,
        (&Method::GET, "/migrations") => Audience::Operator,
        (&Method::GET, p) if p.starts_with("/migrations/") => Audience::Operator,
        (&Method::POST, p) if p.starts_with("/migrations/") && p.ends_with("/abort") => {
            Audience::Operator
        }
        (&Method::POST, "/create") => Audience::Peer {
            with_credential: false,
        },
        (&Method::POST, "/restore") => Audience::Peer {
            with_credential: true,
        },
        // Deleting needs no migration credential: a source whose /create call broke off
        // never received one, and /delete removes only a copy that is still passive and
        // carries the migration's id.
        (&Method::POST, "/delete") => Audience::Peer {
            with_credential: false,
        },
        (&Method::POST, "/checkpoint-uploads") => Audience::Peer {
            with_credential: false,
        },
        (&Method::PUT, p) if p.starts_with("/checkpoints/") => Audience::Uploader,
        (&Method::PUT, p) if p.starts_with("/checkpoint-volumes/") => Audience::Uploader,
        // A destination asking what became of a migration: an answer, never an action.
        (&Method::POST, "/outcome") => Audience::Peer {
            with_credential: false,
        },
        // The API server's call of the eviction webhook: it only answers, and what it starts
        // (an opted-in pod's move off its node) is what the eviction asked for.
        (&Method::POST, "/admission/eviction") => Audience::Anyone,
        _ => Audience::Anyone,
    }
}

/// The audience string of a coordinator's migration credentials.
pub fn credential_audience(cluster: &str) -> String {
    format!("coordinator:{cluster}")
}

/// Where the handlers of `/restore` and `/delete` find the verified migration credential.
#[derive(Debug, Clone)]
pub struct MigrationCredential(pub Claims);

impl MigrationCredential {
    /// 403 unless the credential is for `migration_id`.
    pub fn check(&self, migration_id: &str) -> Result<(), ApiError> {
        if self.0.mid.as_deref() == Some(migration_id) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "the migration credential is for migration {}, not {migration_id}",
                    self.0.mid.as_deref().unwrap_or("?")
                ),
            ))
        }
    }
}

fn unauthorized(message: impl Into<String>) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"ums-coordinator\""),
    );
    response
}

fn forbidden(message: impl Into<String>) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, message).into_response()
}

/// The middleware: lets a request through only with the credential its route needs.
pub async fn require_credential(
    State(c): State<Arc<Coordinator>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let audience = audience(request.method(), &path);
    if audience == Audience::Anyone {
        return next.run(request).await;
    }
    let peer_verified = request
        .extensions()
        .get::<ConnectionInfo>()
        .is_some_and(ConnectionInfo::has_client_certificate);
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("")
        .to_owned();
    let migration_claims = || {
        verify(
            &bearer,
            std::slice::from_ref(&c.signing_key_public),
            &[credential_audience(&c.cluster)],
            now_unix(),
        )
        .ok()
        .filter(|claims| claims.scope == Scope::Migration)
    };
    match audience {
        Audience::Anyone => next.run(request).await,
        Audience::Uploader => {
            let claims = verify(
                &bearer,
                std::slice::from_ref(&c.signing_key_public),
                &[crate::checkpoint_upload::upload_audience(&c.cluster)],
                now_unix(),
            )
            .ok()
            .filter(|claims| claims.scope == Scope::Migration);
            match claims {
                Some(claims) => {
                    request.extensions_mut().insert(MigrationCredential(claims));
                    next.run(request).await
                }
                None if bearer.is_empty() => unauthorized(format!(
                    "{path} needs the migration's upload credential (POST /checkpoint-uploads)"
                )),
                None => unauthorized(
                    "the upload credential is not one this coordinator issued, or it expired",
                ),
            }
        }
        Audience::Operator => {
            if !bearer.is_empty() && c.api_tokens.accepts(&bearer) {
                return next.run(request).await;
            }
            if peer_verified || migration_claims().is_some() {
                return forbidden(format!(
                    "{path} is for operators (an API token): a peer coordinator's credential does not open it"
                ));
            }
            if bearer.is_empty() {
                unauthorized(format!(
                    "{path} needs an operator's token (Authorization: Bearer <token from the ums-coordinator-api Secret>)"
                ))
            } else {
                unauthorized("the token is not one of this coordinator's API tokens")
            }
        }
        Audience::Peer { with_credential } => {
            if !peer_verified {
                if !bearer.is_empty() && c.api_tokens.accepts(&bearer) {
                    return forbidden(format!(
                        "{path} is for peer coordinators (mutual TLS): an operator's token does not open it"
                    ));
                }
                return unauthorized(format!(
                    "{path} is for peer coordinators: present a client certificate signed by a peer CA"
                ));
            }
            if !with_credential {
                return next.run(request).await;
            }
            if bearer.is_empty() {
                return unauthorized(format!(
                    "{path} needs the migration credential the /create answer returned (Authorization: Bearer)"
                ));
            }
            match migration_claims() {
                Some(claims) => {
                    request.extensions_mut().insert(MigrationCredential(claims));
                    next.run(request).await
                }
                None => unauthorized(
                    "the migration credential is not one this coordinator issued, or it expired",
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn routes_have_their_audience() {
        assert_eq!(audience(&Method::POST, "/migrate"), Audience::Operator);
        assert_eq!(
            audience(&Method::PUT, "/checkpoints/m1/main"),
            Audience::Uploader
        );
        assert_eq!(
            audience(&Method::PUT, "/checkpoint-volumes/m1"),
            Audience::Uploader
        );
        assert_eq!(
            audience(&Method::POST, "/checkpoint-uploads"),
            Audience::Peer {
                with_credential: false
            }
        );
        assert_eq!(audience(&Method::GET, "/migrations/m1"), Audience::Operator);
        assert_eq!(
            audience(&Method::POST, "/migrations/m1/abort"),
            Audience::Operator
        );
        assert_eq!(
            audience(&Method::POST, "/create"),
            Audience::Peer {
                with_credential: false
            }
        );
        assert_eq!(
            audience(&Method::POST, "/restore"),
            Audience::Peer {
                with_credential: true
            }
        );
        for open in ["/", "/healthz", "/metrics"] {
            assert_eq!(audience(&Method::GET, open), Audience::Anyone);
        }
    }

    #[test]
    fn token_files_take_one_token_per_line() {
        assert_eq!(
            parse_tokens("# operators\n  abc  \n\nxyz\n"),
            vec!["abc".to_owned(), "xyz".to_owned()]
        );
        let dir = std::env::temp_dir().join(format!("ums-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens");
        std::fs::write(&file, "# none\n").unwrap();
        assert!(matches!(
            ApiTokens::load(&file),
            Err(AuthError::Empty { .. })
        ));
        std::fs::write(&file, "s3cret\n").unwrap();
        let tokens = ApiTokens::load(&file).unwrap();
        assert!(tokens.accepts("s3cret"));
        assert!(!tokens.accepts("s3cre"));
        assert!(!tokens.accepts(""));
        // Rotated without a restart.
        std::fs::write(&file, "n3w\n").unwrap();
        assert!(!tokens.accepts("s3cret") && tokens.accepts("n3w"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_migration_credential_opens_its_migration_only() {
        let credential = MigrationCredential(Claims {
            aud: credential_audience("cloud"),
            scope: Scope::Migration,
            exp: u64::MAX,
            mid: Some("m1".into()),
            uid: None,
        });
        assert!(credential.check("m1").is_ok());
        assert_eq!(
            credential.check("m2").unwrap_err().status,
            StatusCode::FORBIDDEN
        );
    }
}
