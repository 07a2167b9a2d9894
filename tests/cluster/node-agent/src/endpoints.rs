//! The rig's stand-in for kube-controller-manager's EndpointSlice controller (the placing
//! agent, one per cluster): each Service with a selector gets one EndpointSlice
//! (`<service>-ums`, label `kubernetes.io/service-name`) listing the pods it selects that have
//! an IP and are not being deleted, each with its Ready condition, node and pod, as
//! kube-proxy reads them. It does not split large slices, handle dual stack, named ports that
//! differ between pods, or remove the slice of a deleted Service (see README.md).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;

/// The label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGER: &str = "ums-rig-endpointslice-controller";

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The container port named `name` in `pod`.
fn named_port(pod: &Pod, name: &str) -> Option<i32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

/// The EndpointSlice of `service` given the cluster's `pods` (pure); `None` for a Service
/// without a selector (its endpoints are somebody else's).
pub fn slice_for(service: &Service, pods: &[Pod]) -> Option<EndpointSlice> {
    let name = service.metadata.name.clone()?;
    let namespace = service.metadata.namespace.clone()?;
    let spec = service.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let selected: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| selects(selector, p))
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
        .collect();
    let endpoints = selected
        .iter()
        .map(|p| Endpoint {
            addresses: vec![p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default()],
            conditions: Some(EndpointConditions {
                ready: Some(ready(p)),
                serving: Some(ready(p)),
                terminating: Some(false),
            }),
            node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                kind: Some("Pod".into()),
                namespace: p.metadata.namespace.clone(),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|port| {
            let target = match &port.target_port {
                None => Some(port.port),
                Some(IntOrString::Int(n)) => Some(*n),
                Some(IntOrString::String(named)) => {
                    selected.iter().find_map(|p| named_port(p, named))
                }
            }?;
            Some(EndpointPort {
                name: port.name.clone(),
                port: Some(target),
                protocol: port.protocol.clone().or_else(|| Some("TCP".into())),
                ..Default::default()
            })
        })
        .collect();
    Some(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{name}-ums")),
            namespace: Some(namespace),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_owned(), name),
                (MANAGED_BY.to_owned(), MANAGER.to_owned()),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(ports),
    })
}

/// Writes the slice of every Service whose slice changed since the last call (`written`:
/// what was written, by slice).
pub async fn sync(client: &kube::Client, pods: &[Pod], written: &mut HashMap<String, String>) {
    let services = match Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(services) => services.items,
        Err(e) => {
            tracing::warn!(error = %e, "endpoints: cannot list the services");
            return;
        }
    };
    for service in &services {
        let Some(slice) = slice_for(service, pods) else {
            continue;
        };
        let (Some(name), Some(namespace)) = (&slice.metadata.name, &slice.metadata.namespace)
        else {
            continue;
        };
        let key = format!("{namespace}/{name}");
        let text = serde_json::to_string(&slice).unwrap_or_default();
        if written.get(&key) == Some(&text) {
            continue;
        }
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
        let mut applied = serde_json::to_value(&slice).unwrap_or_default();
        applied["apiVersion"] = "discovery.k8s.io/v1".into();
        applied["kind"] = "EndpointSlice".into();
        match api
            .patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&applied),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(slice = %key, endpoints = slice.endpoints.len(), "endpoint slice written");
                written.insert(key, text);
            }
            Err(e) => tracing::warn!(slice = %key, error = %e, "endpoints: cannot write the slice"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_slice_lists_the_selected_pods_with_their_readiness() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "admin", "port": 81, "targetPort": "admin"}]}
        }))
        .unwrap();
        let ready = |ok: &str| serde_json::json!([{"type": "Ready", "status": ok}]);
        let pods = [
            pod(
                serde_json::json!({"metadata": {"name": "web-1", "namespace": "default", "uid": "u1", "labels": {"app": "web"}},
                "spec": {"nodeName": "n2", "containers": [{"name": "c", "ports": [{"name": "admin", "containerPort": 9090}]}]},
                "status": {"podIP": "10.0.0.5", "conditions": ready("True")}}),
            ),
            pod(
                serde_json::json!({"metadata": {"name": "web-0", "namespace": "default", "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c"}]},
                "status": {"podIP": "10.0.0.4", "conditions": ready("False")}}),
            ),
            pod(
                serde_json::json!({"metadata": {"name": "web-gone", "namespace": "default", "labels": {"app": "web"},
                "deletionTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"containers": [{"name": "c"}]}, "status": {"podIP": "10.0.0.6"}}),
            ),
            pod(
                serde_json::json!({"metadata": {"name": "web-new", "namespace": "default", "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c"}]}, "status": {}}),
            ),
            pod(
                serde_json::json!({"metadata": {"name": "db", "namespace": "default", "labels": {"app": "db"}},
                "spec": {"containers": [{"name": "c"}]}, "status": {"podIP": "10.0.0.7"}}),
            ),
            pod(
                serde_json::json!({"metadata": {"name": "web", "namespace": "other", "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c"}]}, "status": {"podIP": "10.0.0.8"}}),
            ),
        ];
        let slice = slice_for(&service, &pods).unwrap();
        assert_eq!(slice.metadata.name.as_deref(), Some("web-ums"));
        let labels = slice.metadata.labels.clone().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        let endpoints: Vec<(String, bool, Option<String>)> = slice
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses[0].clone(),
                    e.conditions.as_ref().and_then(|c| c.ready).unwrap(),
                    e.node_name.clone(),
                )
            })
            .collect();
        assert_eq!(
            endpoints,
            [
                ("10.0.0.5".to_owned(), true, Some("n2".to_owned())),
                ("10.0.0.4".to_owned(), false, None)
            ]
        );
        let ports: Vec<(Option<String>, Option<i32>)> = slice
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http".to_owned()), Some(8080)),
                (Some("admin".to_owned()), Some(9090))
            ]
        );
        let headless: Service = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "x", "namespace": "default"}, "spec": {}}),
        )
        .unwrap();
        assert!(
            slice_for(&headless, &pods).is_none(),
            "no selector, no slice"
        );
    }
}
