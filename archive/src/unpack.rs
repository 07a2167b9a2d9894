//! Reading an archive into a staging directory, checking every path and every digest.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::pack::{description_digest, EntryKind};
use super::{
    criu_prefix, engine_prefix, image_path, rootfs_prefix, volume_prefix, ArchiveError, Manifest,
    MemoryPart, Trailer, IMAGES_PREFIX, LAZY_VERSION, MANIFEST_PATH, READABLE_VERSIONS,
    TRAILER_PATH,
};

/// What was unpacked.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub manifest: Manifest,
    pub entries: usize,
    pub content_bytes: u64,
}

const MAX_JSON_ENTRY: u64 = 64 * 1024 * 1024;

fn read_json<T: serde::de::DeserializeOwned>(
    entry: &mut impl Read,
    size: u64,
    what: &str,
) -> Result<T, ArchiveError> {
    if size > MAX_JSON_ENTRY {
        return Err(ArchiveError::BadManifest(format!(
            "{what} is {size} bytes, more than the limit"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| ArchiveError::io("read", what, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ArchiveError::BadManifest(format!("{what}: {e}")))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

/// Checks a manifest's version, names and part kinds.
pub fn check_manifest(manifest: &Manifest) -> Result<(), ArchiveError> {
    if !READABLE_VERSIONS.contains(&manifest.format_version) {
        return Err(ArchiveError::UnsupportedVersion {
            found: manifest.format_version,
        });
    }
    if manifest.format_version < 2 && (!manifest.volumes.is_empty() || !manifest.images.is_empty())
    {
        return Err(ArchiveError::BadManifest(format!(
            "a version-{} archive cannot carry volumes or images (version 2 does)",
            manifest.format_version
        )));
    }
    for (index, image) in manifest.images.iter().enumerate() {
        if image.path != image_path(index) || image.image.is_empty() || image.image_id.is_empty() {
            return Err(ArchiveError::BadManifest(format!(
                "image {index} ({:?}) must be at {:?} with a reference and an ID",
                image.image,
                image_path(index)
            )));
        }
    }
    let mut seen = BTreeSet::new();
    for v in &manifest.volumes {
        if !valid_name(&v.name) || !seen.insert(v.name.as_str()) {
            return Err(ArchiveError::BadManifest(format!(
                "invalid or repeated volume name {:?}",
                v.name
            )));
        }
    }
    let lazy = manifest
        .containers
        .iter()
        .any(|c| c.memory_parts == [MemoryPart::Lazy]);
    for c in &manifest.containers {
        let readable = c.memory_parts == [MemoryPart::Full]
            || (c.memory_parts == [MemoryPart::Lazy] && manifest.format_version >= LAZY_VERSION);
        if !readable {
            return Err(ArchiveError::BadManifest(format!(
                "container {:?} has memory parts {:?}; this sidecar restores one full part, or one lazy part (version {LAZY_VERSION})",
                c.name, c.memory_parts
            )));
        }
        if lazy && manifest.containers.len() != 1 {
            return Err(ArchiveError::BadManifest(
                "a lazy (post-copy) archive holds one container".into(),
            ));
        }
        if !valid_name(&c.name) {
            return Err(ArchiveError::BadManifest(format!(
                "invalid container name {:?}",
                c.name
            )));
        }
    }
    Ok(())
}

/// Where an entry belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// CRIU images or engine files: plain files and directories only.
    Plain,
    /// A container's root-fs changes (links and whiteouts allowed).
    RootFs { root: String },
    /// A pod volume's content (links allowed); `rest` is the path inside the volume.
    Volume { name: String, root: String },
}

/// Where an entry may be.
fn check_path(path: &str, manifest: &Manifest) -> Result<Place, ArchiveError> {
    let refuse = |reason: &str| ArchiveError::UnsafeEntry {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if path.starts_with('/') {
        return Err(refuse("absolute path"));
    }
    if !Path::new(path)
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(refuse("path has '..', '.' or empty components"));
    }
    for c in &manifest.containers {
        let (criu, rootfs, engine) = (
            criu_prefix(&c.name),
            rootfs_prefix(&c.name),
            engine_prefix(&c.name),
        );
        if under(path, &criu) || under(path, &engine) {
            return Ok(Place::Plain);
        }
        if under(path, &rootfs) {
            return Ok(Place::RootFs { root: rootfs });
        }
    }
    if !manifest.images.is_empty()
        && (path == IMAGES_PREFIX || manifest.images.iter().any(|i| i.path == path))
    {
        return Ok(Place::Plain);
    }
    for v in &manifest.volumes {
        let root = volume_prefix(&v.name);
        if under(path, &root) {
            return Ok(Place::Volume {
                name: v.name.clone(),
                root,
            });
        }
    }
    Err(refuse(
        "not under containers/<name>/criu, rootfs or engine of a container in the manifest, nor under volumes/<name> of a volume in it, nor an image it lists",
    ))
}

fn under(path: &str, prefix: &str) -> bool {
    path == prefix || path.starts_with(&format!("{prefix}/"))
}

/// No component between `root` and `path` may be a symlink: writing through one could land
/// anywhere.
fn check_no_symlink_parents(
    root: &Path,
    relative: &Path,
    archive_path: &str,
) -> Result<(), ArchiveError> {
    let mut current = root.to_owned();
    let components: Vec<_> = relative.components().collect();
    for component in components.iter().take(components.len().saturating_sub(1)) {
        current.push(component);
        if let Ok(meta) = fs::symlink_metadata(&current) {
            if meta.file_type().is_symlink() {
                return Err(ArchiveError::UnsafeEntry {
                    path: archive_path.to_owned(),
                    reason: "a parent directory is a symlink".into(),
                });
            }
        }
    }
    Ok(())
}

/// A relative symlink target must stay inside the root fs or volume it is in.
fn check_link_target(archive_path: &str, target: &Path, place: &Place) -> Result<(), ArchiveError> {
    let refuse = |reason: &str| ArchiveError::UnsafeEntry {
        path: archive_path.to_owned(),
        reason: reason.to_owned(),
    };
    let root = match place {
        Place::RootFs { root } | Place::Volume { root, .. } => root,
        Place::Plain => return Err(refuse("symlinks are only allowed in a root fs or a volume")),
    };
    if archive_path == root {
        return Err(refuse(
            "the root of a root fs or a volume must be a directory",
        ));
    }
    if target.is_absolute() {
        // Resolved against the container's root at run time; never followed here.
        return Ok(());
    }
    let link_dir_depth = Path::new(archive_path)
        .strip_prefix(root)
        .map(|p| p.components().count().saturating_sub(1))
        .unwrap_or(0) as i64;
    let mut depth = link_dir_depth;
    for component in target.components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            _ => return Err(refuse("symlink target has an unexpected component")),
        }
        if depth < 0 {
            return Err(refuse("symlink points out of its root fs or volume"));
        }
    }
    Ok(())
}

/// Where each volume of the archive is written: an existing, empty directory per volume name.
pub type VolumeDirs = BTreeMap<String, PathBuf>;

/// Reads the whole archive from `reader` into `staging` (which must exist and be empty),
/// calling `on_manifest` as soon as the manifest is read (to refuse early, and to say where
/// each volume goes). Every entry is checked and hashed; the trailer must match exactly. On
/// error, the caller removes `staging` and the volume directories.
pub fn unpack<R: Read>(
    reader: R,
    staging: &Path,
    on_manifest: impl FnOnce(&Manifest) -> Result<VolumeDirs, ArchiveError>,
) -> Result<Unpacked, ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive
        .entries()
        .map_err(|e| ArchiveError::malformed("its start", e))?;

    let manifest: Manifest = {
        let mut first = entries
            .next()
            .ok_or_else(|| ArchiveError::BadManifest("archive is empty".into()))?
            .map_err(|e| ArchiveError::malformed("its first entry", e))?;
        let path = first
            .path()
            .map_err(|e| ArchiveError::malformed("the first entry's path", e))?
            .display()
            .to_string();
        if path != MANIFEST_PATH {
            return Err(ArchiveError::BadManifest(format!(
                "first entry is {path:?}, not {MANIFEST_PATH}"
            )));
        }
        let size = first.header().size().unwrap_or(0);
        read_json(&mut first, size, MANIFEST_PATH)?
    };
    check_manifest(&manifest)?;
    let volume_dirs = on_manifest(&manifest)?;
    if let Some(v) = manifest
        .volumes
        .iter()
        .find(|v| !volume_dirs.contains_key(&v.name))
    {
        return Err(ArchiveError::BadManifest(format!(
            "the receiver has no place for volume {:?}",
            v.name
        )));
    }

    let mut digests: Vec<(String, String)> = Vec::new();
    let mut content_bytes = 0u64;
    let mut trailer: Option<Trailer> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            ArchiveError::malformed(format!("the entry after {} entries", digests.len() + 1), e)
        })?;
        let path = entry
            .path()
            .map_err(|e| ArchiveError::malformed("an entry's path", e))?
            .to_str()
            .ok_or_else(|| ArchiveError::UnsafeEntry {
                path: "<non-UTF-8>".into(),
                reason: "path is not UTF-8".into(),
            })?
            .trim_end_matches('/')
            .to_owned();
        if trailer.is_some() {
            return Err(ArchiveError::BadTrailer(format!(
                "entry {path:?} after the trailer"
            )));
        }
        if path == TRAILER_PATH {
            let size = entry.header().size().unwrap_or(0);
            trailer = Some(read_json(&mut entry, size, TRAILER_PATH)?);
            continue;
        }
        let place = check_path(&path, &manifest)?;
        let (base, relative) = match &place {
            Place::Volume { name, root } => (
                volume_dirs[name].as_path(),
                Path::new(&path)
                    .strip_prefix(root)
                    .unwrap_or(Path::new(""))
                    .to_owned(),
            ),
            _ => (staging, PathBuf::from(&path)),
        };
        check_no_symlink_parents(base, &relative, &path)?;
        let destination = base.join(&relative);
        let header = entry.header().clone();
        if matches!(place, Place::Volume { .. })
            && relative.as_os_str().is_empty()
            && header.entry_type() != tar::EntryType::Directory
        {
            return Err(ArchiveError::UnsafeEntry {
                path,
                reason: "the root of a volume must be a directory".into(),
            });
        }
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let io = |action, e| ArchiveError::io(action, &path, e);
        let digest = match header.entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&destination).map_err(|e| io("create directory", e))?;
                fs::set_permissions(&destination, fs::Permissions::from_mode(mode))
                    .map_err(|e| io("set mode of", e))?;
                description_digest(&EntryKind::Dir)
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&destination)
                    .map_err(|e| io("create", e))?;
                let mut hasher = Sha256::new();
                let mut buffer = vec![0u8; 1 << 20];
                loop {
                    let n = entry.read(&mut buffer).map_err(|e| io("read", e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buffer[..n]);
                    file.write_all(&buffer[..n]).map_err(|e| io("write", e))?;
                    content_bytes += n as u64;
                }
                fs::set_permissions(&destination, fs::Permissions::from_mode(mode))
                    .map_err(|e| io("set mode of", e))?;
                hex::encode(hasher.finalize())
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| io("read link of", e))?
                    .ok_or_else(|| ArchiveError::UnsafeEntry {
                        path: path.clone(),
                        reason: "symlink without target".into(),
                    })?
                    .into_owned();
                check_link_target(&path, &target, &place)?;
                std::os::unix::fs::symlink(&target, &destination)
                    .map_err(|e| io("create symlink", e))?;
                description_digest(&EntryKind::Symlink(target))
            }
            tar::EntryType::Char
                if matches!(place, Place::RootFs { .. })
                    && header.device_major().ok().flatten() == Some(0)
                    && header.device_minor().ok().flatten() == Some(0) =>
            {
                nix::sys::stat::mknod(
                    &destination,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                    0,
                )
                .map_err(|e| io("create whiteout", std::io::Error::from(e)))?;
                description_digest(&EntryKind::Whiteout)
            }
            other => {
                return Err(ArchiveError::UnsafeEntry {
                    path,
                    reason: format!("entry type {other:?} is not allowed"),
                })
            }
        };
        if let (Some(uid), Some(gid)) = (header.uid().ok(), header.gid().ok()) {
            let _ = std::os::unix::fs::lchown(
                &destination,
                u32::try_from(uid).ok(),
                u32::try_from(gid).ok(),
            );
        }
        digests.push((path, digest));
    }

    let trailer = trailer.ok_or_else(|| {
        ArchiveError::BadTrailer("the archive ends without a trailer (truncated?)".into())
    })?;
    verify(&manifest, &digests, &trailer)?;
    Ok(Unpacked {
        manifest,
        entries: digests.len(),
        content_bytes,
    })
}

fn verify(
    manifest: &Manifest,
    digests: &[(String, String)],
    trailer: &Trailer,
) -> Result<(), ArchiveError> {
    let listed: BTreeSet<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
    let seen: BTreeSet<&str> = digests.iter().map(|(p, _)| p.as_str()).collect();
    if listed != seen {
        let missing: Vec<_> = listed.difference(&seen).take(5).collect();
        let extra: Vec<_> = seen.difference(&listed).take(5).collect();
        return Err(ArchiveError::BadTrailer(format!(
            "entries differ from the manifest (missing {missing:?}, unexpected {extra:?})"
        )));
    }
    if trailer.digests.len() != digests.len() {
        return Err(ArchiveError::BadTrailer(format!(
            "trailer lists {} entries, the archive holds {}",
            trailer.digests.len(),
            digests.len()
        )));
    }
    for ((path, actual), (trailer_path, expected)) in digests.iter().zip(&trailer.digests) {
        if path != trailer_path {
            return Err(ArchiveError::BadTrailer(format!(
                "trailer lists {trailer_path:?} where the archive has {path:?}"
            )));
        }
        if actual != expected {
            return Err(ArchiveError::DigestMismatch {
                path: path.clone(),
                expected: expected.clone(),
                actual: actual.clone(),
            });
        }
    }
    Ok(())
}
