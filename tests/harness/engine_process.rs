//! A nested engine for one side of a test: its own data root, exec root, pid file and unix
//! socket, started here and stopped (with everything it ran) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ums_sidecar::engine::EngineKind;

/// A running engine.
#[derive(Debug)]
pub struct EngineProcess {
    pub kind: EngineKind,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub data_root: PathBuf,
    child: Child,
}

impl EngineProcess {
    /// Starts an engine of `kind` under a fresh directory (short: unix socket paths are
    /// limited to 108 bytes and containerd nests its own under the exec root).
    pub fn start(kind: EngineKind) -> Self {
        let dir = PathBuf::from(format!("/tmp/{}", crate::unique("ums-")));
        std::fs::create_dir_all(&dir).unwrap();
        match kind {
            EngineKind::Docker => Self::start_docker(dir),
            EngineKind::Podman => panic!("podman engine tests come with issue 4"),
        }
    }

    fn start_docker(dir: PathBuf) -> Self {
        let socket = dir.join("docker.sock");
        let data_root = dir.join("data");
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            // Nested containers use the host network; no bridge, no iptables rules shared
            // between the test engines.
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start dockerd ({e}): run scripts/install-host.sh (engine tests need real engines)")
            });
        let engine = EngineProcess {
            kind: EngineKind::Docker,
            dir,
            socket,
            data_root,
            child,
        };
        engine.wait_ready(Duration::from_secs(60));
        engine
    }

    fn wait_ready(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            let ok = Command::new("docker")
                .args(self.cli_args())
                .args(["version", "--format", "{{.Server.Experimental}}"])
                .output()
                .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "true")
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < until,
                "dockerd did not come up with experimental features within {deadline:?}; log:\n{}",
                std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Arguments that point the engine's CLI at this engine.
    pub fn cli_args(&self) -> Vec<String> {
        vec!["--host".into(), format!("unix://{}", self.socket.display())]
    }

    /// Runs the engine's CLI; panics with its output on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("docker")
            .args(self.cli_args())
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "docker {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Loads an image tar (`docker save` format) into this engine.
    pub fn load_image(&self, tar: &Path) {
        self.cli(&["load", "--input", tar.to_str().unwrap()]);
    }

    /// Saves an image into a tar, keeping its ID (as a registry would).
    pub fn save_image(&self, image: &str, tar: &Path) {
        self.cli(&["save", "--output", tar.to_str().unwrap(), image]);
    }

    /// The root-fs changes directory of a container.
    pub fn upper_dir(&self, container: &str) -> PathBuf {
        PathBuf::from(self.cli(&[
            "inspect",
            "--format",
            "{{.GraphDriver.Data.UpperDir}}",
            container,
        ]))
    }

    /// Container names known to the engine.
    pub fn container_names(&self) -> Vec<String> {
        self.cli(&["ps", "--all", "--format", "{{.Names}}"])
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        // Remove containers first so dockerd does not wait on them, then stop it.
        if let Ok(out) = Command::new("docker")
            .args(self.cli_args())
            .args(["ps", "-aq"])
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(self.cli_args())
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
        let _ = nix_kill(self.child.id(), "TERM");
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Unmount whatever the engine left mounted under its directory, then remove it.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(self.dir.to_str().unwrap_or("/nonexistent")))
                .collect();
            ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in ours {
                let _ = Command::new("umount").arg("-l").arg(m).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_kill(pid: u32, signal: &str) -> std::io::Result<std::process::Output> {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .output()
}
