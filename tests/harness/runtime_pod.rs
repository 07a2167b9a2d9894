//! The runtime container of one wrapped pod, as production runs it: the real `ums-rs/dind` or
//! `ums-rs/pind` image on the outer engine, privileged the way this machine allows, its nested
//! engine's storage on a host directory (the pod's emptyDir), the downward-API annotations file
//! mounted at `/etc/podinfo`, its own network namespace and IP on the outer engine's bridge.
//! The sidecar is the image's own entrypoint; the tests talk to it over the pod network.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use ums_contract::podinfo::format_podinfo;
use ums_sidecar::engine::EngineKind;

use crate::outer::{self, docker, PRIVILEGED_ARGS};
use crate::registry::Registry;

/// The sidecar port of the runtime images.
pub const SIDECAR_PORT: u16 = 8888;

/// One running runtime container; removed (with everything nested in it) on drop.
#[derive(Debug)]
pub struct RuntimePod {
    pub kind: EngineKind,
    /// The outer container's name.
    pub name: String,
    /// Host directory holding the pod's volumes: `podinfo/`, `secrets/`, `engine/`.
    pub dir: PathBuf,
    /// Host path of the nested engine's storage (mounted at `/var/lib/docker` or
    /// `/var/lib/containers` inside).
    pub data_root: PathBuf,
    /// The pod IP.
    pub ip: String,
    /// `http://<pod IP>:8888`.
    pub url: String,
    pub podinfo: PathBuf,
    pub token: Option<String>,
    log_relay: Option<Child>,
}

/// Writes a podinfo annotations file the way the kubelet updates it (atomic replace).
pub fn write_podinfo(path: &Path, annotations: &BTreeMap<String, String>) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format_podinfo(annotations)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl RuntimePod {
    /// The runtime image of `kind`.
    pub fn image(kind: EngineKind) -> &'static str {
        match kind {
            EngineKind::Docker => "ums-rs/dind:latest",
            EngineKind::Podman => "ums-rs/pind:latest",
            EngineKind::Ff => panic!("a runtime pod runs a nested engine (dind or pind), not ff"),
        }
    }

    /// Where the nested engine keeps its storage inside the runtime container.
    fn engine_root(kind: EngineKind) -> &'static str {
        match kind {
            EngineKind::Docker => "/var/lib/docker",
            EngineKind::Podman => "/var/lib/containers",
            EngineKind::Ff => panic!("a runtime pod runs a nested engine (dind or pind), not ff"),
        }
    }

    /// Starts a runtime container with these pod annotations and, if given, a sidecar token;
    /// returns once its sidecar answers on the pod network.
    pub fn start(
        kind: EngineKind,
        annotations: &BTreeMap<String, String>,
        token: Option<&str>,
    ) -> Self {
        Self::start_with_volumes(kind, annotations, token, &[])
    }

    /// [`RuntimePod::start`], with pod volumes: a host directory each (see
    /// [`RuntimePod::volume_dir`]), mounted at `/mount/<volume>` as the webhook mounts them.
    pub fn start_with_volumes(
        kind: EngineKind,
        annotations: &BTreeMap<String, String>,
        token: Option<&str>,
        volumes: &[&str],
    ) -> Self {
        let image = Self::image(kind);
        outer::require_image(image);
        let registry = Registry::shared();
        let name = crate::unique("ums-pod-");
        let dir = PathBuf::from(format!("/tmp/{name}"));
        for sub in ["podinfo", "secrets", "engine"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        for v in volumes {
            std::fs::create_dir_all(dir.join("volumes").join(v)).unwrap();
        }
        let podinfo = dir.join("podinfo/annotations");
        write_podinfo(&podinfo, annotations);
        let volume = |host: &str, inside: &str, mode: &str| {
            format!("{}:{inside}:{mode}", dir.join(host).display())
        };
        let mut args: Vec<String> = vec!["run".into(), "--detach".into(), "--name".into()];
        args.push(name.clone());
        args.extend(PRIVILEGED_ARGS.iter().map(|a| a.to_string()));
        args.extend([
            "--volume".into(),
            volume("engine", Self::engine_root(kind), "rw"),
            "--volume".into(),
            volume("podinfo", "/etc/podinfo", "ro"),
            "--volume".into(),
            volume("secrets", "/etc/ums", "ro"),
            "--env".into(),
            format!("UMS_INSECURE_REGISTRIES={}", registry.pod_address),
            "--env".into(),
            "RUST_LOG=info,ums_sidecar=debug".into(),
        ]);
        for v in volumes {
            args.extend([
                "--volume".into(),
                volume(&format!("volumes/{v}"), &format!("/mount/{v}"), "rw"),
            ]);
        }
        if let Some(token) = token {
            std::fs::write(dir.join("secrets/token"), token).unwrap();
            args.extend(["--env".into(), "UMS_TOKEN_FILE=/etc/ums/token".into()]);
        }
        args.push(image.into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs);
        let ip = docker(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            &name,
        ]);
        let log_relay = relay_logs(&name);
        let pod = RuntimePod {
            kind,
            data_root: dir.join("engine"),
            url: format!("http://{ip}:{SIDECAR_PORT}"),
            ip,
            name,
            dir,
            podinfo,
            token: token.map(str::to_owned),
            log_relay,
        };
        pod.wait_ready(Duration::from_secs(120));
        pod
    }

    fn wait_ready(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        let address = format!("{}:{SIDECAR_PORT}", self.ip);
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(&address) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let request = format!("GET /healthz HTTP/1.0\r\nHost: {address}\r\n\r\n");
                let mut response = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && std::io::Read::read_to_string(&mut stream, &mut response).is_ok()
                    && response.starts_with("HTTP/1.0 200")
                {
                    return;
                }
            }
            let exited =
                docker(&["inspect", "--format", "{{.State.Running}}", &self.name]) != "true";
            if exited || Instant::now() > until {
                panic!(
                    "the sidecar of {} ({}) did not answer /healthz{}\n--- container log:\n{}\n--- engine log:\n{}",
                    self.name,
                    Self::image(self.kind),
                    if exited { ": the runtime container exited".to_owned() } else { format!(" within {deadline:?}") },
                    container_log(&self.name),
                    self.engine_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The end of the nested engine's own log (also from a runtime container that exited).
    pub fn engine_log(&self) -> String {
        let file = match self.kind {
            EngineKind::Docker => "/var/log/dockerd.log",
            EngineKind::Podman => "/var/log/podman.log",
            EngineKind::Ff => return String::new(),
        };
        let copy = self.dir.join("engine.log");
        let _ = Command::new("docker")
            .args(["cp", &format!("{}:{file}", self.name)])
            .arg(&copy)
            .output();
        let text = std::fs::read_to_string(&copy).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The nested engine's CLI: `docker` or `podman`.
    pub fn engine_cli(&self) -> &'static str {
        match self.kind {
            EngineKind::Docker => "docker",
            EngineKind::Podman => "podman",
            EngineKind::Ff => panic!("a runtime pod runs a nested engine (dind or pind), not ff"),
        }
    }

    /// Runs the nested engine's CLI inside the runtime container; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut all = vec!["exec", &self.name, self.engine_cli()];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// Runs the nested engine's CLI with `input` on its stdin.
    pub fn cli_with_input(&self, args: &[&str], input: &[u8]) -> String {
        let mut child = Command::new("docker")
            .args(["exec", "--interactive", &self.name, self.engine_cli()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{} {args:?} in {} failed: {}",
            self.engine_cli(),
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Whether `path` exists inside the runtime container.
    pub fn exists_inside(&self, path: &str) -> bool {
        Command::new("docker")
            .args(["exec", &self.name, "test", "-e", path])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// The host path of a nested container's root-fs changes (its overlay upper directory).
    pub fn upper_dir(&self, container: &str) -> PathBuf {
        let inside = self.cli(&[
            "inspect",
            "--format",
            "{{.GraphDriver.Data.UpperDir}}",
            container,
        ]);
        let relative = Path::new(&inside)
            .strip_prefix(Self::engine_root(self.kind))
            .unwrap_or_else(|_| panic!("{inside} is not under the engine's storage"));
        self.data_root.join(relative)
    }

    /// Nested container names.
    /// The host directory of pod volume `name` (mounted at `/mount/<name>`).
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(name)
    }

    pub fn container_names(&self) -> Vec<String> {
        self.cli(&["ps", "--all", "--format", "{{.Names}}"])
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Replaces the pod's annotations (as the kubelet does after a change).
    pub fn set_annotations(&self, annotations: &BTreeMap<String, String>) {
        write_podinfo(&self.podinfo, annotations);
    }

    /// Kills the runtime container outright (a crashed or deleted pod).
    pub fn kill(&self) {
        let _ = Command::new("docker")
            .args(["kill", "--signal", "KILL", &self.name])
            .output();
    }

    pub fn client(&self) -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap()
    }

    fn authorized(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => builder.bearer_auth(t),
            None => builder,
        }
    }

    /// GET from the sidecar with the token; (status, JSON body or Null).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .authorized(self.client().get(format!("{}{path}", self.url)))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// POST JSON to the sidecar with the token; (status, JSON body or the text).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .authorized(self.client().post(format!("{}{path}", self.url)))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The nested container's output so far, as lines.
    pub async fn output_lines(&self, container: &str) -> Vec<String> {
        let response = self
            .authorized(self.client().get(format!("{}/logs/{container}", self.url)))
            .send()
            .await
            .unwrap();
        if !response.status().is_success() {
            return Vec::new();
        }
        ndjson_lines(&response.text().await.unwrap())
    }

    /// Follows the nested container's output in the background until it stops.
    pub fn follow_output(&self, container: &str) -> tokio::task::JoinHandle<Vec<String>> {
        let request = self.authorized(
            self.client()
                .get(format!("{}/logs/{container}?follow=true", self.url)),
        );
        tokio::spawn(async move {
            let Ok(response) = request.send().await else {
                return Vec::new();
            };
            let text = response.text().await.unwrap_or_default();
            ndjson_lines(&text)
        })
    }
}

impl Drop for RuntimePod {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "--force", "--volumes", &self.name])
            .output();
        if let Some(mut relay) = self.log_relay.take() {
            let _ = relay.kill();
            let _ = relay.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Relays a container's output to the test's stderr, labelled (cargo shows it for failures).
fn relay_logs(name: &str) -> Option<Child> {
    let mut child = Command::new("docker")
        .args(["logs", "--follow", name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let label = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
            }
        });
    }
    Some(child)
}

fn container_log(name: &str) -> String {
    crate::outer::container_log(name, 60)
}

/// The `stdout` text of the sidecar's NDJSON log stream, split into lines.
pub fn ndjson_lines(text: &str) -> Vec<String> {
    let mut out = String::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            if v["stream"] == "stdout" {
                out.push_str(v["data"].as_str().unwrap_or(""));
            }
        }
    }
    out.lines().map(str::to_owned).collect()
}

/// An ambassador container in a runtime pod's network namespace, as the webhook writes it:
/// the real `ums-rs/ambassador` image running `ums-sidecar ambassador <name>`. Removed on drop.
#[derive(Debug)]
pub struct Ambassador {
    name: String,
    child: Child,
    stdout: mpsc::Receiver<String>,
}

impl Ambassador {
    pub fn start(pod: &RuntimePod, container: &str) -> Self {
        let image = "ums-rs/ambassador:latest";
        outer::require_image(image);
        let name = format!("{}-{container}", pod.name);
        let network = format!("container:{}", pod.name);
        let secrets = format!("{}:/etc/ums:ro", pod.dir.join("secrets").display());
        let runtime_url = format!("http://127.0.0.1:{SIDECAR_PORT}");
        let mut command = Command::new("docker");
        command.args([
            "run",
            "--name",
            &name,
            "--network",
            &network,
            "--read-only",
            "--cap-drop",
            "ALL",
            "--volume",
            &secrets,
            image,
            "ambassador",
            container,
            "--runtime-url",
            &runtime_url,
        ]);
        if pod.token.is_some() {
            command.args(["--token-file", "/etc/ums/token"]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker run the ambassador");
        // Its own messages go to the test's (captured) output.
        let err = child.stderr.take().unwrap();
        let label = name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, stdout) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Ambassador {
            name,
            child,
            stdout,
        }
    }

    /// Stdout lines relayed so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.try_iter().collect()
    }

    /// The container's exit code, once it exited (`docker run` exits with it).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }
}

impl Drop for Ambassador {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "--force", &self.name])
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
