//! What a pod needs to exist in its namespace before it can run there: the configMaps and
//! secrets its volumes, environment and image pulls name, and its service account. The
//! destination checks them before it creates the copy, so a migration that could only end in a
//! copy that never starts is refused at once, naming what is missing, instead of by the
//! readiness timeout minutes later. Pure: what the pod names; the lookups are the caller's.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, Pod};

/// The objects a pod names, optional ones left out (the kubelet starts the pod without them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prerequisites {
    pub config_maps: BTreeSet<String>,
    pub secrets: BTreeSet<String>,
    /// Its service account, unless it is `default` (which every namespace has).
    pub service_account: Option<String>,
}

impl Prerequisites {
    /// What `pod` needs in its namespace.
    pub fn of(pod: &Pod) -> Self {
        let mut needed = Prerequisites::default();
        let Some(spec) = pod.spec.as_ref() else {
            return needed;
        };
        for volume in spec.volumes.iter().flatten() {
            if let Some(cm) = &volume.config_map {
                if !cm.optional.unwrap_or(false) {
                    needed.config_maps.insert(cm.name.clone());
                }
            }
            if let Some(secret) = &volume.secret {
                if let (Some(name), false) = (&secret.secret_name, secret.optional.unwrap_or(false))
                {
                    needed.secrets.insert(name.clone());
                }
            }
            if let Some(projected) = &volume.projected {
                for source in projected.sources.iter().flatten() {
                    if let Some(cm) = &source.config_map {
                        if !cm.optional.unwrap_or(false) {
                            needed.config_maps.insert(cm.name.clone());
                        }
                    }
                    if let Some(secret) = &source.secret {
                        if !secret.optional.unwrap_or(false) {
                            needed.secrets.insert(secret.name.clone());
                        }
                    }
                }
            }
        }
        let containers = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter());
        for container in containers {
            needed.add_environment(container);
        }
        for pull in spec.image_pull_secrets.iter().flatten() {
            if !pull.name.is_empty() {
                needed.secrets.insert(pull.name.clone());
            }
        }
        needed.service_account = spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty() && sa != "default");
        needed
    }

    fn add_environment(&mut self, container: &Container) {
        for env in container.env.iter().flatten() {
            let Some(from) = &env.value_from else {
                continue;
            };
            if let Some(key) = &from.config_map_key_ref {
                if !key.optional.unwrap_or(false) {
                    self.config_maps.insert(key.name.clone());
                }
            }
            if let Some(key) = &from.secret_key_ref {
                if !key.optional.unwrap_or(false) {
                    self.secrets.insert(key.name.clone());
                }
            }
        }
        for from in container.env_from.iter().flatten() {
            if let Some(cm) = &from.config_map_ref {
                if !cm.optional.unwrap_or(false) {
                    self.config_maps.insert(cm.name.clone());
                }
            }
            if let Some(secret) = &from.secret_ref {
                if !secret.optional.unwrap_or(false) {
                    self.secrets.insert(secret.name.clone());
                }
            }
        }
    }
}

/// What a namespace lacks of a pod's prerequisites, as the words of a refusal ("configMap
/// app-config", "secret db-password"); empty when nothing is missing.
pub fn missing_text(
    namespace: &str,
    cluster: &str,
    missing: &[(&'static str, String)],
) -> Option<String> {
    if missing.is_empty() {
        return None;
    }
    let names: Vec<String> = missing
        .iter()
        .map(|(kind, name)| format!("{kind} {name}"))
        .collect();
    Some(format!(
        "namespace {namespace} of cluster {cluster} lacks what the pod needs: {}; create {} there, then migrate again",
        names.join(", "),
        if missing.len() == 1 { "it" } else { "them" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn volumes_environment_pull_secrets_and_the_account_are_found_optional_ones_left_out() {
        let p = pod(serde_json::json!({
            "serviceAccountName": "shop",
            "imagePullSecrets": [{"name": "registry"}],
            "volumes": [
                {"name": "a", "configMap": {"name": "app-config"}},
                {"name": "b", "configMap": {"name": "maybe", "optional": true}},
                {"name": "c", "secret": {"secretName": "tls"}},
                {"name": "d", "projected": {"sources": [
                    {"configMap": {"name": "projected-cm"}},
                    {"secret": {"name": "projected-secret"}},
                    {"secret": {"name": "projected-optional", "optional": true}}
                ]}},
                {"name": "e", "emptyDir": {}}
            ],
            "initContainers": [{"name": "init", "image": "i",
                "envFrom": [{"configMapRef": {"name": "init-env"}}]}],
            "containers": [{"name": "app", "image": "i",
                "env": [
                    {"name": "A", "value": "1"},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                    {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "opt", "key": "k", "optional": true}}},
                    {"name": "D", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                ],
                "envFrom": [{"secretRef": {"name": "env-secret"}}]}]
        }));
        let needed = Prerequisites::of(&p);
        assert_eq!(
            needed.config_maps.iter().collect::<Vec<_>>(),
            ["app-config", "init-env", "projected-cm"]
        );
        assert_eq!(
            needed.secrets.iter().collect::<Vec<_>>(),
            ["db", "env-secret", "projected-secret", "registry", "tls"]
        );
        assert_eq!(needed.service_account.as_deref(), Some("shop"));
    }

    #[test]
    fn a_plain_pod_needs_nothing() {
        let p = pod(serde_json::json!({"serviceAccountName": "default",
            "containers": [{"name": "app", "image": "i"}]}));
        assert_eq!(Prerequisites::of(&p), Prerequisites::default());
    }

    #[test]
    fn the_refusal_names_each_missing_object() {
        assert_eq!(missing_text("shop", "cloud", &[]), None);
        let text = missing_text(
            "shop",
            "cloud",
            &[("configMap", "app-config".into()), ("secret", "db".into())],
        )
        .unwrap();
        assert!(text.contains("configMap app-config, secret db"), "{text}");
        assert!(text.contains("namespace shop of cluster cloud"), "{text}");
    }
}
