//! The archive's manifest (first entry) and trailer (last entry).

use k8s_openapi::api::core::v1::Container;
use serde::{Deserialize, Serialize};

use crate::engine::EngineInfo;

/// The archive format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// What an archive holds and what made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format_version: u32,
    pub migration_id: String,
    pub created_unix_ms: u64,
    /// The source engine, CRIU, kernel and architecture.
    pub source: EngineInfo,
    pub containers: Vec<ContainerManifest>,
    /// Every entry between the manifest and the trailer, in order.
    pub entries: Vec<EntrySummary>,
}

/// One container of the archive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerManifest {
    pub name: String,
    /// The original Kubernetes container (from `migration-containers`).
    pub spec: Container,
    pub image: String,
    pub image_id: String,
    pub checkpoint_id: String,
    /// How the container's memory travels; version 1: one `full` part.
    pub memory_parts: Vec<MemoryPart>,
    pub criu_bytes: u64,
    pub rootfs_bytes: u64,
    /// Engine-specific files (Podman's root-fs diff tar is counted here).
    pub engine_bytes: u64,
    /// Whether the container was running when it was checkpointed.
    pub was_running: bool,
    /// Established TCP connections dumped with the container (CRIU `--tcp-established`).
    #[serde(default)]
    pub tcp_connections: Vec<crate::tcp::TcpConnection>,
}

/// One part of a container's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum MemoryPart {
    /// Every page is in the container's `criu/` images.
    Full,
}

/// An entry as listed in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntrySummary {
    pub path: String,
    pub size: u64,
}

/// The last entry: the digest of every entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trailer {
    /// `(path, lowercase hex SHA-256)`, in archive order.
    pub digests: Vec<(String, String)>,
}
