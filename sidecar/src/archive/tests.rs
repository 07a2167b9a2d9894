//! Archive round trips and every refusal, on real files.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::pack::{plan, summaries, write_archive, PackSource};
use super::unpack::unpack;
use super::*;
use crate::engine::{EngineInfo, EngineKind};

fn engine_info() -> EngineInfo {
    EngineInfo {
        kind: EngineKind::Docker,
        version: "20.10".into(),
        api_version: "1.41".into(),
        criu_version: "4.1.1".into(),
        kernel: "6.18".into(),
        architecture: "x86_64".into(),
    }
}

fn manifest(names: &[&str], entries: Vec<EntrySummary>) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        migration_id: "m-test".into(),
        created_unix_ms: 0,
        source: engine_info(),
        containers: names
            .iter()
            .map(|n| ContainerManifest {
                name: (*n).into(),
                spec: serde_json::from_value(serde_json::json!({"name": n, "image": "img"}))
                    .unwrap(),
                image: "img".into(),
                image_id: "sha256:1".into(),
                checkpoint_id: "cp".into(),
                memory_parts: vec![MemoryPart::Full],
                criu_bytes: 0,
                rootfs_bytes: 0,
                engine_bytes: 0,
                was_running: true,
                tcp_connections: vec![],
            })
            .collect(),
        entries,
    }
}

/// A source tree: CRIU images and a root fs with a file, a directory, links and a whiteout.
fn source_tree(root: &Path) -> Vec<PackSource> {
    let criu = root.join("criu");
    let rootfs = root.join("rootfs");
    fs::create_dir_all(&criu).unwrap();
    fs::create_dir_all(rootfs.join("etc/app")).unwrap();
    fs::write(criu.join("pages-1.img"), vec![7u8; 300_000]).unwrap();
    fs::write(criu.join("core-1.img"), b"core").unwrap();
    fs::write(rootfs.join("workload-state.txt"), b"state\n").unwrap();
    fs::write(rootfs.join("etc/app/config"), b"x=1\n").unwrap();
    symlink("../app/config", rootfs.join("etc/app/link-relative")).unwrap();
    symlink("/usr/bin/env", rootfs.join("etc/absolute-link")).unwrap();
    nix::sys::stat::mknod(
        &rootfs.join("deleted-file"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        0,
    )
    .unwrap();
    vec![
        PackSource {
            prefix: criu_prefix("app"),
            dir: criu,
        },
        PackSource {
            prefix: rootfs_prefix("app"),
            dir: rootfs,
        },
    ]
}

fn packed(root: &Path) -> Vec<u8> {
    let sources = source_tree(root);
    let plan = plan(&sources).unwrap();
    let manifest = manifest(&["app"], summaries(&plan));
    let mut out = Vec::new();
    write_archive(&mut out, &manifest, &plan).unwrap();
    out
}

#[test]
fn round_trip_keeps_files_links_and_whiteouts() {
    let src = tempfile::tempdir().unwrap();
    let bytes = packed(src.path());
    let dst = tempfile::tempdir().unwrap();
    let unpacked = unpack(bytes.as_slice(), dst.path(), |_| Ok(())).unwrap();
    assert_eq!(unpacked.manifest.containers[0].name, "app");
    let base = dst.path().join("containers/app");
    assert_eq!(
        fs::read(base.join("criu/pages-1.img")).unwrap(),
        vec![7u8; 300_000]
    );
    assert_eq!(
        fs::read(base.join("rootfs/workload-state.txt")).unwrap(),
        b"state\n"
    );
    assert_eq!(
        fs::read_link(base.join("rootfs/etc/app/link-relative")).unwrap(),
        Path::new("../app/config")
    );
    assert_eq!(
        fs::read_link(base.join("rootfs/etc/absolute-link")).unwrap(),
        Path::new("/usr/bin/env")
    );
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let whiteout = fs::symlink_metadata(base.join("rootfs/deleted-file")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
}

#[test]
fn a_flipped_byte_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let mut bytes = packed(src.path());
    // Flip one byte inside pages-1.img's content (a run of 7s).
    let at = bytes
        .windows(64)
        .position(|w| w.iter().all(|b| *b == 7))
        .unwrap()
        + 1000;
    bytes[at] ^= 0x01;
    let dst = tempfile::tempdir().unwrap();
    let err = unpack(bytes.as_slice(), dst.path(), |_| Ok(())).unwrap_err();
    assert!(
        matches!(err, ArchiveError::DigestMismatch { ref path, .. } if path.ends_with("pages-1.img")),
        "{err}"
    );
}

#[test]
fn a_truncated_archive_is_refused() {
    let src = tempfile::tempdir().unwrap();
    let bytes = packed(src.path());
    let cut = &bytes[..bytes.len() / 2];
    let dst = tempfile::tempdir().unwrap();
    assert!(unpack(cut, dst.path(), |_| Ok(())).is_err());
}

/// An archive built by hand, with raw header names (tar's own builder refuses `..`).
fn raw_archive(
    manifest: &Manifest,
    entries: &[(&str, tar::EntryType, &[u8], Option<&str>)],
) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut builder = tar::Builder::new(&mut out);
        let json = serde_json::to_vec(manifest).unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, MANIFEST_PATH, json.as_slice())
            .unwrap();
        for (path, kind, data, link) in entries {
            let mut header = tar::Header::new_old();
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                let linkname = &mut header.as_old_mut().linkname;
                linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.finish().unwrap();
    }
    out
}

fn refused(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> ArchiveError {
    let summaries = entries
        .iter()
        .map(|(p, _, d, _)| EntrySummary {
            path: (*p).into(),
            size: d.len() as u64,
        })
        .collect();
    let bytes = raw_archive(&manifest(&["app"], summaries), entries);
    let dst = tempfile::tempdir().unwrap();
    let outside = dst.path().join("outside");
    let staging = dst.path().join("staging");
    fs::create_dir_all(&staging).unwrap();
    let err = unpack(bytes.as_slice(), &staging, |_| Ok(())).unwrap_err();
    assert!(
        !outside.exists(),
        "nothing may be written outside the staging directory"
    );
    err
}

#[test]
fn path_traversal_is_refused() {
    let err = refused(&[(
        "containers/app/rootfs/../../../outside",
        tar::EntryType::Regular,
        b"x",
        None,
    )]);
    assert!(matches!(err, ArchiveError::UnsafeEntry { .. }), "{err}");
    let err = refused(&[("/tmp/outside", tar::EntryType::Regular, b"x", None)]);
    assert!(matches!(err, ArchiveError::UnsafeEntry { .. }), "{err}");
    let err = refused(&[(
        "containers/other/rootfs/x",
        tar::EntryType::Regular,
        b"x",
        None,
    )]);
    assert!(matches!(err, ArchiveError::UnsafeEntry { .. }), "{err}");
}

#[test]
fn links_pointing_out_are_refused() {
    let err = refused(&[
        (
            "containers/app/rootfs",
            tar::EntryType::Directory,
            b"",
            None,
        ),
        (
            "containers/app/rootfs/escape",
            tar::EntryType::Symlink,
            b"",
            Some("../../../outside"),
        ),
    ]);
    assert!(matches!(err, ArchiveError::UnsafeEntry { .. }), "{err}");
    // Writing through an (allowed, absolute) symlink is refused too.
    let err = refused(&[
        (
            "containers/app/rootfs",
            tar::EntryType::Directory,
            b"",
            None,
        ),
        (
            "containers/app/rootfs/etc",
            tar::EntryType::Symlink,
            b"",
            Some("/etc"),
        ),
        (
            "containers/app/rootfs/etc/passwd",
            tar::EntryType::Regular,
            b"root::0:0",
            None,
        ),
    ]);
    assert!(matches!(err, ArchiveError::UnsafeEntry { .. }), "{err}");
    let err = refused(&[
        ("containers/app/criu", tar::EntryType::Directory, b"", None),
        (
            "containers/app/criu/pages-1.img",
            tar::EntryType::Symlink,
            b"",
            Some("/etc/shadow"),
        ),
    ]);
    assert!(matches!(err, ArchiveError::UnsafeEntry { .. }), "{err}");
    let err = refused(&[(
        "containers/app/rootfs/hard",
        tar::EntryType::Link,
        b"",
        Some("containers/app/rootfs/x"),
    )]);
    assert!(matches!(err, ArchiveError::UnsafeEntry { .. }), "{err}");
}

#[test]
fn missing_trailer_and_unknown_version_are_refused() {
    let entries: &[(&str, tar::EntryType, &[u8], Option<&str>)] =
        &[("containers/app/criu", tar::EntryType::Directory, b"", None)];
    let summaries = vec![EntrySummary {
        path: "containers/app/criu".into(),
        size: 0,
    }];
    let bytes = raw_archive(&manifest(&["app"], summaries.clone()), entries);
    let dst = tempfile::tempdir().unwrap();
    assert!(matches!(
        unpack(bytes.as_slice(), dst.path(), |_| Ok(())).unwrap_err(),
        ArchiveError::BadTrailer(_)
    ));
    let mut future = manifest(&["app"], summaries);
    future.format_version = FORMAT_VERSION + 1;
    let bytes = raw_archive(&future, entries);
    let dst = tempfile::tempdir().unwrap();
    assert!(matches!(
        unpack(bytes.as_slice(), dst.path(), |_| Ok(())).unwrap_err(),
        ArchiveError::UnsupportedVersion { .. }
    ));
    let mut out = Vec::new();
    out.write_all(b"definitely not a tar stream").unwrap();
    assert!(unpack(out.as_slice(), dst.path(), |_| Ok(())).is_err());
}

#[test]
fn a_body_that_is_not_a_tar_is_the_senders_error() {
    let dst = tempfile::tempdir().unwrap();
    let garbage = vec![b'x'; 2048];
    let err = unpack(garbage.as_slice(), dst.path(), |_| Ok(())).unwrap_err();
    assert!(
        matches!(err, ArchiveError::Malformed { .. }),
        "a malformed stream is the sender's fault: {err:?}"
    );
    let api = crate::error::ApiError::from(err);
    assert_eq!(api.status, axum::http::StatusCode::BAD_REQUEST);
}
