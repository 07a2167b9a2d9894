//! `ums-node-agent`: a kubelet stand-in for the tests of UMS-rs. It watches one cluster's API
//! server for pods and runs them the way a kubelet runs them, for the fields the tests' pods use,
//! on this machine's Docker engine or on a containerd node through the CRI; with the CRI it also
//! serves the kubelet's checkpoint endpoint. See README.md for what it does and does not do.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, ValueEnum};

mod containers;
mod cri;
mod cri_node;
mod docker;
mod endpoints;
mod kubelet_api;
mod network;
mod node;
mod node_object;
mod placement;
mod probes;
mod runtime;
mod status;
mod volumes;

/// Which container runtime runs the node's pods.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum RuntimeKind {
    /// This machine's Docker engine (no checkpoint endpoint).
    Docker,
    /// A containerd 2.x node container (ums-rs/cri-node), driven through the CRI.
    Cri,
}

/// Runs a cluster's pods on this machine's Docker engine or on a CRI node.
#[derive(Debug, Parser)]
#[command(name = "ums-node-agent", version)]
struct Args {
    /// The cluster's kubeconfig (the agent's own identity).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// This node's name: the agent runs pods bound to it (and, with `--run-unbound`, pods
    /// bound to no node).
    #[arg(long, env = "UMS_NODE_NAME", default_value = "node-1")]
    node_name: String,
    /// Also run the pods bound to no node (the rig has no scheduler: one node of a cluster,
    /// its first, takes them; the others run only the pods bound to them).
    #[arg(long, env = "UMS_RUN_UNBOUND", default_value_t = true, action = clap::ArgAction::Set)]
    run_unbound: bool,
    /// Bind the pods bound to no node to a node (pods/binding), as a scheduler would: one
    /// agent of a cluster of several nodes does (placement.rs); then none runs unbound pods.
    #[arg(long, env = "UMS_PLACE_UNBOUND", default_value_t = false, action = clap::ArgAction::Set)]
    place_unbound: bool,
    /// The container runtime.
    #[arg(long, env = "UMS_NODE_RUNTIME", value_enum, default_value = "docker")]
    runtime: RuntimeKind,
    /// Docker runtime: the Docker network that is this cluster's pod network (created if
    /// missing).
    #[arg(long, env = "UMS_POD_NETWORK", default_value = "ums-pods")]
    network: String,
    /// The pod subnet (Docker: the pod network's; CRI: this node's CNI range). The host routes
    /// between the subnets of all nodes and clusters on this machine.
    #[arg(long, env = "UMS_POD_SUBNET", default_value = "10.244.0.0/24")]
    subnet: String,
    /// Where pod volumes (and, with the CRI, the node's containerd state) live on this machine.
    #[arg(
        long,
        env = "UMS_NODE_STATE_DIR",
        default_value = "/var/lib/ums-node-agent"
    )]
    state_dir: PathBuf,
    /// Docker runtime: image of each pod's sandbox container (holds the pod's network namespace).
    #[arg(
        long,
        env = "UMS_SANDBOX_IMAGE",
        default_value = "ums-rs/debian:trixie"
    )]
    sandbox_image: String,
    /// CRI runtime: the node image (tests/cluster/cri-node/build.sh builds it).
    #[arg(long, env = "UMS_NODE_IMAGE", default_value = "ums-rs/cri-node:latest")]
    node_image: String,
    /// CRI runtime: registries (host:port) the node pulls from and pushes to over plain HTTP.
    #[arg(long, env = "UMS_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registries: Vec<String>,
    /// CRI runtime: CA certificates (PEM files) the node trusts besides the system's, for
    /// registries with certificates of their own CA.
    #[arg(long, env = "UMS_REGISTRY_CAS", value_delimiter = ',')]
    registry_cas: Vec<PathBuf>,
    /// CRI runtime: where the kubelet's HTTPS endpoint (checkpoint) listens.
    #[arg(long, env = "UMS_KUBELET_ADDRESS", default_value = "0.0.0.0:10250")]
    kubelet_address: std::net::SocketAddr,
    /// CRI runtime: the kubelet endpoint's serving certificate and key (PEM), signed by a CA its
    /// clients trust; without them, a self-signed certificate made at start (its SHA-256 in
    /// `<state dir>/kubelet.sha256`).
    #[arg(long, env = "UMS_KUBELET_TLS_CERT", requires = "kubelet_tls_key")]
    kubelet_tls_cert: Option<PathBuf>,
    #[arg(long, env = "UMS_KUBELET_TLS_KEY", requires = "kubelet_tls_cert")]
    kubelet_tls_key: Option<PathBuf>,
    /// CRI runtime: the static token file the cluster's API server authenticates with (the
    /// kubelet authenticates the same users).
    #[arg(long, env = "UMS_KUBELET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CRI runtime: users granted `create` on `nodes/checkpoint` (comma separated); members of
    /// system:masters always are.
    #[arg(long, env = "UMS_CHECKPOINT_USERS", value_delimiter = ',')]
    checkpoint_users: Vec<String>,
    /// The node's InternalIP in its Node object (and the pods' hostIP on a CRI node): where
    /// clients reach the kubelet endpoint.
    #[arg(long, env = "UMS_NODE_ADDRESS", default_value = "127.0.0.1")]
    node_address: String,
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
    let args = Args::parse();
    let socket = args.docker_host.trim_start_matches("unix://");
    let docker = bollard::Docker::connect_with_socket(socket, 120, bollard::API_DEFAULT_VERSION)?
        .negotiate_version()
        .await?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let index = node::ContainerIndex::default();
    match args.runtime {
        RuntimeKind::Docker => {
            let pod_network = network::ensure(&docker, &args.network, &args.subnet).await?;
            let version = docker.version().await?.version.unwrap_or_default();
            tokio::spawn(node_object::keep_registered(
                client.clone(),
                node_object::NodeFacts {
                    name: args.node_name.clone(),
                    address: args.node_address.clone(),
                    kubelet_port: 0,
                    runtime_version: format!("docker://{version}"),
                },
            ));
            tracing::info!(node = %args.node_name, network = %args.network, subnet = %args.subnet, "ums-node-agent ready");
            let runtime = docker::DockerRuntime {
                docker,
                node: args.node_name.clone(),
                network: pod_network,
                sandbox_image: args.sandbox_image,
            };
            node::Node {
                client,
                runtime: Arc::new(runtime),
                name: args.node_name,
                state_dir: args.state_dir,
                host_ip: None,
                index,
                run_unbound: args.run_unbound && !args.place_unbound,
                place_unbound: args.place_unbound,
            }
            .run()
            .await
        }
        RuntimeKind::Cri => {
            let token_file = args
                .token_file
                .ok_or_else(|| anyhow::anyhow!("--token-file is required with --runtime cri"))?;
            let tokens = kubelet_api::read_tokens(&token_file)?;
            let node = cri_node::start(
                &docker,
                &args.node_name,
                &args.node_image,
                &args.state_dir,
                &args.subnet,
                &args.insecure_registries,
                &args.registry_cas,
            )
            .await?;
            let runtime = Arc::new(cri::connect(&node.socket, &args.node_name).await?);
            let server_config = match (&args.kubelet_tls_cert, &args.kubelet_tls_key) {
                (Some(cert), Some(key)) => {
                    Arc::new(ums_tls::ReloadingCert::load(cert, key)?.server_config()?)
                }
                _ => {
                    // A kubelet's default: a self-signed serving certificate; clients pin it.
                    let cert = ums_tls::EphemeralCert::generate(&args.node_name)?;
                    std::fs::write(args.state_dir.join("kubelet.sha256"), cert.sha256())?;
                    cert.server_config()
                }
            };
            let kubelet = Arc::new(kubelet_api::Kubelet {
                runtime: runtime.clone(),
                index: index.clone(),
                tokens,
                checkpoint_users: args.checkpoint_users,
                checkpoint_dir: cri_node::KUBELET_CHECKPOINTS.into(),
                containerd_run_dir: args.state_dir.join("containerd-run"),
            });
            let listener = ums_tls::bind(args.kubelet_address).await?;
            let kubelet_address = listener.local_addr()?;
            tokio::spawn(ums_tls::serve_tls(
                listener,
                tokio_rustls::TlsAcceptor::from(server_config),
                kubelet_api::router(kubelet),
            ));
            tokio::spawn(node_object::keep_registered(
                client.clone(),
                node_object::NodeFacts {
                    name: args.node_name.clone(),
                    address: args.node_address.clone(),
                    kubelet_port: kubelet_address.port(),
                    runtime_version: format!("containerd://{}", node.containerd_version),
                },
            ));
            tracing::info!(node = %args.node_name, node_ip = %node.ip, subnet = %args.subnet,
                kubelet = %kubelet_address, "ums-node-agent ready");
            node::Node {
                client,
                runtime,
                name: args.node_name,
                state_dir: args.state_dir,
                host_ip: Some(args.node_address),
                index,
                run_unbound: args.run_unbound && !args.place_unbound,
                place_unbound: args.place_unbound,
            }
            .run()
            .await
        }
    }
}
