//! The source's own dump as its journal. Between the dump (the containers stopped, their state
//! in checkpoints on the pod's emptyDir) and the end of the transfer, the service lives only in
//! those checkpoints. If the runtime container dies then (the engine and the sidecar with it),
//! the restarted sidecar finds this record beside the engine's storage and restores the
//! containers from their checkpoints, as the rollback would have: the service continues where
//! it stopped instead of starting afresh. The record is written once the dump is whole and
//! removed when the migration ends either way (the containers migrated or rolled back).
//! Post-copy dumps and dumps that leave the containers running write none (the memory is not
//! all on disk, or nothing stopped).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name, in the engine's storage directory (the pod's emptyDir).
pub const FILE: &str = "ums-pending-dump.json";

/// A dump whose migration has not ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingDump {
    pub migration_id: String,
    pub containers: Vec<PendingContainer>,
}

/// One stopped container and the checkpoint that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingContainer {
    pub name: String,
    pub checkpoint_id: String,
    /// It had established TCP connections (restored as CRIU dumped them).
    pub tcp_established: bool,
    /// Those connections: held by the connection lock while the containers come back, so
    /// that one between two of them is not reset by the end that returns first.
    #[serde(default)]
    pub connections: Vec<crate::tcp::TcpConnection>,
}

pub fn path(engine_root: &Path) -> PathBuf {
    engine_root.join(FILE)
}

/// Writes the record (replace by rename: a record is whole or absent).
pub fn write(engine_root: &Path, pending: &PendingDump) -> std::io::Result<()> {
    let file = path(engine_root);
    let partial = file.with_extension("partial");
    let text = serde_json::to_vec_pretty(pending).map_err(std::io::Error::other)?;
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, &file)
}

/// The record a previous run left, if any (an unreadable one is reported and dropped).
pub fn read(engine_root: &Path) -> Option<PendingDump> {
    let file = path(engine_root);
    let text = std::fs::read(&file).ok()?;
    match serde_json::from_slice(&text) {
        Ok(pending) => Some(pending),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "unreadable pending-dump record: ignored");
            clear(engine_root);
            None
        }
    }
}

/// The migration ended: the record goes.
pub fn clear(engine_root: &Path) {
    let file = path(engine_root);
    if let Err(e) = std::fs::remove_file(&file) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %file.display(), error = %e, "could not remove the pending-dump record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_written_read_back_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let pending = PendingDump {
            migration_id: "m1".into(),
            containers: vec![PendingContainer {
                name: "app".into(),
                checkpoint_id: "cp1".into(),
                tcp_established: true,
                connections: vec![crate::tcp::TcpConnection {
                    local: "127.0.0.1:40000".parse().unwrap(),
                    remote: "127.0.0.1:8081".parse().unwrap(),
                }],
            }],
        };
        write(dir.path(), &pending).unwrap();
        assert_eq!(read(dir.path()), Some(pending));
        clear(dir.path());
        assert_eq!(read(dir.path()), None);
        clear(dir.path());
    }

    #[test]
    fn an_unreadable_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"{half").unwrap();
        assert_eq!(read(dir.path()), None);
        assert!(!path(dir.path()).exists());
    }
}
