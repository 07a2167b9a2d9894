//! The test workload (tests/workload/workload.c): built static with gcc, packed into an image
//! with `docker import`, and its output parsed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::json;

use crate::engine_process::EngineProcess;

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

/// Imports the workload as image `name` into `engine`; returns the image name.
pub fn import_workload_image(engine: &EngineProcess, name: &str) -> String {
    let dir = engine.dir.join("workload-image");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(workload_binary(), dir.join("workload")).unwrap();
    let tar = engine.dir.join("workload-rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-cf")
        .arg(&tar)
        .arg("workload")
        .status()
        .unwrap();
    assert!(status.success());
    engine.cli(&[
        "import",
        "--change",
        r#"ENTRYPOINT ["/workload"]"#,
        tar.to_str().unwrap(),
        name,
    ]);
    name.to_owned()
}

/// Makes `image` available in `to` with the same image ID (save/load, as a registry would).
pub fn copy_image(from: &EngineProcess, to: &EngineProcess, image: &str) {
    let tar = from.dir.join("image-transfer.tar");
    from.save_image(image, &tar);
    to.load_image(&tar);
}

/// One container of a test pod: (name, image, MiB, seed, extra env).
#[derive(Debug)]
pub struct WorkloadContainer<'a> {
    pub name: &'a str,
    pub image: &'a str,
    pub mib: u32,
    pub seed: u32,
    pub env: Vec<(&'a str, &'a str)>,
}

/// The annotations a wrapped pod carries (as the webhook writes them).
pub fn pod_annotations(
    containers: &[WorkloadContainer<'_>],
    start_mode: &str,
) -> BTreeMap<String, String> {
    let specs: Vec<_> = containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "image": c.image,
                "args": [c.mib.to_string(), c.seed.to_string()],
                "env": c.env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
            })
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
