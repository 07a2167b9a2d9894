//! `ums-bench`: one run, on this machine, of every way to move the same stateful workload
//! between two runtime pods (the real ums-rs/dind and ums-rs/pind images, nested engines with
//! their CRIU), at several sizes:
//!
//! - `staged`: the engines' own commands, as UMS does minus rsync. Docker: `docker checkpoint
//!   create` -> copy the checkpoint directory -> `docker create` + `docker start --checkpoint`;
//!   Podman: `podman container checkpoint --export` (zstd) -> copy the file ->
//!   `podman container restore --import`.
//! - `sidecar`: the source sidecar's `POST /migrate` to the destination's (its report's
//!   downtime and total), and the sidecars' peak RSS (VmHWM).
//! - `criu`: CRIU's own dump (to tmpfs) and restore of the same workload run as a plain
//!   process in the runtime container: the floor an engine path is compared with.
//! - `ssu`: the orchestrator-level interface: the same workload as an ordinary pod on a CRI
//!   node (containerd 2.x + CRIU) of one test cluster, moved to another by one `POST /migrate`
//!   on its coordinator (kubelet checkpoint -> node part -> destination registry -> restore);
//!   downtime is from the checkpoint request to the restored pod ready, and the divergence
//!   window (the source running on after its dump) is among the parts. Engine `containerd`.
//! - `ff`: the service-level interface: the workload built FROM the ff base image, an ff pod
//!   on a CRI node (no privilege), moved to another CRI cluster by one `POST /migrate`; its
//!   ums-ff dumps it from inside the container and streams it to the copy's ums-ff. Downtime is
//!   ums-ff's (freeze to restored); the RSS column is the two ums-ff supervisors' peak.
//!
//! Prints one table (downtime and total per method, the ratios to staged and to CRIU) and
//! writes it as JSON and as an SVG bar chart (`--out`, default `docs/bench`).
//!
//!   scripts/bench.sh [--sizes 256,1024] [--engines docker,podman] [--out docs/bench]

#![allow(clippy::unwrap_used)] // a benchmark on the test harness: a panic is the failure report

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;
use serde_json::json;
use ums_sidecar::engine::EngineKind;
use ums_tests::outer::docker;
use ums_tests::poll;
use ums_tests::runtime_pod::RuntimePod;
use ums_tests::workload::{pod_annotations, registry_workload_image, WorkloadContainer};

#[derive(Debug, Parser)]
#[command(name = "ums-bench", about = "staged vs sidecar vs CRIU, one run")]
struct Args {
    /// Workload sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    sizes: Vec<u32>,
    /// Engines: docker (dind), podman (pind).
    #[arg(long, value_delimiter = ',', default_value = "podman,docker")]
    engines: Vec<String>,
    /// Methods: staged, sidecar, postcopy (the sidecar with `postCopy`), criu, shaped and
    /// shaped-postcopy (the sidecar over a link shaped to 1 Gbit/s with tc between the two
    /// pods' network namespaces), ssu (the orchestrator-level interface, on CRI nodes: once per
    /// size, whatever the engines), ff (the service-level interface, on CRI nodes, likewise),
    /// cluster and node (a dind pod moved by one POST /migrate on its coordinator, to another
    /// cluster or to another node of its own; once per size; not in the default list),
    /// ssu-node and ff-node (ssu and ff to the other CRI node of the pod's cluster; not in the
    /// default list).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "staged,sidecar,postcopy,criu,shaped,shaped-postcopy,ssu,ff"
    )]
    methods: Vec<String>,
    /// Set up a source (workload running) and a passive destination for the first engine and
    /// size, print their names and URLs, and wait (Ctrl-C removes them): for experiments.
    #[arg(long)]
    hold: bool,
    /// `kubectl drain` of a node holding this many opted-in dind pods (of the first size),
    /// once per limit of --drain-limits: the time drain takes (method `drain`).
    #[arg(long, value_delimiter = ',')]
    drain_pods: Vec<usize>,
    /// The migration policy's limits (migrations at once, in the cluster and from the node)
    /// the drains run with.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    drain_limits: Vec<usize>,
    /// Where the JSON and the SVG go (`<out>.json`, `<out>.svg`).
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
}

const TOKEN: &str = "bench-token";
const NAME: &str = "app";

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    engine: String,
    mib: u32,
    method: &'static str,
    downtime_ms: u64,
    total_ms: u64,
    /// The parts, milliseconds.
    parts: BTreeMap<String, u64>,
    /// Peak RSS of the sidecars (source, destination), KiB; sidecar rows only.
    #[serde(skip_serializing_if = "Option::is_none")]
    sidecar_peak_rss_kib: Option<(u64, u64)>,
    /// Bytes on the wire (sidecar rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_sent: Option<u64>,
}

/// Runs `sh -c script` in the outer container `pod`; panics with its output on failure.
fn sh(pod: &RuntimePod, script: &str) -> String {
    docker(&["exec", &pod.name, "sh", "-c", script])
}

/// Copies `path` from one runtime container to the same place in the other.
fn copy_between(from: &RuntimePod, to: &RuntimePod, path: &str) {
    let (dir, base) = path.rsplit_once('/').unwrap();
    copy_into(from, dir, base, to, dir);
}

/// Copies `dir/base` from one runtime container into `to_dir` of the other (tar through two
/// `docker exec`s).
fn copy_into(from: &RuntimePod, dir: &str, base: &str, to: &RuntimePod, to_dir: &str) {
    let mut reader = Command::new("docker")
        .args(["exec", &from.name, "tar", "-C", dir, "-c", base])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let writer = Command::new("docker")
        .args([
            "exec",
            "-i",
            &to.name,
            "sh",
            "-c",
            &format!("mkdir -p {to_dir} && tar -C {to_dir} -x"),
        ])
        .stdin(reader.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(
        reader.wait().unwrap().success() && writer.success(),
        "copy of {dir}/{base}"
    );
}

fn workload(mib: u32) -> WorkloadContainer<'static> {
    WorkloadContainer {
        name: NAME,
        image: registry_workload_image(),
        mib,
        seed: 7,
        env: vec![],
        pull_policy: None,
    }
}

fn annotations(kind: EngineKind, mib: u32, mode: &str) -> BTreeMap<String, String> {
    let mut a = pod_annotations(&[workload(mib)], mode);
    a.insert(
        "migration-interface".into(),
        if kind == EngineKind::Podman {
            "pind"
        } else {
            "dind"
        }
        .into(),
    );
    a
}

/// A source pod running the workload (memory filled) and a passive destination.
async fn pair(kind: EngineKind, mib: u32) -> (RuntimePod, RuntimePod) {
    let source = RuntimePod::start(kind, &annotations(kind, mib, "active"), Some(TOKEN));
    let destination = RuntimePod::start(kind, &annotations(kind, mib, "passive"), Some(TOKEN));
    for (pod, status) in [(&source, 200), (&destination, 204)] {
        poll(
            "the workload container",
            Duration::from_secs(120),
            || async { (pod.get(&format!("/probe/{NAME}")).await.0 == status).then_some(()) },
        )
        .await;
    }
    // The workload fills its memory before its first tick.
    poll(
        "the workload's memory",
        Duration::from_secs(300),
        || async {
            let lines = source.output_lines(NAME).await;
            lines.iter().any(|l| l.contains("tick=")).then_some(())
        },
    )
    .await;
    (source, destination)
}

/// Lets the machine settle before a timed part: dirty pages of the set-up written back, the
/// previous run's containers gone, so each method starts from the same state.
async fn settle() {
    let _ = Command::new("sync").status();
    tokio::time::sleep(Duration::from_secs(3)).await;
}

/// The workload's tick is running again after a restore (its memory check intact).
async fn check_running(pod: &RuntimePod, container: &str) {
    let logs = |pod: &RuntimePod| {
        Command::new("docker")
            .args([
                "exec",
                &pod.name,
                pod.engine_cli(),
                "logs",
                "--tail",
                "3",
                container,
            ])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default()
    };
    let first = logs(pod);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = logs(pod);
    assert!(
        second.contains("mem=ok") && second != first,
        "{container} does not run with its memory after the restore:\n{second}"
    );
}

async fn staged(kind: EngineKind, mib: u32) -> Row {
    let (source, destination) = pair(kind, mib).await;
    settle().await;
    let cli = source.engine_cli();
    let mut parts = BTreeMap::new();
    let started = Instant::now();
    match kind {
        EngineKind::Podman => {
            let file = "/var/lib/containers/bench-checkpoint.tar.zst";
            let t = Instant::now();
            sh(
                &source,
                &format!("podman container checkpoint --export {file} --compress zstd {NAME}"),
            );
            parts.insert("dump".into(), t.elapsed().as_millis() as u64);
            let t = Instant::now();
            copy_between(&source, &destination, file);
            parts.insert("copy".into(), t.elapsed().as_millis() as u64);
            let t = Instant::now();
            sh(
                &destination,
                &format!("podman container restore --import {file} --name bench-restored"),
            );
            parts.insert("restore".into(), t.elapsed().as_millis() as u64);
        }
        EngineKind::Docker => {
            // Docker 26 restores only from a container's own checkpoint directory
            // (`custom checkpointdir is not supported`): the checkpoint is copied into the
            // destination container's, as UMS does.
            let t = Instant::now();
            sh(&source, &format!("docker checkpoint create {NAME} cp1"));
            parts.insert("dump".into(), t.elapsed().as_millis() as u64);
            let source_id = sh(
                &source,
                &format!("docker inspect --format '{{{{.Id}}}}' {NAME}"),
            );
            let t = Instant::now();
            let image = registry_workload_image();
            let destination_id = sh(
                &destination,
                &format!("docker create --name bench-restored {image} {mib} 7"),
            );
            parts.insert("create".into(), t.elapsed().as_millis() as u64);
            let t = Instant::now();
            copy_into(
                &source,
                &format!("/var/lib/docker/containers/{source_id}/checkpoints"),
                "cp1",
                &destination,
                &format!("/var/lib/docker/containers/{destination_id}/checkpoints"),
            );
            parts.insert("copy".into(), t.elapsed().as_millis() as u64);
            let t = Instant::now();
            sh(&destination, "docker start --checkpoint cp1 bench-restored");
            parts.insert("restore".into(), t.elapsed().as_millis() as u64);
        }
        EngineKind::Ff => panic!("the staged-commands method runs a nested engine (dind or pind)"),
    }
    let total = started.elapsed().as_millis() as u64;
    check_running(&destination, "bench-restored").await;
    Row {
        engine: cli.into(),
        mib,
        method: "staged",
        downtime_ms: total,
        total_ms: total,
        parts,
        sidecar_peak_rss_kib: None,
        bytes_sent: None,
    }
}

fn peak_rss_kib(pod: &RuntimePod) -> u64 {
    sh(pod, "grep VmHWM /proc/$(pidof ums-sidecar)/status")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The link rate of the `shaped` method, bits per second (tc's `1gbit`).
const SHAPED_RATE_BITS: u64 = 1_000_000_000;

async fn sidecar(kind: EngineKind, mib: u32, shaped: bool, post_copy: bool) -> Row {
    let (source, destination) = pair(kind, mib).await;
    if shaped {
        // The source pod's egress (the state's direction) through a token bucket at 1 Gbit/s.
        sh(
            &source,
            "tc qdisc add dev eth0 root tbf rate 1gbit burst 1mb latency 100ms",
        );
    }
    settle().await;
    let (status, report) = source
        .post(
            "/migrate",
            &json!({ "destination": destination.url, "postCopy": post_copy }),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    let totals = &report["totals"];
    let ms = |k: &str| totals[k].as_u64().unwrap_or(0);
    let mut parts: BTreeMap<String, u64> =
        ["preflightMs", "freezeDumpMs", "transferMs", "restoreMs"]
            .iter()
            .map(|k| (k.trim_end_matches("Ms").to_owned(), ms(k)))
            .collect();
    if post_copy {
        parts.insert("postCopy".into(), ms("postCopyMs"));
    }
    let rss = (peak_rss_kib(&source), peak_rss_kib(&destination));
    check_running(&destination, NAME).await;
    Row {
        engine: source.engine_cli().into(),
        mib,
        method: match (shaped, post_copy) {
            (true, true) => "shaped-postcopy",
            (true, false) => "shaped",
            (false, true) => "postcopy",
            (false, false) => "sidecar",
        },
        downtime_ms: ms("downtimeMs"),
        total_ms: ms("totalMs"),
        parts,
        sidecar_peak_rss_kib: Some(rss),
        bytes_sent: Some(ms("bytesSent") + ms("pageBytes")),
    }
}

/// CRIU's own dump to tmpfs and restore of the workload as a plain process in the runtime
/// container (no engine, no transfer).
async fn criu(kind: EngineKind, mib: u32) -> Row {
    let pod = RuntimePod::start(kind, &annotations(kind, mib, "null"), Some(TOKEN));
    // The harness removes its build of the workload once the image is made: build it again.
    let binary = std::env::temp_dir().join(format!("ums-bench-workload-{}", std::process::id()));
    let built = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/workload/workload.c"))
        .status()
        .unwrap();
    assert!(built.success(), "gcc of the workload");
    let copied = Command::new("docker")
        .arg("cp")
        .arg(&binary)
        .arg(format!("{}:/usr/local/bin/bench-workload", pod.name))
        .status()
        .unwrap();
    assert!(copied.success());
    let _ = std::fs::remove_file(&binary);
    let pid = sh(
        &pod,
        &format!(
            "cd /tmp && setsid bench-workload {mib} 7 </dev/null >/tmp/bench.log 2>&1 & echo $!"
        ),
    );
    poll(
        "the plain workload's memory",
        Duration::from_secs(300),
        || async {
            sh(&pod, "cat /tmp/bench.log")
                .contains("tick=")
                .then_some(())
        },
    )
    .await;
    // A tmpfs of its own (the container's /dev/shm holds 64 MiB).
    let images = "/run/bench-criu";
    sh(
        &pod,
        &format!(
            "mkdir -p {images} && mount -t tmpfs -o size={}m tmpfs {images}",
            mib * 2 + 256
        ),
    );
    settle().await;
    let t = Instant::now();
    sh(
        &pod,
        &format!("mkdir -p {images} && criu dump -t {pid} -D {images} --shell-job"),
    );
    let dump = t.elapsed().as_millis() as u64;
    let t = Instant::now();
    sh(&pod, &format!("criu restore -D {images} --shell-job -d"));
    let restore = t.elapsed().as_millis() as u64;
    let before = sh(&pod, "tail -1 /tmp/bench.log");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = sh(&pod, "tail -1 /tmp/bench.log");
    assert!(
        after.contains("mem=ok") && after != before,
        "CRIU's restore runs: {after}"
    );
    Row {
        engine: pod.engine_cli().into(),
        mib,
        method: "criu",
        downtime_ms: dump + restore,
        total_ms: dump + restore,
        parts: BTreeMap::from([("dump".into(), dump), ("restore".into(), restore)]),
        sidecar_peak_rss_kib: None,
        bytes_sent: None,
    }
}

/// The workload as a pod on one CRI cluster's node (`ff`: built FROM the ff base image and
/// annotated for the service-level interface; otherwise an ordinary pod, with the node part
/// deployed), moved by one `POST /migrate` on its coordinator to another CRI cluster, or
/// (`node_to_node`) to the other CRI node of its own; the coordinator's report, the restored
/// workload's memory checked.
async fn moved_on_cri_nodes(mib: u32, ff: bool, node_to_node: bool) -> serde_json::Value {
    if node_to_node {
        return moved_between_cri_nodes(mib, ff).await;
    }
    let two = ums_tests::coordinator::TwoClusters::start_with_cri_nodes();
    let image = if ff {
        let image = ums_tests::workload::ff_workload_image();
        for cluster in [&two.edge, &two.cloud] {
            cluster.cri_node_import(image);
        }
        image
    } else {
        two.edge.deploy_node_part().await;
        ums_tests::workload::tls_registry_workload_image()
    };
    let report = created_and_moved(&two, &cri_workload_pod(mib, image, ff)).await;
    restored_memory_ok(&report).await;
    report
}

/// [`moved_on_cri_nodes`] inside one cluster of two CRI nodes, to the second node.
async fn moved_between_cri_nodes(mib: u32, ff: bool) -> serde_json::Value {
    use ums_tests::cluster::{Cluster, NodeRuntime};
    use ums_tests::coordinator::{CoordinatorCerts, RunningCoordinator};
    let (cluster, nodes) = Cluster::start_with_nodes_of(NodeRuntime::Cri, 2);
    let certs = CoordinatorCerts::generate(&cluster);
    let coordinator = RunningCoordinator::start(&cluster, &certs, &[&certs.ca]);
    let image = if ff {
        let image = ums_tests::workload::ff_workload_image();
        cluster.cri_node_import(image);
        image
    } else {
        cluster.deploy_node_part_on(&nodes[0]).await;
        ums_tests::workload::tls_registry_workload_image()
    };
    let mut pod: serde_json::Value =
        serde_json::from_str(&cri_workload_pod(mib, image, ff)).unwrap();
    pod["spec"]["nodeName"] = json!(nodes[0]);
    let report =
        created_and_moved_to_node(&cluster, &coordinator, &certs, &pod.to_string(), &nodes[1])
            .await;
    restored_memory_ok(&report).await;
    report
}

/// Creates `pod` (named NAME, bound to a node) in `cluster` as Jane, waits until its workload
/// listens (its memory filled), and moves it to node `to` with one `POST /migrate` on the
/// cluster's coordinator; the report.
async fn created_and_moved_to_node(
    cluster: &ums_tests::cluster::Cluster,
    coordinator: &ums_tests::coordinator::RunningCoordinator,
    certs: &ums_tests::coordinator::CoordinatorCerts,
    pod: &str,
    to: &str,
) -> serde_json::Value {
    cluster.kubectl_with_input(ums_tests::cluster::User::Jane, &["create", "-f", "-"], pod);
    cluster
        .wait_running_and_ready(NAME, Duration::from_secs(600))
        .await;
    settle().await;
    let (status, report) = coordinator
        .call(
            &certs.ca,
            "POST",
            "/migrate",
            Some(json!({"name": NAME, "destinationNode": to})),
        )
        .await;
    assert_eq!(status, 200, "{report}\n{}", coordinator.log());
    report
}

/// The restored workload (at the report's destination) has its memory.
async fn restored_memory_ok(report: &serde_json::Value) {
    let ip = report["destination"]["podIp"].as_str().unwrap();
    let answer = ums_tests::service_pod::ask_service(ip, 8080).await.unwrap();
    assert!(
        answer.memory_ok,
        "the restored workload's memory: {answer:?}"
    );
}

/// The workload pod (named NAME) of `mib` MiB running `image`, an ff pod if `ff`.
fn cri_workload_pod(mib: u32, image: &str, ff: bool) -> String {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": NAME},
        "spec": {"containers": [{"name": NAME, "image": image,
            "imagePullPolicy": "IfNotPresent",
            "env": [{"name": "WORKLOAD_MIB", "value": mib.to_string()},
                    {"name": "WORKLOAD_LISTEN", "value": "8080"}],
            "readinessProbe": {"tcpSocket": {"port": 8080}}}]}
    });
    if ff {
        pod["metadata"]["annotations"] = json!({"migration-interface": "ff"});
    }
    pod.to_string()
}

/// Creates `pod` (named NAME) in edge as Jane, waits until its workload listens (its memory
/// filled), and moves it to cloud with one `POST /migrate`; the report.
async fn created_and_moved(
    two: &ums_tests::coordinator::TwoClusters,
    pod: &str,
) -> serde_json::Value {
    use ums_tests::cluster::User;
    two.edge
        .kubectl_with_input(User::Jane, &["create", "-f", "-"], pod);
    two.edge
        .wait_running_and_ready(NAME, Duration::from_secs(600))
        .await;
    settle().await;
    let (status, report) = two
        .migrate(json!({"name": NAME, "destinationUrl": two.destination}))
        .await;
    assert_eq!(status, 200, "{report}\n{}", two.coordinator_logs());
    report
}

/// The coordinator's phases of a migration's report, milliseconds by phase.
fn phase_parts(report: &serde_json::Value) -> BTreeMap<String, u64> {
    report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_u64()?)))
        .collect()
}

/// The orchestrator-level interface: the workload as an ordinary pod on one CRI cluster's
/// node, moved to another CRI cluster (or, `node_to_node`, to the other node of its cluster)
/// by one `POST /migrate` on its coordinator.
async fn ssu(mib: u32, node_to_node: bool) -> Row {
    let report = moved_on_cri_nodes(mib, false, node_to_node).await;
    let mut parts = phase_parts(&report);
    let details = &report["sidecar"];
    parts.insert(
        "divergence".into(),
        details["divergenceMs"].as_u64().unwrap_or(0),
    );
    let downtime = ["checkpointing", "stopping", "transferring", "creating"]
        .iter()
        .map(|p| parts.get(*p).copied().unwrap_or(0))
        .sum();
    Row {
        engine: "containerd".into(),
        mib,
        method: if node_to_node { "ssu-node" } else { "ssu" },
        downtime_ms: downtime,
        total_ms: report["totalMs"].as_u64().unwrap_or(0),
        parts,
        sidecar_peak_rss_kib: None,
        bytes_sent: details["totals"]["contentBytes"].as_u64(),
    }
}

/// The service-level interface: the workload built FROM the ff base image as an ff pod on one
/// CRI cluster's node (no privilege), moved to another CRI cluster by one `POST /migrate`; its
/// ums-ff dumps it from inside the container and streams it to the copy's ums-ff.
async fn ff(mib: u32, node_to_node: bool) -> Row {
    let report = moved_on_cri_nodes(mib, true, node_to_node).await;
    let details = &report["sidecar"];
    let totals = &details["totals"];
    let ms = |k: &str| totals[k].as_u64().unwrap_or(0);
    let parts: BTreeMap<String, u64> = ["preflightMs", "freezeDumpMs", "transferMs", "restoreMs"]
        .iter()
        .map(|k| (k.trim_end_matches("Ms").to_owned(), ms(k)))
        .collect();
    let rss = (
        ms("supervisorPeakRssKib"),
        details["restored"]["supervisorPeakRssKib"]
            .as_u64()
            .unwrap_or(0),
    );
    Row {
        engine: "containerd".into(),
        mib,
        method: if node_to_node { "ff-node" } else { "ff" },
        downtime_ms: ms("downtimeMs"),
        total_ms: report["totalMs"].as_u64().unwrap_or(0),
        parts,
        sidecar_peak_rss_kib: Some(rss),
        bytes_sent: Some(ms("bytesSent")),
    }
}

/// A user's dind service pod of `mib` MiB named NAME, bound to `node` (if any), opted in to
/// live migration on eviction if `on_eviction`.
fn dind_service(name: &str, mib: u32, node: Option<&str>, on_eviction: bool) -> String {
    let mut pod = ums_tests::service_pod::service_pod(name, "dind", None, &[(NAME, mib)]);
    if on_eviction {
        pod["metadata"]["annotations"]["migration-eviction-strategy"] = json!("live-migrate");
    }
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    pod.to_string()
}

/// Methods `cluster` and `node`: a dind pod moved by one `POST /migrate` on its coordinator,
/// to another cluster (Docker nodes) or to another node of its cluster.
async fn through_coordinator(mib: u32, node_to_node: bool) -> Row {
    use ums_tests::cluster::Cluster;
    use ums_tests::coordinator::{CoordinatorCerts, RunningCoordinator, TwoClusters};
    let report = if node_to_node {
        let mut cluster = Cluster::start_with_node();
        let first = cluster.first_node().to_owned();
        let second = cluster.add_node();
        let certs = CoordinatorCerts::generate(&cluster);
        let coordinator = RunningCoordinator::start(&cluster, &certs, &[&certs.ca]);
        let pod = dind_service(NAME, mib, Some(&first), false);
        created_and_moved_to_node(&cluster, &coordinator, &certs, &pod, &second).await
    } else {
        let two = TwoClusters::start();
        created_and_moved(&two, &dind_service(NAME, mib, None, false)).await
    };
    let totals = &report["sidecar"]["totals"];
    let ms = |k: &str| totals[k].as_u64().unwrap_or(0);
    let mut parts = phase_parts(&report);
    for k in ["freezeDumpMs", "transferMs", "restoreMs"] {
        parts.insert(k.trim_end_matches("Ms").to_owned(), ms(k));
    }
    Row {
        engine: "docker".into(),
        mib,
        method: if node_to_node { "node" } else { "cluster" },
        downtime_ms: ms("downtimeMs"),
        total_ms: report["totalMs"].as_u64().unwrap_or(0),
        parts,
        sidecar_peak_rss_kib: None,
        bytes_sent: Some(ms("bytesSent")),
    }
}

/// Method `drain`: `kubectl drain` of a node holding `pods` opted-in dind pods of `mib` MiB,
/// with at most `limit` migrations at once (in the cluster and from the node); the time drain
/// takes, from its start to its exit.
async fn drain(pods: usize, limit: usize, mib: u32) -> Row {
    use ums_tests::cluster::{Cluster, User};
    use ums_tests::coordinator::{CoordinatorCerts, RunningCoordinator};
    let mut cluster = Cluster::start_with_node();
    let first = cluster.first_node().to_owned();
    cluster.add_node();
    let certs = CoordinatorCerts::generate(&cluster);
    let limit_text = limit.to_string();
    let coordinator = RunningCoordinator::start_with_env(
        &cluster,
        &certs,
        &[&certs.ca],
        &[
            ("UMS_MAX_PARALLEL_MIGRATIONS", &limit_text),
            ("UMS_MAX_OUTBOUND_PER_NODE", &limit_text),
        ],
    );
    coordinator.serve_evictions(&cluster, &certs);
    let names: Vec<String> = (0..pods).map(|i| format!("svc-{i}")).collect();
    for name in &names {
        let pod = dind_service(name, mib, Some(&first), true);
        cluster.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod);
    }
    for name in &names {
        cluster
            .wait_running_and_ready(name, Duration::from_secs(900))
            .await;
    }
    settle().await;
    let started = Instant::now();
    let output = cluster.drain_command(&first, 1800).output().unwrap();
    let took = started.elapsed().as_millis() as u64;
    assert!(
        output.status.success(),
        "kubectl drain failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        coordinator.log()
    );
    Row {
        engine: "docker".into(),
        mib,
        method: "drain",
        downtime_ms: 0,
        total_ms: took,
        parts: BTreeMap::from([
            ("pods".to_owned(), pods as u64),
            ("limit".to_owned(), limit as u64),
        ]),
        sidecar_peak_rss_kib: None,
        bytes_sent: None,
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| engine | MiB | method | downtime s | total s | / staged | / CRIU | parts (ms) | agent peak RSS MiB (src/dst: sidecars, or the ums-ff supervisors) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let of = |method: &str| {
            rows.iter()
                .find(|r| r.engine == row.engine && r.mib == row.mib && r.method == method)
                .map(|r| r.downtime_ms)
        };
        let ratio = |base: Option<u64>| match base {
            Some(b) if b > 0 => format!("{:.2}", row.downtime_ms as f64 / b as f64),
            _ => "-".into(),
        };
        let parts: Vec<String> = row.parts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let rss = row
            .sidecar_peak_rss_kib
            .map(|(s, d)| format!("{:.1} / {:.1}", s as f64 / 1024.0, d as f64 / 1024.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} |",
            row.engine,
            row.mib,
            row.method,
            row.downtime_ms as f64 / 1000.0,
            row.total_ms as f64 / 1000.0,
            ratio(of("staged")),
            ratio(of("criu")),
            parts.join(", "),
            rss
        );
    }
    let shaped: Vec<&Row> = rows
        .iter()
        .filter(|r| r.method.starts_with("shaped"))
        .collect();
    if shaped.is_empty() {
        return;
    }
    println!(
        "\nOver a link shaped to {} Gbit/s (tc tbf on the source pod's eth0):\n",
        SHAPED_RATE_BITS / 1_000_000_000
    );
    println!(
        "| engine | MiB | method | downtime s | total s | bytes | bytes / rate + CRIU s | total / that |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in shaped {
        let criu = rows
            .iter()
            .find(|r| r.engine == row.engine && r.mib == row.mib && r.method == "criu")
            .map(|r| r.downtime_ms);
        let bytes = row.bytes_sent.unwrap_or(0);
        let wire_s = bytes as f64 * 8.0 / SHAPED_RATE_BITS as f64;
        let (bound, ratio) = match criu {
            Some(c) => {
                let bound = wire_s + c as f64 / 1000.0;
                (
                    format!("{bound:.2}"),
                    format!("{:.2}", row.total_ms as f64 / 1000.0 / bound),
                )
            }
            None => ("- (no criu row)".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} |",
            row.engine,
            row.mib,
            row.method,
            row.downtime_ms as f64 / 1000.0,
            row.total_ms as f64 / 1000.0,
            bytes,
            bound,
            ratio
        );
    }
}

/// A grouped bar chart of the downtimes: one group per engine and size, one bar per method.
fn svg(rows: &[Row]) -> String {
    let mut groups: Vec<(String, u32)> = Vec::new();
    for r in rows {
        if !groups.contains(&(r.engine.clone(), r.mib)) {
            groups.push((r.engine.clone(), r.mib));
        }
    }
    let methods = ["staged", "sidecar", "postcopy", "criu", "ssu", "ff"];
    let colors = [
        "#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b",
    ];
    let max = rows
        .iter()
        .filter(|r| methods.contains(&r.method))
        .map(|r| r.downtime_ms)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (bar, gap, height, left, top) = (28.0, 30.0, 300.0, 60.0, 40.0);
    let width = left + groups.len() as f64 * (methods.len() as f64 * bar + gap) + 160.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"{left}\" y=\"20\" font-size=\"14\">Downtime (s), one run of scripts/bench.sh</text>\n",
        height + top + 60.0
    );
    out.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        top + height,
        width - 150.0,
        top + height
    ));
    for (g, (engine, mib)) in groups.iter().enumerate() {
        let x0 = left + g as f64 * (methods.len() as f64 * bar + gap) + gap / 2.0;
        for (m, method) in methods.iter().enumerate() {
            if let Some(r) = rows
                .iter()
                .find(|r| &r.engine == engine && r.mib == *mib && r.method == *method)
            {
                let h = r.downtime_ms as f64 / max * height;
                let x = x0 + m as f64 * bar;
                out.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{:.1}</text>\n",
                    top + height - h,
                    bar - 2.0,
                    colors[m],
                    x + bar / 2.0,
                    top + height - h - 3.0,
                    r.downtime_ms as f64 / 1000.0
                ));
            }
        }
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{engine} {mib} MiB</text>\n",
            x0 + 2.0 * bar,
            top + height + 18.0
        ));
    }
    for (m, method) in methods.iter().enumerate() {
        let y = top + 20.0 * m as f64;
        out.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{method}</text>\n",
            width - 140.0,
            colors[m],
            width - 122.0,
            y + 11.0
        ));
    }
    out.push_str("</svg>\n");
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    for engine in &args.engines {
        let kind = match engine.as_str() {
            "docker" => EngineKind::Docker,
            "podman" => EngineKind::Podman,
            other => anyhow::bail!("unknown engine {other:?}: docker or podman"),
        };
        if args.hold {
            let mib = args.sizes.first().copied().unwrap_or(256);
            let (source, destination) = pair(kind, mib).await;
            println!(
                "source {} {}\ndestination {} {}\ntoken {TOKEN}\n(Ctrl-C to remove them)",
                source.name, source.url, destination.name, destination.url
            );
            tokio::signal::ctrl_c().await?;
            return Ok(());
        }
        for &mib in &args.sizes {
            for method in [
                "staged",
                "sidecar",
                "postcopy",
                "criu",
                "shaped",
                "shaped-postcopy",
            ] {
                if !args.methods.iter().any(|m| m == method) {
                    continue;
                }
                eprint!("[bench] {engine} {mib} MiB {method} ... ");
                std::io::stderr().flush().ok();
                let row = match method {
                    "staged" => staged(kind, mib).await,
                    "sidecar" => sidecar(kind, mib, false, false).await,
                    "postcopy" => sidecar(kind, mib, false, true).await,
                    "shaped" => sidecar(kind, mib, true, false).await,
                    "shaped-postcopy" => sidecar(kind, mib, true, true).await,
                    _ => criu(kind, mib).await,
                };
                eprintln!("downtime {} ms, total {} ms", row.downtime_ms, row.total_ms);
                rows.push(row);
            }
        }
    }
    // Through the coordinator: a dind pod to another cluster and to another node of its own
    // (Docker nodes); an ordinary pod (ssu) and an ff pod between CRI clusters, and to the
    // other CRI node of their cluster.
    for method in ["cluster", "node", "ssu", "ssu-node", "ff", "ff-node"] {
        if !args.methods.iter().any(|m| m == method) || args.hold {
            continue;
        }
        for &mib in &args.sizes {
            let engine = if matches!(method, "cluster" | "node") {
                "docker"
            } else {
                "containerd"
            };
            eprint!("[bench] {engine} {mib} MiB {method} ... ");
            std::io::stderr().flush().ok();
            let row = match method {
                "cluster" => through_coordinator(mib, false).await,
                "node" => through_coordinator(mib, true).await,
                "ssu" => ssu(mib, false).await,
                "ssu-node" => ssu(mib, true).await,
                "ff" => ff(mib, false).await,
                _ => ff(mib, true).await,
            };
            eprintln!("downtime {} ms, total {} ms", row.downtime_ms, row.total_ms);
            rows.push(row);
        }
    }
    for &pods in &args.drain_pods {
        for &limit in &args.drain_limits {
            let mib = args.sizes.first().copied().unwrap_or(256);
            eprint!("[bench] kubectl drain, {pods} x {mib} MiB dind pods, limit {limit} ... ");
            std::io::stderr().flush().ok();
            let row = drain(pods, limit, mib).await;
            eprintln!("{} ms", row.total_ms);
            rows.push(row);
        }
    }
    print_table(&rows);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json_path = args.out.with_extension("json");
    let svg_path = args.out.with_extension("svg");
    std::fs::write(&json_path, serde_json::to_string_pretty(&rows)? + "\n")?;
    std::fs::write(&svg_path, svg(&rows))?;
    println!(
        "\nwritten: {} and {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}
