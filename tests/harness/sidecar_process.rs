//! A real `ums-sidecar serve` process for one side of a test, with its own podinfo file.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use ums_contract::podinfo::format_podinfo;

use crate::engine_process::EngineProcess;

/// The `ums-sidecar` binary of this workspace, built if needed (cargo does not build other
/// packages' binaries for this crate's tests).
pub fn sidecar_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        // target/<profile>/deps/<test binary> -> target/
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_owned();
        let target_dir = profile_dir.parent().unwrap().to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "ums-sidecar",
                "--bin",
                "ums-sidecar",
                "--target-dir",
            ])
            .arg(&target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build for ums-sidecar");
        assert!(status.success(), "cargo build -p ums-sidecar failed");
        let binary = profile_dir.join("ums-sidecar");
        assert!(binary.exists(), "{} was not built", binary.display());
        binary
    })
}

/// A running sidecar; killed on drop.
#[derive(Debug)]
pub struct SidecarProcess {
    child: Child,
    pub url: String,
    pub podinfo: PathBuf,
    pub token: Option<String>,
}

/// Writes a podinfo annotations file the way the kubelet updates it (atomic replace).
pub fn write_podinfo(path: &Path, annotations: &BTreeMap<String, String>) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format_podinfo(annotations)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl SidecarProcess {
    pub fn start(
        engine: &EngineProcess,
        annotations: &BTreeMap<String, String>,
        token: Option<&str>,
    ) -> Self {
        let podinfo = engine.dir.join("podinfo-annotations");
        write_podinfo(&podinfo, annotations);
        let mut command = Command::new(sidecar_binary());
        command
            .arg("serve")
            .args(["--engine", &engine.kind.to_string()])
            .arg("--engine-socket")
            .arg(&engine.socket)
            .arg("--engine-root")
            .arg(&engine.data_root)
            .arg("--podinfo")
            .arg(&podinfo)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info,ums_sidecar=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            let path = engine.dir.join("token");
            std::fs::write(&path, token).unwrap();
            command.arg("--token-file").arg(path);
        }
        let mut child = command.spawn().expect("start ums-sidecar");
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        let label = engine
            .dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[sidecar {label}] {line}");
                let _ = tx.send(line);
            }
        });
        let until = Instant::now() + Duration::from_secs(60);
        let line = loop {
            let left = until.saturating_duration_since(Instant::now());
            match logs.recv_timeout(left) {
                Ok(line) if line.contains("ums-sidecar listening") => break line,
                Ok(_) => {}
                Err(_) => panic!("ums-sidecar did not start listening within 60 s"),
            }
        };
        let addr = line
            .split("listen=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        SidecarProcess {
            child,
            url: format!("http://{addr}"),
            podinfo,
            token: token.map(str::to_owned),
        }
    }

    /// Replaces the pod's annotations (as the kubelet does after a change).
    pub fn set_annotations(&self, annotations: &BTreeMap<String, String>) {
        write_podinfo(&self.podinfo, annotations);
    }

    /// Kills the process outright (a crashed or deleted destination pod).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

    /// GET with the token; (status, JSON body or Null).
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

    /// POST JSON with the token; (status, JSON body or Null).
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

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `ums-sidecar ambassador <name>` process; killed on drop.
#[derive(Debug)]
pub struct AmbassadorProcess {
    child: Child,
    stdout: mpsc::Receiver<String>,
}

impl AmbassadorProcess {
    pub fn start(sidecar: &SidecarProcess, name: &str) -> Self {
        let mut command = Command::new(sidecar_binary());
        command
            .args(["ambassador", name, "--runtime-url", &sidecar.url])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(token) = &sidecar.token {
            let path = sidecar
                .podinfo
                .with_file_name(format!("ambassador-token-{name}"));
            std::fs::write(&path, token).unwrap();
            command.arg("--token-file").arg(path);
        }
        let mut child = command.spawn().expect("start ums-sidecar ambassador");
        let out = child.stdout.take().unwrap();
        let (tx, stdout) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        AmbassadorProcess { child, stdout }
    }

    /// Stdout lines relayed so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.try_iter().collect()
    }

    /// The exit code, once it exited.
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }
}

impl Drop for AmbassadorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
