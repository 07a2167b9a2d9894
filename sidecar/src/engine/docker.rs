//! Docker (dind): everything through the compat client, checkpoints through Docker's own
//! checkpoint API (experimental mode).
//!
//! Docker keeps checkpoints in `<data-root>/containers/<id>/checkpoints/<checkpoint>/`. It
//! cannot restore from a custom checkpoint directory, but it restores a *fresh* container
//! whose checkpoint directory holds the files, which is how a checkpoint made by another
//! engine is restored. The root-fs changes are the container's overlay2 upper directory
//! (`GraphDriver.Data.UpperDir`), copied into the new container's before it starts.
//!
//! The dump goes to runc directly (`runc checkpoint --image-path <Docker's checkpoint dir>`
//! on the container containerd's runc shim runs): Docker's own checkpoint API has containerd
//! dump into a work directory, tar it into its content store and Docker untar it again, 15 s
//! of a 16 s dump at 1 GiB against 0.6 s for runc. Docker sees the container exit as it would
//! after its own checkpoint, and restores from the directory as from one it made. Where runc's
//! state is not where Docker 20.10+ keeps it, Docker's API is used.

use std::path::{Path, PathBuf};

use super::compat::Compat;
use super::files::{merge_into, move_into};
use super::{unix_http, CheckpointFiles, Engine, EngineError, EngineKind, LazyCheckpoint};
use crate::spec::NestedSpec;

/// Where Docker's runc shim keeps its containers' state (`<exec-root>/runtime-runc/moby`).
const RUNC_ROOT: &str = "/run/docker/runtime-runc/moby";

/// The Docker engine of one runtime container.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    compat: Compat,
    data_root: PathBuf,
}

impl DockerEngine {
    /// Connects to the engine at `socket`, whose data root is `data_root`.
    pub async fn connect(socket: &Path, data_root: &Path) -> Result<Self, EngineError> {
        Ok(DockerEngine {
            compat: Compat::connect(EngineKind::Docker, socket).await?,
            data_root: data_root.to_owned(),
        })
    }

    fn checkpoint_dir(&self, container_id: &str, checkpoint_id: &str) -> PathBuf {
        self.data_root
            .join("containers")
            .join(container_id)
            .join("checkpoints")
            .join(checkpoint_id)
    }

    /// `runc checkpoint` of container `id` into `dir` (emptied), with a fresh work directory
    /// (returned: CRIU's `dump.log` is there).
    fn runc_dump(
        &self,
        id: &str,
        dir: &Path,
        leave_running: bool,
        tcp_established: bool,
    ) -> Result<(tokio::process::Command, PathBuf), EngineError> {
        let work = self.data_root.join("ums-checkpoint-work").join(id);
        for d in [dir, work.as_path()] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).map_err(|e| EngineError::io("create", d, e))?;
        }
        let mut runc = tokio::process::Command::new("runc");
        runc.arg("--root")
            .arg(RUNC_ROOT)
            .arg("checkpoint")
            .arg("--image-path")
            .arg(dir)
            .arg("--work-path")
            .arg(&work)
            .arg("--file-locks");
        if leave_running {
            runc.arg("--leave-running");
        }
        if tcp_established {
            runc.arg("--tcp-established");
        }
        runc.arg(id);
        Ok((runc, work))
    }

    /// Dumps container `id` with runc into `dir`; `Ok(false)` when runc does not know it
    /// (another exec root): the caller uses Docker's API.
    async fn runc_checkpoint(
        &self,
        name: &str,
        id: &str,
        dir: &Path,
        leave_running: bool,
        tcp_established: bool,
    ) -> Result<bool, EngineError> {
        let root = Path::new(RUNC_ROOT);
        if !root.join(id).join("state.json").exists() {
            tracing::debug!(
                container = name,
                root = RUNC_ROOT,
                "runc does not know the container: Docker's checkpoint API"
            );
            return Ok(false);
        }
        let (mut runc, work) = self.runc_dump(id, dir, leave_running, tcp_established)?;
        let output = runc
            .output()
            .await
            .map_err(|e| EngineError::io("run runc checkpoint into", dir, e))?;
        let log = std::fs::read_to_string(work.join("dump.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&work);
        if !output.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            return Err(EngineError::Api {
                engine: EngineKind::Docker,
                action: format!("checkpoint {name} with runc"),
                status: None,
                message: format!(
                    "{}; CRIU's log ends: {}",
                    String::from_utf8_lossy(&output.stderr).trim(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            });
        }
        if !leave_running {
            wait_until_exited(&self.compat, name).await?;
        }
        Ok(true)
    }

    async fn start_from_checkpoint(
        &self,
        name: &str,
        checkpoint_id: &str,
    ) -> Result<(), EngineError> {
        // Docker uploads the checkpoint directory to containerd's content store as a tar, and
        // Docker 20.10 fails with "content ... already exists" when that exact tar is already
        // there, which it is when the checkpoint was made by this engine (a rollback in place).
        // A nonce file makes every upload distinct; CRIU ignores files it does not know.
        let id = self.compat.container_id(name).await?;
        let nonce = self
            .checkpoint_dir(&id, checkpoint_id)
            .join("ums-restore-nonce");
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        tokio::fs::write(&nonce, stamp.to_string())
            .await
            .map_err(|e| EngineError::io("write", &nonce, e))?;
        // bollard's StartContainerOptions has no `checkpoint` parameter.
        let path = format!(
            "/v{}/containers/{name}/start?checkpoint={checkpoint_id}",
            self.compat.api_version
        );
        let response = unix_http::request(&self.compat.socket, "POST", &path, None)
            .await
            .map_err(|message| EngineError::Unreachable {
                engine: EngineKind::Docker,
                socket: self.compat.socket.display().to_string(),
                message,
            })?;
        match response.status {
            200..=299 => Ok(()),
            404 => Err(EngineError::NotFound {
                name: name.to_owned(),
            }),
            status => Err(EngineError::Api {
                engine: EngineKind::Docker,
                action: format!("restore {name} from checkpoint {checkpoint_id}"),
                status: Some(status),
                message: unix_http::error_message(&response.body),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Engine for DockerEngine {
    /// Docker's API has no `--tcp-established`, but runc reads CRIU's configuration file on
    /// every checkpoint and restore: with `tcp-established` there (the dind image ships it),
    /// Docker carries established connections.
    fn carries_tcp_connections(&self) -> bool {
        crate::tcp::criu_config_has(
            std::path::Path::new(crate::tcp::RUNC_CRIU_CONFIG),
            "tcp-established",
        )
    }

    fn compat(&self) -> &Compat {
        &self.compat
    }

    async fn checkpoint(
        &self,
        name: &str,
        checkpoint_id: &str,
        leave_running: bool,
        tcp_established: bool,
    ) -> Result<CheckpointFiles, EngineError> {
        // The connections go through runc's CRIU configuration (`tcp-established`), which
        // Docker's API cannot ask for.
        if tcp_established && !self.carries_tcp_connections() {
            return Err(EngineError::Api {
                engine: EngineKind::Docker,
                action: format!("checkpoint {name}"),
                status: None,
                message: format!("Docker's checkpoint API has no --tcp-established and {} does not set tcp-established; established TCP connections cannot be dumped", crate::tcp::RUNC_CRIU_CONFIG),
            });
        }
        let id = self.compat.container_id(name).await?;
        let dir = self.checkpoint_dir(&id, checkpoint_id);
        if self
            .runc_checkpoint(name, &id, &dir, leave_running, tcp_established)
            .await?
        {
            return Ok(CheckpointFiles {
                criu_dir: dir,
                rootfs_dir: self.compat.upper_dir(name).await?,
                engine_dir: None,
            });
        }
        self.compat
            .docker
            .create_checkpoint(
                name,
                bollard::container::CreateCheckpointOptions {
                    checkpoint_id: checkpoint_id.to_owned(),
                    checkpoint_dir: None,
                    exit: !leave_running,
                },
            )
            .await
            .map_err(|e| self.compat.api_error(format!("checkpoint {name}"), e))?;
        Ok(CheckpointFiles {
            criu_dir: self.checkpoint_dir(&id, checkpoint_id),
            rootfs_dir: self.compat.upper_dir(name).await?,
            engine_dir: None,
        })
    }

    async fn checkpoint_lazy(
        &self,
        name: &str,
        checkpoint_id: &str,
        tcp_established: bool,
    ) -> Result<LazyCheckpoint, EngineError> {
        let failed = |message: String| EngineError::Api {
            engine: EngineKind::Docker,
            action: format!("checkpoint {name} lazily"),
            status: None,
            message,
        };
        if tcp_established && !self.carries_tcp_connections() {
            return Err(failed(format!(
                "{} does not set tcp-established; established TCP connections cannot be dumped",
                crate::tcp::RUNC_CRIU_CONFIG
            )));
        }
        let id = self.compat.container_id(name).await?;
        let root = Path::new(RUNC_ROOT);
        if !root.join(&id).join("state.json").exists() {
            return Err(failed(format!(
                "post-copy dumps with runc, which does not know the container under {RUNC_ROOT}"
            )));
        }
        let rootfs_dir = self.compat.upper_dir(name).await?;
        let dir = self.checkpoint_dir(&id, checkpoint_id);
        let (mut runc, work) = self.runc_dump(&id, &dir, false, tcp_established)?;
        let config = crate::postcopy::LazyDumpConfig::set()
            .map_err(|e| EngineError::io("write", crate::tcp::RUNC_CRIU_CONFIG, e))?;
        let child = runc
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| EngineError::io("run runc checkpoint into", &dir, e))?;
        let log = work.join("dump.log");
        let compat = self.compat.clone();
        let container = name.to_owned();
        let work_for_done = work.clone();
        let mut done = tokio::spawn(async move {
            let output = child.wait_with_output().await.map_err(|e| e.to_string())?;
            let log = std::fs::read_to_string(work_for_done.join("dump.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&work_for_done);
            if !output.status.success() {
                return Err(format!(
                    "runc checkpoint failed ({}): {}; CRIU's log: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim(),
                    crate::postcopy::log_tail(&log)
                ));
            }
            // Every page served: runc killed the processes.
            wait_until_exited(&compat, &container)
                .await
                .map_err(|e| e.to_string())
        });
        let serving = crate::postcopy::wait_until_serving(&log, &mut done).await;
        let page_server = config.page_server;
        drop(config);
        serving.map_err(failed)?;
        Ok(LazyCheckpoint {
            files: CheckpointFiles {
                criu_dir: dir,
                rootfs_dir,
                engine_dir: None,
            },
            page_server,
            done,
        })
    }

    async fn restore_in_place(
        &self,
        name: &str,
        checkpoint_id: &str,
        _tcp_established: bool,
    ) -> Result<(), EngineError> {
        self.start_from_checkpoint(name, checkpoint_id).await
    }

    async fn restore_imported(
        &self,
        spec: &NestedSpec,
        checkpoint_id: &str,
        staged: &CheckpointFiles,
        _tcp: crate::tcp::TcpRestore,
    ) -> Result<(), EngineError> {
        let name = &spec.name;
        if self.compat.inspect(name).await?.is_none() {
            self.compat.create(spec).await?;
        }
        let id = self.compat.container_id(name).await?;
        let criu_target = self.checkpoint_dir(&id, checkpoint_id);
        move_into(&staged.criu_dir, &criu_target)
            .map_err(|e| EngineError::io("place CRIU images in", &criu_target, e))?;
        if let (Some(staged_rootfs), Some(upper)) =
            (&staged.rootfs_dir, self.compat.upper_dir(name).await?)
        {
            if staged_rootfs.exists() {
                merge_into(staged_rootfs, &upper)
                    .map_err(|e| EngineError::io("place root-fs changes in", &upper, e))?;
            }
        }
        self.start_from_checkpoint(name, checkpoint_id).await
    }

    async fn remove_checkpoint(&self, name: &str, checkpoint_id: &str) -> Result<(), EngineError> {
        let Some(info) = self.compat.inspect(name).await? else {
            return Ok(());
        };
        let dir = self.checkpoint_dir(&info.id, checkpoint_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::io("remove checkpoint", dir, e)),
        }
    }
}

/// After runc dumped a container without leaving it running: waits (10 s) until Docker, which
/// learns it from containerd's exit event, no longer reports it running.
async fn wait_until_exited(compat: &Compat, name: &str) -> Result<(), EngineError> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while compat
        .inspect(name)
        .await?
        .is_some_and(|c| c.is_running() || c.state == "paused")
    {
        if std::time::Instant::now() > until {
            return Err(EngineError::Api {
                engine: EngineKind::Docker,
                action: format!("checkpoint {name} with runc"),
                status: None,
                message: "Docker still reports the container running 10 s after runc dumped it"
                    .into(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}
