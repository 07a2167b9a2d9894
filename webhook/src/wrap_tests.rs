//! Unit tests of the pure pod rewrite over many pod shapes (fixtures in `webhook/tests/data`).

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::json;
use ums_contract::annotations::{parse_containers, parse_volumes};
use ums_contract::{MigrationAnnotations, StartMode, ANNOTATION_CONTAINERS};

use crate::config::WrapConfig;
use crate::mutate::{mutate_pod, MutateError};
use crate::wrap::WrapError;

fn fixture(name: &str) -> Pod {
    let text = match name {
        "memhog-dind" => include_str!("../tests/data/memhog-dind.json"),
        "memhog-pind" => include_str!("../tests/data/memhog-pind.json"),
        "web-and-worker" => include_str!("../tests/data/web-and-worker.json"),
        other => panic!("no fixture {other}"),
    };
    serde_json::from_str(text).expect("fixture is a Pod")
}

fn config() -> WrapConfig {
    WrapConfig {
        dind_image: "ums/dind:test".into(),
        pind_image: "ums/pind:test".into(),
        ambassador_image: "ums/ambassador:test".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        coordinator_keys: vec!["key-a".into(), "key-b".into()],
        ..WrapConfig::default()
    }
}

fn wrap(pod: &Pod) -> Pod {
    mutate_pod(pod, &config())
        .expect("mutation succeeds")
        .expect("pod is rewritten")
}

fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    pod.spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> &'a str {
    pod.metadata
        .annotations
        .as_ref()
        .unwrap()
        .get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("no annotation {key}"))
}

fn pod_with(annotations: serde_json::Value, containers: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": "p", "namespace": "ns", "annotations": annotations },
        "spec": { "containers": containers }
    }))
    .unwrap()
}

#[test]
fn pod_without_the_annotation_is_left_alone() {
    let pod = pod_with(json!({"other": "x"}), json!([{"name": "a", "image": "a"}]));
    assert_eq!(mutate_pod(&pod, &config()).unwrap(), None);
}

#[test]
fn ums_memhog_dind_example_is_wrapped() {
    let original = fixture("memhog-dind");
    let wrapped = wrap(&original);
    let spec = wrapped.spec.as_ref().unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["runtime", "memhog"]);

    let runtime = container(&wrapped, "runtime");
    assert_eq!(runtime.image.as_deref(), Some("ums/dind:test"));
    assert_eq!(runtime.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        runtime.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    let mounts: Vec<(&str, &str)> = runtime
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts,
        [
            ("kube-api-access-7x2kq", "/mount/kube-api-access-7x2kq"),
            ("ums-engine-storage", "/var/lib/docker"),
            ("ums-podinfo", "/etc/podinfo"),
            ("ums-pod-token", "/var/run/ums"),
        ]
    );
    let env: Vec<(&str, &str)> = runtime
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("<valueFrom>")))
        .collect();
    assert!(env.contains(&("UMS_ENGINE", "docker")));
    // The sidecar writes the ambassadors' token into a volume only they and it mount, and
    // accepts the coordinator's signed tokens.
    assert!(env.contains(&("UMS_POD_TOKEN_FILE", "/var/run/ums/pod-token")));
    assert!(env.contains(&("UMS_COORDINATOR_KEYS", "key-a,key-b")));

    let ambassador = container(&wrapped, "memhog");
    assert_eq!(ambassador.image.as_deref(), Some("ums/ambassador:test"));
    assert_eq!(
        ambassador.command.as_deref().unwrap(),
        ["/usr/local/bin/ums-sidecar", "ambassador", "memhog"]
    );
    let sc = ambassador.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, None);
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert!(ambassador
        .env
        .as_ref()
        .unwrap()
        .iter()
        .all(|e| e.name != "MEMORY_LIMIT"));
    assert!(ambassador.env.as_ref().unwrap().iter().any(
        |e| e.name == "UMS_TOKEN_FILE" && e.value.as_deref() == Some("/var/run/ums/pod-token")
    ));
    let token_mount = &ambassador.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(
        (token_mount.name.as_str(), token_mount.read_only),
        ("ums-pod-token", Some(true))
    );
    let token_volume = wrapped
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "ums-pod-token")
        .unwrap();
    assert_eq!(
        token_volume.empty_dir.as_ref().unwrap().medium.as_deref(),
        Some("Memory")
    );

    // The original container travels complete, valueFrom included.
    let originals = parse_containers(annotation(&wrapped, ANNOTATION_CONTAINERS)).unwrap();
    assert_eq!(originals, original.spec.as_ref().unwrap().containers);
    assert_eq!(annotation(&wrapped, "migration-start-mode"), "active");
    assert_eq!(annotation(&wrapped, "migration-bypass"), "true");
    assert_eq!(
        parse_volumes(annotation(&wrapped, "migration-volumes")).unwrap(),
        ["/mount/kube-api-access-7x2kq"]
    );
    // Every other pod field stays as it was.
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("migration-coordinator")
    );
    assert_eq!(
        spec.tolerations,
        original.spec.as_ref().unwrap().tolerations
    );
    assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
    assert_eq!(wrapped.metadata.labels, original.metadata.labels);
    let volume_names: Vec<&str> = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volume_names,
        [
            "kube-api-access-7x2kq",
            "ums-engine-storage",
            "ums-podinfo",
            "ums-pod-token"
        ]
    );
    let podinfo = spec.volumes.as_ref().unwrap()[2]
        .downward_api
        .as_ref()
        .unwrap();
    let paths: Vec<&str> = podinfo
        .items
        .as_ref()
        .unwrap()
        .iter()
        .map(|i| i.path.as_str())
        .collect();
    assert_eq!(paths, ["annotations", "labels", "name", "namespace", "uid"]);
}

#[test]
fn ums_memhog_pind_example_uses_podman() {
    let wrapped = wrap(&fixture("memhog-pind"));
    let runtime = container(&wrapped, "runtime");
    assert_eq!(runtime.image.as_deref(), Some("ums/pind:test"));
    assert!(runtime
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .any(|m| m.mount_path == "/var/lib/containers"));
    assert!(runtime
        .env
        .as_ref()
        .unwrap()
        .iter()
        .any(|e| e.name == "UMS_ENGINE" && e.value.as_deref() == Some("podman")));
}

#[test]
fn several_containers_share_one_runtime_with_the_union_of_ports() {
    let original = fixture("web-and-worker");
    let wrapped = wrap(&original);
    let spec = wrapped.spec.as_ref().unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["runtime", "web", "worker"]);
    let ports: Vec<(Option<&str>, i32, &str)> = container(&wrapped, "runtime")
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p.name.as_deref(),
                p.container_port,
                p.protocol.as_deref().unwrap_or("TCP"),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            (Some("http"), 8080, "TCP"),
            (Some("metrics"), 9090, "TCP"),
            (Some("dns"), 5353, "UDP"),
            (None, 5353, "TCP"),
        ]
    );
    for ambassador in ["web", "worker"] {
        assert!(container(&wrapped, ambassador).ports.is_none());
    }
    // Init and ephemeral containers, node selection and hostname are untouched.
    assert_eq!(
        spec.init_containers,
        original.spec.as_ref().unwrap().init_containers
    );
    assert_eq!(
        spec.ephemeral_containers,
        original.spec.as_ref().unwrap().ephemeral_containers
    );
    assert_eq!(
        spec.node_selector,
        original.spec.as_ref().unwrap().node_selector
    );
    assert_eq!(spec.hostname.as_deref(), Some("shop-0"));
    assert_eq!(annotation(&wrapped, "team"), "checkout");
    // The user's start mode is kept.
    assert_eq!(annotation(&wrapped, "migration-start-mode"), "passive");
}

#[test]
fn value_from_variables_are_forwarded_through_the_runtime() {
    let wrapped = wrap(&fixture("web-and-worker"));
    let env = container(&wrapped, "runtime").env.clone().unwrap();
    let forwarded = env
        .iter()
        .find(|e| e.name == "UMS_ENV__web__DB_PASSWORD")
        .expect("forwarded secret");
    let secret = forwarded
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("db", "password")
    );
    // resourceFieldRef names the original's resources: the sidecar computes it from the spec.
    assert!(env.iter().all(|e| e.name != "UMS_ENV__web__CPU_LIMIT"));
    let memhog = wrap(&fixture("memhog-dind"));
    let env = container(&memhog, "runtime").env.clone().unwrap();
    let pod_name = env
        .iter()
        .find(|e| e.name == "UMS_ENV__memhog__POD_NAME")
        .unwrap();
    assert_eq!(
        pod_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.name"
    );
}

#[test]
fn every_volume_kind_is_mounted_under_mount() {
    let wrapped = wrap(&fixture("web-and-worker"));
    let runtime = container(&wrapped, "runtime");
    let expected = [
        "data",
        "scratch",
        "config",
        "secrets",
        "host-logs",
        "claim",
        "meta",
    ];
    for name in expected {
        assert!(
            runtime
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == name && m.mount_path == format!("/mount/{name}")),
            "{name} not mounted"
        );
    }
    let volumes = parse_volumes(annotation(&wrapped, "migration-volumes")).unwrap();
    assert_eq!(volumes, expected.map(|n| format!("/mount/{n}")));
    // Each volume's kind, so the sidecar knows which travel (only the emptyDir by default).
    let kinds = ums_contract::annotations::parse_volume_kinds(annotation(
        &wrapped,
        "migration-volume-kinds",
    ))
    .unwrap();
    assert_eq!(kinds["claim"], "persistentVolumeClaim");
    assert_eq!(kinds["config"], "configMap");
    assert_eq!(kinds["host-logs"], "hostPath");
    let travelling: Vec<&str> = kinds
        .iter()
        .filter(|(_, kind)| ums_contract::annotations::travels_by_default(kind))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(travelling, ["data", "scratch"]);
    // The original volumes keep their sources.
    let spec = wrapped.spec.as_ref().unwrap();
    let claim = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "claim")
        .unwrap();
    assert_eq!(
        claim.persistent_volume_claim.as_ref().unwrap().claim_name,
        "worker-state"
    );
}

#[test]
fn probes_follow_the_nested_container() {
    let original = fixture("web-and-worker");
    let wrapped = wrap(&original);
    let web_original = &original.spec.as_ref().unwrap().containers[0];
    let web = container(&wrapped, "web");
    // Every probe goes to the runtime's sidecar, which runs the original network probe while
    // the nested container runs, with the same timings.
    for (probe, original, kind) in [
        (
            &web.readiness_probe,
            &web_original.readiness_probe,
            "readiness",
        ),
        (&web.startup_probe, &web_original.startup_probe, "startup"),
    ] {
        let (probe, original) = (probe.as_ref().unwrap(), original.as_ref().unwrap());
        assert!(probe.tcp_socket.is_none() && probe.exec.is_none());
        assert_eq!(
            probe.http_get.as_ref().unwrap().path.as_deref(),
            Some(format!("/probe/web?kind={kind}").as_str())
        );
        assert_eq!(probe.period_seconds, original.period_seconds);
    }
    // The exec liveness probe too, with the same timings.
    let liveness = web.liveness_probe.as_ref().unwrap();
    assert!(liveness.exec.is_none());
    let http = liveness.http_get.as_ref().unwrap();
    assert_eq!(http.path.as_deref(), Some("/probe/web?kind=liveness"));
    assert_eq!(
        http.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8888)
    );
    assert_eq!(
        (
            liveness.initial_delay_seconds,
            liveness.period_seconds,
            liveness.failure_threshold
        ),
        (Some(10), Some(20), Some(4))
    );

    let worker = container(&wrapped, "worker");
    let readiness = worker.readiness_probe.as_ref().unwrap();
    assert!(readiness.exec.is_none());
    assert_eq!(
        readiness.http_get.as_ref().unwrap().path.as_deref(),
        Some("/probe/worker?kind=readiness")
    );
    assert_eq!(readiness.period_seconds, Some(7));
    // gRPC liveness too (the sidecar checks its port).
    let liveness = worker.liveness_probe.as_ref().unwrap();
    assert!(liveness.grpc.is_none());
    assert_eq!(
        liveness.http_get.as_ref().unwrap().path.as_deref(),
        Some("/probe/worker?kind=liveness")
    );
    // No startup probe in the original: the ambassador waits for the nested container.
    let startup = worker.startup_probe.as_ref().unwrap();
    assert_eq!(
        startup.http_get.as_ref().unwrap().path.as_deref(),
        Some("/probe/worker")
    );
    assert!(startup.failure_threshold.unwrap() >= 100);
}

#[test]
fn container_without_probes_gets_runtime_startup_and_readiness_only() {
    let wrapped = wrap(&fixture("memhog-dind"));
    let memhog = container(&wrapped, "memhog");
    assert_eq!(
        memhog
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/probe/memhog")
    );
    assert!(memhog.startup_probe.is_some());
    assert!(memhog.liveness_probe.is_none());
}

#[test]
fn resources_are_summed_with_the_overhead() {
    let wrapped = wrap(&fixture("web-and-worker"));
    let resources = container(&wrapped, "runtime").resources.clone().unwrap();
    let get = |map: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
               k: &str| { map.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone()) };
    // cpu: 250m + 0.5 + 100m overhead; memory: 128Mi + 1Gi + 256Mi overhead.
    assert_eq!(get(&resources.requests, "cpu").as_deref(), Some("850m"));
    assert_eq!(
        get(&resources.requests, "memory").as_deref(),
        Some(((128u64 + 1024 + 256) << 20).to_string().as_str())
    );
    // worker has no limits, so the sum is unbounded: no limits on the runtime.
    assert_eq!(resources.limits, None);
}

#[test]
fn limits_only_count_as_requests_and_sum_when_all_are_bounded() {
    let pod = pod_with(
        json!({"migration-interface": "dind"}),
        json!([
            {"name": "a", "image": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}},
            {"name": "b", "image": "b", "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "200m", "memory": "512Mi"}}}
        ]),
    );
    let resources = container(&wrap(&pod), "runtime").resources.clone().unwrap();
    let requests = resources.requests.unwrap();
    let limits = resources.limits.unwrap();
    assert_eq!(requests["cpu"].0, "1200m");
    assert_eq!(limits["cpu"].0, "1300m");
    assert_eq!(
        limits["memory"].0,
        ((1024u64 + 512 + 256) << 20).to_string()
    );
    assert_eq!(requests["memory"].0, limits["memory"].0);
}

#[test]
fn no_resources_anywhere_gives_overhead_requests_only() {
    let resources = container(&wrap(&fixture("memhog-dind")), "runtime")
        .resources
        .clone()
        .unwrap();
    let requests = resources.requests.unwrap();
    assert_eq!(requests["cpu"].0, "100m");
    assert_eq!(requests["memory"].0, "256Mi");
    assert_eq!(resources.limits, None);
}

#[test]
fn security_context_is_kept_for_the_nested_container() {
    let original = fixture("web-and-worker");
    let wrapped = wrap(&original);
    let originals = parse_containers(annotation(&wrapped, ANNOTATION_CONTAINERS)).unwrap();
    assert_eq!(
        originals[0].security_context,
        original.spec.as_ref().unwrap().containers[0].security_context
    );
    assert_eq!(originals, original.spec.as_ref().unwrap().containers);
}

#[test]
fn runtime_name_and_volume_names_do_not_collide() {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "p", "annotations": { "migration-interface": "pind" } },
        "spec": {
            "initContainers": [{"name": "runtime-1", "image": "i"}],
            "containers": [{"name": "runtime", "image": "r"}],
            "volumes": [{"name": "ums-podinfo", "emptyDir": {}}, {"name": "ums-engine-storage", "emptyDir": {}}]
        }
    }))
    .unwrap();
    let wrapped = wrap(&pod);
    let spec = wrapped.spec.as_ref().unwrap();
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["runtime-2", "runtime"]);
    let runtime = container(&wrapped, "runtime-2");
    assert_eq!(runtime.image.as_deref(), Some("ums/pind:test"));
    let volume_names: Vec<&str> = spec
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(
        volume_names,
        [
            "ums-podinfo",
            "ums-engine-storage",
            "ums-engine-storage-1",
            "ums-podinfo-1",
            "ums-pod-token"
        ]
    );
    // The ambassador named "runtime" stands in for the original "runtime" container.
    assert_eq!(
        container(&wrapped, "runtime").command.as_ref().unwrap()[2],
        "runtime"
    );
}

#[test]
fn a_wrapped_pod_is_not_wrapped_twice() {
    let once = wrap(&fixture("web-and-worker"));
    assert_eq!(mutate_pod(&once, &config()).unwrap(), None);
    let ff_once = wrap(&pod_with(
        json!({"migration-interface": "ff"}),
        json!([{"name": "a", "image": "a"}]),
    ));
    assert_eq!(mutate_pod(&ff_once, &config()).unwrap(), None);
}

#[test]
fn unknown_interface_and_start_mode_are_refused_by_name() {
    let err = mutate_pod(
        &pod_with(
            json!({"migration-interface": "docker"}),
            json!([{"name": "a"}]),
        ),
        &config(),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("\"docker\"")
            && message.contains("dind")
            && message.contains("pind")
            && message.contains("ff"),
        "{message}"
    );
    let err = mutate_pod(
        &pod_with(
            json!({"migration-interface": "dind", "migration-start-mode": "later"}),
            json!([{"name": "a"}]),
        ),
        &config(),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("\"later\"") && message.contains("passive"),
        "{message}"
    );
}

#[test]
fn sidecar_port_collision_is_refused() {
    let pod = pod_with(
        json!({"migration-interface": "dind"}),
        json!([{"name": "a", "ports": [{"containerPort": 8888}]}]),
    );
    let err = mutate_pod(&pod, &config()).unwrap_err();
    assert!(
        matches!(
            err,
            MutateError::Wrap(WrapError::SidecarPortTaken { port: 8888, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("\"a\""));
}

#[test]
fn one_port_name_for_two_ports_is_refused() {
    let pod = pod_with(
        json!({"migration-interface": "dind"}),
        json!([{"name": "a", "ports": [{"name": "http", "containerPort": 80}]}, {"name": "b", "ports": [{"name": "http", "containerPort": 81}]}]),
    );
    let message = mutate_pod(&pod, &config()).unwrap_err().to_string();
    assert!(
        message.contains("\"http\"") && message.contains("\"a\"") && message.contains("\"b\""),
        "{message}"
    );
}

#[test]
fn bad_quantity_names_its_container() {
    let pod = pod_with(
        json!({"migration-interface": "dind"}),
        json!([{"name": "a"}, {"name": "b", "resources": {"requests": {"memory": "12 apples"}}}]),
    );
    let message = mutate_pod(&pod, &config()).unwrap_err().to_string();
    assert!(
        message.contains("\"b\"") && message.contains("12 apples"),
        "{message}"
    );
}

#[test]
fn pod_without_containers_is_refused() {
    let pod = pod_with(json!({"migration-interface": "dind"}), json!([]));
    assert!(matches!(
        mutate_pod(&pod, &config()).unwrap_err(),
        MutateError::Wrap(WrapError::NoContainers)
    ));
}

#[test]
fn ff_prepares_its_one_container_without_wrapping_or_privilege() {
    let pod = pod_with(
        json!({"migration-interface": "ff"}),
        json!([
            {"name": "app", "image": "shop/app:1", "command": ["/app", "--serve"],
             "volumeMounts": [{"name": "d", "mountPath": "/data"}, {"name": "conf", "mountPath": "/etc/app"}],
             "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 3},
             "livenessProbe": {"exec": {"command": ["/app", "--check"]}, "failureThreshold": 5},
             "securityContext": {"capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}}
        ]),
    );
    let mut pod = pod;
    pod.spec.as_mut().unwrap().volumes = Some(
        serde_json::from_value(json!([
            {"name": "d", "emptyDir": {}},
            {"name": "conf", "configMap": {"name": "app"}}
        ]))
        .unwrap(),
    );
    let prepared = wrap(&pod);
    let spec = prepared.spec.as_ref().unwrap();
    assert_eq!(
        spec.containers.len(),
        1,
        "nothing is added to the pod's containers"
    );
    let c = &spec.containers[0];
    assert_eq!(c.image.as_deref(), Some("shop/app:1"));
    assert!(c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .any(|m| m.mount_path == "/etc/podinfo" && m.name == "ums-podinfo"));
    let security = c.security_context.as_ref().unwrap();
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.add.as_deref().unwrap(),
        ["NET_ADMIN", "CHECKPOINT_RESTORE", "SETPCAP", "SYS_PTRACE"]
    );
    assert_eq!(
        caps.drop.as_deref().unwrap(),
        ["ALL"],
        "the user's drops stay"
    );
    assert_eq!(
        security.seccomp_profile.as_ref().unwrap().type_,
        "Unconfined"
    );
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.privileged, None);
    // The pod's own command runs under the base image's supervisor.
    assert_eq!(
        c.command.as_deref().unwrap(),
        ["/usr/local/bin/ums-ff", "run", "--", "/app", "--serve"]
    );
    let env = |name: &str| {
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(env("UMS_FF_CONTAINER").as_deref(), Some("app"));
    assert_eq!(
        env("UMS_FF_VOLUMES").as_deref(),
        Some("d=/data"),
        "emptyDirs only"
    );
    assert_eq!(
        env("UMS_PODINFO").as_deref(),
        Some("/etc/podinfo/annotations")
    );
    assert_eq!(env("UMS_FF_LISTEN").as_deref(), Some("0.0.0.0:8888"));
    // The kubelet asks ums-ff, with the probe's timing kept; the originals are in the annotation.
    let readiness = c.readiness_probe.as_ref().unwrap();
    let get = readiness.http_get.as_ref().unwrap();
    assert_eq!(get.path.as_deref(), Some("/probe/app?kind=readiness"));
    assert_eq!(
        get.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8888)
    );
    assert!(readiness.tcp_socket.is_none());
    assert_eq!(readiness.period_seconds, Some(3));
    let liveness = c.liveness_probe.as_ref().unwrap();
    assert_eq!(
        liveness.http_get.as_ref().unwrap().path.as_deref(),
        Some("/probe/app?kind=liveness")
    );
    assert!(liveness.exec.is_none());
    assert_eq!(liveness.failure_threshold, Some(5));
    assert!(c.startup_probe.is_none(), "none asked for, none added");
    assert_eq!(
        parse_volumes(annotation(&prepared, "migration-volumes")).unwrap(),
        ["/data", "/etc/app"]
    );
    let parsed =
        MigrationAnnotations::parse(prepared.metadata.annotations.as_ref().unwrap()).unwrap();
    assert!(parsed.bypass);
    assert_eq!(parsed.start_mode, Some(StartMode::Active));
    // The user's container as written: what the destination's pod is made from.
    let originals = parsed.containers.unwrap();
    assert_eq!(
        originals[0].command.as_deref().unwrap(),
        ["/app", "--serve"]
    );
    assert!(originals[0]
        .readiness_probe
        .as_ref()
        .unwrap()
        .tcp_socket
        .is_some());
    assert!(originals[0]
        .security_context
        .as_ref()
        .unwrap()
        .seccomp_profile
        .is_none());
}

#[test]
fn ff_refuses_what_it_cannot_migrate_by_name() {
    let two = pod_with(
        json!({"migration-interface": "ff"}),
        json!([{"name": "a", "image": "a"}, {"name": "b", "image": "b"}]),
    );
    let message = mutate_pod(&two, &config()).unwrap_err().to_string();
    assert!(
        message.contains("one container") && message.contains("has 2"),
        "{message}"
    );
    let privileged = pod_with(
        json!({"migration-interface": "ff"}),
        json!([{"name": "a", "image": "a", "securityContext": {"privileged": true}}]),
    );
    let message = mutate_pod(&privileged, &config()).unwrap_err().to_string();
    assert!(message.contains("privileged"), "{message}");
}

#[test]
fn the_rewrite_yields_annotations_the_sidecar_can_read() {
    for name in ["memhog-dind", "memhog-pind", "web-and-worker"] {
        let wrapped = wrap(&fixture(name));
        let parsed =
            MigrationAnnotations::parse(wrapped.metadata.annotations.as_ref().unwrap()).unwrap();
        assert!(
            parsed.bypass && parsed.containers.is_some() && parsed.volumes.is_some(),
            "{name}"
        );
    }
}

#[test]
fn insecure_registries_reach_the_runtime_container() {
    let pod = pod_with(
        json!({"migration-interface": "pind"}),
        json!([{"name": "a", "image": "10.0.0.1:5000/a:1"}]),
    );
    let env_of = |config: &WrapConfig| {
        let wrapped = mutate_pod(&pod, config).unwrap().unwrap();
        container(&wrapped, "runtime")
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.name == "UMS_INSECURE_REGISTRIES")
            .and_then(|e| e.value)
    };
    assert_eq!(env_of(&config()), None);
    let with = WrapConfig {
        insecure_registries: vec!["10.0.0.1:5000".into(), "registry.local:80".into()],
        ..config()
    };
    assert_eq!(
        env_of(&with).as_deref(),
        Some("10.0.0.1:5000,registry.local:80")
    );
}
