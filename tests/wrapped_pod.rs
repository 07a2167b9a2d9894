//! End to end, as a cluster runs it: two clusters on this machine (an API server built from
//! Kubernetes' own library, the real webhook image configured by deploy/base, and a node agent
//! running pods on the outer engine with their own network namespaces and IPs). A user's
//! annotated pod is wrapped by the admission chain and run with its nested containers; a
//! passive copy waits in the other cluster; the source pod's sidecar migrates it there over the
//! pod network.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use ums_tests::cluster::{Cluster, User};
use ums_tests::poll;
use ums_tests::service_pod::{container_output, service_pod, sidecar};
use ums_tests::workload::ticks;

async fn running_and_ready(cluster: &Cluster, pod: &str) -> String {
    cluster
        .wait_running_and_ready(pod, Duration::from_secs(180))
        .await
}

async fn migrates_between_clusters(interface: &str) {
    let source_cluster = Cluster::start_with_node();
    let destination_cluster = Cluster::start_with_node();
    let name = format!("service-{interface}");

    // The user creates the pod; the admission chain wraps it; the node runs it.
    source_cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &service_pod(&name, interface, None, 64).to_string(),
    );
    let pod = source_cluster.get_json(&["pod", &name]);
    let containers: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(containers, ["runtime", "app"], "wrapped by the webhook");
    let source_ip = running_and_ready(&source_cluster, &name).await;
    let source_ambassador = source_cluster.pod_container(&name, "app");
    poll(
        "the source ambassador to relay the workload's ticks",
        Duration::from_secs(120),
        || {
            let n = ticks(&container_output(&source_ambassador)).len();
            async move { (n >= 20).then_some(()) }
        },
    )
    .await;
    // The nested container runs inside the runtime container, on the pod's IP.
    let (status, listed) =
        sidecar("GET", format!("http://{source_ip}:8888/containers"), None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed[0]["name"], "app");
    assert_eq!(listed[0]["state"], "running");

    // A passive copy in the other cluster: created, not started.
    destination_cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &service_pod(&name, interface, Some("passive"), 64).to_string(),
    );
    let destination_ip = running_and_ready(&destination_cluster, &name).await;
    assert_ne!(source_ip, destination_ip);
    poll(
        "the destination's nested container to be created (passive)",
        Duration::from_secs(120),
        || async {
            let (status, _) = sidecar(
                "GET",
                format!("http://{destination_ip}:8888/probe/app"),
                None,
            )
            .await;
            (status == 204).then_some(())
        },
    )
    .await;

    // The migration is locked in the source cluster: the user cannot change the pod.
    source_cluster.kubectl(
        User::Coordinator,
        &["annotate", "pod", &name, "migration-id=e2e-1"],
    );
    let refused = source_cluster
        .kubectl_result(User::Jane, &["label", "pod", &name, "tier=gold"])
        .unwrap_err();
    assert!(refused.contains("e2e-1"), "{refused}");

    // Migrate over the pod network, sidecar to sidecar.
    let last_at_source = ticks(&container_output(&source_ambassador))
        .last()
        .unwrap()
        .tick;
    let (status, report) = sidecar(
        "POST",
        format!("http://{source_ip}:8888/migrate"),
        Some(json!({"destination": format!("http://{destination_ip}:8888")})),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert!(
        report["totals"]["contentBytes"].as_u64().unwrap() > 64 << 20,
        "{report}"
    );

    // The workload continues in the destination pod: its ambassador relays the same counter.
    let destination_ambassador = destination_cluster.pod_container(&name, "app");
    let after = poll(
        "the destination ambassador to relay the continued counter",
        Duration::from_secs(120),
        || {
            let t = ticks(&container_output(&destination_ambassador));
            async move { (t.iter().filter(|t| t.tick > last_at_source).count() > 80).then_some(t) }
        },
    )
    .await;
    let continued: Vec<_> = after.iter().filter(|t| t.tick > last_at_source).collect();
    // Restored, not started afresh: the workload prints "start" once, when it starts (Podman's
    // restored log keeps the source's history, with that one line; Docker's starts empty).
    let starts = container_output(&destination_ambassador)
        .iter()
        .filter(|l| l.starts_with("start mib="))
        .count();
    assert!(
        starts <= 1,
        "the workload started afresh at the destination"
    );
    assert!(
        continued[0].tick < last_at_source + 2000,
        "the counter continues from the source's state: {:?}",
        continued[0]
    );
    for pair in continued.windows(2) {
        assert_eq!(pair[1].tick, pair[0].tick + 1, "gap in the relayed counter");
    }
    assert!(
        continued.iter().all(|t| t.memory_ok),
        "memory check at the destination"
    );
    // The file the workload wrote into its root fs before the migration is there (read from
    // the nested container's writable layer: the workload image has no shell or cat).
    let runtime = destination_cluster.pod_container(&name, "runtime");
    let engine = if interface == "pind" {
        "podman"
    } else {
        "docker"
    };
    let script = format!(
        "cat \"$({engine} inspect --format '{{{{.GraphDriver.Data.UpperDir}}}}' app)/workload-state.txt\""
    );
    let state = Command::new("docker")
        .args(["exec", &runtime, "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&state.stdout).starts_with("workload seed=42 mib=64"),
        "{}",
        String::from_utf8_lossy(&state.stderr)
    );
    // The source pod's nested containers are gone.
    let (_, listed) = sidecar("GET", format!("http://{source_ip}:8888/containers"), None).await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["state"] != "running"),
        "{listed}"
    );
    // The coordinator's part, by hand here: the destination becomes active, the source is
    // unlocked and deleted.
    destination_cluster.kubectl(
        User::Coordinator,
        &[
            "annotate",
            "--overwrite",
            "pod",
            &name,
            "migration-start-mode=active",
        ],
    );
    source_cluster.kubectl(
        User::Coordinator,
        &["annotate", "pod", &name, "migration-id-"],
    );
    source_cluster.kubectl(User::Jane, &["delete", "pod", &name, "--wait=false"]);
    let (status, probe) = sidecar(
        "GET",
        format!("http://{destination_ip}:8888/probe/app"),
        None,
    )
    .await;
    assert_eq!((status, probe["state"].as_str()), (200, Some("running")));
}

#[tokio::test(flavor = "multi_thread")]
async fn dind_pod_migrates_between_clusters() {
    migrates_between_clusters("dind").await
}

#[tokio::test(flavor = "multi_thread")]
async fn pind_pod_migrates_between_clusters() {
    migrates_between_clusters("pind").await
}
