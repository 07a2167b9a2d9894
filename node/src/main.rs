//! `ums-node`: UMS-rs's node-level part, one per node (deploy/node, a DaemonSet). For
//! orchestrator-level migrations it reads the kubelet's checkpoint archives on its node (a
//! hostPath of the checkpoint directory) and the migrated pod's emptyDir volumes (the kubelet's
//! pod directories, read-only), and sends them straight to the destination cluster; see
//! `api.rs`. `ums-node restore-volumes` is the init container that puts those volumes back in
//! the restored pod (`restore_volumes.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

mod api;
mod archive;
mod restore_volumes;

/// Sends this node's kubelet checkpoint archives to a destination cluster.
#[derive(Debug, Parser)]
#[command(name = "ums-node", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address of the HTTP API (the pod network; every call but /healthz needs a token of this
    /// cluster's coordinator).
    #[arg(long, env = "UMS_NODE_LISTEN", default_value = "0.0.0.0:8889")]
    listen: SocketAddr,
    /// Where the kubelet's checkpoint directory is mounted in this container.
    #[arg(long, env = "UMS_CHECKPOINT_DIR", default_value = "/checkpoints")]
    checkpoint_dir: PathBuf,
    /// The kubelet's checkpoint directory as the node names it (the paths the kubelet answers).
    #[arg(
        long,
        env = "UMS_NODE_CHECKPOINT_DIR",
        default_value = "/var/lib/kubelet/checkpoints"
    )]
    node_checkpoint_dir: PathBuf,
    /// Public keys (base64, comma-separated) of the coordinator(s) whose tokens are accepted.
    #[arg(long, env = "UMS_COORDINATOR_KEYS")]
    coordinator_keys: String,
    /// This pod's IP (downward API): tokens are bound to it.
    #[arg(long, env = "UMS_POD_IP")]
    pod_ip: String,
    /// This pod's UID (downward API): tokens that name a pod must name this one.
    #[arg(long, env = "UMS_POD_UID")]
    pod_uid: Option<String>,
    /// Where the kubelet's pod directories (/var/lib/kubelet/pods) are mounted, read-only:
    /// emptyDir volumes are read there. Unset or absent: pods with emptyDirs are refused.
    #[arg(long, env = "UMS_PODS_DIR", default_value = "/pods")]
    pods_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The init container of a restored pod: waits for its emptyDir volumes from the
    /// coordinator that created it, unpacks them, exits.
    RestoreVolumes {
        /// Where the pod's emptyDir volumes are mounted, one directory each, by volume name.
        #[arg(long, env = "UMS_VOLUMES_DIR", default_value = "/ums-volumes")]
        dir: PathBuf,
        /// Address of its HTTP(S) endpoint on the pod network.
        #[arg(long, env = "UMS_RESTORE_LISTEN", default_value = "0.0.0.0:8890")]
        listen: SocketAddr,
        /// How long to wait for the volumes before giving up (the pod then does not start).
        #[arg(long, env = "UMS_RESTORE_WAIT_SECONDS", default_value_t = 600)]
        wait_seconds: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let coordinator_keys = ums_contract::credential::parse_public_keys(&args.coordinator_keys)
        .map_err(|e| anyhow::anyhow!("UMS_COORDINATOR_KEYS: {e}"))?;
    let pod_uid = args.pod_uid.filter(|u| !u.is_empty());
    if let Some(Command::RestoreVolumes {
        dir,
        listen,
        wait_seconds,
    }) = args.command
    {
        return restore_volumes::run(
            listen,
            dir,
            coordinator_keys,
            args.pod_ip,
            pod_uid,
            std::time::Duration::from_secs(wait_seconds),
        )
        .await;
    }
    anyhow::ensure!(
        args.checkpoint_dir.is_dir(),
        "the checkpoint directory {} is not mounted",
        args.checkpoint_dir.display()
    );
    let part = Arc::new(api::NodePart {
        dir: args.checkpoint_dir,
        node_dir: args.node_checkpoint_dir,
        coordinator_keys,
        pod_ip: args.pod_ip,
        pod_uid,
        pods_dir: Some(args.pods_dir).filter(|d| d.is_dir()),
    });
    let listener = ums_tls::bind(args.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, dir = %part.dir.display(), "ums-node listening");
    axum::serve(listener, api::router(part))
        .with_graceful_shutdown(ums_tls::shutdown_signal())
        .await?;
    Ok(())
}
