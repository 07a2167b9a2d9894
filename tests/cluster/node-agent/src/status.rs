//! The pod status the agent writes back through `pods/status`, from what it observed.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// What the agent knows of one container.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub name: String,
    pub image: String,
    pub container_id: Option<String>,
    pub running: bool,
    pub started_at: Option<Time>,
    pub exit_code: Option<i32>,
    pub finished_at: Option<Time>,
    pub waiting_reason: Option<(String, String)>,
    pub ready: bool,
    pub started: bool,
    pub restart_count: i32,
}

/// The pod's phase: Running once every container runs (or ran), Succeeded/Failed when all
/// ended for good, Pending before (and while init containers run; Failed when one failed
/// under restartPolicy Never).
pub fn phase(
    containers: &[Observed],
    init: &[Observed],
    initialized: bool,
    restart_policy_never: bool,
    restart_always: bool,
) -> &'static str {
    if !initialized {
        let failed = init
            .iter()
            .any(|c| !c.running && c.exit_code.is_some_and(|code| code != 0));
        return if failed && restart_policy_never {
            "Failed"
        } else {
            "Pending"
        };
    }
    let all_ended = containers
        .iter()
        .all(|c| c.exit_code.is_some() && !c.running);
    if !restart_always && all_ended && !containers.is_empty() {
        if containers.iter().all(|c| c.exit_code == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else if containers.iter().all(|c| c.container_id.is_some())
        && containers.iter().any(|c| c.running)
    {
        "Running"
    } else {
        "Pending"
    }
}

#[allow(clippy::too_many_arguments)]
pub fn pod_status(
    containers: &[Observed],
    init: &[Observed],
    initialized: bool,
    id_scheme: &str,
    restart_policy: &str,
    pod_ip: &str,
    host_ip: &str,
    start_time: &Time,
    previous: Option<&PodStatus>,
) -> PodStatus {
    let ready = initialized && !containers.is_empty() && containers.iter().all(|c| c.ready);
    let restart_always = restart_policy == "Always";
    let condition = |kind: &str, status: bool| {
        let status = if status { "True" } else { "False" };
        // Keep the transition time while the condition does not change.
        let last = previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone());
        PodCondition {
            type_: kind.into(),
            status: status.into(),
            last_transition_time: last.or_else(|| Some(now())),
            ..Default::default()
        }
    };
    PodStatus {
        phase: Some(
            phase(
                containers,
                init,
                initialized,
                restart_policy == "Never",
                restart_always,
            )
            .into(),
        ),
        pod_ip: Some(pod_ip.into()),
        pod_ips: Some(vec![k8s_openapi::api::core::v1::PodIP {
            ip: pod_ip.into(),
        }]),
        host_ip: Some(host_ip.into()),
        start_time: Some(start_time.clone()),
        conditions: Some(vec![
            condition("PodScheduled", true),
            condition("Initialized", initialized),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ]),
        container_statuses: Some(
            containers
                .iter()
                .map(|c| container_status(c, id_scheme))
                .collect(),
        ),
        init_container_statuses: (!init.is_empty()).then(|| {
            init.iter()
                .map(|c| container_status(c, id_scheme))
                .collect()
        }),
        ..Default::default()
    }
}

fn container_status(c: &Observed, id_scheme: &str) -> ContainerStatus {
    let state = if c.running {
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: c.started_at.clone(),
            }),
            ..Default::default()
        }
    } else if let Some(code) = c.exit_code {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                finished_at: c.finished_at.clone(),
                started_at: c.started_at.clone(),
                reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    } else {
        let (reason, message) = c
            .waiting_reason
            .clone()
            .unwrap_or_else(|| ("ContainerCreating".into(), String::new()));
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason),
                message: (!message.is_empty()).then_some(message),
            }),
            ..Default::default()
        }
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: String::new(),
        container_id: c.container_id.as_ref().map(|id| format!("{id_scheme}{id}")),
        ready: c.ready,
        started: Some(c.started),
        restart_count: c.restart_count,
        state: Some(state),
        ..Default::default()
    }
}

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}
