//! The node's control loop: a reflector keeps the cluster's pods; every half second the agent
//! starts the pods it does not run yet, removes the containers of pods that are gone, and syncs
//! each running pod (downward-API files, restarts, probes, status). The runtime is Docker or a
//! CRI node (`runtime.rs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt as _};
use kube::Api;

use crate::containers::{self, PodContext};
use crate::runtime::{PodRef, Runtime, Sandbox};
use crate::status::{self, Observed};
use crate::{probes, volumes};

/// The running containers of this node by (namespace, pod, container): what the kubelet's
/// checkpoint endpoint looks up.
pub type ContainerIndex = Arc<Mutex<HashMap<(String, String, String), String>>>;

#[allow(missing_debug_implementations)] // kube::Client is not Debug
pub struct Node<R> {
    pub client: kube::Client,
    pub runtime: Arc<R>,
    pub name: String,
    pub state_dir: PathBuf,
    /// The pods' `status.hostIP` (the node's address); `None`: the pod's own IP.
    pub host_ip: Option<String>,
    pub index: ContainerIndex,
    /// Whether this node also runs the pods bound to no node.
    pub run_unbound: bool,
    /// Whether this agent binds the pods bound to no node (the rig's scheduler).
    pub place_unbound: bool,
}

/// One pod this node runs.
struct RunningPod {
    pod: PodRef,
    sandbox: Sandbox,
    start_time: Time,
    volumes: HashMap<String, PathBuf>,
    /// The init containers, run one after the other to success before `containers`.
    init: Vec<ContainerRun>,
    initialized: bool,
    containers: Vec<ContainerRun>,
    last_status: Option<PodStatus>,
}

/// Which of a pod's container lists.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Init,
    Main,
}

impl Kind {
    fn run(self, state: &mut RunningPod, index: usize) -> &mut ContainerRun {
        match self {
            Kind::Init => &mut state.init[index],
            Kind::Main => &mut state.containers[index],
        }
    }
}

struct ContainerRun {
    spec: Container,
    observed: Observed,
    next_restart: Option<Instant>,
}

impl<R: Runtime> Node<R> {
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
        let live: Vec<String> = reader
            .state()
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        self.runtime.remove_leftovers(&live).await;
        let mut running: HashMap<String, RunningPod> = HashMap::new();
        let mut slices = HashMap::new();
        loop {
            // The cluster's control-plane stand-ins: the scheduler's and the EndpointSlice
            // controller's.
            if self.place_unbound {
                let all: Vec<Pod> = reader.state().iter().map(|p| (**p).clone()).collect();
                crate::placement::bind_unbound(&self.client, &all).await;
                crate::endpoints::sync(&self.client, &all, &mut slices).await;
            }
            let pods: Vec<_> = reader
                .state()
                .into_iter()
                .filter(|p| {
                    let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                    match node.filter(|n| !n.is_empty()) {
                        Some(n) => n == self.name,
                        None => self.run_unbound,
                    }
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
            self.publish(&running);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// What the checkpoint endpoint may find: every container that has an ID.
    fn publish(&self, running: &HashMap<String, RunningPod>) {
        let index = running
            .values()
            .flat_map(|pod| {
                pod.containers.iter().filter_map(|c| {
                    let id = c.observed.container_id.clone()?;
                    Some((
                        (
                            pod.pod.namespace.clone(),
                            pod.pod.name.clone(),
                            c.spec.name.clone(),
                        ),
                        id,
                    ))
                })
            })
            .collect();
        if let Ok(mut shared) = self.index.lock() {
            *shared = index;
        }
    }

    async fn start(&self, pod: &Pod) -> anyhow::Result<RunningPod> {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = self.state_dir.join("pods").join(&uid);
        let pod_ref = PodRef {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            uid,
            dir: dir.clone(),
        };
        let volumes = volumes::prepare(&self.client, pod, &dir).await?;
        let specs: Vec<&Container> = pod.spec.iter().flat_map(|s| s.containers.iter()).collect();
        let init_specs: Vec<&Container> = pod
            .spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten())
            .collect();
        let privileged = specs
            .iter()
            .chain(&init_specs)
            .any(|c| c.security_context.as_ref().and_then(|s| s.privileged) == Some(true));
        let sandbox = self.runtime.run_sandbox(&pod_ref, privileged).await?;
        tracing::info!(pod = %pod_ref.name, namespace = %pod_ref.namespace, ip = %sandbox.ip, "pod sandbox up");
        let run = |c: &Container| ContainerRun {
            spec: c.clone(),
            observed: Observed {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                ..Default::default()
            },
            next_restart: None,
        };
        Ok(RunningPod {
            pod: pod_ref,
            sandbox,
            start_time: status::now(),
            volumes,
            initialized: init_specs.is_empty(),
            init: init_specs.into_iter().map(run).collect(),
            containers: specs.into_iter().map(run).collect(),
            last_status: None,
        })
    }

    async fn sync(&self, pod: &Pod, state: &mut RunningPod) {
        if let Err(e) = volumes::refresh_downward_api(pod, &state.pod.dir) {
            tracing::warn!(pod = %state.pod.name, error = %e, "downward API refresh");
        }
        let restart_policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        if !state.initialized {
            state.initialized = self.sync_init(pod, state, &restart_policy).await;
        }
        for index in 0..state.containers.len() {
            if !state.initialized {
                break;
            }
            if state.containers[index].observed.container_id.is_none() {
                let spec = state.containers[index].spec.clone();
                let created = self.create_container(pod, state, &spec).await;
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
            self.observe(pod, state, index, &restart_policy).await;
        }
        let observed: Vec<Observed> = state
            .containers
            .iter()
            .map(|c| c.observed.clone())
            .collect();
        let init: Vec<Observed> = state.init.iter().map(|c| c.observed.clone()).collect();
        let status = status::pod_status(
            &observed,
            &init,
            state.initialized,
            self.runtime.id_scheme(),
            &restart_policy,
            &state.sandbox.ip,
            self.host_ip.as_deref().unwrap_or(&state.sandbox.ip),
            &state.start_time,
            state.last_status.as_ref(),
        );
        if state.last_status.as_ref() != Some(&status) {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &state.pod.namespace);
            let patch = serde_json::json!({ "status": status });
            match api
                .patch_status(
                    &state.pod.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => state.last_status = Some(status),
                Err(e) => tracing::warn!(pod = %state.pod.name, error = %e, "status update"),
            }
        }
    }

    /// Runs the init containers in order, each to its successful end, as the kubelet does:
    /// one that fails is run again after a back-off (restartPolicy Never: the pod fails).
    /// Whether all have succeeded.
    async fn sync_init(&self, pod: &Pod, state: &mut RunningPod, restart_policy: &str) -> bool {
        for index in 0..state.init.len() {
            if state.init[index].observed.exit_code == Some(0)
                && !state.init[index].observed.running
            {
                continue;
            }
            let spec = state.init[index].spec.clone();
            let Some(id) = state.init[index].observed.container_id.clone() else {
                let created = self.create_container(pod, state, &spec).await;
                let run = &mut state.init[index];
                match created {
                    Ok(id) => {
                        run.observed.container_id = Some(id);
                        run.observed.waiting_reason = None;
                    }
                    Err(reason) => run.observed.waiting_reason = Some(reason),
                }
                return false;
            };
            let Some(current) = self.runtime.container_state(&id).await else {
                return false;
            };
            let run = &mut state.init[index];
            run.observed.started_at = current.started_at;
            if current.running {
                run.observed.running = true;
                return false;
            }
            let code = current.exit_code.unwrap_or(0);
            if run.observed.running || run.observed.exit_code.is_none() {
                tracing::info!(pod = %state.pod.name, container = %spec.name, code, "init container exited");
            }
            run.observed.running = false;
            run.observed.exit_code = Some(code);
            run.observed.finished_at = current.finished_at;
            if code == 0 {
                continue;
            }
            if restart_policy == "Never" {
                return false;
            }
            self.restart_after_back_off(pod, state, Kind::Init, index, &id)
                .await;
            return false;
        }
        true
    }

    /// The container's plan against the running pod.
    async fn plan(
        &self,
        pod: &Pod,
        state: &RunningPod,
        spec: &Container,
    ) -> Result<containers::ContainerPlan, (String, String)> {
        let context = PodContext {
            client: &self.client,
            pod,
            pod_ip: &state.sandbox.ip,
            node_name: &self.name,
            volumes: &state.volumes,
        };
        containers::plan(&context, spec)
            .await
            .map_err(|e| ("CreateContainerConfigError".to_owned(), e.to_string()))
    }

    async fn create_container(
        &self,
        pod: &Pod,
        state: &RunningPod,
        spec: &Container,
    ) -> Result<String, (String, String)> {
        let plan = self.plan(pod, state, spec).await?;
        let id = self
            .runtime
            .start_container(&state.pod, &state.sandbox, &plan, 0)
            .await
            .inspect_err(|(reason, message)| {
                tracing::warn!(pod = %state.pod.name, container = %spec.name, %reason, %message,
                    "container not started");
            })?;
        tracing::info!(pod = %state.pod.name, container = %spec.name, "container started");
        Ok(id)
    }

    /// Reads the container's state, restarts it per the pod's restartPolicy, runs its probes.
    async fn observe(&self, pod: &Pod, state: &mut RunningPod, index: usize, restart_policy: &str) {
        let pod_ip = state.sandbox.ip.clone();
        let run = &mut state.containers[index];
        let Some(id) = run.observed.container_id.clone() else {
            return;
        };
        let Some(current) = self.runtime.container_state(&id).await else {
            return;
        };
        run.observed.started_at = current.started_at;
        if current.running {
            run.observed.running = true;
            run.observed.exit_code = None;
            run.next_restart = None;
            let container = run.spec.clone();
            if !run.observed.started {
                run.observed.started = match &container.startup_probe {
                    Some(probe) => probes::check(probe, &container, &pod_ip)
                        .await
                        .unwrap_or(true),
                    None => true,
                };
            }
            run.observed.ready = run.observed.started
                && match &container.readiness_probe {
                    Some(probe) => probes::check(probe, &container, &pod_ip)
                        .await
                        .unwrap_or(true),
                    None => true,
                };
            return;
        }
        // Exited (or created and never started: the next restart starts it).
        let code = current.exit_code.unwrap_or(0);
        let was_running = run.observed.running;
        run.observed.running = false;
        run.observed.ready = false;
        run.observed.started = false;
        run.observed.exit_code = Some(code);
        run.observed.finished_at = current.finished_at;
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
        self.restart_after_back_off(pod, state, Kind::Main, index, &id)
            .await;
    }

    /// Runs an exited container again once its back-off is over, like the kubelet (doubling
    /// from 1 s, capped at 16 s; the kubelet's goes to five minutes).
    async fn restart_after_back_off(
        &self,
        pod: &Pod,
        state: &mut RunningPod,
        kind: Kind,
        index: usize,
        id: &str,
    ) {
        let run = kind.run(state, index);
        let now = Instant::now();
        match run.next_restart {
            None => {
                let delay = Duration::from_secs(1 << run.observed.restart_count.clamp(0, 4));
                run.next_restart = Some(now + delay);
            }
            Some(at) if now >= at => {
                let spec = run.spec.clone();
                let attempt = (run.observed.restart_count + 1) as u32;
                let Ok(plan) = self.plan(pod, state, &spec).await else {
                    return;
                };
                let restarted = self
                    .runtime
                    .restart_container(&state.pod, &state.sandbox, &plan, id, attempt)
                    .await;
                let run = kind.run(state, index);
                run.next_restart = None;
                match restarted {
                    Ok(new_id) => {
                        run.observed.container_id = Some(new_id);
                        run.observed.restart_count += 1;
                        run.observed.exit_code = None;
                        tracing::info!(container = %spec.name, restarts = run.observed.restart_count, "container restarted");
                    }
                    Err((reason, message)) => {
                        tracing::warn!(container = %spec.name, %reason, %message, "restart failed");
                    }
                }
            }
            Some(_) => {}
        }
    }

    async fn stop(&self, pod: RunningPod) {
        tracing::info!(pod = %pod.pod.name, namespace = %pod.pod.namespace, "pod gone: removing its containers");
        for run in pod.init.iter().chain(&pod.containers) {
            if let Some(id) = &run.observed.container_id {
                self.runtime.remove_container(id).await;
            }
        }
        self.runtime.remove_sandbox(&pod.sandbox.id).await;
        let _ = std::fs::remove_dir_all(&pod.pod.dir);
    }
}
