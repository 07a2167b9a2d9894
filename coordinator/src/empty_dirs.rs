//! The emptyDir volumes of an orchestrator-level migration. A kubelet checkpoint carries a
//! container's memory and its root filesystem's changes, not the pod's volumes; so, right after
//! the checkpoints, the node part archives the pod's emptyDirs beside them (`POST /volumes`),
//! sends that archive with them (`PUT /checkpoint-volumes/{migration}` here, the upload
//! credential), and the restored pod gets an init container, [`RESTORER`] (the node part's
//! image, `ums-node restore-volumes`), with each emptyDir mounted: the coordinator that creates
//! the pod hands it the archive over TLS pinned to the certificate it made (as a sidecar's),
//! with a token bound to the pod, before any restored container starts on those files.
//!
//! The archive is staged in this coordinator's data directory (`--data-dir`) from its arrival
//! until the pod is created; the source's coordinator stages it from its node part to restore
//! the pod at the source.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::body::Body;
use futures_util::TryStreamExt as _;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, ObjectFieldSelector, Pod, PodSpec,
    SecurityContext, VolumeMount,
};
use kube::Api;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;

use crate::error::ApiError;
use crate::state::Coordinator;

/// The init container that puts the emptyDirs back in a restored pod.
pub const RESTORER: &str = "ums-restore-volumes";
/// Its port on the pod network (`GET /tls` plain, `PUT /volumes` over TLS).
pub const RESTORER_PORT: u16 = 8890;
/// Where it mounts each emptyDir, by volume name.
const MOUNT_ROOT: &str = "/ums-volumes";
/// The environment variable that carries the creating coordinator's public key.
const KEYS_ENV: &str = "UMS_COORDINATOR_KEYS";

/// The names of the pod's emptyDir volumes (pure).
pub fn empty_dirs(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| v.empty_dir.is_some())
        .map(|v| v.name.clone())
        .collect()
}

/// Whether the pod carries the restorer (a pod restored with its emptyDirs).
pub fn has_restorer(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .any(|c| c.name == RESTORER)
}

/// Removes the restorer a restored pod carries (it moves on as its source spec was) (pure).
pub fn without_restorer(spec: &mut PodSpec) {
    if let Some(init) = spec.init_containers.as_mut() {
        init.retain(|c| c.name != RESTORER);
        if init.is_empty() {
            spec.init_containers = None;
        }
    }
}

/// Adds the restorer, running `image`, when the pod has emptyDirs (pure). Root with the
/// capabilities that set the files' owners and modes back, nothing else; the creating
/// coordinator fills in its public key ([`with_creator_key`]).
pub fn with_restorer(pod: &mut Pod, image: &str) {
    let volumes = empty_dirs(pod);
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    without_restorer(spec);
    if volumes.is_empty() {
        return;
    }
    let field = |path: &str| EnvVar {
        name: String::new(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let restorer = Container {
        name: RESTORER.to_owned(),
        image: Some(image.to_owned()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec!["restore-volumes".into()]),
        env: Some(vec![
            EnvVar {
                name: "UMS_POD_IP".into(),
                ..field("status.podIP")
            },
            EnvVar {
                name: "UMS_POD_UID".into(),
                ..field("metadata.uid")
            },
            EnvVar {
                name: KEYS_ENV.into(),
                value: Some(String::new()),
                ..Default::default()
            },
        ]),
        volume_mounts: Some(
            volumes
                .iter()
                .map(|v| VolumeMount {
                    name: v.clone(),
                    mount_path: format!("{MOUNT_ROOT}/{v}"),
                    ..Default::default()
                })
                .collect(),
        ),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["CHOWN".into(), "FOWNER".into(), "DAC_OVERRIDE".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .insert(0, restorer);
}

/// Sets the restorer's trusted key to the creating coordinator's (pure).
pub fn with_creator_key(pod: &mut Pod, public_key: &str) {
    for c in pod
        .spec
        .iter_mut()
        .flat_map(|s| s.init_containers.iter_mut().flatten())
        .filter(|c| c.name == RESTORER)
    {
        for env in c.env.iter_mut().flatten().filter(|e| e.name == KEYS_ENV) {
            env.value = Some(public_key.to_owned());
        }
    }
}

/// Where a migration's emptyDir archive is staged in `data_dir`.
pub fn staged_path(data_dir: &Path, migration_id: &str) -> PathBuf {
    data_dir.join(format!("volumes-{migration_id}.tar"))
}

impl Coordinator {
    /// Writes a migration's emptyDir archive into the data directory (through a temporary
    /// file: a half-written archive is never taken for one); its size.
    pub async fn stage_volumes(
        &self,
        migration_id: &str,
        body: impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin,
    ) -> Result<u64, ApiError> {
        crate::migrate::check_label("migrationId", migration_id)?;
        let path = staged_path(&self.data_dir, migration_id);
        let partial = path.with_extension("partial");
        let failed = |e: std::io::Error| {
            ApiError::internal(format!(
                "the emptyDir archive could not be written to {}: {e}",
                partial.display()
            ))
        };
        tokio::fs::create_dir_all(&self.data_dir)
            .await
            .map_err(failed)?;
        let mut file = tokio::fs::File::create(&partial).await.map_err(failed)?;
        let mut body = body;
        let mut bytes = 0u64;
        let written: Result<(), std::io::Error> = async {
            while let Some(chunk) = body.try_next().await? {
                bytes += chunk.len() as u64;
                file.write_all(&chunk).await?;
            }
            file.sync_all().await?;
            tokio::fs::rename(&partial, &path).await
        }
        .await;
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ApiError::bad_gateway(format!(
                "the emptyDir archive of migration {migration_id} did not arrive whole: {e}"
            )));
        }
        tracing::info!(migration = migration_id, bytes, "emptyDir archive staged");
        Ok(bytes)
    }

    /// `PUT /checkpoint-volumes/{migration}` (the upload credential): the source node part's
    /// emptyDir archive, staged until the pod is created.
    pub async fn receive_volumes(&self, migration_id: &str, body: Body) -> Result<Value, ApiError> {
        let stream = body.into_data_stream().map_err(std::io::Error::other);
        let bytes = self.stage_volumes(migration_id, stream).await?;
        Ok(json!({"migrationId": migration_id, "bytes": bytes}))
    }

    /// Removes a migration's staged archive (the pod was created, or will not be).
    pub async fn drop_staged_volumes(&self, migration_id: &str) {
        if crate::migrate::check_label("migrationId", migration_id).is_err() {
            return;
        }
        let _ = tokio::fs::remove_file(staged_path(&self.data_dir, migration_id)).await;
    }

    /// Hands the staged archive to the restorer of the pod just created: once it listens, its
    /// certificate is asked over this cluster's pod network and the archive sent over TLS
    /// pinned to it, with a token bound to the pod. What it unpacked.
    pub(crate) async fn deliver_volumes(
        &self,
        pods: &Api<Pod>,
        name: &str,
        migration_id: &str,
    ) -> Result<Value, ApiError> {
        let path = staged_path(&self.data_dir, migration_id);
        let until = Instant::now() + self.pod_ready_timeout;
        let mut last = String::from("not seen yet");
        let (ip, uid, pin) = loop {
            if Instant::now() > until {
                return Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the init container {RESTORER} of pod {name} did not take the emptyDir volumes within {} s ({last})",
                        self.pod_ready_timeout.as_secs()
                    ),
                ));
            }
            let pod = pods.get(name).await?;
            let status = pod.status.clone().unwrap_or_default();
            let restorer = status
                .init_container_statuses
                .iter()
                .flatten()
                .find(|c| c.name == RESTORER);
            let state = restorer.and_then(|c| c.state.clone()).unwrap_or_default();
            if let Some((reason, message)) = crate::destination::cannot_start(&state) {
                return Err(ApiError::bad_gateway(format!(
                    "the init container {RESTORER} cannot start: {reason}: {message}"
                )));
            }
            if let Some(t) = &state.terminated {
                return Err(ApiError::bad_gateway(format!(
                    "the init container {RESTORER} ended (exit code {}) before it took the volumes",
                    t.exit_code
                )));
            }
            let ip = status.pod_ip.clone().unwrap_or_default();
            if state.running.is_some() && !ip.is_empty() {
                match self
                    .certificate_pin(&ip, RESTORER_PORT, Duration::from_secs(5))
                    .await
                {
                    Ok(pin) => break (ip, pod.metadata.uid.clone(), pin),
                    Err(e) => last = e,
                }
            } else {
                last = format!("{RESTORER} not running yet");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let client = ums_tls::pinned_http_client(Some(&pin)).map_err(|e| match e {
            ums_tls::ClientError::Pin(e) => {
                ApiError::bad_gateway(format!("{RESTORER}'s certificate: {e}"))
            }
            e => ApiError::internal(e.to_string()),
        })?;
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            ApiError::conflict(format!(
                "the emptyDir archive of migration {migration_id} is not here ({}: {e})",
                path.display()
            ))
        })?;
        let bytes = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let token = self.sidecar_token(
            &ip,
            uid.as_deref(),
            ums_contract::credential::Scope::Coordinator,
            Some(migration_id),
            600,
        );
        let url = format!("https://{ip}:{RESTORER_PORT}/volumes");
        let started = Instant::now();
        let response = client
            .put(&url)
            .bearer_auth(token)
            .header("content-length", bytes)
            .body(reqwest::Body::wrap_stream(
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
            ))
            .send()
            .await
            .map_err(|e| {
                ApiError::bad_gateway(format!(
                    "sending the emptyDir volumes to {url}: {}",
                    crate::peer::error_chain(&e)
                ))
            })?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(ApiError::bad_gateway(format!(
                "the init container {RESTORER} refused the emptyDir volumes: {status}: {}",
                answer["error"].as_str().unwrap_or("no message")
            )));
        }
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            migration = migration_id,
            pod = name,
            bytes,
            ms,
            "emptyDir volumes restored into the pod"
        );
        Ok(json!({"bytes": bytes, "entries": answer["entries"], "restoreMs": ms}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_pod_with_empty_dirs_gets_the_restorer_once_and_loses_it_on_the_next_hop() {
        let mut p = pod(json!({
            "metadata": {"name": "s"},
            "spec": {"containers": [{"name": "main", "image": "x"}],
                     "volumes": [{"name": "data", "emptyDir": {}},
                                 {"name": "conf", "configMap": {"name": "c"}},
                                 {"name": "cache", "emptyDir": {"medium": "Memory"}}]}
        }));
        assert_eq!(empty_dirs(&p), ["data", "cache"]);
        with_restorer(&mut p, "ums-rs/node:1");
        with_restorer(&mut p, "ums-rs/node:1");
        let init = p.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 1, "once");
        let restorer = &init[0];
        assert_eq!(restorer.image.as_deref(), Some("ums-rs/node:1"));
        let mounts: Vec<(&str, &str)> = restorer
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("data", "/ums-volumes/data"),
                ("cache", "/ums-volumes/cache")
            ]
        );
        let security = restorer.security_context.as_ref().unwrap();
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_ne!(security.privileged, Some(true));
        with_creator_key(&mut p, "KEY");
        let env = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0].env;
        assert!(env
            .iter()
            .flatten()
            .any(|e| e.name == KEYS_ENV && e.value.as_deref() == Some("KEY")));
        assert!(has_restorer(&p));
        without_restorer(p.spec.as_mut().unwrap());
        assert!(!has_restorer(&p));
        assert!(p.spec.as_ref().unwrap().init_containers.is_none());
    }

    #[test]
    fn a_pod_without_empty_dirs_gets_no_restorer() {
        let mut p = pod(json!({
            "metadata": {"name": "s"},
            "spec": {"containers": [{"name": "main", "image": "x"}]}
        }));
        with_restorer(&mut p, "ums-rs/node:1");
        assert!(!has_restorer(&p));
    }
}
