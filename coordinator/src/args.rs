//! Command-line flags (each with an environment variable) and the wiring of the coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use tokio_rustls::TlsAcceptor;
use ums_tls::{bind, serve_tls, shutdown_signal, ReloadingCert};

use crate::api::{not_found, router};
use crate::peer::{peer_client, peer_roots};
use crate::state::Coordinator;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// The UMS coordinator of one cluster.
#[derive(Debug, Parser)]
#[command(name = "ums-coordinator", version, about)]
pub struct Args {
    /// Address of the HTTPS listener (UMS's API, and the peers' calls).
    #[arg(long, env = "UMS_COORDINATOR_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain served to clients and peers; re-read when it changes.
    #[arg(
        long,
        env = "UMS_COORDINATOR_TLS_CERT",
        default_value = "/etc/ums-coordinator/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(
        long,
        env = "UMS_COORDINATOR_TLS_KEY",
        default_value = "/etc/ums-coordinator/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// PEM files of the CAs that sign the peer coordinators' certificates (comma-separated):
    /// a peer whose server certificate none of them signed is refused, and only a client
    /// certificate they signed opens `/create`, `/restore`, `/delete` (mutual TLS). This
    /// coordinator's own certificate (`--tls-cert`, made with `ums-certs --client-auth`) is
    /// the one it presents to its peers.
    #[arg(
        long,
        env = "UMS_COORDINATOR_PEER_CA",
        value_delimiter = ',',
        required = true
    )]
    pub peer_ca: Vec<PathBuf>,
    /// The Ed25519 key (PKCS#8 DER, e.g. `openssl genpkey -algorithm ed25519 -outform DER`)
    /// that signs the tokens this cluster's sidecars accept; its public key goes to the
    /// webhook's `UMS_COORDINATOR_KEYS`.
    #[arg(
        long,
        env = "UMS_COORDINATOR_SIGNING_KEY",
        default_value = "/etc/ums-coordinator/signing/signing.key"
    )]
    pub signing_key: PathBuf,
    /// The operators' bearer tokens for `POST /migrate` and `GET /migrations` (one per line;
    /// re-read on each call, so a rotated Secret needs no restart).
    #[arg(
        long,
        env = "UMS_COORDINATOR_API_TOKENS",
        default_value = "/etc/ums-coordinator/api/tokens"
    )]
    pub api_tokens: PathBuf,
    /// This cluster's name, as peers see it.
    #[arg(long, env = "UMS_CLUSTER_NAME", default_value = "default")]
    pub cluster: String,
    /// The URL peers reach this coordinator at (`https://host:port`, as their
    /// `destinationUrl`): each destination is told it, so that a copy whose restored state
    /// runs while it is still passive can ask here what became of its migration
    /// (`POST /outcome`) and be made active or deleted. Without it such a copy waits for this
    /// coordinator's own recovery or an operator.
    #[arg(long, env = "UMS_COORDINATOR_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// The sidecars' port in wrapped pods (the webhook's --sidecar-port).
    #[arg(long, env = "UMS_SIDECAR_PORT", default_value_t = 8888)]
    pub sidecar_port: u16,
    /// How long a destination pod may take to run with its sidecar ready, in seconds.
    #[arg(long, env = "UMS_POD_READY_TIMEOUT_SECONDS", default_value_t = 180)]
    pub pod_ready_timeout_seconds: u64,
    /// Where checkpoint images of orchestrator-level (`ssu`) migrations to this cluster are
    /// pushed: `host[:port]/repository` of a registry this cluster's nodes pull from. Without
    /// it this cluster takes no such migration.
    #[arg(long, env = "UMS_CHECKPOINT_REGISTRY")]
    pub checkpoint_registry: Option<String>,
    /// The same repository as this cluster's nodes name it, when they reach the registry by
    /// another address [default: --checkpoint-registry].
    #[arg(long, env = "UMS_CHECKPOINT_REGISTRY_PULL")]
    pub checkpoint_registry_pull: Option<String>,
    /// A CA (PEM file) the checkpoint registry's certificate is signed by, besides the
    /// system's.
    #[arg(long, env = "UMS_CHECKPOINT_REGISTRY_CA")]
    pub checkpoint_registry_ca: Option<PathBuf>,
    /// Speak plain HTTP to the checkpoint registry (a registry on a trusted network only).
    #[arg(long, env = "UMS_CHECKPOINT_REGISTRY_INSECURE")]
    pub checkpoint_registry_insecure: bool,
    /// The CA (PEM file) that signs the kubelets' serving certificates: enables
    /// orchestrator-level (`ssu`) migrations from this cluster, through the kubelet's
    /// checkpoint API.
    #[arg(long, env = "UMS_KUBELET_CA")]
    pub kubelet_ca: Option<PathBuf>,
    /// Do not verify the kubelets' certificates (as metrics-server's flag of that name; for
    /// clusters whose kubelets serve self-signed certificates).
    #[arg(long, env = "UMS_KUBELET_INSECURE_TLS")]
    pub kubelet_insecure_tls: bool,
    /// The token presented to kubelets: this coordinator's service account token (RBAC:
    /// `create` on `nodes/checkpoint`).
    #[arg(
        long,
        env = "UMS_KUBELET_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub kubelet_token_file: PathBuf,
    /// The namespace of the node part (deploy/node).
    #[arg(long, env = "UMS_NODE_PART_NAMESPACE", default_value = "ums-system")]
    pub node_part_namespace: String,
    /// The node part's API port.
    #[arg(long, env = "UMS_NODE_PART_PORT", default_value_t = 8889)]
    pub node_part_port: u16,
    /// Where an orchestrator-level migration's emptyDir archive waits for the pod it goes
    /// into (an emptyDir of the coordinator's pod: as large as the pods' emptyDirs).
    #[arg(
        long,
        env = "UMS_COORDINATOR_DATA_DIR",
        default_value = "/var/lib/ums-coordinator"
    )]
    pub data_dir: PathBuf,
    #[arg(long, env = "UMS_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    /// At most this many migrations from this cluster at once; the others wait, in order, in
    /// phase `queued` (KubeVirt's parallelMigrationsPerCluster).
    #[arg(long, env = "UMS_MAX_PARALLEL_MIGRATIONS", default_value_t = 5)]
    pub max_parallel_migrations: usize,
    /// At most this many migrations leaving one node at once (KubeVirt's
    /// parallelOutboundMigrationsPerNode).
    #[arg(long, env = "UMS_MAX_OUTBOUND_PER_NODE", default_value_t = 2)]
    pub max_outbound_per_node: usize,
    /// The state of one migration goes at most this fast (bytes per second, or a quantity
    /// such as 64Mi; KubeVirt's bandwidthPerMigration); a request's bandwidthPerMigration
    /// wins. Default: no cap.
    #[arg(long, env = "UMS_BANDWIDTH_PER_MIGRATION")]
    pub bandwidth_per_migration: Option<String>,
    /// A move may take at most this many seconds per GiB of the pod's memory (its limits,
    /// else requests; one GiB at least), after which it is aborted and the service stays at
    /// the source (KubeVirt's completionTimeoutPerGiB); a request's completionTimeoutPerGiB
    /// wins. 0: no timeout (the default).
    #[arg(long, env = "UMS_COMPLETION_TIMEOUT_PER_GIB", default_value_t = 0)]
    pub completion_timeout_per_gib: u64,
    /// At the completion timeout, a wrapped pod with one container (what post-copy moves) is
    /// moved again with post-copy instead of staying at the source (KubeVirt's
    /// allowPostCopy); a request's allowPostCopy wins.
    #[arg(long, env = "UMS_ALLOW_POST_COPY", default_value_t = false)]
    pub allow_post_copy: bool,
}

impl Args {
    pub async fn run(self) -> anyhow::Result<()> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let der = std::fs::read(&self.signing_key).with_context(|| {
            format!(
                "failed to read the signing key {}",
                self.signing_key.display()
            )
        })?;
        let signing_key = ums_contract::credential::SigningKey::from_pkcs8(&der)
            .with_context(|| format!("signing key {}", self.signing_key.display()))?;
        tracing::info!(public_key = %signing_key.public_key(), "signing key loaded: give this public key to the webhook (UMS_COORDINATOR_KEYS)");
        let api_tokens = crate::auth::ApiTokens::load(&self.api_tokens)?;
        let cert = ReloadingCert::load(&self.tls_cert, &self.tls_key)
            .context("failed to load the serving certificate")?;
        let kube = kube::Client::try_default()
            .await
            .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
        let advertise_url = self
            .advertise_url
            .as_deref()
            .map(crate::peer::peer_base_url)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--advertise-url: {}", e.message))?;
        let checkpoint_registry = self
            .checkpoint_registry
            .as_ref()
            .map(|push| -> anyhow::Result<_> {
                let host = push.split('/').next().unwrap_or_default().to_owned();
                let cas = match &self.checkpoint_registry_ca {
                    Some(path) => vec![std::fs::read(path).with_context(|| {
                        format!("failed to read the registry CA {}", path.display())
                    })?],
                    None => Vec::new(),
                };
                let ca_pem = cas
                    .first()
                    .map(|pem| String::from_utf8_lossy(pem).into_owned());
                let insecure = if self.checkpoint_registry_insecure {
                    vec![host]
                } else {
                    Vec::new()
                };
                Ok(crate::checkpoint_upload::CheckpointRegistry {
                    push_repository: push.clone(),
                    pull_repository: self
                        .checkpoint_registry_pull
                        .clone()
                        .unwrap_or_else(|| push.clone()),
                    client: ums_checkpoint_image::client(&insecure, &cas)
                        .context("--checkpoint-registry")?,
                    ca_pem,
                    insecure: self.checkpoint_registry_insecure,
                })
            })
            .transpose()?;
        let kubelets = if self.kubelet_ca.is_some() || self.kubelet_insecure_tls {
            let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
            if let Some(path) = &self.kubelet_ca {
                let pem = std::fs::read(path)
                    .with_context(|| format!("failed to read the kubelet CA {}", path.display()))?;
                let ca = reqwest::Certificate::from_pem(&pem)
                    .with_context(|| format!("kubelet CA {}", path.display()))?;
                builder = builder.tls_certs_only([ca]);
            } else {
                tracing::warn!(
                    "--kubelet-insecure-tls: the kubelets' certificates are not verified"
                );
                builder = builder.tls_danger_accept_invalid_certs(true);
            }
            Some(crate::kubelet::Kubelets {
                client: builder
                    .build()
                    .context("failed to build the kubelet client")?,
                token_file: self.kubelet_token_file.clone(),
            })
        } else {
            None
        };
        let mut peer_ca_pem = String::new();
        for path in &self.peer_ca {
            peer_ca_pem.push_str(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("failed to read {}", path.display()))?,
            );
        }
        let coordinator = Arc::new(Coordinator {
            kube,
            cluster: self.cluster,
            advertise_url,
            peers: peer_client(&self.peer_ca, cert.clone())?,
            api_tokens,
            // Plain HTTP on the pod network (see the README's trust model): no TLS roots, so
            // the image needs no system CA bundle.
            sidecars: reqwest::Client::builder()
                .tls_certs_only(std::iter::empty())
                .connect_timeout(Duration::from_secs(10))
                .build()
                .context("failed to build the sidecar client")?,
            sidecar_port: self.sidecar_port,
            pod_ready_timeout: Duration::from_secs(self.pod_ready_timeout_seconds),
            migrations: Mutex::default(),
            signing_key_public: signing_key.public_key_bytes(),
            signing_key,
            metrics: crate::metrics::Metrics::default(),
            checkpoint_registry,
            uploads: Mutex::default(),
            kubelets,
            node_part: crate::state::NodePart {
                namespace: self.node_part_namespace,
                port: self.node_part_port,
                peer_ca_pem,
            },
            data_dir: self.data_dir,
            bandwidth_per_migration: self
                .bandwidth_per_migration
                .as_deref()
                .map(|b| crate::migrate::parse_bandwidth(&serde_json::Value::from(b)))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--bandwidth-per-migration: {}", e.message))?,
            completion_timeout_per_gib: (self.completion_timeout_per_gib > 0)
                .then_some(self.completion_timeout_per_gib),
            allow_post_copy: self.allow_post_copy,
            slots: crate::queue::Slots::new(crate::queue::Limits {
                per_cluster: self.max_parallel_migrations,
                per_node: self.max_outbound_per_node,
            }),
            evacuations: crate::evacuation::Evacuations::default(),
        });
        // Clients may connect without a certificate (operators); peers present theirs.
        let acceptor = TlsAcceptor::from(Arc::new(
            cert.server_config_with_client_cas(peer_roots(&self.peer_ca)?)?,
        ));
        let listener = bind(self.listen).await?;
        tracing::info!(listen = %listener.local_addr()?, cluster = %coordinator.cluster, "ums-coordinator listening");
        let watcher = tokio::spawn(cert.watch(Duration::from_secs(10)));
        {
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                coordinator.recover().await;
                tokio::join!(
                    coordinator.sweep_periodically(),
                    coordinator.finish_periodically()
                );
            });
        }
        let reconciler = tokio::spawn(crate::live_migration::reconcile(coordinator.clone()));
        let app = router(coordinator).fallback(not_found);
        let server = tokio::spawn(serve_tls(listener, acceptor, app));
        let outcome = tokio::select! {
            _ = shutdown_signal() => Ok(()),
            r = server => Err(anyhow::anyhow!("listener stopped: {r:?}")),
        };
        watcher.abort();
        reconciler.abort();
        tracing::info!("ums-coordinator stopping");
        outcome
    }
}

/// Sets up tracing in the chosen format, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
