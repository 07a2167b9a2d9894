//! The service-level preparation for `migration-interface: ff` (UMS's "fast-freeze"): the
//! service's container runs as it is, on an image built FROM UMS-rs's ff base, whose entrypoint
//! `ums-ff` supervises the service and migrates it with CRIU from inside the container. The
//! webhook gives that container what CRIU needs and nothing more (measured: shared/ENGINES.md):
//! capabilities CHECKPOINT_RESTORE, SETPCAP and SYS_PTRACE (Yama), seccomp `Unconfined` (no
//! profile lets a tracer suspend the target's filter), `allowPrivilegeEscalation: false`, never
//! `privileged`; the pod's metadata at `/etc/podinfo`; and `ums-ff`'s settings: the cluster
//! coordinator's keys, the container's name and its pod-local volumes. A container with its own
//! `command` replaces the image's entrypoint: `ums-ff run --` is put in front of it. Its probes
//! go to `ums-ff` (`/probe/{name}?kind=...`, periods and thresholds kept), which runs the
//! original ones while the service runs and keeps a waiting or frozen service ready and alive.
//!
//! Like a wrapped pod it records the user's containers (`migration-containers`) and volumes
//! (`migration-volume-kinds`), from which the coordinator makes the destination's pod, which
//! the destination's webhook prepares again with its own coordinator's keys.
//!
//! Pure: a `Pod` in, a `Pod` out.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, EnvVar, HTTPGetAction, Pod, Probe, SeccompProfile, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use ums_contract::annotations::{
    encode_containers, encode_volume_kinds, encode_volumes, volume_kind,
};
use ums_contract::{
    StartMode, ANNOTATION_BYPASS, ANNOTATION_CONTAINERS, ANNOTATION_START_MODE, ANNOTATION_VOLUMES,
    ANNOTATION_VOLUME_KINDS, PODINFO_DIR,
};

use crate::config::WrapConfig;
use crate::wrap::{free_name, podinfo_volume_source, PODINFO_VOLUME};

/// The capabilities CRIU needs to dump and restore the service from inside its container:
/// CHECKPOINT_RESTORE (`--unprivileged`), SETPCAP (the restorer drops capabilities), SYS_PTRACE
/// (nodes whose Yama ptrace_scope is 1).
pub const FF_CAPABILITIES: [&str; 3] = ["CHECKPOINT_RESTORE", "SETPCAP", "SYS_PTRACE"];

/// Where the ff base image has its supervisor.
pub const UMS_FF: &str = "/usr/local/bin/ums-ff";

/// Why a pod cannot be prepared for service-level migration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FfError {
    #[error("migration-interface ff migrates a pod of one container, built FROM UMS-rs's ff base image (label io.ums-rs.ff-base); this pod has {0}: use dind or pind for several containers")]
    NotOneContainer(usize),
    #[error("container {0:?} is privileged: migration-interface ff needs no privilege (CHECKPOINT_RESTORE and an unconfined seccomp profile) and refuses to run one")]
    Privileged(String),
}

/// Prepares `pod` for service-level migration.
pub fn prepare_ff(pod: &Pod, start_mode: StartMode, config: &WrapConfig) -> Result<Pod, FfError> {
    let mut prepared = pod.clone();
    let spec = prepared.spec.get_or_insert_with(Default::default);
    if spec.containers.len() != 1 {
        return Err(FfError::NotOneContainer(spec.containers.len()));
    }
    let originals = spec.containers.clone();
    let user_volumes = spec.volumes.clone().unwrap_or_default();
    let volume_kinds: BTreeMap<String, String> = user_volumes
        .iter()
        .map(|v| (v.name.clone(), volume_kind(v)))
        .collect();
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    let taken: BTreeSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    let podinfo_volume = free_name(PODINFO_VOLUME, &taken);
    volumes.push(podinfo_volume_source(podinfo_volume.clone()));

    let container = &mut spec.containers[0];
    if container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        == Some(true)
    {
        return Err(FfError::Privileged(container.name.clone()));
    }
    let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
    let mount_points: Vec<String> = mounts.iter().map(|m| m.mount_path.clone()).collect();
    // The pod-local volumes travel with the service (`name=/path`).
    let carried: Vec<String> = mounts
        .iter()
        .filter(|m| {
            volume_kinds.get(&m.name).map(String::as_str) == Some("emptyDir")
                && m.sub_path.as_deref().unwrap_or("").is_empty()
        })
        .map(|m| format!("{}={}", m.name, m.mount_path))
        .collect();
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
    for cap in FF_CAPABILITIES {
        if !add
            .iter()
            .any(|c| c == cap || c.strip_prefix("CAP_") == Some(cap))
        {
            add.push(cap.to_owned());
        }
    }
    security.seccomp_profile = Some(SeccompProfile {
        type_: "Unconfined".into(),
        localhost_profile: None,
    });
    security.allow_privilege_escalation.get_or_insert(false);
    // The image's entrypoint is ums-ff; a command of the pod's own replaces it.
    if let Some(command) = container.command.take() {
        let mut wrapped: Vec<String> = vec![UMS_FF.into(), "run".into(), "--".into()];
        wrapped.extend(command);
        container.command = Some(wrapped);
    }
    // The kubelet's probes go through ums-ff, which answers for a service that waits for its
    // restore or is frozen for its dump, and runs the original probe (from the annotation)
    // while the service runs.
    let name = container.name.clone();
    let through_ums_ff = |probe: &mut Option<Probe>, kind: &str| {
        if let Some(original) = probe.take() {
            *probe = Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some(format!("/probe/{name}?kind={kind}")),
                    port: IntOrString::Int(i32::from(config.sidecar_port)),
                    scheme: Some("HTTP".into()),
                    ..Default::default()
                }),
                exec: None,
                tcp_socket: None,
                grpc: None,
                ..original
            });
        }
    };
    through_ums_ff(&mut container.startup_probe, "startup");
    through_ums_ff(&mut container.readiness_probe, "readiness");
    through_ums_ff(&mut container.liveness_probe, "liveness");
    let env = container.env.get_or_insert_with(Vec::new);
    let mut set = |name: &str, value: String| {
        env.retain(|e| e.name != name);
        env.push(EnvVar {
            name: name.into(),
            value: Some(value),
            ..Default::default()
        });
    };
    set("UMS_FF_CONTAINER", container_name(&originals));
    set("UMS_FF_VOLUMES", carried.join(","));
    set("UMS_PODINFO", format!("{PODINFO_DIR}/annotations"));
    set("UMS_FF_LISTEN", format!("0.0.0.0:{}", config.sidecar_port));
    if !config.coordinator_keys.is_empty() {
        set("UMS_COORDINATOR_KEYS", config.coordinator_keys.join(","));
    }

    let annotations = prepared
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    annotations.insert(ANNOTATION_CONTAINERS.into(), encode_containers(&originals));
    annotations.insert(ANNOTATION_VOLUMES.into(), encode_volumes(&mount_points));
    annotations.insert(
        ANNOTATION_VOLUME_KINDS.into(),
        encode_volume_kinds(&volume_kinds),
    );
    annotations.insert(ANNOTATION_START_MODE.into(), start_mode.as_str().into());
    annotations.insert(ANNOTATION_BYPASS.into(), "true".into());
    Ok(prepared)
}

fn container_name(originals: &[k8s_openapi::api::core::v1::Container]) -> String {
    originals
        .first()
        .map(|c| c.name.clone())
        .unwrap_or_default()
}
