//! The nested engine, behind one trait: the HTTP layer, the archive code and the migration
//! logic never know whether Docker or Podman is underneath.

pub mod compat;
pub mod docker;
pub mod files;
pub mod podman;
pub mod unix_http;

use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::spec::NestedSpec;

pub use ums_archive::{EngineInfo, EngineKind};

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

/// A checkpoint's files on disk: made by the engine at the source, or unpacked from an
/// archive into a staging directory at the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFiles {
    /// CRIU's image directory.
    pub criu_dir: PathBuf,
    /// The container's root-fs changes as a directory tree (Docker: its writable layer).
    pub rootfs_dir: Option<PathBuf>,
    /// Engine-specific files the engine needs to restore (Podman: its export's config,
    /// spec and root-fs diff tar).
    pub engine_dir: Option<PathBuf>,
}

/// A lazy checkpoint under way (post-copy): every image but the memory is written, and CRIU
/// serves the pages on `page_server` until the destination has fetched them all.
#[derive(Debug)]
pub struct LazyCheckpoint {
    pub files: CheckpointFiles,
    pub page_server: std::net::SocketAddr,
    /// The engine's checkpoint call: it ends once CRIU has served every page (the source
    /// processes are then gone) or failed (CRIU thawed them).
    pub done: tokio::task::JoinHandle<Result<(), String>>,
}

/// Which stream a line of output came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStreamKind {
    Stdout,
    Stderr,
}

/// One line (or chunk) of a container's output, with the engine's timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub stream: LogStreamKind,
    /// UNIX time in nanoseconds, as the engine recorded it.
    pub time_nanos: Option<i128>,
    pub data: Bytes,
}

pub type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, EngineError>> + Send>>;

/// Where a reader resumes a container's output: each stream after the time of the last line
/// it saw on that stream (UNIX nanoseconds, exclusive; 0 for all).
///
/// One resume point for both streams is not enough: Docker stamps stdout and stderr in separate
/// copiers, so in the log's order the time can go back across streams (a line written on
/// stdout, then one on stderr, may carry the earlier time). A reader that resumed both after
/// the time of the last line it read would be handed the stdout line again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogResume {
    pub stdout_after: i128,
    pub stderr_after: i128,
}

impl LogResume {
    /// The whole second the engine's own `since` filter may start at: the earlier of the two
    /// cuts (the exact cut is [`LogResume::admits`]).
    pub fn since_seconds(&self) -> i32 {
        let earliest = self.stdout_after.min(self.stderr_after).max(0);
        i32::try_from(earliest.div_euclid(1_000_000_000)).unwrap_or(0)
    }

    /// Whether a line of `stream` stamped `time_nanos` comes after this resume point.
    pub fn admits(&self, stream: LogStreamKind, time_nanos: Option<i128>) -> bool {
        let after = match stream {
            LogStreamKind::Stdout => self.stdout_after,
            LogStreamKind::Stderr => self.stderr_after,
        };
        after <= 0 || time_nanos.is_none_or(|t| t > after)
    }

    /// Moves the stream's cut past a line the reader has relayed.
    pub fn advance(&mut self, stream: LogStreamKind, time_nanos: i128) {
        match stream {
            LogStreamKind::Stdout => self.stdout_after = time_nanos,
            LogStreamKind::Stderr => self.stderr_after = time_nanos,
        }
    }
}

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
    /// The engine could not pull the image from its registry.
    #[error("the nested {engine} engine failed to pull image {image:?}: {message}")]
    PullFailed {
        engine: EngineKind,
        image: String,
        message: String,
    },
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

/// A nested container engine. Everything but checkpoint and restore goes through the
/// Docker-compatible API ([`compat::Compat`]), which both engines serve.
#[async_trait::async_trait]
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// The Docker-compatible client of this engine.
    fn compat(&self) -> &compat::Compat;

    fn kind(&self) -> EngineKind {
        self.compat().kind
    }
    /// Engine, CRIU, kernel and architecture.
    async fn info(&self) -> Result<EngineInfo, EngineError> {
        let (version, kernel) = self.compat().version().await?;
        Ok(EngineInfo {
            kind: self.kind(),
            version,
            api_version: self.compat().api_version.clone(),
            criu_version: criu_version().await,
            kernel,
            architecture: std::env::consts::ARCH.to_owned(),
        })
    }
    /// The containers this sidecar manages.
    async fn list(&self) -> Result<Vec<ContainerInfo>, EngineError> {
        self.compat().list().await
    }
    async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, EngineError> {
        self.compat().inspect(name).await
    }
    /// The PID (in this namespace) of the container's first process, while it runs.
    async fn pid(&self, name: &str) -> Result<Option<u32>, EngineError> {
        self.compat().pid(name).await
    }
    /// Whether checkpoints can carry established TCP connections (CRIU `--tcp-established`).
    fn carries_tcp_connections(&self) -> bool {
        false
    }
    /// The ID of a local image, if present.
    async fn image_id(&self, image: &str) -> Result<Option<String>, EngineError> {
        self.compat().image_id(image).await
    }
    /// Writes a local image into a `docker save` tar at `to` (both engines serve it on the
    /// Docker-compatible API); returns its size.
    async fn save_image(&self, image: &str, to: &std::path::Path) -> Result<u64, EngineError> {
        self.compat().save_image(image, to).await
    }
    /// Loads an image saved by [`Engine::save_image`]: same ID, same tags.
    async fn load_image(&self, from: &std::path::Path) -> Result<(), EngineError> {
        self.compat().load_image(from).await
    }
    async fn create(&self, spec: &NestedSpec) -> Result<ContainerInfo, EngineError> {
        self.compat().create(spec).await
    }
    async fn start(&self, name: &str) -> Result<(), EngineError> {
        self.compat().start(name).await
    }
    async fn stop(&self, name: &str, timeout_seconds: i32) -> Result<(), EngineError> {
        self.compat().stop(name, timeout_seconds).await
    }
    async fn remove(&self, name: &str) -> Result<(), EngineError> {
        self.compat().remove(name).await
    }
    /// Freezes every process of the container (cgroup freezer).
    async fn pause(&self, name: &str) -> Result<(), EngineError> {
        self.compat().pause(name).await
    }
    async fn unpause(&self, name: &str) -> Result<(), EngineError> {
        self.compat().unpause(name).await
    }
    /// The container's output after `resume` (each stream cut at its own point);
    /// `follow` keeps the stream open while it runs.
    async fn logs(
        &self,
        name: &str,
        follow: bool,
        resume: LogResume,
    ) -> Result<LogStream, EngineError> {
        self.compat().logs(name, follow, resume).await
    }

    /// Dumps the (frozen) container with CRIU; unless `leave_running`, it is stopped
    /// afterwards. The files stay until [`Engine::remove_checkpoint`].
    async fn checkpoint(
        &self,
        name: &str,
        checkpoint_id: &str,
        leave_running: bool,
        tcp_established: bool,
    ) -> Result<CheckpointFiles, EngineError>;
    /// Dumps the (frozen) container lazily for post-copy: returns once the non-memory images
    /// are written and CRIU serves the pages (see [`crate::postcopy`]).
    async fn checkpoint_lazy(
        &self,
        name: &str,
        checkpoint_id: &str,
        tcp_established: bool,
    ) -> Result<LazyCheckpoint, EngineError> {
        let _ = (checkpoint_id, tcp_established);
        Err(EngineError::Api {
            engine: self.kind(),
            action: format!("checkpoint {name} lazily"),
            status: None,
            message: "post-copy is not built for this engine".into(),
        })
    }
    /// Restores `name` in place from a checkpoint this engine made (the way back after a
    /// failed migration).
    async fn restore_in_place(
        &self,
        name: &str,
        checkpoint_id: &str,
        tcp_established: bool,
    ) -> Result<(), EngineError>;
    /// Restores a checkpoint made by another engine of the same kind, from `staged` files,
    /// into container `spec.name` (created from `spec` if needed; an existing container of
    /// that name must not be running). Returns when the engine has started it.
    async fn restore_imported(
        &self,
        spec: &NestedSpec,
        checkpoint_id: &str,
        staged: &CheckpointFiles,
        tcp: crate::tcp::TcpRestore,
    ) -> Result<(), EngineError>;
    /// Deletes a checkpoint's files.
    async fn remove_checkpoint(&self, name: &str, checkpoint_id: &str) -> Result<(), EngineError>;
}

/// CRIU's version as `criu --version` prints it ("Version: 4.1.1").
pub async fn criu_version() -> String {
    match tokio::process::Command::new("criu")
        .arg("--version")
        .output()
        .await
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| "unknown".into()),
        Err(_) => "not installed".into(),
    }
}

#[cfg(test)]
mod log_resume_tests {
    use super::{LogResume, LogStreamKind::*};

    /// The order Docker's log can hand out: the job's last tick on stdout stamped 20, then its
    /// "exiting" line on stderr stamped 19 (the stderr copier ran first). A reader that relayed
    /// both resumes; the tick must not come again.
    #[test]
    fn a_line_is_not_handed_out_again_when_times_go_back_across_streams() {
        let mut resume = LogResume::default();
        resume.advance(Stdout, 20);
        resume.advance(Stderr, 19);
        assert!(!resume.admits(Stdout, Some(20)));
        assert!(!resume.admits(Stderr, Some(19)));
        assert!(resume.admits(Stdout, Some(21)));
        assert!(resume.admits(Stderr, Some(20)));
        // The single resume point it replaces (the last line's time, 19) admitted the tick.
        let single = LogResume {
            stdout_after: 19,
            stderr_after: 19,
        };
        assert!(single.admits(Stdout, Some(20)));
    }

    #[test]
    fn the_engine_filter_starts_at_the_earlier_cut_and_nothing_is_cut_from_zero() {
        let resume = LogResume {
            stdout_after: 5_000_000_000,
            stderr_after: 3_999_999_999,
        };
        assert_eq!(resume.since_seconds(), 3);
        assert_eq!(LogResume::default().since_seconds(), 0);
        assert!(LogResume::default().admits(Stdout, Some(1)));
        assert!(resume.admits(Stdout, None));
    }
}
