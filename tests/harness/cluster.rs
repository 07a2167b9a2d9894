//! A cluster's control plane on this machine: etcd, `ums-test-apiserver` (built from
//! Kubernetes' own k8s.io/apiserver, see tests/cluster/apiserver), and the real
//! `ums-rs/webhook` image serving the admission webhook, configured by the project's own
//! `deploy/base` webhook configurations. Users act through `kubectl` with static tokens.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::outer::docker;
use crate::registry::free_port;
use ums_contract::credential::{Claims, Scope, SigningKey};

/// The identities the static token file maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum User {
    /// `admin`, group `system:masters`.
    Admin,
    /// `jane`, an ordinary user.
    Jane,
    /// `system:serviceaccount:ums-system:migration-coordinator`.
    Coordinator,
}

impl User {
    fn name(self) -> &'static str {
        match self {
            User::Admin => "admin",
            User::Jane => "jane",
            User::Coordinator => "coordinator",
        }
    }
}

/// The coordinator's service account, as the webhook is told to let it through.
pub const COORDINATOR: &str = "system:serviceaccount:ums-system:migration-coordinator";

/// Where tests/cluster/apiserver/build.sh put the API server and etcd (built if needed).
pub fn control_plane_binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/apiserver/build.sh");
        let output = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} ({e})", script.display()));
        assert!(
            output.status.success(),
            "{} failed (it builds the test API server)",
            script.display()
        );
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
}

/// One cluster's control plane (and, with [`Cluster::start_with_node`], one node); everything
/// stops on drop.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    pub server: String,
    etcd: Child,
    apiserver: Child,
    webhook_container: String,
    node: Option<NodeAgent>,
    /// Nodes added with [`Cluster::add_node`] (their names and agents).
    extra_nodes: Vec<(String, NodeAgent)>,
    /// Whether the first node's agent places unbound pods ([`Cluster::start_with_nodes`]).
    placing: bool,
}

/// The node agent of a cluster and its pod network.
#[derive(Debug)]
struct NodeAgent {
    child: Child,
    network: String,
    subnet: String,
    /// With a CRI node: the port of the kubelet's HTTPS endpoint.
    kubelet_port: Option<u16>,
}

/// The runtime of a cluster's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRuntime {
    /// The outer Docker engine (the container-level tests' fast rig).
    Docker,
    /// A containerd 2.x node container driven through the CRI (tests/cluster/cri-node).
    Cri,
}

/// Builds ums-rs/cri-node:latest if needed (tests/cluster/cri-node/build.sh, cached).
pub fn cri_node_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/cri-node/build.sh");
        let status = Command::new(&script)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} ({e})", script.display()));
        assert!(status.success(), "{} failed", script.display());
    });
    "ums-rs/cri-node:latest"
}

/// A workspace binary, built if needed (cargo builds other packages' binaries for no test).
pub fn workspace_binary(package: &str, binary: &str) -> PathBuf {
    // target/<profile>/deps/<test binary> or target/<profile>/<binary> -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    let mut profile_dir = exe.parent().unwrap().to_owned();
    if profile_dir.ends_with("deps") {
        profile_dir.pop();
    }
    let target_dir = profile_dir.parent().unwrap().to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            package,
            "--bin",
            binary,
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    profile_dir.join(binary)
}

impl Cluster {
    /// Starts etcd, the webhook container and the API server, then applies the project's
    /// webhook configurations (with this cluster's CA bundle).
    pub fn start() -> Self {
        Self::start_inner(None, false)
    }

    /// A cluster with one CRI node: `ums-node-agent --runtime cri` runs its pods in a containerd
    /// node container through the CRI and serves the kubelet's checkpoint endpoint; pods pull
    /// from the test registry.
    pub fn start_with_cri_node() -> Self {
        Self::start_inner(Some(NodeRuntime::Cri), true)
    }

    /// A cluster with one node: `ums-node-agent` runs its pods on the outer engine, each with
    /// its own IP on this cluster's pod network (routable from other clusters' pods).
    pub fn start_with_node() -> Self {
        Self::start_inner(Some(NodeRuntime::Docker), true)
    }

    /// A cluster with `count` nodes on the outer engine, sharing its pod network; the first
    /// node's agent places the pods created without a node (binds them, `pods/binding`, to
    /// the least loaded Ready node that is not cordoned), and every node runs the pods bound
    /// to it. The nodes' names, the first one's being the cluster's.
    pub fn start_with_nodes(count: usize) -> (Self, Vec<String>) {
        Self::start_with_nodes_of(NodeRuntime::Docker, count)
    }

    /// [`Cluster::start_with_nodes`] with nodes of `runtime` (CRI nodes: a node container
    /// each, with a pod subnet of its own).
    pub fn start_with_nodes_of(runtime: NodeRuntime, count: usize) -> (Self, Vec<String>) {
        let mut cluster = Self::start_inner(None, true);
        cluster.placing = true;
        cluster.start_node(runtime);
        let mut names = vec![cluster.name.clone()];
        for _ in 1..count {
            names.push(cluster.add_node());
        }
        (cluster, names)
    }

    /// A cluster with one node whose wrapped pods cannot pull from the test registry (an edge
    /// site without a registry): its webhook does not mark the registry, which serves plain
    /// HTTP, as insecure, so the nested engines' pulls fail.
    pub fn start_edge() -> Self {
        Self::start_inner(Some(NodeRuntime::Docker), false)
    }

    fn start_inner(node: Option<NodeRuntime>, registry_access: bool) -> Self {
        let binaries = control_plane_binaries();
        let name = crate::unique("ums-cluster-");
        let dir = PathBuf::from(format!("/tmp/{name}"));
        std::fs::create_dir_all(&dir).unwrap();

        // The coordinator's signing key: its public half goes to the webhook, which hands it
        // to every wrapped pod's sidecar.
        let signing_key = SigningKey::generate().unwrap();
        std::fs::write(dir.join("coordinator-signing.key"), &signing_key).unwrap();
        let public_key = SigningKey::from_pkcs8(&signing_key).unwrap().public_key();
        // The webhook first: if it fails, nothing else is left running.
        let webhook_container = format!("{name}-webhook");
        let webhook_address = start_webhook(&dir, &webhook_container, registry_access, &public_key);
        let client_port = free_port();
        let peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let etcd = Command::new(binaries.join("etcd"))
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .expect("start etcd");

        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "admin-token,admin,1,\"system:masters\"\njane-token,jane,2\ncoordinator-token,{COORDINATOR},3,\"system:serviceaccounts,system:serviceaccounts:ums-system\"\n"
            ),
        )
        .unwrap();
        let api_port = free_port();
        let apiserver = Command::new(binaries.join("ums-test-apiserver"))
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .args(["--etcd", &etcd_url])
            .arg("--token-file")
            .arg(dir.join("tokens.csv"))
            .arg("--cert-dir")
            .arg(dir.join("apiserver-certs"))
            .args([
                "--service-endpoint",
                &format!("ums-system/ums-webhook:443={webhook_address}"),
            ])
            // Services that start later (the coordinator's eviction webhook) add a line.
            .arg("--service-endpoint-file")
            .arg(dir.join("service-endpoints"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("apiserver.log")).unwrap())
            .spawn()
            .expect("start ums-test-apiserver");
        let mut cluster = Cluster {
            server: format!("https://127.0.0.1:{api_port}"),
            name,
            dir,
            etcd,
            apiserver,
            webhook_container,
            node: None,
            extra_nodes: Vec::new(),
            placing: false,
        };
        cluster.write_kubeconfigs();
        cluster.wait_ready(Duration::from_secs(60));
        cluster.install_webhook_configurations();
        if let Some(runtime) = node {
            cluster.start_node(runtime);
        }
        cluster
    }

    fn start_node(&mut self, runtime: NodeRuntime) {
        let subnet = next_subnet();
        let network = format!("{}-pods", self.name);
        // A network of this name is a killed process's (the name holds this live process's
        // PID): the node agent would take it as it is, with its old subnet.
        let _ = Command::new("docker")
            .args(["network", "rm", &network])
            .output();
        let log = std::fs::File::create(self.dir.join("node-agent.log")).unwrap();
        let (mut command, kubelet_port) = self.node_agent_command(runtime);
        let child = command
            .env("UMS_NODE_NAME", &self.name)
            .env(
                "UMS_PLACE_UNBOUND",
                if self.placing { "true" } else { "false" },
            )
            .env("UMS_POD_NETWORK", &network)
            .env("UMS_POD_SUBNET", &subnet)
            .env("UMS_NODE_STATE_DIR", self.dir.join("node"))
            .stderr(log)
            .spawn()
            .expect("start ums-node-agent");
        self.node = Some(NodeAgent {
            child,
            network,
            subnet,
            kubelet_port,
        });
        let until = Instant::now() + Duration::from_secs(90);
        while !self.node_log().contains("ums-node-agent ready") {
            assert!(
                Instant::now() < until,
                "the node agent of {} did not start:\n{}",
                self.name,
                self.node_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A node agent of this cluster for `runtime`, before its node's name, network and state:
    /// the command and, for a CRI node, its kubelet endpoint's port.
    fn node_agent_command(&self, runtime: NodeRuntime) -> (Command, Option<u16>) {
        let mut command = Command::new(workspace_binary("ums-node-agent", "ums-node-agent"));
        command
            .env("KUBECONFIG", self.kubeconfig(User::Admin))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null());
        if runtime != NodeRuntime::Cri {
            return (command, None);
        }
        let port = free_port();
        // The kubelet's serving certificate, signed by the cluster's kubelet CA (what
        // kube-apiserver's --kubelet-certificate-authority names); clients trust the CA. One
        // for the cluster's nodes: they all listen on this machine.
        let pki = self.dir.join("kubelet-pki");
        if !pki.join("kubelet.crt").exists() {
            let bundle = ums_certs::generate(&ums_certs::CertRequest {
                service: "kubelet".into(),
                namespace: "kube-system".into(),
                extra_names: vec![
                    "127.0.0.1".into(),
                    crate::outer::bridge_gateway().to_owned(),
                ],
                valid_for: time::Duration::days(1),
                client_auth: false,
            })
            .unwrap();
            std::fs::create_dir_all(&pki).unwrap();
            std::fs::write(pki.join("ca.crt"), &bundle.ca_cert_pem).unwrap();
            std::fs::write(pki.join("kubelet.crt"), &bundle.server_cert_pem).unwrap();
            std::fs::write(pki.join("kubelet.key"), &bundle.server_key_pem).unwrap();
        }
        command
            .env("UMS_KUBELET_TLS_CERT", pki.join("kubelet.crt"))
            .env("UMS_KUBELET_TLS_KEY", pki.join("kubelet.key"))
            .env("UMS_NODE_RUNTIME", "cri")
            .env("UMS_NODE_IMAGE", cri_node_image())
            .env(
                "UMS_INSECURE_REGISTRIES",
                &crate::registry::Registry::shared().pod_address,
            )
            .env(
                "UMS_REGISTRY_CAS",
                crate::registry::Registry::shared_tls().ca.as_ref().unwrap(),
            )
            .env("UMS_KUBELET_ADDRESS", format!("0.0.0.0:{port}"))
            // The kubelet endpoint listens on this machine: pods and host-network
            // coordinators reach it on the outer bridge's gateway.
            .env("UMS_NODE_ADDRESS", crate::outer::bridge_gateway())
            .env("UMS_KUBELET_TOKEN_FILE", self.dir.join("tokens.csv"))
            .env("UMS_CHECKPOINT_USERS", COORDINATOR);
        (command, Some(port))
    }

    /// Adds a node to a cluster started with a node: another `ums-node-agent`, which runs
    /// only the pods bound to it (the first node runs the unbound ones: the rig has no
    /// scheduler). A Docker-runtime node shares the first node's pod network; a CRI node is a
    /// node container of its own with a pod subnet of its own, which this machine routes to
    /// it (as it routes every CRI node's: pods of all nodes reach each other). Returns its name
    /// (`<cluster>-n2`, `-n3`, ...) once its Node object is Ready.
    pub fn add_node(&mut self) -> String {
        let first = self.node.as_ref().expect("a cluster with a node");
        let runtime = if first.kubelet_port.is_some() {
            NodeRuntime::Cri
        } else {
            NodeRuntime::Docker
        };
        let (network, subnet) = match runtime {
            NodeRuntime::Docker => (first.network.clone(), first.subnet.clone()),
            NodeRuntime::Cri => (first.network.clone(), next_subnet()),
        };
        let name = format!("{}-n{}", self.name, self.extra_nodes.len() + 2);
        let log = std::fs::File::create(self.dir.join(format!("node-agent-{name}.log"))).unwrap();
        let (mut command, kubelet_port) = self.node_agent_command(runtime);
        let child = command
            .env("UMS_NODE_NAME", &name)
            .env("UMS_RUN_UNBOUND", "false")
            .env("UMS_POD_NETWORK", &network)
            .env("UMS_POD_SUBNET", &subnet)
            .env("UMS_NODE_STATE_DIR", self.dir.join(format!("node-{name}")))
            .stderr(log)
            .spawn()
            .expect("start ums-node-agent");
        self.extra_nodes.push((
            name.clone(),
            NodeAgent {
                child,
                network,
                subnet,
                kubelet_port,
            },
        ));
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let nodes = self.get_json(&["nodes"]);
            let ready = nodes["items"].as_array().into_iter().flatten().any(|n| {
                n["metadata"]["name"] == name.as_str()
                    && n["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            if ready {
                return name;
            }
            assert!(
                Instant::now() < until,
                "node {name} of {} did not become Ready:\n{}",
                self.name,
                self.node_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Lets the API server reach webhook service `namespace/name:port` at `address`.
    pub fn map_service(&self, service: &str, address: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("service-endpoints"))
            .unwrap();
        writeln!(file, "{service}={address}").unwrap();
    }

    /// `kubectl drain NODE`, unchanged, as an operator runs it on a node with wrapped pods
    /// (no DaemonSets, emptyDirs, pods without a controller), as admin, waiting up to
    /// `timeout_seconds`: the command, to run where the caller may block.
    pub fn drain_command(&self, node: &str, timeout_seconds: u64) -> Command {
        let mut command = Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(self.kubeconfig(User::Admin))
            .args([
                "drain",
                node,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--force",
            ])
            .arg(format!("--timeout={timeout_seconds}s"));
        command
    }

    /// The name of the cluster's first node (its Node object; it also runs unbound pods).
    pub fn first_node(&self) -> &str {
        &self.name
    }

    /// The node a pod is bound to (`spec.nodeName`; the first node for an unbound pod).
    pub fn node_of(&self, namespace: &str, pod: &str) -> String {
        let pod = self.get_json(&["pod", "-n", namespace, pod]);
        pod["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.name)
            .to_owned()
    }

    /// Waits until the pod is Running with every container ready; returns its IP.
    pub async fn wait_running_and_ready(&self, pod: &str, deadline: Duration) -> String {
        let until = Instant::now() + deadline;
        loop {
            let status = self.get_json(&["pod", pod])["status"].clone();
            let ready = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if status["phase"] == "Running" && ready {
                return status["podIP"].as_str().unwrap().to_owned();
            }
            assert!(
                Instant::now() < until,
                "pod {pod} not Running and Ready within {deadline:?}; status: {status}\n--- node agent:\n{}{}",
                self.node_log(),
                containers_log(&status)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// With a CRI node: the kubelet endpoint's base URL (`https://127.0.0.1:PORT`) and the CA
    /// (PEM file) that signs its certificate.
    pub fn kubelet(&self) -> (String, PathBuf) {
        let port = self
            .node
            .as_ref()
            .and_then(|n| n.kubelet_port)
            .expect("a cluster with a CRI node");
        (
            format!("https://127.0.0.1:{port}"),
            self.kubelet_ca().expect("a cluster with a CRI node"),
        )
    }

    /// The CA of the kubelet's serving certificate, when the cluster has a CRI node.
    pub fn kubelet_ca(&self) -> Option<PathBuf> {
        let ca = self.dir.join("kubelet-pki/ca.crt");
        ca.exists().then_some(ca)
    }

    /// Checkpoints a container through the kubelet endpoint of this cluster's CRI node, as the
    /// coordinator's service account; returns the archive's path on the node.
    pub async fn kubelet_checkpoint(&self, namespace: &str, pod: &str, container: &str) -> String {
        let (base, ca) = self.kubelet();
        let client = crate::coordinator::client_with(&ca, &crate::coordinator::Credential::None);
        let response = client
            .post(format!("{base}/checkpoint/{namespace}/{pod}/{container}"))
            .bearer_auth("coordinator-token")
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            status.is_success(),
            "checkpoint of {pod}/{container}: {status} {body}"
        );
        body["items"][0].as_str().unwrap().to_owned()
    }

    /// The node part (deploy/node, as rendered) on this cluster's CRI node: the DaemonSet's pod
    /// (the rig has no DaemonSet controller, so its pod is created from the template as the
    /// controller would), its image pushed to the tests' HTTPS registry, the cluster
    /// coordinator's public key set. Returns its pod's name and IP once it is ready.
    pub async fn deploy_node_part(&self) -> (String, String) {
        self.deploy_node_part_with(true).await
    }

    /// [`Self::deploy_node_part`], with or without the kubelet's pod directories mounted (the
    /// `pods` volume: without it the node part cannot read emptyDirs). An earlier one is
    /// replaced.
    pub async fn deploy_node_part_with(&self, pod_directories: bool) -> (String, String) {
        self.deploy_node_part_inner(pod_directories, None).await
    }

    /// [`Self::deploy_node_part`] on node `node` of a cluster with several (the DaemonSet
    /// controller's pod for that node, bound to it).
    pub async fn deploy_node_part_on(&self, node: &str) -> (String, String) {
        self.deploy_node_part_inner(true, Some(node)).await
    }

    async fn deploy_node_part_inner(
        &self,
        pod_directories: bool,
        node: Option<&str>,
    ) -> (String, String) {
        static IMAGE: OnceLock<String> = OnceLock::new();
        let image = IMAGE.get_or_init(|| {
            crate::outer::require_image("ums-rs/node:latest");
            crate::registry::Registry::shared_tls().push("ums-rs/node:latest", "ums-rs/node:1")
        });
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node");
        let rendered = Command::new("kubectl")
            .arg("kustomize")
            .arg(&root)
            .output()
            .expect("kubectl kustomize deploy/node");
        assert!(
            rendered.status.success(),
            "kubectl kustomize deploy/node failed"
        );
        let daemon_set: serde_json::Value = serde_yaml::from_slice(&rendered.stdout).unwrap();
        let key = SigningKey::from_pkcs8(&std::fs::read(self.signing_key_file()).unwrap())
            .unwrap()
            .public_key();
        let mut template = daemon_set["spec"]["template"].clone();
        if !pod_directories {
            let spec = &mut template["spec"];
            spec["volumes"]
                .as_array_mut()
                .unwrap()
                .retain(|v| v["name"] != "pods");
            spec["containers"][0]["volumeMounts"]
                .as_array_mut()
                .unwrap()
                .retain(|v| v["name"] != "pods");
        }
        let container = &mut template["spec"]["containers"][0];
        container["image"] = image.as_str().into();
        for env in container["env"].as_array_mut().unwrap() {
            if env["name"] == "UMS_COORDINATOR_KEYS" {
                env["value"] = key.clone().into();
            }
        }
        if let Some(node) = node {
            template["spec"]["nodeName"] = node.into();
        }
        let name = &node.map_or_else(|| "ums-node-1".to_owned(), |n| format!("ums-node-{n}"));
        let name = name.as_str();
        if self
            .kubectl_result(User::Admin, &["get", "pod", "-n", "ums-system", name])
            .is_ok()
        {
            self.kubectl(
                User::Admin,
                &["delete", "pod", "-n", "ums-system", name, "--wait=true"],
            );
        }
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": daemon_set["metadata"]["namespace"],
                         "labels": template["metadata"]["labels"]},
            "spec": template["spec"],
        });
        self.kubectl_with_input(User::Admin, &["create", "-f", "-"], &pod.to_string());
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.get_json(&["pod", "-n", "ums-system", name])["status"].clone();
            let ready = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready {
                return (
                    name.to_owned(),
                    status["podIP"].as_str().unwrap().to_owned(),
                );
            }
            assert!(
                Instant::now() < until,
                "the node part did not get ready: {status}\n{}",
                self.node_log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A token of this cluster's coordinator for the pod `namespace/name` (bound to its IP and
    /// UID, as the coordinator binds it).
    pub fn coordinator_token_for(&self, namespace: &str, name: &str, scope: Scope) -> String {
        let pod = self.get_json(&["pod", "-n", namespace, name]);
        let key = SigningKey::from_pkcs8(&std::fs::read(self.signing_key_file()).unwrap()).unwrap();
        key.sign(&Claims {
            aud: pod["status"]["podIP"].as_str().unwrap().to_owned(),
            scope,
            exp: ums_contract::credential::now_unix() + 600,
            mid: None,
            uid: pod["metadata"]["uid"].as_str().map(str::to_owned),
        })
    }

    /// Runs a command in the CRI node's container (`ctr`, `crictl`...); its output.
    pub fn cri_node_exec(&self, args: &[&str]) -> String {
        let output = Command::new("docker")
            .arg("exec")
            .arg(format!("ums-node-{}", self.name))
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?} on the CRI node of {}: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Loads an image of this machine's Docker engine into the containerd of each of the
    /// cluster's CRI nodes (the project's images, which no registry here serves), as
    /// `docker.io/<name>`.
    pub fn cri_node_import(&self, image: &str) {
        let nodes = std::iter::once((self.name.as_str(), self.node.as_ref()))
            .chain(self.extra_nodes.iter().map(|(n, a)| (n.as_str(), Some(a))))
            .filter(|(_, agent)| agent.is_some_and(|a| a.kubelet_port.is_some()))
            .map(|(name, _)| name.to_owned());
        for node in nodes {
            let mut save = Command::new("docker")
                .args(["save", image])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let import = Command::new("docker")
                .arg("exec")
                .arg("-i")
                .arg(format!("ums-node-{node}"))
                .args(["ctr", "-n", "k8s.io", "images", "import", "-"])
                .stdin(save.stdout.take().unwrap())
                .output()
                .unwrap();
            assert!(
                save.wait().unwrap().success() && import.status.success(),
                "importing {image} into the CRI node {node}: {}",
                String::from_utf8_lossy(&import.stderr)
            );
        }
    }

    /// Where the CRI node's /var/lib/kubelet/checkpoints is on this machine.
    pub fn node_checkpoint_dir(&self) -> PathBuf {
        self.dir.join("node/checkpoints")
    }

    /// Where the emptyDir `volume` of pod `pod` (namespace default) is on this machine: the
    /// node's /var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/<volume>.
    pub fn empty_dir(&self, pod: &str, volume: &str) -> PathBuf {
        let uid = self.get_json(&["pod", pod])["metadata"]["uid"]
            .as_str()
            .expect("the pod has a uid")
            .to_owned();
        self.pod_state_dir(&uid)
            .join("pods")
            .join(uid)
            .join("volumes/kubernetes.io~empty-dir")
            .join(volume)
    }

    /// The output of `container` of `pod` on a CRI node: the log file the runtime writes (CRI
    /// format: `<time> <stream> <P|F> <line>`), as lines without the prefix.
    pub fn cri_container_output(&self, pod: &str, container: &str) -> Vec<String> {
        self.cri_container_output_in("default", pod, container)
    }

    /// [`Cluster::cri_container_output`] for a pod of `namespace`.
    pub fn cri_container_output_in(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Vec<String> {
        let uid = self.get_json(&["pod", "-n", namespace, pod])["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned();
        let dir = self
            .pod_state_dir(&uid)
            .join("pods")
            .join(uid)
            .join("logs")
            .join(container);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_owned))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The node agents' logs (the first node's, then each added node's).
    pub fn node_log(&self) -> String {
        let mut text = tail(&self.dir.join("node-agent.log"), 60);
        for (name, _) in &self.extra_nodes {
            text.push_str(&format!("\n--- node agent of {name}:\n"));
            text.push_str(&tail(&self.dir.join(format!("node-agent-{name}.log")), 60));
        }
        text
    }

    /// The state directory of the node that runs `uid`'s pod (`node/` for the first node).
    fn pod_state_dir(&self, uid: &str) -> PathBuf {
        self.extra_nodes
            .iter()
            .map(|(name, _)| self.dir.join(format!("node-{name}")))
            .find(|dir| dir.join("pods").join(uid).exists())
            .unwrap_or_else(|| self.dir.join("node"))
    }

    /// The object as JSON (`kubectl get -o json`, as admin).
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.kubectl(User::Admin, &all)).unwrap()
    }

    /// The outer container that runs `container` of pod `pod` (the node agent's naming).
    pub fn pod_container(&self, pod: &str, container: &str) -> String {
        let uid = self.get_json(&["pod", pod])["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned();
        format!("k8s_{container}_{pod}_default_{}", &uid[..8])
    }

    fn write_kubeconfigs(&self) {
        let ca = self.dir.join("apiserver-certs/apiserver.crt");
        for user in [User::Admin, User::Jane, User::Coordinator] {
            let config = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {}-token\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: default\ncurrent-context: c\n",
                self.server,
                ca.display(),
                user.name()
            );
            std::fs::write(self.kubeconfig(user), config).unwrap();
        }
    }

    /// The coordinator's signing key (PKCS#8 DER file), whose public key this cluster's
    /// webhook hands the sidecars.
    pub fn signing_key_file(&self) -> PathBuf {
        self.dir.join("coordinator-signing.key")
    }

    /// A token this cluster's coordinator would give for the sidecar of the pod at `pod_ip`
    /// (the tests and the demo play the coordinator's part where they call sidecars): bound to
    /// the UID of this cluster's pod with that IP, as the coordinator binds it.
    pub fn sidecar_token(&self, pod_ip: &str, scope: Scope, mid: Option<&str>) -> String {
        let key = SigningKey::from_pkcs8(&std::fs::read(self.signing_key_file()).unwrap()).unwrap();
        let pods = self.get_json(&["pods"]);
        let uid = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["status"]["podIP"] == pod_ip)
            .and_then(|p| p["metadata"]["uid"].as_str())
            .map(str::to_owned);
        key.sign(&Claims {
            aud: pod_ip.to_owned(),
            scope,
            exp: ums_contract::credential::now_unix() + 600,
            mid: mid.map(str::to_owned),
            uid,
        })
    }

    /// The kubeconfig file of `user`.
    pub fn kubeconfig(&self, user: User) -> PathBuf {
        self.dir.join(format!("kubeconfig-{}", user.name()))
    }

    fn wait_ready(&mut self, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.apiserver.try_wait() {
                panic!(
                    "ums-test-apiserver exited ({status}):\n{}",
                    tail(&self.dir.join("apiserver.log"), 40)
                );
            }
            let ready = self.try_kubectl(User::Admin, &["get", "--raw", "/readyz"], None);
            let namespaces = self.try_kubectl(User::Admin, &["get", "namespace", "default"], None);
            if ready.is_ok() && namespaces.is_ok() {
                return;
            }
            assert!(
                Instant::now() < until,
                "the API server of {} was not ready within {deadline:?}: {:?}\n--- apiserver.log:\n{}\n--- etcd.log:\n{}",
                self.name,
                ready.err(),
                tail(&self.dir.join("apiserver.log"), 40),
                tail(&self.dir.join("etcd.log"), 20)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The project's MutatingWebhookConfiguration and ValidatingWebhookConfiguration, rendered
    /// from deploy/base by kustomize, with this cluster's CA bundle; and the ums-system
    /// namespace.
    fn install_webhook_configurations(&self) {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base");
        let rendered = Command::new("kubectl")
            .args(["kustomize"])
            .arg(&base)
            .output()
            .expect("kubectl kustomize");
        assert!(
            rendered.status.success(),
            "kubectl kustomize deploy/base failed"
        );
        let ca_bundle = std::fs::read_to_string(self.dir.join("webhook-certs/ca-bundle.b64"))
            .unwrap()
            .trim()
            .to_owned();
        let mut documents = Vec::new();
        for document in serde_yaml::Deserializer::from_slice(&rendered.stdout) {
            let mut value = serde_json::to_value(
                <serde_yaml::Value as serde::Deserialize>::deserialize(document).unwrap(),
            )
            .unwrap();
            match value["kind"].as_str() {
                Some("Namespace") => documents.push(value),
                Some("MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration") => {
                    for webhook in value["webhooks"].as_array_mut().unwrap() {
                        webhook["clientConfig"]["caBundle"] = ca_bundle.clone().into();
                    }
                    documents.push(value);
                }
                _ => {}
            }
        }
        assert_eq!(
            documents.len(),
            3,
            "deploy/base: namespace + two webhook configurations"
        );
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": documents});
        self.kubectl_with_input(User::Admin, &["apply", "-f", "-"], &list.to_string());
        // The LiveMigration resource, as deploying the coordinator installs it.
        let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/coordinator/crd.yaml");
        self.kubectl(User::Admin, &["apply", "-f", crd.to_str().unwrap()]);
    }

    fn try_kubectl(
        &self,
        user: User,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, String> {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig(user))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl must be installed");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let output = child.wait_with_output().unwrap();
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Runs kubectl as `user`; Err(stderr) when it fails.
    pub fn kubectl_result(&self, user: User, args: &[&str]) -> Result<String, String> {
        self.try_kubectl(user, args, None)
    }

    /// Runs kubectl as `user`; panics with its stderr on failure.
    pub fn kubectl(&self, user: User, args: &[&str]) -> String {
        self.try_kubectl(user, args, None)
            .unwrap_or_else(|e| panic!("kubectl {args:?} as {user:?} failed: {e}"))
    }

    /// Runs kubectl as `user` with `input` on stdin; Err(stderr) when it fails.
    pub fn kubectl_with_input_result(
        &self,
        user: User,
        args: &[&str],
        input: &str,
    ) -> Result<String, String> {
        self.try_kubectl(user, args, Some(input))
    }

    /// Runs kubectl as `user` with `input` on stdin; panics on failure.
    pub fn kubectl_with_input(&self, user: User, args: &[&str], input: &str) -> String {
        self.try_kubectl(user, args, Some(input))
            .unwrap_or_else(|e| panic!("kubectl {args:?} as {user:?} failed: {e}"))
    }

    /// Stops the webhook container (the webhook Deployment down).
    pub fn stop_webhook(&self) {
        let _ = Command::new("docker")
            .args(["stop", "--time", "1", &self.webhook_container])
            .output();
    }

    /// The webhook container's log.
    pub fn webhook_log(&self) -> String {
        Command::new("docker")
            .args(["logs", "--tail", "50", &self.webhook_container])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }
}

/// Runs the real ums-rs/webhook image with certificates from ums-certs (for
/// `ums-webhook.ums-system.svc`); returns its `IP:8443`.
fn start_webhook(
    dir: &Path,
    container: &str,
    with_registry: bool,
    coordinator_key: &str,
) -> String {
    crate::outer::require_image("ums-rs/webhook:latest");
    let certs = dir.join("webhook-certs");
    let bundle = ums_certs::generate(&ums_certs::CertRequest {
        service: "ums-webhook".into(),
        namespace: "ums-system".into(),
        extra_names: vec![],
        valid_for: time::Duration::days(1),
        client_auth: false,
    })
    .unwrap();
    let files = ums_certs::write_bundle(&bundle, &certs, "ums-webhook-tls", "ums-system").unwrap();
    // The webhook runs as 65532, as in its Deployment; a Secret volume would be readable.
    for file in [&files.server_cert, &files.server_key] {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let mount = format!("{}:/etc/ums-webhook/tls:ro", certs.display());
    let registry = if with_registry {
        crate::registry::Registry::shared().pod_address.clone()
    } else {
        String::new()
    };
    docker(&[
        "run",
        "--detach",
        "--name",
        container,
        "--read-only",
        "--volume",
        &mount,
        "ums-rs/webhook:latest",
        "--tls-cert",
        "/etc/ums-webhook/tls/tls.crt",
        "--tls-key",
        "/etc/ums-webhook/tls/tls.key",
        "--migration-service-accounts",
        COORDINATOR,
        "--insecure-registries",
        &registry,
        "--image-pull-policy",
        "IfNotPresent",
        // One argument: a base64url key may start with '-'.
        &format!("--coordinator-keys={coordinator_key}"),
    ]);
    let ip = docker(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.IPAddress}}",
        container,
    ]);
    let address = format!("{ip}:8443");
    let until = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&address).is_err() {
        if Instant::now() >= until {
            let log = Command::new("docker")
                .args(["logs", container])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .unwrap_or_default();
            let _ = Command::new("docker")
                .args(["rm", "--force", container])
                .output();
            panic!("the webhook did not listen on {address}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    address
}

/// What a pod's outer containers printed (the last lines of each, run by the Docker runtime),
/// and for a runtime container the nested engine's log and the tests' registry's: what a pod
/// that never got ready says about why (an ambassador's refused create, an engine that did
/// not start, a pull that failed).
pub fn containers_log(status: &serde_json::Value) -> String {
    let mut text = String::new();
    for container in status["containerStatuses"].as_array().into_iter().flatten() {
        let name = container["name"].as_str().unwrap_or("?");
        let Some(id) = container["containerID"]
            .as_str()
            .and_then(|id| id.strip_prefix("docker://"))
        else {
            continue;
        };
        let logs = crate::outer::container_log(id, 40);
        text.push_str(&format!("\n--- container {name} ({id:.12}):\n{logs}"));
        if name == "runtime" {
            let engine = Command::new("docker")
                .args([
                    "exec",
                    id,
                    "sh",
                    "-c",
                    "tail -n 30 /var/log/dockerd.log /var/log/podman.log 2>/dev/null",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            text.push_str(&format!("\n--- nested engine of {name}:\n{engine}"));
        }
    }
    text.push_str(&format!(
        "\n--- tests' registry:\n{}",
        crate::registry::Registry::logs()
    ));
    text
}

/// Stops node `name`'s agent and removes what it made: its containers, the route and the
/// forwarding rules of a CRI node's pod subnet, and (`network_owner`: the first node) the pod
/// network the cluster's Docker-runtime nodes share.
fn stop_node(name: &str, mut node: NodeAgent, network_owner: bool) {
    let _ = node.child.kill();
    let _ = node.child.wait();
    remove_node_containers(name);
    if network_owner {
        let _ = Command::new("docker")
            .args(["network", "rm", &node.network])
            .output();
    }
    if node.kubelet_port.is_some() {
        // The CRI node's pod subnet was routed to its container.
        let _ = Command::new("ip")
            .args(["route", "del", &node.subnet])
            .output();
    }
    if network_owner || node.kubelet_port.is_some() {
        for direction in ["-s", "-d"] {
            let _ = Command::new("iptables")
                .args(["-D", "DOCKER-USER", direction, &node.subnet, "-j", "ACCEPT"])
                .output();
        }
    }
}

/// A pod subnet (`10.<pid>.<n>.0/24`) no other node of this test process has and this
/// machine routes nowhere yet. A test process that was killed leaves its CRI nodes' routes
/// behind (`10.x.y.0/24 via <node container>`); a later process whose PID gives the same
/// prefix would see its pods' traffic go there (stop 29's CI: two Docker-runtime pods on
/// 10.160.0.0/24 and 10.160.1.0/24 were never ready, their probes and pulls routed to
/// containers long gone), so such a subnet is skipped, and said so.
fn next_subnet() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SUBNETS: AtomicU32 = AtomicU32::new(0);
    let routes = Command::new("ip")
        .args(["-4", "-o", "route", "show"])
        .output()
        .expect("run ip (iproute2)");
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    let routed: Vec<&str> = routes
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    loop {
        let n = SUBNETS.fetch_add(1, Ordering::Relaxed);
        let subnet = format!("10.{}.{n}.0/24", 100 + std::process::id() % 100);
        assert!(
            n < 250,
            "no free pod subnet left for this test process; this machine routes:\n{routes}"
        );
        if !routed.contains(&subnet.as_str()) {
            return subnet;
        }
        eprintln!(
            "[harness] pod subnet {subnet} is routed already (left by a test process that was killed?): skipped; its route: {}",
            routes
                .lines()
                .find(|l| l.starts_with(&format!("{subnet} ")))
                .unwrap_or_default()
        );
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes the outer containers the node agent of node `name` ran (its pods' sandboxes and
/// containers).
fn remove_node_containers(name: &str) {
    let label = format!("label=io.ums-rs.node-agent.node={name}");
    if let Ok(out) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &label])
        .output()
    {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "--force", "--volumes"])
                .args(&ids)
                .output();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (name, node) in std::mem::take(&mut self.extra_nodes) {
            stop_node(&name, node, false);
        }
        if let Some(node) = self.node.take() {
            stop_node(&self.name, node, true);
        }
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("docker")
            .args(["rm", "--force", &self.webhook_container])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stop 29's flake: a subnet this machine routes already (a killed test process's CRI
    /// node route) is never given to a node.
    #[test]
    fn a_subnet_this_machine_routes_already_is_skipped() {
        let first = next_subnet();
        let third = |subnet: &str| -> u32 { subnet.split('.').nth(2).unwrap().parse().unwrap() };
        let prefix: Vec<&str> = first.split('.').take(2).collect();
        let routed = format!("{}.{}.{}.0/24", prefix[0], prefix[1], third(&first) + 1);
        // What a killed process leaves: a route of that subnet to a container long gone
        // (here to the loopback device: nothing on this machine uses it).
        let added = Command::new("ip")
            .args(["route", "replace", &routed, "dev", "lo"])
            .output()
            .expect("run ip (iproute2)");
        assert!(
            added.status.success(),
            "ip route replace {routed} dev lo (the tests run as root): {}",
            String::from_utf8_lossy(&added.stderr)
        );
        let next = next_subnet();
        let _ = Command::new("ip")
            .args(["route", "del", &routed, "dev", "lo"])
            .output();
        assert_ne!(next, routed, "a routed subnet was given out");
        assert!(
            third(&next) > third(&routed),
            "{next} comes after the routed {routed}"
        );
    }
}
