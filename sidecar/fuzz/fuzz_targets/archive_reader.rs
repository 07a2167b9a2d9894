//! The archive reader on arbitrary bytes, as `POST /restore` gets them: it must refuse with an
//! error, never panic, never write outside its staging directory and the volume directories
//! it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ums_sidecar::archive::unpack::unpack;

fuzz_target!(|data: &[u8]| {
    let root = tempfile::tempdir().expect("tempdir");
    let staging = root.path().join("staging");
    let volume = root.path().join("volume/incoming");
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::create_dir_all(&volume).expect("volume");
    let _ = unpack(data, &staging, |manifest| {
        // Every volume the manifest names gets the same directory, as a receiver would give one.
        Ok(manifest
            .volumes
            .iter()
            .map(|v| (v.name.clone(), volume.clone()))
            .collect())
    });
    let mut top: Vec<_> = std::fs::read_dir(root.path())
        .expect("read root")
        .map(|e| e.expect("entry").file_name())
        .collect();
    top.sort();
    assert_eq!(top, ["staging", "volume"], "an entry was written outside staging");
    let volume_parent: Vec<_> = std::fs::read_dir(root.path().join("volume"))
        .expect("read volume")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(volume_parent, ["incoming"], "an entry escaped its volume");
});
