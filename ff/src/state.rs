//! What one `ums-ff` knows and holds: its configuration, the supervisor, where the service
//! stands, and the credentials it takes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use ums_contract::{parse_podinfo, MigrationAnnotations};

use crate::carry::Volume;
use crate::supervise::Supervisor;

/// Where the service stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Passive (a restore target) or `null`: nothing runs; a restore may come.
    Waiting,
    /// Active: the service is about to start (the PID counter advancing first).
    Starting,
    /// The service runs here.
    Running,
    /// Being dumped, sent, or restored.
    Migrating,
    /// The service moved to another pod; nothing runs here any more.
    Migrated,
    /// The service ended.
    Ended,
}

/// The configuration `ums-ff run` was given.
#[derive(Debug, Clone)]
pub struct Config {
    pub command: Vec<String>,
    pub first_pid: u32,
    pub podinfo: PathBuf,
    /// The container's name (what the coordinator probes).
    pub container: String,
    pub work_dir: PathBuf,
    pub preserve: Vec<PathBuf>,
    pub volumes: Vec<Volume>,
}

/// One `ums-ff`.
#[derive(Debug)]
pub struct Ff {
    pub config: Config,
    pub supervisor: Arc<Supervisor>,
    pub coordinator_keys: Vec<Vec<u8>>,
    pub tls_sha256: String,
    /// This run of the supervisor (a restart of the container is another).
    pub instance: String,
    /// One dump, send or restore at a time.
    pub busy: tokio::sync::Mutex<()>,
    /// The migration under way, which an operator may still stop.
    pub aborts: ums_contract::abort::Aborts,
    phase: Mutex<Phase>,
}

impl Ff {
    pub fn new(
        config: Config,
        supervisor: Arc<Supervisor>,
        coordinator_keys: Vec<Vec<u8>>,
        tls_sha256: String,
    ) -> Self {
        Ff {
            config,
            supervisor,
            coordinator_keys,
            tls_sha256,
            instance: random_hex(8),
            busy: tokio::sync::Mutex::new(()),
            aborts: ums_contract::abort::Aborts::default(),
            phase: Mutex::new(Phase::Waiting),
        }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// The pod's migration annotations (downward API); the defaults (active, no migration) where
    /// there is no such file (`ums-ff` run by hand).
    pub fn annotations(&self) -> Result<MigrationAnnotations, String> {
        read_annotations(&self.config.podinfo)
    }

    /// The pod's UID, from the downward-API file beside the annotations.
    pub fn pod_uid(&self) -> Option<String> {
        let file = self.config.podinfo.parent()?.join("uid");
        let text = std::fs::read_to_string(file).ok()?;
        let uid = text.trim();
        (!uid.is_empty()).then(|| uid.to_owned())
    }
}

/// The migration annotations in the downward-API file `path`; defaults where it does not exist.
pub fn read_annotations(path: &Path) -> Result<MigrationAnnotations, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let raw = parse_podinfo(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    MigrationAnnotations::parse(&raw).map_err(|e| format!("{}: {e}", path.display()))
}

/// `bytes` random bytes, hex.
pub fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut buf = vec![0u8; bytes];
    let _ = ring::rand::SystemRandom::new().fill(&mut buf);
    hex::encode(buf)
}
