//! Node to node inside one cluster, as operators run it: a cluster with two nodes (a node
//! agent each, one pod network), its `ums-coordinator`, and wrapped pods (dind, pind) that
//! move to the other node by UMS's `POST /migrate` with `destinationNode` and by a
//! `LiveMigration`: the copy gets a name of its own and the pod's labels (what a Service
//! selects), runs on the named node, and the service continues with its memory and counter.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use serde_json::{json, Value};
use ums_tests::cluster::{Cluster, NodeRuntime, User};
use ums_tests::coordinator::{live_migration, CoordinatorCerts, RunningCoordinator};
use ums_tests::poll;
use ums_tests::service_pod::{ask_service, container_output, service_pod};
use ums_tests::workload::{
    ff_workload_image, journal_goes_on, journal_ticks, ticks, tls_registry_workload_image,
};

/// Creates a user's 64 MiB service pod, wrapped for `interface`, labelled `app: <name>` and
/// bound to `node`, opted in to live migration on eviction if `on_eviction`.
fn create_on(cluster: &Cluster, name: &str, interface: &str, node: &str, on_eviction: bool) {
    let mut pod = service_pod(name, interface, None, &[("app", 64)]);
    pod["metadata"]["labels"] = json!({"app": name});
    if on_eviction {
        pod["metadata"]["annotations"]["migration-eviction-strategy"] = json!("live-migrate");
    }
    pod["spec"]["nodeName"] = json!(node);
    cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
}

/// [`create_on`], then running and relaying its ticks. Its pod IP.
async fn start_on(cluster: &Cluster, name: &str, interface: &str, node: &str) -> String {
    create_on(cluster, name, interface, node, false);
    ticking(cluster, name).await
}

/// Waits until pod `name` runs, is ready and its ambassador relays the workload's ticks; its IP.
async fn ticking(cluster: &Cluster, name: &str) -> String {
    let ip = cluster
        .wait_running_and_ready(name, Duration::from_secs(240))
        .await;
    let ambassador = cluster.pod_container(name, "app");
    poll(
        &format!("{name}'s ambassador to relay the workload's ticks"),
        Duration::from_secs(120),
        || {
            let n = ticks(&container_output(&ambassador)).len();
            async move { (n >= 20).then_some(()) }
        },
    )
    .await;
    ip
}

/// The pods a Service selecting `app=<app>` reaches: their names and nodes.
fn selected(cluster: &Cluster, app: &str) -> Vec<(String, String)> {
    let pods = cluster.get_json(&["pods", "-l", &format!("app={app}")]);
    pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["spec"]["nodeName"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Moves pod `pod` to node `node` by a LiveMigration `name`: it succeeds and says so; the
/// copy's name (`logs`: what to show if it fails).
async fn live_move(cluster: &Cluster, name: &str, pod: &str, node: &str, logs: &str) -> String {
    let status = live_migration(
        cluster,
        name,
        json!({"pod": pod, "destinationNode": node}),
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(status["phase"], "Succeeded", "{status}\n{logs}");
    assert_eq!(status["destinationNode"], node, "{status}");
    pod_name(&status["destinationPod"])
}

/// A pod's name from a `namespace/name` the coordinator reports.
fn pod_name(reported: &Value) -> String {
    let name = reported
        .as_str()
        .unwrap_or_else(|| panic!("a pod's name reported: {reported}"));
    name.trim_start_matches("default/").to_owned()
}

/// Pod `name` (a moved pod's source) is gone from `cluster`.
fn assert_gone(cluster: &Cluster, name: &str) {
    assert!(
        cluster
            .kubectl_result(User::Admin, &["get", "pod", name])
            .is_err(),
        "the source pod {name} is gone"
    );
}

/// A second hop's copy `back` of service `app` is named after the service's first pod, not
/// after the first copy `copy`.
fn assert_second_hop(app: &str, copy: &str, back: &str) {
    assert!(
        back.starts_with(&format!("{app}-")) && !back.starts_with(copy),
        "second hop named {back} (first copy {copy})"
    );
}

/// A Service `app` (selector `app: <app>`, port 80 to 8080; applied on first use) reaches
/// pod `copy` at `ip` and nothing else: its EndpointSlice (the rig's controller writes it as
/// kube-controller-manager's does) lists `copy` as its only ready endpoint. The endpoint's
/// `address:port`, what kube-proxy sends the Service's traffic to.
async fn service_reaches(cluster: &Cluster, app: &str, copy: &str, ip: &str) -> String {
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": app, "namespace": "default"},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    });
    cluster.kubectl_with_input(User::Admin, &["apply", "-f", "-"], &service.to_string());
    poll(
        &format!("Service {app}'s EndpointSlice to list {copy} ({ip}) alone"),
        Duration::from_secs(60),
        || async {
            let slices = cluster.get_json(&[
                "endpointslices",
                "-l",
                &format!("kubernetes.io/service-name={app}"),
            ]);
            let slice = slices["items"].as_array()?.first()?.clone();
            let ready: Vec<(String, String)> = slice["endpoints"]
                .as_array()?
                .iter()
                .filter(|e| e["conditions"]["ready"] == true)
                .map(|e| {
                    (
                        e["targetRef"]["name"].as_str().unwrap_or("").to_owned(),
                        e["addresses"][0].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            let port = slice["ports"][0]["port"].as_u64()?;
            (ready == vec![(copy.to_owned(), ip.to_owned())]).then(|| format!("{ip}:{port}"))
        },
    )
    .await
}

/// The copy `copy` of service `app` runs on `node`, is the one pod its Service selects and
/// reaches, and answers there with the memory and a counter past `counter`.
async fn moved(cluster: &Cluster, app: &str, copy: &str, node: &str, counter: u64, logs: &str) {
    assert_eq!(
        selected(cluster, app),
        vec![(copy.to_owned(), node.to_owned())],
        "the Service's selector app={app} reaches the copy only, on {node}\n{logs}"
    );
    let ip = cluster
        .wait_running_and_ready(copy, Duration::from_secs(60))
        .await;
    let endpoint = service_reaches(cluster, app, copy, &ip).await;
    let answer = poll(
        &format!("{copy} to answer on {node} through its Service's endpoint {endpoint}"),
        Duration::from_secs(30),
        || async {
            let (address, port) = endpoint.rsplit_once(':').unwrap();
            ask_service(address, port.parse().unwrap()).await
        },
    )
    .await;
    assert!(answer.memory_ok, "{copy}: memory lost in the move");
    assert!(
        answer.tick > counter,
        "{copy}: counter {} did not continue from {counter} (restarted?)",
        answer.tick
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrapped_pods_move_to_another_node_of_their_cluster() {
    let (cluster, nodes) = Cluster::start_with_nodes(2);
    let (first, second) = (nodes[0].clone(), nodes[1].clone());
    let certs = CoordinatorCerts::generate(&cluster);
    let coordinator = RunningCoordinator::start(&cluster, &certs, &[&certs.ca]);
    let logs = || {
        format!(
            "--- coordinator:\n{}\n--- nodes:\n{}",
            coordinator.log(),
            cluster.node_log()
        )
    };

    // Created without a node, the pind pod is placed (bound) by the rig's scheduler on the
    // least loaded node, the first by name when both are empty.
    let mut pind = service_pod("svc-pind", "pind", None, &[("app", 64)]);
    pind["metadata"]["labels"] = json!({"app": "svc-pind"});
    cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pind.to_string());
    let pind_ip = ticking(&cluster, "svc-pind").await;
    assert_eq!(
        cluster.get_json(&["pod", "svc-pind"])["spec"]["nodeName"],
        first.as_str(),
        "placement bound the pod"
    );
    let dind_ip = start_on(&cluster, "svc-dind", "dind", &first).await;

    // What cannot be: the node it runs on, a node the cluster lacks.
    let migrate = |body: Value| coordinator.call(&certs.ca, "POST", "/migrate", Some(body));
    let (status, answer) = migrate(json!({"name": "svc-dind", "destinationNode": first})).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("already runs on node"),
        "{answer}"
    );
    let (status, answer) = migrate(json!({"name": "svc-dind", "destinationNode": "nowhere"})).await;
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("has no node nowhere"),
        "{answer}"
    );
    assert_eq!(cluster.node_of("default", "svc-dind"), first);

    // dind by UMS's call: the copy on the second node, a name of its own; its state held to a
    // bandwidth cap of 16 MiB/s (bytes over time, as its sidecar measured them).
    let before = ask_service(&dind_ip, 8080).await.unwrap();
    let cap = 16u64 << 20;
    let (status, report) = migrate(
        json!({"name": "svc-dind", "destinationNode": second, "bandwidthPerMigration": "16Mi"}),
    )
    .await;
    assert_eq!(status, 200, "{report}\n{}", logs());
    let totals = &report["sidecar"]["totals"];
    let (sent, transfer_ms) = (
        totals["bytesSent"].as_u64().unwrap(),
        totals["transferMs"].as_u64().unwrap(),
    );
    assert!(sent > 60 << 20, "the 64 MiB state moved: {totals}");
    assert!(
        sent * 1000 / transfer_ms.max(1) <= cap + cap / 20,
        "{sent} bytes in {transfer_ms} ms: faster than the cap of {cap} bytes/s"
    );
    assert_eq!(report["destination"]["node"], second.as_str(), "{report}");
    assert_eq!(
        report["destination"]["cluster"],
        cluster.name.as_str(),
        "{report}"
    );
    let copy = pod_name(&report["destination"]["pod"]);
    assert!(
        copy.starts_with("svc-dind-") && copy != "svc-dind",
        "{report}"
    );
    assert_gone(&cluster, "svc-dind");
    moved(&cluster, "svc-dind", &copy, &second, before.tick, &logs()).await;

    // pind by a LiveMigration.
    let before = ask_service(&pind_ip, 8080).await.unwrap();
    let pind_copy = live_move(&cluster, "pind-to-second", "svc-pind", &second, &logs()).await;
    moved(
        &cluster,
        "svc-pind",
        &pind_copy,
        &second,
        before.tick,
        &logs(),
    )
    .await;

    // The dind copy back to the first node: named after the service's first pod again.
    let ip = cluster
        .wait_running_and_ready(&copy, Duration::from_secs(30))
        .await;
    let before = ask_service(&ip, 8080).await.unwrap();
    let back = live_move(&cluster, "dind-back", &copy, &first, &logs()).await;
    assert_second_hop("svc-dind", &copy, &back);
    moved(&cluster, "svc-dind", &back, &first, before.tick, &logs()).await;

    // The kubectl plugin, as Jane: the pind copy back to the first node, with its progress.
    let ip = cluster
        .wait_running_and_ready(&pind_copy, Duration::from_secs(30))
        .await;
    let before = ask_service(&ip, 8080).await.unwrap();
    let (ok, stdout, stderr) = kubectl_migrate(&cluster, &[&pind_copy, "--to-node", &first]).await;
    assert!(
        ok,
        "kubectl migrate failed:\n{stdout}\n{stderr}\n{}",
        logs()
    );
    assert!(
        stdout.contains("] migrating"),
        "no progress shown: {stdout}"
    );
    assert!(stdout.contains(&format!("on node {first}")), "{stdout}");
    let pind_back = stdout
        .split("runs in pod default/")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no destination pod in {stdout}"))
        .to_owned();
    moved(
        &cluster,
        "svc-pind",
        &pind_back,
        &first,
        before.tick,
        &logs(),
    )
    .await;
    let (ok, listed, _) = kubectl_migrate(&cluster, &["list"]).await;
    assert!(ok && listed.lines().count() >= 4, "{listed}");
    assert!(
        listed.lines().skip(1).all(|l| l.contains("Succeeded")),
        "{listed}"
    );

    // Cancelled while its state moves (held to 1 MiB/s, it would take a minute): rolled back,
    // the service where it was.
    let ip = cluster
        .wait_running_and_ready(&back, Duration::from_secs(30))
        .await;
    let before = ask_service(&ip, 8080).await.unwrap();
    let (ok, stdout, stderr) = kubectl_migrate(
        &cluster,
        &[
            &back,
            "--to-node",
            &second,
            "--bandwidth",
            "1Mi",
            "--no-wait",
        ],
    )
    .await;
    assert!(ok, "{stdout}\n{stderr}");
    let name = stdout
        .strip_prefix("livemigration/")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_owned();
    let id = poll(
        "the cancelled migration to move its state",
        Duration::from_secs(120),
        || async {
            let status = cluster.get_json(&["livemigration", &name])["status"].clone();
            (status["phase"] == "migrating")
                .then(|| status["migrationId"].as_str().unwrap().to_owned())
        },
    )
    .await;
    let (ok, stdout, stderr) = kubectl_migrate(&cluster, &["cancel", &id]).await;
    assert!(ok && stdout.contains("is aborted"), "{stdout}\n{stderr}");
    let record = poll(
        "the cancelled migration to end",
        Duration::from_secs(120),
        || async {
            let (_, record) = coordinator
                .call(&certs.ca, "GET", &format!("/migrations/{id}"), None)
                .await;
            (record["phase"] == "failed").then_some(record)
        },
    )
    .await;
    assert!(
        record["error"].as_str().unwrap().contains("aborted"),
        "{record}\n{}",
        logs()
    );
    poll("the copy to be gone", Duration::from_secs(60), || async {
        (selected(&cluster, "svc-dind") == vec![(back.clone(), first.clone())]).then_some(())
    })
    .await;
    moved(&cluster, "svc-dind", &back, &first, before.tick, &logs()).await;

    // A completion timeout (3 s per GiB, the pod's one GiB) with a cap that needs a minute:
    // aborted, the service where it was.
    let before = ask_service(&ip, 8080).await.unwrap();
    let (status, answer) = migrate(json!({
        "name": back, "destinationNode": second,
        "bandwidthPerMigration": "1Mi", "completionTimeoutPerGiB": 3,
    }))
    .await;
    assert_ne!(status, 200, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("did not complete within its completion timeout (3 s"),
        "{answer}\n{}",
        logs()
    );
    assert_eq!(answer["serviceRunsAt"], "source", "{answer}");
    poll(
        "the timed-out copy to be gone",
        Duration::from_secs(60),
        || async {
            (selected(&cluster, "svc-dind") == vec![(back.clone(), first.clone())]).then_some(())
        },
    )
    .await;
    moved(&cluster, "svc-dind", &back, &first, before.tick, &logs()).await;

    // The same with allowPostCopy: past the timeout the pre-copy attempt is rolled back and
    // the move made again with post-copy (the copy runs before its memory has arrived).
    let before = ask_service(&ip, 8080).await.unwrap();
    let (status, report) = migrate(json!({
        "name": back, "destinationNode": second,
        "bandwidthPerMigration": "1Mi", "completionTimeoutPerGiB": 3, "allowPostCopy": true,
    }))
    .await;
    assert_eq!(status, 200, "{report}\n{}", logs());
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p[0].as_str())
        .collect();
    let switched = phases.iter().position(|p| *p == "switching");
    assert!(
        switched.is_some_and(
            |at| phases[..at].contains(&"migrating") && phases[at..].contains(&"migrating")
        ),
        "a pre-copy attempt, the switch, a post-copy attempt: {phases:?}"
    );
    assert!(
        report["sidecar"]["totals"]["postCopyMs"].is_u64(),
        "the move that completed was a post-copy: {report}"
    );
    let switched_copy = pod_name(&report["destination"]["pod"]);
    moved(
        &cluster,
        "svc-dind",
        &switched_copy,
        &second,
        before.tick,
        &logs(),
    )
    .await;
    wait_events(&cluster, &[&back], &["MigrationSwitchedToPostCopy"]).await;

    // kubectl describe tells the story: the refused attempt and each move, on the pods and
    // the LiveMigrations.
    wait_events(
        &cluster,
        &["svc-dind"],
        &[
            "MigrationStarted",
            "MigrationFailed",
            "MigrationCreating",
            "MigrationMigrating",
            "Migrated",
        ],
    )
    .await;
    wait_events(
        &cluster,
        &["dind-back", "pind-to-second"],
        &["MigrationStarted", "Migrated"],
    )
    .await;
}

/// `kubectl migrate ARGS` as Jane, the plugin on the PATH as kubectl finds plugins: whether it
/// succeeded, its stdout and stderr.
async fn kubectl_migrate(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let plugin = ums_tests::cluster::workspace_binary("kubectl-migrate", "kubectl-migrate");
    let path = format!(
        "{}:{}",
        plugin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kubeconfig = cluster.kubeconfig(User::Jane);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("kubectl")
            .env("PATH", path)
            .env("KUBECONFIG", kubeconfig)
            .arg("migrate")
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Waits (Events are written in the background) until the Events about the objects `names`
/// include each of `reasons`.
async fn wait_events(cluster: &Cluster, names: &[&str], reasons: &[&str]) {
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen: Vec<String> = names
            .iter()
            .flat_map(|n| event_reasons(cluster, n))
            .collect();
        let missing: Vec<&&str> = reasons
            .iter()
            .filter(|r| !seen.iter().any(|s| s == **r))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "no {missing:?} Event about {names:?}; there are {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The reasons of the Events about object `name`, oldest first.
fn event_reasons(cluster: &Cluster, name: &str) -> Vec<String> {
    let events = cluster.get_json(&["events"]);
    events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["involvedObject"]["name"] == name)
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// A pod of the plain test image bound to `node` (not wrapped), labelled `app: <name>`.
fn plain_pod(name: &str, node: &str, on_eviction: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "ums-rs/debian:trixie",
            "imagePullPolicy": "Never", "command": ["sleep", "infinity"]}]}
    });
    if on_eviction {
        pod["metadata"]["annotations"] = json!({"migration-eviction-strategy": "live-migrate"});
    }
    pod
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_drain_moves_the_pods_that_opted_in_one_at_a_time() {
    let (cluster, nodes) = Cluster::start_with_nodes(2);
    let (first, second) = (nodes[0].clone(), nodes[1].clone());
    let certs = CoordinatorCerts::generate(&cluster);
    // The migration policy: one migration at a time in the cluster.
    let coordinator = RunningCoordinator::start_with_env(
        &cluster,
        &certs,
        &[&certs.ca],
        &[("UMS_MAX_PARALLEL_MIGRATIONS", "1")],
    );
    coordinator.serve_evictions(&cluster, &certs);
    let logs = || {
        format!(
            "--- coordinator:\n{}\n--- nodes:\n{}",
            coordinator.log(),
            cluster.node_log()
        )
    };

    // Two wrapped pods that opted in, a plain pod that did not, and a plain one that opted in
    // but cannot move here (an orchestrator-level pod moves through the kubelet's checkpoint
    // API, which these Docker-runtime nodes lack: this coordinator has no kubelet credentials).
    create_on(&cluster, "opt-a", "dind", &first, true);
    create_on(&cluster, "opt-b", "dind", &first, true);
    for pod in [
        plain_pod("plain", &first, false),
        plain_pod("plain-opted", &first, true),
    ] {
        cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    }
    let mut before = Vec::new();
    for name in ["opt-a", "opt-b"] {
        let ip = ticking(&cluster, name).await;
        before.push(ask_service(&ip, 8080).await.unwrap().tick);
    }
    for name in ["plain", "plain-opted"] {
        cluster
            .wait_running_and_ready(name, Duration::from_secs(60))
            .await;
    }

    // A PodDisruptionBudget still protects what it protects: the eviction API answers 429.
    let budget = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "plain"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "plain"}}}});
    cluster.kubectl_with_input(User::Admin, &["create", "-f", "-"], &budget.to_string());
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": "plain", "namespace": "default"}});
    let refused = cluster
        .kubectl_with_input_result(
            User::Admin,
            &[
                "create",
                "--raw",
                "/api/v1/namespaces/default/pods/plain/eviction",
                "-f",
                "-",
            ],
            &eviction.to_string(),
        )
        .unwrap_err();
    assert!(refused.contains("disruption budget"), "{refused}");
    assert!(cluster
        .kubectl_result(User::Admin, &["get", "pod", "plain"])
        .is_ok());
    cluster.kubectl(User::Admin, &["delete", "pdb", "plain"]);

    // kubectl drain, unchanged, as an operator runs it.
    let mut command = cluster.drain_command(&first, 600);
    let drain = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&drain.stdout).into_owned(),
        String::from_utf8_lossy(&drain.stderr).into_owned(),
    );
    assert!(
        drain.status.success(),
        "kubectl drain failed\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}\n{}",
        logs()
    );
    assert!(
        stderr.contains("being live-migrated"),
        "drain never heard why it waits: {stderr}"
    );
    assert!(stdout.contains("drained"), "{stdout}");
    let node_object = cluster.get_json(&["node", &first]);
    assert_eq!(node_object["spec"]["unschedulable"], true, "cordoned");
    let left = cluster.get_json(&[
        "pods",
        "--field-selector",
        &format!("spec.nodeName={first}"),
    ]);
    assert_eq!(
        left["items"].as_array().unwrap().len(),
        0,
        "pods left on {first}: {left}"
    );

    // The opted-in pods moved with their state; the others were evicted.
    for (name, tick) in ["opt-a", "opt-b"].into_iter().zip(before) {
        let [(copy, node)] = selected(&cluster, name)
            .try_into()
            .unwrap_or_else(|s: Vec<_>| {
                panic!("{name}: the Service's selector reaches {s:?}\n{}", logs())
            });
        assert_eq!(node, second, "{name} moved to {node}");
        assert_ne!(copy, name);
        moved(&cluster, name, &copy, &second, tick, &logs()).await;
    }
    for name in ["plain", "plain-opted"] {
        assert!(selected(&cluster, name).is_empty(), "{name} was evicted");
    }

    // One migration at a time: the evictions came together, so one of the moves waited its
    // turn (queued); the opted-in plain pod's move was refused and it was evicted.
    let (status, records) = coordinator
        .call(&certs.ca, "GET", "/migrations", None)
        .await;
    assert_eq!(status, 200, "{records}");
    let records = records.as_array().unwrap();
    let of = |pod: &str| {
        records
            .iter()
            .find(|r| r["pod"] == format!("default/{pod}"))
            .unwrap_or_else(|| panic!("no migration of {pod}: {records:?}"))
            .clone()
    };
    let queued = |r: &Value| {
        r["phases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p[0] == "queued")
    };
    let (a, b) = (of("opt-a"), of("opt-b"));
    assert_eq!(
        (a["phase"].as_str(), b["phase"].as_str()),
        (Some("done"), Some("done"))
    );
    assert!(queued(&a) || queued(&b), "neither move waited: {a} {b}");
    let refused = of("plain-opted");
    assert_eq!(refused["phase"], "failed", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("no kubelet credentials"),
        "{refused}"
    );

    // The Events say it: deferred evictions, the wait, the moves, the refusal.
    wait_events(&cluster, &["opt-a"], &["EvictionDeferred", "Migrated"]).await;
    wait_events(&cluster, &["opt-a", "opt-b"], &["MigrationQueued"]).await;
    wait_events(
        &cluster,
        &["plain-opted"],
        &["MigrationFailed", "EvictedWithoutMigration"],
    )
    .await;
}

/// A pod running the workload (`mib` MiB checked, a counter on 8080, a journal in an emptyDir),
/// labelled `app: <name>`, bound to `node`; an ff pod (the workload built FROM the ff base
/// image) when `ff`, else an ordinary pod (the orchestrator-level interface).
fn unwrapped_pod(name: &str, image: &str, node: &str, ff: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [
            {"name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
             "env": [{"name": "WORKLOAD_MIB", "value": "32"},
                     {"name": "WORKLOAD_LISTEN", "value": "8080"},
                     {"name": "WORKLOAD_JOURNAL", "value": "/data/journal"}],
             "volumeMounts": [{"name": "data", "mountPath": "/data"}],
             "readinessProbe": {"tcpSocket": {"port": 8080}}}
        ],
        "volumes": [{"name": "data", "emptyDir": {}}]}
    });
    if ff {
        pod["metadata"]["annotations"] = json!({"migration-interface": "ff"});
    }
    pod
}

/// Creates [`unwrapped_pod`] `name` as Jane and waits until it runs and answers; its answer
/// and the ticks its emptyDir journal holds by then (some).
async fn start_unwrapped(
    cluster: &Cluster,
    name: &str,
    image: &str,
    node: &str,
    ff: bool,
) -> (ums_tests::service_pod::ServiceAnswer, Vec<u64>) {
    let pod = unwrapped_pod(name, image, node, ff);
    cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let ip = cluster
        .wait_running_and_ready(name, Duration::from_secs(180))
        .await;
    let answer = poll(
        &format!("{name} to answer"),
        Duration::from_secs(30),
        || async { ask_service(&ip, 8080).await },
    )
    .await;
    let journal = journal_ticks(&cluster.empty_dir(name, "data").join("journal"));
    assert!(
        !journal.is_empty(),
        "{name}'s journal has lines before the move"
    );
    (answer, journal)
}

/// On a cluster of two CRI nodes (containerd 2.x driven through the CRI, a kubelet endpoint
/// each): an ordinary pod (orchestrator-level, `ssu`) moves to the other node through the
/// kubelet's checkpoint API, its checkpoints pushed by the node part into the cluster's own
/// checkpoint registry, and back by a LiveMigration; a service-level (`ff`) pod moves by a
/// LiveMigration. Each time the copy has a name of its own, the labels, the named node, the
/// memory, the counter and the emptyDir journal.
#[tokio::test(flavor = "multi_thread")]
async fn unwrapped_and_service_level_pods_move_to_another_cri_node() {
    let (cluster, nodes) = Cluster::start_with_nodes_of(NodeRuntime::Cri, 2);
    let (first, second) = (nodes[0].clone(), nodes[1].clone());
    let certs = CoordinatorCerts::generate(&cluster);
    let coordinator = RunningCoordinator::start(&cluster, &certs, &[&certs.ca]);
    let logs = || {
        format!(
            "--- coordinator:\n{}\n--- nodes:\n{}",
            coordinator.log(),
            cluster.node_log()
        )
    };
    cluster.deploy_node_part_on(&first).await;
    cluster.deploy_node_part_on(&second).await;
    cluster.cri_node_import(ff_workload_image());

    // The orchestrator-level pod, by POST /migrate to the second node.
    let (before, journal) = start_unwrapped(
        &cluster,
        "svc-ssu",
        tls_registry_workload_image(),
        &first,
        false,
    )
    .await;
    let (status, report) = coordinator
        .call(
            &certs.ca,
            "POST",
            "/migrate",
            Some(json!({"name": "svc-ssu", "destinationNode": second})),
        )
        .await;
    assert_eq!(status, 200, "{report}\n{}", logs());
    // The figures the README quotes (run with --nocapture).
    eprintln!("ssu node-to-node report: {report}");
    assert_eq!(report["migrationInterface"], "ssu", "{report}");
    assert_eq!(report["destination"]["node"], second.as_str(), "{report}");
    let copy = pod_name(&report["destination"]["pod"]);
    assert!(
        copy.starts_with("svc-ssu-") && copy != "svc-ssu",
        "the copy has a name of its own: {copy}"
    );
    let transfers = report["sidecar"]["transfers"].as_array().unwrap();
    assert_eq!(transfers.len(), 1, "{report}");
    assert!(
        transfers[0]["bytes"].as_u64().unwrap() > 32 << 20,
        "the checkpoint holds the memory: {report}"
    );
    assert!(
        report["sidecar"]["emptyDirs"]["archiveBytes"]
            .as_u64()
            .unwrap()
            > 0,
        "{report}"
    );
    assert_gone(&cluster, "svc-ssu");
    moved(&cluster, "svc-ssu", &copy, &second, before.tick, &logs()).await;
    let copy_journal = cluster.empty_dir(&copy, "data").join("journal");
    journal_goes_on(&copy_journal, *journal.last().unwrap()).await;
    let archives: Vec<_> = std::fs::read_dir(cluster.node_checkpoint_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        archives.is_empty(),
        "the checkpoints are removed from the first node: {archives:?}"
    );

    // And back to the first node by a LiveMigration (the copy's node part sends it): the
    // second copy is named after the first pod, not after the copy.
    let back = live_move(&cluster, "ssu-back", &copy, &first, &logs()).await;
    assert_second_hop("svc-ssu", &copy, &back);
    moved(&cluster, "svc-ssu", &back, &first, before.tick, &logs()).await;

    // The service-level pod, by a LiveMigration to the second node.
    let (before, journal) =
        start_unwrapped(&cluster, "svc-ff", ff_workload_image(), &first, true).await;
    let copy = live_move(&cluster, "ff-to-second", "svc-ff", &second, &logs()).await;
    moved(&cluster, "svc-ff", &copy, &second, before.tick, &logs()).await;
    let copy_journal = cluster.empty_dir(&copy, "data").join("journal");
    journal_goes_on(&copy_journal, *journal.last().unwrap()).await;
    for pod in ["svc-ssu", "svc-ff"] {
        wait_events(&cluster, &[pod], &["MigrationStarted", "Migrated"]).await;
    }
}
