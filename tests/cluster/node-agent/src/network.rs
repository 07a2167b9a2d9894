//! The cluster's pod network: a Docker bridge network with the cluster's subnet. Each pod's
//! sandbox container gets its IP there (as a CNI bridge plugin would give it a veth on a bridge);
//! the pod's containers join the sandbox's network namespace. The host routes between the pod
//! networks of different clusters (two clusters on one machine reach each other's pods).

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::InspectNetworkOptions;
use bollard::Docker;

/// A pod network that exists.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub name: String,
}

/// Creates the network if it does not exist and lets traffic from and to its subnet cross
/// between bridges (Docker isolates bridges from each other by default).
pub async fn ensure(docker: &Docker, name: &str, subnet: &str) -> anyhow::Result<PodNetwork> {
    if docker
        .inspect_network(name, None::<InspectNetworkOptions>)
        .await
        .is_err()
    {
        docker
            .create_network(NetworkCreateRequest {
                name: name.to_owned(),
                driver: Some("bridge".into()),
                ipam: Some(Ipam {
                    config: Some(vec![IpamConfig {
                        subnet: Some(subnet.to_owned()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("failed to create pod network {name} ({subnet}): {e}"))?;
    }
    accept_forwarding(subnet)?;
    Ok(PodNetwork {
        name: name.to_owned(),
    })
}

/// Lets traffic from and to `subnet` cross between bridges (Docker isolates them by default).
pub fn accept_forwarding(subnet: &str) -> anyhow::Result<()> {
    for direction in ["-s", "-d"] {
        let rule = ["DOCKER-USER", direction, subnet, "-j", "ACCEPT"];
        let present = std::process::Command::new("iptables")
            .arg("-C")
            .args(rule)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !present {
            let output = std::process::Command::new("iptables")
                .arg("-I")
                .args(rule)
                .output()?;
            anyhow::ensure!(
                output.status.success(),
                "iptables -I {rule:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
