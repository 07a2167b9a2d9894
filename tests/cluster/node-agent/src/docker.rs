//! The Docker-engine runtime: each pod's sandbox is a container on the cluster's pod network
//! (`network.rs`), the pod's containers join its network namespace. The fastest rig for the
//! container-level tests; it has no checkpoint (the CRI node has).

use std::collections::HashMap;
use std::path::Path;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::containers::{self, ContainerPlan, NODE_LABEL, POD_LABEL};
use crate::network::PodNetwork;
use crate::runtime::{CheckpointError, ContainerState, PodRef, Runtime, Sandbox, StartError};

/// This machine's Docker engine as a node's runtime.
#[derive(Debug)]
pub struct DockerRuntime {
    pub docker: Docker,
    pub node: String,
    pub network: PodNetwork,
    pub sandbox_image: String,
}

/// `privileged: true`, as this machine allows it: `--privileged` itself is refused here (the
/// sandbox's capability bounding set lacks CAP_SYS_RESOURCE, so runc cannot apply the caps);
/// everything else it means is granted explicitly. On a real node the kubelet passes privileged.
fn privileged(host: &mut HostConfig) {
    host.cap_add = Some(vec!["ALL".into()]);
    host.cap_drop = Some(vec!["SYS_RESOURCE".into()]);
    host.security_opt = Some(vec![
        "seccomp=unconfined".into(),
        "apparmor=unconfined".into(),
    ]);
    // The CLI's `--security-opt systempaths=unconfined`: nothing masked, nothing read-only.
    host.masked_paths = Some(Vec::new());
    host.readonly_paths = Some(Vec::new());
    host.device_cgroup_rules = Some(vec!["a *:* rwm".into()]);
    host.binds
        .get_or_insert_with(Vec::new)
        .push("/sys/fs/cgroup:/sys/fs/cgroup:rw".into());
}

/// The container's create body, joined to the sandbox's network namespace.
fn create_body(plan: &ContainerPlan, sandbox_id: &str) -> ContainerCreateBody {
    let binds = plan
        .mounts
        .iter()
        .map(|m| {
            let mode = if m.read_only { "ro" } else { "rw" };
            format!("{}:{}:{mode}", m.host_path.display(), m.container_path)
        })
        .collect();
    let mut host = HostConfig {
        network_mode: Some(format!("container:{sandbox_id}")),
        binds: Some(binds),
        readonly_rootfs: Some(plan.readonly_rootfs),
        ..Default::default()
    };
    if plan.privileged {
        privileged(&mut host);
    } else {
        host.cap_add = Some(plan.cap_add.clone()).filter(|c| !c.is_empty());
        host.cap_drop = Some(plan.cap_drop.clone()).filter(|c| !c.is_empty());
    }
    let user = plan.run_as_user.map(|uid| match plan.run_as_group {
        Some(gid) => format!("{uid}:{gid}"),
        None => uid.to_string(),
    });
    ContainerCreateBody {
        image: Some(plan.image.clone()),
        entrypoint: plan.command.clone(),
        cmd: plan.args.clone(),
        env: Some(plan.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: plan.working_dir.clone(),
        user,
        tty: Some(plan.tty),
        open_stdin: Some(plan.stdin),
        labels: Some(plan.labels.clone()),
        host_config: Some(host),
        ..Default::default()
    }
}

fn parse_time(t: Option<String>) -> Option<Time> {
    t.and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .filter(|t| t.as_second() > 0)
        .map(Time)
}

impl DockerRuntime {
    /// Pulls the image unless the engine has it: IfNotPresent for every pod, whatever it says
    /// (the test images are built locally; the CRI node applies the policy).
    async fn ensure_image(&self, image: &str) -> anyhow::Result<()> {
        if self.docker.inspect_image(image).await.is_ok() {
            return Ok(());
        }
        let mut pull = self.docker.create_image(
            Some(CreateImageOptions {
                from_image: Some(image.to_owned()),
                ..Default::default()
            }),
            None,
            None,
        );
        while let Some(item) = pull.next().await {
            item.map_err(|e| anyhow::anyhow!("pull {image}: {e}"))?;
        }
        Ok(())
    }
}

impl Runtime for DockerRuntime {
    fn id_scheme(&self) -> &'static str {
        "docker://"
    }

    async fn run_sandbox(&self, pod: &PodRef, privileged: bool) -> anyhow::Result<Sandbox> {
        // The kubelet's pause container: holds the pod's network namespace and IP.
        let name = format!("k8s_POD_{}_{}_{}", pod.name, pod.namespace, pod.short_uid());
        self.ensure_image(&self.sandbox_image).await?;
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                ContainerCreateBody {
                    image: Some(self.sandbox_image.clone()),
                    entrypoint: Some(vec!["sleep".into(), "infinity".into()]),
                    hostname: Some(pod.name.clone()),
                    labels: Some(containers::labels(&self.node, &pod.uid)),
                    host_config: Some(HostConfig {
                        network_mode: Some(self.network.name.clone()),
                        init: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await?;
        self.docker.start_container(&name, None).await?;
        let inspect = self
            .docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await?;
        let ip = inspect
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|n| n.get(&self.network.name).cloned())
            .and_then(|n| n.ip_address)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!("sandbox of {} has no IP on {}", pod.name, self.network.name)
            })?;
        Ok(Sandbox {
            id: inspect.id.unwrap_or(name),
            ip,
            privileged,
        })
    }

    async fn start_container(
        &self,
        pod: &PodRef,
        sandbox: &Sandbox,
        plan: &ContainerPlan,
        _attempt: u32,
    ) -> Result<String, StartError> {
        self.ensure_image(&plan.image)
            .await
            .map_err(|e| ("ErrImagePull".to_owned(), e.to_string()))?;
        let name = format!(
            "k8s_{}_{}_{}_{}",
            plan.name,
            pod.name,
            pod.namespace,
            pod.short_uid()
        );
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                create_body(plan, &sandbox.id),
            )
            .await
            .map_err(|e| ("CreateContainerError".to_owned(), e.to_string()))?;
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| ("RunContainerError".to_owned(), e.to_string()))?;
        Ok(created.id)
    }

    async fn container_state(&self, id: &str) -> Option<ContainerState> {
        let inspect = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()?;
        let state = inspect.state.unwrap_or_default();
        let running = state.running.unwrap_or(false);
        Some(ContainerState {
            running,
            started_at: parse_time(state.started_at),
            exit_code: (!running).then(|| state.exit_code.unwrap_or(0) as i32),
            finished_at: parse_time(state.finished_at),
        })
    }

    async fn restart_container(
        &self,
        _pod: &PodRef,
        _sandbox: &Sandbox,
        _plan: &ContainerPlan,
        id: &str,
        _attempt: u32,
    ) -> Result<String, StartError> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(|e| ("RunContainerError".to_owned(), e.to_string()))?;
        Ok(id.to_owned())
    }

    async fn remove_container(&self, id: &str) {
        let _ = self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await;
    }

    async fn remove_sandbox(&self, id: &str) {
        self.remove_container(id).await;
    }

    async fn remove_leftovers(&self, live: &[String]) {
        let Ok(list) = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([(
                    "label".to_owned(),
                    vec![format!("{NODE_LABEL}={}", self.node)],
                )])),
                ..Default::default()
            }))
            .await
        else {
            return;
        };
        for c in list {
            let uid = c
                .labels
                .as_ref()
                .and_then(|l| l.get(POD_LABEL))
                .cloned()
                .unwrap_or_default();
            if !live.contains(&uid) {
                if let Some(id) = c.id {
                    self.remove_container(&id).await;
                }
            }
        }
    }

    async fn checkpoint(
        &self,
        _id: &str,
        _location: &Path,
        _timeout_seconds: i64,
    ) -> Result<(), CheckpointError> {
        Err(CheckpointError::Unsupported(
            "this node runs its pods on a Docker engine, which has no CRI CheckpointContainer"
                .into(),
        ))
    }
}
