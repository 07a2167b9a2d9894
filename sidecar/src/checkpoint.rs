//! The source side: a consistent cut of the pod's nested containers (all frozen before any is
//! dumped), packed into an archive stream; and the way back to running if anything fails.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;

use crate::archive::pack::{plan, summaries, PackSource, PlannedEntry};
use crate::archive::{
    criu_prefix, engine_prefix, required_version, rootfs_prefix, volume_prefix, ContainerManifest,
    Manifest, MemoryPart, VolumeManifest, IMAGES_PREFIX,
};
use crate::engine::ContainerInfo;
use crate::error::{chain, ApiError};
use crate::images::SavedImages;
use crate::nested::{Phase, Sidecar};
use crate::tcp::{established_connections, ConnectionLock, TcpConnection};
use crate::volumes::PodVolume;

/// One container of a dump.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DumpedContainer {
    pub name: String,
    pub checkpoint_id: String,
    pub dump_ms: u64,
    pub criu_bytes: u64,
    pub rootfs_bytes: u64,
    pub engine_bytes: u64,
}

/// A finished dump, ready to be streamed.
#[derive(Debug, Clone)]
pub struct Dump {
    pub manifest: Manifest,
    pub plan: Vec<PlannedEntry>,
    pub containers: Vec<DumpedContainer>,
    /// When the first container was frozen.
    pub frozen_at: Instant,
    /// From the first freeze to the last dump written.
    pub freeze_dump_ms: u64,
    pub leave_running: bool,
    /// Post-copy: the memory is still at the source, served by CRIU.
    pub lazy: Option<LazySource>,
}

/// The source end of a post-copy dump: CRIU serving the pages, and the engine's checkpoint
/// call that ends with it.
#[derive(Debug, Clone)]
pub struct LazySource {
    pub page_server: std::net::SocketAddr,
    done: std::sync::Arc<tokio::sync::Mutex<Option<CheckpointCall>>>,
}

/// The engine's checkpoint call of a lazy dump.
type CheckpointCall = tokio::task::JoinHandle<Result<(), String>>;

impl LazySource {
    /// Waits for the engine's checkpoint call: every page served (the source processes are
    /// gone), or CRIU gave up (it thawed them).
    pub async fn finished(&self) -> Result<(), String> {
        let handle = self.done.lock().await.take();
        match handle {
            Some(h) => h.await.map_err(|e| e.to_string()).and_then(|r| r),
            None => Ok(()),
        }
    }

    /// The pages will not be fetched: a CRIU still waiting is killed (the processes stay
    /// frozen for the rollback to thaw) and the call's end awaited.
    pub async fn abandon(&self) -> String {
        let Some(mut call) = self.done.lock().await.take() else {
            return "lazy dump: CRIU finished".into();
        };
        // A reset page stream ends it by itself; one never connected waits: killed.
        let ended = match tokio::time::timeout(Duration::from_secs(10), &mut call).await {
            Ok(ended) => Ok(ended),
            Err(_) => {
                let killed = crate::postcopy::kill_criu();
                tracing::warn!(killed, "lazy dump abandoned: CRIU killed");
                tokio::time::timeout(Duration::from_secs(60), call).await
            }
        };
        match ended.map(|r| r.map_err(|e| e.to_string()).and_then(|r| r)) {
            Ok(Ok(())) => "lazy dump: CRIU finished".into(),
            Ok(Err(e)) => format!("lazy dump ended: {e}"),
            Err(_) => "lazy dump: the engine's checkpoint call did not end in 60 s".into(),
        }
    }
}

/// How far a container got, for the way back.
#[derive(Debug, Clone)]
struct Progress {
    info: ContainerInfo,
    paused: bool,
    checkpoint_id: Option<String>,
    /// Established TCP connections found before the freeze.
    connections: Vec<TcpConnection>,
}

/// A failed dump, with what was done to bring the containers back.
#[derive(Debug)]
pub struct DumpFailure {
    pub error: ApiError,
    pub rollback: Vec<String>,
}

/// A new checkpoint or migration id: `prefix` and the time in hex nanoseconds.
pub fn new_id(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}{nanos:x}")
}

/// A migration id as it may appear in a file name: letters, digits and '-', at most 64.
pub fn file_safe_id(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect()
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Drops the packets of `connections` until the lock goes (both ends of a connection between
/// two containers must be back before either sends); a failure is reported, not fatal.
fn hold_connections(
    connections: &[TcpConnection],
    report: &mut Vec<String>,
) -> Option<ConnectionLock> {
    match ConnectionLock::hold(connections) {
        Ok(lock) => lock,
        Err(e) => {
            report.push(format!(
                "connections between containers not locked (they may be reset): {e}"
            ));
            None
        }
    }
}

impl Sidecar {
    /// The containers a checkpoint covers: `names`, or every container of the pod.
    pub async fn select(&self, names: &[String]) -> Result<Vec<ContainerInfo>, ApiError> {
        let all = self.engine.list().await?;
        if names.is_empty() {
            if all.is_empty() {
                return Err(ApiError::conflict(
                    "there are no nested containers to checkpoint",
                ));
            }
            return Ok(all);
        }
        names
            .iter()
            .map(|n| {
                all.iter()
                    .find(|c| &c.name == n)
                    .cloned()
                    .ok_or_else(|| ApiError::not_found(format!("no nested container {n:?}")))
            })
            .collect()
    }

    /// The established TCP connections of each selected container; refused (before anything
    /// is frozen) when the engine cannot carry them.
    pub async fn tcp_survey(
        &self,
        selected: &[ContainerInfo],
    ) -> Result<Vec<Vec<TcpConnection>>, ApiError> {
        let mut all = Vec::new();
        for c in selected {
            let connections = match self.engine.pid(&c.name).await? {
                Some(pid) if c.is_running() => established_connections(pid),
                _ => Vec::new(),
            };
            if !connections.is_empty() && !self.engine.carries_tcp_connections() {
                return Err(ApiError::conflict(format!(
                    "container {:?} has {} established TCP connection(s) ({}); the {} engine cannot checkpoint them here (its API has no --tcp-established and {} does not set tcp-established): close them, or add that line as the dind image does",
                    c.name,
                    connections.len(),
                    connections.iter().map(|t| format!("{}->{}", t.local, t.remote)).collect::<Vec<_>>().join(", "),
                    self.engine.kind(),
                    crate::tcp::RUNC_CRIU_CONFIG
                )));
            }
            all.push(connections);
        }
        Ok(all)
    }

    /// Freezes every selected running container, then dumps each, and plans the volumes that
    /// travel while nothing runs. On failure the containers are brought back to running (from
    /// their checkpoint if one was made).
    pub async fn freeze_and_dump(
        &self,
        selected: Vec<ContainerInfo>,
        volumes: &[PodVolume],
        images: &SavedImages,
        migration_id: &str,
        leave_running: bool,
        post_copy: bool,
    ) -> Result<Dump, DumpFailure> {
        let pod = self.podinfo.read().await.map_err(|e| DumpFailure {
            error: e.into(),
            rollback: vec![],
        })?;
        let source = self.engine_info().await.map_err(|e| DumpFailure {
            error: e.into(),
            rollback: vec![],
        })?;
        let connections = self
            .tcp_survey(&selected)
            .await
            .map_err(|error| DumpFailure {
                error,
                rollback: vec![],
            })?;
        let mut progress: Vec<Progress> = selected
            .into_iter()
            .zip(connections)
            .map(|(info, connections)| Progress {
                info,
                paused: false,
                checkpoint_id: None,
                connections,
            })
            .collect();
        let frozen_at = Instant::now();
        for p in &progress {
            self.set_phase(&p.info.name, Some(Phase::Migrating));
        }
        let mut lazy = None;
        let result = self
            .dump_all(
                &mut progress,
                volumes,
                images,
                migration_id,
                leave_running,
                post_copy.then_some(&mut lazy),
                &pod,
                source,
                frozen_at,
            )
            .await;
        match result {
            Ok(dump) => Ok(dump),
            Err(error) => {
                let mut rollback = Vec::new();
                if let Some(lazy) = &lazy {
                    rollback.push(lazy.abandon().await);
                }
                rollback.extend(self.roll_back(&progress).await);
                Err(DumpFailure { error, rollback })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn dump_all(
        &self,
        progress: &mut [Progress],
        volumes: &[PodVolume],
        images: &SavedImages,
        migration_id: &str,
        leave_running: bool,
        mut lazy: Option<&mut Option<LazySource>>,
        pod: &crate::podinfo::PodState,
        source: crate::engine::EngineInfo,
        frozen_at: Instant,
    ) -> Result<Dump, ApiError> {
        // Freeze all first: no container runs on while another is already dumped.
        for p in progress.iter_mut() {
            if p.info.is_running() {
                self.engine.pause(&p.info.name).await?;
                p.paused = true;
            }
        }
        let mut containers = Vec::new();
        // Every entry, planned source by source (each walked once, right after its dump).
        let mut planned = Vec::new();
        let mut manifests = Vec::new();
        for p in progress.iter_mut() {
            let name = p.info.name.clone();
            let checkpoint_id = format!("ums-{migration_id}");
            let started = Instant::now();
            let files = match lazy.as_deref_mut() {
                Some(slot) => {
                    let made = self
                        .engine
                        .checkpoint_lazy(&name, &checkpoint_id, !p.connections.is_empty())
                        .await?;
                    *slot = Some(LazySource {
                        page_server: made.page_server,
                        done: std::sync::Arc::new(tokio::sync::Mutex::new(Some(made.done))),
                    });
                    made.files
                }
                None => {
                    self.engine
                        .checkpoint(
                            &name,
                            &checkpoint_id,
                            leave_running,
                            !p.connections.is_empty(),
                        )
                        .await?
                }
            };
            p.checkpoint_id = Some(checkpoint_id.clone());
            let dump_ms = ms(started.elapsed());
            let mut container_sources = vec![PackSource {
                prefix: criu_prefix(&name),
                dir: files.criu_dir.clone(),
            }];
            if let Some(rootfs) = &files.rootfs_dir {
                container_sources.push(PackSource {
                    prefix: rootfs_prefix(&name),
                    dir: rootfs.clone(),
                });
            }
            if let Some(engine) = &files.engine_dir {
                container_sources.push(PackSource {
                    prefix: engine_prefix(&name),
                    dir: engine.clone(),
                });
            }
            let container_plan = plan(&container_sources)?;
            let bytes_under = |prefix: &str| -> u64 {
                container_plan
                    .iter()
                    .filter(|e| e.archive_path.starts_with(prefix))
                    .map(|e| e.size)
                    .sum()
            };
            let criu_bytes = bytes_under(&criu_prefix(&name));
            let rootfs_bytes = bytes_under(&rootfs_prefix(&name));
            let engine_bytes = bytes_under(&engine_prefix(&name));
            let spec = pod.container(&name).cloned().ok_or_else(|| {
                ApiError::conflict(format!(
                    "nested container {name:?} is not in the pod's migration-containers"
                ))
            })?;
            manifests.push(ContainerManifest {
                name: name.clone(),
                spec,
                image: p.info.image.clone(),
                image_id: p.info.image_id.clone(),
                checkpoint_id: checkpoint_id.clone(),
                memory_parts: vec![if lazy.is_some() {
                    MemoryPart::Lazy
                } else {
                    MemoryPart::Full
                }],
                criu_bytes,
                rootfs_bytes,
                engine_bytes,
                was_running: p.info.is_running(),
                tcp_connections: p.connections.clone(),
            });
            containers.push(DumpedContainer {
                name,
                checkpoint_id,
                dump_ms,
                criu_bytes,
                rootfs_bytes,
                engine_bytes,
            });
            planned.extend(container_plan);
        }
        // The volumes, planned while every process of the pod is frozen or dumped: their
        // content is read straight from the volume while the archive streams.
        let mut volume_manifests = Vec::new();
        for v in volumes {
            let source = PackSource {
                prefix: volume_prefix(&v.name),
                dir: v.path.clone(),
            };
            let volume_plan = plan(std::slice::from_ref(&source))?;
            volume_manifests.push(VolumeManifest {
                name: v.name.clone(),
                kind: v.kind.clone(),
                bytes: volume_plan.iter().map(|e| e.size).sum(),
                entries: volume_plan.len() as u64,
            });
            planned.extend(volume_plan);
        }
        // The images saved before the freeze, for a destination that lacks them.
        if let Some(dir) = &images.dir {
            planned.extend(plan(&[PackSource {
                prefix: IMAGES_PREFIX.to_owned(),
                dir: dir.clone(),
            }])?);
        }
        let freeze_dump_ms = ms(frozen_at.elapsed());
        if leave_running {
            for p in progress.iter_mut() {
                if p.paused {
                    self.engine.unpause(&p.info.name).await?;
                    p.paused = false;
                }
                self.set_phase(&p.info.name, None);
            }
        }
        let plan = planned;
        let mut manifest = Manifest {
            format_version: 0,
            migration_id: migration_id.to_owned(),
            created_unix_ms: unix_ms(),
            source,
            containers: manifests,
            volumes: volume_manifests,
            images: images.images.clone(),
            entries: summaries(&plan),
        };
        manifest.format_version = required_version(&manifest);
        Ok(Dump {
            manifest,
            plan,
            containers,
            frozen_at,
            freeze_dump_ms,
            leave_running,
            lazy: lazy.and_then(|slot| slot.clone()),
        })
    }

    async fn roll_back(&self, progress: &[Progress]) -> Vec<String> {
        let mut report = Vec::new();
        // Connections between these containers: dropped until every end is back.
        let connections: Vec<TcpConnection> = progress
            .iter()
            .flat_map(|p| p.connections.iter().cloned())
            .collect();
        let _lock = hold_connections(&connections, &mut report);
        for p in progress {
            let name = &p.info.name;
            let now = self.engine.inspect(name).await.ok().flatten();
            let running_now = now
                .as_ref()
                .is_some_and(|i| i.is_running() || i.state == "paused");
            let outcome = match (&p.checkpoint_id, p.info.is_running(), running_now) {
                // Dumped and stopped: back from its checkpoint.
                (Some(cp), true, false) => self
                    .engine
                    .restore_in_place(name, cp, !p.connections.is_empty())
                    .await
                    .map(|_| format!("restored from checkpoint {cp}")),
                // Still there (not dumped yet, or dumped with leave-running): thaw it.
                (_, true, true)
                    if p.paused || now.as_ref().is_some_and(|i| i.state == "paused") =>
                {
                    self.engine
                        .unpause(name)
                        .await
                        .map(|_| "unfrozen".to_owned())
                }
                (_, _, true) => Ok("still running".to_owned()),
                _ => Ok(format!(
                    "left {}",
                    now.as_ref().map(|i| i.state.as_str()).unwrap_or("absent")
                )),
            };
            self.set_phase(name, None);
            let line = match outcome {
                Ok(what) => format!("{name}: {what}"),
                Err(e) => format!("{name}: FAILED to bring back: {}", chain(&e)),
            };
            tracing::warn!(container = %name, outcome = %line, "rollback");
            report.push(line);
        }
        report
    }

    /// Brings the containers of a dump back to running (the destination failed).
    pub async fn roll_back_dump(&self, dump: &Dump) -> Vec<String> {
        let mut progress = Vec::new();
        for c in &dump.manifest.containers {
            if let Ok(Some(info)) = self.engine.inspect(&c.name).await {
                progress.push(Progress {
                    info: ContainerInfo {
                        // It ran before the dump: that is what decides the way back.
                        state: if c.was_running {
                            "running".into()
                        } else {
                            info.state.clone()
                        },
                        ..info
                    },
                    paused: !dump.leave_running,
                    checkpoint_id: Some(c.checkpoint_id.clone()),
                    connections: c.tcp_connections.clone(),
                });
            }
        }
        self.roll_back(&progress).await
    }

    /// At start: the containers of a dump whose migration did not end (the runtime container
    /// died after it) come back from their checkpoints; what was done, a line each.
    pub async fn resume_pending_dump(&self) -> Vec<String> {
        let Some(record) = crate::pending::read(&self.engine_root) else {
            return Vec::new();
        };
        let _busy = self.busy.lock().await;
        let mut report = Vec::new();
        // As the rollback does: connections between these containers are dropped until
        // every end is back.
        let connections: Vec<TcpConnection> = record
            .containers
            .iter()
            .flat_map(|c| c.connections.iter().cloned())
            .collect();
        let _lock = hold_connections(&connections, &mut report);
        for c in &record.containers {
            let name = &c.name;
            let line = match self.engine.inspect(name).await {
                Ok(Some(info)) if !(info.is_running() || info.state == "paused") => match self
                    .engine
                    .restore_in_place(name, &c.checkpoint_id, c.tcp_established)
                    .await
                {
                    Ok(()) => {
                        tracing::warn!(container = %name, checkpoint = %c.checkpoint_id, migration = %record.migration_id, "resumed from the dump a migration left: restored from its checkpoint");
                        if let Ok(mut resumed) = self.resumed_from.lock() {
                            *resumed = Some(record.migration_id.clone());
                        }
                        if let Err(e) = self.engine.remove_checkpoint(name, &c.checkpoint_id).await {
                            tracing::warn!(container = %name, error = %chain(&e), "could not remove the checkpoint after resuming from it");
                        }
                        format!(
                            "{name}: restored from checkpoint {} of migration {}",
                            c.checkpoint_id, record.migration_id
                        )
                    }
                    Err(e) => format!(
                        "{name}: FAILED to restore from checkpoint {} of migration {} (it starts afresh when its ambassador asks): {}",
                        c.checkpoint_id,
                        record.migration_id,
                        chain(&e)
                    ),
                },
                Ok(Some(info)) => format!("{name}: already {}", info.state),
                Ok(None) => format!("{name}: absent"),
                Err(e) => format!("{name}: not inspected: {}", chain(&e)),
            };
            report.push(line);
        }
        crate::pending::clear(&self.engine_root);
        report
    }

    /// After a successful migration: the source containers and their checkpoints go.
    pub async fn finish_migrated(&self, dump: &Dump) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &dump.manifest.containers {
            if let Err(e) = self.engine.remove(&c.name).await {
                problems.push(format!("{}: {}", c.name, chain(&e)));
            }
            self.set_phase(&c.name, Some(Phase::Migrated));
        }
        problems
    }
}

/// Streams the archive of a dump: a blocking task writes the tar (optionally zstd) into a
/// pipe whose other end is the returned stream; nothing is staged on disk.
pub fn archive_stream(
    dump: &Dump,
    zstd_level: Option<i32>,
) -> (
    impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    tokio::task::JoinHandle<Result<u64, String>>,
) {
    crate::archive::transfer::stream(dump.manifest.clone(), dump.plan.clone(), zstd_level)
}
