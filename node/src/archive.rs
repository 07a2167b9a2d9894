//! Which files the node part may touch: the kubelet's checkpoint archives, by file name only,
//! inside the checkpoint directory it was given (pure).

use std::path::{Path, PathBuf};

/// A file name that is not a kubelet checkpoint archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a kubelet checkpoint archive name (checkpoint-<pod>_<namespace>-<container>-<time>.tar, no directories)")]
pub struct NotAnArchive(pub String);

/// The archive's path in `dir`, if `name` is the file name of a kubelet checkpoint archive
/// (or the full path the kubelet answered, inside `dir`'s node path `node_dir`).
pub fn archive_path(dir: &Path, node_dir: &Path, name: &str) -> Result<PathBuf, NotAnArchive> {
    let file = match Path::new(name).strip_prefix(node_dir) {
        Ok(rest) => rest.to_str().unwrap_or_default(),
        Err(_) => name,
    };
    let valid = file.starts_with("checkpoint-")
        && file.ends_with(".tar")
        && !file.contains('/')
        && !file.contains('\0')
        && file.len() <= 255;
    if valid {
        Ok(dir.join(file))
    } else {
        Err(NotAnArchive(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_archive_names_in_the_directory() {
        let dir = Path::new("/checkpoints");
        let node = Path::new("/var/lib/kubelet/checkpoints");
        let name = "checkpoint-counter_default-main-2026-12-03T13:44:17Z.tar";
        assert_eq!(archive_path(dir, node, name), Ok(dir.join(name)));
        assert_eq!(
            archive_path(dir, node, &format!("/var/lib/kubelet/checkpoints/{name}")),
            Ok(dir.join(name))
        );
        for bad in [
            "../etc/shadow",
            "checkpoint-../../x.tar",
            "/etc/checkpoint-x.tar",
            "checkpoint-x.tar.gz",
            "notes.tar",
            "",
        ] {
            assert!(archive_path(dir, node, bad).is_err(), "{bad}");
        }
    }
}
