//! Podman (pind): everything through the compat client, checkpoints through the libpod API.
//!
//! - Checkpoint: `POST /libpod/containers/{name}/checkpoint?export=true&keep=true` answers
//!   with Podman's export tar (CRIU images in `checkpoint/`, the root-fs diff as
//!   `rootfs-diff.tar`, `config.dump`, `spec.dump`, ...), unpacked as it arrives into
//!   `<storage-root>/ums-checkpoints/<checkpoint>/<name>/`: `criu/` (the images) and `engine/`
//!   (the rest). `keep=true` leaves the checkpoint with the container for the way back.
//! - Restore elsewhere: the export tar is rebuilt from the staged files and streamed into
//!   `POST /libpod/containers/{name}/restore?import=true`.
//! - Freezing: Podman refuses to checkpoint a paused container, so the freeze that gives a
//!   multi-container pod its consistent cut goes through the cgroup freezer directly; runc and
//!   CRIU dump a frozen container.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use super::compat::Compat;
use super::{unix_http, CheckpointFiles, Engine, EngineError, EngineKind};
use crate::spec::NestedSpec;

const LIBPOD: &str = "/v5.0.0/libpod";

/// The Podman engine of one runtime container.
#[derive(Debug, Clone)]
pub struct PodmanEngine {
    compat: Compat,
    storage_root: PathBuf,
}

impl PodmanEngine {
    /// Connects to `podman system service` at `socket`; `storage_root` is its `--root`.
    pub async fn connect(socket: &Path, storage_root: &Path) -> Result<Self, EngineError> {
        Ok(PodmanEngine {
            compat: Compat::connect(EngineKind::Podman, socket).await?,
            storage_root: storage_root.to_owned(),
        })
    }

    fn checkpoint_base(&self, checkpoint_id: &str, name: &str) -> PathBuf {
        self.storage_root
            .join("ums-checkpoints")
            .join(checkpoint_id)
            .join(name)
    }

    fn api_error(&self, action: String, status: u16, body: &[u8]) -> EngineError {
        EngineError::Api {
            engine: EngineKind::Podman,
            action,
            status: Some(status),
            message: unix_http::error_message(body),
        }
    }

    fn unreachable(&self, message: String) -> EngineError {
        EngineError::Unreachable {
            engine: EngineKind::Podman,
            socket: self.compat.socket.display().to_string(),
            message,
        }
    }

    /// The container's freezer state file (cgroup v1), or `cgroup.freeze` (v2).
    async fn freezer(&self, name: &str) -> Result<(PathBuf, bool), EngineError> {
        let path = format!("{LIBPOD}/containers/{name}/json");
        let response = unix_http::request(&self.compat.socket, "GET", &path, None)
            .await
            .map_err(|m| self.unreachable(m))?;
        if response.status == 404 {
            return Err(EngineError::NotFound {
                name: name.to_owned(),
            });
        }
        if response.status != 200 {
            return Err(self.api_error(format!("inspect {name}"), response.status, &response.body));
        }
        let inspect: serde_json::Value = serde_json::from_slice(&response.body).map_err(|e| {
            self.api_error(format!("inspect {name}"), 200, e.to_string().as_bytes())
        })?;
        let cgroup = inspect["State"]["CgroupPath"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches('/')
            .to_owned();
        if cgroup.is_empty() {
            return Err(self.api_error(
                format!("find the cgroup of {name}"),
                200,
                b"no State.CgroupPath",
            ));
        }
        let v1 = Path::new("/sys/fs/cgroup/freezer")
            .join(&cgroup)
            .join("freezer.state");
        if v1.exists() {
            return Ok((v1, true));
        }
        Ok((
            Path::new("/sys/fs/cgroup")
                .join(&cgroup)
                .join("cgroup.freeze"),
            false,
        ))
    }

    async fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), EngineError> {
        let (file, v1) = self.freezer(name).await?;
        let value = match (v1, frozen) {
            (true, true) => "FROZEN",
            (true, false) => "THAWED",
            (false, true) => "1",
            (false, false) => "0",
        };
        tokio::fs::write(&file, value)
            .await
            .map_err(|e| EngineError::io("write", &file, e))?;
        if v1 {
            // FREEZING until every task is stopped.
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let state = tokio::fs::read_to_string(&file)
                    .await
                    .map_err(|e| EngineError::io("read", &file, e))?;
                if state.trim() == value {
                    break;
                }
                if Instant::now() > until {
                    return Err(self.api_error(
                        format!("freeze {name}"),
                        0,
                        format!("freezer stuck at {}", state.trim()).as_bytes(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Engine for PodmanEngine {
    fn compat(&self) -> &Compat {
        &self.compat
    }

    fn carries_tcp_connections(&self) -> bool {
        true
    }

    async fn pause(&self, name: &str) -> Result<(), EngineError> {
        self.set_frozen(name, true).await
    }

    async fn unpause(&self, name: &str) -> Result<(), EngineError> {
        self.set_frozen(name, false).await
    }

    async fn checkpoint(
        &self,
        name: &str,
        checkpoint_id: &str,
        leave_running: bool,
        tcp_established: bool,
    ) -> Result<CheckpointFiles, EngineError> {
        let base = self.checkpoint_base(checkpoint_id, name);
        let engine_dir = base.join("engine");
        let criu_dir = base.join("criu");
        let _ = tokio::fs::remove_dir_all(&base).await;
        tokio::fs::create_dir_all(&engine_dir)
            .await
            .map_err(|e| EngineError::io("create", &engine_dir, e))?;
        let path = format!(
            "{LIBPOD}/containers/{name}/checkpoint?export=true&keep=true&fileLocks=true&leaveRunning={leave_running}&tcpEstablished={tcp_established}"
        );
        let request = hyper::Request::post(path)
            .header("host", "localhost")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| self.unreachable(e.to_string()))?;
        let response = unix_http::send(&self.compat.socket, request)
            .await
            .map_err(|m| self.unreachable(m))?;
        let status = response.status().as_u16();
        if status != 200 {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(self.api_error(format!("checkpoint {name}"), status, &body));
        }
        // Unpack the export as it arrives.
        let stream = response
            .into_body()
            .into_data_stream()
            .map_err(std::io::Error::other);
        let reader = SyncIoBridge::new(StreamReader::new(stream));
        let target = engine_dir.clone();
        tokio::task::spawn_blocking(move || tar::Archive::new(reader).unpack(&target))
            .await
            .map_err(|e| {
                EngineError::io(
                    "unpack checkpoint into",
                    &engine_dir,
                    std::io::Error::other(e),
                )
            })?
            .map_err(|e| EngineError::io("unpack checkpoint into", &engine_dir, e))?;
        tokio::fs::rename(engine_dir.join("checkpoint"), &criu_dir)
            .await
            .map_err(|e| EngineError::io("move CRIU images to", &criu_dir, e))?;
        Ok(CheckpointFiles {
            criu_dir,
            rootfs_dir: None,
            engine_dir: Some(engine_dir),
        })
    }

    async fn restore_in_place(
        &self,
        name: &str,
        _checkpoint_id: &str,
        tcp_established: bool,
    ) -> Result<(), EngineError> {
        let path = format!("{LIBPOD}/containers/{name}/restore?keep=true&fileLocks=true&tcpEstablished={tcp_established}");
        let response = unix_http::request(&self.compat.socket, "POST", &path, None)
            .await
            .map_err(|m| self.unreachable(m))?;
        match response.status {
            200..=299 => Ok(()),
            404 => Err(EngineError::NotFound {
                name: name.to_owned(),
            }),
            status => {
                Err(self.api_error(format!("restore {name} in place"), status, &response.body))
            }
        }
    }

    async fn restore_imported(
        &self,
        spec: &NestedSpec,
        _checkpoint_id: &str,
        staged: &CheckpointFiles,
        tcp: crate::tcp::TcpRestore,
    ) -> Result<(), EngineError> {
        let name = &spec.name;
        // A passive pod created the container as a placeholder; the import recreates it with
        // the source's configuration.
        if let Some(existing) = self.compat.inspect(name).await? {
            if existing.is_running() {
                return Err(self.api_error(
                    format!("restore {name}"),
                    409,
                    b"container is running",
                ));
            }
            self.compat.remove(name).await?;
        }
        // Rebuild Podman's export tar from the staged files, streamed into the request.
        let (reader, writer) = tokio::io::duplex(1 << 20);
        let criu_dir = staged.criu_dir.clone();
        let engine_dir = staged.engine_dir.clone();
        let builder = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut bridge = SyncIoBridge::new(writer);
            {
                let mut tar = tar::Builder::new(&mut bridge);
                tar.follow_symlinks(false);
                if let Some(engine_dir) = engine_dir {
                    for entry in std::fs::read_dir(&engine_dir)? {
                        let entry = entry?;
                        let name = entry.file_name();
                        if entry.file_type()?.is_dir() {
                            tar.append_dir_all(&name, entry.path())?;
                        } else {
                            tar.append_path_with_name(entry.path(), &name)?;
                        }
                    }
                }
                tar.append_dir_all("checkpoint", &criu_dir)?;
                tar.finish()?;
            }
            std::io::Write::flush(&mut bridge)?;
            bridge.shutdown()
        });
        let body =
            StreamBody::new(ReaderStream::with_capacity(reader, 1 << 20).map_ok(Frame::data));
        // libpod's REST restore has `tcpEstablished` but no `tcpClose`: closing is prepared by
        // the caller (crate::tcp::ClosedRestore), through the CRIU configuration runc reads.
        let tcp_options = match tcp {
            crate::tcp::TcpRestore::None => "",
            crate::tcp::TcpRestore::Kept | crate::tcp::TcpRestore::Closed => "&tcpEstablished=true",
        };
        let path =
            format!("{LIBPOD}/containers/{name}/restore?import=true&fileLocks=true{tcp_options}");
        let request = hyper::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/x-tar")
            .body(body)
            .map_err(|e| self.unreachable(e.to_string()))?;
        let response = unix_http::send(&self.compat.socket, request)
            .await
            .map_err(|m| self.unreachable(m))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        builder
            .await
            .map_err(|e| {
                EngineError::io(
                    "build the import tar from",
                    &staged.criu_dir,
                    std::io::Error::other(e),
                )
            })?
            .map_err(|e| EngineError::io("build the import tar from", &staged.criu_dir, e))?;
        match status {
            200..=299 => Ok(()),
            status => Err(self.api_error(format!("restore {name} from import"), status, &body)),
        }
    }

    async fn remove_checkpoint(&self, name: &str, checkpoint_id: &str) -> Result<(), EngineError> {
        let base = self.checkpoint_base(checkpoint_id, name);
        match tokio::fs::remove_dir_all(&base).await {
            Ok(()) => {
                // The per-checkpoint directory goes once its last container is gone.
                if let Some(parent) = base.parent() {
                    let _ = tokio::fs::remove_dir(parent).await;
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::io("remove checkpoint", base, e)),
        }
    }
}
