//! A real image registry (Debian's `docker-registry`, distribution 2.8) for one test binary:
//! workload images are pushed to it by the outer engine and pulled from it by the nested
//! engines, as they would be from a cluster's registry.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::outer;

/// The registry of this test process.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:PORT`: how the outer engine (on the host) pushes.
    pub push_address: String,
    /// `GATEWAY:PORT`: how nested engines in runtime containers reach it.
    pub pod_address: String,
    /// The CA of its TLS certificate (PEM file), when it serves HTTPS.
    pub ca: Option<PathBuf>,
}

impl Registry {
    /// Starts the registry on first use; it stops when this test process exits.
    pub fn shared() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(|| Registry::start(false))
    }

    /// A registry of this test process that serves HTTPS with a certificate of its own CA, as a
    /// cluster's registry does: containerd 2.1's restore pulls the checkpoint's base image with
    /// its default resolver, which ignores the CRI's registry configuration and speaks plain
    /// HTTP only to localhost. CRI nodes trust the CA.
    pub fn shared_tls() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(|| Registry::start(true))
    }

    fn start(tls: bool) -> Registry {
        let kind = if tls { "tls-" } else { "" };
        let dir = PathBuf::from(format!("/tmp/ums-registry-{kind}{}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = free_port();
        let config = dir.join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 0.0.0.0:{port}\n",
            dir.join("data").display()
        );
        let mut ca = None;
        // The outer engine pushes to 127.0.0.1:PORT: it trusts the CA from certs.d.
        let docker_certs = PathBuf::from(format!("/etc/docker/certs.d/127.0.0.1:{port}"));
        if tls {
            let bundle = ums_certs::generate(&ums_certs::CertRequest {
                service: "registry".into(),
                namespace: "ums-test".into(),
                extra_names: vec!["127.0.0.1".into(), outer::bridge_gateway().to_owned()],
                valid_for: time::Duration::days(1),
                client_auth: false,
            })
            .unwrap();
            std::fs::write(dir.join("ca.crt"), &bundle.ca_cert_pem).unwrap();
            std::fs::write(dir.join("tls.crt"), &bundle.server_cert_pem).unwrap();
            std::fs::write(dir.join("tls.key"), &bundle.server_key_pem).unwrap();
            text.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.join("tls.crt").display(),
                dir.join("tls.key").display()
            ));
            std::fs::create_dir_all(&docker_certs).unwrap();
            std::fs::write(docker_certs.join("ca.crt"), &bundle.ca_cert_pem).unwrap();
            ca = Some(dir.join("ca.crt"));
        }
        std::fs::write(&config, text).unwrap();
        let binary = "docker-registry";
        // A watcher stops the registry (and removes its storage) once this test process is
        // gone: statics are never dropped.
        let script = format!(
            "{binary} serve {config} >{log} 2>&1 & r=$!; while kill -0 {pid} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 1; done; kill $r 2>/dev/null; wait $r; rm -rf {dir} {docker_certs}",
            config = config.display(),
            log = dir.join("registry.log").display(),
            pid = std::process::id(),
            dir = dir.display(),
            docker_certs = if tls { docker_certs.display().to_string() } else { String::new() },
        );
        // `setsid --fork` returns at once; the watcher lives on in its own session.
        let status = Command::new("setsid")
            .args(["--fork", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot start {binary} ({e}): run scripts/install-host.sh"));
        assert!(status.success(), "setsid failed to start {binary}");
        let push_address = format!("127.0.0.1:{port}");
        let until = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&push_address).is_err() {
            assert!(
                Instant::now() < until,
                "the registry did not listen on {push_address} within 30 s; log:\n{}",
                std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            push_address,
            pod_address: format!("{}:{port}", outer::bridge_gateway()),
            ca,
        }
    }

    /// The last lines of the logs of this process's registries that have started.
    pub fn logs() -> String {
        let mut text = String::new();
        for kind in ["", "tls-"] {
            let log = PathBuf::from(format!(
                "/tmp/ums-registry-{kind}{}/registry.log",
                std::process::id()
            ));
            if let Ok(all) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = all.lines().collect();
                text.push_str(&format!(
                    "{}:\n{}\n",
                    log.display(),
                    lines[lines.len().saturating_sub(20)..].join("\n")
                ));
            }
        }
        text
    }

    /// Pushes the outer engine's `local` image as `repository:tag`; returns the reference a
    /// pod uses to pull it.
    pub fn push(&self, local: &str, repository: &str) -> String {
        let pushed = format!("{}/{repository}", self.push_address);
        outer::docker(&["tag", local, &pushed]);
        outer::docker(&["push", "--quiet", &pushed]);
        // The registry has it now: the outer engine keeps no tag per test registry.
        let _ = outer::docker(&["rmi", &pushed]);
        format!("{}/{repository}", self.pod_address)
    }
}

/// A TCP port nothing listens on right now, for a server a test starts next.
///
/// Taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), never from it:
/// a port the kernel handed out for a moment (bind to port 0, then closed) is free again for
/// the source port of any outgoing connection, and with the tests' traffic one took such a
/// port before the test's server bound it ("bind: address already in use", seen on the test
/// API server). Ports below that range are only ever given by this function: one counter per
/// test process, starting at an offset of its PID, each port checked free before it is given.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    assert!(
        ephemeral_low > 12000,
        "net.ipv4.ip_local_port_range starts at {ephemeral_low}: no room below it for test servers"
    );
    let (low, span) = (ephemeral_low - 12000, 12000);
    let _ = NEXT.compare_exchange(
        0,
        std::process::id() % span + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = (low + NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in {low}..{}", low + span)
}
