//! The node itself, for the CRI runtime: one container of `ums-rs/cri-node` (containerd 2.x,
//! runc, CRIU, CNI plugins; tests/cluster/cri-node) on the outer engine's default bridge, with
//! the flags measured in shared/ENGINES.md ("A CRI node"). Its pods get IPs from this node's
//! pod subnet on the node's CNI bridge; the host routes that subnet to the node, so pods of
//! every cluster on this machine reach each other and the host reaches them (probes, tests).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, LogsOptions, RemoveContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt as _;

use crate::containers::NODE_LABEL;

/// The kubelet's checkpoint directory on a node.
pub const KUBELET_CHECKPOINTS: &str = "/var/lib/kubelet/checkpoints";
/// The kubelet's pod directories on a node.
pub const KUBELET_PODS: &str = "/var/lib/kubelet/pods";

/// The outer engine's runtime for node containers (tests/cluster/cri-node/node-runc).
const NODE_RUNTIME: &str = "ums-node";

/// A running node container.
#[derive(Debug, Clone)]
pub struct CriNode {
    pub ip: String,
    /// containerd's version, as `containerd --version` prints it.
    pub containerd_version: String,
    /// The CRI socket, as this machine sees it.
    pub socket: PathBuf,
}

/// Starts (or replaces) the node container of `node`; returns once containerd answers.
pub async fn start(
    docker: &Docker,
    node: &str,
    image: &str,
    state_dir: &Path,
    subnet: &str,
    insecure_registries: &[String],
    registry_cas: &[PathBuf],
) -> anyhow::Result<CriNode> {
    let container = format!("ums-node-{node}");
    let _ = docker
        .remove_container(
            &container,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    let run_dir = state_dir.join("containerd-run");
    let root_dir = state_dir.join("containerd");
    // The node's /var/lib/kubelet/checkpoints, on this machine.
    let checkpoint_dir = state_dir.join("checkpoints");
    // CAs the node trusts: installed into its system trust store at start.
    let ca_dir = state_dir.join("ca");
    let pods_dir = state_dir.join("pods");
    for dir in [&run_dir, &root_dir, &checkpoint_dir, &ca_dir, &pods_dir] {
        std::fs::create_dir_all(dir)?;
    }
    for (i, ca) in registry_cas.iter().enumerate() {
        std::fs::copy(ca, ca_dir.join(format!("registry-{i}.crt")))
            .map_err(|e| anyhow::anyhow!("cannot copy the CA {}: {e}", ca.display()))?;
    }
    let state = state_dir.display().to_string();
    let binds = vec![
        "/sys/fs/cgroup:/sys/fs/cgroup:rw".to_owned(),
        // The overlayfs snapshotter cannot sit on the outer engine's overlay root.
        format!("{}:/var/lib/containerd", root_dir.display()),
        format!("{}:/run/containerd", run_dir.display()),
        // Pod volumes and logs live under the state dir: the same paths inside and outside.
        format!("{state}:{state}"),
        format!("{}:{KUBELET_CHECKPOINTS}", checkpoint_dir.display()),
        // The kubelet's pod directories (volumes) where a node keeps them, for the pods that
        // mount /var/lib/kubelet/pods (the node part reads emptyDirs there).
        format!("{}:{KUBELET_PODS}", pods_dir.display()),
    ];
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(container.clone()),
                ..Default::default()
            }),
            ContainerCreateBody {
                image: Some(image.to_owned()),
                hostname: Some(node.to_owned()),
                env: Some(vec![
                    format!("UMS_POD_SUBNET={subnet}"),
                    format!("UMS_INSECURE_REGISTRIES={}", insecure_registries.join(" ")),
                    format!("UMS_CA_DIR={}", ca_dir.display()),
                ]),
                labels: Some([(NODE_LABEL.to_owned(), node.to_owned())].into()),
                host_config: Some(HostConfig {
                    binds: Some(binds),
                    // Every capability but SYS_RESOURCE (the outer engine refuses it here),
                    // unconfined: containerd and CRIU need them; CRIU restores the hostname
                    // through /proc/sys (systempaths=unconfined).
                    cap_add: Some(vec!["ALL".into()]),
                    cap_drop: Some(vec!["SYS_RESOURCE".into()]),
                    // runc plus the capabilities Docker 20.10 does not know (CHECKPOINT_RESTORE,
                    // which ff pods add), as a node has them (scripts/install-host.sh installs it).
                    runtime: Some(NODE_RUNTIME.to_owned()),
                    security_opt: Some(vec![
                        "seccomp=unconfined".into(),
                        "apparmor=unconfined".into(),
                    ]),
                    masked_paths: Some(Vec::new()),
                    readonly_paths: Some(Vec::new()),
                    device_cgroup_rules: Some(vec!["a *:* rwm".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create the node container {container}: {e} (the outer engine's runtime \
                 {NODE_RUNTIME} comes from scripts/install-host.sh)"
            )
        })?;
    docker.start_container(&container, None).await?;
    let until = Instant::now() + Duration::from_secs(60);
    let containerd_version;
    loop {
        let logs = container_log(docker, &container).await;
        if let Some(line) = logs.lines().find(|l| l.contains("ums-node: ready")) {
            tracing::info!(node = %node, "{line}");
            // "... containerd github.com/containerd/containerd/v2 2.1.9+unknown ; ..."
            containerd_version = line
                .split_whitespace()
                .skip_while(|w| !w.starts_with("github.com/containerd"))
                .nth(1)
                .unwrap_or("unknown")
                .to_owned();
            break;
        }
        let inspect = docker
            .inspect_container(&container, None::<InspectContainerOptions>)
            .await?;
        let running = inspect.state.and_then(|s| s.running).unwrap_or(false);
        anyhow::ensure!(
            running && Instant::now() < until,
            "the node container {container} did not get ready (running: {running}); its log:\n{}",
            logs.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ip = docker
        .inspect_container(&container, None::<InspectContainerOptions>)
        .await?
        .network_settings
        .and_then(|n| n.networks)
        .and_then(|n| n.get("bridge").cloned())
        .and_then(|n| n.ip_address)
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| anyhow::anyhow!("the node container {container} has no IP"))?;
    // The host routes the node's pod subnet to it; the outer engine lets it be forwarded.
    let output = std::process::Command::new("ip")
        .args(["route", "replace", subnet, "via", &ip])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "ip route replace {subnet} via {ip}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    crate::network::accept_forwarding(subnet)?;
    tracing::info!(%container, %ip, %subnet, "node container up, pod subnet routed to it");
    Ok(CriNode {
        ip,
        containerd_version,
        socket: run_dir.join("containerd.sock"),
    })
}

async fn container_log(docker: &Docker, container: &str) -> String {
    let mut stream = docker.logs(
        container,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        }),
    );
    let mut text = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(&chunk.to_string());
    }
    text
}
