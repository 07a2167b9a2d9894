//! The real webhook over real HTTPS, answering AdmissionReviews shaped as kube-apiserver sends
//! them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use support::{fixture, poll, review, start_webhook, MIGRATION_ACCOUNT};

/// Applies the response's patch to the object and returns the result.
fn apply_patch(object: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch is base64"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("patch is a JSON patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("patch applies cleanly to the object");
    patched
}

#[tokio::test]
async fn mutation_wraps_ums_examples_and_is_idempotent() {
    let webhook = start_webhook(&["--dind-image", "ums/dind:it", "--pind-image", "ums/pind:it"]);
    for (name, image) in [
        ("memhog-dind.json", "ums/dind:it"),
        ("memhog-pind.json", "ums/pind:it"),
        ("web-and-worker.json", "ums/dind:it"),
    ] {
        let mut pod = fixture(name);
        // A field from a newer Kubernetes than this build knows must not leak onto the runtime.
        pod["spec"]["containers"][0]["fieldFromTheFuture"] = json!({"x": 1});
        let request = review("CREATE", "alice", Some(&pod), None);
        let (status, body) = webhook.post("/mutate", request.to_string()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(body["kind"], "AdmissionReview");
        let response = &body["response"];
        assert_eq!(
            response["uid"], request["request"]["uid"],
            "uid must be echoed"
        );
        assert_eq!(response["allowed"], true, "{response}");
        let patched = apply_patch(&pod, response);
        let wrapped: Pod =
            serde_json::from_value(patched.clone()).expect("patched object is a Pod");
        let spec = wrapped.spec.as_ref().unwrap();
        assert_eq!(spec.containers[0].name, "runtime");
        assert_eq!(spec.containers[0].image.as_deref(), Some(image));
        assert_eq!(
            spec.containers.len(),
            pod["spec"]["containers"].as_array().unwrap().len() + 1
        );

        // Reinvocation (reinvocationPolicy: IfNeeded) on the result: allowed, no patch.
        let again = review("CREATE", "alice", Some(&patched), None);
        let (status, body) = webhook.post("/mutate", again.to_string()).await;
        assert_eq!(status, 200);
        assert_eq!(body["response"]["allowed"], true);
        assert!(
            body["response"].get("patch").is_none(),
            "second mutation must be a no-op: {body}"
        );
    }
}

#[tokio::test]
async fn plain_pods_and_other_operations_pass_without_patch() {
    let webhook = start_webhook(&[]);
    let plain = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain", "namespace": "default"}, "spec": {"containers": [{"name": "a", "image": "a"}]}});
    for request in [
        review("CREATE", "alice", Some(&plain), None),
        review(
            "UPDATE",
            "alice",
            Some(&fixture("memhog-dind.json")),
            Some(&fixture("memhog-dind.json")),
        ),
    ] {
        let (status, body) = webhook.post("/mutate", request.to_string()).await;
        assert_eq!(status, 200);
        assert_eq!(body["response"]["allowed"], true);
        assert!(body["response"].get("patch").is_none());
    }
}

#[tokio::test]
async fn bad_annotations_and_bad_pods_are_denied_with_a_message() {
    let webhook = start_webhook(&[]);
    let mut unknown = fixture("memhog-dind.json");
    unknown["metadata"]["annotations"]["migration-interface"] = json!("vm");
    let mut bad_mode = fixture("memhog-dind.json");
    bad_mode["metadata"]["annotations"]["migration-start-mode"] = json!("later");
    let mut not_a_pod = fixture("memhog-dind.json");
    not_a_pod["spec"]["containers"] = json!("memhog");
    for (object, endpoint, expected) in [
        (&unknown, "/mutate", "\"vm\""),
        (&bad_mode, "/mutate", "\"later\""),
        (&not_a_pod, "/mutate", "not a valid v1 Pod"),
        (&unknown, "/validate", "\"vm\""),
        (&not_a_pod, "/validate", "not a valid v1 Pod"),
    ] {
        let request = review("CREATE", "alice", Some(object), None);
        let (status, body) = webhook.post(endpoint, request.to_string()).await;
        assert_eq!(status, 200, "{body}");
        let response = &body["response"];
        assert_eq!(response["uid"], request["request"]["uid"]);
        assert_eq!(response["allowed"], false, "{response}");
        let message = response["status"]["message"].as_str().unwrap();
        assert!(
            message.contains(expected),
            "{endpoint}: {message:?} should contain {expected}"
        );
    }
}

#[tokio::test]
async fn validation_guards_pods_under_migration() {
    let webhook = start_webhook(&[
        "--migration-service-accounts",
        &format!("{MIGRATION_ACCOUNT},system:serviceaccount:ops:mover"),
    ]);
    let mut migrating = fixture("memhog-dind.json");
    migrating["metadata"]["annotations"]["migration-id"] = json!("mig-7");
    let mut changed = migrating.clone();
    changed["metadata"]["labels"]["touched"] = json!("yes");

    for (operation, object) in [("UPDATE", Some(&changed)), ("DELETE", None)] {
        let request = review(operation, "kubernetes-admin", object, Some(&migrating));
        let (status, body) = webhook.post("/validate", request.to_string()).await;
        assert_eq!(status, 200);
        assert_eq!(body["response"]["allowed"], false, "{body}");
        let message = body["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("default/memhog") && message.contains("mig-7"),
            "{message}"
        );
        for account in [MIGRATION_ACCOUNT, "system:serviceaccount:ops:mover"] {
            let request = review(operation, account, object, Some(&migrating));
            let (_, body) = webhook.post("/validate", request.to_string()).await;
            assert_eq!(
                body["response"]["allowed"], true,
                "{account} {operation}: {body}"
            );
        }
    }
    let mut deleting = migrating.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-11-21T10:00:00Z");
    let request = review("DELETE", "system:node:edge-1", None, Some(&deleting));
    let (_, body) = webhook.post("/validate", request.to_string()).await;
    assert_eq!(body["response"]["allowed"], true, "{body}");
}

#[tokio::test]
async fn requests_that_are_not_reviews_get_json_errors() {
    let webhook = start_webhook(&[]);
    let no_request = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"});
    let v1beta1 = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": review("CREATE", "a", Some(&fixture("memhog-dind.json")), None)["request"].clone()});
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"not json at all".to_vec(),
            400,
            "not an admission.k8s.io/v1 AdmissionReview",
        ),
        (b"{\"hello\": 1}".to_vec(), 400, "AdmissionReview"),
        (no_request.to_string().into_bytes(), 400, "has no request"),
        (v1beta1.to_string().into_bytes(), 400, "v1beta1"),
        (vec![b' '; 3 * 1024 * 1024 + 1], 413, "larger than"),
    ];
    for endpoint in ["/mutate", "/validate"] {
        for (body, expected_status, expected) in &cases {
            let (status, value) = webhook.post(endpoint, body.clone()).await;
            assert_eq!(status, *expected_status, "{endpoint}: {value}");
            let message = value["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error message: {value}"));
            assert!(
                message.contains(expected),
                "{message:?} should contain {expected:?}"
            );
        }
    }
    let client = webhook.client();
    let response = client.get(webhook.url("/mutate")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let value: Value = response.json().await.unwrap();
    assert!(value["error"].as_str().unwrap().contains("POST"));
    let response = client.post(webhook.url("/elsewhere")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert!(response.json::<Value>().await.unwrap()["error"].is_string());
    // The webhook is still alive after all of that.
    let (status, _) = webhook
        .post(
            "/mutate",
            review("CREATE", "a", Some(&fixture("memhog-dind.json")), None).to_string(),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn tls_1_2_and_1_3_are_served_and_plain_http_is_not() {
    let webhook = start_webhook(&[]);
    let tls12 = support::client_trusting(&webhook.bundle.ca_cert_pem, true);
    let request = review("CREATE", "a", Some(&fixture("memhog-dind.json")), None);
    let response = tls12
        .post(webhook.url("/mutate"))
        .body(request.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let plain = support::plain_client();
    let result = plain
        .post(format!(
            "http://127.0.0.1:{}/mutate",
            webhook.admission.port()
        ))
        .body("{}")
        .send()
        .await;
    assert!(
        result.is_err() || !result.unwrap().status().is_success(),
        "plain HTTP must not be answered"
    );
}

#[tokio::test]
async fn health_and_metrics_on_the_admin_port() {
    let webhook = start_webhook(&[]);
    let http = support::plain_client();
    for path in ["/livez", "/readyz"] {
        let response = http.get(webhook.admin_url(path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    let (_, _) = webhook
        .post(
            "/mutate",
            review("CREATE", "a", Some(&fixture("memhog-dind.json")), None).to_string(),
        )
        .await;
    let (_, _) = webhook.post("/mutate", b"garbage".to_vec()).await;
    let mut migrating = fixture("memhog-dind.json");
    migrating["metadata"]["annotations"]["migration-id"] = json!("m");
    let (_, _) = webhook
        .post(
            "/validate",
            review("DELETE", "eve", None, Some(&migrating)).to_string(),
        )
        .await;
    let text = http
        .get(webhook.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "ums_webhook_admission_requests_total{endpoint=\"mutate\",outcome=\"patched\"} 1",
        "ums_webhook_admission_requests_total{endpoint=\"mutate\",outcome=\"invalid\"} 1",
        "ums_webhook_admission_requests_total{endpoint=\"validate\",outcome=\"denied\"} 1",
        "ums_webhook_admission_duration_seconds_count{endpoint=\"mutate\"} 2",
    ] {
        assert!(text.contains(line), "metrics lack {line:?}:\n{text}");
    }
    // Admission endpoints are not on the admin port.
    let response = http
        .post(webhook.admin_url("/mutate"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
}

#[tokio::test]
async fn certificate_rotation_reaches_new_handshakes_without_restart() {
    let mut webhook = start_webhook(&[]);
    let request = review("CREATE", "a", Some(&fixture("memhog-dind.json")), None).to_string();
    let old_client = webhook.client();
    assert!(old_client
        .post(webhook.url("/mutate"))
        .body(request.clone())
        .send()
        .await
        .is_ok());

    // The kubelet swaps the Secret's ..data symlink to a new generation signed by a new CA.
    let rotated = support::make_certs();
    webhook.mount.update(&rotated);
    let new_client = support::client_trusting(&rotated.ca_cert_pem, false);
    poll(
        "the rotated certificate to be served",
        Duration::from_secs(20),
        || {
            let new_client = new_client.clone();
            let url = webhook.url("/mutate");
            let body = request.clone();
            async move {
                new_client
                    .post(url)
                    .body(body)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        },
    )
    .await;
    // A fresh handshake trusting only the old CA now fails.
    let stale = support::client_trusting(&webhook.bundle.ca_cert_pem, false);
    assert!(stale
        .post(webhook.url("/mutate"))
        .body(request.clone())
        .send()
        .await
        .is_err());

    // A broken update (key of another certificate) is refused; the served certificate stays.
    let other = support::make_certs();
    let broken = ums_certs::CertBundle {
        server_key_pem: other.server_key_pem.clone(),
        ..rotated.clone()
    };
    webhook.mount.update(&broken);
    webhook.wait_for_log(
        "cannot be used yet; keeping the previous one",
        Duration::from_secs(20),
    );
    let response = new_client
        .post(webhook.url("/mutate"))
        .body(request.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}
