//! Which files the node part may touch (pure): the kubelet's checkpoint archives and the
//! emptyDir archives it writes beside them, by file name only, inside the checkpoint directory
//! it was given; and, to read only, a pod's emptyDir volumes in the kubelet's pod directories.

use std::path::{Path, PathBuf};

/// A file name that is not a kubelet checkpoint archive.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a checkpoint archive name (checkpoint-<pod>_<namespace>-<container>-<time>.tar or volumes-<pod>_<namespace>-<migration>.tar, no directories)")]
pub struct NotAnArchive(pub String);

/// The archive's path in `dir`, if `name` is the file name of a kubelet checkpoint archive
/// (or the full path the kubelet answered, inside `dir`'s node path `node_dir`).
pub fn archive_path(dir: &Path, node_dir: &Path, name: &str) -> Result<PathBuf, NotAnArchive> {
    let file = match Path::new(name).strip_prefix(node_dir) {
        Ok(rest) => rest.to_str().unwrap_or_default(),
        Err(_) => name,
    };
    let valid = (file.starts_with("checkpoint-") || file.starts_with("volumes-"))
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

/// The file name of a pod's emptyDir archive for one migration, beside its checkpoints:
/// `volumes-<pod>_<namespace>-<migration>.tar`.
pub fn volumes_archive_name(pod: &str, namespace: &str, migration: &str) -> String {
    format!("volumes-{pod}_{namespace}-{migration}.tar")
}

/// Whether `file` is an archive an interrupted checkpoint of pod `pod` in `namespace` left:
/// the kubelet's `checkpoint-<pod>_<namespace>-<container>-<time>.tar` of one of `containers`
/// (the time an RFC 3339 one, so that another pod's names, whose namespace or container merely
/// starts alike, do not match), or the migration's emptyDir archive (pure).
pub fn left_by_checkpoint(
    file: &str,
    pod: &str,
    namespace: &str,
    containers: &[String],
    migration: &str,
) -> bool {
    if file == volumes_archive_name(pod, namespace, migration) {
        return true;
    }
    let Some(rest) = file
        .strip_prefix(&format!("checkpoint-{pod}_{namespace}-"))
        .and_then(|r| r.strip_suffix(".tar"))
    else {
        return false;
    };
    containers.iter().any(|c| {
        rest.strip_prefix(c.as_str())
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|time| {
                let b = time.as_bytes();
                b.len() >= 20
                    && b[..4].iter().all(u8::is_ascii_digit)
                    && b[4] == b'-'
                    && b[10] == b'T'
                    && !time.contains('/')
            })
    })
}

/// A name that may not be part of a path here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} {value:?} is not a valid name (letters, digits, '-', '.', '_'; not '.' or '..')")]
pub struct BadName {
    pub what: &'static str,
    pub value: String,
}

fn plain_name(what: &'static str, value: &str) -> Result<(), BadName> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(BadName {
            what,
            value: value.to_owned(),
        })
    }
}

/// Where the kubelet keeps a pod's emptyDir volume, in the pod directories mounted at
/// `pods_dir`: `<pods_dir>/<pod uid>/volumes/kubernetes.io~empty-dir/<volume>`.
pub fn empty_dir_path(pods_dir: &Path, pod_uid: &str, volume: &str) -> Result<PathBuf, BadName> {
    plain_name("pod uid", pod_uid)?;
    plain_name("volume", volume)?;
    Ok(pods_dir
        .join(pod_uid)
        .join("volumes")
        .join("kubernetes.io~empty-dir")
        .join(volume))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_checkpoint_leaves_these_archives_only() {
        let containers = vec!["main".to_owned(), "side".to_owned()];
        let left = |file: &str| left_by_checkpoint(file, "p", "ns", &containers, "m1");
        assert!(left("checkpoint-p_ns-main-2026-12-03T13:44:17Z.tar"));
        assert!(left("checkpoint-p_ns-side-2026-12-03T13:44:17+01:00.tar"));
        assert!(left("volumes-p_ns-m1.tar"));
        for other in [
            // pod p in namespace ns-main, container x
            "checkpoint-p_ns-main-x-2026-12-03T13:44:17Z.tar",
            "checkpoint-p_ns-other-2026-12-03T13:44:17Z.tar",
            "checkpoint-q_ns-main-2026-12-03T13:44:17Z.tar",
            "volumes-p_ns-m2.tar",
            "checkpoint-p_ns-main-2026-12-03T13:44:17Z.tar.partial",
        ] {
            assert!(!left(other), "{other}");
        }
    }

    #[test]
    fn empty_dirs_of_a_pod_only() {
        let pods = Path::new("/pods");
        assert_eq!(
            empty_dir_path(pods, "0b6c-11", "data"),
            Ok(PathBuf::from(
                "/pods/0b6c-11/volumes/kubernetes.io~empty-dir/data"
            ))
        );
        for (uid, volume) in [
            ("..", "data"),
            ("a/b", "data"),
            ("u", "../x"),
            ("u", ""),
            ("", "d"),
        ] {
            assert!(empty_dir_path(pods, uid, volume).is_err(), "{uid} {volume}");
        }
        let name = volumes_archive_name("counter", "default", "m-1");
        assert_eq!(name, "volumes-counter_default-m-1.tar");
        assert_eq!(
            archive_path(pods, Path::new("/var/lib/kubelet/checkpoints"), &name),
            Ok(pods.join(&name))
        );
    }

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
