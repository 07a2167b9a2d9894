//! No migration strands a service (the fault matrix's start): requests that can never succeed
//! are refused before anything is locked or created, every answer JSON over HTTP/1.1 and
//! HTTP/2; a runtime container that dies comes back with its engine and its service. All on
//! the real images: two clusters (the test API server, the real webhook, a node agent each)
//! and the coordinator image, driven by curl and kubectl as a user drives them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use ums_contract::credential::Scope;
use ums_tests::cluster::{Cluster, User};
use ums_tests::coordinator::TwoClusters;
use ums_tests::poll;
use ums_tests::runtime_pod::ndjson_lines;
use ums_tests::service_pod::{
    ask_service, container_output, run_service, service_pod, sidecar, unbroken_connection,
    with_connection,
};
use ums_tests::workload::ticks;

struct Answer {
    status: u16,
    body: Value,
    content_type: String,
    raw: String,
}

/// curl as a user runs it (`--http1.1` or `--http2`) against a coordinator: the CA pinned,
/// `token` as the bearer, `body_bytes` of JSON (or `body`) posted.
fn curl(
    protocol: &str,
    ca: &Path,
    token: &str,
    method: &str,
    url: &str,
    body: Option<&str>,
) -> Answer {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut command = Command::new("curl");
    command
        .args(["-sS", protocol, "--cacert"])
        .arg(ca)
        .args([
            "-H",
            &format!("authorization: Bearer {token}"),
            "-X",
            method,
        ])
        .args(["-o"])
        .arg(&out)
        .args(["-w", "%{http_code} %{content_type}"]);
    if let Some(body) = body {
        let file = dir.path().join("body");
        std::fs::write(&file, body).unwrap();
        command
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", file.display()));
    }
    command.arg(url);
    let output = command.output().expect("curl (scripts/install-host.sh)");
    let written = String::from_utf8_lossy(&output.stdout).into_owned();
    let (code, kind) = written.split_once(' ').unwrap_or((&written, ""));
    let raw = String::from_utf8_lossy(&std::fs::read(&out).unwrap_or_default()).into_owned();
    Answer {
        status: code.trim().parse().unwrap_or(0),
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        content_type: kind.trim().to_owned(),
        raw: format!("{raw} (curl: {})", String::from_utf8_lossy(&output.stderr)),
    }
}

fn annotation(cluster: &Cluster, pod: &str, key: &str) -> Option<String> {
    cluster.get_json(&["pod", pod])["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_owned)
}

/// Nothing happened: the source pod carries no lock, the destination has no pod of that name.
fn assert_untouched(edge: &Cluster, cloud: &Cluster, pod: &str, what: &str) {
    assert_eq!(
        annotation(edge, pod, "migration-id"),
        None,
        "{what}: the source pod was locked"
    );
    assert!(
        cloud
            .kubectl_result(User::Admin, &["get", "pod", pod])
            .is_err(),
        "{what}: the destination has a pod {pod}"
    );
}

/// Two clusters with their coordinators, and a user's dind service of `mib` MiB running in
/// edge: the rig, the service's IP and its first answer.
async fn with_a_service(
    name: &str,
    mib: u32,
) -> (TwoClusters, String, ums_tests::service_pod::ServiceAnswer) {
    let two = TwoClusters::start();
    let source_ip = run_service(
        &two.edge,
        &service_pod(name, "dind", None, &[("app", mib)]),
        name,
    )
    .await;
    let before = ask_service(&source_ip, 8080).await.unwrap();
    (two, source_ip, before)
}

/// Until pod `name` is gone from `cluster` (at most a minute).
async fn wait_gone(cluster: &Cluster, name: &str, what: &str) {
    poll(what, Duration::from_secs(60), || async {
        cluster
            .kubectl_result(User::Admin, &["get", "pod", name])
            .is_err()
            .then_some(())
    })
    .await;
}

/// SIGKILLs a container of the rig: no goodbye to anyone.
fn kill(container: &str) {
    let killed = Command::new("docker")
        .args(["kill", "--signal", "KILL", container])
        .output()
        .unwrap();
    assert!(killed.status.success(), "{killed:?}");
}

/// What leaves the pod of `container` goes at 40 Mbit/s: 256 MiB take most of a minute.
fn slow_link(container: &str) {
    let shaped = Command::new("docker")
        .args([
            "exec", container, "tc", "qdisc", "add", "dev", "eth0", "root",
        ])
        .args([
            "tbf", "rate", "40mbit", "burst", "256kb", "latency", "200ms",
        ])
        .output()
        .unwrap();
    assert!(shaped.status.success(), "{shaped:?}");
}

/// Exactly one copy, at the source: edge's pod unlocked, cloud's copy deleted, the service
/// answering with its memory intact, past `before` when it kept its memory.
async fn one_copy_at_the_source(
    two: &TwoClusters,
    name: &str,
    source_ip: &str,
    before: Option<&ums_tests::service_pod::ServiceAnswer>,
) {
    assert_eq!(
        annotation(&two.edge, name, "migration-id"),
        None,
        "unlocked"
    );
    wait_gone(&two.cloud, name, "the copy to be deleted").await;
    // A restarted service takes a moment to fill its memory and listen again.
    let now = poll(
        "the service to answer at the source",
        Duration::from_secs(60),
        || async { ask_service(source_ip, 8080).await },
    )
    .await;
    assert!(now.memory_ok, "{now:?}");
    if let Some(before) = before {
        assert!(now.tick > before.tick, "{now:?} after {before:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_cannot_succeed_are_refused_before_anything_is_locked_or_created() {
    let two = TwoClusters::start();
    let TwoClusters {
        edge,
        cloud,
        edge_certs,
        edge_coordinator,
        cloud_coordinator,
        ..
    } = &two;

    // A two-container service that runs as its own service account, which only edge has.
    let name = "service";
    edge.kubectl(User::Admin, &["create", "serviceaccount", "shop"]);
    let mut pod = service_pod(name, "dind", None, &[("app", 64), ("side", 1)]);
    pod["spec"]["serviceAccountName"] = json!("shop");
    let source_ip = run_service(edge, &pod, name).await;
    let before = ask_service(&source_ip, 8080).await.unwrap();
    assert!(before.memory_ok);

    let destination = cloud_coordinator.address.clone();
    let (host, _port) = destination.split_once(':').unwrap();
    let migrate = format!("https://{}/migrate", edge_coordinator.address);
    let token = edge_coordinator.api_token.clone();
    let ca = edge_certs.ca.clone();
    let body = |name: &str, namespace: &str, url: &str, extra: Value| {
        let mut b = json!({"name": name, "namespace": namespace, "destinationUrl": url});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let refusals: Vec<(String, u16, String, &str)> = vec![
        (
            body(
                name,
                "default",
                &format!("https://jane:s3cret@{destination}"),
                json!({}),
            ),
            400,
            "user info".into(),
            "password in the URL",
        ),
        (
            body(
                name,
                "default",
                &format!("https://jane@{destination}"),
                json!({}),
            ),
            400,
            "user info".into(),
            "user in the URL",
        ),
        (
            body(
                name,
                "default",
                &format!("https://{destination}/api"),
                json!({}),
            ),
            400,
            "path".into(),
            "path in the URL",
        ),
        (
            body(
                name,
                "default",
                &format!("https://{destination}?x=1"),
                json!({}),
            ),
            400,
            "query".into(),
            "query in the URL",
        ),
        (
            body(
                name,
                "default",
                &format!("https://{destination}#top"),
                json!({}),
            ),
            400,
            "fragment".into(),
            "fragment in the URL",
        ),
        (
            body(name, "default", &format!("https://{host}:0"), json!({})),
            400,
            "port 0".into(),
            "port 0",
        ),
        (
            body("Service_1", "default", &destination, json!({})),
            400,
            "valid Kubernetes name".into(),
            "a name Kubernetes refuses",
        ),
        (
            body(name, "Shop", &destination, json!({})),
            400,
            "valid Kubernetes name".into(),
            "a namespace Kubernetes refuses",
        ),
        (
            body(name, "default", &destination, json!({"postCopy": true})),
            400,
            "postCopy moves one container".into(),
            "postCopy on two containers",
        ),
        (
            body(name, "default", &destination, json!({})),
            409,
            "serviceAccount shop".into(),
            "the destination lacks the service account",
        ),
    ];
    let blocking = {
        let (migrate, token, ca) = (migrate.clone(), token.clone(), ca.clone());
        move || {
            let mut seen = Vec::new();
            for protocol in ["--http1.1", "--http2"] {
                for (request, status, words, what) in &refusals {
                    let a = curl(protocol, &ca, &token, "POST", &migrate, Some(request));
                    seen.push((
                        format!("{protocol} {what}"),
                        *status,
                        Some(words.clone()),
                        a,
                    ));
                }
                // Bodies over the limit, a method the route does not take, a wrong token
                // with a body it never reads: each a JSON error the client hears.
                let big = format!("{{\"name\": \"{}\"}}", "x".repeat(3 * 1024 * 1024));
                let a = curl(protocol, &ca, &token, "POST", &migrate, Some(&big));
                seen.push((format!("{protocol} 3 MB body"), 413, None, a));
                let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(20 * 1024 * 1024));
                let a = curl(protocol, &ca, &token, "POST", &migrate, Some(&huge));
                seen.push((format!("{protocol} 20 MB body"), 413, None, a));
                let a = curl(protocol, &ca, &token, "GET", &migrate, None);
                seen.push((format!("{protocol} GET /migrate"), 405, None, a));
                let padded = format!("{{\"pad\": \"{}\"}}", "x".repeat(500 * 1024));
                for i in 0..5 {
                    let a = curl(protocol, &ca, "wrong", "POST", &migrate, Some(&padded));
                    seen.push((format!("{protocol} wrong token #{i}"), 401, None, a));
                }
            }
            seen
        }
    };
    let answers = tokio::task::spawn_blocking(blocking).await.unwrap();
    for (what, status, words, answer) in &answers {
        assert_eq!(answer.status, *status, "{what}: {}", answer.raw);
        assert!(
            answer.content_type.starts_with("application/json"),
            "{what}: content type {:?}: {}",
            answer.content_type,
            answer.raw
        );
        let error = answer.body["error"].as_str().unwrap_or("");
        assert!(!error.is_empty(), "{what}: {}", answer.raw);
        if let Some(words) = words {
            assert!(error.contains(words.as_str()), "{what}: {}", answer.raw);
        }
        assert!(!answer.raw.contains("s3cret"), "{what}: {}", answer.raw);
        assert_untouched(edge, cloud, name, what);
    }
    // What the coordinator keeps about its migrations never holds the password either.
    let (status, migrations) = edge_coordinator
        .call(&edge_certs.ca, "GET", "/migrations", None)
        .await;
    assert_eq!(status, 200, "{migrations}");
    assert!(!migrations.to_string().contains("s3cret"), "{migrations}");
    assert!(!edge_coordinator.log().contains("s3cret"));

    // The service never stopped.
    let still = ask_service(&source_ip, 8080).await.unwrap();
    assert!(still.memory_ok && still.tick > before.tick, "{still:?}");

    // Once the destination has the account, the same request moves the service.
    cloud.kubectl(User::Admin, &["create", "serviceaccount", "shop"]);
    let (status, report) = edge_coordinator
        .call(
            &edge_certs.ca,
            "POST",
            "/migrate",
            Some(json!({"name": name, "destinationUrl": destination})),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    let copy_ip = cloud
        .wait_running_and_ready(name, Duration::from_secs(120))
        .await;
    let after = ask_service(&copy_ip, 8080).await.unwrap();
    assert!(after.memory_ok, "{after:?}");
    assert!(after.tick >= still.tick, "{after:?} after {still:?}");
}

/// Kills the runtime container of a running `interface` pod as a node's failure would; the
/// kubelet (the node agent) starts it again. The nested engine must come back on what the dead
/// one left (its pid file, sockets, state), and the service with it.
async fn runtime_container_killed_comes_back_with_its_engine(interface: &str) {
    let cluster = Cluster::start_with_node();
    let name = "service";
    let pod = service_pod(name, interface, None, &[("app", 16)]);
    let ip = run_service(&cluster, &pod, name).await;
    let before = ask_service(&ip, 8080).await.unwrap();
    let runtime = cluster.pod_container(name, "runtime");
    kill(&runtime);

    // The service answers again: a new process (its counter starts over: what ran in memory
    // died with the runtime container; only a migration carries it), served by the restarted
    // engine through the pod's network.
    let again = poll(
        "the service to run again after its runtime container was killed",
        Duration::from_secs(180),
        || {
            let ip = ip.clone();
            async move {
                ask_service(&ip, 8080)
                    .await
                    .filter(|a| a.tick < before.tick)
            }
        },
    )
    .await;
    assert!(again.memory_ok, "{again:?}");
    let status = cluster.get_json(&["pod", name])["status"].clone();
    let restarts = |container: &str| {
        status["containerStatuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == container)
            .map(|c| c["restartCount"].as_i64().unwrap_or(0))
            .unwrap_or(0)
    };
    assert!(restarts("runtime") >= 1, "{status}");
    // The ambassador relayed the end of the container that died and was started again: the
    // new container's output (its counter from 0 again) reaches the pod's log.
    let ambassador = cluster.pod_container(name, "app");
    poll(
        "the restarted ambassador to relay the new container's ticks",
        Duration::from_secs(60),
        || {
            let seen = ticks(&container_output(&ambassador));
            let anew = seen
                .windows(2)
                .position(|w| w[1].tick < w[0].tick)
                .map(|at| seen.len() - at - 1);
            async move { anew.filter(|n| *n >= 3).map(|_| ()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dind_runtime_container_killed_comes_back_with_its_engine() {
    runtime_container_killed_comes_back_with_its_engine("dind").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pind_runtime_container_killed_comes_back_with_its_engine() {
    runtime_container_killed_comes_back_with_its_engine("pind").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn both_coordinators_killed_after_the_state_left_and_the_migration_is_finished_from_its_journal(
) {
    let name = "service";
    let (two, _, before) = with_a_service(name, 256).await;
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        cloud_coordinator,
        ..
    } = &two;

    let call = two.migrate_to_cloud_in_background(name);
    // Cloud's coordinator dies while the state moves (sidecar to sidecar: the move goes on);
    // edge's dies while it tries to make the copy active.
    two.wait_edge_migrating().await;
    cloud_coordinator.kill();
    poll(
        "edge's migration to reach activating",
        Duration::from_secs(240),
        || async {
            two.edge_phase()
                .await
                .filter(|p| p == "activating" || p == "failed")
        },
    )
    .await;
    edge_coordinator.kill();
    let _ = call.await;

    // The state left: the source pod is locked and carries its journal; the copy is passive.
    let source = edge.get_json(&["pod", name]);
    let annotations = &source["metadata"]["annotations"];
    assert!(annotations["migration-id"].is_string(), "{source}");
    assert!(
        annotations["migration.ums-rs.io/destination"].is_string()
            && annotations["migration.ums-rs.io/migration-credential"].is_string(),
        "{source}"
    );
    assert_eq!(
        annotation(cloud, name, "migration-start-mode").as_deref(),
        Some("passive")
    );

    // Both come back; edge's finds the pod whose state left and finishes from the journal.
    cloud_coordinator.restart();
    edge_coordinator.restart();
    finished_from_the_journal(&two, name, &before).await;
}

/// Edge's restarted coordinator has found the pod whose state left: the copy is active, the
/// source deleted, and the service continues where it stopped.
async fn finished_from_the_journal(
    two: &TwoClusters,
    name: &str,
    before: &ums_tests::service_pod::ServiceAnswer,
) {
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        ..
    } = two;
    poll(
        "edge's restarted coordinator to make the copy active and delete the source",
        Duration::from_secs(180),
        || async {
            let active =
                annotation(cloud, name, "migration-start-mode").as_deref() == Some("active");
            let gone = edge
                .kubectl_result(User::Admin, &["get", "pod", name])
                .is_err();
            (active && gone).then_some(())
        },
    )
    .await;
    assert!(
        edge_coordinator
            .log()
            .contains("finished a migration whose state had left"),
        "{}",
        edge_coordinator.log()
    );
    assert_eq!(annotation(cloud, name, "migration-id"), None);
    let copy_ip = cloud
        .wait_running_and_ready(name, Duration::from_secs(120))
        .await;
    let after = ask_service(&copy_ip, 8080).await.unwrap();
    assert!(after.memory_ok, "{after:?}");
    assert!(
        after.tick > before.tick,
        "the copy continues where the source stopped: {after:?} after {before:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_source_coordinator_killed_while_the_state_moves_and_the_migration_still_ends_once() {
    let name = "service";
    let (two, source_ip, before) = with_a_service(name, 256).await;
    let TwoClusters {
        edge_coordinator, ..
    } = &two;
    let call = two.migrate_to_cloud_in_background(name);
    // The coordinator that called the source's sidecar dies: the sidecar's migration goes on
    // to its end (it must not stop half way with the containers dumped).
    two.wait_edge_migrating().await;
    edge_coordinator.kill();
    let _ = call.await;
    poll(
        "the source sidecar to finish the migration on its own",
        Duration::from_secs(240),
        || {
            let url = format!("http://{source_ip}:8888/probe/app");
            async move {
                let (_, probe) = sidecar("GET", url, None).await;
                (probe["state"] == "migrated").then_some(())
            }
        },
    )
    .await;
    edge_coordinator.restart();
    finished_from_the_journal(&two, name, &before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_destination_runtime_killed_mid_migration_leaves_the_service_at_the_source_and_the_answer_says_so(
) {
    let name = "service";
    let (two, source_ip, before) = with_a_service(name, 256).await;
    let TwoClusters { cloud, .. } = &two;

    let call = two.migrate_to_cloud_in_background(name);
    two.wait_edge_migrating().await;
    let runtime = cloud.pod_container(name, "runtime");
    kill(&runtime);

    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["phase"], "migrating", "{answer}");
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");
    one_copy_at_the_source(&two, name, &source_ip, Some(&before)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_source_runtime_killed_after_its_dump_comes_back_from_the_dump_with_its_connection() {
    // Two containers and a live connection between them (front -> back, the sink on back's
    // port 8081): both ends come back from the dump, the connection held while they do.
    let two = TwoClusters::start();
    let TwoClusters { edge, cloud, .. } = &two;
    let name = "service";
    let pod = with_connection(
        service_pod(name, "dind", None, &[("front", 16), ("back", 240)]),
        "front",
        "back",
    );
    let source_ip = run_service(edge, &pod, name).await;
    let before = ask_service(&source_ip, 8080).await.unwrap();
    let sink_before = unbroken_connection(
        &source_ip,
        8081,
        100,
        "the connection inside the pod to carry ticks",
    )
    .await;
    let runtime = edge.pod_container(name, "runtime");

    let call = two.migrate_to_cloud_in_background(name);
    // The dump is whole (the sidecar recorded it) and the state is on its way: the source's
    // runtime container dies, engine and sidecar with it.
    let record = "/var/lib/docker/ums-pending-dump.json";
    poll(
        "the source sidecar to record its dump",
        Duration::from_secs(240),
        || {
            let found = Command::new("docker")
                .args(["exec", &runtime, "test", "-f", record])
                .status()
                .is_ok_and(|s| s.success());
            async move { found.then_some(()) }
        },
    )
    .await;
    kill(&runtime);

    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert_eq!(
        status, 502,
        "the migration fails when its source's runtime dies after the dump (a 200 means the kill came after the migration had ended): {answer}"
    );
    assert_eq!(answer["phase"], "migrating", "{answer}");
    assert!(
        answer["rollback"]
            .to_string()
            .contains("restored the service from its dump"),
        "the answer says the restart kept the service: {answer}"
    );
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");

    // The restarted runtime container restored the service from the dump: it continues where
    // it stopped (its counter past the last tick seen before the migration), memory intact,
    // and the connection between the containers is the same one, nothing lost on it.
    let again = poll(
        "the service to continue at the source from its dump",
        Duration::from_secs(180),
        || async { ask_service(&source_ip, 8080).await },
    )
    .await;
    assert!(again.memory_ok, "{again:?}");
    assert!(
        again.tick > before.tick,
        "restored from the dump, not started afresh: {again:?} after {before:?}"
    );
    // The same connection: it did not survive the restore from the dump otherwise.
    unbroken_connection(
        &source_ip,
        8081,
        sink_before.lines + 100,
        "the connection inside the pod to go on after the restart",
    )
    .await;
    let log = Command::new("docker")
        .args(["logs", &runtime])
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&log.stdout).into_owned() + &String::from_utf8_lossy(&log.stderr);
    assert!(
        log.contains("resumed from the dump a migration left"),
        "{log}"
    );
    // Exactly one copy: the source runs, the destination's copy is gone, the pod unlocked.
    assert_eq!(annotation(edge, name, "migration-id"), None, "unlocked");
    wait_gone(cloud, name, "the copy to be deleted").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_aborts_a_migration_before_the_freeze_and_nothing_is_left() {
    let two = TwoClusters::start();
    let TwoClusters {
        edge,

        edge_certs,
        edge_coordinator,
        ..
    } = &two;
    let name = "service";
    let source_ip = run_service(edge, &service_pod(name, "dind", None, &[("app", 64)]), name).await;
    let before = ask_service(&source_ip, 8080).await.unwrap();
    let (status, answer) = edge_coordinator
        .call(&edge_certs.ca, "POST", "/migrations/m-unknown/abort", None)
        .await;
    assert_eq!(status, 404, "{answer}");

    let call = two.migrate_to_cloud_in_background(name);
    // While the destination makes its copy (the longest step before the freeze).
    let id = poll(
        "edge's migration to reach creating",
        Duration::from_secs(120),
        || async {
            let (_, records) = edge_coordinator
                .call(&edge_certs.ca, "GET", "/migrations", None)
                .await;
            let record = records[0].clone();
            (record["phase"] == "creating")
                .then(|| record["migrationId"].as_str().unwrap().to_owned())
        },
    )
    .await;
    let path = format!("/migrations/{id}/abort");
    let (status, answer) = edge_coordinator
        .call(&edge_certs.ca, "POST", &path, None)
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["abortingIn"], "creating", "{answer}");

    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("aborted by an operator"),
        "{answer}"
    );
    assert_eq!(answer["phase"], "creating", "{answer}");
    assert!(
        answer["rollback"]
            .to_string()
            .contains("source pod unlocked"),
        "{answer}"
    );
    // An abort of what has ended is refused, naming why.
    let (status, answer) = edge_coordinator
        .call(&edge_certs.ca, "POST", &path, None)
        .await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("ended"),
        "{answer}"
    );

    one_copy_at_the_source(&two, name, &source_ip, Some(&before)).await;
}

/// Refuses every TCP packet to `address` (`127.0.0.1:port`, a coordinator on the host
/// network) with a reset until dropped: the link one way only, as an edge cluster behind a
/// firewall that lets its peer in but cannot call out.
struct Unreachable {
    rule: Vec<String>,
}

impl Unreachable {
    fn port_of(address: &str) -> Self {
        let (host, port) = address.rsplit_once(':').unwrap();
        let rule: Vec<String> = [
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            host,
            "--dport",
            port,
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]
        .map(str::to_owned)
        .to_vec();
        let added = Command::new("iptables")
            .args(["-w", "-I"])
            .args(&rule)
            .output()
            .unwrap();
        assert!(added.status.success(), "iptables -I: {added:?}");
        Unreachable { rule }
    }
}

impl Drop for Unreachable {
    fn drop(&mut self) {
        let removed = Command::new("iptables")
            .args(["-w", "-D"])
            .args(&self.rule)
            .output()
            .unwrap();
        if !removed.status.success() && !std::thread::panicking() {
            panic!("iptables -D: {removed:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_destination_asks_its_source_and_activates_the_copy_the_source_cannot_reach() {
    let name = "service";
    let (two, source_ip, before) = with_a_service(name, 256).await;
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        cloud_coordinator,
        ..
    } = &two;

    // The state moves sidecar to sidecar; edge's coordinator dies, and from then on edge
    // cannot reach cloud's coordinator (cloud still reaches edge's).
    let call = two.migrate_to_cloud_in_background(name);
    two.wait_edge_migrating().await;
    edge_coordinator.kill();
    let _ = call.await;
    let blocked = Unreachable::port_of(&cloud_coordinator.address);
    poll(
        "the source sidecar to finish the transfer on its own",
        Duration::from_secs(240),
        || {
            let url = format!("http://{source_ip}:8888/probe/app");
            async move {
                let (_, probe) = sidecar("GET", url, None).await;
                (probe["state"] == "migrated").then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        annotation(cloud, name, "migration-start-mode").as_deref(),
        Some("passive"),
        "the copy runs the restored service, passive"
    );
    assert_eq!(
        annotation(cloud, name, "migration.ums-rs.io/source").as_deref(),
        Some(format!("https://{}", edge_coordinator.address).as_str()),
        "the copy names its source"
    );
    // Edge's coordinator comes back and cannot finish from its journal (cloud unreachable);
    // cloud's restarts and asks edge what became of the migration.
    edge_coordinator.restart();
    cloud_coordinator.kill();
    cloud_coordinator.restart();
    poll(
        "cloud's coordinator to make the copy active on edge's word",
        Duration::from_secs(120),
        || async {
            (annotation(cloud, name, "migration-start-mode").as_deref() == Some("active"))
                .then_some(())
        },
    )
    .await;
    let log = cloud_coordinator.log();
    assert!(
        log.contains("the source says the state left"),
        "cloud's coordinator settled the copy itself:\n{log}"
    );
    assert!(
        edge_coordinator
            .log()
            .contains("a destination asked what became of a migration"),
        "{}",
        edge_coordinator.log()
    );
    assert_eq!(
        annotation(edge, name, "migration.ums-rs.io/destination-pod").as_deref(),
        Some(format!("default/{name}").as_str()),
        "edge could not finish: the source is still locked with its journal"
    );

    // The link is back: edge's coordinator finishes from its journal (the copy is already
    // active: answered, not refused) and deletes the source.
    drop(blocked);
    finished_from_the_journal(&two, name, &before).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_destination_disk_full_mid_transfer_leaves_the_service_at_the_source() {
    let name = "service";
    let (two, source_ip, before) = with_a_service(name, 256).await;
    let TwoClusters { cloud, .. } = &two;

    let call = two.migrate_to_cloud_in_background(name);
    // As soon as the copy's runtime container runs, before the state can come (its engine
    // must start and create the containers first): 32 MiB for the staging of 256 MiB.
    let runtime = poll(
        "the copy's runtime container to run",
        Duration::from_secs(120),
        || async {
            let pod = cloud.kubectl_result(User::Admin, &["get", "pod", name, "-o", "json"]);
            let uid = serde_json::from_str::<Value>(&pod.ok()?).ok()?["metadata"]["uid"]
                .as_str()?
                .to_owned();
            let container = format!("k8s_runtime_{name}_default_{}", &uid[..8]);
            let running = Command::new("docker")
                .args(["inspect", "--format", "{{.State.Running}}", &container])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&running.stdout).trim() == "true").then_some(container)
        },
    )
    .await;
    let mounted = Command::new("docker")
        .args(["exec", &runtime, "sh", "-c"])
        .arg("mkdir -p /var/lib/docker/ums-staging && mount -t tmpfs -o size=32m tmpfs /var/lib/docker/ums-staging")
        .output()
        .unwrap();
    assert!(mounted.status.success(), "{mounted:?}");
    let phase = two.edge_phase().await;
    assert!(
        matches!(phase.as_deref(), Some("checking" | "locking" | "creating")),
        "the small staging was in place before the state moved (phase {phase:?})"
    );

    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["phase"], "migrating", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "the answer names the cause: {answer}"
    );
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");
    one_copy_at_the_source(&two, name, &source_ip, Some(&before)).await;
}

/// Waits until edge's migration is in `creating` (the destination makes its copy).
async fn wait_edge_creating(two: &TwoClusters) {
    poll(
        "edge's migration to reach creating",
        Duration::from_secs(120),
        || async { (two.edge_phase().await.as_deref() == Some("creating")).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_destination_coordinator_killed_while_it_makes_the_copy_and_nothing_is_left() {
    let name = "service";
    let (two, source_ip, before) = with_a_service(name, 64).await;
    let TwoClusters {
        edge,
        cloud,
        cloud_coordinator,
        ..
    } = &two;

    let call = two.migrate_to_cloud_in_background(name);
    wait_edge_creating(&two).await;
    cloud_coordinator.kill();
    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert!(status == 502 || status == 504, "{status} {answer}");
    assert_eq!(answer["phase"], "creating", "{answer}");
    assert!(
        answer["rollback"]
            .to_string()
            .contains("source pod unlocked"),
        "{answer}"
    );
    assert_eq!(annotation(edge, name, "migration-id"), None, "unlocked");
    let still = ask_service(&source_ip, 8080).await.unwrap();
    assert!(still.memory_ok && still.tick > before.tick, "{still:?}");
    // Whatever copy it had made is deleted when it comes back (passive, never started).
    cloud_coordinator.restart();
    wait_gone(
        cloud,
        name,
        "the copy to be deleted by the restarted coordinator",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_source_coordinator_killed_while_the_copy_is_made_and_nothing_is_left() {
    let name = "service";
    let (two, source_ip, before) = with_a_service(name, 64).await;
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        ..
    } = &two;

    let call = two.migrate_to_cloud_in_background(name);
    wait_edge_creating(&two).await;
    edge_coordinator.kill();
    let _ = call.await;
    // The destination sees its caller gone and deletes the copy; the restarted source finds
    // the pod it locked running its service and releases it.
    wait_gone(cloud, name, "the copy whose caller went away to be deleted").await;
    edge_coordinator.restart();
    poll(
        "edge's restarted coordinator to release the lock",
        Duration::from_secs(60),
        || async {
            annotation(edge, name, "migration-id")
                .is_none()
                .then_some(())
        },
    )
    .await;
    let still = ask_service(&source_ip, 8080).await.unwrap();
    assert!(still.memory_ok && still.tick > before.tick, "{still:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_aborts_a_migration_while_its_state_moves_and_the_service_runs_on_at_the_source(
) {
    let name = "service";
    let (two, source_ip, before) = with_a_service(name, 256).await;
    let TwoClusters {
        edge,
        edge_coordinator,
        ..
    } = &two;
    // The state leaves slowly enough to be stopped on its way: 256 MiB at 40 Mbit/s is most
    // of a minute.
    let runtime = edge.pod_container(name, "runtime");
    slow_link(&runtime);

    let call = two.migrate_to_cloud_in_background(name);
    two.wait_edge_migrating().await;
    poll(
        "the source's containers to be frozen and on their way",
        Duration::from_secs(60),
        || {
            let url = format!("http://{source_ip}:8888/probe/app");
            async move {
                let (_, probe) = sidecar("GET", url, None).await;
                (probe["state"] == "migrating").then_some(())
            }
        },
    )
    .await;
    let (_, status, answer) = two.abort_edge_migration().await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["abortingIn"], "migrating", "{answer}");

    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("aborted by an operator"),
        "{answer}"
    );
    assert_eq!(answer["phase"], "migrating", "{answer}");
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");
    let rollback = answer["rollback"].to_string();
    assert!(
        rollback.contains("destination pod deleted") && rollback.contains("source pod unlocked"),
        "{answer}"
    );
    one_copy_at_the_source(&two, name, &source_ip, Some(&before)).await;
    assert!(
        edge_coordinator
            .log()
            .contains("the source's sidecar stops the migration and rolls back"),
        "{}",
        edge_coordinator.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_source_runtime_killed_before_its_dump_and_the_answer_says_its_memory_was_lost() {
    let name = "service";
    let (two, source_ip, _) = with_a_service(name, 64).await;
    let TwoClusters { edge, .. } = &two;
    let runtime = edge.pod_container(name, "runtime");

    let call = two.migrate_to_cloud_in_background(name);
    // While the destination makes its copy: nothing is frozen or dumped yet.
    wait_edge_creating(&two).await;
    kill(&runtime);

    // The source's sidecar is gone when the state should move (502), or back as another run
    // than the one the pod was checked with (409): either way nothing moved, and the answer
    // says what the restart cost.
    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert!(status == 409 || status == 502, "{status} {answer}");
    assert_eq!(answer["phase"], "migrating", "{answer}");
    assert!(
        answer["rollback"]
            .to_string()
            .contains("restarted during the migration before its state had all left"),
        "{answer}"
    );
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");
    // One copy: the service runs at the source, started afresh by its restarted runtime.
    one_copy_at_the_source(&two, name, &source_ip, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_source_runtime_killed_during_post_copy_and_the_answer_says_the_state_was_lost() {
    let name = "service";
    let (two, source_ip, _) = with_a_service(name, 256).await;
    let TwoClusters {
        edge,
        cloud,
        edge_coordinator,
        edge_certs,
        cloud_coordinator,
        ..
    } = &two;
    // Pages slow enough to kill the source while they flow: 256 MiB at 40 Mbit/s.
    let runtime = edge.pod_container(name, "runtime");
    slow_link(&runtime);

    let body = json!({"name": name, "destinationUrl": cloud_coordinator.address, "postCopy": true});
    let (address, ca, token) = (
        edge_coordinator.address.clone(),
        edge_certs.ca.clone(),
        ums_tests::coordinator::Credential::Bearer(edge_coordinator.api_token.clone()),
    );
    let call = tokio::spawn(async move {
        ums_tests::coordinator::call_result(&address, &ca, &token, "POST", "/migrate", Some(body))
            .await
    });
    // The copy runs at the destination while most of its memory is still at the source.
    poll(
        "the copy to print at the destination during post-copy",
        Duration::from_secs(180),
        || async {
            // What the restored process prints, from the copy's sidecar (its coordinator's
            // token): the ambassador relays it only once the migration has ended.
            let pod = cloud.kubectl_result(User::Admin, &["get", "pod", name, "-o", "json"]);
            let pod: Value = serde_json::from_str(&pod.ok()?).ok()?;
            let ip = pod["status"]["podIP"].as_str()?.to_owned();
            let token = cloud.sidecar_token(&ip, Scope::Coordinator, None);
            let response = reqwest::Client::new()
                .get(format!("http://{ip}:8888/logs/app"))
                .bearer_auth(token)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            let text = response.text().await.ok()?;
            (!ticks(&ndjson_lines(&text)).is_empty()).then_some(())
        },
    )
    .await;
    kill(&runtime);

    // Post-copy's known risk: the pages still at the source die with it. The copy goes (it
    // cannot run without them), the source's runtime starts the service afresh, and the
    // answer says the memory was lost.
    let (status, answer) = call.await.unwrap().expect("edge's coordinator answers");
    assert_eq!(status, 502, "{answer}");
    assert_eq!(answer["phase"], "migrating", "{answer}");
    assert!(
        answer["rollback"]
            .to_string()
            .contains("restarted during the migration before its state had all left"),
        "{answer}"
    );
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");
    one_copy_at_the_source(&two, name, &source_ip, None).await;
}
