//! The archive's manifest (first entry) and trailer (last entry).

use k8s_openapi::api::core::v1::Container;
use serde::{Deserialize, Serialize};

use crate::source::{EngineInfo, EngineKind, TcpConnection};

/// The newest archive format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 5;

/// Every version this build reads: a version-1 archive is a version-2 archive without
/// volumes and images; version 3 only changes what a Podman source's engine files are; version 4
/// adds memory that follows the restore (`lazy`, post-copy); version 5 an archive `ums-ff` wrote
/// (a service's process tree, dumped from inside its container).
pub const READABLE_VERSIONS: [u32; 5] = [1, 2, 3, 4, 5];

/// The version an archive whose memory follows the restore needs (post-copy).
pub const LAZY_VERSION: u32 = 4;

/// The lowest version that can carry `manifest`'s content (an older destination still reads
/// an archive that needs nothing newer).
pub fn required_version(manifest: &Manifest) -> u32 {
    let lazy = manifest
        .containers
        .iter()
        .any(|c| c.memory_parts.contains(&MemoryPart::Lazy));
    let version = version_for(
        manifest.source.kind,
        !manifest.volumes.is_empty(),
        !manifest.images.is_empty(),
    );
    if lazy {
        version.max(LAZY_VERSION)
    } else {
        version
    }
}

/// The lowest version that carries an archive from a `kind` engine with or without volumes
/// and images (what a source decides before it has a manifest, in its preflight): 5 from
/// `ums-ff` (a service's tree; only an `ums-ff` restores it), 3 from Podman (its checkpoint as
/// the container's own files, no export tar), else 2 with volumes or images, else 1.
pub fn version_for(kind: EngineKind, volumes: bool, images: bool) -> u32 {
    if kind == EngineKind::Ff {
        5
    } else if kind == EngineKind::Podman {
        3
    } else if volumes || images {
        2
    } else {
        1
    }
}

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
    /// The pod volumes carried (version 2), under `volumes/<name>/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeManifest>,
    /// Images the destination lacked, as `docker save` tars (version 2), under `images/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageManifest>,
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
    pub tcp_connections: Vec<TcpConnection>,
}

/// One pod volume of the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeManifest {
    /// The pod volume's name (`/mount/<name>` at both ends).
    pub name: String,
    /// Its kind at the source (`emptyDir`, ...).
    pub kind: String,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries (files, directories, links) under it.
    pub entries: u64,
}

/// One image of the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// The reference the containers use.
    pub image: String,
    /// Its ID at the source; the destination must have this ID after loading it.
    pub image_id: String,
    /// The archive entry holding the `docker save` tar (`images/<n>.tar`).
    pub path: String,
    pub bytes: u64,
}

/// One part of a container's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum MemoryPart {
    /// Every page is in the container's `criu/` images.
    Full,
    /// No page is in the archive: the source's CRIU serves them once the destination has
    /// resumed the processes (post-copy, version 4; `POST /restore/pages/{migrationId}`).
    Lazy,
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
