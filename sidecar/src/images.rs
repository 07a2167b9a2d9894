//! Images for a destination that cannot pull them: saved by the source engine before anything
//! is frozen, carried in the archive, loaded by the destination engine before it restores,
//! with the same image ID.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::archive::{image_path, ImageManifest, Manifest};
use crate::engine::ContainerInfo;
use crate::error::{chain, ApiError};
use crate::nested::Sidecar;

/// Which images a migration sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendImages {
    /// The images the destination's preflight reports missing.
    #[default]
    Auto,
    /// Every image of the migrated containers.
    Always,
    /// None: a destination without an image refuses the migration.
    Never,
}

/// Images saved for one migration, on disk until it ends.
#[derive(Debug, Clone, Default)]
pub struct SavedImages {
    pub dir: Option<PathBuf>,
    pub images: Vec<ImageManifest>,
    pub save_ms: u64,
}

impl SavedImages {
    /// Removes the saved files.
    pub async fn remove(&self) {
        if let Some(dir) = &self.dir {
            if let Err(e) = tokio::fs::remove_dir_all(dir).await {
                tracing::warn!(dir = %dir.display(), error = %e, "failed to remove saved images");
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.images.iter().map(|i| i.bytes).sum()
    }
}

/// The distinct images of `containers` that `wanted` names: (reference, ID at the source).
pub fn images_to_send(containers: &[ContainerInfo], wanted: &[String]) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    containers
        .iter()
        .filter(|c| wanted.contains(&c.image))
        .filter(|c| seen.insert(c.image.clone()))
        .map(|c| (c.image.clone(), c.image_id.clone()))
        .collect()
}

impl Sidecar {
    /// Saves `images` (reference, expected ID) under the engine root, checking that each
    /// reference still names the image the containers run.
    pub async fn save_images(
        &self,
        images: &[(String, String)],
        migration_id: &str,
    ) -> Result<SavedImages, ApiError> {
        if images.is_empty() {
            return Ok(SavedImages::default());
        }
        let started = std::time::Instant::now();
        let dir = self.engine_root.join("ums-images").join(migration_id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ApiError::internal(format!("failed to create {}: {e}", dir.display())))?;
        let mut saved = SavedImages {
            dir: Some(dir.clone()),
            ..Default::default()
        };
        for (index, (image, image_id)) in images.iter().enumerate() {
            let result = self.save_one(image, image_id, &dir, index).await;
            match result {
                Ok(manifest) => saved.images.push(manifest),
                Err(e) => {
                    saved.remove().await;
                    return Err(e);
                }
            }
        }
        saved.save_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            images = saved.images.len(),
            bytes = saved.bytes(),
            save_ms = saved.save_ms,
            "images saved for the destination"
        );
        Ok(saved)
    }

    async fn save_one(
        &self,
        image: &str,
        image_id: &str,
        dir: &Path,
        index: usize,
    ) -> Result<ImageManifest, ApiError> {
        match self.engine.image_id(image).await? {
            Some(id) if id == image_id => {}
            other => {
                return Err(ApiError::conflict(format!(
                    "image {image:?} now has ID {}, but the containers run {image_id}: it cannot be sent",
                    other.as_deref().unwrap_or("<none>")
                )))
            }
        }
        let file = dir.join(format!("{index}.tar"));
        let bytes = self.engine.save_image(image, &file).await?;
        Ok(ImageManifest {
            image: image.to_owned(),
            image_id: image_id.to_owned(),
            path: image_path(index),
            bytes,
        })
    }

    /// Loads the archive's images from `staging`, each checked to have its source ID.
    pub async fn load_images(&self, manifest: &Manifest, staging: &Path) -> Result<(), ApiError> {
        for image in &manifest.images {
            let file = staging.join(&image.path);
            self.engine.load_image(&file).await.map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "failed to load image {:?} from the archive: {}",
                        image.image,
                        chain(&e)
                    ),
                )
            })?;
            match self.engine.image_id(&image.image).await? {
                Some(id) if id == image.image_id => {
                    tracing::info!(image = %image.image, id = %id, "image loaded from the archive")
                }
                other => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!(
                            "image {:?} loaded from the archive has ID {}, the manifest says {}",
                            image.image,
                            other.as_deref().unwrap_or("<none>"),
                            image.image_id
                        ),
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, image: &str, id: &str) -> ContainerInfo {
        ContainerInfo {
            name: name.into(),
            id: "x".into(),
            state: "running".into(),
            exit_code: None,
            image: image.into(),
            image_id: id.into(),
        }
    }

    #[test]
    fn each_wanted_image_is_sent_once() {
        let containers = [
            container("a", "reg/app:1", "sha256:1"),
            container("b", "reg/app:1", "sha256:1"),
            container("c", "reg/db:2", "sha256:2"),
        ];
        assert_eq!(
            images_to_send(&containers, &["reg/app:1".into()]),
            [("reg/app:1".to_string(), "sha256:1".to_string())]
        );
        assert_eq!(images_to_send(&containers, &[]).len(), 0);
        let all: Vec<String> = containers.iter().map(|c| c.image.clone()).collect();
        assert_eq!(images_to_send(&containers, &all).len(), 2);
    }
}
