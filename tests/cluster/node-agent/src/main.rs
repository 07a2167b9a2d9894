//! `ums-node-agent`: a kubelet stand-in for the tests of UMS-rs. It watches one cluster's API
//! server for pods and runs them on this machine's Docker engine the way a kubelet runs them,
//! for the fields a wrapped pod uses. See README.md for what it does and does not do.

use std::path::PathBuf;

use clap::Parser;

mod containers;
mod network;
mod node;
mod probes;
mod status;
mod volumes;

/// Runs a cluster's pods on this machine's Docker engine.
#[derive(Debug, Parser)]
#[command(name = "ums-node-agent", version)]
struct Args {
    /// The cluster's kubeconfig (the agent's own identity).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// This node's name: the agent runs pods bound to it and pods bound to no node.
    #[arg(long, env = "UMS_NODE_NAME", default_value = "node-1")]
    node_name: String,
    /// The Docker network that is this cluster's pod network (created if missing).
    #[arg(long, env = "UMS_POD_NETWORK", default_value = "ums-pods")]
    network: String,
    /// The pod network's subnet (one per cluster; the host routes between them).
    #[arg(long, env = "UMS_POD_SUBNET", default_value = "10.244.0.0/24")]
    subnet: String,
    /// Where pod volumes live on this machine.
    #[arg(
        long,
        env = "UMS_NODE_STATE_DIR",
        default_value = "/var/lib/ums-node-agent"
    )]
    state_dir: PathBuf,
    /// Image of each pod's sandbox container (holds the pod's network namespace).
    #[arg(
        long,
        env = "UMS_SANDBOX_IMAGE",
        default_value = "ums-rs/debian:trixie"
    )]
    sandbox_image: String,
    /// Docker engine socket.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    docker_host: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Args {
        kubeconfig,
        node_name,
        network,
        subnet,
        state_dir,
        sandbox_image,
        docker_host,
    } = Args::parse();
    let socket = docker_host.trim_start_matches("unix://");
    let docker = bollard::Docker::connect_with_socket(socket, 120, bollard::API_DEFAULT_VERSION)?
        .negotiate_version()
        .await?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let pod_network = network::ensure(&docker, &network, &subnet).await?;
    tracing::info!(node = %node_name, network = %network, subnet = %subnet, "ums-node-agent ready");
    node::Node {
        client,
        docker,
        name: node_name,
        network: pod_network,
        state_dir,
        sandbox_image,
    }
    .run()
    .await
}
