//! Putting staged checkpoint files where an engine restores them from: renames where they
//! share a mount, a copy only where they do not (Podman bind-mounts its overlay directory onto
//! itself, so a rename from the staging directory into a writable layer fails with EXDEV).

use std::path::Path;

/// Moves a staged directory to `target` (same file system: a rename).
pub fn move_into(staged: &Path, target: &Path) -> std::io::Result<()> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if target.exists() {
        std::fs::remove_dir_all(target)?;
    }
    rename_or_copy(staged, target)
}

/// Copies the files of the flat directory `from` (CRIU's images) into `to`, which exists.
pub fn copy_files(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Renames `from` to `to`, or copies it where they are on different mounts.
fn rename_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => copy_tree(from, to),
        other => other,
    }
}

/// Copies `from` (a directory, file, symlink or device file such as an overlay whiteout) to
/// `to` through a tar stream: modes, owners, symlinks and device files kept.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let name = to
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("no file name in {}", to.display())))?
        .to_owned();
    let parent = to
        .parent()
        .ok_or_else(|| std::io::Error::other(format!("no parent of {}", to.display())))?
        .to_owned();
    let (reader, writer) = std::io::pipe()?;
    let source = from.to_owned();
    let packer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut tar = tar::Builder::new(writer);
        tar.follow_symlinks(false);
        if std::fs::symlink_metadata(&source)?.is_dir() {
            tar.append_dir_all(&name, &source)?;
        } else {
            tar.append_path_with_name(&source, &name)?;
        }
        tar.into_inner().map(drop)
    });
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    let unpacked = archive.unpack(&parent);
    // Unblock the packer if the unpacking stopped early.
    drop(archive);
    let packed = packer
        .join()
        .map_err(|_| std::io::Error::other("the copying thread panicked"))?;
    unpacked.and(packed)
}

/// Moves the staged root-fs changes into the container's writable layer, entry by entry.
pub fn merge_into(staged: &Path, target: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    for entry in std::fs::read_dir(staged)? {
        let entry = entry?;
        let to = target.join(entry.file_name());
        let from_is_dir = entry.file_type()?.is_dir();
        match std::fs::symlink_metadata(&to) {
            Ok(meta) if meta.is_dir() && from_is_dir => merge_into(&entry.path(), &to)?,
            Ok(meta) => {
                if meta.is_dir() {
                    std::fs::remove_dir_all(&to)?;
                } else {
                    std::fs::remove_file(&to)?;
                }
                rename_or_copy(&entry.path(), &to)?;
            }
            Err(_) => rename_or_copy(&entry.path(), &to)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_tree_keeps_modes_symlinks_and_merges() {
        let base = std::env::temp_dir().join(format!("ums-files-{}", std::process::id()));
        let from = base.join("from");
        let to = base.join("to");
        std::fs::create_dir_all(from.join("etc/sub")).unwrap();
        std::fs::write(from.join("etc/sub/file"), b"changed").unwrap();
        std::os::unix::fs::symlink("sub/file", from.join("etc/link")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            from.join("etc/sub/file"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::create_dir_all(to.join("etc")).unwrap();
        std::fs::write(to.join("etc/kept"), b"kept").unwrap();
        std::fs::write(to.join("etc/link"), b"replaced by the symlink").unwrap();
        copy_tree(&from.join("etc"), &to.join("etc")).unwrap();
        assert_eq!(std::fs::read(to.join("etc/sub/file")).unwrap(), b"changed");
        assert_eq!(std::fs::read(to.join("etc/kept")).unwrap(), b"kept");
        assert_eq!(
            std::fs::read_link(to.join("etc/link")).unwrap(),
            Path::new("sub/file")
        );
        let mode = std::fs::metadata(to.join("etc/sub/file"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
