//! A CA and a serving certificate for the webhook's Service, made with rcgen.
//!
//! The API server reaches the webhook at `<service>.<namespace>.svc`; the serving certificate
//! names that, the `.svc.cluster.local` form and the short forms. Nothing here is ever written
//! into the repository: the command writes to a directory the caller names, and tests generate
//! their own material.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// Failure to make or write the certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// rcgen refused the parameters or failed to sign.
    #[error("failed to generate certificate")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A name is not usable in a DNS name or a Kubernetes object name.
    #[error("invalid {what} {value:?}: must be a lowercase RFC 1123 label")]
    InvalidName { what: &'static str, value: String },
}

/// What to certify.
#[derive(Debug, Clone)]
pub struct CertRequest {
    /// The webhook's Service name.
    pub service: String,
    /// The namespace the Service lives in.
    pub namespace: String,
    /// Extra subject alternative names (IP addresses or DNS names), e.g. `127.0.0.1` for a
    /// webhook run by hand.
    pub extra_names: Vec<String>,
    /// How long the certificates are valid.
    pub valid_for: Duration,
    /// The serving certificate also authenticates its holder as a TLS client (a coordinator
    /// presents it to its peers: mutual TLS).
    pub client_auth: bool,
}

/// PEM-encoded CA certificate, serving certificate chain and serving key.
#[derive(Clone)]
pub struct CertBundle {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// The names on the serving certificate.
    pub server_names: Vec<String>,
}

impl std::fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertBundle")
            .field("server_names", &self.server_names)
            .finish_non_exhaustive()
    }
}

impl CertBundle {
    /// The CA certificate as base64, the form of a webhook configuration's `caBundle`.
    pub fn ca_bundle_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.ca_cert_pem.as_bytes())
    }

    /// A `kubernetes.io/tls` Secret holding the serving certificate and key (and `ca.crt`).
    pub fn secret_manifest(&self, name: &str, namespace: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let secret = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": { "name": name, "namespace": namespace },
            "data": {
                "tls.crt": b64(&self.server_cert_pem),
                "tls.key": b64(&self.server_key_pem),
                "ca.crt": b64(&self.ca_cert_pem),
            }
        });
        // JSON is valid YAML; kubectl applies it as is.
        serde_json::to_string_pretty(&secret).unwrap_or_default() + "\n"
    }
}

fn check_label(what: &'static str, value: &str) -> Result<(), CertsError> {
    if ums_contract::names::is_dns1123_label(value) {
        Ok(())
    } else {
        Err(CertsError::InvalidName {
            what,
            value: value.to_owned(),
        })
    }
}

/// Makes a fresh CA and a serving certificate signed by it.
pub fn generate(request: &CertRequest) -> Result<CertBundle, CertsError> {
    check_label("service name", &request.service)?;
    check_label("namespace", &request.namespace)?;
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::hours(1);
    let not_after = now + request.valid_for;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{} CA", request.service));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let (service, namespace) = (&request.service, &request.namespace);
    let mut server_names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.clone(),
    ];
    server_names.extend(request.extra_names.iter().cloned());
    let mut server_params = CertificateParams::new(server_names.clone())?;
    server_params.distinguished_name = DistinguishedName::new();
    server_params
        .distinguished_name
        .push(DnType::CommonName, server_names[0].clone());
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if request.client_auth {
        server_params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    server_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server_params.not_before = not_before;
    server_params.not_after = not_after;
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &ca)?;

    Ok(CertBundle {
        ca_cert_pem: ca.pem(),
        ca_key_pem,
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        server_names,
    })
}

/// The files [`write_bundle`] makes, by role.
#[derive(Debug, Clone)]
pub struct WrittenFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub secret: PathBuf,
    pub ca_bundle: PathBuf,
}

/// Writes the bundle into `dir`: `ca.crt`, `ca.key`, `tls.crt`, `tls.key` (keys mode 0600),
/// `secret.yaml` and `ca-bundle.b64`.
pub fn write_bundle(
    bundle: &CertBundle,
    dir: &Path,
    secret_name: &str,
    namespace: &str,
) -> Result<WrittenFiles, CertsError> {
    fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let files = WrittenFiles {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("tls.crt"),
        server_key: dir.join("tls.key"),
        secret: dir.join("secret.yaml"),
        ca_bundle: dir.join("ca-bundle.b64"),
    };
    let write = |path: &Path, contents: &str, secret: bool| -> Result<(), CertsError> {
        write_file(path, contents, secret).map_err(|source| CertsError::Write {
            path: path.to_owned(),
            source,
        })
    };
    write(&files.ca_cert, &bundle.ca_cert_pem, false)?;
    write(&files.ca_key, &bundle.ca_key_pem, true)?;
    write(&files.server_cert, &bundle.server_cert_pem, false)?;
    write(&files.server_key, &bundle.server_key_pem, true)?;
    write(
        &files.secret,
        &bundle.secret_manifest(secret_name, namespace),
        true,
    )?;
    write(&files.ca_bundle, &(bundle.ca_bundle_base64() + "\n"), false)?;
    Ok(files)
}

fn write_file(path: &Path, contents: &str, secret: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // Write to a temporary name and rename, so a webhook watching the files never reads half a
    // key.
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CertRequest {
        CertRequest {
            service: "ums-webhook".into(),
            namespace: "ums-system".into(),
            extra_names: vec!["127.0.0.1".into(), "localhost".into()],
            valid_for: Duration::days(365),
            client_auth: false,
        }
    }

    #[test]
    fn names_the_service_forms_and_extras() {
        let bundle = generate(&request()).unwrap();
        assert_eq!(bundle.server_names[0], "ums-webhook.ums-system.svc");
        assert!(bundle
            .server_names
            .contains(&"ums-webhook.ums-system.svc.cluster.local".to_string()));
        assert!(bundle.server_names.contains(&"127.0.0.1".to_string()));
        assert!(bundle
            .ca_cert_pem
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(bundle.server_key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn refuses_names_that_are_not_labels() {
        let mut bad = request();
        bad.namespace = "Bad_NS".into();
        assert!(matches!(
            generate(&bad),
            Err(CertsError::InvalidName {
                what: "namespace",
                ..
            })
        ));
    }

    #[test]
    fn writes_files_with_private_modes_and_a_tls_secret() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let bundle = generate(&request()).unwrap();
        let files = write_bundle(&bundle, dir.path(), "ums-webhook-tls", "ums-system").unwrap();
        let mode = fs::metadata(&files.server_key)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let secret: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&files.secret).unwrap()).unwrap();
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(secret["metadata"]["namespace"], "ums-system");
        let tls_crt = secret["data"]["tls.crt"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(tls_crt)
            .unwrap();
        assert_eq!(decoded, bundle.server_cert_pem.as_bytes());
        assert_eq!(
            fs::read_to_string(&files.ca_bundle).unwrap().trim(),
            bundle.ca_bundle_base64()
        );
    }
}
