//! The contract between `ums-webhook` and `ums-sidecar`.
//!
//! The webhook writes the pod annotations with these types and the sidecar reads them back with
//! the same types, so the two can never disagree about what a pod asks for (the validating
//! webhook also parses with them, so a pod the sidecar could not read is refused at creation).

pub mod abort;
pub mod agent;
pub mod annotations;
pub mod credential;
pub mod live_migration;
pub mod names;
pub mod podinfo;
pub mod quantity;

pub use annotations::{
    AnnotationError, Interface, MigrationAnnotations, StartMode, ANNOTATION_BYPASS,
    ANNOTATION_CONTAINERS, ANNOTATION_ID, ANNOTATION_INTERFACE, ANNOTATION_LOCK_RELEASED,
    ANNOTATION_START_MODE, ANNOTATION_VOLUMES, ANNOTATION_VOLUME_KINDS,
};
pub use podinfo::{parse_podinfo, PodinfoError};

/// The directory under which the runtime container mounts every pod volume (`/mount/<volume>`).
pub const VOLUME_MOUNT_ROOT: &str = "/mount";

/// Where the downward-API volume with the pod's metadata is mounted, in the runtime container
/// (dind/pind) or in every container (ff).
pub const PODINFO_DIR: &str = "/etc/podinfo";

/// The default port of the sidecar's HTTP API in the runtime container.
pub const DEFAULT_SIDECAR_PORT: u16 = 8888;

/// Where pod volume `name` is mounted inside the runtime container.
pub fn runtime_volume_path(volume_name: &str) -> String {
    format!("{VOLUME_MOUNT_ROOT}/{volume_name}")
}

/// Name of the runtime container's environment variable that carries the value of `variable`
/// of original container `container` when that variable comes from `valueFrom` (a Secret, a
/// ConfigMap or a field of the pod). The kubelet resolves it for the runtime container, and the
/// sidecar hands it to the nested container under its original name.
pub fn forwarded_env_name(container: &str, variable: &str) -> String {
    format!("UMS_ENV__{container}__{variable}")
}
