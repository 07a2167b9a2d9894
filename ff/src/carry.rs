//! What travels with the service besides its memory: the root-fs files it keeps (those it holds
//! open, which CRIU restores only where they exist with the same size, and the paths the image
//! names in `UMS_FF_PRESERVE`) and the content of its pod-local volumes (`UMS_FF_VOLUMES`, set
//! by the webhook for the container's emptyDirs). Files on other mounts (configMaps, secrets,
//! persistent volumes) are the destination's own.
//!
//! The choices are pure functions of `/proc/self/mountinfo` and the open paths, tested below.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

/// A pod-local volume of the service's container: its pod volume name and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub path: PathBuf,
}

/// `name=/path,name=/path` (the webhook's `UMS_FF_VOLUMES`).
pub fn parse_volumes(text: &str) -> Result<Vec<Volume>, String> {
    let mut volumes = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, path) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not name=/path"))?;
        let path = PathBuf::from(path);
        if name.is_empty() || name.contains('/') || !path.is_absolute() {
            return Err(format!(
                "{item:?}: a volume name and an absolute mount path are needed"
            ));
        }
        volumes.push(Volume {
            name: name.to_owned(),
            path,
        });
    }
    Ok(volumes)
}

/// The mount points of a `/proc/<pid>/mountinfo` (field 5, octal escapes undone).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount `path` lives on: the longest mount point that contains it.
pub fn owning_mount<'a>(path: &Path, mounts: &'a [PathBuf]) -> Option<&'a Path> {
    mounts
        .iter()
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
        .map(PathBuf::as_path)
}

/// The root-fs files to carry: of `open` (paths the tree holds open) and `preserve` (paths the
/// image names), those on the root mount, not in a carried volume, each once, sorted.
pub fn rootfs_paths(
    open: &[PathBuf],
    preserve: &[PathBuf],
    mounts: &[PathBuf],
    volumes: &[Volume],
) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = open
        .iter()
        .chain(preserve)
        .filter(|p| p.is_absolute() && p.components().all(|c| !matches!(c, Component::ParentDir)))
        .filter(|p| owning_mount(p, mounts) == Some(Path::new("/")))
        .filter(|p| !volumes.iter().any(|v| p.starts_with(&v.path)))
        .cloned()
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The regular files the processes `tree` hold open (absolute paths that still exist).
pub fn open_files(tree: &[i32]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for pid in tree {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if target.is_absolute()
                && !target.to_string_lossy().ends_with(" (deleted)")
                && fs::metadata(&target).is_ok_and(|m| m.is_file())
            {
                files.push(target);
            }
        }
    }
    files
}

/// Copies `paths` (files, or directories with their content) under `staging` at their own
/// paths, keeping modes, owners and times; how many files and bytes. A preserved path that does
/// not exist is skipped.
pub fn stage(paths: &[PathBuf], staging: &Path) -> io::Result<(u64, u64)> {
    let mut totals = (0, 0);
    for path in paths {
        let Ok(meta) = fs::symlink_metadata(path) else {
            continue;
        };
        let relative = path.strip_prefix("/").unwrap_or(path);
        copy_tree(path, &staging.join(relative), &meta, &mut totals)?;
    }
    Ok(totals)
}

fn copy_tree(
    from: &Path,
    to: &Path,
    meta: &fs::Metadata,
    totals: &mut (u64, u64),
) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    if meta.is_dir() {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            let meta = fs::symlink_metadata(entry.path())?;
            copy_tree(&entry.path(), &to.join(entry.file_name()), &meta, totals)?;
        }
    } else if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
        return Ok(());
    } else if meta.is_file() {
        totals.1 += fs::copy(from, to)?;
        totals.0 += 1;
    } else {
        return Ok(());
    }
    fs::set_permissions(to, fs::Permissions::from_mode(meta.mode()))?;
    let _ = std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()));
    Ok(())
}

/// Puts the root-fs files unpacked under `staged` in place at their paths (replacing what is
/// there); how many files.
pub fn place(staged: &Path) -> io::Result<u64> {
    fn walk(dir: &Path, root: &Path, placed: &mut u64) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let from = entry.path();
            let to = Path::new("/").join(from.strip_prefix(root).unwrap_or(&from));
            let meta = fs::symlink_metadata(&from)?;
            if meta.is_dir() {
                fs::create_dir_all(&to)?;
                walk(&from, root, placed)?;
            } else {
                if fs::symlink_metadata(&to).is_ok_and(|m| !m.is_dir()) {
                    fs::remove_file(&to)?;
                }
                if fs::rename(&from, &to).is_err() {
                    fs::copy(&from, &to)?;
                }
                *placed += 1;
            }
        }
        Ok(())
    }
    let mut placed = 0;
    if staged.is_dir() {
        walk(staged, staged, &mut placed)?;
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
1375 1290 0:112 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
1376 1375 0:115 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
1380 1375 8:1 /pods/uid/volumes/kubernetes.io~empty-dir/data /data rw,relatime - ext4 /dev/sda1 rw
1381 1375 8:1 /pods/uid/volumes/kubernetes.io~configmap/conf /etc/conf ro,relatime - ext4 /dev/sda1 rw
1382 1375 8:1 /x /srv/with\\040space rw,relatime - ext4 /dev/sda1 rw
";

    #[test]
    fn volumes_are_name_equals_path() {
        assert_eq!(
            parse_volumes("data=/data, cache=/var/cache/app").unwrap(),
            vec![
                Volume {
                    name: "data".into(),
                    path: "/data".into()
                },
                Volume {
                    name: "cache".into(),
                    path: "/var/cache/app".into()
                },
            ]
        );
        assert!(parse_volumes("").unwrap().is_empty());
        assert!(parse_volumes("data").unwrap_err().contains("name=/path"));
        assert!(parse_volumes("data=relative").is_err());
        assert!(parse_volumes("a/b=/x").is_err());
    }

    #[test]
    fn only_root_fs_files_outside_volumes_travel_as_files() {
        let mounts = mount_points(MOUNTINFO);
        assert!(mounts.contains(&PathBuf::from("/srv/with space")));
        let volumes = parse_volumes("data=/data").unwrap();
        let open: Vec<PathBuf> = [
            "/var/log/app.log",   // root fs: carried
            "/data/journal",      // in a carried volume: travels with it
            "/etc/conf/app.yaml", // a configMap: the destination's own
            "/proc/self/status",  // proc
            "/var/log/app.log",   // twice
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let preserve = vec![
            PathBuf::from("/workload-state.txt"),
            PathBuf::from("/../etc/passwd"),
        ];
        assert_eq!(
            rootfs_paths(&open, &preserve, &mounts, &volumes),
            vec![
                PathBuf::from("/var/log/app.log"),
                PathBuf::from("/workload-state.txt")
            ]
        );
    }

    #[test]
    fn staged_files_keep_their_paths_and_modes_and_are_put_back() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("state/app.log");
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, b"tick=1\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        let staging = tempfile::tempdir().unwrap();
        let (files, bytes) =
            stage(&[file.clone(), root.path().join("absent")], staging.path()).unwrap();
        assert_eq!((files, bytes), (1, 7));
        let staged = staging.path().join(file.strip_prefix("/").unwrap());
        assert_eq!(fs::read(&staged).unwrap(), b"tick=1\n");
        assert_eq!(fs::metadata(&staged).unwrap().mode() & 0o777, 0o640);
        // Put back over a file that changed since: the staged one wins.
        fs::write(&file, b"other").unwrap();
        assert_eq!(place(staging.path()).unwrap(), 1);
        assert_eq!(fs::read(&file).unwrap(), b"tick=1\n");
    }
}
