//! The migration archive: one tar stream that carries a pod's nested containers from one
//! sidecar to another (dind, pind), or a service's process tree from one `ums-ff` to another
//! (ff). Below both binaries: neither knows the other.
//!
//! # Format (version 2)
//!
//! ```text
//! ums-archive/manifest.json          first entry: what follows, and what made it
//! containers/<name>/criu/<file>      CRIU's image files of container <name>
//! containers/<name>/rootfs/<path>    the container's root-fs changes (Docker: its writable layer)
//! containers/<name>/engine/<file>    engine files needed to restore (Podman: config.dump,
//!                                    spec.dump, rootfs-diff.tar, ...)
//! ...                                (every container, in manifest order)
//! volumes/<volume>/<path>            the content of pod volume <volume> (version 2)
//! ...                                (every volume of the manifest's `volumes`)
//! images/<n>.tar                     an image the destination lacks, as `docker save` writes
//!                                    it (version 2; the manifest's `images`)
//! ums-archive/trailer.json           last entry: the SHA-256 of every entry above
//! ```
//!
//! - The manifest ([`Manifest`]) holds the format version, the engine and its version, the
//!   CRIU version, kernel and architecture of the source, each container's original
//!   Kubernetes spec, image and image ID, its checkpoint id and memory parts, and the list of
//!   entries with their sizes.
//! - Memory arrives as a list of parts per container (`memoryParts`); version 1 writes one
//!   part of kind `full` (all pages in the container's `criu/` directory). Later versions may
//!   add `lazy` parts served after the restore (CRIU lazy pages); a reader that finds a part
//!   kind it does not know refuses the archive.
//! - The trailer ([`Trailer`]) lists every entry with the SHA-256 of its content (regular
//!   files) or of a canonical description (`dir`, `symlink:<target>`, `whiteout`). The
//!   receiver hashes while it unpacks into a staging directory and compares at the trailer,
//!   before any restored process is started; a missing, extra or different entry refuses the
//!   whole archive.
//! - Entry paths are relative, made of normal components only; `..`, absolute paths, entries
//!   outside `containers/<name>/{criu,rootfs,engine}`, hard links and device files other than overlay
//!   whiteouts (character device 0:0) are refused. Nothing is ever written through a symlink.
//!   Symlinks in `criu/` and `engine/` are refused; in `rootfs/`, relative targets that climb out of the
//!   root fs are refused (absolute targets are resolved inside the container at run time).
//! - The whole stream may be zstd-compressed; the HTTP layer negotiates it
//!   (`Content-Encoding: zstd`).
//!
//! # Version rule
//!
//! `formatVersion` changes whenever a reader of the previous version would misread an archive
//! (a new entry kind, a new part kind, a changed layout). Readers refuse versions they do not
//! know; the source asks the destination which versions it reads (`GET /info`) before freezing
//! anything, and writes the lowest version that carries what it sends
//! ([`manifest::required_version`]): an archive without volumes is still version 1, which a
//! version-1 reader restores; one with volumes is version 2, which a version-1 reader refuses
//! by its version ("archive format version 2 is not supported"), before writing any entry.
//!
//! | version | adds |
//! |---|---|
//! | 1 | containers: CRIU images, root-fs changes, engine files; trailer of digests |
//! | 2 | `volumes` and `images` in the manifest, `volumes/<name>/` and `images/<n>.tar` entries |
//! | 3 | from Podman: its checkpoint's own files (CRIU images, the writable layer as `rootfs/`, `network.status` and `devshm-checkpoint.tar` as engine files) instead of its export tar; older destinations refuse it by its version |
//! | 4 | memory that follows the restore (`lazy` parts, post-copy) |
//! | 5 | from `ums-ff` (source kind `ff`): one container whose `criu/` is its service's process tree, dumped from inside the container, and whose `rootfs/` holds the root-fs files the service keeps (open files, preserved paths) at their paths; an engine's sidecar refuses it |

pub mod manifest;
pub mod pack;
pub mod source;
pub mod transfer;
pub mod unpack;

#[cfg(test)]
mod tests;

pub use source::{EngineInfo, EngineKind, TcpConnection};

pub use manifest::{
    required_version, version_for, ContainerManifest, EntrySummary, ImageManifest, Manifest,
    MemoryPart, Trailer, VolumeManifest, FORMAT_VERSION, LAZY_VERSION, READABLE_VERSIONS,
};

/// Path of the manifest entry.
pub const MANIFEST_PATH: &str = "ums-archive/manifest.json";
/// Path of the trailer entry.
pub const TRAILER_PATH: &str = "ums-archive/trailer.json";

/// Archive prefix of a container's CRIU images.
pub fn criu_prefix(container: &str) -> String {
    format!("containers/{container}/criu")
}

/// Archive prefix of a container's engine-specific restore files.
pub fn engine_prefix(container: &str) -> String {
    format!("containers/{container}/engine")
}

/// Archive prefix of a container's root-fs changes.
pub fn rootfs_prefix(container: &str) -> String {
    format!("containers/{container}/rootfs")
}

/// Archive directory of the images.
pub const IMAGES_PREFIX: &str = "images";

/// Archive path of the `index`th image.
pub fn image_path(index: usize) -> String {
    format!("{IMAGES_PREFIX}/{index}.tar")
}

/// Archive prefix of a pod volume's content.
pub fn volume_prefix(volume: &str) -> String {
    format!("volumes/{volume}")
}

/// Failure to write or read an archive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// Reading or writing the stream or a file failed.
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The stream is not a well-formed tar, or it ended early: the sender's fault, not ours.
    #[error("the archive is not a valid tar stream ({at}): {message}")]
    Malformed { at: String, message: String },
    /// The first entry is not the manifest, or it does not parse.
    #[error("archive has no valid manifest: {0}")]
    BadManifest(String),
    /// The archive's format version is not one this build reads.
    #[error("archive format version {found} is not supported (this build reads versions {READABLE_VERSIONS:?})")]
    UnsupportedVersion { found: u32 },
    /// An entry path escapes its directory or is not where entries may be.
    #[error("archive entry {path:?} refused: {reason}")]
    UnsafeEntry { path: String, reason: String },
    /// An entry's content does not match the trailer's digest.
    #[error("archive entry {path:?} is corrupt: SHA-256 {actual} does not match the trailer's {expected}")]
    DigestMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    /// The trailer is missing, or lists other entries than the archive holds.
    #[error("archive trailer does not match its entries: {0}")]
    BadTrailer(String),
}

impl ArchiveError {
    /// A read of the incoming tar stream failed.
    pub fn malformed(at: impl std::fmt::Display, source: std::io::Error) -> Self {
        ArchiveError::Malformed {
            at: at.to_string(),
            message: source.to_string(),
        }
    }

    pub fn io(action: &'static str, path: impl std::fmt::Display, source: std::io::Error) -> Self {
        ArchiveError::Io {
            action,
            path: path.to_string(),
            source,
        }
    }
}
