//! The nested engine, behind one trait: the HTTP layer, the archive code and the migration
//! logic never know whether Docker or Podman is underneath.

pub mod docker;
pub mod unix_http;

use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::spec::NestedSpec;

/// Which engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Docker,
    Podman,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Docker => "docker",
            EngineKind::Podman => "podman",
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

/// A nested container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerInfo {
    pub name: String,
    pub id: String,
    /// `created`, `running`, `paused`, `exited`, ...
    pub state: String,
    pub exit_code: Option<i64>,
    pub image: String,
    pub image_id: String,
}

impl ContainerInfo {
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

/// Where a checkpoint's files are on disk, at the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFiles {
    /// CRIU's image directory.
    pub criu_dir: PathBuf,
    /// The container's root-fs changes (its writable layer), if the engine exposes one.
    pub rootfs_dir: Option<PathBuf>,
}

/// Where a restore's files must be placed, at the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreTarget {
    pub criu_dir: PathBuf,
    pub rootfs_dir: Option<PathBuf>,
}

/// One chunk of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogChunk {
    Stdout(Bytes),
    Stderr(Bytes),
}

pub type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, EngineError>> + Send>>;

/// Failure of an engine operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The engine's API answered with an error.
    #[error("{engine} failed to {action}: {message}")]
    Api {
        engine: EngineKind,
        action: String,
        status: Option<u16>,
        message: String,
    },
    /// The container does not exist.
    #[error("no nested container named {name:?}")]
    NotFound { name: String },
    /// The image is not present in the engine.
    #[error("image {image:?} is not present in the nested {engine} engine")]
    ImageMissing { engine: EngineKind, image: String },
    /// A file operation on the engine's storage failed.
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The engine cannot reach its socket.
    #[error("cannot reach the {engine} engine at {socket}: {message}")]
    Unreachable {
        engine: EngineKind,
        socket: String,
        message: String,
    },
}

impl EngineError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// A nested container engine.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> EngineKind;
    /// Engine, CRIU, kernel and architecture.
    async fn info(&self) -> Result<EngineInfo, EngineError>;
    /// The containers this sidecar manages.
    async fn list(&self) -> Result<Vec<ContainerInfo>, EngineError>;
    async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, EngineError>;
    /// The ID of a local image, if present.
    async fn image_id(&self, image: &str) -> Result<Option<String>, EngineError>;
    async fn create(&self, spec: &NestedSpec) -> Result<ContainerInfo, EngineError>;
    async fn start(&self, name: &str) -> Result<(), EngineError>;
    async fn stop(&self, name: &str, timeout_seconds: i32) -> Result<(), EngineError>;
    async fn remove(&self, name: &str) -> Result<(), EngineError>;
    /// Freezes every process of the container (cgroup freezer).
    async fn pause(&self, name: &str) -> Result<(), EngineError>;
    async fn unpause(&self, name: &str) -> Result<(), EngineError>;
    /// Dumps the container with CRIU; unless `leave_running`, it is stopped afterwards.
    async fn checkpoint(
        &self,
        name: &str,
        checkpoint_id: &str,
        leave_running: bool,
    ) -> Result<CheckpointFiles, EngineError>;
    /// Where the files of checkpoint `checkpoint_id` must be placed to restore into `name`
    /// (an existing, not running container).
    async fn restore_target(
        &self,
        name: &str,
        checkpoint_id: &str,
    ) -> Result<RestoreTarget, EngineError>;
    /// Starts `name` from a checkpoint placed at its restore target.
    async fn start_from_checkpoint(
        &self,
        name: &str,
        checkpoint_id: &str,
    ) -> Result<(), EngineError>;
    /// Deletes a checkpoint's files.
    async fn remove_checkpoint(&self, name: &str, checkpoint_id: &str) -> Result<(), EngineError>;
    /// The container's output; `follow` keeps the stream open while it runs.
    async fn logs(
        &self,
        name: &str,
        follow: bool,
        since_unix_seconds: i64,
    ) -> Result<LogStream, EngineError>;
}
