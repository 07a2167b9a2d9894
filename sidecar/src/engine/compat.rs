//! The Docker-compatible API, through bollard on the engine's unix socket: Docker itself,
//! and Podman's compat endpoints. Everything but checkpoint and restore goes through here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ImportImageOptions, InspectContainerOptions,
    ListContainersOptions, LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt as _;

use super::{
    ContainerInfo, EngineError, EngineKind, LogChunk, LogResume, LogStream, LogStreamKind,
};
use crate::spec::{NestedSpec, PullPolicy};

/// Label on every nested container this sidecar creates.
pub const MANAGED_LABEL: &str = "io.ums-rs.container";

/// A Docker-compatible API client for one engine.
#[derive(Debug, Clone)]
pub struct Compat {
    pub kind: EngineKind,
    pub docker: Docker,
    pub socket: PathBuf,
    pub api_version: String,
}

impl Compat {
    /// Connects to the engine at `socket` and negotiates the API version.
    pub async fn connect(kind: EngineKind, socket: &Path) -> Result<Self, EngineError> {
        let unreachable = |message: String| EngineError::Unreachable {
            engine: kind,
            socket: socket.display().to_string(),
            message,
        };
        let socket_str = socket
            .to_str()
            .ok_or_else(|| unreachable("socket path is not UTF-8".into()))?;
        let docker = Docker::connect_with_socket(socket_str, 600, bollard::API_DEFAULT_VERSION)
            .map_err(|e| unreachable(e.to_string()))?
            .negotiate_version()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        docker
            .ping()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let api_version = docker.client_version().to_string();
        Ok(Compat {
            kind,
            docker,
            socket: socket.to_owned(),
            api_version,
        })
    }

    pub fn api_error(&self, action: impl Into<String>, error: BollardError) -> EngineError {
        let status = match &error {
            BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
            _ => None,
        };
        let message = match &error {
            BollardError::DockerResponseServerError { message, .. } => message.clone(),
            other => other.to_string(),
        };
        EngineError::Api {
            engine: self.kind,
            action: action.into(),
            status,
            message,
        }
    }

    fn not_found_or(&self, name: &str, action: &str, error: BollardError) -> EngineError {
        match error {
            BollardError::DockerResponseServerError {
                status_code: 404, ..
            } => EngineError::NotFound {
                name: name.to_owned(),
            },
            other => self.api_error(format!("{action} {name}"), other),
        }
    }

    pub async fn container_id(&self, name: &str) -> Result<String, EngineError> {
        self.inspect(name)
            .await?
            .map(|c| c.id)
            .ok_or_else(|| EngineError::NotFound {
                name: name.to_owned(),
            })
    }

    /// The container's writable layer (overlay upper directory), if the engine reports it.
    pub async fn upper_dir(&self, name: &str) -> Result<Option<PathBuf>, EngineError> {
        let inspect = self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.not_found_or(name, "inspect", e))?;
        Ok(inspect
            .graph_driver
            .and_then(|g| g.data.get("UpperDir").cloned())
            .map(PathBuf::from))
    }

    /// The PID of the container's first process, while it runs.
    pub async fn pid(&self, name: &str) -> Result<Option<u32>, EngineError> {
        let inspect = self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.not_found_or(name, "inspect", e))?;
        Ok(inspect
            .state
            .and_then(|s| s.pid)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0))
    }

    /// The engine's version string and kernel.
    pub async fn version(&self) -> Result<(String, String), EngineError> {
        let version = self
            .docker
            .version()
            .await
            .map_err(|e| self.api_error("read the engine version", e))?;
        Ok((
            version.version.unwrap_or_default(),
            version.kernel_version.unwrap_or_default(),
        ))
    }

    pub async fn list(&self) -> Result<Vec<ContainerInfo>, EngineError> {
        let filters = HashMap::from([("label".to_string(), vec![MANAGED_LABEL.to_string()])]);
        let summaries = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| self.api_error("list containers", e))?;
        let mut containers = Vec::new();
        for summary in summaries {
            if let Some(id) = summary.id {
                if let Some(info) = self.inspect(&id).await? {
                    containers.push(info);
                }
            }
        }
        containers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(containers)
    }

    pub async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, EngineError> {
        match self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(inspect) => Ok(to_info(inspect)),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.api_error(format!("inspect {name}"), e)),
        }
    }

    pub async fn image_id(&self, image: &str) -> Result<Option<String>, EngineError> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => Ok(inspect.id),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.api_error(format!("inspect image {image}"), e)),
        }
    }

    /// Writes `image` (by reference, so its tags come along) as a `docker save` tar into `to`;
    /// returns the bytes written.
    pub async fn save_image(&self, image: &str, to: &Path) -> Result<u64, EngineError> {
        use tokio::io::AsyncWriteExt as _;
        let mut file = tokio::fs::File::create(to)
            .await
            .map_err(|e| EngineError::io("create", to, e))?;
        let mut stream = self.docker.export_image(image);
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.api_error(format!("save image {image}"), e))?;
            file.write_all(&chunk)
                .await
                .map_err(|e| EngineError::io("write", to, e))?;
            written += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(|e| EngineError::io("write", to, e))?;
        Ok(written)
    }

    /// Loads a `docker save` tar (the image keeps its ID and tags).
    pub async fn load_image(&self, from: &Path) -> Result<(), EngineError> {
        let file = tokio::fs::File::open(from)
            .await
            .map_err(|e| EngineError::io("open", from, e))?;
        let body = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        let mut progress = self.docker.import_image_stream(
            ImportImageOptions {
                quiet: true,
                ..Default::default()
            },
            body,
            None,
        );
        let action = format!("load image from {}", from.display());
        while let Some(item) = progress.next().await {
            let info = item.map_err(|e| self.api_error(action.clone(), e))?;
            if let Some(message) = info.error_detail.and_then(|d| d.message) {
                return Err(EngineError::Api {
                    engine: self.kind,
                    action,
                    status: None,
                    message,
                });
            }
        }
        Ok(())
    }

    /// Pulls `spec`'s image as its pull policy says, as the kubelet would for the original
    /// container: the nested engine gets the image from the pod's registry.
    pub async fn ensure_image(&self, spec: &NestedSpec) -> Result<(), EngineError> {
        let present = self.image_id(&spec.image).await?.is_some();
        let pull = match spec.pull_policy {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => !present,
            PullPolicy::Never => false,
        };
        if !pull {
            return if present {
                Ok(())
            } else {
                Err(EngineError::ImageMissing {
                    engine: self.kind,
                    image: spec.image.clone(),
                })
            };
        }
        let reference = spec.pull_reference();
        tracing::info!(image = %reference, policy = ?spec.pull_policy, "pulling image");
        let failed = |message: String| EngineError::PullFailed {
            engine: self.kind,
            image: reference.clone(),
            message,
        };
        let mut progress = self.docker.create_image(
            Some(CreateImageOptions {
                from_image: Some(reference.clone()),
                ..Default::default()
            }),
            None,
            None,
        );
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                        return Err(failed(detail));
                    }
                }
                Err(BollardError::DockerResponseServerError { message, .. }) => {
                    return Err(failed(message))
                }
                Err(BollardError::DockerStreamError { error }) => return Err(failed(error)),
                Err(other) => return Err(failed(other.to_string())),
            }
        }
        if self.image_id(&spec.image).await?.is_none() {
            return Err(failed(
                "the pull finished but the image is not there".into(),
            ));
        }
        Ok(())
    }

    pub async fn create(&self, spec: &NestedSpec) -> Result<ContainerInfo, EngineError> {
        self.ensure_image(spec).await?;
        let host_config = HostConfig {
            // The nested container lives in the runtime container's network namespace: the
            // pod's IP and ports.
            network_mode: Some("host".into()),
            binds: (!spec.binds.is_empty()).then(|| spec.binds.clone()),
            memory: spec.memory_limit_bytes,
            memory_reservation: spec.memory_reservation_bytes,
            nano_cpus: spec.nano_cpus,
            cpu_shares: spec.cpu_shares,
            cap_add: (!spec.cap_add.is_empty()).then(|| spec.cap_add.clone()),
            cap_drop: (!spec.cap_drop.is_empty()).then(|| spec.cap_drop.clone()),
            privileged: Some(spec.privileged),
            readonly_rootfs: Some(spec.read_only_rootfs),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: spec.entrypoint.clone(),
            cmd: spec.cmd.clone(),
            env: Some(spec.env.clone()),
            working_dir: spec.working_dir.clone(),
            user: spec.user.clone(),
            tty: Some(spec.tty),
            open_stdin: Some(spec.open_stdin),
            labels: Some(HashMap::from([(
                MANAGED_LABEL.to_string(),
                spec.name.clone(),
            )])),
            host_config: Some(host_config),
            ..Default::default()
        };
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(spec.name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| self.api_error(format!("create container {}", spec.name), e))?;
        self.inspect(&spec.name)
            .await?
            .ok_or_else(|| EngineError::NotFound {
                name: spec.name.clone(),
            })
    }

    pub async fn start(&self, name: &str) -> Result<(), EngineError> {
        self.docker
            .start_container(
                name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| self.not_found_or(name, "start", e))
    }

    pub async fn stop(&self, name: &str, timeout_seconds: i32) -> Result<(), EngineError> {
        match self
            .docker
            .stop_container(
                name,
                Some(StopContainerOptions {
                    t: Some(timeout_seconds),
                    signal: None,
                }),
            )
            .await
        {
            // 304: already stopped.
            Ok(())
            | Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(self.not_found_or(name, "stop", e)),
        }
    }

    pub async fn remove(&self, name: &str) -> Result<(), EngineError> {
        match self
            .docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(())
            | Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(self.api_error(format!("remove {name}"), e)),
        }
    }

    pub async fn pause(&self, name: &str) -> Result<(), EngineError> {
        self.docker
            .pause_container(name)
            .await
            .map_err(|e| self.not_found_or(name, "pause", e))
    }

    pub async fn unpause(&self, name: &str) -> Result<(), EngineError> {
        self.docker
            .unpause_container(name)
            .await
            .map_err(|e| self.not_found_or(name, "unpause", e))
    }

    pub async fn logs(
        &self,
        name: &str,
        follow: bool,
        resume: LogResume,
    ) -> Result<LogStream, EngineError> {
        // Fail early (404) instead of inside the stream.
        self.container_id(name).await?;
        let engine = self.clone();
        let owned_name = name.to_owned();
        let mut last: Option<LogChunk> = None;
        // The engines filter by whole seconds; the exact cut is made here on each line's
        // timestamp and stream, so a reader that resumes never sees a line twice.
        let since_seconds = resume.since_seconds();
        let stream = self
            .docker
            .logs(
                name,
                Some(LogsOptions {
                    follow,
                    stdout: true,
                    stderr: true,
                    since: since_seconds,
                    timestamps: true,
                    tail: "all".into(),
                    ..Default::default()
                }),
            )
            .filter_map(move |item| {
                let (stream, message) = match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        (LogStreamKind::Stdout, message)
                    }
                    Ok(LogOutput::StdErr { message }) => (LogStreamKind::Stderr, message),
                    Ok(LogOutput::StdIn { .. }) => return std::future::ready(None),
                    Err(e) => {
                        return std::future::ready(Some(Err(
                            engine.api_error(format!("read logs of {owned_name}"), e)
                        )))
                    }
                };
                let (time_nanos, data) = split_timestamp(&message);
                if !resume.admits(stream, time_nanos) {
                    return std::future::ready(None);
                }
                let chunk = LogChunk {
                    stream,
                    time_nanos,
                    data,
                };
                // Docker's json-file follow can hand the line written as the container exits
                // out twice (read from the file, then again from its watcher): the same
                // stream, nanosecond time and bytes twice in a row is one line.
                if time_nanos.is_some() && last.as_ref() == Some(&chunk) {
                    return std::future::ready(None);
                }
                last = Some(chunk.clone());
                std::future::ready(Some(Ok(chunk)))
            });
        Ok(Box::pin(stream))
    }
}

/// Splits `2026-11-22T00:00:46.719389123Z rest` into the time (UNIX nanoseconds) and `rest`.
fn split_timestamp(message: &Bytes) -> (Option<i128>, Bytes) {
    let Some(space) = message.iter().position(|b| *b == b' ') else {
        return (None, message.clone());
    };
    match std::str::from_utf8(&message[..space])
        .ok()
        .and_then(parse_rfc3339_nanos)
    {
        Some(t) => (Some(t), message.slice(space + 1..)),
        None => (None, message.clone()),
    }
}

/// RFC 3339 (`Z` or `+hh:mm` offsets, up to nanosecond fractions) to UNIX nanoseconds.
pub fn parse_rfc3339_nanos(text: &str) -> Option<i128> {
    let (date, rest) = text.split_once('T')?;
    let mut date_parts = date.split('-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: i64 = date_parts.next()?.parse().ok()?;
    let day: i64 = date_parts.next()?.parse().ok()?;
    let (clock, offset_seconds) = if let Some(clock) = rest.strip_suffix('Z') {
        (clock, 0i64)
    } else {
        let at = rest.rfind(['+', '-'])?;
        let (clock, offset) = rest.split_at(at);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let (h, m) = offset[1..].split_once(':')?;
        (
            clock,
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut hms_parts = hms.split(':');
    let hour: i64 = hms_parts.next()?.parse().ok()?;
    let minute: i64 = hms_parts.next()?.parse().ok()?;
    let second: i64 = hms_parts.next()?.parse().ok()?;
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().ok()?
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(i128::from(seconds) * 1_000_000_000 + i128::from(nanos))
}

/// The container state the way the trait reports it.
pub fn to_info(inspect: bollard::models::ContainerInspectResponse) -> Option<ContainerInfo> {
    let state = inspect.state.unwrap_or_default();
    let status = state
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "unknown".into());
    Some(ContainerInfo {
        name: inspect.name?.trim_start_matches('/').to_owned(),
        id: inspect.id?,
        // Docker says "exited"; Podman's compat API may say "stopped" or "configured".
        exit_code: if matches!(
            status.as_str(),
            "running" | "paused" | "created" | "restarting"
        ) {
            None
        } else {
            state.exit_code
        },
        state: status,
        image: inspect.config.and_then(|c| c.image).unwrap_or_default(),
        image_id: inspect.image.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_engine_timestamps() {
        assert_eq!(parse_rfc3339_nanos("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_nanos("1970-01-01T00:00:01.5Z"),
            Some(1_500_000_000)
        );
        assert_eq!(
            parse_rfc3339_nanos("2026-11-22T00:00:46.719389123Z"),
            Some(1_795_305_646_719_389_123)
        );
        assert_eq!(
            parse_rfc3339_nanos("2026-11-22T01:00:46.719389123+01:00"),
            parse_rfc3339_nanos("2026-11-22T00:00:46.719389123Z")
        );
        assert_eq!(parse_rfc3339_nanos("yesterday"), None);
        let (t, rest) = split_timestamp(&Bytes::from_static(b"2026-11-22T00:00:46Z tick=1\n"));
        assert_eq!(
            (t, rest.as_ref()),
            (Some(1_795_305_646_000_000_000), &b"tick=1\n"[..])
        );
    }
}
