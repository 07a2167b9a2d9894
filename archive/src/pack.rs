//! Writing an archive: plan the entries (so the manifest can list them), then stream them.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{ArchiveError, EntrySummary, Manifest, Trailer, MANIFEST_PATH, TRAILER_PATH};

/// A directory to put into the archive under `prefix`.
#[derive(Debug, Clone)]
pub struct PackSource {
    pub prefix: String,
    pub dir: PathBuf,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink(PathBuf),
    /// An overlay whiteout (character device 0:0): a file the container deleted.
    Whiteout,
}

/// An entry to write: where it comes from and where it goes.
#[derive(Debug, Clone)]
pub struct PlannedEntry {
    pub archive_path: String,
    pub source: PathBuf,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

/// Walks the sources (sorted, depth first, directories before their content).
pub fn plan(sources: &[PackSource]) -> Result<Vec<PlannedEntry>, ArchiveError> {
    let mut entries = Vec::new();
    for source in sources {
        match planned(&source.prefix, &source.dir)? {
            Some(root) if root.kind == EntryKind::Dir => entries.push(root),
            _ => {
                return Err(ArchiveError::UnsafeEntry {
                    path: source.prefix.clone(),
                    reason: format!("{} is not a directory", source.dir.display()),
                })
            }
        }
        walk(&source.dir, &source.prefix, &mut entries)?;
    }
    Ok(entries)
}

/// The entry for `path`; `None` for a unix socket, which is not carried (a process that
/// listens on one binds it again when CRIU restores it).
fn planned(archive_path: &str, path: &Path) -> Result<Option<PlannedEntry>, ArchiveError> {
    let meta =
        fs::symlink_metadata(path).map_err(|e| ArchiveError::io("stat", path.display(), e))?;
    let file_type = meta.file_type();
    let kind = if file_type.is_dir() {
        EntryKind::Dir
    } else if file_type.is_file() {
        EntryKind::File
    } else if file_type.is_symlink() {
        EntryKind::Symlink(
            fs::read_link(path).map_err(|e| ArchiveError::io("read link", path.display(), e))?,
        )
    } else if file_type.is_char_device() && meta.rdev() == 0 {
        EntryKind::Whiteout
    } else if file_type.is_socket() {
        tracing::debug!(path = %path.display(), "unix socket not carried");
        return Ok(None);
    } else {
        return Err(ArchiveError::UnsafeEntry {
            path: archive_path.to_owned(),
            reason: "fifos and device files cannot be migrated".into(),
        });
    };
    Ok(Some(PlannedEntry {
        archive_path: archive_path.to_owned(),
        source: path.to_owned(),
        size: if kind == EntryKind::File {
            meta.len()
        } else {
            0
        },
        kind,
        mode: meta.mode() & 0o7777,
        uid: u64::from(meta.uid()),
        gid: u64::from(meta.gid()),
        mtime: u64::try_from(meta.mtime()).unwrap_or(0),
    }))
}

fn walk(dir: &Path, prefix: &str, entries: &mut Vec<PlannedEntry>) -> Result<(), ArchiveError> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(|e| ArchiveError::io("read directory", dir.display(), e))?
        .collect::<Result<_, _>>()
        .map_err(|e| ArchiveError::io("read directory", dir.display(), e))?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let name = child.file_name();
        let name = name.to_str().ok_or_else(|| ArchiveError::UnsafeEntry {
            path: child.path().display().to_string(),
            reason: "file name is not UTF-8".into(),
        })?;
        let archive_path = format!("{prefix}/{name}");
        let Some(entry) = planned(&archive_path, &child.path())? else {
            continue;
        };
        let is_dir = entry.kind == EntryKind::Dir;
        entries.push(entry);
        if is_dir {
            walk(&child.path(), &archive_path, entries)?;
        }
    }
    Ok(())
}

/// The manifest's entry list for a plan.
pub fn summaries(plan: &[PlannedEntry]) -> Vec<EntrySummary> {
    plan.iter()
        .map(|e| EntrySummary {
            path: e.archive_path.clone(),
            size: e.size,
        })
        .collect()
}

/// The digest of a non-file entry: a canonical description, so a changed link target or a
/// file turned into a directory is caught like a changed byte.
pub fn description_digest(kind: &EntryKind) -> String {
    let description = match kind {
        EntryKind::Dir => "dir".to_owned(),
        EntryKind::Whiteout => "whiteout".to_owned(),
        EntryKind::Symlink(target) => format!("symlink:{}", target.display()),
        EntryKind::File => "file".to_owned(),
    };
    hex::encode(Sha256::digest(description.as_bytes()))
}

/// Counts what went through a writer.
struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn header_for(entry: &PlannedEntry) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_mode(entry.mode);
    header.set_uid(entry.uid);
    header.set_gid(entry.gid);
    header.set_mtime(entry.mtime);
    header.set_size(entry.size);
    header.set_entry_type(match entry.kind {
        EntryKind::Dir => tar::EntryType::Directory,
        EntryKind::File => tar::EntryType::Regular,
        EntryKind::Symlink(_) => tar::EntryType::Symlink,
        EntryKind::Whiteout => tar::EntryType::Char,
    });
    if entry.kind == EntryKind::Whiteout {
        // Device 0:0 marks a whiteout; set explicitly, whatever the header defaults are.
        let _ = header.set_device_major(0);
        let _ = header.set_device_minor(0);
    }
    header
}

fn json_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &str,
    value: &impl serde::Serialize,
) -> Result<(), ArchiveError> {
    let bytes =
        serde_json::to_vec_pretty(value).map_err(|e| ArchiveError::BadManifest(e.to_string()))?;
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(bytes.len() as u64);
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, path, bytes.as_slice())
        .map_err(|e| ArchiveError::io("write", path, e))
}

/// Writes manifest, entries and trailer into `writer`. Returns the bytes written.
pub fn write_archive<W: Write>(
    writer: W,
    manifest: &Manifest,
    plan: &[PlannedEntry],
) -> Result<u64, ArchiveError> {
    let mut builder = tar::Builder::new(CountingWriter {
        inner: writer,
        written: 0,
    });
    builder.mode(tar::HeaderMode::Complete);
    json_entry(&mut builder, MANIFEST_PATH, manifest)?;
    let mut digests = Vec::with_capacity(plan.len());
    for entry in plan {
        let mut header = header_for(entry);
        let path = entry.archive_path.as_str();
        let digest = match &entry.kind {
            EntryKind::File => {
                let file = fs::File::open(&entry.source)
                    .map_err(|e| ArchiveError::io("open", entry.source.display(), e))?;
                // The size is fixed in the manifest: a file that changed since is an error,
                // not a silently different archive.
                let mut reader = HashingReader {
                    inner: file.take(entry.size),
                    hasher: Sha256::new(),
                };
                builder
                    .append_data(&mut header, path, &mut reader)
                    .map_err(|e| ArchiveError::io("write", path, e))?;
                hex::encode(reader.hasher.finalize())
            }
            EntryKind::Symlink(target) => {
                builder
                    .append_link(&mut header, path, target)
                    .map_err(|e| ArchiveError::io("write", path, e))?;
                description_digest(&entry.kind)
            }
            EntryKind::Dir | EntryKind::Whiteout => {
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .map_err(|e| ArchiveError::io("write", path, e))?;
                description_digest(&entry.kind)
            }
        };
        digests.push((entry.archive_path.clone(), digest));
    }
    json_entry(&mut builder, TRAILER_PATH, &Trailer { digests })?;
    let mut counting = builder
        .into_inner()
        .map_err(|e| ArchiveError::io("finish", "archive", e))?;
    counting
        .flush()
        .map_err(|e| ArchiveError::io("flush", "archive", e))?;
    Ok(counting.written)
}
