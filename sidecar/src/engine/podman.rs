//! Podman (pind): everything through the compat client, checkpoints through the libpod API.
//!
//! - Checkpoint: `POST /libpod/containers/{name}/checkpoint?keep=true` (no export: Podman's
//!   export tars the images into a temporary file, 6 s of a 7 s dump at 1 GiB), then the
//!   container's own files are renamed into `<storage-root>/ums-checkpoints/<checkpoint>/<name>/`:
//!   `criu/` (its `userdata/checkpoint`) and `engine/` (`network.status`,
//!   `devshm-checkpoint.tar`); the root-fs changes are its writable layer, as for Docker.
//! - Restore elsewhere: the passive container (created, never started) is initialised and
//!   stopped, which writes its runtime spec (`config.json`) without running anything; the
//!   staged images and files are renamed into its `userdata`, the root-fs changes merged into
//!   its writable layer, and `POST /libpod/containers/{name}/restore` restores it in place.
//!   An archive from an earlier sidecar (Podman's export: `config.dump` among the engine files)
//!   is still restored through `restore?import=true`.
//! - Freezing: Podman refuses to checkpoint a paused container, so the freeze that gives a
//!   multi-container pod its consistent cut goes through the cgroup freezer directly; runc and
//!   CRIU dump a frozen container.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt as _;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use tokio_util::io::{ReaderStream, SyncIoBridge};

use super::compat::Compat;
use super::files::{copy_files, merge_into, move_into};
use super::{unix_http, CheckpointFiles, Engine, EngineError, EngineKind, LazyCheckpoint};
use crate::spec::NestedSpec;

const LIBPOD: &str = "/v5.0.0/libpod";

/// Podman's own files of a checkpoint, next to CRIU's images in the container's `userdata`.
const ENGINE_FILES: [&str; 2] = ["network.status", "devshm-checkpoint.tar"];

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

    /// libpod's inspect of `name`.
    async fn libpod_inspect(&self, name: &str) -> Result<serde_json::Value, EngineError> {
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
        serde_json::from_slice(&response.body)
            .map_err(|e| self.api_error(format!("inspect {name}"), 200, e.to_string().as_bytes()))
    }

    /// The container's `userdata` directory (its runtime spec, checkpoint, network status).
    async fn userdata(&self, name: &str) -> Result<PathBuf, EngineError> {
        let inspect = self.libpod_inspect(name).await?;
        self.userdata_of(name, &inspect)
    }

    /// `userdata` from libpod's inspect of `name` (`StaticDir`).
    fn userdata_of(&self, name: &str, inspect: &serde_json::Value) -> Result<PathBuf, EngineError> {
        inspect["StaticDir"]
            .as_str()
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| self.api_error(format!("inspect {name}"), 200, b"no StaticDir"))
    }

    /// `POST` on libpod; any answer but 2xx is an error of `action`.
    async fn post(&self, name: &str, path: &str, action: String) -> Result<(), EngineError> {
        let response = unix_http::request(&self.compat.socket, "POST", path, None)
            .await
            .map_err(|m| self.unreachable(m))?;
        match response.status {
            200..=299 | 304 => Ok(()),
            404 => Err(EngineError::NotFound {
                name: name.to_owned(),
            }),
            status => Err(self.api_error(action, status, &response.body)),
        }
    }

    /// Brings a container that must be restored from files into `exited` with a runtime
    /// spec: a passive container (`created`: never initialised) is initialised (runc create:
    /// the spec is written, the process waits before exec) and stopped, so nothing of the
    /// service ever runs.
    async fn prepare_for_restore(&self, name: &str) -> Result<PathBuf, EngineError> {
        let inspect = self.libpod_inspect(name).await?;
        let state = inspect["State"]["Status"].as_str().unwrap_or("").to_owned();
        if matches!(state.as_str(), "running" | "paused") {
            return Err(self.api_error(
                format!("restore {name}"),
                409,
                format!("the container is {state}").as_bytes(),
            ));
        }
        if matches!(state.as_str(), "created" | "configured") {
            self.post(
                name,
                &format!("{LIBPOD}/containers/{name}/init"),
                format!("initialise {name} for the restore"),
            )
            .await?;
        }
        if matches!(state.as_str(), "created" | "configured" | "initialized") {
            self.post(
                name,
                &format!("{LIBPOD}/containers/{name}/stop?timeout=0"),
                format!("stop the initialised {name}"),
            )
            .await?;
        }
        let userdata = self.userdata_of(name, &inspect)?;
        let spec = userdata.join("config.json");
        if !spec.exists() {
            return Err(self.api_error(
                format!("restore {name}"),
                409,
                format!(
                    "{} is missing after the container was initialised (state was {state:?})",
                    spec.display()
                )
                .as_bytes(),
            ));
        }
        Ok(userdata)
    }

    /// The container's freezer state file (cgroup v1), or `cgroup.freeze` (v2).
    async fn freezer(&self, name: &str) -> Result<(PathBuf, bool), EngineError> {
        let inspect = self.libpod_inspect(name).await?;
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
        let mountinfo = tokio::fs::read_to_string("/proc/self/mountinfo")
            .await
            .unwrap_or_default();
        Ok(freezer_file(&mountinfo, &cgroup))
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

    /// Restores an archive of an earlier sidecar (format 1 or 2: Podman's export), by
    /// rebuilding the export tar from the staged files and streaming it into
    /// `restore?import=true`.
    async fn restore_from_export(
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
        self.post(
                    name,
            &format!(
                "{LIBPOD}/containers/{name}/checkpoint?keep=true&fileLocks=true&leaveRunning={leave_running}&tcpEstablished={tcp_established}"
            ),
            format!("checkpoint {name}"),
        )
        .await?;
        let userdata = self.userdata(name).await?;
        take_files(&userdata, &criu_dir, &engine_dir)?;
        Ok(CheckpointFiles {
            criu_dir,
            rootfs_dir: self.compat.upper_dir(name).await?,
            engine_dir: Some(engine_dir),
        })
    }

    async fn checkpoint_lazy(
        &self,
        name: &str,
        checkpoint_id: &str,
        tcp_established: bool,
    ) -> Result<LazyCheckpoint, EngineError> {
        // Read before the call: Podman holds the container's lock until every page is served.
        let userdata = self.userdata(name).await?;
        let rootfs_dir = self.compat.upper_dir(name).await?;
        let base = self.checkpoint_base(checkpoint_id, name);
        let engine_dir = base.join("engine");
        let criu_dir = base.join("criu");
        let _ = tokio::fs::remove_dir_all(&base).await;
        for d in [&engine_dir, &criu_dir] {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(|e| EngineError::io("create", d, e))?;
        }
        let log = userdata.join("dump.log");
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_dir_all(userdata.join("checkpoint"));
        let config = crate::postcopy::LazyDumpConfig::set()
            .map_err(|e| EngineError::io("write", crate::tcp::RUNC_CRIU_CONFIG, e))?;
        let socket = self.compat.socket.clone();
        let path = format!(
            "{LIBPOD}/containers/{name}/checkpoint?keep=true&fileLocks=true&tcpEstablished={tcp_established}"
        );
        let mut done = tokio::spawn(async move {
            let response = unix_http::request(&socket, "POST", &path, None).await?;
            match response.status {
                200..=299 => Ok(()),
                status => Err(format!(
                    "Podman answered {status}: {}",
                    String::from_utf8_lossy(&response.body).trim()
                )),
            }
        });
        let serving = crate::postcopy::wait_until_serving(&log, &mut done).await;
        let page_server = config.page_server;
        drop(config);
        serving.map_err(|message| EngineError::Api {
            engine: EngineKind::Podman,
            action: format!("checkpoint {name} lazily"),
            status: None,
            message,
        })?;
        // The non-memory images are written: copied (CRIU still runs in that directory).
        let images = userdata.join("checkpoint");
        copy_files(&images, &criu_dir)
            .map_err(|e| EngineError::io("copy the CRIU images from", &images, e))?;
        Ok(LazyCheckpoint {
            files: CheckpointFiles {
                criu_dir,
                rootfs_dir,
                engine_dir: Some(engine_dir),
            },
            page_server,
            done,
        })
    }

    async fn restore_in_place(
        &self,
        name: &str,
        checkpoint_id: &str,
        tcp_established: bool,
    ) -> Result<(), EngineError> {
        let base = self.checkpoint_base(checkpoint_id, name);
        let userdata = self.userdata(name).await?;
        put_files(&base.join("criu"), Some(&base.join("engine")), &userdata)?;
        let restored = self
            .post(
                name,
                &format!("{LIBPOD}/containers/{name}/restore?keep=true&fileLocks=true&tcpEstablished={tcp_established}"),
                format!("restore {name} in place"),
            )
            .await;
        // The checkpoint goes back with the others until remove_checkpoint.
        if let Err(e) = take_files(&userdata, &base.join("criu"), &base.join("engine")) {
            tracing::warn!(container = name, error = %e, "could not put the checkpoint back after the restore");
        }
        restored
    }

    async fn restore_imported(
        &self,
        spec: &NestedSpec,
        checkpoint_id: &str,
        staged: &CheckpointFiles,
        tcp: crate::tcp::TcpRestore,
    ) -> Result<(), EngineError> {
        if let Some(engine_dir) = &staged.engine_dir {
            if engine_dir.join("config.dump").exists() {
                return self
                    .restore_from_export(spec, checkpoint_id, staged, tcp)
                    .await;
            }
        }
        let name = &spec.name;
        if self.compat.inspect(name).await?.is_none() {
            self.compat.create(spec).await?;
        }
        let userdata = self.prepare_for_restore(name).await?;
        put_files(&staged.criu_dir, staged.engine_dir.as_deref(), &userdata)?;
        if let (Some(staged_rootfs), Some(upper)) =
            (&staged.rootfs_dir, self.compat.upper_dir(name).await?)
        {
            if staged_rootfs.exists() {
                merge_into(staged_rootfs, &upper)
                    .map_err(|e| EngineError::io("place root-fs changes in", &upper, e))?;
            }
        }
        // libpod's REST restore has `tcpEstablished` but no `tcpClose`: closing is prepared by
        // the caller (crate::tcp::ClosedRestore), through the CRIU configuration runc reads.
        let tcp_options = match tcp {
            crate::tcp::TcpRestore::None => "",
            crate::tcp::TcpRestore::Kept | crate::tcp::TcpRestore::Closed => "&tcpEstablished=true",
        };
        self.post(
            name,
            &format!("{LIBPOD}/containers/{name}/restore?fileLocks=true{tcp_options}"),
            format!("restore {name} from the migrated checkpoint"),
        )
        .await
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

/// Moves a checkpoint Podman left in `userdata` (CRIU's images, its own files) to `criu_dir`
/// and `engine_dir`: renames, on one file system.
fn take_files(userdata: &Path, criu_dir: &Path, engine_dir: &Path) -> Result<(), EngineError> {
    let images = userdata.join("checkpoint");
    move_into(&images, criu_dir)
        .map_err(|e| EngineError::io("move the CRIU images from", &images, e))?;
    std::fs::create_dir_all(engine_dir).map_err(|e| EngineError::io("create", engine_dir, e))?;
    for file in ENGINE_FILES {
        let from = userdata.join(file);
        if from.exists() {
            std::fs::rename(&from, engine_dir.join(file))
                .map_err(|e| EngineError::io("move", &from, e))?;
        }
    }
    Ok(())
}

/// Puts a checkpoint's files where Podman restores them from: the inverse of [`take_files`].
fn put_files(
    criu_dir: &Path,
    engine_dir: Option<&Path>,
    userdata: &Path,
) -> Result<(), EngineError> {
    let images = userdata.join("checkpoint");
    move_into(criu_dir, &images)
        .map_err(|e| EngineError::io("place the CRIU images in", &images, e))?;
    let Some(engine_dir) = engine_dir else {
        return Ok(());
    };
    for file in ENGINE_FILES {
        let from = engine_dir.join(file);
        if from.exists() {
            let to = userdata.join(file);
            std::fs::rename(&from, &to).map_err(|e| EngineError::io("place", &to, e))?;
        }
    }
    Ok(())
}

/// The freezer file of the cgroup at `cgroup` (its path in the hierarchy, as the engine reads it
/// from /proc) and whether it is cgroup v1's `freezer.state` (else v2's `cgroup.freeze`), from
/// this process's mount table: a hierarchy may be mounted at its root (the host's tree bound
/// in) or at this container's own cgroup (a privileged container of containerd on a cgroup v1
/// node), whose path is then taken off the front (pure).
pub fn freezer_file(mountinfo: &str, cgroup: &str) -> (PathBuf, bool) {
    let cgroup = cgroup.trim_start_matches('/');
    let mounts = mountinfo.lines().filter_map(|line| {
        let (fields, tail) = line.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        let tail: Vec<&str> = tail.split(' ').collect();
        Some((
            *fields.get(3)?,
            *fields.get(4)?,
            *tail.first()?,
            *tail.get(2)?,
        ))
    });
    // A later mount on the same place hides an earlier one (the host's tree bound over the
    // container's own): the last one found counts.
    let (mut v1, mut v2) = (None, None);
    for (root, mount_point, fs_type, options) in mounts {
        let within = |root: &str| {
            let root = root.trim_matches('/');
            let relative = if root.is_empty() {
                cgroup
            } else {
                cgroup
                    .strip_prefix(root)
                    .map(|r| r.trim_start_matches('/'))
                    .unwrap_or(cgroup)
            };
            Path::new(mount_point).join(relative)
        };
        if fs_type == "cgroup" && options.split(',').any(|o| o == "freezer") {
            v1 = Some(within(root).join("freezer.state"));
        }
        if fs_type == "cgroup2" {
            v2 = Some(within(root).join("cgroup.freeze"));
        }
    }
    match (v1, v2) {
        (Some(v1), _) => (v1, true),
        (None, v2) => (
            v2.unwrap_or_else(|| {
                Path::new("/sys/fs/cgroup")
                    .join(cgroup)
                    .join("cgroup.freeze")
            }),
            false,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_freezer_is_found_where_its_hierarchy_is_mounted() {
        let cgroup = "/k8s.io/abc/libpod_parent/libpod-1";
        // containerd's privileged container on a cgroup v1 node: its own cgroup is the root.
        let own = "346 340 0:34 /k8s.io/abc /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer\n\
                   349 340 0:37 /k8s.io/abc /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            freezer_file(own, cgroup),
            (
                PathBuf::from("/sys/fs/cgroup/freezer/libpod_parent/libpod-1/freezer.state"),
                true
            )
        );
        // The host's tree bound over the container's own (the Docker-run rig).
        let host = "30 29 0:26 /docker/x /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n\
                    60 59 0:26 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n";
        assert_eq!(
            freezer_file(host, cgroup).0,
            PathBuf::from("/sys/fs/cgroup/freezer/k8s.io/abc/libpod_parent/libpod-1/freezer.state")
        );
        // cgroup v2.
        let v2 = "40 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            freezer_file(v2, "/libpod_parent/libpod-1"),
            (
                PathBuf::from("/sys/fs/cgroup/libpod_parent/libpod-1/cgroup.freeze"),
                false
            )
        );
        assert_eq!(
            freezer_file("", "/x").0,
            PathBuf::from("/sys/fs/cgroup/x/cgroup.freeze")
        );
    }
}
