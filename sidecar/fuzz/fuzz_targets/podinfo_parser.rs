//! The downward-API annotations file and the migration annotations in it, on arbitrary text:
//! the sidecar reads this file on every request, so bad content must be an error, not a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(annotations) = ums_contract::parse_podinfo(text) {
        if let Ok(parsed) = ums_contract::MigrationAnnotations::parse(&annotations) {
            // What the sidecar derives from it must not panic either.
            let _ = parsed.start_mode_or_default();
            let state = ums_sidecar::podinfo::PodState {
                annotations: parsed,
            };
            let _ = ums_sidecar::volumes::pod_volumes(&state);
        }
        // A file written back from the parsed map reads back the same.
        let again = ums_contract::parse_podinfo(&ums_contract::podinfo::format_podinfo(&annotations))
            .expect("a formatted podinfo file parses");
        assert_eq!(again, annotations);
    }
});
