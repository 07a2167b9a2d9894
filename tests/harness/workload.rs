//! The test workload (tests/workload/workload.c): built static with gcc, packed into an image
//! with `docker import` and served by the tests' registry, and its output parsed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

use crate::outer;
use crate::registry::Registry;
use crate::runtime_pod::RuntimePod;

/// The static workload binary.
pub fn workload_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("workload/workload.c");
        let dir = std::env::temp_dir().join(format!("ums-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("workload");
        let output = Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&binary)
            .arg(&source)
            .output()
            .expect("gcc must be installed to build the test workload");
        assert!(
            output.status.success(),
            "gcc failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        binary
    })
}

/// The workload binary alone in a root-fs tar.
fn workload_rootfs_tar() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| {
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_path_with_name(workload_binary(), "workload")
            .unwrap();
        builder.into_inner().unwrap()
    })
}

/// The workload image in the tests' registry (`docker import` on the outer engine, pushed);
/// returns the reference pods pull it by. Both nested engines pulling it get the same image ID.
pub fn registry_workload_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| workload_image_in(Registry::shared()))
}

/// The workload image in the tests' HTTPS registry ([`Registry::shared_tls`]), for pods on CRI
/// nodes.
pub fn tls_registry_workload_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| workload_image_in(Registry::shared_tls()))
}

fn workload_image_in(registry: &Registry) -> String {
    // A directory of its own: the workload binary's (`ums-workload-<pid>`) stays, and two
    // registries' images may be built at once.
    let build = crate::unique("ums-workload-image-");
    let local = format!("ums-test/workload-build:{build}");
    let dir = std::env::temp_dir().join(&build);
    std::fs::create_dir_all(&dir).unwrap();
    let tar = dir.join("rootfs.tar");
    std::fs::write(&tar, workload_rootfs_tar()).unwrap();
    outer::docker(&[
        "import",
        "--change",
        r#"ENTRYPOINT ["/workload"]"#,
        tar.to_str().unwrap(),
        &local,
    ]);
    let reference = registry.push(&local, "ums-test/workload:1");
    let _ = outer::docker(&["rmi", &local]);
    let _ = std::fs::remove_dir_all(&dir);
    reference
}

/// Imports the workload as `name` straight into one pod's nested engine: an image no registry
/// has (containers using it need `imagePullPolicy: Never`).
pub fn import_local_only(pod: &RuntimePod, name: &str) -> String {
    pod.cli_with_input(
        &[
            "import",
            "--change",
            r#"ENTRYPOINT ["/workload"]"#,
            "-",
            name,
        ],
        workload_rootfs_tar(),
    );
    name.to_owned()
}

/// One container of a test pod: (name, image, MiB, seed, extra env).
#[derive(Debug)]
pub struct WorkloadContainer<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub mib: u32,
    pub seed: u32,
    pub env: Vec<(&'a str, &'a str)>,
    /// `imagePullPolicy`, when not Kubernetes' default.
    pub pull_policy: Option<&'a str>,
}

/// The annotations a wrapped pod carries (as the webhook writes them).
pub fn pod_annotations(
    containers: &[WorkloadContainer<'_>],
    start_mode: &str,
) -> BTreeMap<String, String> {
    let specs: Vec<_> = containers
        .iter()
        .map(|c| {
            let mut spec = json!({
                "name": c.name,
                "image": c.image,
                "args": [c.mib.to_string(), c.seed.to_string()],
                "env": c.env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
            });
            if let Some(policy) = c.pull_policy {
                spec["imagePullPolicy"] = json!(policy);
            }
            spec
        })
        .collect();
    BTreeMap::from([
        ("migration-interface".to_string(), "dind".to_string()),
        (
            "migration-containers".to_string(),
            serde_json::to_string(&specs).unwrap(),
        ),
        ("migration-volumes".to_string(), "[]".to_string()),
        ("migration-start-mode".to_string(), start_mode.to_string()),
        ("migration-bypass".to_string(), "true".to_string()),
    ])
}

/// One line of workload output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub tick: u64,
    pub ms: u64,
    pub memory_ok: bool,
    pub checked: u64,
}

/// The tick lines of some output.
pub fn ticks(lines: &[String]) -> Vec<Tick> {
    lines
        .iter()
        .filter_map(|line| {
            let mut fields = BTreeMap::new();
            for part in line.split_whitespace() {
                let (k, v) = part.split_once('=')?;
                fields.insert(k, v);
            }
            Some(Tick {
                tick: fields.get("tick")?.parse().ok()?,
                ms: fields.get("ms")?.parse().ok()?,
                memory_ok: *fields.get("mem")? == "ok",
                checked: fields.get("checked")?.parse().ok()?,
            })
        })
        .collect()
}

/// The ticks the workload wrote to its journal (`tick=N` lines).
pub fn journal_ticks(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("tick=")?.parse().ok())
        .collect()
}

/// Waits until the journal at `path` has lines past `last` (the restored process writes on),
/// then checks it whole: from tick 0, every 50 ticks, no gap. A line the source wrote between
/// its dump and its stop is in the emptyDir and is written again by the restored process (the
/// divergence window the report measures): a tick may repeat, never go missing.
pub async fn journal_goes_on(path: &std::path::Path, last: u64) {
    let ticks = crate::poll(
        "the journal to go on after the move",
        Duration::from_secs(30),
        || async {
            let ticks = journal_ticks(path);
            ticks
                .last()
                .is_some_and(|t| *t > last + 50)
                .then_some(ticks)
        },
    )
    .await;
    assert_eq!(ticks[0], 0, "{ticks:?}");
    for pair in ticks.windows(2) {
        assert!(
            pair[1] == pair[0] + 50 || pair[1] == pair[0],
            "gap in the journal at {pair:?}: {ticks:?}"
        );
    }
    let repeats = ticks.windows(2).filter(|p| p[0] == p[1]).count();
    assert!(repeats <= 2, "at most one repeat per move: {ticks:?}");
}

/// The ff example service: the workload on UMS-rs's ff base image (`images/ff`), as a user
/// builds a service FROM it (the README's Dockerfile), tagged `ums-test/ff-workload:1` in the
/// outer engine (import it into a CRI node with `Cluster::cri_node_import`).
pub fn ff_workload_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ums-ff-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(workload_binary(), dir.join("workload")).unwrap();
        std::fs::write(
            dir.join("Dockerfile"),
            "FROM ums-rs/ff:latest\nCOPY workload /usr/local/bin/workload\nCMD [\"/usr/local/bin/workload\"]\n",
        )
        .unwrap();
        let reference = "ums-test/ff-workload:1".to_owned();
        outer::docker(&["build", "--quiet", "--tag", &reference, dir.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&dir);
        reference
    })
}
