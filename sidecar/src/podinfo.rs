//! The pod's annotations, read from the downward-API file on every use: the kubelet rewrites
//! the file when annotations change (`migration-start-mode` changes during a migration), and it
//! is small.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;
use ums_contract::{parse_podinfo, AnnotationError, MigrationAnnotations, PodinfoError, StartMode};

/// Failure to read the pod's annotations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PodinfoReadError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to parse {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: PodinfoError,
    },
    #[error("invalid pod annotations in {path}: {source}")]
    Annotations {
        path: PathBuf,
        #[source]
        source: AnnotationError,
    },
}

/// The pod's migration annotations, parsed.
#[derive(Debug, Clone, Default)]
pub struct PodState {
    pub annotations: MigrationAnnotations,
}

impl PodState {
    pub fn start_mode(&self) -> StartMode {
        self.annotations.start_mode_or_default()
    }
    pub fn containers(&self) -> &[Container] {
        self.annotations.containers.as_deref().unwrap_or(&[])
    }
    pub fn container(&self, name: &str) -> Option<&Container> {
        self.containers().iter().find(|c| c.name == name)
    }
    pub fn volumes(&self) -> &[String] {
        self.annotations.volumes.as_deref().unwrap_or(&[])
    }
}

/// Where the annotations file is.
#[derive(Debug, Clone)]
pub struct PodInfo {
    path: PathBuf,
}

impl PodInfo {
    pub fn new(path: &Path) -> Self {
        PodInfo {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pod's UID, from the downward-API `uid` file beside the annotations; `None` where
    /// there is none (a sidecar run by hand, outside a wrapped pod).
    pub async fn uid(&self) -> Option<String> {
        let file = self.path.parent()?.join("uid");
        let text = tokio::fs::read_to_string(file).await.ok()?;
        let uid = text.trim();
        (!uid.is_empty()).then(|| uid.to_owned())
    }

    /// Reads and parses the file now.
    pub async fn read(&self) -> Result<PodState, PodinfoReadError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|source| PodinfoReadError::Read {
                path: self.path.clone(),
                source,
            })?;
        let raw = parse_podinfo(&text).map_err(|source| PodinfoReadError::Format {
            path: self.path.clone(),
            source,
        })?;
        let annotations =
            MigrationAnnotations::parse(&raw).map_err(|source| PodinfoReadError::Annotations {
                path: self.path.clone(),
                source,
            })?;
        Ok(PodState { annotations })
    }
}
