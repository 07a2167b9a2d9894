//! Every manifest under `deploy/` parses into its k8s-openapi type (as rendered by kustomize,
//! the way `kubectl apply -k` renders it), and names, ports, paths, flags and the service
//! account agree across files and with the webhook binary's own flags.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;
use serde_json::Value;

/// One rendered kustomization, by kind.
#[derive(Default)]
struct Rendered {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    deployments: Vec<Deployment>,
    daemon_sets: Vec<k8s_openapi::api::apps::v1::DaemonSet>,
    services: Vec<Service>,
    pdbs: Vec<PodDisruptionBudget>,
    mutating: Vec<MutatingWebhookConfiguration>,
    validating: Vec<ValidatingWebhookConfiguration>,
    crds: Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
    /// Custom resources (cert-manager), kept as JSON.
    other: Vec<Value>,
}

fn typed<T: serde::de::DeserializeOwned>(doc: &Value) -> T {
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
        panic!(
            "{} {} does not parse into its k8s-openapi type: {e}",
            doc["kind"], doc["metadata"]["name"]
        )
    })
}

fn render(dir: &str) -> Rendered {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&root)
        .output()
        .expect("kubectl (with its built-in kustomize) must be installed to test deploy/; run scripts/install-host.sh");
    assert!(
        output.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut rendered = Rendered::default();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = Value::deserialize(document).expect("YAML document");
        if doc.is_null() {
            continue;
        }
        match doc["kind"].as_str().expect("every document has a kind") {
            "Namespace" => rendered.namespaces.push(typed(&doc)),
            "ServiceAccount" => rendered.service_accounts.push(typed(&doc)),
            "ClusterRole" => rendered.cluster_roles.push(typed(&doc)),
            "ClusterRoleBinding" => rendered.cluster_role_bindings.push(typed(&doc)),
            "Deployment" => rendered.deployments.push(typed(&doc)),
            "DaemonSet" => rendered.daemon_sets.push(typed(&doc)),
            "Service" => rendered.services.push(typed(&doc)),
            "PodDisruptionBudget" => rendered.pdbs.push(typed(&doc)),
            "MutatingWebhookConfiguration" => rendered.mutating.push(typed(&doc)),
            "ValidatingWebhookConfiguration" => rendered.validating.push(typed(&doc)),
            "CustomResourceDefinition" => rendered.crds.push(typed(&doc)),
            "Certificate" | "Issuer" => rendered.other.push(doc),
            other => panic!("{dir}: unexpected kind {other}: add it to this test"),
        }
    }
    rendered
}

fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.match_expressions.is_none(),
        "only matchLabels selectors are used"
    );
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
}

fn port_number(container: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("container has no port named {name}"))
                .container_port
        }
    }
}

/// A binary's flags as a Deployment sets them (args, and env mapped through clap's own
/// `env = ...` declarations), parsed by the binary's real argument parser.
fn deployment_args<A: clap::Parser>(binary: &str, container: &Container) -> A {
    let command = A::command();
    let mut argv = vec![binary.to_owned()];
    argv.extend(container.args.iter().flatten().cloned());
    for env in container.env.iter().flatten() {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().and_then(|e| e.to_str()) == Some(env.name.as_str()))
            .unwrap_or_else(|| panic!("{binary} reads no environment variable {}", env.name));
        let long = arg.get_long().expect("env flags have a long form");
        argv.push(format!(
            "--{long}={}",
            env.value.as_deref().expect("plain env value")
        ));
    }
    A::try_parse_from(&argv).unwrap_or_else(|e| {
        panic!("the Deployment's flags are not accepted by {binary}: {e}\n{argv:?}")
    })
}

/// The webhook's flags as its Deployment sets them.
fn webhook_args(container: &Container) -> ums_webhook::Args {
    deployment_args("ums-webhook", container)
}

fn check_base(r: &Rendered) {
    let namespace = "ums-system";
    assert!(r
        .namespaces
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some(namespace)));

    let [deployment] = r.deployments.as_slice() else {
        panic!("one Deployment")
    };
    assert_eq!(deployment.metadata.namespace.as_deref(), Some(namespace));
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(selects(&spec.selector, &pod_labels));
    let pod = spec.template.spec.as_ref().unwrap();
    let anti = pod
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let term = &anti
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()[0];
    assert!(selects(
        term.pod_affinity_term.label_selector.as_ref().unwrap(),
        &pod_labels
    ));

    // Service account exists in the Deployment's namespace.
    let sa_name = pod.service_account_name.as_deref().unwrap();
    assert!(r
        .service_accounts
        .iter()
        .any(|sa| sa.metadata.name.as_deref() == Some(sa_name)
            && sa.metadata.namespace.as_deref() == Some(namespace)));

    let [container] = pod.containers.as_slice() else {
        panic!("one container")
    };
    let args = webhook_args(container);
    assert_eq!(
        i32::from(args.listen.port()),
        port_number(container, &IntOrString::String("webhook".into()))
    );
    assert_eq!(
        i32::from(args.admin_listen.port()),
        port_number(container, &IntOrString::String("admin".into()))
    );
    // Probes go to the admin port, on the paths the webhook serves.
    for (probe, path) in [
        (container.readiness_probe.as_ref(), "/readyz"),
        (container.liveness_probe.as_ref(), "/livez"),
    ] {
        let http = probe.and_then(|p| p.http_get.as_ref()).expect("HTTP probe");
        assert_eq!(http.path.as_deref(), Some(path));
        assert_eq!(
            port_number(container, &http.port),
            i32::from(args.admin_listen.port())
        );
    }
    // Non-root, read-only root fs, limits.
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let sc = container.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let resources = container.resources.as_ref().unwrap();
    assert!(resources.requests.is_some() && resources.limits.is_some());
    // The TLS files are where the flags say, from the Secret volume.
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "tls")
        .expect("tls mount");
    assert_eq!(args.tls_cert, Path::new(&mount.mount_path).join("tls.crt"));
    assert_eq!(args.tls_key, Path::new(&mount.mount_path).join("tls.key"));
    let tls_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .unwrap();
    let secret_name = tls_volume
        .secret
        .as_ref()
        .unwrap()
        .secret_name
        .clone()
        .unwrap();
    assert_eq!(
        secret_name, "ums-webhook-tls",
        "the name `ums-certs` writes by default"
    );

    // PDB keeps one replica.
    let [pdb] = r.pdbs.as_slice() else {
        panic!("one PDB")
    };
    let pdb_spec = pdb.spec.as_ref().unwrap();
    assert_eq!(pdb_spec.min_available, Some(IntOrString::Int(1)));
    assert!(selects(pdb_spec.selector.as_ref().unwrap(), &pod_labels));

    // The Service selects the pods and routes to the webhook port.
    let [service] = r.services.as_slice() else {
        panic!("one Service")
    };
    let service_spec = service.spec.as_ref().unwrap();
    let selector = service_spec.selector.clone().unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    let https = service_spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("https"))
        .unwrap();
    assert_eq!(
        port_number(container, https.target_port.as_ref().unwrap()),
        i32::from(args.listen.port())
    );

    // The migration coordinator account of the RBAC is the one the webhook lets through.
    let binding = r
        .cluster_role_bindings
        .iter()
        .find(|b| b.metadata.name.as_deref() == Some("ums-migration-coordinator"))
        .unwrap();
    assert!(r
        .cluster_roles
        .iter()
        .any(|c| c.metadata.name.as_deref() == Some(binding.role_ref.name.as_str())));
    for subject in binding.subjects.iter().flatten() {
        let user = format!(
            "system:serviceaccount:{}:{}",
            subject.namespace.as_deref().unwrap(),
            subject.name
        );
        assert!(
            args.migration_service_accounts.contains(&user),
            "{user} is bound but not allowed by the webhook"
        );
        assert!(r
            .service_accounts
            .iter()
            .any(
                |sa| sa.metadata.name.as_deref() == Some(subject.name.as_str())
                    && sa.metadata.namespace == subject.namespace
            ));
    }

    // Both webhook configurations reach the Service on the right paths, with the safe settings.
    let check_client =
        |config: &k8s_openapi::api::admissionregistration::v1::WebhookClientConfig, path: &str| {
            let svc = config.service.as_ref().expect("service reference");
            assert_eq!(Some(svc.name.as_str()), service.metadata.name.as_deref());
            assert_eq!(
                Some(svc.namespace.as_str()),
                service.metadata.namespace.as_deref()
            );
            assert_eq!(svc.path.as_deref(), Some(path));
            assert_eq!(svc.port, https.port.into());
        };
    let excluded = |selector: &Option<LabelSelector>| -> Vec<String> {
        selector
            .as_ref()
            .unwrap()
            .match_expressions
            .iter()
            .flatten()
            .filter(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
            .flat_map(|e| e.values.clone().unwrap_or_default())
            .collect()
    };
    let [mutating] = r.mutating.as_slice() else {
        panic!("one MutatingWebhookConfiguration")
    };
    for webhook in mutating.webhooks.iter().flatten() {
        check_client(&webhook.client_config, "/mutate");
        assert_eq!(webhook.side_effects, "None");
        assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(webhook.reinvocation_policy.as_deref(), Some("IfNeeded"));
        assert!(webhook.timeout_seconds.is_some());
        assert!(webhook
            .admission_review_versions
            .contains(&"v1".to_string()));
        assert!(webhook
            .match_conditions
            .as_ref()
            .is_some_and(|m| !m.is_empty()));
        let excluded = excluded(&webhook.namespace_selector);
        assert!(excluded.contains(&"kube-system".into()) && excluded.contains(&namespace.into()));
        let rule = &webhook.rules.as_ref().unwrap()[0];
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_string()][..]));
        assert_eq!(
            rule.operations.as_deref(),
            Some(&["CREATE".to_string()][..])
        );
    }
    let [validating] = r.validating.as_slice() else {
        panic!("one ValidatingWebhookConfiguration")
    };
    for webhook in validating.webhooks.iter().flatten() {
        check_client(&webhook.client_config, "/validate");
        assert_eq!(webhook.side_effects, "None");
        assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
        assert!(webhook
            .match_conditions
            .as_ref()
            .is_some_and(|m| !m.is_empty()));
        let excluded = excluded(&webhook.namespace_selector);
        assert!(excluded.contains(&"kube-system".into()) && excluded.contains(&namespace.into()));
        let operations = webhook.rules.as_ref().unwrap()[0]
            .operations
            .clone()
            .unwrap();
        for op in ["CREATE", "UPDATE", "DELETE"] {
            assert!(
                operations.contains(&op.to_string()),
                "validating webhook misses {op}"
            );
        }
    }
}

#[test]
fn base_manifests_parse_and_agree() {
    check_base(&render("deploy/base"));
}

#[test]
fn cert_manager_overlay_issues_the_secret_the_deployment_mounts() {
    let rendered = render("deploy/overlays/cert-manager");
    check_base(&rendered);
    let certificate = rendered
        .other
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == "ums-webhook")
        .expect("serving Certificate");
    assert_eq!(certificate["spec"]["secretName"], "ums-webhook-tls");
    let names: Vec<&str> = certificate["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(names.contains(&"ums-webhook.ums-system.svc"));
    let injected = format!(
        "{}/{}",
        certificate["metadata"]["namespace"].as_str().unwrap(),
        certificate["metadata"]["name"].as_str().unwrap()
    );
    for annotations in rendered
        .mutating
        .iter()
        .map(|m| &m.metadata.annotations)
        .chain(rendered.validating.iter().map(|v| &v.metadata.annotations))
    {
        assert_eq!(
            annotations.as_ref().unwrap()["cert-manager.io/inject-ca-from"],
            injected
        );
    }
}

#[test]
fn coordinator_manifests_run_it_as_the_account_the_webhook_lets_through() {
    let base = render("deploy/base");
    let r = render("deploy/coordinator");
    let [deployment] = r.deployments.as_slice() else {
        panic!("one Deployment")
    };
    let namespace = deployment.metadata.namespace.as_deref().unwrap();
    let spec = deployment.spec.as_ref().unwrap();
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(selects(&spec.selector, &pod_labels));
    let pod = spec.template.spec.as_ref().unwrap();
    // Its service account is the one the webhook lets change pods under migration, and base
    // defines it (with its RBAC).
    let account = pod.service_account_name.as_deref().unwrap();
    let [webhook] = base.deployments.as_slice() else {
        panic!("one webhook Deployment")
    };
    let webhook_args = webhook_args(
        &webhook
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0],
    );
    assert!(
        webhook_args
            .migration_service_accounts
            .contains(&format!("system:serviceaccount:{namespace}:{account}")),
        "{:?}",
        webhook_args.migration_service_accounts
    );
    assert!(base
        .service_accounts
        .iter()
        .any(|sa| sa.metadata.name.as_deref() == Some(account)
            && sa.metadata.namespace.as_deref() == Some(namespace)));
    let [container] = pod.containers.as_slice() else {
        panic!("one container")
    };
    let args: ums_coordinator::Args = deployment_args("ums-coordinator", container);
    assert_eq!(
        i32::from(args.listen.port()),
        port_number(container, &IntOrString::String("https".into()))
    );
    // The certificate, the key and the peers' CAs are in mounted volumes.
    let mounted = |path: &std::path::Path| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| path.starts_with(&m.mount_path))
            .map(|m| m.name.clone())
    };
    let volume = |name: String| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .cloned()
            .unwrap()
    };
    let tls = volume(mounted(&args.tls_cert).expect("certificate mounted"));
    assert_eq!(
        tls.secret.unwrap().secret_name.as_deref(),
        Some("ums-coordinator-tls")
    );
    assert_eq!(mounted(&args.tls_key), mounted(&args.tls_cert));
    let [peer_ca] = args.peer_ca.as_slice() else {
        panic!("one peer CA file")
    };
    let peers = volume(mounted(peer_ca).expect("peer CAs mounted"));
    assert_eq!(peers.config_map.unwrap().name, "ums-coordinator-peers");
    let signing = volume(mounted(&args.signing_key).expect("signing key mounted"));
    assert_eq!(
        signing.secret.unwrap().secret_name.as_deref(),
        Some("ums-coordinator-signing")
    );
    let api = volume(mounted(&args.api_tokens).expect("operators' tokens mounted"));
    assert_eq!(
        api.secret.unwrap().secret_name.as_deref(),
        Some("ums-coordinator-api")
    );
    // The LiveMigration resource, and the coordinator's rights on it (base's ClusterRole).
    let [crd] = r.crds.as_slice() else {
        panic!("one CustomResourceDefinition")
    };
    assert_eq!(crd.spec.group, "migration.ums-rs.io");
    assert_eq!(crd.spec.names.kind, "LiveMigration");
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let role = base
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("ums-migration-coordinator"))
        .unwrap();
    for (resource, verb) in [
        ("livemigrations", "watch"),
        ("livemigrations/status", "patch"),
        ("pods", "create"),
        ("pods", "delete"),
        ("configmaps", "get"),
        ("configmaps", "create"),
        ("configmaps", "update"),
        ("configmaps", "delete"),
        ("secrets", "get"),
        ("serviceaccounts", "get"),
        ("namespaces", "get"),
        ("nodes", "list"),
        ("events", "create"),
    ] {
        assert!(
            role.rules.iter().flatten().any(|rule| rule
                .resources
                .iter()
                .flatten()
                .any(|r| r == resource)
                && rule.verbs.iter().any(|v| v == verb)),
            "the coordinator may not {verb} {resource}"
        );
    }
    // UMS's NodePort, to the HTTPS port.
    let [service] = r.services.as_slice() else {
        panic!("one Service")
    };
    // The eviction webhook (kubectl drain) goes to that Service, on pods/eviction only.
    let [eviction] = r.validating.as_slice() else {
        panic!("one ValidatingWebhookConfiguration (evictions)")
    };
    let hook = &eviction.webhooks.as_ref().unwrap()[0];
    let target = hook.client_config.service.as_ref().unwrap();
    assert_eq!(
        (target.name.as_str(), target.namespace.as_str()),
        (
            service.metadata.name.as_deref().unwrap(),
            service.metadata.namespace.as_deref().unwrap()
        )
    );
    assert_eq!(target.path.as_deref(), Some("/admission/eviction"));
    let rules = hook.rules.as_ref().unwrap();
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods/eviction".to_owned()][..])
    );
    assert_eq!(hook.side_effects, "NoneOnDryRun");
    let service_spec = service.spec.as_ref().unwrap();
    assert!(selects(
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: service_spec.selector.clone(),
            ..Default::default()
        },
        &pod_labels
    ));
    let port = &service_spec.ports.as_ref().unwrap()[0];
    assert_eq!(port.node_port, Some(30001));
    assert_eq!(
        port_number(container, port.target_port.as_ref().unwrap()),
        i32::from(args.listen.port())
    );
}

#[test]
fn the_node_part_mounts_the_checkpoint_directory_and_reads_pod_directories_only() {
    let r = render("deploy/node");
    let [daemon_set] = r.daemon_sets.as_slice() else {
        panic!("one DaemonSet")
    };
    let spec = daemon_set.spec.as_ref().unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(selects(&spec.selector, &labels));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_ne!(pod.host_network, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let volumes = pod.volumes.as_ref().unwrap();
    let host_paths: Vec<&str> = volumes
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.as_str()))
        .collect();
    assert_eq!(
        host_paths,
        ["/var/lib/kubelet/checkpoints", "/var/lib/kubelet/pods"],
        "the only hostPaths"
    );
    let [container] = pod.containers.as_slice() else {
        panic!("one container")
    };
    let security = container.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        security.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    // Reading the emptyDirs' files whatever their modes; nothing else.
    assert_eq!(
        security.capabilities.as_ref().unwrap().add.as_deref(),
        Some(&["DAC_READ_SEARCH".to_owned()][..])
    );
    let mounts = container.volume_mounts.as_ref().unwrap();
    let mount = &mounts[0];
    let pods = &mounts[1];
    assert_eq!(
        (pods.mount_path.as_str(), pods.read_only),
        ("/pods", Some(true)),
        "the pod directories, read-only"
    );
    let env: BTreeMap<&str, &k8s_openapi::api::core::v1::EnvVar> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    assert_eq!(
        env["UMS_POD_IP"]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "status.podIP"
    );
    assert!(env.contains_key("UMS_COORDINATOR_KEYS"));
    assert_eq!(mount.mount_path, "/checkpoints");
}
