//! The outer engine: the host's Docker, which runs the runtime images the way a node's
//! container runtime runs a pod's containers.

use std::process::Command;
use std::sync::OnceLock;

/// Runs the outer engine's CLI; panics with its output on failure.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker ({e}): run scripts/install-host.sh"));
    assert!(
        output.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The address of the outer engine's default bridge on the host (`docker0`): the host as seen
/// from a runtime container (where the tests' registry and servers listen). Docker 20.10 does
/// not report it as the network's gateway, so it is read off the interface.
pub fn bridge_gateway() -> &'static str {
    static GATEWAY: OnceLock<String> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let bridge = docker(&[
            "network",
            "inspect",
            "bridge",
            "--format",
            r#"{{index .Options "com.docker.network.bridge.name"}}"#,
        ]);
        let output = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", &bridge])
            .output()
            .expect("run ip (iproute2)");
        let text = String::from_utf8_lossy(&output.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .unwrap_or_else(|| {
                panic!("no IPv4 address on the outer engine's bridge {bridge}: {text}")
            })
            .to_owned()
    })
}

/// The last `lines` lines a container of the outer engine printed (stdout, then stderr);
/// what went wrong when even that fails.
pub fn container_log(container: &str, lines: usize) -> String {
    Command::new("docker")
        .args(["logs", "--tail", &lines.to_string(), container])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_else(|e| format!("(docker logs {container} failed: {e})"))
}

/// Panics unless the outer engine has `image` (built by images/build.sh).
pub fn require_image(image: &str) {
    let found = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "image {image} is missing from the outer engine: run images/build.sh (scripts/test.sh does)"
    );
}

/// What a privileged container gets on this machine. Kubernetes' `privileged: true` maps to
/// `--privileged`, which fails here: the sandbox's capability bounding set lacks
/// CAP_SYS_RESOURCE (runc: "unable to apply caps"). Everything else privileged means is granted
/// explicitly (see ENGINES.md, "Nesting").
pub const PRIVILEGED_ARGS: &[&str] = &[
    "--cap-add",
    "ALL",
    "--cap-drop",
    "SYS_RESOURCE",
    "--security-opt",
    "seccomp=unconfined",
    "--security-opt",
    "apparmor=unconfined",
    "--security-opt",
    "systempaths=unconfined",
    "--device-cgroup-rule",
    "a *:* rwm",
    "--volume",
    "/sys/fs/cgroup:/sys/fs/cgroup:rw",
];
