//! The CRI runtime: a containerd node (tests/cluster/cri-node) driven through the CRI gRPC API,
//! the calls a kubelet makes: RunPodSandbox (CNI networking, the pod IP from its status),
//! PullImage per the image pull policy, CreateContainer/StartContainer, ContainerStatus,
//! RemoveContainer, StopPodSandbox/RemovePodSandbox, and CheckpointContainer for the kubelet's
//! checkpoint endpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Capability, CheckpointContainerRequest, ContainerConfig, ContainerMetadata,
    ContainerStatusRequest, CreateContainerRequest, ImageSpec, ImageStatusRequest, Int64Value,
    KeyValue, LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, Mount, PodSandboxConfig, PodSandboxFilter,
    PodSandboxMetadata, PodSandboxStatusRequest, PullImageRequest, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, SecurityProfile, StartContainerRequest,
    StopContainerRequest, StopPodSandboxRequest,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containers::{ContainerPlan, NODE_LABEL, POD_LABEL};
use crate::runtime::{CheckpointError, ContainerState, PodRef, Runtime, Sandbox, StartError};

/// A CRI runtime on its socket.
#[derive(Debug, Clone)]
pub struct CriRuntime {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    node: String,
}

/// Connects to the CRI socket (a unix socket path).
pub async fn connect(socket: &Path, node: &str) -> anyhow::Result<CriRuntime> {
    let socket: PathBuf = socket.to_owned();
    let channel = Endpoint::try_from("http://[::]:0")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(CriRuntime {
        runtime: RuntimeServiceClient::new(channel.clone()),
        images: ImageServiceClient::new(channel),
        node: node.to_owned(),
    })
}

fn time_from_nanos(nanos: i64) -> Option<Time> {
    (nanos > 0)
        .then(|| k8s_openapi::jiff::Timestamp::from_nanosecond(nanos as i128).ok())
        .flatten()
        .map(Time)
}

fn status_message(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

impl CriRuntime {
    /// Whether the runtime has the image.
    async fn has_image(&self, image: &str) -> anyhow::Result<bool> {
        let status = self
            .images
            .clone()
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(|e| anyhow::anyhow!("ImageStatus {image}: {}", status_message(&e)))?;
        Ok(status.into_inner().image.is_some())
    }

    /// Pulls the image through the CRI.
    async fn pull(&self, image: &str) -> anyhow::Result<()> {
        self.images
            .clone()
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("PullImage {image}: {}", status_message(&e)))?;
        Ok(())
    }

    /// The image pull policy, as the kubelet applies it.
    pub async fn ensure_image_with_policy(
        &self,
        image: &str,
        policy: &str,
    ) -> Result<(), StartError> {
        let present = self
            .has_image(image)
            .await
            .map_err(|e| ("ErrImagePull".to_owned(), e.to_string()))?;
        match policy {
            "Never" if !present => Err((
                "ErrImageNeverPull".to_owned(),
                format!("image {image:?} is not present with pull policy of Never"),
            )),
            "Never" => Ok(()),
            "IfNotPresent" if present => Ok(()),
            _ => self
                .pull(image)
                .await
                .map_err(|e| ("ErrImagePull".to_owned(), e.to_string())),
        }
    }

    fn container_config(
        &self,
        pod: &PodRef,
        plan: &ContainerPlan,
        attempt: u32,
    ) -> ContainerConfig {
        let security = LinuxContainerSecurityContext {
            capabilities: Some(Capability {
                add_capabilities: plan.cap_add.clone(),
                drop_capabilities: plan.cap_drop.clone(),
                ..Default::default()
            }),
            privileged: plan.privileged,
            run_as_user: plan.run_as_user.map(|value| Int64Value { value }),
            run_as_group: plan.run_as_group.map(|value| Int64Value { value }),
            readonly_rootfs: plan.readonly_rootfs,
            no_new_privs: plan.no_new_privs,
            // As the kubelet passes a pod's seccompProfile (Localhost profiles are not served).
            seccomp: plan.seccomp.as_deref().map(|kind| {
                use k8s_cri::v1::security_profile::ProfileType;
                SecurityProfile {
                    profile_type: match kind {
                        "Unconfined" => ProfileType::Unconfined,
                        "Localhost" => ProfileType::Localhost,
                        _ => ProfileType::RuntimeDefault,
                    } as i32,
                    ..Default::default()
                }
            }),
            ..Default::default()
        };
        // Kubernetes' container labels, as the kubelet sets them (what `crictl ps` shows).
        let mut labels = plan.labels.clone();
        labels.extend([
            ("io.kubernetes.pod.name".to_owned(), pod.name.clone()),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                pod.namespace.clone(),
            ),
            ("io.kubernetes.pod.uid".to_owned(), pod.uid.clone()),
            ("io.kubernetes.container.name".to_owned(), plan.name.clone()),
        ]);
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: plan.name.clone(),
                attempt,
            }),
            image: Some(ImageSpec {
                image: plan.image.clone(),
                user_specified_image: plan.image.clone(),
                ..Default::default()
            }),
            command: plan.command.clone().unwrap_or_default(),
            args: plan.args.clone().unwrap_or_default(),
            working_dir: plan.working_dir.clone().unwrap_or_default(),
            envs: plan
                .env
                .iter()
                .map(|(key, value)| KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            mounts: plan
                .mounts
                .iter()
                .map(|m| Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.display().to_string(),
                    readonly: m.read_only,
                    ..Default::default()
                })
                .collect(),
            labels,
            // Relative to the sandbox's log directory, as the kubelet names it.
            log_path: format!("{}/{attempt}.log", plan.name),
            stdin: plan.stdin,
            tty: plan.tty,
            linux: Some(LinuxContainerConfig {
                security_context: Some(security),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sandbox_config(&self, pod: &PodRef, privileged: bool) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            hostname: pod.name.clone(),
            log_directory: pod.dir.join("logs").display().to_string(),
            labels: crate::containers::labels(&self.node, &pod.uid),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl Runtime for CriRuntime {
    fn id_scheme(&self) -> &'static str {
        "containerd://"
    }

    async fn run_sandbox(&self, pod: &PodRef, privileged: bool) -> anyhow::Result<Sandbox> {
        std::fs::create_dir_all(pod.dir.join("logs"))?;
        let config = self.sandbox_config(pod, privileged);
        let id = self
            .runtime
            .clone()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("RunPodSandbox: {}", status_message(&e)))?
            .into_inner()
            .pod_sandbox_id;
        let status = self
            .runtime
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .map_err(|e| anyhow::anyhow!("PodSandboxStatus: {}", status_message(&e)))?
            .into_inner();
        let ip = status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| anyhow::anyhow!("the sandbox of {} has no IP", pod.name))?;
        Ok(Sandbox { id, ip, privileged })
    }

    async fn start_container(
        &self,
        pod: &PodRef,
        sandbox: &Sandbox,
        plan: &ContainerPlan,
        attempt: u32,
    ) -> Result<String, StartError> {
        self.ensure_image_with_policy(&plan.image, &plan.pull_policy)
            .await?;
        let config = self.container_config(pod, plan, attempt);
        let sandbox_config = self.sandbox_config(pod, sandbox.privileged);
        let id = self
            .runtime
            .clone()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(|e| ("CreateContainerError".to_owned(), status_message(&e)))?
            .into_inner()
            .container_id;
        let started = self
            .runtime
            .clone()
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await;
        if let Err(e) = started {
            // The created container keeps its name reserved: remove it, so the next attempt
            // can create the container again (the kubelet does the same).
            self.remove_container(&id).await;
            return Err(("RunContainerError".to_owned(), status_message(&e)));
        }
        Ok(id)
    }

    async fn container_state(&self, id: &str) -> Option<ContainerState> {
        let status = self
            .runtime
            .clone()
            .container_status(ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
            .ok()?
            .into_inner()
            .status?;
        let running = status.state == k8s_cri::v1::ContainerState::ContainerRunning as i32;
        let exited = status.state == k8s_cri::v1::ContainerState::ContainerExited as i32;
        Some(ContainerState {
            running,
            started_at: time_from_nanos(status.started_at),
            exit_code: exited.then_some(status.exit_code),
            finished_at: time_from_nanos(status.finished_at),
        })
    }

    async fn restart_container(
        &self,
        pod: &PodRef,
        sandbox: &Sandbox,
        plan: &ContainerPlan,
        id: &str,
        attempt: u32,
    ) -> Result<String, StartError> {
        // The CRI never starts a container twice: the kubelet creates the next attempt.
        let new = self.start_container(pod, sandbox, plan, attempt).await?;
        self.remove_container(id).await;
        Ok(new)
    }

    async fn remove_container(&self, id: &str) {
        let _ = self
            .runtime
            .clone()
            .stop_container(StopContainerRequest {
                container_id: id.to_owned(),
                timeout: 0,
            })
            .await;
        let _ = self
            .runtime
            .clone()
            .remove_container(RemoveContainerRequest {
                container_id: id.to_owned(),
            })
            .await;
    }

    async fn remove_sandbox(&self, id: &str) {
        let _ = self
            .runtime
            .clone()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await;
        let _ = self
            .runtime
            .clone()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await;
    }

    async fn remove_leftovers(&self, live: &[String]) {
        let Ok(list) = self
            .runtime
            .clone()
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: HashMap::from([(NODE_LABEL.to_owned(), self.node.clone())]),
                    ..Default::default()
                }),
            })
            .await
        else {
            return;
        };
        for sandbox in list.into_inner().items {
            let uid = sandbox.labels.get(POD_LABEL).cloned().unwrap_or_default();
            if !live.contains(&uid) {
                self.remove_sandbox(&sandbox.id).await;
            }
        }
    }

    async fn checkpoint(
        &self,
        id: &str,
        location: &Path,
        timeout_seconds: i64,
    ) -> Result<(), CheckpointError> {
        self.runtime
            .clone()
            .checkpoint_container(CheckpointContainerRequest {
                container_id: id.to_owned(),
                location: location.display().to_string(),
                timeout: timeout_seconds,
            })
            .await
            .map_err(|e| match e.code() {
                tonic::Code::Unimplemented => CheckpointError::Unsupported(status_message(&e)),
                _ => CheckpointError::Failed(status_message(&e)),
            })?;
        Ok(())
    }
}
