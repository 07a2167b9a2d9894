//! `ums-sidecar ambassador <name>`: stands in for an original container in the pod. It asks the
//! runtime to create the nested container, relays its output to its own stdout/stderr, and
//! exits with its exit code, so `kubectl logs`, restarts and statuses keep their meaning. While
//! the container is being migrated (or after it moved away) it waits instead of exiting.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;

use crate::cli::AmbassadorArgs;
use crate::engine::{LogResume, LogStreamKind};

/// Runs until the nested container exits; returns its exit code.
pub async fn run(args: AmbassadorArgs) -> anyhow::Result<i32> {
    let AmbassadorArgs {
        name,
        runtime_url,
        token_file,
    } = args;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let base = runtime_url.trim_end_matches('/').to_owned();
    // The runtime's sidecar writes the pod's token when it starts: wait for it.
    let token = match token_file {
        Some(path) => {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(300);
            loop {
                match std::fs::read_to_string(&path) {
                    Ok(t) if !t.trim().is_empty() => break Some(t.trim().to_owned()),
                    Ok(_) => {}
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| {
                            format!("failed to read token file {}", path.display())
                        })
                    }
                    Err(_) => {}
                }
                if std::time::Instant::now() > until {
                    anyhow::bail!("token file {} did not appear within 300 s", path.display());
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        None => None,
    };
    let http = reqwest::Client::builder()
        .build()
        .context("failed to build the HTTP client (are the system CA certificates installed?)")?;
    let auth = |b: reqwest::RequestBuilder| match &token {
        Some(t) => b.bearer_auth(t),
        None => b,
    };

    // 1. Wait for the runtime's API.
    loop {
        match http.get(format!("{base}/healthz")).send().await {
            Ok(r) if r.status().is_success() => break,
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    // 2. Ask for the nested container.
    let create = auth(http.post(format!("{base}/create/{name}")))
        .send()
        .await?;
    let status = create.status();
    let body = create.text().await.unwrap_or_default();
    if !status.is_success() && status.as_u16() != 409 {
        anyhow::bail!("runtime refused to create {name:?}: {status}: {body}");
    }
    eprintln!("[ums-ambassador] {name}: {body}");

    // 3. Relay output until the container exits.
    // The `time` of the last line relayed on each stream: a resumed stream starts right after
    // them (each stream at its own point: their times interleave out of order).
    let mut after = LogResume::default();
    loop {
        let probe = http.get(format!("{base}/probe/{name}")).send().await;
        let Ok(probe) = probe else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        match probe.status().as_u16() {
            200 => {
                let state: serde_json::Value = probe.json().await.unwrap_or_default();
                if state["state"] == "running" {
                    if relay(&http, &base, &name, &mut after, &auth).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            503 => {
                let state: serde_json::Value = probe.json().await.unwrap_or_default();
                let code = state["exitCode"].as_i64().unwrap_or(1);
                // Output written just before the exit.
                let _ = relay(&http, &base, &name, &mut after, &auth).await;
                return Ok(i32::try_from(code).unwrap_or(1));
            }
            404 => {
                // Not created yet (start mode null, or the runtime restarted): ask again.
                let _ = auth(http.post(format!("{base}/create/{name}")))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Follows the nested container's output from `after`, which it moves past every line it
/// relays, also when the stream then breaks (a line is never relayed twice).
async fn relay(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    after: &mut LogResume,
    auth: &impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> anyhow::Result<()> {
    let last = after;
    let url = format!(
        "{base}/logs/{name}?follow=true&after={}&afterStderr={}",
        last.stdout_after, last.stderr_after
    );
    let response = auth(http.get(url)).send().await?.error_for_status()?;
    let mut stream = response.bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&line) {
                let stream = match value["stream"].as_str() {
                    Some("stderr") => LogStreamKind::Stderr,
                    _ => LogStreamKind::Stdout,
                };
                if let Some(time) = value["time"].as_str().and_then(|t| t.parse::<i128>().ok()) {
                    last.advance(stream, time);
                }
                let data = value["data"].as_str().unwrap_or("");
                match stream {
                    LogStreamKind::Stderr => {
                        let _ = std::io::stderr().write_all(data.as_bytes());
                    }
                    _ => {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(data.as_bytes());
                        let _ = out.flush();
                    }
                }
            }
        }
    }
    Ok(())
}
