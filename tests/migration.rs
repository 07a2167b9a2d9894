//! Live migration between two runtime containers of the real `ums-rs/dind` / `ums-rs/pind`
//! images (nested engines, CRIU and the sidecar inside, as in a wrapped pod), over the pod
//! network, with workloads pulled from a real registry.
//!
//! One suite, run against each engine (`engine_suite!`).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use serde_json::{json, Value};
use ums_sidecar::engine::EngineKind;
use ums_tests::poll;
use ums_tests::runtime_pod::{Ambassador, RuntimePod};
use ums_tests::workload::{
    import_local_only, pod_annotations, registry_workload_image, ticks, Tick, WorkloadContainer,
};

const TOKEN: &str = "s3cret-token-for-tests";

/// A source pod (active) and a destination pod (passive).
struct Pair {
    source: RuntimePod,
    destination: RuntimePod,
    names: Vec<String>,
}

async fn pair(kind: EngineKind, containers: &[(&str, u32, u32)]) -> Pair {
    pair_of(kind, kind, containers, true, &[]).await
}

/// Two runtime pods. `from_registry: true`: both pull the workload from the registry;
/// `false`: the image exists only in the source's nested engine (`imagePullPolicy: Never`).
async fn pair_of(
    source_kind: EngineKind,
    destination_kind: EngineKind,
    containers: &[(&str, u32, u32)],
    from_registry: bool,
    env: &[(&str, &str)],
) -> Pair {
    let local_only = "ums-test/local-only:1";
    let (image, pull_policy) = if from_registry {
        (registry_workload_image(), None)
    } else {
        (local_only, Some("Never"))
    };
    let spec = |mode, kind| {
        let workloads: Vec<_> = containers
            .iter()
            .map(|(name, mib, seed)| WorkloadContainer {
                name,
                image,
                mib: *mib,
                seed: *seed,
                env: env.to_vec(),
                pull_policy,
            })
            .collect();
        let mut annotations = pod_annotations(&workloads, mode);
        let interface = if kind == EngineKind::Podman {
            "pind"
        } else {
            "dind"
        };
        annotations.insert("migration-interface".into(), interface.into());
        annotations
    };
    // The source starts `null` when its image must be imported first, then turns active.
    let first_mode = if from_registry { "active" } else { "null" };
    let source = RuntimePod::start(source_kind, &spec(first_mode, source_kind), Some(TOKEN));
    if !from_registry {
        import_local_only(&source, local_only);
        source.set_annotations(&spec("active", source_kind));
    }
    let destination = RuntimePod::start(
        destination_kind,
        &spec("passive", destination_kind),
        Some(TOKEN),
    );
    let names: Vec<String> = containers.iter().map(|(n, _, _)| n.to_string()).collect();
    for name in &names {
        probe_until(&source, name, 200, "running").await;
        if from_registry {
            probe_until(&destination, name, 204, "created (passive)").await;
        }
    }
    Pair {
        source,
        destination,
        names,
    }
}

async fn probe_until(sidecar: &RuntimePod, name: &str, status: u16, what: &str) {
    poll(
        &format!("{name} to be {what}"),
        Duration::from_secs(60),
        || async { (sidecar.get(&format!("/probe/{name}")).await.0 == status).then_some(()) },
    )
    .await;
}

/// Waits until the container has printed at least `n` ticks; returns them.
async fn ticks_at_least(sidecar: &RuntimePod, name: &str, n: usize) -> Vec<Tick> {
    poll(
        &format!("{name} to print {n} ticks"),
        Duration::from_secs(120),
        || async {
            let t = ticks(&sidecar.output_lines(name).await);
            (t.len() >= n).then_some(t)
        },
    )
    .await
}

/// The counter continues with no gap and the memory check stays ok over a full sweep.
/// (Podman's restored container keeps the source's log history, Docker's starts empty: either
/// way the output is one unbroken sequence and the first tick after the source's last is next.)
async fn assert_continues(destination: &RuntimePod, name: &str, last_at_source: u64, mib: u64) {
    let all = poll(
        &format!("{name} to sweep its memory at the destination"),
        Duration::from_secs(120),
        || async {
            let t = ticks(&destination.output_lines(name).await);
            (t.iter().filter(|t| t.tick > last_at_source).count() as u64 > mib + 5).then_some(t)
        },
    )
    .await;
    for pair in all.windows(2) {
        assert_eq!(
            pair[1].tick,
            pair[0].tick + 1,
            "{name}: gap or repeat in numbering at the destination"
        );
    }
    let after: Vec<&Tick> = all.iter().filter(|t| t.tick > last_at_source).collect();
    assert_eq!(
        after[0].tick,
        last_at_source + 1,
        "{name}: the destination must continue the source's counter"
    );
    assert!(
        after.iter().all(|t| t.memory_ok),
        "{name}: memory check failed after restore"
    );
    assert!(
        after.last().unwrap().checked > mib,
        "{name}: the whole memory was not checked"
    );
}

async fn migrate_pod(kind: EngineKind, containers: &[(&str, u32, u32)]) -> (Pair, Value) {
    let pair = pair(kind, containers).await;
    let report = migrate_and_check(&pair, containers).await;
    (pair, report)
}

/// Migrates a one-container pod with an ambassador on each side: (source's, destination's).
async fn migrate_pod_with_ambassadors(
    kind: EngineKind,
    containers: &[(&str, u32, u32)],
) -> (Pair, Value, (Ambassador, Ambassador)) {
    let pair = pair(kind, containers).await;
    let name = containers[0].0;
    let source_ambassador = Ambassador::start(&pair.source, name);
    let destination_ambassador = Ambassador::start(&pair.destination, name);
    poll(
        "the source ambassador to relay output",
        Duration::from_secs(60),
        || {
            let lines = source_ambassador.lines();
            async move { (!ticks(&lines).is_empty()).then_some(()) }
        },
    )
    .await;
    let report = migrate_and_check(&pair, containers).await;
    (pair, report, (source_ambassador, destination_ambassador))
}

async fn migrate_and_check(pair: &Pair, containers: &[(&str, u32, u32)]) -> Value {
    let mut followers = Vec::new();
    for name in &pair.names {
        ticks_at_least(&pair.source, name, 20).await;
        followers.push(pair.source.follow_output(name));
    }
    let (status, report) = pair
        .source
        .post("/migrate", &json!({ "destination": pair.destination.url }))
        .await;
    assert_eq!(status, 200, "migrate failed: {report}");
    for (name, follower) in pair.names.iter().zip(followers) {
        let at_source = ticks(&follower.await.unwrap());
        let last = at_source.last().expect("source output").tick;
        let mib = containers.iter().find(|(n, _, _)| n == name).unwrap().1;
        assert_continues(&pair.destination, name, last, u64::from(mib)).await;
    }
    report
}

async fn migrates_a_running_workload(kind: EngineKind) {
    let (pair, report, mut ambassadors) =
        migrate_pod_with_ambassadors(kind, &[("app", 64, 7)]).await;
    // The destination's ambassador, waiting on a passive (created) container, relays the
    // restored container's output; the source's keeps waiting instead of exiting.
    let relayed = poll(
        "the destination ambassador to relay output",
        Duration::from_secs(60),
        || {
            let lines = ambassadors.1.lines();
            async move { (!ticks(&lines).is_empty()).then_some(lines) }
        },
    )
    .await;
    // (Podman's restored container carries the source's log history, so the relayed output
    // may start at tick 0; either way it is unbroken and reaches past the migration.)
    let relayed = ticks(&relayed);
    for pair in relayed.windows(2) {
        assert_eq!(pair[1].tick, pair[0].tick + 1, "gap in the relayed output");
    }
    assert!(
        relayed.last().unwrap().tick > 20,
        "the relayed counter continues the source's"
    );
    assert_eq!(
        ambassadors.0.exit_code(),
        None,
        "the source ambassador must not exit after a migration"
    );
    // The report has every phase.
    let totals = &report["totals"];
    for field in [
        "bytesSent",
        "contentBytes",
        "freezeDumpMs",
        "transferMs",
        "restoreMs",
        "downtimeMs",
        "totalMs",
    ] {
        assert!(
            totals[field].is_u64(),
            "report lacks totals.{field}: {report}"
        );
    }
    assert!(
        totals["contentBytes"].as_u64().unwrap() > 64 << 20,
        "memory must travel: {report}"
    );
    assert!(totals["downtimeMs"].as_u64().unwrap() >= totals["restoreMs"].as_u64().unwrap());
    assert_eq!(report["containers"][0]["name"], "app");
    assert!(report["containers"][0]["criuBytes"].as_u64().unwrap() > 64 << 20);
    // The file the workload wrote into its root fs travelled.
    let state =
        std::fs::read_to_string(pair.destination.upper_dir("app").join("workload-state.txt"))
            .unwrap();
    assert!(state.starts_with("workload seed=7 mib=64"), "{state}");
    // The source containers are gone, and are not recreated there.
    assert!(
        pair.source.container_names().is_empty(),
        "source containers must be removed"
    );
    let (status, probe) = pair.source.get("/probe/app").await;
    assert_eq!((status, probe["state"].as_str()), (200, Some("migrated")));
    let (status, _) = pair.source.post("/create/app", &json!({})).await;
    assert_eq!(status, 409);
    // The destination lists the running container.
    let (_, listed) = pair.destination.get("/containers").await;
    assert_eq!(listed[0]["state"], "running", "{listed}");
}

async fn zstd_compressed_migration(kind: EngineKind) {
    let pair = pair(kind, &[("app", 32, 14)]).await;
    ticks_at_least(&pair.source, "app", 20).await;
    let follower = pair.source.follow_output("app");
    let (status, report) = pair
        .source
        .post(
            "/migrate",
            &json!({ "destination": pair.destination.url, "compression": "zstd" }),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["compression"], "zstd");
    let last = ticks(&follower.await.unwrap()).last().unwrap().tick;
    assert_continues(&pair.destination, "app", last, 32).await;
    // The memory pattern is pseudo-random (incompressible); the CRIU metadata is not: the wire
    // carries less than the content plus tar framing, and never much more.
    let sent = report["totals"]["bytesSent"].as_u64().unwrap();
    let content = report["totals"]["contentBytes"].as_u64().unwrap();
    assert!(
        sent < content + content / 50,
        "zstd stream {sent} vs content {content}"
    );
}

/// A TCP server in the test process that records the lines one client sends.
struct LineServer {
    address: std::net::SocketAddr,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl LineServer {
    fn start() -> Self {
        use std::io::BufRead as _;
        // On the host, reached by the pods through their bridge's gateway.
        let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let address = std::net::SocketAddr::new(
            ums_tests::outer::bridge_gateway().parse().unwrap(),
            listener.local_addr().unwrap().port(),
        );
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            // One connection only: a reconnect would not be the same connection.
            let (stream, _) = listener.accept().unwrap();
            for line in std::io::BufReader::new(stream)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        LineServer { address, lines }
    }

    fn ticks(&self) -> Vec<u64> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("tick=")?.parse().ok())
            .collect()
    }
}

/// An established TCP connection of the workload to a server outside the pod. The destination
/// pod has its own IP, so the connection's local address does not exist there: the engine
/// dumps it (Podman through its API, Docker through runc's CRIU configuration that the dind
/// image ships) and the destination restores it closed; the workload sees the loss and goes on,
/// its state intact.
async fn established_tcp_connection(kind: EngineKind) {
    let server = LineServer::start();
    let target = server.address.to_string();
    let pair = pair_of(
        kind,
        kind,
        &[("app", 16, 15)],
        true,
        &[("WORKLOAD_CONNECT", &target)],
    )
    .await;
    poll(
        "the workload to send ticks over TCP",
        Duration::from_secs(60),
        || {
            let n = server.ticks().len();
            async move { (n >= 20).then_some(()) }
        },
    )
    .await;
    let follower = pair.source.follow_output("app");
    let (status, report) = pair
        .source
        .post("/migrate", &json!({ "destination": pair.destination.url }))
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["containers"][0]["tcpConnections"], 1, "{report}");
    assert_eq!(report["containers"][0]["tcp"], "closed", "{report}");
    let last = ticks(&follower.await.unwrap()).last().unwrap().tick;
    assert_continues(&pair.destination, "app", last, 16).await;
    let output = pair.destination.output_lines("app").await;
    assert!(
        output.iter().any(|l| l == "connection lost"),
        "the restored workload must find its connection closed"
    );
    assert!(
        server.ticks().iter().all(|&t| t <= last),
        "nothing may arrive on the old connection after the freeze"
    );
}

/// A live TCP connection through a failed migration: the destination dies while the archive
/// arrives, the source is restored from its checkpoint in place (its pod IP is still there), and
/// the same connection goes on: the server's sequence continues without a gap and without a
/// reconnect. The connection went through a real dump and restore on both engines.
async fn tcp_connection_survives_a_rollback(kind: EngineKind) {
    let server = LineServer::start();
    let target = server.address.to_string();
    let pair = pair_of(
        kind,
        kind,
        &[("app", 256, 16)],
        true,
        &[("WORKLOAD_CONNECT", &target)],
    )
    .await;
    poll("ticks over TCP", Duration::from_secs(60), || {
        let n = server.ticks().len();
        async move { (n >= 20).then_some(()) }
    })
    .await;
    let (status, body) = migrate_and_kill_the_destination_mid_transfer(&pair).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["detail"]["rollback"]
            .to_string()
            .contains("restored from checkpoint"),
        "{body}"
    );
    let before = server.ticks().last().copied().unwrap();
    let received = poll(
        "ticks on the same connection after the rollback",
        Duration::from_secs(60),
        || {
            let t = server.ticks();
            async move { (t.last().copied().unwrap_or(0) > before + 50).then_some(t) }
        },
    )
    .await;
    for pair in received.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "the connection lost or repeated data across the checkpoint and restore"
        );
    }
}

async fn two_containers_migrate_as_one(kind: EngineKind) {
    let (pair, report) = migrate_pod(kind, &[("front", 16, 1), ("back", 32, 2)]).await;
    assert_eq!(
        report["containers"].as_array().unwrap().len(),
        2,
        "{report}"
    );
    assert!(pair.source.container_names().is_empty());
    let mut names = pair.destination.container_names();
    names.sort();
    assert_eq!(names, ["back", "front"]);
}

async fn unreachable_destination_is_refused_before_freezing(kind: EngineKind) {
    let pair = pair(kind, &[("app", 16, 3)]).await;
    let before = ticks_at_least(&pair.source, "app", 10).await.len();
    // A port nothing listens on, on the host (reached through the pod's gateway).
    let closed = format!(
        "{}:{}",
        ums_tests::outer::bridge_gateway(),
        ums_tests::registry::free_port()
    );
    let (status, body) = pair
        .source
        .post(
            "/migrate",
            &json!({ "destination": format!("http://{closed}") }),
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["detail"]["phase"], "preflight", "{body}");
    assert_eq!(body["detail"]["sourceState"], "untouched");
    assert!(
        body["error"].as_str().unwrap().contains("unreachable"),
        "{body}"
    );
    let (_, probe) = pair.source.get("/probe/app").await;
    assert_eq!(probe["state"], "running");
    ticks_at_least(&pair.source, "app", before + 20).await;
}

/// Starts `POST /migrate`, kills the destination pod once the archive is arriving there, and
/// returns the source's answer.
async fn migrate_and_kill_the_destination_mid_transfer(pair: &Pair) -> (u16, Value) {
    let staging = pair.destination.data_root.join("ums-staging");
    let source = SidecarHandle {
        url: pair.source.url.clone(),
    };
    let destination_url = pair.destination.url.clone();
    let migration = tokio::spawn(async move { source.migrate(&destination_url).await });
    poll(
        "the archive to start arriving at the destination",
        Duration::from_secs(120),
        || async {
            let arriving = std::fs::read_dir(&staging)
                .ok()?
                .flatten()
                .any(|d| d.path().join("containers").exists());
            arriving.then_some(())
        },
    )
    .await;
    pair.destination.kill();
    migration.await.unwrap()
}

async fn destination_killed_mid_transfer_rolls_back(kind: EngineKind) {
    let pair = pair(kind, &[("app", 256, 4)]).await;
    ticks_at_least(&pair.source, "app", 10).await;
    let follower = pair.source.follow_output("app");
    let (status, body) = migrate_and_kill_the_destination_mid_transfer(&pair).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["detail"]["phase"], "transfer/restore", "{body}");
    let rollback = body["detail"]["rollback"].to_string();
    assert!(rollback.contains("restored from checkpoint"), "{body}");
    // Back to running at the source, with the same counter.
    let last_before = ticks(&follower.await.unwrap()).last().unwrap().tick;
    probe_until(&pair.source, "app", 200, "running again").await;
    let after = poll(
        "output after the rollback",
        Duration::from_secs(60),
        || async {
            let lines = pair.source.output_lines("app").await;
            let t: Vec<Tick> = ticks(&lines)
                .into_iter()
                .filter(|t| t.tick > last_before)
                .collect();
            (t.len() >= 5).then_some(t)
        },
    )
    .await;
    assert_eq!(
        after[0].tick,
        last_before + 1,
        "the source must continue where it was frozen"
    );
    assert!(after.iter().all(|t| t.memory_ok));
}

/// Just enough of a client to migrate from a spawned task.
struct SidecarHandle {
    url: String,
}

impl SidecarHandle {
    async fn migrate(&self, destination: &str) -> (u16, Value) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let response = reqwest::Client::new()
            .post(format!("{}/migrate", self.url))
            .bearer_auth(TOKEN)
            .json(&json!({ "destination": destination }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

async fn checkpoint_archive(sidecar: &RuntimePod) -> Vec<u8> {
    let response = sidecar
        .client()
        .post(format!("{}/checkpoint?leaveRunning=true", sidecar.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.bytes().await.unwrap().to_vec()
}

async fn post_archive(sidecar: &RuntimePod, archive: Vec<u8>) -> (u16, Value) {
    let response = sidecar
        .client()
        .post(format!("{}/restore", sidecar.url))
        .bearer_auth(TOKEN)
        .header("content-type", "application/x-tar")
        .body(archive)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn corrupted_archive_is_refused(kind: EngineKind) {
    let pair = pair(kind, &[("app", 16, 5)]).await;
    ticks_at_least(&pair.source, "app", 10).await;
    let mut archive = checkpoint_archive(&pair.source).await;
    // The source kept running (leaveRunning).
    let (_, probe) = pair.source.get("/probe/app").await;
    assert_eq!(probe["state"], "running");
    // Flip one byte in the middle of the largest CRIU image.
    let (offset, size) = {
        let mut tar = tar::Archive::new(archive.as_slice());
        tar.entries()
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().unwrap().to_string_lossy().contains("/criu/"))
            .map(|e| (e.raw_file_position(), e.size()))
            .max_by_key(|(_, size)| *size)
            .unwrap()
    };
    archive[(offset + size / 2) as usize] ^= 0x40;
    let (status, body) = post_archive(&pair.destination, archive).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("corrupt"),
        "{body}"
    );
    // Nothing was started at the destination.
    assert_eq!(pair.destination.get("/probe/app").await.0, 204);
}

async fn traversal_archive_is_refused(kind: EngineKind) {
    let pair = pair(kind, &[("app", 16, 6)]).await;
    let archive = checkpoint_archive(&pair.source).await;
    // Keep the real manifest, then add an entry that climbs out of the staging directory.
    let manifest = {
        let mut tar = tar::Archive::new(archive.as_slice());
        let mut first = tar.entries().unwrap().next().unwrap().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut first, &mut text).unwrap();
        text
    };
    let mut evil = Vec::new();
    {
        let mut builder = tar::Builder::new(&mut evil);
        let mut header = tar::Header::new_gnu();
        header.set_size(manifest.len() as u64);
        header.set_mode(0o644);
        builder
            .append_data(
                &mut header,
                "ums-archive/manifest.json",
                manifest.as_bytes(),
            )
            .unwrap();
        let mut header = tar::Header::new_old();
        let path = b"containers/app/rootfs/../../../../../../tmp/ums-escaped";
        header.as_old_mut().name[..path.len()].copy_from_slice(path);
        header.set_size(4);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, &b"evil"[..]).unwrap();
        builder.finish().unwrap();
    }
    let (status, body) = post_archive(&pair.destination, evil).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("refused"),
        "{body}"
    );
    assert!(!pair.destination.exists_inside("/tmp/ums-escaped"));
    assert!(!std::path::Path::new("/tmp/ums-escaped").exists());
    assert_eq!(pair.destination.get("/probe/app").await.0, 204);
}

async fn wrong_token_is_refused(kind: EngineKind) {
    let pair = pair(kind, &[("app", 16, 8)]).await;
    for (path, method) in [
        ("/containers", "GET"),
        ("/migrate", "POST"),
        ("/checkpoint", "POST"),
        ("/restore", "POST"),
        ("/info", "GET"),
    ] {
        let client = pair.source.client();
        let url = format!("{}{path}", pair.source.url);
        let request = if method == "GET" {
            client.get(&url)
        } else {
            client.post(&url)
        };
        let response = request.bearer_auth("wrong").send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            json!({ "error": "unauthorized" }),
            "no detail about the token"
        );
        let response = pair.source.client().get(&url).send().await.unwrap();
        assert!(
            matches!(response.status().as_u16(), 401 | 405),
            "no token: {method} {path}"
        );
    }
    // Health and probes stay open for the kubelet.
    let open = pair
        .source
        .client()
        .get(format!("{}/healthz", pair.source.url))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status().as_u16(), 200);
    let open = pair
        .source
        .client()
        .get(format!("{}/probe/app", pair.source.url))
        .send()
        .await
        .unwrap();
    assert_eq!(open.status().as_u16(), 200);
}

async fn concurrent_migrate_is_refused(kind: EngineKind) {
    let pair = pair(kind, &[("app", 256, 9)]).await;
    ticks_at_least(&pair.source, "app", 5).await;
    let source = SidecarHandle {
        url: pair.source.url.clone(),
    };
    let destination = pair.destination.url.clone();
    let first = tokio::spawn(async move { source.migrate(&destination).await });
    poll(
        "the first migration to freeze the container",
        Duration::from_secs(60),
        || async { (pair.source.get("/probe/app").await.1["state"] == "migrating").then_some(()) },
    )
    .await;
    let (status, body) = pair
        .source
        .post("/migrate", &json!({ "destination": pair.destination.url }))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("in progress"));
    let (status, body) = first.await.unwrap();
    assert_eq!(status, 200, "the first migration completes: {body}");
}

async fn bad_requests_get_json_errors(kind: EngineKind) {
    let pair = pair(kind, &[("app", 16, 10)]).await;
    for (body, expected) in [
        (json!({}), "destination"),
        (json!({ "destination": "not a url" }), "invalid destination"),
        (json!({ "destination": "ftp://x" }), "http"),
        (
            json!({ "destination": "http://127.0.0.1:1", "compression": "lz4" }),
            "compression",
        ),
        (
            json!({ "destination": "http://127.0.0.1:1", "containers": ["nope"] }),
            "nope",
        ),
        (
            json!({ "destination": "http://127.0.0.1:1", "surprise": 1 }),
            "surprise",
        ),
    ] {
        let (status, reply) = pair.source.post("/migrate", &body).await;
        assert!((400..500).contains(&status), "{body} -> {status} {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(expected),
            "{body} -> {reply}"
        );
    }
    // A body that is not a tar at all: the caller's error, named as such.
    let (status, reply) = post_archive(&pair.destination, b"this is not a tar".repeat(64)).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("not a valid tar"),
        "{reply}"
    );
    let (status, reply) = pair.source.post("/create/unknown", &json!({})).await;
    assert_eq!(status, 404, "{reply}");
    let (status, reply) = pair.source.get("/no/such/endpoint").await;
    assert_eq!(status, 404, "{reply}");
    let (status, openapi) = pair.source.get("/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/healthz",
        "/containers",
        "/probe/{name}",
        "/create/{name}",
        "/stop",
        "/checkpoint",
        "/restore",
        "/migrate",
    ] {
        assert!(
            openapi["paths"][path].is_object(),
            "OpenAPI document lacks {path}"
        );
    }
}

async fn missing_image_travels_with_the_migration(kind: EngineKind) {
    // The image exists only in the source's engine (imagePullPolicy: Never): the passive
    // destination cannot create its container and waits for a migration to bring the image.
    let pair = pair_of(kind, kind, &[("app", 16, 12)], false, &[]).await;
    probe_until(
        &pair.destination,
        "app",
        204,
        "awaiting its image (passive)",
    )
    .await;
    let (_, listed) = pair.destination.get("/containers").await;
    assert_eq!(listed, json!([]), "nothing created at the destination");
    let (_, listed) = pair.source.get("/containers").await;
    let source_image_id = listed[0]["imageId"].as_str().unwrap().to_owned();

    // Told not to send images, the source is refused in the preflight, nothing frozen.
    let before = ticks_at_least(&pair.source, "app", 10).await.len();
    let (status, body) = pair
        .source
        .post(
            "/migrate",
            &json!({ "destination": pair.destination.url, "images": "never" }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["detail"]["phase"], "preflight", "{body}");
    assert_eq!(body["detail"]["sourceState"], "untouched");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("ums-test/local-only:1")
            && message.contains("not present at the destination"),
        "{message}"
    );
    ticks_at_least(&pair.source, "app", before + 20).await;

    // By default the preflight reports the missing image and the source sends it.
    let follower = pair.source.follow_output("app");
    let (status, report) = pair
        .source
        .post("/migrate", &json!({ "destination": pair.destination.url }))
        .await;
    assert_eq!(status, 200, "{report}");
    let images = report["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{report}");
    // (Podman names a local image `localhost/...`.)
    assert!(
        images[0]["image"]
            .as_str()
            .unwrap()
            .ends_with("ums-test/local-only:1"),
        "{report}"
    );
    assert_eq!(images[0]["imageId"], source_image_id.as_str());
    assert!(images[0]["bytes"].as_u64().unwrap() > 100_000, "{report}");
    let last = ticks(&follower.await.unwrap()).last().unwrap().tick;
    assert_continues(&pair.destination, "app", last, 16).await;
    // Loaded with the same ID: the restored container runs the source's very image.
    let (_, listed) = pair.destination.get("/containers").await;
    assert_eq!(listed[0]["imageId"], source_image_id.as_str(), "{listed}");
    assert_eq!(listed[0]["state"], "running", "{listed}");
}

/// A Docker checkpoint cannot be restored by Podman (nor the other way round): refused in
/// the preflight, before anything is frozen.
#[tokio::test(flavor = "multi_thread")]
async fn cross_engine_migration_is_refused_before_freezing() {
    for (source, destination) in [
        (EngineKind::Docker, EngineKind::Podman),
        (EngineKind::Podman, EngineKind::Docker),
    ] {
        // No image copy: the destination then also lacks the image, which the preflight lists
        // too; the engine mismatch is what this test is about.
        let pair = pair_of(source, destination, &[("app", 16, 13)], false, &[]).await;
        let (status, body) = pair
            .source
            .post("/migrate", &json!({ "destination": pair.destination.url }))
            .await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["detail"]["phase"], "preflight", "{body}");
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains(&format!("source engine is {source}"))
                && message.contains(&format!("cannot be restored by {destination}")),
            "{message}"
        );
        let (_, probe) = pair.source.get("/probe/app").await;
        assert_eq!(probe["state"], "running");
    }
}

async fn ambassador_exits_with_the_nested_exit_code(kind: EngineKind) {
    let mut annotations = pod_annotations(
        &[WorkloadContainer {
            name: "job",
            image: registry_workload_image(),
            mib: 1,
            seed: 11,
            env: vec![("WORKLOAD_EXIT_AFTER", "30"), ("WORKLOAD_EXIT_CODE", "3")],
            pull_policy: None,
        }],
        "active",
    );
    if kind == EngineKind::Podman {
        annotations.insert("migration-interface".into(), "pind".into());
    }
    let sidecar = RuntimePod::start(kind, &annotations, Some(TOKEN));
    let mut ambassador = Ambassador::start(&sidecar, "job");
    let code = poll("the ambassador to exit", Duration::from_secs(60), || {
        let code = ambassador.exit_code();
        async move { code }
    })
    .await;
    assert_eq!(code, 3);
    let relayed = ticks(&ambassador.lines());
    assert_eq!(
        relayed.len(),
        30,
        "every line is relayed before the exit: {relayed:?}"
    );
    let (status, probe) = sidecar.get("/probe/job").await;
    assert_eq!((status, probe["exitCode"].as_i64()), (503, Some(3)));
}

/// Annotations of a one-workload pod with pod volumes (name, kind); the workload mounts the
/// first at `/data` and keeps a journal there.
fn pod_with_volumes(
    kind: EngineKind,
    mode: &str,
    volumes: &[(&str, &str)],
) -> std::collections::BTreeMap<String, String> {
    let workload = WorkloadContainer {
        name: "app",
        image: registry_workload_image(),
        mib: 16,
        seed: 5,
        env: vec![("WORKLOAD_JOURNAL", "/data/journal")],
        pull_policy: None,
    };
    let mut annotations = pod_annotations(&[workload], mode);
    let mut containers: Value = serde_json::from_str(&annotations["migration-containers"]).unwrap();
    containers[0]["volumeMounts"] = json!([{"name": volumes[0].0, "mountPath": "/data"}]);
    annotations.insert("migration-containers".into(), containers.to_string());
    let paths: Vec<String> = volumes.iter().map(|(n, _)| format!("/mount/{n}")).collect();
    let kinds: std::collections::BTreeMap<&str, &str> = volumes.iter().copied().collect();
    annotations.insert("migration-volumes".into(), json!(paths).to_string());
    annotations.insert("migration-volume-kinds".into(), json!(kinds).to_string());
    let interface = if kind == EngineKind::Podman {
        "pind"
    } else {
        "dind"
    };
    annotations.insert("migration-interface".into(), interface.into());
    annotations
}

async fn volumes_travel_by_kind_and_choice(kind: EngineKind) {
    // The source pod has a pod-local volume (emptyDir, the workload's journal in it) and a
    // shared one (a claim both clusters would mount); the destination pod has only the first.
    let source = RuntimePod::start_with_volumes(
        kind,
        &pod_with_volumes(
            kind,
            "active",
            &[("data", "emptyDir"), ("shared", "persistentVolumeClaim")],
        ),
        Some(TOKEN),
        &["data", "shared"],
    );
    let destination = RuntimePod::start_with_volumes(
        kind,
        &pod_with_volumes(kind, "passive", &[("data", "emptyDir")]),
        Some(TOKEN),
        &["data"],
    );
    probe_until(&source, "app", 200, "running").await;
    probe_until(&destination, "app", 204, "created (passive)").await;
    ticks_at_least(&source, "app", 120).await;
    std::fs::create_dir_all(source.volume_dir("data").join("nested/dir")).unwrap();
    std::fs::write(source.volume_dir("data").join("nested/dir/file"), "kept\n").unwrap();
    std::fs::write(source.volume_dir("shared").join("claim-file"), "shared\n").unwrap();
    std::fs::write(destination.volume_dir("data").join("stale"), "old\n").unwrap();

    // A volume the destination pod does not have: refused in the preflight, nothing frozen.
    let (status, refused) = source
        .post(
            "/migrate",
            &json!({"destination": destination.url, "volumes": {"include": ["shared"]}}),
        )
        .await;
    assert_eq!(status, 409, "{refused}");
    let message = refused["error"].as_str().unwrap();
    assert!(
        message.contains("\"shared\"") && message.contains("preflight"),
        "{refused}"
    );
    assert_eq!(refused["detail"]["sourceState"], "untouched", "{refused}");
    // A volume the pod does not have at all: the caller's mistake.
    let (status, bad) = source
        .post(
            "/migrate",
            &json!({"destination": destination.url, "volumes": {"exclude": ["nope"]}}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad["error"].as_str().unwrap().contains("\"nope\""), "{bad}");
    probe_until(&source, "app", 200, "still running at the source").await;

    // By default the emptyDir travels and the claim stays.
    let follower = source.follow_output("app");
    let (status, report) = source
        .post("/migrate", &json!({"destination": destination.url}))
        .await;
    assert_eq!(status, 200, "{report}");
    let carried: Vec<&str> = report["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(carried, ["data"], "{report}");
    let last = ticks(&follower.await.unwrap()).last().unwrap().tick;
    assert_continues(&destination, "app", last, 16).await;

    let arrived = destination.volume_dir("data");
    assert_eq!(
        std::fs::read_to_string(arrived.join("nested/dir/file")).unwrap(),
        "kept\n"
    );
    assert!(
        !arrived.join("stale").exists(),
        "the destination's volume holds exactly the source's content"
    );
    assert!(
        std::fs::read_dir(&arrived).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".ums-incoming")),
        "no incoming directory is left in the volume"
    );
    // The journal the process kept open goes on from where it was, without a gap.
    let (journal, lines) = poll(
        "the journal to go on at the destination",
        Duration::from_secs(60),
        || async {
            let journal = std::fs::read_to_string(arrived.join("journal")).unwrap();
            let lines: Vec<u64> = journal
                .lines()
                .map(|l| l.strip_prefix("tick=").unwrap().parse().unwrap())
                .collect();
            (lines.last().is_some_and(|t| *t > last + 50)).then_some((journal, lines))
        },
    )
    .await;
    assert_eq!(lines[0], 0, "{journal}");
    for pair in lines.windows(2) {
        assert_eq!(pair[1], pair[0] + 50, "gap in the journal: {journal}");
    }
}

macro_rules! engine_suite {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;
            #[tokio::test(flavor = "multi_thread")]
            async fn migrates_a_running_workload_with_memory_counter_and_files() {
                super::migrates_a_running_workload($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn zstd_compressed_migration() {
                super::zstd_compressed_migration($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn established_tcp_connection() {
                super::established_tcp_connection($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn tcp_connection_survives_a_rollback() {
                super::tcp_connection_survives_a_rollback($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn two_containers_migrate_as_one() {
                super::two_containers_migrate_as_one($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn unreachable_destination_is_refused_before_freezing() {
                super::unreachable_destination_is_refused_before_freezing($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn destination_killed_mid_transfer_rolls_back() {
                super::destination_killed_mid_transfer_rolls_back($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn corrupted_archive_is_refused() {
                super::corrupted_archive_is_refused($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn traversal_archive_is_refused() {
                super::traversal_archive_is_refused($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn wrong_token_is_refused() {
                super::wrong_token_is_refused($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn concurrent_migrate_is_refused() {
                super::concurrent_migrate_is_refused($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn missing_image_travels_with_the_migration() {
                super::missing_image_travels_with_the_migration($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn ambassador_exits_with_the_nested_exit_code() {
                super::ambassador_exits_with_the_nested_exit_code($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn bad_requests_get_json_errors() {
                super::bad_requests_get_json_errors($kind).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn volumes_travel_by_kind_and_choice() {
                super::volumes_travel_by_kind_and_choice($kind).await
            }
        }
    };
}

engine_suite!(docker, EngineKind::Docker);
engine_suite!(podman, EngineKind::Podman);

/// Post-copy: the destination resumes the processes before their memory has arrived;
/// CRIU's lazy pages follow over the sidecars' own connection.
mod post_copy {
    use super::*;
    use ums_tests::outer::docker;

    fn migrate_post_copy(pair: &Pair) -> tokio::task::JoinHandle<(u16, Value)> {
        let client = pair.source.client();
        let url = format!("{}/migrate", pair.source.url);
        let body = json!({ "destination": pair.destination.url, "postCopy": true });
        tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        })
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn podman_resumes_before_the_pages_arrive() {
        resumes_before_the_pages_arrive_and_the_memory_is_whole(EngineKind::Podman).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn docker_resumes_before_the_pages_arrive() {
        resumes_before_the_pages_arrive_and_the_memory_is_whole(EngineKind::Docker).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn podman_link_dies_and_the_source_runs_on() {
        the_link_dies_mid_post_copy_and_the_source_runs_on(EngineKind::Podman).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn docker_link_dies_and_the_source_runs_on() {
        the_link_dies_mid_post_copy_and_the_source_runs_on(EngineKind::Docker).await
    }

    async fn resumes_before_the_pages_arrive_and_the_memory_is_whole(kind: EngineKind) {
        let pair = pair(kind, &[("app", 256, 7)]).await;
        ticks_at_least(&pair.source, "app", 20).await;
        // What post-copy refuses, before anything is frozen.
        let (status, body) = pair
            .source
            .post(
                "/migrate",
                &json!({ "destination": pair.destination.url, "postCopy": true, "leaveRunning": true }),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("leaveRunning"),
            "{body}"
        );

        let follower = pair.source.follow_output("app");
        let (status, report) = migrate_post_copy(&pair).await.unwrap();
        assert_eq!(status, 200, "post-copy migration failed: {report}");
        let totals = &report["totals"];
        assert!(totals["postCopyMs"].is_u64(), "no postCopyMs: {report}");
        // The archive carried no memory; the pages came through the page stream.
        assert!(
            totals["bytesSent"].as_u64().unwrap() < 16 << 20,
            "the archive must not carry the memory: {report}"
        );
        assert!(
            totals["pageBytes"].as_u64().unwrap() >= 256 << 20,
            "every page must come through the page stream: {report}"
        );
        // The counter continues and the whole memory checks out at the destination.
        let last = ticks(&follower.await.unwrap()).last().unwrap().tick;
        assert_continues(&pair.destination, "app", last, 256).await;
        let (status, probe) = pair.source.get("/probe/app").await;
        assert_eq!((status, probe["state"].as_str()), (200, Some("migrated")));
        assert!(pair.source.container_names().is_empty());
    }

    async fn the_link_dies_mid_post_copy_and_the_source_runs_on(kind: EngineKind) {
        let pair = pair(kind, &[("app", 256, 9)]).await;
        ticks_at_least(&pair.source, "app", 20).await;
        // Pages slow enough to cut the link while they flow: 256 MiB at 40 Mbit/s is a minute.
        docker(&[
            "exec",
            &pair.source.name,
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            "40mbit",
            "burst",
            "256kb",
            "latency",
            "200ms",
        ]);
        let migration = migrate_post_copy(&pair);
        probe_until(&pair.destination, "app", 200, "running at the destination").await;
        // The copy runs there while its pages are still coming.
        poll(
            "the copy to print at the destination during post-copy",
            Duration::from_secs(60),
            || async {
                (!ticks(&pair.destination.output_lines("app").await).is_empty()).then_some(())
            },
        )
        .await;
        // The link goes: every packet between the two pods is answered with a reset.
        for chain in [["OUTPUT", "-d"], ["INPUT", "-s"]] {
            docker(&[
                "exec",
                &pair.source.name,
                "iptables",
                "-I",
                chain[0],
                chain[1],
                &pair.destination.ip,
                "-p",
                "tcp",
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ]);
        }
        let (status, body) = migration.await.unwrap();
        assert_eq!(status, 502, "{body}");
        assert_eq!(body["detail"]["phase"], "transfer/restore", "{body}");
        // The source runs on from where it was frozen: one unbroken counter, memory ok.
        probe_until(&pair.source, "app", 200, "running again at the source").await;
        let before = ticks(&pair.source.output_lines("app").await).len();
        let all = poll(
            "the source to go on printing",
            Duration::from_secs(60),
            || async {
                let t = ticks(&pair.source.output_lines("app").await);
                (t.len() > before + 300).then_some(t)
            },
        )
        .await;
        for w in all.windows(2) {
            assert_eq!(w[1].tick, w[0].tick + 1, "gap or repeat at the source");
        }
        assert!(
            all.iter().all(|t| t.memory_ok),
            "memory check at the source"
        );
        // The copy at the destination, without the rest of its memory, goes.
        poll(
            "the copy at the destination to be removed",
            Duration::from_secs(60),
            || async {
                let (_, listed) = pair.destination.get("/containers").await;
                listed
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|c| c["state"] != "running")
                    .then_some(())
            },
        )
        .await;
    }
}
