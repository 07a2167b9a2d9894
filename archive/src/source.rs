//! What made an archive: the engine (or the supervisor) at the source, its CRIU, kernel and
//! architecture, and the TCP connections it dumped. The destination must match them to restore.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Which engine (or supervisor) dumped the processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// A nested Docker engine (`migration-interface: dind`).
    Docker,
    /// A nested Podman (`migration-interface: pind`).
    Podman,
    /// `ums-ff`, the service's own supervisor, with CRIU from inside the service's container
    /// (`migration-interface: ff`, format version 5).
    Ff,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Docker => "docker",
            EngineKind::Podman => "podman",
            EngineKind::Ff => "ff",
        })
    }
}

/// The engine and host facts a destination must match to restore a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineInfo {
    pub kind: EngineKind,
    pub version: String,
    pub api_version: String,
    pub criu_version: String,
    pub kernel: String,
    pub architecture: String,
}

/// One established TCP connection dumped with a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnection {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}
