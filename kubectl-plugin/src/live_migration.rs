//! What the plugin writes and shows, pure: the LiveMigration object for a request, the table
//! of `kubectl migrate list`, a progress line, the summary of a finished migration.

use serde_json::{json, Value};
use ums_contract::live_migration::{GROUP, KIND, VERSION};

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Another node of this cluster, or of the destination cluster with `cluster`.
    pub node: Option<String>,
    /// Another cluster's coordinator (`host:port` or `https://host:port`).
    pub cluster: Option<String>,
}

/// The LiveMigration that moves `pod` (`generateName`: `<pod>-`).
pub fn object(pod: &str, to: &Destination, keep: bool, post_copy: bool) -> Value {
    let mut spec = json!({"pod": pod});
    if let Some(cluster) = &to.cluster {
        spec["destination"] = json!(cluster);
    }
    if let Some(node) = &to.node {
        spec["destinationNode"] = json!(node);
    }
    if keep {
        spec["keep"] = json!(true);
    }
    if post_copy {
        spec["postCopy"] = json!(true);
    }
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": {"generateName": format!("{pod}-")},
        "spec": spec,
    })
}

/// Where the object says it goes, as the table shows it.
pub fn destination_text(spec: &Value) -> String {
    match (
        spec["destination"].as_str(),
        spec["destinationNode"].as_str(),
    ) {
        (Some(cluster), Some(node)) => format!("{cluster} (node {node})"),
        (Some(cluster), None) => cluster.to_owned(),
        (None, Some(node)) => format!("node {node}"),
        (None, None) => "?".to_owned(),
    }
}

/// `kubectl migrate list`: one line per object, aligned (NAMESPACE first with `all`).
pub fn table(objects: &[Value], all_namespaces: bool) -> String {
    let mut rows = vec![{
        let mut header = vec![
            "NAME",
            "POD",
            "DESTINATION",
            "PHASE",
            "MIGRATION",
            "MESSAGE",
        ];
        if all_namespaces {
            header.insert(0, "NAMESPACE");
        }
        header.into_iter().map(str::to_owned).collect::<Vec<_>>()
    }];
    for o in objects {
        let status = &o["status"];
        let mut row = vec![
            o["metadata"]["name"].as_str().unwrap_or("").to_owned(),
            o["spec"]["pod"].as_str().unwrap_or("").to_owned(),
            destination_text(&o["spec"]),
            status["phase"].as_str().unwrap_or("Pending").to_owned(),
            status["migrationId"].as_str().unwrap_or("").to_owned(),
            status["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(80)
                .collect(),
        ];
        if all_namespaces {
            row.insert(
                0,
                o["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
            );
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("   ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The summary of a finished migration, from its status.
pub fn summary(name: &str, status: &Value) -> String {
    let phases: Vec<String> = status["phases"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{} {} ms", p["phase"].as_str().unwrap_or("?"), p["ms"]))
        .collect();
    match status["phase"].as_str() {
        Some("Succeeded") => {
            let mut text = format!(
                "livemigration/{name} succeeded: the service runs in pod {}",
                status["destinationPod"].as_str().unwrap_or("?")
            );
            if let Some(node) = status["destinationNode"].as_str() {
                text.push_str(&format!(" on node {node}"));
            }
            if let Some(cluster) = status["destinationCluster"].as_str() {
                text.push_str(&format!(" of cluster {cluster}"));
            }
            if let Some(downtime) = status["downtimeMs"].as_u64() {
                text.push_str(&format!("; downtime {downtime} ms"));
            }
            if let Some(bytes) = status["bytes"].as_u64() {
                text.push_str(&format!(", {bytes} bytes moved"));
            }
            if !phases.is_empty() {
                text.push_str(&format!("\nphases: {}", phases.join(", ")));
            }
            text
        }
        _ => format!(
            "livemigration/{name} failed: {}",
            status["message"].as_str().unwrap_or("no message")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_says_where_the_pod_goes() {
        let to = Destination {
            node: Some("n2".into()),
            cluster: None,
        };
        let o = object("svc", &to, false, false);
        assert_eq!(o["apiVersion"], "migration.ums-rs.io/v1alpha1");
        assert_eq!(o["metadata"]["generateName"], "svc-");
        assert_eq!(o["spec"], json!({"pod": "svc", "destinationNode": "n2"}));
        let to = Destination {
            node: None,
            cluster: Some("cloud:30001".into()),
        };
        let o = object("svc", &to, true, true);
        assert_eq!(
            o["spec"],
            json!({"pod": "svc", "destination": "cloud:30001", "keep": true, "postCopy": true})
        );
    }

    #[test]
    fn the_table_and_the_summary_read_the_status() {
        let objects = [json!({
            "metadata": {"name": "svc-x1", "namespace": "shop"},
            "spec": {"pod": "svc", "destinationNode": "n2"},
            "status": {"phase": "Succeeded", "migrationId": "m1",
                       "destinationPod": "shop/svc-abc", "destinationNode": "n2",
                       "downtimeMs": 420, "bytes": 1000,
                       "phases": [{"phase": "checking", "ms": 5}]},
        })];
        let table = table(&objects, true);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   NAME"), "{table}");
        assert!(
            lines[1].contains("node n2") && lines[1].contains("Succeeded"),
            "{table}"
        );
        let text = summary("svc-x1", &objects[0]["status"]);
        assert!(
            text.contains("pod shop/svc-abc on node n2; downtime 420 ms"),
            "{text}"
        );
        assert!(text.contains("checking 5 ms"), "{text}");
        let failed = summary("x", &json!({"phase": "Failed", "message": "no other node"}));
        assert_eq!(failed, "livemigration/x failed: no other node");
    }
}
