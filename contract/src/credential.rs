//! Credentials for a wrapped pod's sidecar: short-lived tokens a cluster's coordinator signs
//! (Ed25519) and the sidecar verifies with the coordinator's public key, which the webhook puts
//! into the runtime container. No secret is shared with the pod: the sidecar holds only public
//! keys.
//!
//! A token is `ums1.<payload>.<signature>` (both base64url without padding): the payload is
//! the JSON of [`Claims`], the signature is over the bytes `ums1.<payload>`. A token names the
//! pod it is for, by IP (`aud`) and by UID (`uid`: pod IPs are reused within seconds, UIDs
//! never), its scope and its expiry, and, for a peer's token, the one migration it serves.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "ums1.";

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The pod's own coordinator: every endpoint.
    Coordinator,
    /// Another pod's sidecar sending one migration here: `/info`, `/restore/preflight` and
    /// `/restore` only.
    Peer,
    /// A peer coordinator finishing (`/restore`) or abandoning (`/delete`) one migration at the
    /// coordinator that signed it (`aud` is `coordinator:<cluster>`); no sidecar takes it.
    Migration,
}

/// The signed content of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The pod IP the token is for.
    pub aud: String,
    pub scope: Scope,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// The migration a peer token serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid: Option<String>,
    /// The UID of the pod the token is for (a pod that got the IP later has another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl Claims {
    /// Whether the token is for the pod whose UID is `pod_uid` (the sidecar reads it from the
    /// downward API). A sidecar that knows its UID takes only tokens that name it.
    pub fn check_uid(&self, pod_uid: Option<&str>) -> Result<(), CredentialError> {
        match pod_uid {
            None => Ok(()),
            Some(uid) if self.uid.as_deref() == Some(uid) => Ok(()),
            Some(_) => Err(CredentialError::WrongPodUid {
                uid: self.uid.clone().unwrap_or_else(|| "none".into()),
            }),
        }
    }
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    #[error("not a UMS token")]
    Malformed,
    #[error("the token's signature is not from a trusted coordinator")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is for {aud}, not for this pod")]
    WrongPod { aud: String },
    #[error(
        "the token is for the pod with UID {uid}, not for this pod (its IP was another pod's)"
    )]
    WrongPodUid { uid: String },
    #[error("a public key is not base64 Ed25519: {0}")]
    BadKey(String),
    #[error("the signing key is not an Ed25519 PKCS#8 key")]
    BadSigningKey,
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A coordinator's signing key.
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// From PKCS#8 DER, as [`SigningKey::generate`] or
    /// `openssl genpkey -algorithm ed25519 -outform DER` make it.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CredentialError> {
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(|pair| SigningKey { pair })
            .map_err(|_| CredentialError::BadSigningKey)
    }

    /// A new key, as PKCS#8 DER (to be stored in a Secret).
    pub fn generate() -> Result<Vec<u8>, CredentialError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| CredentialError::BadSigningKey)
    }

    /// The public key, base64 (what the webhook hands the sidecars).
    pub fn public_key(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref())
    }

    /// The public key's 32 bytes (what [`verify`] takes).
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let signed = format!("{PREFIX}{payload}");
        let signature = URL_SAFE_NO_PAD.encode(self.pair.sign(signed.as_bytes()).as_ref());
        format!("{signed}.{signature}")
    }
}

/// Parses comma-separated base64 public keys.
pub fn parse_public_keys(text: &str) -> Result<Vec<Vec<u8>>, CredentialError> {
    text.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            let key = URL_SAFE_NO_PAD
                .decode(k)
                .map_err(|e| CredentialError::BadKey(e.to_string()))?;
            if key.len() != 32 {
                return Err(CredentialError::BadKey(format!(
                    "{} bytes, an Ed25519 key has 32",
                    key.len()
                )));
            }
            Ok(key)
        })
        .collect()
}

/// Verifies `token` against `keys`, for a pod whose IPs are `pod_ips`, at `now`.
pub fn verify(
    token: &str,
    keys: &[Vec<u8>],
    pod_ips: &[String],
    now: u64,
) -> Result<Claims, CredentialError> {
    let rest = token
        .strip_prefix(PREFIX)
        .ok_or(CredentialError::Malformed)?;
    let (payload, signature) = rest.split_once('.').ok_or(CredentialError::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| CredentialError::Malformed)?;
    let signed = &token[..PREFIX.len() + payload.len()];
    let trusted = keys.iter().any(|key| {
        UnparsedPublicKey::new(&ED25519, key)
            .verify(signed.as_bytes(), &signature)
            .is_ok()
    });
    if !trusted {
        return Err(CredentialError::BadSignature);
    }
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|p| serde_json::from_slice(&p).ok())
        .ok_or(CredentialError::Malformed)?;
    if claims.exp <= now {
        return Err(CredentialError::Expired);
    }
    if !pod_ips.contains(&claims.aud) {
        return Err(CredentialError::WrongPod { aud: claims.aud });
    }
    Ok(claims)
}

/// A request to a migration agent (a wrapped pod's sidecar, an ff pod's `ums-ff`), as far as
/// its credential is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    /// The request's path.
    pub path: &'a str,
    /// Whether it came over TLS (a peer's token is taken over TLS only).
    pub over_tls: bool,
    /// The agent's pod UID (downward API), where it knows it.
    pub pod_uid: Option<&'a str>,
    /// The migration the agent's pod is under now (its `migration-id` annotation).
    pub pod_migration: Option<&'a str>,
}

/// Why an agent refuses a request: 401 (no or a bad credential) or 403 (a good credential
/// that does not open this).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
}

/// What an agent answers a request without `Authorization: Bearer ...`.
pub const CREDENTIAL_REQUIRED: &str = "a credential is required (Authorization: Bearer ...): only the pod's coordinator may call this endpoint";

/// The token an `Authorization` header value carries (`""` where it carries none).
pub fn bearer(header: Option<&str>) -> &str {
    header.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("")
}

/// The paths a peer's token opens: what the source's agent calls at the destination's.
pub fn peer_may_call(path: &str) -> bool {
    matches!(path, "/info" | "/restore/preflight" | "/restore")
        || path.starts_with("/restore/pages/")
}

/// Whether the coordinator-signed token `presented` lets `access` through an agent that
/// trusts `keys` and has the addresses `pod_ips`: the coordinator's token opens everything;
/// a peer's token, over TLS only, opens [`peer_may_call`]'s paths of the migration the pod is
/// under now (of page streams, only that migration's); nothing else opens anything.
pub fn authorize(
    presented: &str,
    keys: &[Vec<u8>],
    pod_ips: &[String],
    now: u64,
    access: &Access<'_>,
) -> Result<Claims, Refusal> {
    let refused = |e: CredentialError| Refusal::Unauthorized(format!("credential refused: {e}"));
    let claims = verify(presented, keys, pod_ips, now).map_err(refused)?;
    if claims.scope == Scope::Peer && !access.over_tls {
        return Err(Refusal::Forbidden(
            "a peer's token is taken over TLS only (https:// with the certificate GET /tls names)"
                .into(),
        ));
    }
    claims.check_uid(access.pod_uid).map_err(refused)?;
    let path = access.path;
    match claims.scope {
        Scope::Coordinator => Ok(claims),
        Scope::Peer => {
            let token_mid = claims.mid.as_deref().unwrap_or("");
            if access.pod_migration != Some(token_mid) {
                return Err(Refusal::Forbidden(format!(
                    "a peer's token for migration {token_mid:?}, and this pod is under {}",
                    access
                        .pod_migration
                        .map_or("no migration".to_owned(), |m| format!("migration {m:?}"))
                )));
            }
            if let Some(stream) = path.strip_prefix("/restore/pages/") {
                if stream != token_mid {
                    return Err(Refusal::Forbidden(format!(
                        "a peer's token for migration {token_mid:?} does not open the page stream of {stream:?}"
                    )));
                }
            }
            if peer_may_call(path) {
                Ok(claims)
            } else {
                Err(Refusal::Forbidden(format!(
                    "a peer's token (migration {token_mid}) does not allow {path}"
                )))
            }
        }
        Scope::Migration => Err(Refusal::Forbidden(format!(
            "a coordinator's migration token does not allow {path} at a pod"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_token_verifies_only_for_its_pod_before_expiry_with_the_right_key() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let other = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let keys = parse_public_keys(&format!(" {} ,", key.public_key())).unwrap();
        let claims = Claims {
            aud: "10.1.0.7".into(),
            scope: Scope::Peer,
            exp: 1000,
            mid: Some("m1".into()),
            uid: Some("u-1".into()),
        };
        let token = key.sign(&claims);
        let ips = ["127.0.0.1".to_owned(), "10.1.0.7".to_owned()];
        assert_eq!(verify(&token, &keys, &ips, 999).unwrap(), claims);
        assert_eq!(
            verify(&token, &keys, &ips, 1000),
            Err(CredentialError::Expired)
        );
        assert!(matches!(
            verify(&token, &keys, &["10.1.0.8".to_owned()], 999),
            Err(CredentialError::WrongPod { .. })
        ));
        assert_eq!(
            verify(&other.sign(&claims), &keys, &ips, 999),
            Err(CredentialError::BadSignature)
        );
        // A payload changed after signing (scope raised) is refused.
        let raised = Claims {
            scope: Scope::Coordinator,
            ..claims.clone()
        };
        let forged = format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&raised).unwrap()),
            token.rsplit('.').next().unwrap()
        );
        assert_eq!(
            verify(&forged, &keys, &ips, 999),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(
            verify("secret", &keys, &ips, 999),
            Err(CredentialError::Malformed)
        );
        assert!(parse_public_keys("abc").is_err());
    }

    #[test]
    fn a_token_is_for_one_pod_uid() {
        let claims = Claims {
            aud: "10.1.0.7".into(),
            scope: Scope::Coordinator,
            exp: 1000,
            mid: None,
            uid: Some("u-1".into()),
        };
        assert_eq!(claims.check_uid(Some("u-1")), Ok(()));
        assert_eq!(claims.check_uid(None), Ok(()));
        assert!(matches!(
            claims.check_uid(Some("u-2")),
            Err(CredentialError::WrongPodUid { .. })
        ));
        let without = Claims {
            uid: None,
            ..claims
        };
        assert!(without.check_uid(Some("u-1")).is_err());
    }

    #[test]
    fn an_agent_lets_the_coordinator_everywhere_and_a_peer_only_into_its_migrations_restore() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap();
        let keys = parse_public_keys(&key.public_key()).unwrap();
        let ips = ["10.1.0.7".to_owned()];
        let token = |scope, mid: Option<&str>| {
            key.sign(&Claims {
                aud: "10.1.0.7".into(),
                scope,
                exp: 1000,
                mid: mid.map(str::to_owned),
                uid: Some("u-1".into()),
            })
        };
        let access = |path, over_tls, pod_migration| Access {
            path,
            over_tls,
            pod_uid: Some("u-1"),
            pod_migration,
        };
        let coordinator = token(Scope::Coordinator, None);
        assert!(authorize(
            &coordinator,
            &keys,
            &ips,
            1,
            &access("/migrate", false, None)
        )
        .is_ok());
        let peer = token(Scope::Peer, Some("m1"));
        assert!(authorize(&peer, &keys, &ips, 1, &access("/restore", true, Some("m1"))).is_ok());
        assert!(authorize(
            &peer,
            &keys,
            &ips,
            1,
            &access("/restore/pages/m1", true, Some("m1"))
        )
        .is_ok());
        let forbidden = |a: &Access<'_>| {
            matches!(
                authorize(&peer, &keys, &ips, 1, a),
                Err(Refusal::Forbidden(_))
            )
        };
        assert!(
            forbidden(&access("/restore", false, Some("m1"))),
            "plain HTTP"
        );
        assert!(
            forbidden(&access("/restore", true, Some("m2"))),
            "another migration"
        );
        assert!(forbidden(&access("/restore", true, None)), "no migration");
        assert!(forbidden(&access("/restore/pages/m2", true, Some("m1"))));
        assert!(forbidden(&access("/migrate", true, Some("m1"))));
        let migration = token(Scope::Migration, Some("m1"));
        assert!(matches!(
            authorize(
                &migration,
                &keys,
                &ips,
                1,
                &access("/info", true, Some("m1"))
            ),
            Err(Refusal::Forbidden(_))
        ));
        let other_pod = Access {
            pod_uid: Some("u-2"),
            ..access("/migrate", false, None)
        };
        assert!(matches!(
            authorize(&coordinator, &keys, &ips, 1, &other_pod),
            Err(Refusal::Unauthorized(_))
        ));
        assert!(matches!(
            authorize("", &keys, &ips, 1, &access("/info", false, None)),
            Err(Refusal::Unauthorized(_))
        ));
        assert_eq!(bearer(Some("Bearer abc")), "abc");
        assert_eq!(bearer(Some("Basic abc")), "");
        assert_eq!(bearer(None), "");
    }
}
