//! The admission contract as the API server exercises it: `kubectl` against an API server
//! built from Kubernetes' own library, whose real MutatingAdmissionWebhook and
//! ValidatingAdmissionWebhook plugins (CEL matchConditions, namespaceSelector, reinvocation)
//! call the real ums-rs/webhook image, configured by deploy/base's webhook configurations.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use serde_json::{json, Value};
use ums_tests::cluster::{Cluster, User};

/// UMS's memhog-style pod: one container, a port, an emptyDir volume.
fn memhog(name: &str, interface: Option<&str>) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(interface) = interface {
        annotations.insert("migration-interface".into(), interface.into());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "containers": [{
                "name": "memhog",
                "image": "registry.example.com/ums/memhog:1",
                "ports": [{"containerPort": 8080}],
                "env": [{"name": "MEMORY_LIMIT", "value": "268435456"}],
                "volumeMounts": [{"name": "state", "mountPath": "/state"}]
            }],
            "volumes": [{"name": "state", "emptyDir": {}}]
        }
    })
}

fn get_pod(cluster: &Cluster, name: &str) -> Value {
    serde_json::from_str(&cluster.kubectl(User::Admin, &["get", "pod", name, "-o", "json"]))
        .unwrap()
}

fn container_names(pod: &Value) -> Vec<&str> {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[test]
fn annotated_pods_are_wrapped_by_the_admission_chain() {
    let cluster = Cluster::start();
    for (interface, image) in [("dind", "ums-rs/dind"), ("pind", "ums-rs/pind")] {
        let name = format!("memhog-{interface}");
        cluster.kubectl_with_input(
            User::Jane,
            &["create", "-f", "-"],
            &memhog(&name, Some(interface)).to_string(),
        );
        let pod = get_pod(&cluster, &name);
        assert_eq!(
            container_names(&pod),
            ["runtime", "memhog"],
            "{interface}: the runtime container and one ambassador\n{}",
            cluster.webhook_log()
        );
        let runtime = &pod["spec"]["containers"][0];
        assert!(
            runtime["image"].as_str().unwrap().starts_with(image),
            "{runtime}"
        );
        assert_eq!(runtime["securityContext"]["privileged"], true);
        assert_eq!(runtime["ports"][0]["containerPort"], 8080);
        let mounts = runtime["volumeMounts"].to_string();
        assert!(
            mounts.contains("/mount/state") && mounts.contains("/etc/podinfo"),
            "{mounts}"
        );
        let ambassador = &pod["spec"]["containers"][1];
        assert_eq!(ambassador["image"], "ums-rs/ambassador:latest");
        assert_eq!(
            ambassador["command"],
            json!(["/usr/local/bin/ums-sidecar", "ambassador", "memhog"]),
            "{ambassador}"
        );
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(annotations["migration-start-mode"], "active");
        assert_eq!(annotations["migration-bypass"], "true");
        let originals: Value =
            serde_json::from_str(annotations["migration-containers"].as_str().unwrap()).unwrap();
        assert_eq!(originals[0]["image"], "registry.example.com/ums/memhog:1");
        // Defaulting by the API server ran before the webhook: the original carries it.
        assert_eq!(originals[0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(annotations["migration-volumes"], r#"["/mount/state"]"#);
    }
}

#[test]
fn pods_without_the_annotation_are_not_sent_to_the_webhook() {
    let cluster = Cluster::start();
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &memhog("plain", None).to_string(),
    );
    assert_eq!(container_names(&get_pod(&cluster, "plain")), ["memhog"]);
    // The webhook never saw it: matchConditions are evaluated by the API server.
    assert!(
        !cluster.webhook_log().contains("plain"),
        "{}",
        cluster.webhook_log()
    );
    // kube-system is excluded by the namespaceSelector, annotation or not.
    let mut system = memhog("system-pod", Some("dind"));
    system["metadata"]["namespace"] = "kube-system".into();
    cluster.kubectl_with_input(User::Admin, &["create", "-f", "-"], &system.to_string());
    let pod: Value = serde_json::from_str(&cluster.kubectl(
        User::Admin,
        &[
            "get",
            "pod",
            "system-pod",
            "-n",
            "kube-system",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(container_names(&pod), ["memhog"]);
}

#[test]
fn invalid_annotations_are_refused_with_the_reason() {
    let cluster = Cluster::start();
    let error = cluster
        .kubectl_with_input_result(
            User::Jane,
            &["create", "-f", "-"],
            &memhog("bad", Some("qemu")).to_string(),
        )
        .unwrap_err();
    assert!(
        error.contains("denied the request") && error.contains("qemu"),
        "{error}"
    );
    assert!(cluster
        .kubectl_result(User::Admin, &["get", "pod", "bad"])
        .is_err());
}

#[test]
fn a_pod_under_migration_is_locked_except_for_the_coordinator() {
    let cluster = Cluster::start();
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &memhog("locked", Some("dind")).to_string(),
    );
    // The coordinator locks it.
    cluster.kubectl(
        User::Coordinator,
        &["annotate", "pod", "locked", "migration-id=m-123"],
    );
    // A user may not change or delete it meanwhile.
    let error = cluster
        .kubectl_result(User::Jane, &["label", "pod", "locked", "tier=gold"])
        .unwrap_err();
    assert!(error.contains("m-123"), "{error}");
    let error = cluster
        .kubectl_result(User::Jane, &["delete", "pod", "locked", "--wait=false"])
        .unwrap_err();
    assert!(error.contains("m-123"), "{error}");
    // The coordinator unlocks it; then the user can change it again.
    cluster.kubectl(
        User::Coordinator,
        &["annotate", "pod", "locked", "migration-id-"],
    );
    cluster.kubectl(User::Jane, &["label", "pod", "locked", "tier=gold"]);
    cluster.kubectl(User::Jane, &["delete", "pod", "locked", "--wait=false"]);
}

#[test]
fn with_the_webhook_down_only_annotated_pods_are_blocked() {
    let cluster = Cluster::start();
    cluster.stop_webhook();
    // failurePolicy: Fail for the pods the webhook must see...
    let error = cluster
        .kubectl_with_input_result(
            User::Jane,
            &["create", "-f", "-"],
            &memhog("needs-webhook", Some("dind")).to_string(),
        )
        .unwrap_err();
    assert!(
        error.contains("failed calling webhook") && error.contains("mutate.pods.ums-rs.io"),
        "{error}"
    );
    // ...and the matchConditions keep every other pod out of it.
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &memhog("independent", None).to_string(),
    );
    assert_eq!(
        container_names(&get_pod(&cluster, "independent")),
        ["memhog"]
    );
}

/// A migration that left its lock behind (a coordinator gone for good) must not leave the pod
/// unchangeable for ever: a cluster admin may release the lock, saying why, in one update that
/// changes nothing else; the API server relays the webhook's warning, the webhook logs it.
#[test]
fn a_cluster_admin_releases_a_stranded_lock_by_hand_saying_why() {
    let cluster = Cluster::start();
    cluster.kubectl_with_input(
        User::Jane,
        &["create", "-f", "-"],
        &memhog("stuck", Some("dind")).to_string(),
    );
    cluster.kubectl(
        User::Coordinator,
        &[
            "annotate",
            "pod",
            "stuck",
            "migration-id=m-stuck",
            "migration.ums-rs.io/locked-by-coordinator=gone",
        ],
    );
    let release = [
        "annotate",
        "pod",
        "stuck",
        "migration-id-",
        "migration.ums-rs.io/locked-by-coordinator-",
        "migration.ums-rs.io/lock-released=coordinator edge was decommissioned mid-migration",
    ];
    // Jane may not, even with a reason; an admin may not without one, nor delete the pod.
    let refused = cluster.kubectl_result(User::Jane, &release).unwrap_err();
    assert!(refused.contains("m-stuck"), "{refused}");
    let refused = cluster
        .kubectl_result(User::Admin, &["annotate", "pod", "stuck", "migration-id-"])
        .unwrap_err();
    assert!(refused.contains("lock-released"), "{refused}");
    let refused = cluster
        .kubectl_result(User::Admin, &["delete", "pod", "stuck", "--wait=false"])
        .unwrap_err();
    assert!(refused.contains("m-stuck"), "{refused}");
    // Nor change something else in the same update.
    let mut sneaky = release.to_vec();
    sneaky.push("tier=gold");
    let refused = cluster.kubectl_result(User::Admin, &sneaky).unwrap_err();
    assert!(refused.contains("m-stuck"), "{refused}");

    let output = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig(User::Admin))
        .args(release)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("Warning") && stderr.contains("released by hand"),
        "kubectl prints the webhook's warning: {stderr}"
    );
    let pod = get_pod(&cluster, "stuck");
    let annotations = &pod["metadata"]["annotations"];
    assert!(annotations["migration-id"].is_null(), "{pod}");
    assert_eq!(
        annotations["migration.ums-rs.io/lock-released"],
        "coordinator edge was decommissioned mid-migration"
    );
    let log = cluster.webhook_log();
    assert!(
        log.contains("migration lock released by hand") && log.contains("m-stuck"),
        "{log}"
    );
    // The pod is the user's again.
    cluster.kubectl(User::Jane, &["label", "pod", "stuck", "tier=gold"]);
}
