//! What the node loop asks of a container runtime, whichever it is: this machine's Docker engine
//! (`docker.rs`) or a containerd node driven through the CRI as a kubelet drives it (`cri.rs`).

use std::future::Future;
use std::path::Path;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::containers::ContainerPlan;

/// The pod a runtime call is for.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// The pod's directory on this node (volumes, logs).
    pub dir: std::path::PathBuf,
}

impl PodRef {
    /// The first 8 characters of the uid, as the agent names containers.
    pub fn short_uid(&self) -> &str {
        &self.uid[..self.uid.len().min(8)]
    }
}

/// A pod's sandbox: its network namespace and IP.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub ip: String,
    pub privileged: bool,
}

/// A container's state as the runtime reports it.
#[derive(Debug, Clone, Default)]
pub struct ContainerState {
    pub running: bool,
    pub started_at: Option<Time>,
    pub exit_code: Option<i32>,
    pub finished_at: Option<Time>,
}

/// A failed container start: the kubelet's waiting reason (ErrImagePull, CreateContainerError,
/// RunContainerError) and the runtime's message.
pub type StartError = (String, String);

/// Why a checkpoint was not made, as the kubelet sorts it.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The runtime has no checkpoint (the kubelet answers 500 with the runtime's message).
    #[error("checkpointing is not supported by this node's container runtime: {0}")]
    Unsupported(String),
    /// The runtime tried and failed.
    #[error("checkpointing the container failed: {0}")]
    Failed(String),
}

/// A container runtime as the node loop uses it.
pub trait Runtime: Send + Sync + 'static {
    /// The prefix of container IDs in the pod's status (`docker://`, `containerd://`).
    fn id_scheme(&self) -> &'static str;
    /// Creates and starts the pod's sandbox (privileged when a container of the pod is, as the
    /// kubelet makes it); returns it with the pod's IP.
    fn run_sandbox(
        &self,
        pod: &PodRef,
        privileged: bool,
    ) -> impl Future<Output = anyhow::Result<Sandbox>> + Send;
    /// Pulls the container's image as the runtime's pull policy says, creates the container in
    /// the sandbox and starts it; `attempt` counts its restarts.
    fn start_container(
        &self,
        pod: &PodRef,
        sandbox: &Sandbox,
        plan: &ContainerPlan,
        attempt: u32,
    ) -> impl Future<Output = Result<String, StartError>> + Send;
    /// The container's state, or `None` if the runtime does not know it.
    fn container_state(&self, id: &str) -> impl Future<Output = Option<ContainerState>> + Send;
    /// Runs an exited container again; returns the ID of the container that now runs (the same
    /// for Docker, a new one for the CRI, which never restarts a container).
    fn restart_container(
        &self,
        pod: &PodRef,
        sandbox: &Sandbox,
        plan: &ContainerPlan,
        id: &str,
        attempt: u32,
    ) -> impl Future<Output = Result<String, StartError>> + Send;
    /// Removes a container, running or not (errors are ignored: it may be gone).
    fn remove_container(&self, id: &str) -> impl Future<Output = ()> + Send;
    /// Stops and removes a sandbox.
    fn remove_sandbox(&self, id: &str) -> impl Future<Output = ()> + Send;
    /// Removes every container and sandbox of this node whose pod uid is not in `live`.
    fn remove_leftovers(&self, live: &[String]) -> impl Future<Output = ()> + Send;
    /// Checkpoints a running container into the archive at `location` (a path on the node).
    fn checkpoint(
        &self,
        id: &str,
        location: &Path,
        timeout_seconds: i64,
    ) -> impl Future<Output = Result<(), CheckpointError>> + Send;
}
