//! Pod volumes on this machine, one directory each where the kubelet keeps them,
//! `<pod dir>/volumes/kubernetes.io~<kind>/<name>` (on a CRI node the pod dirs are the node's
//! `/var/lib/kubelet/pods`): emptyDir, hostPath, configMap and secret (their keys as files), and
//! downwardAPI (rewritten whenever the pod's labels or annotations change, as the kubelet does).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, DownwardAPIVolumeFile, Pod, Secret, Volume};
use kube::Api;

/// A volume the agent cannot provide.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0:?}: this node agent does not provide its kind (see README)")]
    Unsupported(String),
    #[error("volume {volume:?}: {message}")]
    Failed { volume: String, message: String },
}

/// The host directory of each of the pod's volumes.
pub async fn prepare(
    client: &kube::Client,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<HashMap<String, PathBuf>, VolumeError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut paths = HashMap::new();
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let failed = |message: String| VolumeError::Failed {
            volume: volume.name.clone(),
            message,
        };
        let dir = volume_dir(pod_dir, volume);
        if let Some(host) = &volume.host_path {
            paths.insert(volume.name.clone(), PathBuf::from(&host.path));
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(|e| failed(e.to_string()))?;
        if volume.empty_dir.is_some() {
            // Nothing to write.
        } else if let Some(source) = &volume.downward_api {
            write_downward_api(pod, &dir, source.items.as_deref().unwrap_or_default())
                .map_err(|e| failed(e.to_string()))?;
        } else if let Some(source) = &volume.config_map {
            let map = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
                .get(&source.name)
                .await
                .map_err(|e| failed(format!("configMap {}: {e}", source.name)))?;
            for (key, value) in map.data.unwrap_or_default() {
                write_atomically(&dir.join(key), value.as_bytes())
                    .map_err(|e| failed(e.to_string()))?;
            }
        } else if let Some(source) = &volume.secret {
            let name = source.secret_name.clone().unwrap_or_default();
            let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
                .get(&name)
                .await
                .map_err(|e| failed(format!("secret {name}: {e}")))?;
            for (key, value) in secret.data.unwrap_or_default() {
                write_atomically(&dir.join(key), &value.0).map_err(|e| failed(e.to_string()))?;
            }
        } else {
            return Err(VolumeError::Unsupported(volume.name.clone()));
        }
        paths.insert(volume.name.clone(), dir);
    }
    Ok(paths)
}

/// Where the kubelet keeps a volume of the pod: `volumes/kubernetes.io~<kind>/<name>`.
fn volume_dir(pod_dir: &Path, volume: &Volume) -> PathBuf {
    let kind = if volume.empty_dir.is_some() {
        "empty-dir"
    } else if volume.config_map.is_some() {
        "configmap"
    } else if volume.secret.is_some() {
        "secret"
    } else if volume.downward_api.is_some() {
        "downward-api"
    } else {
        "other"
    };
    pod_dir
        .join("volumes")
        .join(format!("kubernetes.io~{kind}"))
        .join(&volume.name)
}

/// Rewrites the pod's downward-API volumes (a no-op for files whose content is unchanged).
pub fn refresh_downward_api(pod: &Pod, pod_dir: &Path) -> std::io::Result<()> {
    for volume in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        if let Some(source) = &volume.downward_api {
            let dir = volume_dir(pod_dir, volume);
            write_downward_api(pod, &dir, source.items.as_deref().unwrap_or_default())?;
        }
    }
    Ok(())
}

fn write_downward_api(
    pod: &Pod,
    dir: &Path,
    items: &[DownwardAPIVolumeFile],
) -> std::io::Result<()> {
    for item in items {
        let Some(field) = &item.field_ref else {
            continue; // resourceFieldRef: not provided (README)
        };
        let meta = &pod.metadata;
        let content = match field.field_path.as_str() {
            "metadata.annotations" => {
                ums_contract::podinfo::format_podinfo(&sorted(meta.annotations.as_ref()))
            }
            "metadata.labels" => {
                ums_contract::podinfo::format_podinfo(&sorted(meta.labels.as_ref()))
            }
            "metadata.name" => meta.name.clone().unwrap_or_default(),
            "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            _ => continue,
        };
        let path = dir.join(&item.path);
        if std::fs::read(&path).ok().as_deref() != Some(content.as_bytes()) {
            write_atomically(&path, content.as_bytes())?;
        }
    }
    Ok(())
}

fn sorted(map: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    map.cloned().unwrap_or_default()
}

/// Writes through a temporary file and a rename: a reader never sees half a file.
fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("ums-tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}
