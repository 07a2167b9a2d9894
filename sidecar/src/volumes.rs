//! The pod's volumes in a migration: which travel (the pod-local kinds by default, or what the
//! migration names), and, at the destination, putting what arrived in place before any process
//! is restored.
//!
//! At the destination a volume arrives in `<volume>/.ums-incoming-<migration>` (the same file
//! system as the volume, so moving it in is a rename per top-level entry, never a copy). Once
//! every digest of the archive is verified, [`install`] empties the volume and moves the
//! arrived content in; until then the volume is untouched and a refused archive leaves it as
//! it was ([`discard`]).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ums_contract::annotations::travels_by_default;

use crate::podinfo::PodState;

/// Name prefix of the directory a volume's content arrives in.
pub const INCOMING_PREFIX: &str = ".ums-incoming-";

/// One volume of the pod, as the runtime container sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodVolume {
    pub name: String,
    /// Its mount point in the runtime container (`/mount/<name>`).
    pub path: PathBuf,
    /// Its source kind (`emptyDir`, `persistentVolumeClaim`, ...), `unknown` when the pod
    /// was wrapped without `migration-volume-kinds`.
    pub kind: String,
}

/// Which volumes a migration carries, besides the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeChoice {
    /// Volumes to carry although their kind does not travel by default.
    #[serde(default)]
    pub include: Vec<String>,
    /// Volumes to leave although their kind travels by default.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// A volume choice that cannot be followed, or a volume that cannot be put in place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// A named volume is not one of the pod's.
    #[error("volume {name:?} is not a volume of this pod (its volumes: {known:?})")]
    Unknown { name: String, known: Vec<String> },
    /// A volume is named both to include and to exclude.
    #[error("volume {name:?} is both included and excluded")]
    Contradiction { name: String },
    /// The destination pod lacks a volume the archive carries.
    #[error("the archive carries volume {name:?}, which this pod does not mount (its volumes: {known:?})")]
    Missing { name: String, known: Vec<String> },
    /// A file operation on a volume failed.
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_owned();
    move |source| VolumeError::Io {
        action,
        path,
        source,
    }
}

/// The pod's volumes, from `migration-volumes` and `migration-volume-kinds`.
pub fn pod_volumes(pod: &PodState) -> Vec<PodVolume> {
    let kinds = pod.annotations.volume_kinds.as_ref();
    pod.volumes()
        .iter()
        .filter_map(|path| {
            let path = PathBuf::from(path);
            let name = path.file_name()?.to_str()?.to_owned();
            let kind = kinds
                .and_then(|k| k.get(&name))
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned());
            Some(PodVolume { name, path, kind })
        })
        .collect()
}

/// The volumes that travel: the pod-local kinds, plus `include`, minus `exclude`.
pub fn select(volumes: &[PodVolume], choice: &VolumeChoice) -> Result<Vec<PodVolume>, VolumeError> {
    let known: Vec<String> = volumes.iter().map(|v| v.name.clone()).collect();
    for name in choice.include.iter().chain(&choice.exclude) {
        if !known.contains(name) {
            return Err(VolumeError::Unknown {
                name: name.clone(),
                known: known.clone(),
            });
        }
    }
    if let Some(name) = choice.include.iter().find(|n| choice.exclude.contains(n)) {
        return Err(VolumeError::Contradiction { name: name.clone() });
    }
    Ok(volumes
        .iter()
        .filter(|v| {
            (travels_by_default(&v.kind) || choice.include.contains(&v.name))
                && !choice.exclude.contains(&v.name)
        })
        .cloned()
        .collect())
}

/// Where, at the destination, each volume of the archive arrives: a fresh directory inside
/// the volume. Refuses a volume this pod does not mount.
pub fn prepare_incoming(
    here: &[PodVolume],
    names: &[String],
    migration_id: &str,
) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
    let known: Vec<String> = here.iter().map(|v| v.name.clone()).collect();
    let safe = crate::checkpoint::file_safe_id(migration_id);
    let mut incoming = BTreeMap::new();
    for name in names {
        let volume = here
            .iter()
            .find(|v| &v.name == name)
            .ok_or_else(|| VolumeError::Missing {
                name: name.clone(),
                known: known.clone(),
            })?;
        let dir = volume.path.join(format!("{INCOMING_PREFIX}{safe}"));
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io("remove stale", &dir))?;
        }
        fs::create_dir(&dir).map_err(io("create", &dir))?;
        incoming.insert(name.clone(), dir);
    }
    Ok(incoming)
}

/// Replaces the content of the volume that holds `incoming` with what arrived in it: every
/// other entry of the volume is removed, every arrived entry renamed into the volume, and the
/// volume's root takes the arrived root's mode and owner.
pub fn install(incoming: &Path) -> Result<(), VolumeError> {
    let volume = incoming
        .parent()
        .ok_or_else(|| VolumeError::Io {
            action: "find the volume of",
            path: incoming.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?
        .to_owned();
    let incoming_name = incoming.file_name().map(|n| n.to_owned());
    for entry in fs::read_dir(&volume).map_err(io("read", &volume))? {
        let entry = entry.map_err(io("read", &volume))?;
        if Some(entry.file_name()) == incoming_name {
            continue;
        }
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map(|t| t.is_dir())
            .map_err(io("stat", &path))?;
        if is_dir {
            fs::remove_dir_all(&path).map_err(io("remove", &path))?;
        } else {
            fs::remove_file(&path).map_err(io("remove", &path))?;
        }
    }
    for entry in fs::read_dir(incoming).map_err(io("read", incoming))? {
        let entry = entry.map_err(io("read", incoming))?;
        let to = volume.join(entry.file_name());
        fs::rename(entry.path(), &to).map_err(io("move into place", &to))?;
    }
    let root = fs::metadata(incoming).map_err(io("stat", incoming))?;
    fs::set_permissions(&volume, fs::Permissions::from_mode(root.mode() & 0o7777))
        .map_err(io("set the mode of", &volume))?;
    let _ = std::os::unix::fs::chown(&volume, Some(root.uid()), Some(root.gid()));
    fs::remove_dir(incoming).map_err(io("remove", incoming))?;
    Ok(())
}

/// Where each volume of an archive arrives, by volume name.
pub type IncomingDirs = BTreeMap<String, PathBuf>;

/// Installs every arrived volume; on the first failure, discards what is left.
pub fn install_all(incoming: &IncomingDirs) -> Result<(), VolumeError> {
    let mut result = Ok(());
    for dir in incoming.values() {
        if result.is_ok() {
            result = install(dir);
        }
        if result.is_err() {
            discard(dir);
        }
    }
    result
}

/// Removes what arrived for a volume that will not be installed.
pub fn discard(incoming: &Path) {
    if let Err(e) = fs::remove_dir_all(incoming) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %incoming.display(), error = %e, "failed to remove incoming volume content");
        }
    }
}

impl crate::nested::Sidecar {
    /// This pod's volumes.
    pub async fn pod_volumes(&self) -> Result<Vec<PodVolume>, crate::error::ApiError> {
        Ok(pod_volumes(&self.podinfo.read().await?))
    }

    /// The volumes a checkpoint or migration carries.
    pub async fn travelling_volumes(
        &self,
        choice: &VolumeChoice,
    ) -> Result<Vec<PodVolume>, crate::error::ApiError> {
        Ok(select(&self.pod_volumes().await?, choice)?)
    }
}

impl From<VolumeError> for crate::error::ApiError {
    fn from(e: crate::volumes::VolumeError) -> Self {
        let status = match &e {
            VolumeError::Unknown { .. } | VolumeError::Contradiction { .. } => {
                axum::http::StatusCode::BAD_REQUEST
            }
            VolumeError::Missing { .. } => axum::http::StatusCode::CONFLICT,
            _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        };
        crate::error::ApiError::new(status, crate::error::chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(name: &str, kind: &str) -> PodVolume {
        PodVolume {
            name: name.into(),
            path: PathBuf::from(format!("/mount/{name}")),
            kind: kind.into(),
        }
    }

    fn names(v: &[PodVolume]) -> Vec<&str> {
        v.iter().map(|v| v.name.as_str()).collect()
    }

    #[test]
    fn pod_local_volumes_travel_unless_the_migration_says_otherwise() {
        let all = [
            volume("data", "emptyDir"),
            volume("claim", "persistentVolumeClaim"),
            volume("config", "configMap"),
            volume("old", "unknown"),
        ];
        assert_eq!(
            names(&select(&all, &VolumeChoice::default()).unwrap()),
            ["data"]
        );
        let choice = VolumeChoice {
            include: vec!["claim".into(), "old".into()],
            exclude: vec!["data".into()],
        };
        assert_eq!(names(&select(&all, &choice).unwrap()), ["claim", "old"]);
        let unknown = VolumeChoice {
            include: vec!["nope".into()],
            ..Default::default()
        };
        let message = select(&all, &unknown).unwrap_err().to_string();
        assert!(
            message.contains("\"nope\"") && message.contains("claim"),
            "{message}"
        );
        let both = VolumeChoice {
            include: vec!["data".into()],
            exclude: vec!["data".into()],
        };
        assert!(matches!(
            select(&all, &both),
            Err(VolumeError::Contradiction { .. })
        ));
    }

    #[test]
    fn install_replaces_the_volume_content_and_discard_leaves_it() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("data");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("stale"), "old").unwrap();
        fs::create_dir(path.join("stale-dir")).unwrap();
        fs::write(path.join("stale-dir/x"), "old").unwrap();
        let here = [PodVolume {
            name: "data".into(),
            path: path.clone(),
            kind: "emptyDir".into(),
        }];

        let refused = prepare_incoming(&here, &["data".into()], "m1").unwrap();
        fs::write(refused["data"].join("new"), "new").unwrap();
        discard(&refused["data"]);
        let mut left: Vec<_> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["stale", "stale-dir"]);

        let incoming = prepare_incoming(&here, &["data".into()], "m2").unwrap();
        fs::create_dir(incoming["data"].join("dir")).unwrap();
        fs::write(incoming["data"].join("dir/file"), "content").unwrap();
        fs::write(incoming["data"].join("top"), "top").unwrap();
        fs::set_permissions(&incoming["data"], fs::Permissions::from_mode(0o750)).unwrap();
        install(&incoming["data"]).unwrap();
        let mut now: Vec<_> = fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        now.sort();
        assert_eq!(now, ["dir", "top"]);
        assert_eq!(
            fs::read_to_string(path.join("dir/file")).unwrap(),
            "content"
        );
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o750);

        let missing = prepare_incoming(&here, &["other".into()], "m3").unwrap_err();
        assert!(missing.to_string().contains("\"other\""), "{missing}");
    }
}
