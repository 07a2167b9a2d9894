//! Command-line flags, each with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::EngineKind;

/// The nested engine, as `--engine` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    Docker,
    Podman,
}

impl From<EngineArg> for EngineKind {
    fn from(engine: EngineArg) -> Self {
        match engine {
            EngineArg::Docker => EngineKind::Docker,
            EngineArg::Podman => EngineKind::Podman,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "ums-sidecar",
    version,
    about = "UMS-rs runtime sidecar and ambassador"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "UMS_LOG_FORMAT",
        value_enum,
        default_value = "plain",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the sidecar API next to the nested engine.
    Serve(ServeArgs),
    /// Stand in for one original container: create it nested, relay its output, exit with it.
    Ambassador(AmbassadorArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The nested engine.
    #[arg(long, env = "UMS_ENGINE", value_enum, default_value = "docker")]
    pub engine: EngineArg,
    /// The engine's unix socket, never a TCP port [default: /var/run/docker.sock for docker,
    /// /run/podman/podman.sock for podman].
    #[arg(long, env = "UMS_ENGINE_SOCKET")]
    pub engine_socket: Option<PathBuf>,
    /// The engine's data root, where checkpoints, container file changes and incoming
    /// archives live [default: /var/lib/docker for docker, /var/lib/containers for podman].
    #[arg(long, env = "UMS_ENGINE_ROOT")]
    pub engine_root: Option<PathBuf>,
    /// The downward-API annotations file.
    #[arg(long, env = "UMS_PODINFO", default_value = "/etc/podinfo/annotations")]
    pub podinfo: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, env = "UMS_LISTEN", default_value = "0.0.0.0:8888")]
    pub listen: SocketAddr,
    /// File holding the bearer token required on every endpoint but /healthz and /probe.
    #[arg(long, env = "UMS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where to write a fresh random token for the pod's ambassadors (a volume only the
    /// runtime and the ambassadors mount); it allows /create and /logs only.
    #[arg(long, env = "UMS_POD_TOKEN_FILE")]
    pub pod_token_file: Option<PathBuf>,
    /// Public keys (base64, comma-separated) of the coordinator(s) whose signed tokens are
    /// accepted; set by the webhook in wrapped pods.
    #[arg(long, env = "UMS_COORDINATOR_KEYS")]
    pub coordinator_keys: Option<String>,
}

#[derive(Debug, Args)]
pub struct AmbassadorArgs {
    /// The original container this ambassador stands in for.
    pub name: String,
    /// Base URL of the runtime container's sidecar.
    #[arg(long, env = "UMS_RUNTIME_URL", default_value = "http://127.0.0.1:8888")]
    pub runtime_url: String,
    /// File holding the sidecar's bearer token, if it requires one.
    #[arg(long, env = "UMS_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}
