//! Archive round trips and every refusal, on real files.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::pack::{plan, summaries, write_archive, PackSource};
use super::unpack::unpack;
use super::*;
use crate::{EngineInfo, EngineKind};

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
        volumes: vec![],
        images: vec![],
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
    let unpacked = unpack(bytes.as_slice(), dst.path(), |_| Ok(Default::default())).unwrap();
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
    let err = unpack(bytes.as_slice(), dst.path(), |_| Ok(Default::default())).unwrap_err();
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
    assert!(unpack(cut, dst.path(), |_| Ok(Default::default())).is_err());
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

/// A raw entry: path, type, content, link target.
type RawEntry<'a> = (&'a str, tar::EntryType, &'a [u8], Option<&'a str>);

/// The manifest's summaries of raw entries (sizes as the entries claim them).
fn summaries_of(entries: &[RawEntry]) -> Vec<EntrySummary> {
    entries
        .iter()
        .map(|(p, _, d, _)| EntrySummary {
            path: (*p).into(),
            size: d.len() as u64,
        })
        .collect()
}

fn refused(entries: &[RawEntry]) -> ArchiveError {
    let bytes = raw_archive(&manifest(&["app"], summaries_of(entries)), entries);
    let dst = tempfile::tempdir().unwrap();
    let outside = dst.path().join("outside");
    let staging = dst.path().join("staging");
    fs::create_dir_all(&staging).unwrap();
    let err = unpack(bytes.as_slice(), &staging, |_| Ok(Default::default())).unwrap_err();
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
        unpack(bytes.as_slice(), dst.path(), |_| Ok(Default::default())).unwrap_err(),
        ArchiveError::BadTrailer(_)
    ));
    let mut future = manifest(&["app"], summaries);
    future.format_version = FORMAT_VERSION + 1;
    let bytes = raw_archive(&future, entries);
    let dst = tempfile::tempdir().unwrap();
    assert!(matches!(
        unpack(bytes.as_slice(), dst.path(), |_| Ok(Default::default())).unwrap_err(),
        ArchiveError::UnsupportedVersion { .. }
    ));
    let mut out = Vec::new();
    out.write_all(b"definitely not a tar stream").unwrap();
    assert!(unpack(out.as_slice(), dst.path(), |_| Ok(Default::default())).is_err());
}

#[test]
fn a_body_that_is_not_a_tar_is_the_senders_error() {
    let dst = tempfile::tempdir().unwrap();
    let garbage = vec![b'x'; 2048];
    let err = unpack(garbage.as_slice(), dst.path(), |_| Ok(Default::default())).unwrap_err();
    assert!(
        matches!(err, ArchiveError::Malformed { .. }),
        "a malformed stream is the sender's fault: {err:?}"
    );
}

/// A volume with a file, a nested directory, a relative link and a unix socket.
fn volume_tree(root: &Path) -> PackSource {
    let data = root.join("data");
    fs::create_dir_all(data.join("db/wal")).unwrap();
    fs::write(data.join("db/wal/000001.log"), vec![3u8; 70_000]).unwrap();
    fs::write(data.join("journal"), b"tick=1\ntick=2\n").unwrap();
    symlink("db/wal/000001.log", data.join("current")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(data.join("app.sock")).unwrap();
    PackSource {
        prefix: volume_prefix("data"),
        dir: data,
    }
}

fn packed_with_volume(root: &Path) -> (Manifest, Vec<u8>) {
    let mut sources = source_tree(root);
    sources.push(volume_tree(root));
    let plan = plan(&sources).unwrap();
    let mut manifest = manifest(&["app"], summaries(&plan));
    manifest.volumes = vec![VolumeManifest {
        name: "data".into(),
        kind: "emptyDir".into(),
        bytes: 70_014,
        entries: 6,
    }];
    manifest.format_version = required_version(&manifest);
    let mut out = Vec::new();
    write_archive(&mut out, &manifest, &plan).unwrap();
    (manifest, out)
}

#[test]
fn a_volume_arrives_in_the_directory_the_receiver_names() {
    let src = tempfile::tempdir().unwrap();
    let (manifest, bytes) = packed_with_volume(src.path());
    assert_eq!(manifest.format_version, 2);
    assert!(
        !manifest
            .entries
            .iter()
            .any(|e| e.path.ends_with("app.sock")),
        "a unix socket is not carried"
    );
    let dst = tempfile::tempdir().unwrap();
    let staging = dst.path().join("staging");
    let volume = dst.path().join("volume-incoming");
    fs::create_dir_all(&staging).unwrap();
    fs::create_dir_all(&volume).unwrap();
    let unpacked = unpack(bytes.as_slice(), &staging, |m| {
        assert_eq!(m.volumes[0].name, "data");
        Ok([("data".to_owned(), volume.clone())].into())
    })
    .unwrap();
    assert_eq!(unpacked.manifest.volumes.len(), 1);
    assert_eq!(
        fs::read(volume.join("db/wal/000001.log")).unwrap(),
        vec![3u8; 70_000]
    );
    assert_eq!(
        fs::read(volume.join("journal")).unwrap(),
        b"tick=1\ntick=2\n"
    );
    assert_eq!(
        fs::read_link(volume.join("current")).unwrap(),
        Path::new("db/wal/000001.log")
    );
    assert!(
        !staging.join("volumes").exists(),
        "volume content goes to the volume, not to staging"
    );

    // A receiver that has no place for the volume refuses it before writing anything.
    let dst = tempfile::tempdir().unwrap();
    let err = unpack(bytes.as_slice(), dst.path(), |_| Ok(Default::default())).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::BadManifest(m) if m.contains("\"data\"")),
        "{err}"
    );
}

#[test]
fn an_archive_without_volumes_stays_version_1_and_version_1_cannot_carry_volumes() {
    let src = tempfile::tempdir().unwrap();
    let sources = source_tree(src.path());
    let plan = plan(&sources).unwrap();
    let mut v1 = manifest(&["app"], summaries(&plan));
    v1.format_version = required_version(&v1);
    assert_eq!(v1.format_version, 1);
    let mut out = Vec::new();
    write_archive(&mut out, &v1, &plan).unwrap();
    let dst = tempfile::tempdir().unwrap();
    unpack(out.as_slice(), dst.path(), |_| Ok(Default::default())).unwrap();

    let other = tempfile::tempdir().unwrap();
    let (mut manifest, _) = packed_with_volume(other.path());
    manifest.format_version = 1;
    let err = unpack::check_manifest(&manifest).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::BadManifest(m) if m.contains("version 2")),
        "{err}"
    );
}

fn refused_in_volume(entries: &[RawEntry]) -> ArchiveError {
    let mut manifest = manifest(&["app"], summaries_of(entries));
    manifest.volumes = vec![VolumeManifest {
        name: "data".into(),
        kind: "emptyDir".into(),
        bytes: 0,
        entries: 0,
    }];
    manifest.format_version = 2;
    let bytes = raw_archive(&manifest, entries);
    let dst = tempfile::tempdir().unwrap();
    let staging = dst.path().join("staging");
    let volume = dst.path().join("volume/in");
    fs::create_dir_all(&staging).unwrap();
    fs::create_dir_all(&volume).unwrap();
    let err = unpack(bytes.as_slice(), &staging, |_| {
        Ok([("data".to_owned(), volume.clone())].into())
    })
    .unwrap_err();
    assert!(
        !dst.path().join("outside").exists() && !dst.path().join("volume/outside").exists(),
        "nothing may be written outside the volume's directory"
    );
    err
}

#[test]
fn volume_entries_that_escape_or_are_not_files_are_refused() {
    let dir = ("volumes/data", tar::EntryType::Directory, &b""[..], None);
    for (entries, what) in [
        (
            vec![
                dir,
                (
                    "volumes/data/escape",
                    tar::EntryType::Symlink,
                    &b""[..],
                    Some("../outside"),
                ),
            ],
            "a link out of the volume",
        ),
        (
            vec![
                dir,
                (
                    "volumes/data/../outside",
                    tar::EntryType::Regular,
                    b"x",
                    None,
                ),
            ],
            "a path out of the volume",
        ),
        (
            vec![dir, ("volumes/data/white", tar::EntryType::Char, b"", None)],
            "a whiteout in a volume",
        ),
        (
            vec![("volumes/data", tar::EntryType::Regular, b"x", None)],
            "a volume root that is a file",
        ),
        (
            vec![("volumes/other/x", tar::EntryType::Regular, b"x", None)],
            "a volume not in the manifest",
        ),
    ] {
        let err = refused_in_volume(&entries);
        assert!(
            matches!(err, ArchiveError::UnsafeEntry { .. }),
            "{what}: {err}"
        );
    }
}

#[test]
fn images_are_carried_only_where_the_manifest_lists_them() {
    let dir = ("images", tar::EntryType::Directory, &b""[..], None);
    let image = (
        "images/0.tar",
        tar::EntryType::Regular,
        &b"saved image"[..],
        None,
    );
    let summaries = vec![
        EntrySummary {
            path: "images".into(),
            size: 0,
        },
        EntrySummary {
            path: "images/0.tar".into(),
            size: 11,
        },
    ];
    let mut with_image = manifest(&["app"], summaries.clone());
    with_image.images = vec![ImageManifest {
        image: "reg/app:1".into(),
        image_id: "sha256:1".into(),
        path: image_path(0),
        bytes: 11,
    }];
    with_image.format_version = required_version(&with_image);
    assert_eq!(with_image.format_version, 2);
    // Accepted as far as the trailer (this raw archive has none): the entry itself is fine.
    let dst = tempfile::tempdir().unwrap();
    let err = unpack(
        raw_archive(&with_image, &[dir, image]).as_slice(),
        dst.path(),
        |_| Ok(Default::default()),
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::BadTrailer(_)), "{err}");
    assert_eq!(
        fs::read(dst.path().join("images/0.tar")).unwrap(),
        b"saved image"
    );
    // Not listed: refused.
    let err = refused(&[dir, image]);
    assert!(matches!(err, ArchiveError::UnsafeEntry { .. }), "{err}");
    // Listed at another path: the manifest is refused.
    with_image.images[0].path = "images/../x".into();
    let err = unpack::check_manifest(&with_image).unwrap_err();
    assert!(matches!(err, ArchiveError::BadManifest(_)), "{err}");
}
