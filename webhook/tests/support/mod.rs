//! Starts the real `ums-webhook` binary on loopback with rcgen-made certificates, and talks to
//! it over real TLS the way the API server does.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ums_certs::{generate, CertBundle, CertRequest};

pub const MIGRATION_ACCOUNT: &str = "system:serviceaccount:default:migration-coordinator";

/// A fresh CA and serving certificate for `localhost` / `127.0.0.1`.
pub fn make_certs() -> CertBundle {
    generate(&CertRequest {
        service: "ums-webhook".into(),
        namespace: "ums-system".into(),
        extra_names: vec!["localhost".into(), "127.0.0.1".into()],
        valid_for: time::Duration::days(1),
        client_auth: false,
    })
    .expect("certificates")
}

/// The certificate directory laid out as the kubelet lays out a mounted Secret:
/// `..<timestamp>/` holds the files, `..data` points at it, and `tls.crt`/`tls.key` point
/// through `..data`. Updates swap `..data` atomically.
pub struct SecretMount {
    pub dir: PathBuf,
    generation: u32,
}

impl SecretMount {
    pub fn new(dir: &Path, bundle: &CertBundle) -> Self {
        let mut mount = SecretMount {
            dir: dir.to_owned(),
            generation: 0,
        };
        mount.update(bundle);
        std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
        mount
    }

    /// Writes a new generation and swaps `..data` to it, as the kubelet does.
    pub fn update(&mut self, bundle: &CertBundle) {
        self.generation += 1;
        let name = format!(
            "..2026_11_21_00_00_0{}.000{}",
            self.generation, self.generation
        );
        let generation_dir = self.dir.join(&name);
        std::fs::create_dir_all(&generation_dir).unwrap();
        std::fs::write(generation_dir.join("tls.crt"), &bundle.server_cert_pem).unwrap();
        std::fs::write(generation_dir.join("tls.key"), &bundle.server_key_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}

/// A running webhook process; killed on drop.
pub struct Webhook {
    child: Child,
    logs: mpsc::Receiver<String>,
    pub admission: SocketAddr,
    pub admin: SocketAddr,
    pub _dir: tempfile::TempDir,
    pub mount: SecretMount,
    pub bundle: CertBundle,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the webhook with fresh certificates and extra flags.
pub fn start_webhook(extra_args: &[&str]) -> Webhook {
    let dir = tempfile::tempdir().unwrap();
    let bundle = make_certs();
    let mount = SecretMount::new(dir.path(), &bundle);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ums-webhook"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(mount.cert())
        .arg("--tls-key")
        .arg(mount.key())
        .args(["--tls-reload-seconds", "0.2"])
        .args(extra_args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ums-webhook");
    let stderr = child.stderr.take().unwrap();
    let (tx, logs) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[webhook] {line}");
            let _ = tx.send(line);
        }
    });
    let line = wait_for_line(&logs, "ums-webhook listening", Duration::from_secs(30));
    let field = |name: &str| -> SocketAddr {
        let start = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
        let rest = &line[start..];
        let end = rest.find(' ').unwrap_or(rest.len());
        rest[..end].parse().expect("address")
    };
    Webhook {
        child,
        logs,
        admission: field("admission"),
        admin: field("admin"),
        _dir: dir,
        mount,
        bundle,
    }
}

/// A plain-HTTP client (reqwest wants a process-wide rustls provider even then).
pub fn plain_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// An HTTPS client that trusts exactly `ca_pem`, optionally limited to TLS 1.2.
pub fn client_trusting(ca_pem: &str, tls12_only: bool) -> reqwest::Client {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn wait_for_line(logs: &mpsc::Receiver<String>, needle: &str, deadline: Duration) -> String {
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match logs.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => panic!("webhook did not log {needle:?} within {deadline:?}"),
        }
    }
}

impl Webhook {
    /// Waits until the webhook logs a line containing `needle` (lines before are consumed).
    pub fn wait_for_log(&self, needle: &str, deadline: Duration) -> String {
        wait_for_line(&self.logs, needle, deadline)
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.admission.port())
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
    pub fn client(&self) -> reqwest::Client {
        client_trusting(&self.bundle.ca_cert_pem, false)
    }
    /// POSTs a review and returns (status, body as JSON).
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self
            .client()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"));
        (status, value)
    }
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pod fixture from `tests/data`.
pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// An AdmissionReview as kube-apiserver sends it.
pub fn review(
    operation: &str,
    user: &str,
    object: Option<&Value>,
    old_object: Option<&Value>,
) -> Value {
    let pod = object.or(old_object).expect("an object or an old object");
    let options_kind = match operation {
        "CREATE" => "CreateOptions",
        "UPDATE" => "UpdateOptions",
        _ => "DeleteOptions",
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("705ab4f5-6393-11e8-b7cc-{:012x}", rand_suffix()),
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
            "requestResource": { "group": "", "version": "v1", "resource": "pods" },
            "name": pod["metadata"]["name"],
            "namespace": pod["metadata"]["namespace"],
            "operation": operation,
            "userInfo": { "username": user, "uid": "014fbff9a07c", "groups": ["system:authenticated"] },
            "object": object.cloned().unwrap_or(Value::Null),
            "oldObject": old_object.cloned().unwrap_or(Value::Null),
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": options_kind }
        }
    })
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (nanos << 16) ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}
