//! A cluster's `ums-coordinator`: the real `ums-rs/coordinator` image, as its Deployment
//! runs it (user 65532, its certificate and its peers' CAs mounted read-only), with the
//! cluster's coordinator service account (its kubeconfig) and its own serving certificate
//! from `ums-certs`; peers trust each other's CA only. Host network: the test API server
//! listens on loopback, and the pod networks are routed from the host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, User};

/// A coordinator's TLS material.
#[derive(Debug, Clone)]
pub struct CoordinatorCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CoordinatorCerts {
    /// A CA and a serving certificate for `ums-coordinator.ums-system.svc`, 127.0.0.1 and the
    /// outer bridge's gateway (where pods reach it: the node part sends archives to it).
    pub fn generate(cluster: &Cluster) -> Self {
        let bundle = ums_certs::generate(&ums_certs::CertRequest {
            service: "ums-coordinator".into(),
            namespace: "ums-system".into(),
            extra_names: vec![
                "127.0.0.1".into(),
                crate::outer::bridge_gateway().to_owned(),
                // deploy/coordinator's Service, which its eviction webhook names.
                "ums-coordinator.default.svc".into(),
            ],
            valid_for: time::Duration::days(1),
            client_auth: true,
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
    container: String,
    /// `127.0.0.1:port`, as UMS's `destinationUrl` names a coordinator.
    pub address: String,
    /// `GATEWAY:port`: the same coordinator as pods reach it (it listens on every address).
    pub pod_network_address: String,
    /// The operators' token (what the `ums-coordinator-api` Secret would hold).
    pub api_token: String,
}

/// What a caller presents to a coordinator.
#[derive(Debug, Clone)]
pub enum Credential {
    None,
    /// `Authorization: Bearer`.
    Bearer(String),
    /// A client certificate and its key (PEM files): mutual TLS, as a peer coordinator.
    ClientCertificate {
        cert: PathBuf,
        key: PathBuf,
    },
}

impl RunningCoordinator {
    /// Starts the coordinator of `cluster`, trusting the peers' CAs `peer_cas`.
    pub fn start(cluster: &Cluster, certs: &CoordinatorCerts, peer_cas: &[&Path]) -> Self {
        Self::start_with_env(cluster, certs, peer_cas, &[])
    }

    /// [`RunningCoordinator::start`], with environment variables of the caller's (they win
    /// over the harness's own).
    pub fn start_with_env(
        cluster: &Cluster,
        certs: &CoordinatorCerts,
        peer_cas: &[&Path],
        extra_env: &[(&str, &str)],
    ) -> Self {
        crate::outer::require_image("ums-rs/coordinator:latest");
        let port = crate::registry::free_port();
        let address = format!("127.0.0.1:{port}");
        // What the Secret, the ConfigMap and the service account token would mount.
        let mounted = cluster.dir.join("coordinator-mounts");
        std::fs::create_dir_all(&mounted).unwrap();
        std::fs::copy(&certs.cert, mounted.join("tls.crt")).unwrap();
        std::fs::copy(&certs.key, mounted.join("tls.key")).unwrap();
        std::fs::copy(cluster.signing_key_file(), mounted.join("signing.key")).unwrap();
        let api_token = format!(
            "{:016x}{:016x}",
            rand_u64(),
            rand_u64() ^ u64::from(std::process::id())
        );
        std::fs::write(
            mounted.join("api-tokens"),
            format!("# the operators' tokens\n{api_token}\n"),
        )
        .unwrap();
        // The kubeconfig with the API server's CA inline (its file is on the host).
        let kubeconfig = std::fs::read_to_string(cluster.kubeconfig(User::Coordinator)).unwrap();
        let ca_path = cluster.dir.join("apiserver-certs/apiserver.crt");
        let ca_data = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(&ca_path).unwrap())
        };
        let kubeconfig = kubeconfig.replace(
            &format!("certificate-authority: {}", ca_path.display()),
            &format!("certificate-authority-data: {ca_data}"),
        );
        assert!(
            kubeconfig.contains("certificate-authority-data"),
            "{kubeconfig}"
        );
        std::fs::write(mounted.join("kubeconfig"), kubeconfig).unwrap();
        let peers: String = peer_cas
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        std::fs::write(mounted.join("ca.crt"), peers).unwrap();
        // Its checkpoint registry (orchestrator-level migrations to this cluster): the tests'
        // HTTPS registry, one repository per cluster; the nodes pull by the bridge's gateway.
        let registry = crate::registry::Registry::shared_tls();
        std::fs::copy(
            registry.ca.as_ref().unwrap(),
            mounted.join("registry-ca.crt"),
        )
        .unwrap();
        let repository = format!("ums-checkpoints/{}", cluster.name);
        // With a CRI node: the kubelets' CA and the service account token the coordinator
        // presents to them (the static token of its account).
        let kubelet_ca = cluster.kubelet_ca();
        if let Some(ca) = &kubelet_ca {
            std::fs::copy(ca, mounted.join("kubelet-ca.crt")).unwrap();
            std::fs::write(mounted.join("token"), "coordinator-token").unwrap();
        }
        for entry in std::fs::read_dir(&mounted).unwrap() {
            use std::os::unix::fs::PermissionsExt as _;
            let path = entry.unwrap().path();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let container = format!("{}-coordinator", cluster.name);
        let mount = format!("{}:/etc/ums-coordinator/files:ro", mounted.display());
        let kubelet_env: Vec<String> = if kubelet_ca.is_some() {
            vec![
                "--env".into(),
                "UMS_KUBELET_CA=/etc/ums-coordinator/files/kubelet-ca.crt".into(),
                "--env".into(),
                "UMS_KUBELET_TOKEN_FILE=/etc/ums-coordinator/files/token".into(),
            ]
        } else {
            Vec::new()
        };
        let output = Command::new("docker")
            .args(["run", "--detach", "--name", &container, "--network", "host"])
            .args(["--volume", &mount])
            .args(["--env", "KUBECONFIG=/etc/ums-coordinator/files/kubeconfig"])
            .args(["--env", &format!("UMS_CLUSTER_NAME={}", cluster.name)])
            .args(["--env", "RUST_LOG=info"])
            .args(&kubelet_env)
            .args([
                "--env",
                &format!(
                    "UMS_CHECKPOINT_REGISTRY={}/{repository}",
                    registry.push_address
                ),
            ])
            .args([
                "--env",
                &format!(
                    "UMS_CHECKPOINT_REGISTRY_PULL={}/{repository}",
                    registry.pod_address
                ),
            ])
            .args([
                "--env",
                "UMS_CHECKPOINT_REGISTRY_CA=/etc/ums-coordinator/files/registry-ca.crt",
            ])
            .args(
                extra_env
                    .iter()
                    .flat_map(|(k, v)| ["--env".to_owned(), format!("{k}={v}")]),
            )
            .arg("ums-rs/coordinator:latest")
            .arg(format!("--listen=0.0.0.0:{port}"))
            .arg("--tls-cert=/etc/ums-coordinator/files/tls.crt")
            .arg("--tls-key=/etc/ums-coordinator/files/tls.key")
            .arg("--peer-ca=/etc/ums-coordinator/files/ca.crt")
            .arg("--signing-key=/etc/ums-coordinator/files/signing.key")
            .arg("--api-tokens=/etc/ums-coordinator/files/api-tokens")
            .arg(format!("--advertise-url=https://{address}"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "docker run ums-rs/coordinator failed"
        );
        let running = RunningCoordinator {
            container,
            address,
            pod_network_address: format!("{}:{port}", crate::outer::bridge_gateway()),
            api_token,
        };
        running.wait_listening(1);
        running
    }

    /// Makes this coordinator the cluster's eviction webhook, as deploying it does
    /// (deploy/coordinator/eviction-webhook.yaml, its CA as the caBundle): `kubectl drain`
    /// then moves the pods that opted in.
    pub fn serve_evictions(&self, cluster: &Cluster, certs: &CoordinatorCerts) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator");
        let rendered = Command::new("kubectl")
            .arg("kustomize")
            .arg(&root)
            .output()
            .expect("kubectl kustomize deploy/coordinator");
        assert!(
            rendered.status.success(),
            "kubectl kustomize deploy/coordinator failed"
        );
        let ca_bundle = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(&certs.ca).unwrap())
        };
        let mut applied = 0;
        for document in serde_yaml::Deserializer::from_slice(&rendered.stdout) {
            let mut value = serde_json::to_value(
                <serde_yaml::Value as serde::Deserialize>::deserialize(document).unwrap(),
            )
            .unwrap();
            if value["kind"] != "ValidatingWebhookConfiguration" {
                continue;
            }
            for webhook in value["webhooks"].as_array_mut().unwrap() {
                let service = &webhook["clientConfig"]["service"];
                cluster.map_service(
                    &format!(
                        "{}/{}:{}",
                        service["namespace"].as_str().unwrap(),
                        service["name"].as_str().unwrap(),
                        service["port"].as_u64().unwrap_or(443)
                    ),
                    &self.address,
                );
                webhook["clientConfig"]["caBundle"] = ca_bundle.clone().into();
            }
            cluster.kubectl_with_input(User::Admin, &["apply", "-f", "-"], &value.to_string());
            applied += 1;
        }
        assert_eq!(applied, 1, "deploy/coordinator: one eviction webhook");
    }

    /// Waits until the log says "listening" `times` times (once per start).
    fn wait_listening(&self, times: usize) {
        let running = self;
        let until = Instant::now() + Duration::from_secs(30);
        while running.log().matches("ums-coordinator listening").count() < times {
            let state = Command::new("docker")
                .args([
                    "inspect",
                    "--format",
                    "{{.State.Running}}",
                    &running.container,
                ])
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&state.stdout).trim() == "true",
                "ums-coordinator exited:\n{}",
                running.log()
            );
            assert!(
                Instant::now() < until,
                "ums-coordinator did not listen:\n{}",
                running.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the coordinator's process (SIGKILL: no goodbye to anyone).
    pub fn kill(&self) {
        let output = Command::new("docker")
            .args(["kill", &self.container])
            .output()
            .unwrap();
        assert!(output.status.success(), "docker kill {}", self.container);
    }

    /// Starts the killed coordinator again, as its Deployment would (same flags, same port).
    pub fn restart(&self) {
        let starts = self.log().matches("ums-coordinator listening").count();
        let output = Command::new("docker")
            .args(["start", &self.container])
            .output()
            .unwrap();
        assert!(output.status.success(), "docker start {}", self.container);
        self.wait_listening(starts + 1);
    }

    /// The coordinator's log (its container's output).
    pub fn log(&self) -> String {
        let output = Command::new("docker")
            .args(["logs", &self.container])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    }

    /// A call to this coordinator over HTTPS as an operator (its API token), trusting `ca`;
    /// (status, JSON body).
    pub async fn call(
        &self,
        ca: &Path,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let credential = Credential::Bearer(self.api_token.clone());
        call(&self.address, ca, &credential, method, path, body).await
    }

    /// As [`RunningCoordinator::call`], presenting `credential`.
    pub async fn call_as(
        &self,
        ca: &Path,
        credential: &Credential,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        call(&self.address, ca, credential, method, path, body).await
    }
}

/// Two clusters with a node each, and their coordinators trusting each other's CA: the rig of
/// the end-to-end migrations.
#[derive(Debug)]
pub struct TwoClusters {
    // Declared first, dropped first: the coordinators go before their clusters.
    pub edge_coordinator: RunningCoordinator,
    pub cloud_coordinator: RunningCoordinator,
    pub edge_certs: CoordinatorCerts,
    pub cloud_certs: CoordinatorCerts,
    pub edge: Cluster,
    pub cloud: Cluster,
    /// Cloud's coordinator as edge's calls name it (`destinationUrl`): on CRI nodes its
    /// pod-network address, which the node part sends the archives to.
    pub destination: String,
}

/// Creates the LiveMigration `name` in `cluster` (as the user Jane) with `spec`, and waits up
/// to `within` for it to end; its status once `Succeeded` or `Failed`.
pub async fn live_migration(
    cluster: &Cluster,
    name: &str,
    spec: serde_json::Value,
    within: Duration,
) -> serde_json::Value {
    let object = serde_json::json!({
        "apiVersion": "migration.ums-rs.io/v1alpha1",
        "kind": "LiveMigration",
        "metadata": {"name": name},
        "spec": spec,
    });
    cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &object.to_string());
    crate::poll(
        &format!("the LiveMigration {name} to end"),
        within,
        || async {
            let status = cluster.get_json(&["livemigration", name])["status"].clone();
            matches!(status["phase"].as_str(), Some("Succeeded") | Some("Failed")).then_some(status)
        },
    )
    .await
}

impl TwoClusters {
    /// Each cluster with a Docker-backed node (the container-level tests).
    pub fn start() -> Self {
        Self::of(Cluster::start_with_node(), Cluster::start_with_node())
    }

    /// Each cluster with a CRI node (containerd 2.x + CRIU, the kubelet's checkpoint endpoint):
    /// the orchestrator-level interface's rig. Its node part is not deployed.
    pub fn start_with_cri_nodes() -> Self {
        Self::of(
            Cluster::start_with_cri_node(),
            Cluster::start_with_cri_node(),
        )
    }

    fn of(edge: Cluster, cloud: Cluster) -> Self {
        let cri = edge.kubelet_ca().is_some();
        let edge_certs = CoordinatorCerts::generate(&edge);
        let cloud_certs = CoordinatorCerts::generate(&cloud);
        let edge_coordinator = RunningCoordinator::start(&edge, &edge_certs, &[&cloud_certs.ca]);
        let cloud_coordinator = RunningCoordinator::start(&cloud, &cloud_certs, &[&edge_certs.ca]);
        let destination = if cri {
            cloud_coordinator.pod_network_address.clone()
        } else {
            cloud_coordinator.address.clone()
        };
        TwoClusters {
            edge_coordinator,
            cloud_coordinator,
            edge_certs,
            cloud_certs,
            edge,
            cloud,
            destination,
        }
    }

    /// UMS's call on edge's coordinator, as an operator: `POST /migrate` with `body`.
    pub async fn migrate(&self, body: Value) -> (u16, Value) {
        call_result(
            &self.edge_coordinator.address,
            &self.edge_certs.ca,
            &Credential::Bearer(self.edge_coordinator.api_token.clone()),
            "POST",
            "/migrate",
            Some(body),
        )
        .await
        .unwrap()
    }

    /// UMS's call on edge's coordinator moving `pod` to cloud, in the background: the moment
    /// to break something mid-migration.
    pub fn migrate_to_cloud_in_background(
        &self,
        pod: &str,
    ) -> tokio::task::JoinHandle<Result<(u16, Value), reqwest::Error>> {
        let (address, ca, token) = (
            self.edge_coordinator.address.clone(),
            self.edge_certs.ca.clone(),
            Credential::Bearer(self.edge_coordinator.api_token.clone()),
        );
        let body = serde_json::json!({"name": pod, "destinationUrl": self.destination});
        tokio::spawn(async move {
            call_result(&address, &ca, &token, "POST", "/migrate", Some(body)).await
        })
    }

    /// The phase of the one migration edge's coordinator drives (`GET /migrations`).
    pub async fn edge_phase(&self) -> Option<String> {
        let (status, records) = call_result(
            &self.edge_coordinator.address,
            &self.edge_certs.ca,
            &Credential::Bearer(self.edge_coordinator.api_token.clone()),
            "GET",
            "/migrations",
            None,
        )
        .await
        .ok()?;
        (status == 200).then(|| records[0]["phase"].as_str().map(str::to_owned))?
    }

    /// Waits until edge's migration has passed `creating`; panics unless it is then in
    /// `migrating` (the state on its way sidecar to sidecar).
    /// Both coordinators' logs, for a failed assertion's message.
    pub fn coordinator_logs(&self) -> String {
        format!(
            "--- edge coordinator:\n{}\n--- cloud coordinator:\n{}",
            self.edge_coordinator.log(),
            self.cloud_coordinator.log()
        )
    }

    /// Edge's newest migration's ID and the answer to an operator's abort of it
    /// (`POST /migrations/{id}/abort` on edge's coordinator).
    pub async fn abort_edge_migration(&self) -> (String, u16, Value) {
        let (_, records) = self
            .edge_coordinator
            .call(&self.edge_certs.ca, "GET", "/migrations", None)
            .await;
        let id = records[0]["migrationId"].as_str().unwrap_or("").to_owned();
        let (status, answer) = self
            .edge_coordinator
            .call(
                &self.edge_certs.ca,
                "POST",
                &format!("/migrations/{id}/abort"),
                None,
            )
            .await;
        (id, status, answer)
    }

    pub async fn wait_edge_migrating(&self) {
        let seen = crate::poll(
            "edge's migration to reach migrating",
            Duration::from_secs(240),
            || async {
                self.edge_phase()
                    .await
                    .filter(|p| p != "checking" && p != "locking" && p != "creating")
            },
        )
        .await;
        assert_eq!(
            seen, "migrating",
            "the test must catch the migrating phase to break something in it"
        );
    }
}

impl RunningCoordinator {
    /// The coordinator's Prometheus text (`GET /metrics`).
    pub async fn metrics(&self, ca: &Path) -> String {
        let response = client(ca)
            .get(format!("https://{}/metrics", self.address))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
        response.text().await.unwrap()
    }
}

/// An HTTPS client that trusts `ca` only.
fn client(ca: &Path) -> reqwest::Client {
    client_with(ca, &Credential::None)
}

/// An HTTPS client that trusts `ca` only and presents `credential`'s certificate, if any.
pub fn client_with(ca: &Path, credential: &Credential) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(ca).unwrap();
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .timeout(Duration::from_secs(600));
    if let Credential::ClientCertificate { cert, key } = credential {
        let mut identity = std::fs::read(key).unwrap();
        identity.extend(std::fs::read(cert).unwrap());
        builder = builder.identity(reqwest::Identity::from_pem(&identity).unwrap());
    }
    builder.build().unwrap()
}

/// A random number from the kernel.
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    u64::from_le_bytes(bytes)
}

/// As [`call`], with a broken connection as an error instead of a panic.
pub async fn call_result(
    address: &str,
    ca: &Path,
    credential: &Credential,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), reqwest::Error> {
    let client = client_with(ca, credential);
    let url = format!("https://{address}{path}");
    let mut request = match method {
        "POST" => client.post(url).json(&body.unwrap_or(Value::Null)),
        _ => client.get(url),
    };
    if let Credential::Bearer(token) = credential {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// A call to the coordinator at `address` over HTTPS, trusting `ca`, presenting
/// `credential`; (status, JSON body).
pub async fn call(
    address: &str,
    ca: &Path,
    credential: &Credential,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    call_result(address, ca, credential, method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} https://{address}{path}: {e}"))
}

impl Drop for RunningCoordinator {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "--force", &self.container])
            .output();
    }
}
