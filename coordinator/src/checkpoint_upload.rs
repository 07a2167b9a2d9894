//! The destination side of the orchestrator-level interface's transfer: each container's
//! checkpoint archive arrives as the body of `PUT /checkpoints/{migration}/{container}`
//! (sent from the source node, never through the source's coordinator) and is streamed into
//! this cluster's checkpoint registry as a checkpoint OCI image (ums-checkpoint-image), from
//! which this cluster's nodes restore the container. The sender presents an upload credential
//! this coordinator issued for that migration (`POST /checkpoint-uploads`, peers only): it
//! opens only that migration's uploads and nothing else, and gets it only once the preflight
//! (restore_preflight) found nothing that would make the restore fail here.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::Body;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::Coordinator;

/// Where this cluster keeps checkpoint images (`--checkpoint-registry`).
pub struct CheckpointRegistry {
    /// `host[:port]/repository`: where images are pushed.
    pub push_repository: String,
    /// The same repository as this cluster's nodes name it (`--checkpoint-registry-pull`).
    pub pull_repository: String,
    pub client: oci_client::Client,
    /// The CA of the registry's certificate (PEM), given to the node part when it pushes.
    pub ca_pem: Option<String>,
    /// Plain HTTP to the registry.
    pub insecure: bool,
}

impl std::fmt::Debug for CheckpointRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointRegistry")
            .field("push_repository", &self.push_repository)
            .field("pull_repository", &self.pull_repository)
            .finish_non_exhaustive()
    }
}

/// `POST /checkpoint-uploads`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadRequest {
    pub migration_id: String,
    /// The pod to be restored here, as the source has it (namespace, name, spec): what the
    /// preflight checks (restore_preflight).
    #[serde(default)]
    pub pod: Option<k8s_openapi::api::core::v1::Pod>,
    /// The kernel of the source's node (`nodeInfo.kernelVersion`).
    #[serde(default)]
    pub source_kernel: Option<String>,
}

/// The credential for one migration's uploads, and where they go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadAnswer {
    /// `PUT <destination>/checkpoints/<migration>/<container>` with this bearer token.
    pub upload_token: String,
    /// The repository the images go to, as this cluster's nodes pull them.
    pub repository: String,
    /// What the preflight checked, and what it could not verify.
    #[serde(default)]
    pub checks: Vec<String>,
}

/// One container's archive, now an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadedImage {
    pub container: String,
    /// `repository@sha256:...`, as this cluster's nodes pull it.
    pub image: String,
    pub archive_bytes: u64,
    pub upload_ms: u64,
}

/// The audience of upload credentials.
pub fn upload_audience(cluster: &str) -> String {
    format!("checkpoint-upload:{cluster}")
}

/// The image tag of one container's checkpoint: `<migration>-<container>`, in the tag
/// alphabet (`[A-Za-z0-9_.-]`, at most 128 characters).
pub fn image_tag(migration_id: &str, container: &str) -> String {
    let tag: String = format!("{migration_id}-{container}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    tag.trim_start_matches(['.', '-']).to_owned()
}

/// The pulled name of a pushed image: the push repository replaced by the pull repository.
pub fn pull_reference(registry: &CheckpointRegistry, digest: &str) -> String {
    format!("{}@{digest}", registry.pull_repository)
}

impl Coordinator {
    pub(crate) fn checkpoint_registry(&self) -> Result<&CheckpointRegistry, ApiError> {
        self.checkpoint_registry.as_ref().ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "cluster {} takes no orchestrator-level migrations: its coordinator has no checkpoint registry (--checkpoint-registry)",
                    self.cluster
                ),
            )
        })
    }

    /// `POST /checkpoint-uploads`: the preflight, then an upload credential for one migration.
    pub async fn upload_credential(
        &self,
        request: &UploadRequest,
    ) -> Result<UploadAnswer, ApiError> {
        let registry = self.checkpoint_registry()?;
        crate::migrate::check_label("migrationId", &request.migration_id)?;
        let checks = self.restore_preflight(request, registry).await?;
        let token = self.signing_key.sign(&ums_contract::credential::Claims {
            aud: upload_audience(&self.cluster),
            scope: ums_contract::credential::Scope::Migration,
            exp: ums_contract::credential::now_unix() + crate::destination::PEER_TOKEN_SECONDS,
            mid: Some(request.migration_id.clone()),
            uid: None,
        });
        Ok(UploadAnswer {
            upload_token: token,
            repository: registry.pull_repository.clone(),
            checks,
        })
    }

    /// `PUT /checkpoints/{migration}/{container}`: the archive streams into the registry.
    pub async fn receive_checkpoint(
        &self,
        migration_id: &str,
        container: &str,
        body: Body,
    ) -> Result<UploadedImage, ApiError> {
        let registry = self.checkpoint_registry()?;
        crate::migrate::check_label("container", container)?;
        let started = Instant::now();
        let target = format!(
            "{}:{}",
            registry.push_repository,
            image_tag(migration_id, container)
        );
        let pushed = ums_checkpoint_image::push(
            &registry.client,
            &target,
            container,
            body.into_data_stream(),
        )
        .await
        .map_err(|e| match e {
            ums_checkpoint_image::ImageError::Archive(_) => {
                ApiError::bad_request(format!("checkpoint of {container}: {e}"))
            }
            e => ApiError::bad_gateway(format!(
                "checkpoint of {container} could not be stored as an image: {e}"
            )),
        })?;
        let uploaded = UploadedImage {
            container: container.to_owned(),
            image: pull_reference(registry, &pushed.digest),
            archive_bytes: pushed.archive_bytes,
            upload_ms: started.elapsed().as_millis() as u64,
        };
        tracing::info!(migration = migration_id, %container, image = %uploaded.image,
            bytes = uploaded.archive_bytes, ms = uploaded.upload_ms, "checkpoint image stored");
        if let Ok(mut uploads) = self.uploads.lock() {
            uploads
                .entry(migration_id.to_owned())
                .or_default()
                .insert(container.to_owned(), uploaded.clone());
        }
        Ok(uploaded)
    }
}

/// The images of one migration's containers, by container.
pub type Uploads = BTreeMap<String, BTreeMap<String, UploadedImage>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_stay_in_the_tag_alphabet() {
        assert_eq!(image_tag("m-1", "main"), "m-1-main");
        assert_eq!(image_tag("a/b:c", "x"), "a_b_c-x");
        assert_eq!(image_tag(&"m".repeat(200), "x").len(), 128);
        assert_eq!(image_tag("-lead", "x"), "lead-x");
    }
}
