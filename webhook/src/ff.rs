//! The service-level preparation for `migration-interface: ff` (UMS's "fast-freeze"): the
//! containers run as they are; each gets the pod's metadata at `/etc/podinfo` and
//! `SYS_PTRACE`, which CRIU needs to dump a process tree from inside the pod.
//!
//! Pure: a `Pod` in, a `Pod` out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Capabilities, Pod, SecurityContext, VolumeMount};
use ums_contract::annotations::encode_volumes;
use ums_contract::{
    StartMode, ANNOTATION_BYPASS, ANNOTATION_START_MODE, ANNOTATION_VOLUMES, PODINFO_DIR,
};

use crate::wrap::{free_name, podinfo_volume_source, PODINFO_VOLUME};

/// The capability CRIU needs to dump another process of the pod.
pub const PTRACE_CAPABILITY: &str = "SYS_PTRACE";

/// Prepares `pod` for service-level migration.
pub fn prepare_ff(pod: &Pod, start_mode: StartMode) -> Pod {
    let mut prepared = pod.clone();
    let spec = prepared.spec.get_or_insert_with(Default::default);
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    let taken: BTreeSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    let podinfo_volume = free_name(PODINFO_VOLUME, &taken);
    volumes.push(podinfo_volume_source(podinfo_volume.clone()));

    let mut mount_points = BTreeSet::new();
    for container in &mut spec.containers {
        let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
        mount_points.extend(mounts.iter().map(|m| m.mount_path.clone()));
        // A container that already mounts something at /etc/podinfo keeps its own.
        if !mounts.iter().any(|m| m.mount_path == PODINFO_DIR) {
            mounts.push(VolumeMount {
                name: podinfo_volume.clone(),
                mount_path: PODINFO_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        let security = container
            .security_context
            .get_or_insert_with(SecurityContext::default);
        let capabilities = security
            .capabilities
            .get_or_insert_with(Capabilities::default);
        let add = capabilities.add.get_or_insert_with(Vec::new);
        if !add
            .iter()
            .any(|c| c == PTRACE_CAPABILITY || c == "CAP_SYS_PTRACE")
        {
            add.push(PTRACE_CAPABILITY.to_owned());
        }
    }
    let mount_points: Vec<String> = mount_points.into_iter().collect();

    let annotations = prepared
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    annotations.insert(ANNOTATION_VOLUMES.into(), encode_volumes(&mount_points));
    annotations.insert(ANNOTATION_START_MODE.into(), start_mode.as_str().into());
    annotations.insert(ANNOTATION_BYPASS.into(), "true".into());
    prepared
}
