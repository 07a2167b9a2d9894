//! Command-line flags (each with an environment variable) and the wiring of the webhook.

use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tokio_rustls::TlsAcceptor;

use crate::config::WrapConfig;
use crate::metrics::Metrics;
use crate::server::{admin_router, admission_router, bind, serve_tls, AppState};
use crate::tls::ReloadingCert;
use crate::validate::MigrationGuard;
use ums_tls::shutdown_signal;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// `imagePullPolicy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "PascalCase")]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The UMS admission webhook.
#[derive(Debug, Parser)]
#[command(name = "ums-webhook", version, about)]
pub struct Args {
    /// Address of the admission (TLS) listener.
    #[arg(long, env = "UMS_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP admin listener (/livez, /readyz, /metrics).
    #[arg(long, env = "UMS_WEBHOOK_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
    /// PEM certificate chain served to the API server; re-read when it changes.
    #[arg(
        long,
        env = "UMS_WEBHOOK_TLS_CERT",
        default_value = "/etc/ums-webhook/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key of the certificate; re-read when it changes.
    #[arg(
        long,
        env = "UMS_WEBHOOK_TLS_KEY",
        default_value = "/etc/ums-webhook/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes, in seconds.
    #[arg(long, env = "UMS_WEBHOOK_TLS_RELOAD_SECONDS", default_value_t = 10.0)]
    pub tls_reload_seconds: f64,
    /// Runtime image of `migration-interface: dind` pods.
    #[arg(long, env = "DIND_IMAGE", default_value = "ums-rs/dind:latest")]
    pub dind_image: String,
    /// Runtime image of `migration-interface: pind` pods.
    #[arg(long, env = "PIND_IMAGE", default_value = "ums-rs/pind:latest")]
    pub pind_image: String,
    /// Image of the ambassador containers.
    #[arg(
        long,
        env = "AMBASSADOR_IMAGE",
        default_value = "ums-rs/ambassador:latest"
    )]
    pub ambassador_image: String,
    /// imagePullPolicy of the containers the webhook adds (Kubernetes' default when unset).
    #[arg(long, env = "IMAGE_PULL_POLICY")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Users allowed to update or delete a pod under migration (comma-separated).
    #[arg(
        long,
        env = "MIGRATION_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "system:serviceaccount:default:migration-coordinator"
    )]
    pub migration_service_accounts: Vec<String>,
    /// Groups whose members may release a migration's lock by hand (comma-separated): one
    /// update that removes `migration-id` and sets `migration.ums-rs.io/lock-released=<why>`,
    /// nothing else; logged and answered with a warning.
    #[arg(
        long,
        env = "UMS_LOCK_OVERRIDE_GROUPS",
        value_delimiter = ',',
        default_value = "system:masters"
    )]
    pub lock_override_groups: Vec<String>,
    /// Plain-HTTP registries (host:port, comma-separated) the nested engines may pull from:
    /// a registry inside the cluster without TLS. Passed to every runtime container.
    #[arg(long, env = "UMS_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure_registries: Vec<String>,
    /// Public keys (base64 Ed25519, comma-separated) of the cluster's coordinator(s): a wrapped
    /// pod's sidecar accepts only tokens they sign (besides its ambassadors' pod-local token).
    /// Its coordinator prints its key at start and answers it on `GET /`.
    #[arg(long, env = "UMS_COORDINATOR_KEYS", value_delimiter = ',')]
    pub coordinator_keys: Vec<String>,
    /// CPU added to the runtime container on top of the originals' (engine and sidecar).
    #[arg(long, env = "UMS_RUNTIME_CPU_OVERHEAD", default_value = "100m")]
    pub runtime_cpu_overhead: String,
    /// Memory added to the runtime container on top of the originals'.
    #[arg(long, env = "UMS_RUNTIME_MEMORY_OVERHEAD", default_value = "256Mi")]
    pub runtime_memory_overhead: String,
    /// Port of the sidecar API inside wrapped pods.
    #[arg(long, env = "UMS_SIDECAR_PORT", default_value_t = ums_contract::DEFAULT_SIDECAR_PORT)]
    pub sidecar_port: u16,
    /// Log format.
    #[arg(long, env = "UMS_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

impl Args {
    /// Starts both listeners and serves until SIGTERM or Ctrl-C.
    pub async fn run(self) -> anyhow::Result<()> {
        let Args {
            listen,
            admin_listen,
            tls_cert,
            tls_key,
            tls_reload_seconds,
            dind_image,
            pind_image,
            ambassador_image,
            image_pull_policy,
            migration_service_accounts,
            lock_override_groups,
            insecure_registries,
            coordinator_keys,
            runtime_cpu_overhead,
            runtime_memory_overhead,
            sidecar_port,
            log_format: _,
        } = self;
        for (flag, value) in [
            ("--runtime-cpu-overhead", &runtime_cpu_overhead),
            ("--runtime-memory-overhead", &runtime_memory_overhead),
        ] {
            ums_contract::quantity::parse_nanos(value)
                .with_context(|| format!("invalid {flag}"))?;
        }
        anyhow::ensure!(
            tls_reload_seconds.is_finite() && tls_reload_seconds > 0.0,
            "--tls-reload-seconds must be a positive number of seconds"
        );
        let wrap = WrapConfig {
            dind_image,
            pind_image,
            ambassador_image,
            image_pull_policy: image_pull_policy.map(|p| format!("{p:?}")),
            runtime_cpu_overhead: Quantity(runtime_cpu_overhead),
            runtime_memory_overhead: Quantity(runtime_memory_overhead),
            sidecar_port,
            insecure_registries: insecure_registries
                .into_iter()
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty())
                .collect(),
            coordinator_keys: coordinator_keys
                .into_iter()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty())
                .collect(),
        };
        let guard = MigrationGuard {
            migration_accounts: migration_service_accounts
                .into_iter()
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect(),
            override_groups: lock_override_groups
                .into_iter()
                .map(|g| g.trim().to_owned())
                .filter(|g| !g.is_empty())
                .collect(),
        };

        let cert = ReloadingCert::load(&tls_cert, &tls_key)
            .context("failed to load the serving certificate")?;
        let acceptor = TlsAcceptor::from(Arc::new(cert.server_config()?));
        let state = Arc::new(AppState {
            wrap,
            guard,
            metrics: Metrics::default(),
            ready: AtomicBool::new(false),
        });

        let admin = bind(admin_listen).await?;
        let admission = bind(listen).await?;
        tracing::info!(admission = %admission.local_addr()?, admin = %admin.local_addr()?, "ums-webhook listening");
        let watcher = tokio::spawn(cert.watch(Duration::from_secs_f64(tls_reload_seconds)));
        let admin_server =
            tokio::spawn(axum::serve(admin, admin_router(state.clone())).into_future());
        let admission_server = tokio::spawn(serve_tls(
            admission,
            acceptor,
            admission_router(state.clone()),
        ));
        state.ready.store(true, Ordering::Release);

        let outcome = tokio::select! {
            _ = shutdown_signal() => Ok(()),
            r = admin_server => Err(anyhow::anyhow!("admin listener stopped: {r:?}")),
            r = admission_server => Err(anyhow::anyhow!("admission listener stopped: {r:?}")),
        };
        watcher.abort();
        tracing::info!("ums-webhook stopping");
        outcome
    }
}

/// Sets up tracing in the chosen format, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
