//! A soak: one service moved back and forth between two clusters by their coordinators (the
//! real images, one UMS call per hop), watching what each hop leaves behind. After every hop
//! the service continues where it stopped with its memory intact, and the pod that now runs it
//! holds no leftover of the migrations before (checkpoint files, the pending-dump record, the
//! sidecar's netfilter lock chain). The coordinators' resident memory and open descriptors and
//! the engine storage of the running pod are printed per hop, for the soak's figures.
//!
//! `UMS_SOAK_MIGRATIONS` hops (default 4: the short version the test command runs);
//! `scripts/soak.sh` runs 50 and keeps the table.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use ums_tests::cluster::Cluster;
use ums_tests::coordinator::TwoClusters;
use ums_tests::service_pod::{ask_service, run_service, service_pod};

/// What the host sees of a coordinator's process: resident KiB and open descriptors.
fn process_figures(container: &str) -> (u64, usize) {
    let pid = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", container])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

/// A shell command in the pod's runtime container; its output.
fn in_runtime(cluster: &Cluster, pod: &str, script: &str) -> String {
    let runtime = cluster.pod_container(pod, "runtime");
    let output = Command::new("docker")
        .args(["exec", &runtime, "sh", "-c", script])
        .output()
        .unwrap();
    assert!(output.status.success(), "{script}: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_moved_back_and_forth_keeps_its_state_and_leaves_nothing_behind() {
    let hops: usize = std::env::var("UMS_SOAK_MIGRATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let two = TwoClusters::start();
    let TwoClusters {
        edge,
        cloud,
        edge_certs,
        cloud_certs,
        edge_coordinator,
        cloud_coordinator,
        ..
    } = &two;
    let name = "service";
    let mut ip = run_service(edge, &service_pod(name, "dind", None, &[("app", 64)]), name).await;
    let mut last = ask_service(&ip, 8080).await.unwrap();
    let sides = [
        (edge, edge_coordinator, edge_certs, "edge"),
        (cloud, cloud_coordinator, cloud_certs, "cloud"),
    ];
    let coordinator_container = |side: &str| {
        format!(
            "{}-coordinator",
            if side == "edge" {
                &edge.name
            } else {
                &cloud.name
            }
        )
    };
    println!("hop from to total_ms downtime_ms edge_rss_kib edge_fds cloud_rss_kib cloud_fds engine_storage_mib");
    for hop in 0..hops {
        let (_, source_coordinator, source_certs, from) = sides[hop % 2];
        let (to_cluster, to_coordinator, _, to) = sides[(hop + 1) % 2];
        let (status, report) = source_coordinator
            .call(
                &source_certs.ca,
                "POST",
                "/migrate",
                Some(json!({"name": name, "destinationUrl": to_coordinator.address})),
            )
            .await;
        assert_eq!(status, 200, "hop {hop} {from} -> {to}: {report}");
        ip = to_cluster
            .wait_running_and_ready(name, Duration::from_secs(120))
            .await;
        let now = ask_service(&ip, 8080).await.unwrap();
        assert!(now.memory_ok, "hop {hop}: {now:?}");
        assert!(
            now.tick > last.tick,
            "hop {hop}: the service continues where it stopped: {now:?} after {last:?}"
        );
        last = now;
        // Nothing of the migrations before is left in the pod that runs the service now.
        let leftovers = in_runtime(
            to_cluster,
            name,
            "ls /var/lib/docker/ums-pending-dump.json 2>/dev/null; \
             find /var/lib/docker/containers -maxdepth 3 -path '*/checkpoints/*' 2>/dev/null; \
             iptables -w -S 2>/dev/null | grep UMS-RESTORE-LOCK || true",
        );
        assert_eq!(leftovers, "", "hop {hop}: leftovers in the running pod");
        let storage = in_runtime(to_cluster, name, "du -sm /var/lib/docker | cut -f1");
        let (edge_rss, edge_fds) = process_figures(&coordinator_container("edge"));
        let (cloud_rss, cloud_fds) = process_figures(&coordinator_container("cloud"));
        println!(
            "{hop} {from} {to} {} {} {edge_rss} {edge_fds} {cloud_rss} {cloud_fds} {storage}",
            report["totalMs"], report["sidecar"]["totals"]["downtimeMs"]
        );
    }
}
