//! The service-level interface (`migration-interface: ff`) on CRI clusters, through the real
//! images: a service built FROM the ff base image (`images/ff`, its entrypoint `ums-ff`),
//! admitted by the webhook without privilege, moved by one `POST /migrate` with its memory, its
//! counter, its journal in an emptyDir and a root-fs file, keeping its PIDs; then back by a
//! `LiveMigration` (a second hop). And what is refused before anything is frozen.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use serde_json::{json, Value};
use ums_tests::cluster::{Cluster, User};
use ums_tests::coordinator::{live_migration, TwoClusters};
use ums_tests::service_pod::ask_service;
use ums_tests::workload::{
    ff_workload_image, journal_goes_on, journal_ticks, tls_registry_workload_image,
};

/// An ff pod running the workload with `mib` MiB of checked memory; `mark` is an environment
/// variable that finds its process on this machine.
fn ff_pod(name: &str, image: &str, mark: &str) -> Value {
    ff_pod_of(name, image, mark, 32)
}

fn ff_pod_of(name: &str, image: &str, mark: &str, mib: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name},
                     "annotations": {"migration-interface": "ff"}},
        "spec": {"containers": [
            {"name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
             "env": [{"name": "WORKLOAD_MIB", "value": mib.to_string()},
                     {"name": "WORKLOAD_LISTEN", "value": "8080"},
                     {"name": "WORKLOAD_JOURNAL", "value": "/data/journal"},
                     {"name": "UMS_FF_PRESERVE", "value": "/workload-state.txt"},
                     {"name": "FF_TEST_MARK", "value": mark}],
             "volumeMounts": [{"name": "data", "mountPath": "/data"}],
             "readinessProbe": {"tcpSocket": {"port": 8080}}}
        ],
        "volumes": [{"name": "data", "emptyDir": {}}]}
    })
}

/// What this machine sees of the workload process marked `mark`: (its PID in its container,
/// its /proc status).
fn workload_process(mark: &str) -> Option<(u32, String)> {
    let needle = format!("FF_TEST_MARK={mark}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        if !cmdline.starts_with(b"/usr/local/bin/workload") {
            continue;
        }
        let environ = std::fs::read(path.join("environ")).unwrap_or_default();
        if !environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).ok()?;
        let inner: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))?
            .split_whitespace()
            .last()?
            .parse()
            .ok()?;
        return Some((inner, status));
    }
    None
}

fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or("")
        .trim()
}

/// The capabilities of a CapEff mask, by number.
fn capabilities(mask: &str) -> Vec<u32> {
    let bits = u64::from_str_radix(mask, 16).unwrap();
    (0..64).filter(|b| bits & (1 << b) != 0).collect()
}

/// The restored process has the privileges the webhook gave the container, nothing more:
/// CHECKPOINT_RESTORE (40), SETPCAP (8), SYS_PTRACE (19); never SYS_ADMIN (21); no new
/// privileges; seccomp unconfined (what CRIU needs from inside the container).
fn assert_least_privilege(status: &str) {
    let caps = capabilities(status_field(status, "CapEff:"));
    for needed in [40, 8, 19] {
        assert!(caps.contains(&needed), "capability {needed} in {caps:?}");
    }
    assert!(!caps.contains(&21), "no SYS_ADMIN: {caps:?}");
    assert_eq!(status_field(status, "NoNewPrivs:"), "1", "{status}");
    assert_eq!(status_field(status, "Seccomp:"), "0", "{status}");
}

fn import_ff_images(clusters: &[&Cluster]) {
    let image = ff_workload_image();
    for cluster in clusters {
        cluster.cri_node_import(image);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ff_service_moves_between_clusters_and_back_with_its_state_and_pids() {
    let two = TwoClusters::start_with_cri_nodes();
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        ..
    } = &two;
    import_ff_images(&[edge, cloud]);
    let mark = format!("hop-{}", std::process::id());
    let pod = ff_pod("service", ff_workload_image(), &mark);
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let source_ip = edge
        .wait_running_and_ready("service", Duration::from_secs(180))
        .await;

    // Admitted without privilege: what the webhook gave the container.
    let spec = edge.get_json(&["pod", "service"])["spec"]["containers"][0].clone();
    let security = &spec["securityContext"];
    assert_eq!(security["seccompProfile"]["type"], "Unconfined", "{spec}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{spec}");
    assert!(security["privileged"].is_null(), "{spec}");
    let added: Vec<&str> = security["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        added,
        ["CHECKPOINT_RESTORE", "SETPCAP", "SYS_PTRACE"],
        "{spec}"
    );
    let (pid_before, status) = workload_process(&mark).expect("the workload runs");
    assert!(
        pid_before > 1000,
        "the service lives above the first PID: {pid_before}"
    );
    assert_least_privilege(&status);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = ask_service(&source_ip, 8080).await.unwrap();
    let journal = edge.empty_dir("service", "data").join("journal");
    let journaled = journal_ticks(&journal);
    assert!(
        !journaled.is_empty(),
        "the journal has lines before the move"
    );

    let (status, report) = two
        .migrate(json!({"name": "service", "destinationUrl": two.destination}))
        .await;
    assert_eq!(status, 200, "{report}\n{}", two.coordinator_logs());
    // The figures the README quotes (run with --nocapture).
    eprintln!("ff report: {report}");
    assert_eq!(report["migrationInterface"], "ff", "{report}");
    let details = &report["sidecar"];
    assert!(details["totals"]["downtimeMs"].is_u64(), "{report}");
    assert_eq!(details["volumes"][0]["name"], "data", "{report}");
    assert_eq!(
        details["rootfsFiles"],
        json!(["/workload-state.txt"]),
        "{report}"
    );
    let ip = report["destination"]["podIp"].as_str().unwrap().to_owned();
    let after = ask_service(&ip, 8080).await.unwrap();
    assert!(after.memory_ok, "{after:?}");
    assert!(after.tick > before.tick, "{before:?} -> {after:?}");
    assert!(
        edge.kubectl_result(User::Admin, &["get", "pod", "service"])
            .is_err(),
        "the source pod is deleted"
    );
    // The same process: its PID in its container, its privileges.
    let (pid_after, status) =
        workload_process(&mark).expect("the workload runs at the destination");
    assert_eq!(
        pid_after, pid_before,
        "CRIU restores the PIDs the service had"
    );
    assert_least_privilege(&status);
    let cloud_journal = cloud.empty_dir("service", "data").join("journal");
    journal_goes_on(&cloud_journal, *journaled.last().unwrap()).await;
    let journaled_in_cloud = journal_ticks(&cloud_journal);

    // And back, by a LiveMigration object in cloud: a second hop.
    let status = live_migration(
        cloud,
        "back-to-edge",
        json!({"pod": "service", "destination": edge_coordinator.pod_network_address}),
        Duration::from_secs(240),
    )
    .await;
    assert_eq!(
        status["phase"],
        "Succeeded",
        "{status}\n{}",
        two.coordinator_logs()
    );
    let back_ip = edge
        .wait_running_and_ready("service", Duration::from_secs(60))
        .await;
    let back = ask_service(&back_ip, 8080).await.unwrap();
    assert!(back.memory_ok, "{back:?}");
    assert!(back.tick > after.tick, "{after:?} -> {back:?}");
    let (pid_back, _) = workload_process(&mark).expect("the workload runs at edge again");
    assert_eq!(pid_back, pid_before);
    let back_journal = edge.empty_dir("service", "data").join("journal");
    journal_goes_on(&back_journal, *journaled_in_cloud.last().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_migrate_as_ff_is_refused_before_anything_is_frozen() {
    let two = TwoClusters::start_with_cri_nodes();
    let edge = &two.edge;
    // An image not built on the ff base: nothing answers for the service; refused while
    // checking, the pod not locked and still serving.
    let plain = tls_registry_workload_image();
    let mut pod = ff_pod("plain", plain, "plain");
    // Its probes would go to the ums-ff it does not have (connection refused): it has none.
    pod["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("readinessProbe");
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let ip = edge
        .wait_running_and_ready("plain", Duration::from_secs(180))
        .await;
    // Without a readiness probe the pod is ready before the workload listens (it fills its
    // memory first): wait for its answer.
    let before = ums_tests::poll(
        "the plain service to answer",
        Duration::from_secs(60),
        || async { ask_service(&ip, 8080).await },
    )
    .await;
    let (status, answer) = two
        .migrate(json!({"name": "plain", "destinationUrl": two.destination}))
        .await;
    assert_eq!(status, 409, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("ums-rs/ff") && error.contains("io.ums-rs.ff-base"),
        "{answer}"
    );
    assert_eq!(answer["phase"], "checking", "{answer}");
    let annotations = edge.get_json(&["pod", "plain"])["metadata"]["annotations"].clone();
    assert!(
        annotations["migration-id"].is_null(),
        "not locked: {annotations}"
    );
    let later = ask_service(&ip, 8080).await.unwrap();
    assert!(later.tick > before.tick && later.memory_ok, "{later:?}");

    // A pod of two containers is refused at admission, naming why.
    let mut two_containers = ff_pod("pair", plain, "pair");
    let second = two_containers["spec"]["containers"][0].clone();
    let mut second = second;
    second["name"] = json!("second");
    two_containers["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(second);
    let refused = edge
        .kubectl_with_input_result(
            User::Jane,
            &["create", "-f", "-"],
            &two_containers.to_string(),
        )
        .unwrap_err();
    assert!(refused.contains("one container"), "{refused}");

    // ums-ff takes no call without a credential, and none from another cluster's coordinator.
    import_ff_images(&[edge]);
    let pod = ff_pod("service", ff_workload_image(), "auth");
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let ip = edge
        .wait_running_and_ready("service", Duration::from_secs(180))
        .await;
    let client = reqwest::Client::new();
    let url = format!("http://{ip}:8888/migrate");
    let anonymous = client
        .post(&url)
        .json(&json!({"destination": "http://127.0.0.1:1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("credential"),
        "{body}"
    );
    let forged = client
        .post(&url)
        .bearer_auth("ums1.not-a-token.at-all")
        .json(&json!({"destination": "http://127.0.0.1:1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    // Still running, never frozen.
    let health: Value = client
        .get(format!("http://{ip}:8888/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["phase"], "running", "{health}");
    assert!(ask_service(&ip, 8080).await.unwrap().memory_ok);
}

/// Starts edge's `POST /migrate` of `service` and waits until the copy's ums-ff receives the
/// archive (its phase turns migrating); the call's handle and the copy's pod.
async fn migrate_until_the_archive_arrives(
    two: &TwoClusters,
) -> (
    tokio::task::JoinHandle<Result<(u16, Value), reqwest::Error>>,
    Value,
) {
    let call = two.migrate_to_cloud_in_background("service");
    let copy = ums_tests::poll(
        "the archive to arrive at the copy",
        Duration::from_secs(180),
        || async {
            let pod: Value = serde_json::from_str(
                &two.cloud
                    .kubectl_result(User::Admin, &["get", "pod", "service", "-o", "json"])
                    .ok()?,
            )
            .ok()?;
            let ip = pod["status"]["podIP"].as_str()?;
            let health: Value = reqwest::get(format!("http://{ip}:8888/healthz"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (health["phase"] == "migrating").then_some(pod)
        },
    )
    .await;
    (call, copy)
}

/// One copy, at the source: unlocked, the same process (`pid`) going on past `tick` with its
/// memory, the copy deleted.
async fn still_at_the_source(two: &TwoClusters, source_ip: &str, mark: &str, pid: u32, tick: u64) {
    let annotations = two.edge.get_json(&["pod", "service"])["metadata"]["annotations"].clone();
    assert!(
        annotations["migration-id"].is_null(),
        "unlocked: {annotations}"
    );
    let after = ums_tests::poll(
        "the service to answer at the source",
        Duration::from_secs(60),
        || async { ask_service(source_ip, 8080).await.filter(|a| a.tick > tick) },
    )
    .await;
    assert!(after.memory_ok, "{after:?}");
    let (pid_after, _) = workload_process(mark).expect("the workload runs at the source");
    assert_eq!(pid_after, pid, "resumed, not restarted");
    ums_tests::poll(
        "the copy to be deleted",
        Duration::from_secs(120),
        || async {
            two.cloud
                .kubectl_result(User::Admin, &["get", "pod", "service"])
                .is_err()
                .then_some(())
        },
    )
    .await;
}

/// A migration stopped while the archive arrives, twice: by an operator's abort, then by the
/// destination's container dying. Each time the source's ums-ff resumes the service where it
/// froze it (same process, memory and counter going on), the coordinator's answer says the
/// service runs at the source, and the copy is deleted. The link out of edge's node is slowed
/// so that the archive of 256 MiB takes long enough to be cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_stopped_mid_transfer_leaves_the_service_running_at_the_source() {
    let two = TwoClusters::start_with_cri_nodes();
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        ..
    } = &two;
    import_ff_images(&[edge, cloud]);
    let mark = format!("cut-{}", std::process::id());
    let pod = ff_pod_of("service", ff_workload_image(), &mark, 256);
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let source_ip = edge
        .wait_running_and_ready("service", Duration::from_secs(180))
        .await;
    let (pid, _) = workload_process(&mark).expect("the workload runs");
    let before = ums_tests::poll(
        "the service to fill its memory",
        Duration::from_secs(60),
        || async { ask_service(&source_ip, 8080).await.filter(|a| a.memory_ok) },
    )
    .await;
    // 40 Mbit/s out of edge's node: the archive takes most of a minute.
    edge.cri_node_exec(&[
        "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "40mbit", "burst", "256kb",
        "latency", "200ms",
    ]);

    // An operator's abort while the archive arrives.
    let (call, _) = migrate_until_the_archive_arrives(&two).await;
    let (_, status, answer) = two.abort_edge_migration().await;
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert_eq!(
        status,
        409,
        "{answer}\n--- edge coordinator:\n{}",
        edge_coordinator.log()
    );
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("aborted by an operator"),
        "{answer}"
    );
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");
    still_at_the_source(&two, &source_ip, &mark, pid, before.tick).await;
    let between = ask_service(&source_ip, 8080).await.unwrap();

    // The destination's container killed while the archive arrives.
    let (call, copy) = migrate_until_the_archive_arrives(&two).await;
    let id = copy["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap()
        .trim_start_matches("containerd://")
        .to_owned();
    cloud.cri_node_exec(&["ctr", "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", &id]);
    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert_eq!(
        status,
        502,
        "{answer}\n--- edge coordinator:\n{}",
        edge_coordinator.log()
    );
    assert_eq!(answer["phase"], "migrating", "{answer}");
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");
    still_at_the_source(&two, &source_ip, &mark, pid, between.tick).await;
    edge.cri_node_exec(&["tc", "qdisc", "del", "dev", "eth0", "root"]);
}
