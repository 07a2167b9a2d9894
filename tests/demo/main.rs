//! `ums-demo`: the main job on this machine. Two clusters ("edge" and "cloud": an API server
//! built from Kubernetes' own library, the webhook image configured by deploy/base, a node
//! agent each), a stateful service in a wrapped pod created by a user in the edge cluster, a
//! passive copy in the cloud cluster, and the live migration between them over the pod network,
//! with progress while it runs and the report at the end. Everything is stopped at the end.
//!
//! `--interface ssu`: the orchestrator-level interface instead. Both clusters get a CRI node
//! (containerd 2.x + CRIU, driven through the CRI as a kubelet drives it), the service is an
//! ordinary pod without any annotation, the node part (deploy/node) runs in edge, and the same
//! call moves the pod through the kubelet's checkpoint API and checkpoint images.
//!
//! `--interface ff`: the service-level interface on the same CRI nodes. The service's image is
//! built FROM the ff base image (ums-ff as its entrypoint); the webhook gives its one container
//! CHECKPOINT_RESTORE and an unconfined seccomp profile, no privilege; the same call has the
//! pod's ums-ff dump the service from inside the container and stream it to the copy's ums-ff.

#![allow(clippy::unwrap_used)] // a demo on the test harness: a panic is the failure report

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use ums_contract::credential::Scope;
use ums_tests::cluster::{Cluster, User};
use ums_tests::coordinator::{call, CoordinatorCerts, Credential, RunningCoordinator};
use ums_tests::service_pod::{container_output, service_pod};
use ums_tests::workload::ticks;

#[derive(Debug, Parser)]
#[command(
    name = "ums-demo",
    about = "A live migration of a wrapped pod between two clusters on this machine"
)]
struct Args {
    /// Memory of the stateful service, MiB.
    #[arg(default_value_t = 256)]
    mib: u32,
    /// dind, pind (container-level: a wrapped pod), ssu (orchestrator-level: an ordinary pod)
    /// or ff (service-level: a pod whose image is built FROM the ff base).
    #[arg(long, env = "UMS_DEMO_INTERFACE", default_value = "dind")]
    interface: String,
    /// Leave both clusters up after the migration until Ctrl-C.
    #[arg(long, env = "KEEP")]
    keep: bool,
}

fn step(n: u32, text: &str) {
    eprintln!("[{n}/6] {text}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        matches!(args.interface.as_str(), "dind" | "pind" | "ssu" | "ff"),
        "--interface must be dind, pind, ssu or ff"
    );
    let demo = async {
        if matches!(args.interface.as_str(), "ssu" | "ff") {
            run_on_cri_nodes(&args).await
        } else {
            run(&args).await
        }
    };
    tokio::select! {
        result = demo => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping everything");
            Ok(())
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    step(
        1,
        "cluster edge: API server (k8s.io/apiserver), webhook image, node agent; its coordinator comes at step 4",
    );
    let edge = Cluster::start_with_node();
    step(2, "cluster cloud: the same");
    let cloud = Cluster::start_with_node();
    let name = "stateful-service";

    step(
        3,
        &format!(
            "a user creates the {} MiB service pod in edge (migration-interface: {})",
            args.mib, args.interface
        ),
    );
    edge.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &service_pod(name, &args.interface, None, &[("app", args.mib)]).to_string(),
    );
    let wrapped: Vec<String> = edge.get_json(&["pod", name])["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} ({})",
                c["name"].as_str().unwrap(),
                c["image"].as_str().unwrap()
            )
        })
        .collect();
    eprintln!("      wrapped by the webhook: {}", wrapped.join(", "));
    let source_ip = edge
        .wait_running_and_ready(name, Duration::from_secs(300))
        .await;
    let source_ambassador = edge.pod_container(name, "app");
    let waiting = spinner("waiting for the service to fill its memory");
    while ticks(&container_output(&source_ambassador)).len() < 50 {
        waiting.tick();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    waiting.finish_and_clear();
    eprintln!("      running on pod IP {source_ip}; its output (through the ambassador):");
    for line in tail(&container_output(&source_ambassador), 2) {
        eprintln!("        {line}");
    }

    let edge_certs = CoordinatorCerts::generate(&edge);
    let cloud_certs = CoordinatorCerts::generate(&cloud);
    let edge_coordinator = RunningCoordinator::start(&edge, &edge_certs, &[&cloud_certs.ca]);
    let cloud_coordinator = RunningCoordinator::start(&cloud, &cloud_certs, &[&edge_certs.ca]);
    step(
        4,
        &format!(
            "one UMS call on edge's coordinator (an operator's token): POST https://{}/migrate {{\"name\": \"{name}\", \"destinationUrl\": \"{}\"}}",
            edge_coordinator.address, cloud_coordinator.address
        ),
    );
    let migration = tokio::spawn({
        let body = json!({"name": name, "namespace": "default", "destinationUrl": cloud_coordinator.address});
        let ca = edge_certs.ca.clone();
        let address = edge_coordinator.address.clone();
        let operator = Credential::Bearer(edge_coordinator.api_token.clone());
        async move { call(&address, &ca, &operator, "POST", "/migrate", Some(body)).await }
    });
    // Progress: the coordinator's phase (GET /migrations), and the bytes the destination
    // pod's network interface has received once it exists.
    let expected = u64::from(args.mib) << 20;
    let bar = progress_bar(expected);
    let mut last_print = Instant::now();
    let migration_started = Instant::now();
    let mut destination: Option<(String, u64)> = None;
    while !migration.is_finished() {
        let (_, records) = edge_coordinator
            .call(&edge_certs.ca, "GET", "/migrations", None)
            .await;
        let phase = records
            .as_array()
            .and_then(|r| r.last())
            .and_then(|r| r["phase"].as_str())
            .unwrap_or("starting")
            .to_owned();
        if destination.is_none() && phase == "migrating" {
            let runtime = cloud.pod_container(name, "runtime");
            let before = rx_bytes(&runtime);
            destination = Some((runtime, before));
        }
        let received = destination
            .as_ref()
            .map(|(runtime, before)| rx_bytes(runtime).saturating_sub(*before))
            .unwrap_or(0);
        bar.set_position(received.min(expected));
        bar.set_message(phase.clone());
        if bar.is_hidden() && last_print.elapsed() > Duration::from_secs(1) {
            let seconds = migration_started.elapsed().as_secs_f64();
            eprintln!(
                "      {phase}: {:.1} MiB received by the destination pod, {seconds:.1} s",
                received as f64 / 1048576.0,
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    let (status, report) = migration.await?;
    anyhow::ensure!(
        status == 200,
        "the migration failed ({status}): {report}\n--- edge coordinator:\n{}\n--- cloud coordinator:\n{}",
        edge_coordinator.log(),
        cloud_coordinator.log()
    );

    step(5, "report");
    print_report(&report);
    step(6, "the service in cloud");
    let destination_ambassador = cloud.pod_container(name, "app");
    let waiting = spinner("waiting for the service's output in cloud");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(&container_output(&destination_ambassador)).is_empty() && Instant::now() < deadline
    {
        waiting.tick();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    waiting.finish_and_clear();
    println!("the service's output in cloud (its pod's ambassador), continuing where it stopped:");
    for line in tail(&container_output(&destination_ambassador), 3) {
        println!("  {line}");
    }
    let gone = edge
        .kubectl_result(User::Admin, &["get", "pod", name])
        .is_err()
        || edge.get_json(&["pod", name])["metadata"]["deletionTimestamp"].is_string();
    println!(
        "done in {:.0} s (the edge pod {}; the service runs in cloud, active: {})",
        started.elapsed().as_secs_f64(),
        if gone { "is deleted" } else { "is still there" },
        cloud.get_json(&["pod", name])["metadata"]["annotations"]["migration-start-mode"]
    );
    if args.keep {
        let destination_ip = report["destination"]["podIp"].as_str().unwrap_or("?");
        // A credential as cloud's coordinator would give it, for trying the sidecar by hand.
        let token = cloud.sidecar_token(destination_ip, Scope::Coordinator, None);
        print_keep(
            name,
            [
                ("edge", &edge, &edge_certs, &edge_coordinator),
                ("cloud", &cloud, &cloud_certs, &cloud_coordinator),
            ],
            &edge_coordinator.address,
        );
        println!(
            "  the copy's sidecar (token valid 10 minutes): curl -H 'Authorization: Bearer {token}' http://{destination_ip}:8888/containers"
        );
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

/// The orchestrator-level interface (an ordinary pod) or the service-level one (a pod built
/// FROM the ff base image, no privilege) on a CRI node, moved by the same call.
async fn run_on_cri_nodes(args: &Args) -> anyhow::Result<()> {
    use ums_tests::service_pod::ask_service;
    let ff = args.interface == "ff";
    let started = Instant::now();
    step(
        1,
        "cluster edge: API server (k8s.io/apiserver), webhook image, a CRI node (containerd 2.x + CRIU) with the kubelet's checkpoint endpoint",
    );
    let edge = Cluster::start_with_cri_node();
    step(2, "cluster cloud: the same");
    let cloud = Cluster::start_with_cri_node();
    let name = "stateful-service";
    step(
        3,
        &if ff {
            format!(
                "a user creates the {} MiB service in edge, its image built FROM ums-rs/ff (migration-interface: ff)",
                args.mib
            )
        } else {
            format!(
                "a user creates the {} MiB service as an ordinary pod in edge (no annotation: UMS's ssu)",
                args.mib
            )
        },
    );
    let image = if ff {
        // No registry for it: the image goes into both nodes as a pre-pulled image would.
        let image = ums_tests::workload::ff_workload_image();
        edge.cri_node_import(image);
        cloud.cri_node_import(image);
        image
    } else {
        ums_tests::workload::tls_registry_workload_image()
    };
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "app",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "env": [{"name": "WORKLOAD_MIB", "value": args.mib.to_string()},
                    {"name": "WORKLOAD_LISTEN", "value": "8080"}],
            "readinessProbe": {"tcpSocket": {"port": 8080}}}]}
    });
    if ff {
        pod["metadata"]["annotations"] = json!({"migration-interface": "ff"});
    }
    edge.kubectl_with_input(User::Jane, &["create", "-f", "-"], &pod.to_string());
    let source_ip = edge
        .wait_running_and_ready(name, Duration::from_secs(600))
        .await;
    let before = ask_service(&source_ip, 8080)
        .await
        .ok_or_else(|| anyhow::anyhow!("the service does not answer on {source_ip}:8080"))?;
    let admitted = edge.get_json(&["pod", name])["spec"]["containers"].clone();
    eprintln!(
        "      running on pod IP {source_ip}, unwrapped ({} containers); it answers: tick={} memory {}",
        admitted.as_array().map_or(0, Vec::len),
        before.tick,
        if before.memory_ok { "ok" } else { "BAD" }
    );
    if ff {
        let security = &admitted[0]["securityContext"];
        eprintln!(
            "      admitted without privilege: capabilities added {}, seccomp {}, allowPrivilegeEscalation {}",
            security["capabilities"]["add"], security["seccompProfile"]["type"], security["allowPrivilegeEscalation"]
        );
    } else {
        let (node_part, _) = edge.deploy_node_part().await;
        eprintln!("      the node part (deploy/node) runs on edge's node: ums-system/{node_part}");
    }

    let edge_certs = CoordinatorCerts::generate(&edge);
    let cloud_certs = CoordinatorCerts::generate(&cloud);
    let edge_coordinator = RunningCoordinator::start(&edge, &edge_certs, &[&cloud_certs.ca]);
    let cloud_coordinator = RunningCoordinator::start(&cloud, &cloud_certs, &[&edge_certs.ca]);
    // The node part sends the archives from the pod network: the destination as pods reach it.
    let destination = cloud_coordinator.pod_network_address.clone();
    step(
        4,
        &format!(
            "one UMS call on edge's coordinator (an operator's token): POST https://{}/migrate {{\"name\": \"{name}\", \"destinationUrl\": \"{destination}\"}}",
            edge_coordinator.address
        ),
    );
    let migration = tokio::spawn({
        let body = json!({"name": name, "namespace": "default", "destinationUrl": destination});
        let ca = edge_certs.ca.clone();
        let address = edge_coordinator.address.clone();
        let operator = Credential::Bearer(edge_coordinator.api_token.clone());
        async move { call(&address, &ca, &operator, "POST", "/migrate", Some(body)).await }
    });
    let mut last = String::new();
    let migration_started = Instant::now();
    while !migration.is_finished() {
        let (_, records) = edge_coordinator
            .call(&edge_certs.ca, "GET", "/migrations", None)
            .await;
        let phase = records
            .as_array()
            .and_then(|r| r.last())
            .and_then(|r| r["phase"].as_str())
            .unwrap_or("starting")
            .to_owned();
        if phase != last {
            eprintln!(
                "      {phase} ({:.1} s)",
                migration_started.elapsed().as_secs_f64()
            );
            last = phase;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, report) = migration.await?;
    anyhow::ensure!(
        status == 200,
        "the migration failed ({status}): {report}\n--- edge coordinator:\n{}\n--- cloud coordinator:\n{}",
        edge_coordinator.log(),
        cloud_coordinator.log()
    );
    step(5, "report");
    print_report(&report);
    step(6, "the service in cloud");
    let ip = report["destination"]["podIp"].as_str().unwrap_or_default();
    let after = ask_service(ip, 8080)
        .await
        .ok_or_else(|| anyhow::anyhow!("the restored service does not answer on {ip}:8080"))?;
    println!(
        "the service in cloud (pod IP {ip}) answers: tick={} (it was {} in edge before the move) memory {}",
        after.tick,
        before.tick,
        if after.memory_ok { "ok" } else { "BAD" }
    );
    let gone = edge
        .kubectl_result(User::Admin, &["get", "pod", name])
        .is_err();
    println!(
        "done in {:.0} s (the edge pod {}; the service runs in cloud {})",
        started.elapsed().as_secs_f64(),
        if gone { "is deleted" } else { "is still there" },
        if ff {
            "restored by its pod's own ums-ff, with the PIDs it had"
        } else {
            "from its checkpoint images"
        },
    );
    if args.keep {
        print_keep(
            name,
            [
                ("edge", &edge, &edge_certs, &edge_coordinator),
                ("cloud", &cloud, &cloud_certs, &cloud_coordinator),
            ],
            &edge_coordinator.pod_network_address,
        );
        if !ff {
            println!("  (cloud has no node part yet: deploy it to move the pod back)");
        }
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

/// With `--keep`: how to reach both clusters and their coordinators, and how to move the
/// service back to edge (`back_to`: edge's coordinator as the sender reaches it).
fn print_keep(
    name: &str,
    sides: [(&str, &Cluster, &CoordinatorCerts, &RunningCoordinator); 2],
    back_to: &str,
) {
    println!("KEEP: both clusters and their coordinators stay up until Ctrl-C");
    for (side, cluster, certs, coordinator) in sides {
        println!("  {side}:");
        println!(
            "    kubectl --kubeconfig {}   (admin; a user: {})",
            cluster.kubeconfig(User::Admin).display(),
            cluster.kubeconfig(User::Jane).display()
        );
        println!(
            "    coordinator https://{}  CA {}  operator token {}",
            coordinator.address,
            certs.ca.display(),
            coordinator.api_token
        );
    }
    let (_, cloud, cloud_certs, cloud_coordinator) = sides[1];
    println!("  the service back to edge, by one UMS call on cloud's coordinator:");
    println!(
        "    curl --cacert {} -H 'Authorization: Bearer {}' -H 'content-type: application/json' \\\n      -d '{{\"name\": \"{name}\", \"destinationUrl\": \"{back_to}\"}}' https://{}/migrate",
        cloud_certs.ca.display(),
        cloud_coordinator.api_token,
        cloud_coordinator.address
    );
    println!("  or by a LiveMigration object in cloud (the CRD is installed in both clusters):");
    println!(
        "    echo '{{\"apiVersion\": \"migration.ums-rs.io/v1alpha1\", \"kind\": \"LiveMigration\", \"metadata\": {{\"name\": \"back\"}}, \"spec\": {{\"pod\": \"{name}\", \"destination\": \"{back_to}\"}}}}' | kubectl --kubeconfig {} create -f -",
        cloud.kubeconfig(User::Jane).display()
    );
}

/// Bytes received by a runtime container's network interface (the destination pod's eth0).
fn rx_bytes(container: &str) -> u64 {
    std::process::Command::new("docker")
        .args([
            "exec",
            container,
            "cat",
            "/sys/class/net/eth0/statistics/rx_bytes",
        ])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

fn print_report(coordinator_report: &Value) {
    println!(
        "{} migration {} of {} to {} in cluster {}",
        coordinator_report["message"].as_str().unwrap_or("?"),
        coordinator_report["migration_id"].as_str().unwrap_or("?"),
        coordinator_report["pod"].as_str().unwrap_or("?"),
        coordinator_report["destination"]["pod"]
            .as_str()
            .unwrap_or("?"),
        coordinator_report["destination"]["cluster"]
            .as_str()
            .unwrap_or("?"),
    );
    println!("  coordinator's phases:");
    for phase in coordinator_report["phases"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "    {:<14} {:>7} ms",
            phase[0].as_str().unwrap_or("?"),
            phase[1]
        );
    }
    let report = &coordinator_report["sidecar"];
    if coordinator_report["migrationInterface"] == "ssu" {
        println!(
            "  the kubelet checkpoints on node {} ({}):",
            report["node"].as_str().unwrap_or("?"),
            report["runtime"].as_str().unwrap_or("?")
        );
        for c in report["checkpoints"].as_array().into_iter().flatten() {
            println!(
                "    {:<12} {:>7} ms  {}",
                c["container"].as_str().unwrap_or("?"),
                c["answeredUnixMs"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(c["requestedUnixMs"].as_u64().unwrap_or(0)),
                c["archive"].as_str().unwrap_or("?")
            );
        }
        println!(
            "  skew between the containers' checkpoints {} ms; the source ran on {} ms after its dump (divergence)",
            report["checkpointSkewMs"], report["divergenceMs"]
        );
        for t in report["transfers"].as_array().into_iter().flatten() {
            println!(
                "  {} sent from the node straight to cloud: {} bytes in {} ms -> {}",
                t["container"].as_str().unwrap_or("?"),
                t["bytes"],
                t["sendMs"],
                t["image"].as_str().unwrap_or("?")
            );
        }
        for check in report["destinationPreflight"]
            .as_array()
            .into_iter()
            .flatten()
        {
            println!("  cloud's preflight: {}", check.as_str().unwrap_or("?"));
        }
    } else if coordinator_report["migrationInterface"] == "ff" {
        println!("  the source pod's ums-ff, from inside the service's container:");
        for c in report["containers"].as_array().into_iter().flatten() {
            println!(
                "    {}: {} processes and threads dumped, PID {} in its container, {} bytes of CRIU images",
                c["name"].as_str().unwrap_or("?"),
                c["processes"],
                c["pid"],
                c["criuBytes"]
            );
        }
        for file in report["rootfsFiles"].as_array().into_iter().flatten() {
            println!("    root-fs file carried: {}", file.as_str().unwrap_or("?"));
        }
        println!(
            "    supervisor peak RSS: {} KiB here, {} KiB at the destination",
            report["totals"]["supervisorPeakRssKib"], report["restored"]["supervisorPeakRssKib"]
        );
    } else {
        println!("  the source sidecar's migration:");
    }
    let totals = &report["totals"];
    for (label, key) in [
        ("preflight", "preflightMs"),
        ("freeze + dump", "freezeDumpMs"),
        ("transfer", "transferMs"),
        ("restore", "restoreMs"),
        ("downtime", "downtimeMs"),
        ("total", "totalMs"),
    ] {
        if let Some(ms) = totals[key].as_u64() {
            println!("  {label:<14} {ms:>7} ms");
        }
    }
    if let Some(bytes) = totals["contentBytes"].as_u64() {
        println!(
            "  {:<14} {:>7.1} MiB",
            "state moved",
            bytes as f64 / 1048576.0
        );
    }
    for volume in report["volumes"].as_array().into_iter().flatten() {
        println!(
            "  volume {} ({}): {} entries, {} bytes",
            volume["name"].as_str().unwrap_or("?"),
            volume["kind"].as_str().unwrap_or("?"),
            volume["entries"],
            volume["bytes"]
        );
    }
    for image in report["images"].as_array().into_iter().flatten() {
        println!(
            "  image {} sent ({} bytes)",
            image["image"].as_str().unwrap_or("?"),
            image["bytes"]
        );
    }
    println!(
        "full report: {}",
        serde_json::to_string(coordinator_report).unwrap()
    );
}

fn tail(lines: &[String], n: usize) -> Vec<String> {
    lines[lines.len().saturating_sub(n)..].to_vec()
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "      {msg:20} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar
}

fn spinner(message: &str) -> ProgressBar {
    let spinner = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        eprintln!("      {message}");
        ProgressBar::hidden()
    };
    spinner.set_message(message.to_owned());
    spinner
}
