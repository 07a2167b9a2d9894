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
            EngineKind::Podman => Self::start_podman(dir),
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

    fn start_podman(dir: PathBuf) -> Self {
        let socket = dir.join("podman.sock");
        let data_root = dir.join("root");
        let log = std::fs::File::create(dir.join("podman.log")).unwrap();
        let mut engine = EngineProcess {
            kind: EngineKind::Podman,
            dir,
            socket,
            data_root,
            // Replaced right below; a placeholder keeps the field initialised.
            child: Command::new("true").spawn().unwrap(),
        };
        let _ = engine.child.wait();
        engine.child = Command::new("podman")
            .args(engine.podman_storage_args())
            .args(["system", "service", "--time", "0"])
            .arg(format!("unix://{}", engine.socket.display()))
            .env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start podman system service ({e}): run scripts/install-host.sh (engine tests need real engines)")
            });
        engine.wait_ready(Duration::from_secs(60));
        engine
    }

    /// Podman's own storage, run root and runtime for this engine (runc: crun refuses this
    /// machine's hybrid cgroups; cgroupfs: no systemd).
    fn podman_storage_args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.data_root.display().to_string(),
            "--runroot".into(),
            self.dir.join("run").display().to_string(),
            "--tmpdir".into(),
            self.dir.join("tmp").display().to_string(),
            "--cgroup-manager".into(),
            "cgroupfs".into(),
            "--runtime".into(),
            "runc".into(),
            "--events-backend".into(),
            "file".into(),
        ]
    }

    fn program(&self) -> &'static str {
        match self.kind {
            EngineKind::Docker => "docker",
            EngineKind::Podman => "podman",
        }
    }

    fn wait_ready(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            let ok = match self.kind {
                EngineKind::Docker => Command::new("docker")
                    .args(self.cli_args())
                    .args(["version", "--format", "{{.Server.Experimental}}"])
                    .output()
                    .map(|o| {
                        o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "true"
                    })
                    .unwrap_or(false),
                EngineKind::Podman => Command::new("podman")
                    .args(["--remote", "--url"])
                    .arg(format!("unix://{}", self.socket.display()))
                    .arg("version")
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false),
            };
            if ok {
                return;
            }
            assert!(
                Instant::now() < until,
                "{} did not come up within {deadline:?}; log:\n{}",
                self.program(),
                std::fs::read_to_string(self.dir.join(format!(
                    "{}.log",
                    if self.kind == EngineKind::Docker {
                        "dockerd"
                    } else {
                        "podman"
                    }
                )))
                .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Arguments that point the engine's CLI at this engine.
    pub fn cli_args(&self) -> Vec<String> {
        match self.kind {
            EngineKind::Docker => {
                vec!["--host".into(), format!("unix://{}", self.socket.display())]
            }
            EngineKind::Podman => self.podman_storage_args(),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(self.program());
        command
            .args(self.cli_args())
            .env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1");
        command
    }

    /// Runs the engine's CLI; panics with its output on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.command().args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{} {args:?} failed: {}",
            self.program(),
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
        // Remove containers first so the engine does not wait on them, then stop it.
        if let Ok(out) = self.command().args(["ps", "-aq"]).output() {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let _ = self.command().args(["rm", "-f"]).args(&ids).output();
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
