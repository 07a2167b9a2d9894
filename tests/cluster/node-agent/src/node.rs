//! The node's control loop: a reflector keeps the cluster's pods; every half second the agent
//! starts the pods it does not run yet, removes the containers of pods that are gone, and syncs
//! each running pod (downward-API files, restarts, probes, status).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions,
    RemoveContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt as _};
use kube::Api;

use crate::containers::{self, PodContext, POD_LABEL};
use crate::network::PodNetwork;
use crate::status::{self, Observed};
use crate::{probes, volumes};

#[allow(missing_debug_implementations)] // kube::Client is not Debug
pub struct Node {
    pub client: kube::Client,
    pub docker: Docker,
    pub name: String,
    pub network: PodNetwork,
    pub state_dir: PathBuf,
    pub sandbox_image: String,
}

/// One pod this node runs.
struct RunningPod {
    namespace: String,
    name: String,
    dir: PathBuf,
    sandbox_id: String,
    pod_ip: String,
    start_time: Time,
    volumes: HashMap<String, PathBuf>,
    containers: Vec<ContainerRun>,
    last_status: Option<PodStatus>,
}

struct ContainerRun {
    spec: Container,
    observed: Observed,
    next_restart: Option<Instant>,
}

impl Node {
    pub async fn run(self) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let (reader, writer) = reflector::store();
        let stream = reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .touched_objects();
        tokio::spawn(async move {
            futures_util::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::warn!(error = %e, "pod watch");
                }
            }
        });
        reader.wait_until_ready().await?;
        self.remove_leftovers(&reader.state()).await;
        let mut running: HashMap<String, RunningPod> = HashMap::new();
        loop {
            let pods: Vec<_> = reader
                .state()
                .into_iter()
                .filter(|p| {
                    let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                    node.is_none_or(|n| n.is_empty() || n == self.name)
                })
                .collect();
            let live: Vec<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
            for uid in running.keys().cloned().collect::<Vec<_>>() {
                if !live.contains(&uid) {
                    if let Some(pod) = running.remove(&uid) {
                        self.stop(pod).await;
                    }
                }
            }
            for pod in &pods {
                let Some(uid) = pod.metadata.uid.clone() else {
                    continue;
                };
                if !running.contains_key(&uid) {
                    match self.start(pod).await {
                        Ok(started) => {
                            running.insert(uid.clone(), started);
                        }
                        Err(e) => {
                            tracing::warn!(pod = ?pod.metadata.name, error = %e, "cannot start pod");
                            continue;
                        }
                    }
                }
                if let Some(state) = running.get_mut(&uid) {
                    self.sync(pod, state).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Containers of pods that no longer exist (an earlier run of the agent).
    async fn remove_leftovers(&self, pods: &[std::sync::Arc<Pod>]) {
        let Ok(list) = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([(
                    "label".to_owned(),
                    vec![format!("{}={}", containers::NODE_LABEL, self.name)],
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
            if !pods.iter().any(|p| p.metadata.uid.as_deref() == Some(&uid)) {
                if let Some(id) = c.id {
                    self.remove_container(&id).await;
                }
            }
        }
    }

    async fn start(&self, pod: &Pod) -> anyhow::Result<RunningPod> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let short = &uid[..uid.len().min(8)];
        let dir = self.state_dir.join("pods").join(&uid);
        let volumes = volumes::prepare(&self.client, pod, &dir).await?;
        // The sandbox: holds the pod's network namespace and IP (the kubelet's pause container).
        let sandbox = format!("k8s_POD_{name}_{namespace}_{short}");
        self.ensure_image(&self.sandbox_image).await?;
        self.docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(sandbox.clone()),
                    ..Default::default()
                }),
                bollard::models::ContainerCreateBody {
                    image: Some(self.sandbox_image.clone()),
                    entrypoint: Some(vec!["sleep".into(), "infinity".into()]),
                    hostname: Some(name.clone()),
                    labels: Some(containers::labels(&self.name, &uid)),
                    host_config: Some(bollard::models::HostConfig {
                        network_mode: Some(self.network.name.clone()),
                        init: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await?;
        self.docker.start_container(&sandbox, None).await?;
        let inspect = self
            .docker
            .inspect_container(&sandbox, None::<InspectContainerOptions>)
            .await?;
        let pod_ip = inspect
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|n| n.get(&self.network.name).cloned())
            .and_then(|n| n.ip_address)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!("sandbox of {name} has no IP on {}", self.network.name)
            })?;
        tracing::info!(pod = %name, namespace = %namespace, ip = %pod_ip, "pod sandbox up");
        let containers = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| ContainerRun {
                spec: c.clone(),
                observed: Observed {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    ..Default::default()
                },
                next_restart: None,
            })
            .collect();
        Ok(RunningPod {
            namespace,
            name,
            dir,
            sandbox_id: inspect.id.unwrap_or(sandbox),
            pod_ip,
            start_time: status::now(),
            volumes,
            containers,
            last_status: None,
        })
    }

    async fn sync(&self, pod: &Pod, state: &mut RunningPod) {
        if let Err(e) = volumes::refresh_downward_api(pod, &state.dir) {
            tracing::warn!(pod = %state.name, error = %e, "downward API refresh");
        }
        let restart_policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let short = uid[..uid.len().min(8)].to_owned();
        for index in 0..state.containers.len() {
            if state.containers[index].observed.container_id.is_none() {
                let spec = state.containers[index].spec.clone();
                let name = format!(
                    "k8s_{}_{}_{}_{short}",
                    spec.name, state.name, state.namespace
                );
                let created = self.create_container(pod, state, &spec, &name).await;
                let run = &mut state.containers[index];
                match created {
                    Ok(id) => {
                        run.observed.container_id = Some(id);
                        run.observed.waiting_reason = None;
                    }
                    Err((reason, message)) => {
                        run.observed.waiting_reason = Some((reason, message));
                        continue;
                    }
                }
            }
            self.observe(&mut state.containers[index], &restart_policy, &state.pod_ip)
                .await;
        }
        let observed: Vec<Observed> = state
            .containers
            .iter()
            .map(|c| c.observed.clone())
            .collect();
        let status = status::pod_status(
            &observed,
            restart_policy == "Always",
            &state.pod_ip,
            &state.start_time,
            state.last_status.as_ref(),
        );
        if state.last_status.as_ref() != Some(&status) {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &state.namespace);
            let patch = serde_json::json!({ "status": status });
            match api
                .patch_status(&state.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => state.last_status = Some(status),
                Err(e) => tracing::warn!(pod = %state.name, error = %e, "status update"),
            }
        }
    }

    async fn create_container(
        &self,
        pod: &Pod,
        state: &RunningPod,
        spec: &Container,
        name: &str,
    ) -> Result<String, (String, String)> {
        let image = spec.image.clone().unwrap_or_default();
        self.ensure_image(&image)
            .await
            .map_err(|e| ("ErrImagePull".to_owned(), e.to_string()))?;
        let context = PodContext {
            client: &self.client,
            pod,
            pod_ip: &state.pod_ip,
            node_name: &self.name,
            sandbox_id: &state.sandbox_id,
            volumes: &state.volumes,
        };
        let body = containers::create_body(&context, spec)
            .await
            .map_err(|e| ("CreateContainerConfigError".to_owned(), e.to_string()))?;
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_owned()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| ("CreateContainerError".to_owned(), e.to_string()))?;
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| ("RunContainerError".to_owned(), e.to_string()))?;
        tracing::info!(pod = %state.name, container = %spec.name, "container started");
        Ok(created.id)
    }

    /// Reads the container's state, restarts it per the pod's restartPolicy, runs its probes.
    async fn observe(&self, run: &mut ContainerRun, restart_policy: &str, pod_ip: &str) {
        let Some(id) = run.observed.container_id.clone() else {
            return;
        };
        let Ok(inspect) = self
            .docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
        else {
            return;
        };
        let state = inspect.state.unwrap_or_default();
        let running = state.running.unwrap_or(false);
        let parse = |t: Option<String>| {
            t.and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
                .filter(|t| t.as_second() > 0)
                .map(Time)
        };
        run.observed.started_at = parse(state.started_at);
        if running {
            run.observed.running = true;
            run.observed.exit_code = None;
            run.next_restart = None;
            let container = run.spec.clone();
            if !run.observed.started {
                run.observed.started = match &container.startup_probe {
                    Some(probe) => probes::check(probe, &container, pod_ip)
                        .await
                        .unwrap_or(true),
                    None => true,
                };
            }
            run.observed.ready = run.observed.started
                && match &container.readiness_probe {
                    Some(probe) => probes::check(probe, &container, pod_ip)
                        .await
                        .unwrap_or(true),
                    None => true,
                };
            return;
        }
        // Exited.
        let code = state.exit_code.unwrap_or(0) as i32;
        let was_running = run.observed.running;
        run.observed.running = false;
        run.observed.ready = false;
        run.observed.started = false;
        run.observed.exit_code = Some(code);
        run.observed.finished_at = parse(state.finished_at);
        if was_running {
            tracing::info!(container = %run.spec.name, code, "container exited");
        }
        let restart = match restart_policy {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if !restart {
            return;
        }
        // Back off like the kubelet (doubling, capped), without its five minutes.
        let now = Instant::now();
        match run.next_restart {
            None => {
                let delay = Duration::from_secs(1 << run.observed.restart_count.clamp(0, 4));
                run.next_restart = Some(now + delay);
            }
            Some(at) if now >= at => {
                if self.docker.start_container(&id, None).await.is_ok() {
                    run.observed.restart_count += 1;
                    run.next_restart = None;
                    tracing::info!(container = %run.spec.name, restarts = run.observed.restart_count, "container restarted");
                }
            }
            Some(_) => {}
        }
    }

    async fn stop(&self, pod: RunningPod) {
        tracing::info!(pod = %pod.name, namespace = %pod.namespace, "pod gone: removing its containers");
        for run in &pod.containers {
            if let Some(id) = &run.observed.container_id {
                self.remove_container(id).await;
            }
        }
        self.remove_container(&pod.sandbox_id).await;
        let _ = std::fs::remove_dir_all(&pod.dir);
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

    /// Pulls the image unless the engine has it (IfNotPresent for every pod: the test images
    /// are built locally).
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
