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
use ums_contract::credential::Scope;
use ums_tests::cluster::{Cluster, User};
use ums_tests::poll;
use ums_tests::service_pod::{
    ask_service, container_output, service_pod, sidecar, sidecar_as, unbroken_connection,
    with_connection,
};
use ums_tests::workload::ticks;

/// Runs a shell command in a pod's runtime container (on the outer engine), returns stdout.
fn runtime_sh(runtime: &str, script: &str) -> String {
    let out = Command::new("docker")
        .args(["exec", runtime, "sh", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The counters of a journal's `tick=N` lines.
fn journal_ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tick=")?.parse().ok())
        .collect()
}

async fn running_and_ready(cluster: &Cluster, pod: &str) -> String {
    cluster
        .wait_running_and_ready(pod, Duration::from_secs(180))
        .await
}

/// Where the pod goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    /// A cluster whose pods pull from the registry, as the source's do.
    Pulls,
    /// An edge cluster whose pods cannot pull: the images travel with the migration.
    CannotPull,
}

/// A long-lived TCP connection inside the pod, from one container to another over the pod's
/// loopback (`with_connection`): both ends travel, so it must survive the migration.
type Connection<'a> = Option<(&'a str, &'a str)>;

async fn migrates_between_clusters(
    interface: &str,
    containers: &[(&str, u32)],
    destination: Destination,
    connection: Connection<'_>,
) {
    let source_cluster = Cluster::start_with_node();
    let destination_cluster = match destination {
        Destination::Pulls => Cluster::start_with_node(),
        Destination::CannotPull => Cluster::start_edge(),
    };
    let name = format!("service-{interface}-{}", containers.len());
    let names: Vec<&str> = containers.iter().map(|(n, _)| *n).collect();
    let pod_spec = |start_mode| {
        let pod = service_pod(&name, interface, start_mode, containers);
        match connection {
            Some((from, to)) => with_connection(pod, from, to),
            None => pod,
        }
    };
    // The port of the container at the receiving end of the connection (each container
    // answers on 8080 + its index).
    let sink_port =
        connection.map(|(_, to)| 8080 + names.iter().position(|n| *n == to).unwrap() as u16);

    // The user creates the pod; the admission chain wraps it; the node runs it.
    source_cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &pod_spec(None).to_string(),
    );
    let pod = source_cluster.get_json(&["pod", &name]);
    let wrapped: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let mut expected = vec!["runtime"];
    expected.extend(&names);
    assert_eq!(wrapped, expected, "wrapped by the webhook");
    let source_ip = running_and_ready(&source_cluster, &name).await;
    for container in &names {
        let ambassador = source_cluster.pod_container(&name, container);
        poll(
            &format!("the source ambassador of {container} to relay the workload's ticks"),
            Duration::from_secs(120),
            || {
                let n = ticks(&container_output(&ambassador)).len();
                async move { (n >= 20).then_some(()) }
            },
        )
        .await;
    }
    // The nested containers run inside the runtime container, on the pod's IP.
    // Only the coordinator may list and migrate: the tests play its part with its key.
    let source_token = source_cluster.sidecar_token(&source_ip, Scope::Coordinator, None);
    let (status, listed) =
        sidecar("GET", format!("http://{source_ip}:8888/containers"), None).await;
    assert_eq!(status, 401, "no credential, no access: {listed}");
    let (status, listed) = sidecar_as(
        Some(&source_token),
        "GET",
        format!("http://{source_ip}:8888/containers"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let mut running: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "running")
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    running.sort();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(running, sorted, "{listed}");
    let source_image_id = listed[0]["imageId"].as_str().unwrap().to_owned();

    // The service answers on the pod IP, on its own ports.
    let mut served_at_source = Vec::new();
    for i in 0..names.len() {
        let port = 8080 + i as u16;
        let answer = ask_service(&source_ip, port)
            .await
            .unwrap_or_else(|| panic!("nothing answers on {source_ip}:{port}"));
        assert!(answer.memory_ok);
        served_at_source.push(answer.tick);
    }
    // The connection inside the pod carries ticks.
    let mut sink_at_source = None;
    if let Some(port) = sink_port {
        let sink = unbroken_connection(
            &source_ip,
            port,
            100,
            "the connection inside the pod to carry ticks",
        )
        .await;
        sink_at_source = Some(sink);
    }

    // A passive copy in the other cluster, as the coordinator makes it: under the
    // migration's id (a peer's token opens only the migration the pod is under), created, not
    // started (or, where the image cannot be pulled, waiting for the migration to bring it).
    let mut copy = pod_spec(Some("passive"));
    copy["metadata"]["annotations"]["migration-id"] = json!("e2e-1");
    destination_cluster.kubectl_with_input(
        User::Coordinator,
        &["create", "-f", "-"],
        &copy.to_string(),
    );
    let destination_ip = running_and_ready(&destination_cluster, &name).await;
    assert_ne!(source_ip, destination_ip);
    for container in &names {
        poll(
            &format!("the destination's nested {container} to be created or awaiting (passive)"),
            Duration::from_secs(120),
            || async {
                let url = format!("http://{destination_ip}:8888/probe/{container}");
                (sidecar("GET", url, None).await.0 == 204).then_some(())
            },
        )
        .await;
    }

    // The migration is locked in the source cluster: the user cannot change the pod.
    source_cluster.kubectl(
        User::Coordinator,
        &["annotate", "pod", &name, "migration-id=e2e-1"],
    );
    let refused = source_cluster
        .kubectl_result(User::Jane, &["label", "pod", &name, "tier=gold"])
        .unwrap_err();
    assert!(refused.contains("e2e-1"), "{refused}");

    // The volume's content before the migration: a file written into it from outside the
    // service, and each workload's journal (which it keeps appending to, file open).
    let source_runtime = source_cluster.pod_container(&name, "runtime");
    runtime_sh(
        &source_runtime,
        "printf 'written before the migration\n' > /mount/state/marker && mkdir -p /mount/state/sub && ln -s ../marker /mount/state/sub/link",
    );
    let journals_at_source: Vec<String> = names
        .iter()
        .map(|c| runtime_sh(&source_runtime, &format!("cat /mount/state/journal-{c}")))
        .collect();
    for journal in &journals_at_source {
        assert!(journal.starts_with("tick=0\n"), "{journal}");
    }

    // Migrate over the pod network, sidecar to sidecar.
    let last_at_source: Vec<u64> = names
        .iter()
        .map(|container| {
            let ambassador = source_cluster.pod_container(&name, container);
            ticks(&container_output(&ambassador)).last().unwrap().tick
        })
        .collect();
    // A token for another pod, or the destination's token, does not open the source.
    let (status, refused) = sidecar_as(
        Some(&source_cluster.sidecar_token(&destination_ip, Scope::Coordinator, None)),
        "POST",
        format!("http://{source_ip}:8888/migrate"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 401, "{refused}");
    let peer_token = destination_cluster.sidecar_token(&destination_ip, Scope::Peer, Some("e2e-1"));
    let (status, refused) = sidecar_as(
        Some(&peer_token),
        "GET",
        format!("http://{destination_ip}:8888/containers"),
        None,
    )
    .await;
    assert_eq!(
        status, 403,
        "a peer's token opens the restore only: {refused}"
    );
    // Sidecar to sidecar is TLS: the destination takes a peer's token over TLS only, and the
    // source accepts only the certificate the destination's GET /tls names.
    let (status, refused) = sidecar_as(
        Some(&peer_token),
        "GET",
        format!("http://{destination_ip}:8888/info"),
        None,
    )
    .await;
    assert_eq!(status, 403, "a peer's token over plain HTTP: {refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("TLS"),
        "{refused}"
    );
    let (status, tls) = sidecar("GET", format!("http://{destination_ip}:8888/tls"), None).await;
    assert_eq!(status, 200, "{tls}");
    let pin = tls["certificateSha256"].as_str().unwrap().to_owned();
    let (_, source_tls) = sidecar("GET", format!("http://{source_ip}:8888/tls"), None).await;
    let wrong_pin = source_tls["certificateSha256"].as_str().unwrap().to_owned();
    assert_ne!(pin, wrong_pin, "each sidecar makes its own certificate");
    let (status, refused) = sidecar_as(
        Some(&source_token),
        "POST",
        format!("http://{source_ip}:8888/migrate"),
        Some(json!({
            "destination": format!("https://{destination_ip}:8888"),
            "destinationToken": peer_token,
            "destinationCertificateSha256": wrong_pin,
        })),
    )
    .await;
    assert_eq!(
        status, 502,
        "another certificate than the pinned one: {refused}"
    );
    assert_eq!(refused["detail"]["sourceState"], "untouched", "{refused}");
    let (status, report) = sidecar_as(
        Some(&source_token),
        "POST",
        format!("http://{source_ip}:8888/migrate"),
        Some(json!({
            "destination": format!("https://{destination_ip}:8888"),
            "destinationToken": peer_token,
            "destinationCertificateSha256": pin,
            "migrationId": "e2e-1",
        })),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["migrationId"], "e2e-1",
        "the caller's migration id: {report}"
    );
    assert_eq!(report["containers"].as_array().unwrap().len(), names.len());
    let memory: u64 = containers
        .iter()
        .map(|(_, mib)| u64::from(*mib) << 20)
        .sum();
    assert!(
        report["totals"]["contentBytes"].as_u64().unwrap() > memory,
        "{report}"
    );
    // The images went along exactly when the destination could not pull them.
    let sent = report["images"].as_array().unwrap();
    match destination {
        Destination::Pulls => assert!(sent.is_empty(), "{report}"),
        Destination::CannotPull => {
            assert_eq!(sent.len(), 1, "one image for every container: {report}");
            assert_eq!(sent[0]["imageId"], source_image_id.as_str(), "{report}");
        }
    }

    // Both ends of the connection inside the pod were carried and kept (their addresses, the
    // pod's loopback, exist at the destination); no other container holds one.
    for container in report["containers"].as_array().unwrap() {
        let connected = connection
            .is_some_and(|(from, to)| container["name"] == from || container["name"] == to);
        if connected {
            assert_eq!(container["tcpConnections"], 1, "{report}");
            assert_eq!(container["tcp"], "kept", "{report}");
        } else {
            assert_eq!(container["tcpConnections"], 0, "{report}");
        }
    }

    // The emptyDir travelled, by default; the report says how much of it.
    let volumes = report["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 1, "{report}");
    assert_eq!(volumes[0]["name"], "state");
    assert_eq!(volumes[0]["kind"], "emptyDir");
    assert!(volumes[0]["bytes"].as_u64().unwrap() > 0, "{report}");

    let runtime = destination_cluster.pod_container(&name, "runtime");
    assert_eq!(
        runtime_sh(&runtime, "cat /mount/state/sub/link"),
        "written before the migration\n"
    );
    let engine = if interface == "pind" {
        "podman"
    } else {
        "docker"
    };
    for ((container, mib), last) in containers.iter().zip(&last_at_source) {
        let last = *last;
        // The workload continues in the destination pod: its ambassador relays the counter.
        let ambassador = destination_cluster.pod_container(&name, container);
        let after = poll(
            &format!("the destination ambassador of {container} to relay the continued counter"),
            Duration::from_secs(120),
            || {
                let t = ticks(&container_output(&ambassador));
                async move { (t.iter().filter(|t| t.tick > last).count() > 80).then_some(t) }
            },
        )
        .await;
        let continued: Vec<_> = after.iter().filter(|t| t.tick > last).collect();
        // Restored, not started afresh: the workload prints "start" once, when it starts
        // (Podman's restored log keeps the source's history with that line; Docker's is empty).
        let starts = container_output(&ambassador)
            .iter()
            .filter(|l| l.starts_with("start mib="))
            .count();
        assert!(starts <= 1, "{container} started afresh at the destination");
        assert!(
            continued[0].tick < last + 2000,
            "{container}: the counter continues from the source's state: {:?}",
            continued[0]
        );
        for pair in continued.windows(2) {
            assert_eq!(
                pair[1].tick,
                pair[0].tick + 1,
                "{container}: gap in the counter"
            );
        }
        assert!(
            continued.iter().all(|t| t.memory_ok),
            "{container}: memory check at the destination"
        );
        // The file the workload wrote into its root fs before the migration is there (read
        // from the nested container's writable layer: the workload image has no shell or cat).
        let script = format!(
            "cat \"$({engine} inspect --format '{{{{.GraphDriver.Data.UpperDir}}}}' {container})/workload-state.txt\""
        );
        let state = Command::new("docker")
            .args(["exec", &runtime, "sh", "-c", &script])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&state.stdout)
                .starts_with(&format!("workload seed=42 mib={mib}")),
            "{}",
            String::from_utf8_lossy(&state.stderr)
        );
    }
    // Each journal in the volume holds what it held at the source and goes on from there,
    // written by the restored process through the descriptor it kept open.
    for ((container, at_source), last) in names.iter().zip(&journals_at_source).zip(&last_at_source)
    {
        let path = format!("/mount/state/journal-{container}");
        let journal = poll(
            &format!("{container}'s journal to go on at the destination"),
            Duration::from_secs(60),
            || {
                let text = runtime_sh(&runtime, &format!("cat {path}"));
                let last = *last;
                async move {
                    let ticks = journal_ticks(&text);
                    (ticks.last().is_some_and(|t| *t > last + 100)).then_some(text)
                }
            },
        )
        .await;
        assert!(
            journal.starts_with(at_source.as_str()),
            "{container}: the journal lost what it held at the source"
        );
        let ticks = journal_ticks(&journal);
        for pair in ticks.windows(2) {
            assert_eq!(pair[1], pair[0] + 50, "{container}: gap in the journal");
        }
    }

    // The service answers on the destination pod's IP, with the counter it had (and more).
    for (i, at_source) in served_at_source.iter().enumerate() {
        let port = 8080 + i as u16;
        let answer = ask_service(&destination_ip, port)
            .await
            .unwrap_or_else(|| panic!("nothing answers on {destination_ip}:{port}"));
        assert!(
            answer.memory_ok && answer.tick > *at_source,
            "{answer:?} after {at_source}"
        );
        assert!(
            ask_service(&source_ip, port).await.is_none(),
            "the source pod must not serve any more"
        );
    }
    // The same connection goes on at the destination: still the one connection accepted at
    // the source, never closed, every tick line after the last one, none missing.
    if let (Some(port), Some(at_source)) = (sink_port, sink_at_source) {
        // The same connection: it did not survive the migration otherwise.
        unbroken_connection(
            &destination_ip,
            port,
            at_source.lines + 100,
            "the connection inside the pod to go on at the destination",
        )
        .await;
    }
    // The source pod's nested containers are gone.
    let (_, listed) = sidecar_as(
        Some(&source_token),
        "GET",
        format!("http://{source_ip}:8888/containers"),
        None,
    )
    .await;
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
            "migration-id-",
        ],
    );
    source_cluster.kubectl(
        User::Coordinator,
        &["annotate", "pod", &name, "migration-id-"],
    );
    source_cluster.kubectl(User::Jane, &["delete", "pod", &name, "--wait=false"]);
    for container in &names {
        let url = format!("http://{destination_ip}:8888/probe/{container}");
        let (status, probe) = sidecar("GET", url, None).await;
        assert_eq!((status, probe["state"].as_str()), (200, Some("running")));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dind_pod_migrates_between_clusters() {
    migrates_between_clusters("dind", &[("app", 64)], Destination::Pulls, None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn pind_pod_migrates_to_a_cluster_that_cannot_pull_its_image() {
    migrates_between_clusters("pind", &[("app", 64)], Destination::CannotPull, None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_container_dind_pod_with_a_live_connection_migrates_to_a_cluster_that_cannot_pull_its_image(
) {
    migrates_between_clusters(
        "dind",
        &[("front", 16), ("back", 48)],
        Destination::CannotPull,
        Some(("front", "back")),
    )
    .await
}
