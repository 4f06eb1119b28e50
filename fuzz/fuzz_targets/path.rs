//! Path canonicalisation: never panics; what it returns is canonical (canonicalising it again
//! changes nothing), has no `.` or `..` segment, no empty segment, no backslash, and its
//! encoded form decodes back to it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vestibule::path::canonicalize;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(path) = canonicalize(raw) else { return };
    assert!(path.decoded.starts_with('/'), "{raw:?} -> {path:?}");
    assert!(!path.decoded.contains('\\'), "{raw:?} -> {path:?}");
    for segment in path.decoded.split('/').skip(1) {
        assert!(segment != "." && segment != "..", "{raw:?} -> {path:?}");
    }
    assert!(!path.decoded[1..].contains("//"), "{raw:?} -> {path:?}");
    let again = canonicalize(&path.encoded).expect("the encoded form is a valid path");
    assert_eq!(again.decoded, path.decoded, "{raw:?}: not idempotent");
    assert_eq!(again.encoded, path.encoded, "{raw:?}: not idempotent");
});
