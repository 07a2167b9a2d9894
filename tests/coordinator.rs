//! End to end, as operators run it: two clusters (the test API server, the real webhook image,
//! a node agent each), a `ums-coordinator` in each with its own certificate, trusting the
//! other's CA. One UMS-style call on the source cluster's coordinator moves a wrapped pod to
//! the other cluster: the coordinators create the passive copy, the sidecars move the state
//! over the pod network, the copy becomes active, the source pod is deleted.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use serde_json::json;
use ums_tests::cluster::{Cluster, User};
use ums_tests::coordinator::{live_migration, CoordinatorCerts, Credential, RunningCoordinator};
use ums_tests::poll;
use ums_tests::service_pod::{ask_service, container_output, service_pod};
use ums_tests::workload::{registry_workload_image, ticks};

fn annotation(cluster: &Cluster, pod: &str, key: &str) -> Option<String> {
    cluster.get_json(&["pod", pod])["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_owned)
}

/// Until pod `name` exists in `cluster` (`present`) or is gone, for at most `within`.
async fn wait_pod(cluster: &Cluster, name: &str, present: bool, within: Duration, what: &str) {
    poll(what, within, || async {
        (cluster
            .kubectl_result(User::Admin, &["get", "pod", name])
            .is_ok()
            == present)
            .then_some(())
    })
    .await;
}

/// Starts the UMS call `body` on `coordinator` in the background and returns it once `cloud`
/// holds the copy `name`: the moment to kill a coordinator mid-migration.
async fn migrate_until_copy(
    coordinator: &RunningCoordinator,
    ca: &std::path::Path,
    body: &serde_json::Value,
    cloud: &Cluster,
    name: &str,
) -> tokio::task::JoinHandle<Result<(u16, serde_json::Value), reqwest::Error>> {
    let call = tokio::spawn({
        let (address, ca, token, body) = (
            coordinator.address.clone(),
            ca.to_owned(),
            Credential::Bearer(coordinator.api_token.clone()),
            body.clone(),
        );
        async move {
            ums_tests::coordinator::call_result(
                &address,
                &ca,
                &token,
                "POST",
                "/migrate",
                Some(body),
            )
            .await
        }
    });
    wait_pod(
        cloud,
        name,
        true,
        Duration::from_secs(60),
        "cloud's coordinator to create the copy",
    )
    .await;
    call
}

/// A user's 64 MiB service pod in `cluster`, wrapped for `interface`, running and relaying its
/// ticks; its pod IP and its ambassador's outer container.
async fn start_service(cluster: &Cluster, name: &str, interface: &str) -> (String, String) {
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &service_pod(name, interface, None, &[("app", 64)]).to_string(),
    );
    let ip = cluster
        .wait_running_and_ready(name, Duration::from_secs(180))
        .await;
    let ambassador = cluster.pod_container(name, "app");
    poll(
        "the source ambassador to relay the workload's ticks",
        Duration::from_secs(120),
        || {
            let n = ticks(&container_output(&ambassador)).len();
            async move { (n >= 20).then_some(()) }
        },
    )
    .await;
    (ip, ambassador)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_ums_call_migrates_a_dind_pod_to_another_cluster() {
    let edge = Cluster::start_with_node();
    let cloud = Cluster::start_with_node();
    let edge_certs = CoordinatorCerts::generate(&edge);
    let cloud_certs = CoordinatorCerts::generate(&cloud);
    let edge_coordinator = RunningCoordinator::start(&edge, &edge_certs, &[&cloud_certs.ca]);
    let cloud_coordinator = RunningCoordinator::start(&cloud, &cloud_certs, &[&edge_certs.ca]);
    let call = |method: &'static str, path: &'static str, body| {
        edge_coordinator.call(&edge_certs.ca, method, path, body)
    };

    // The coordinators know each other: the peer's identity over verified TLS.
    let (status, identity) = cloud_coordinator
        .call(&cloud_certs.ca, "GET", "/", None)
        .await;
    assert_eq!(status, 200, "{identity}");
    assert_eq!(identity["cluster"], cloud.name.as_str());

    let name = "service";
    let (source_ip, ambassador) = start_service(&edge, name, "dind").await;
    let at_source = ask_service(&source_ip, 8080).await.unwrap();
    assert!(at_source.memory_ok);

    // Bad requests are the caller's errors, named.
    let (status, answer) = call("POST", "/migrate", Some(json!({}))).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("name"),
        "{answer}"
    );
    let (status, answer) = call("POST", "/migrate", Some(json!({"name": name}))).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("destinationUrl"),
        "{answer}"
    );
    let destination = cloud_coordinator.address.clone();
    let (status, answer) = call(
        "POST",
        "/migrate",
        Some(json!({"name": "absent", "destinationUrl": destination})),
    )
    .await;
    assert_eq!(status, 404, "{answer}");

    // A pod already under migration: 409, and left as it was.
    edge.kubectl(
        User::Coordinator,
        &["annotate", "pod", name, "migration-id=other"],
    );
    let (status, answer) = call(
        "POST",
        "/migrate",
        Some(json!({"name": name, "destinationUrl": destination})),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("being migrated"),
        "{answer}"
    );
    assert_eq!(
        annotation(&edge, name, "migration-id").as_deref(),
        Some("other")
    );
    edge.kubectl(
        User::Coordinator,
        &["annotate", "pod", name, "migration-id-"],
    );

    // A pod a controller owns is refused, naming the owner.
    let mut owned = service_pod("owned", "dind", Some("null"), &[("app", 1)]);
    owned["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "service-7d9f",
        "uid": "6f1c2d3e-0000-4000-8000-000000000001", "controller": true
    }]);
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &owned.to_string());
    let (status, answer) = call(
        "POST",
        "/migrate",
        Some(json!({"name": "owned", "destinationUrl": destination})),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("ReplicaSet service-7d9f"),
        "{answer}"
    );

    // Who may call what: operators (the API token) start migrations; peers (mutual TLS)
    // create, restore and delete copies; a credential on the wrong side is a 403.
    let migrate_body = json!({"name": name, "destinationUrl": destination});
    let (status, answer) = edge_coordinator
        .call_as(
            &edge_certs.ca,
            &Credential::None,
            "POST",
            "/migrate",
            Some(migrate_body.clone()),
        )
        .await;
    assert_eq!(status, 401, "no credential: {answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("operator"),
        "{answer}"
    );
    let (status, answer) = edge_coordinator
        .call_as(
            &edge_certs.ca,
            &Credential::None,
            "GET",
            "/migrations",
            None,
        )
        .await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = edge_coordinator
        .call_as(
            &edge_certs.ca,
            &Credential::Bearer(cloud_coordinator.api_token.clone()),
            "POST",
            "/migrate",
            Some(migrate_body.clone()),
        )
        .await;
    assert_eq!(status, 401, "another cluster's operator token: {answer}");
    let as_edge_peer = Credential::ClientCertificate {
        cert: edge_certs.cert.clone(),
        key: edge_certs.key.clone(),
    };
    let (status, answer) = cloud_coordinator
        .call_as(
            &cloud_certs.ca,
            &as_edge_peer,
            "POST",
            "/migrate",
            Some(migrate_body.clone()),
        )
        .await;
    assert_eq!(status, 403, "a peer may not start migrations: {answer}");
    let create_body =
        json!({"migrationId": "m0", "namespace": "default", "pod": {"metadata": {"name": "x"}}});
    let (status, answer) = cloud_coordinator
        .call_as(
            &cloud_certs.ca,
            &Credential::None,
            "POST",
            "/create",
            Some(create_body.clone()),
        )
        .await;
    assert_eq!(
        status, 401,
        "/create without a client certificate: {answer}"
    );
    let (status, answer) = cloud_coordinator
        .call(
            &cloud_certs.ca,
            "POST",
            "/create",
            Some(create_body.clone()),
        )
        .await;
    assert_eq!(status, 403, "an operator may not create copies: {answer}");
    let (status, answer) = cloud_coordinator
        .call_as(
            &cloud_certs.ca,
            &as_edge_peer,
            "POST",
            "/restore",
            Some(json!({"migrationId": "m0", "namespace": "default", "name": name})),
        )
        .await;
    assert_eq!(
        status, 401,
        "/restore without the migration's credential: {answer}"
    );
    // (The peers' own calls with their certificates and credentials are the migrations below.)

    // The destination coordinator is killed while it creates the copy: the source rolls back
    // (the service never stopped), and the restarted coordinator deletes the abandoned copy.
    let killed = migrate_until_copy(
        &edge_coordinator,
        &edge_certs.ca,
        &migrate_body,
        &cloud,
        name,
    )
    .await;
    cloud_coordinator.kill();
    let (status, answer) = killed
        .await
        .unwrap()
        .expect("edge's coordinator answers the call");
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["phase"], "creating", "{answer}");
    let rollback = answer["rollback"].to_string();
    assert!(rollback.contains("source pod unlocked"), "{answer}");
    assert!(
        rollback.contains("FAILED to delete the destination pod"),
        "{answer}"
    );
    assert_eq!(annotation(&edge, name, "migration-id"), None);
    let still = ask_service(&source_ip, 8080).await.unwrap();
    assert!(still.memory_ok && still.tick > at_source.tick);
    assert_eq!(
        annotation(&cloud, name, "migration-start-mode").as_deref(),
        Some("passive"),
        "the copy is left while cloud's coordinator is down"
    );
    cloud_coordinator.restart();
    wait_pod(
        &cloud,
        name,
        false,
        Duration::from_secs(120),
        "the restarted coordinator to delete the abandoned copy",
    )
    .await;
    assert!(
        cloud_coordinator
            .log()
            .contains("deleted a passive copy abandoned by a restart"),
        "{}",
        cloud_coordinator.log()
    );

    // Now the source's coordinator is killed while the copy is made: the destination sees its
    // caller gone and deletes the copy; the restarted source coordinator finds the pod it had
    // locked, asks its sidecar, and unlocks it (the service never stopped).
    let orphaned = migrate_until_copy(
        &edge_coordinator,
        &edge_certs.ca,
        &migrate_body,
        &cloud,
        name,
    )
    .await;
    edge_coordinator.kill();
    assert!(
        orphaned.await.unwrap().is_err(),
        "the caller's connection broke"
    );
    assert!(
        annotation(&edge, name, "migration-id").is_some(),
        "locked by the dead coordinator"
    );
    wait_pod(
        &cloud,
        name,
        false,
        Duration::from_secs(120),
        "cloud's coordinator to delete the copy its caller abandoned",
    )
    .await;
    edge_coordinator.restart();
    poll(
        "the restarted source coordinator to unlock the pod",
        Duration::from_secs(60),
        || async {
            annotation(&edge, name, "migration-id")
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        edge_coordinator
            .log()
            .contains("unlocked a pod whose migration stopped with the coordinator"),
        "{}",
        edge_coordinator.log()
    );
    let still = ask_service(&source_ip, 8080).await.unwrap();
    assert!(still.memory_ok && still.tick > at_source.tick);

    // A destination that refuses (a pod of that name is there already): nothing is frozen,
    // the service keeps running at the source, unlocked, and nothing is left at the
    // destination but what was there.
    let squatter = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "other", "image": registry_workload_image(), "args": ["1", "7"]}]}
    });
    cloud.kubectl_with_input(User::Jane, &["create", "-f", "-"], &squatter.to_string());
    let (status, answer) = call(
        "POST",
        "/migrate",
        Some(json!({"name": name, "destinationUrl": destination})),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["phase"], "creating", "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("already exists"),
        "{answer}"
    );
    assert!(
        answer["rollback"]
            .to_string()
            .contains("source pod unlocked"),
        "{answer}"
    );
    assert_eq!(annotation(&edge, name, "migration-id"), None);
    let still = ask_service(&source_ip, 8080).await.unwrap();
    assert!(still.memory_ok && still.tick > at_source.tick);
    assert!(
        cloud.get_json(&["pod", name])["metadata"]["annotations"]["migration-id"].is_null(),
        "the destination's own pod is untouched"
    );
    cloud.kubectl(
        User::Jane,
        &["delete", "pod", name, "--wait=true", "--timeout=120s"],
    );

    // The UMS call: destinationUrl as UMS writes it (host:port, no scheme).
    let last_at_source = ticks(&container_output(&ambassador)).last().unwrap().tick;
    let (status, report) = call(
        "POST",
        "/migrate",
        Some(json!({"name": name, "namespace": "default", "destinationUrl": destination})),
    )
    .await;
    assert_eq!(
        status,
        200,
        "{report}\n--- edge coordinator:\n{}\n--- cloud coordinator:\n{}",
        edge_coordinator.log(),
        cloud_coordinator.log()
    );
    assert_eq!(report["message"], "migration complete!");
    let id = report["migration_id"].as_str().unwrap().to_owned();
    assert_eq!(report["migrationId"], id.as_str());
    assert_eq!(report["migrationInterface"], "dind");
    assert_eq!(report["destination"]["cluster"], cloud.name.as_str());
    assert_eq!(report["destination"]["pod"], "default/service");
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "checking",
            "locking",
            "creating",
            "migrating",
            "activating",
            "finishing"
        ],
        "{report}"
    );
    assert!(
        report["sidecar"]["totals"]["contentBytes"]
            .as_u64()
            .unwrap()
            > 64 << 20,
        "{report}"
    );

    // Progress and outcome are kept for GET /migrations/{id}.
    let (status, record) = edge_coordinator
        .call(&edge_certs.ca, "GET", &format!("/migrations/{id}"), None)
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["phase"], "done");

    // The service runs in cloud, active and unlocked, with the state it had.
    let destination_ip = report["destination"]["podIp"].as_str().unwrap().to_owned();
    assert_eq!(
        annotation(&cloud, name, "migration-start-mode").as_deref(),
        Some("active")
    );
    assert_eq!(annotation(&cloud, name, "migration-id"), None);
    let moved = ask_service(&destination_ip, 8080).await.unwrap();
    assert!(
        moved.memory_ok && moved.tick > last_at_source,
        "{moved:?} after {last_at_source}"
    );
    assert!(
        moved.tick < last_at_source + 5000,
        "continued, not restarted: {moved:?}"
    );
    // The source pod is gone.
    wait_pod(
        &edge,
        name,
        false,
        Duration::from_secs(120),
        "the source pod to be deleted",
    )
    .await;
}

/// The same state machine driven by an object: a `LiveMigration` created by the user moves a
/// pind pod, keeping the source pod as an empty shell; its status follows the migration.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_migration_object_moves_a_pind_pod_and_keeps_the_source() {
    let edge = Cluster::start_with_node();
    let cloud = Cluster::start_with_node();
    let edge_certs = CoordinatorCerts::generate(&edge);
    let cloud_certs = CoordinatorCerts::generate(&cloud);
    let edge_coordinator = RunningCoordinator::start(&edge, &edge_certs, &[&cloud_certs.ca]);
    let cloud_coordinator = RunningCoordinator::start(&cloud, &cloud_certs, &[&edge_certs.ca]);

    let name = "service";
    let (source_ip, _) = start_service(&edge, name, "pind").await;
    let last_at_source = ask_service(&source_ip, 8080).await.unwrap().tick;

    let status = live_migration(
        &edge,
        "to-cloud",
        json!({"pod": name, "destination": cloud_coordinator.address, "keep": true, "postCopy": true}),
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(
        status["phase"],
        "Succeeded",
        "{status}\n--- edge coordinator:\n{}\n--- cloud coordinator:\n{}",
        edge_coordinator.log(),
        cloud_coordinator.log()
    );
    assert_eq!(status["destinationPod"], "default/service");
    assert_eq!(status["destinationCluster"], cloud.name.as_str());
    assert!(status["bytes"].as_u64().unwrap() > 64 << 20, "{status}");
    // Post-copy: the service ran at the destination before its pages had all arrived.
    assert!(status["postCopyMs"].is_u64(), "{status}");
    assert_eq!(status["conditions"][0]["type"], "Succeeded");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert!(status["migrationId"].as_str().unwrap().starts_with('m'));
    let phases: Vec<&str> = status["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"migrating"), "{status}");

    // The service runs in cloud with its state; the source pod is kept, emptied and unlocked.
    let destination_ip = cloud
        .wait_running_and_ready(name, Duration::from_secs(60))
        .await;
    let moved = ask_service(&destination_ip, 8080).await.unwrap();
    assert!(moved.memory_ok && moved.tick > last_at_source, "{moved:?}");
    assert_eq!(
        annotation(&cloud, name, "migration-start-mode").as_deref(),
        Some("active")
    );
    assert_eq!(
        annotation(&edge, name, "migration-start-mode").as_deref(),
        Some("null")
    );
    assert_eq!(annotation(&edge, name, "migration-id"), None);
    assert!(
        ask_service(&source_ip, 8080).await.is_none(),
        "the kept source serves no more"
    );

    // Counted: one migration succeeded, its bytes and phases.
    let metrics = edge_coordinator.metrics(&edge_certs.ca).await;
    assert!(
        metrics.contains("ums_coordinator_migrations_total{outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ums_coordinator_phase_duration_seconds_count{phase=\"migrating\"} 1"),
        "{metrics}"
    );
}
