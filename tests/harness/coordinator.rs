//! A cluster's `ums-coordinator`, run as the binary the coordinator image runs, with the
//! cluster's coordinator service account (its kubeconfig) and its own serving certificate
//! from `ums-certs`; peers trust each other's CA only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{workspace_binary, Cluster, User};

/// A coordinator's TLS material.
#[derive(Debug, Clone)]
pub struct CoordinatorCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CoordinatorCerts {
    /// A CA and a serving certificate for `ums-coordinator.ums-system.svc` and 127.0.0.1.
    pub fn generate(cluster: &Cluster) -> Self {
        let bundle = ums_certs::generate(&ums_certs::CertRequest {
            service: "ums-coordinator".into(),
            namespace: "ums-system".into(),
            extra_names: vec!["127.0.0.1".into()],
            valid_for: time::Duration::days(1),
        })
        .unwrap();
        let files = ums_certs::write_bundle(
            &bundle,
            &cluster.dir.join("coordinator-certs"),
            "ums-coordinator-tls",
            "ums-system",
        )
        .unwrap();
        CoordinatorCerts {
            ca: files.ca_cert,
            cert: files.server_cert,
            key: files.server_key,
        }
    }
}

/// A running coordinator; stopped on drop.
#[derive(Debug)]
pub struct RunningCoordinator {
    child: Child,
    /// `127.0.0.1:port`, as UMS's `destinationUrl` names a coordinator.
    pub address: String,
    log: PathBuf,
}

impl RunningCoordinator {
    /// Starts the coordinator of `cluster`, trusting the peers' CAs `peer_cas`.
    pub fn start(cluster: &Cluster, certs: &CoordinatorCerts, peer_cas: &[&Path]) -> Self {
        let port = crate::registry::free_port();
        let address = format!("127.0.0.1:{port}");
        let log = cluster.dir.join("coordinator.log");
        let peer_ca = peer_cas
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new(workspace_binary("ums-coordinator", "ums-coordinator"))
            .env("KUBECONFIG", cluster.kubeconfig(User::Coordinator))
            .env("UMS_COORDINATOR_LISTEN", &address)
            .env("UMS_COORDINATOR_TLS_CERT", &certs.cert)
            .env("UMS_COORDINATOR_TLS_KEY", &certs.key)
            .env("UMS_COORDINATOR_PEER_CA", peer_ca)
            .env("UMS_CLUSTER_NAME", &cluster.name)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start ums-coordinator");
        let mut running = RunningCoordinator {
            child,
            address,
            log,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while !running.log().contains("ums-coordinator listening") {
            if let Ok(Some(status)) = running.child.try_wait() {
                panic!("ums-coordinator exited ({status}):\n{}", running.log());
            }
            assert!(
                Instant::now() < until,
                "ums-coordinator did not listen:\n{}",
                running.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        running
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A call to this coordinator over HTTPS, trusting `ca`; (status, JSON body).
    pub async fn call(
        &self,
        ca: &Path,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pem = std::fs::read(ca).unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap();
        let url = format!("https://{}{path}", self.address);
        let request = match method {
            "POST" => client.post(url).json(&body.unwrap_or(Value::Null)),
            _ => client.get(url),
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for RunningCoordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
