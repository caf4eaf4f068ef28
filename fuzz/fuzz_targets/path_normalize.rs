//! The path normaliser (`src/path.rs`): never panics; what it returns is normal (normalising it
//! again gives it back unchanged), starts with `/`, has no `.`/`..` or empty segments
//! and no encoded unreserved character, encoded separator or NUL left.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use tollgate::path::{has_prefix, normalize};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(norm) = normalize(path) else {
        return;
    };
    let again = normalize(&norm).expect("a normalised path is accepted");
    assert_eq!(again, norm, "normalising twice changed it");
    // Without a kept escape it is recognised as normal at once (no allocation on the hot path).
    if !norm.contains('%') {
        assert!(
            matches!(again, Cow::Borrowed(_)),
            "{norm:?} was copied again"
        );
    }
    assert!(norm.starts_with('/'));
    let inner = &norm[1..];
    if !inner.is_empty() {
        // A trailing `/` is kept (it is the upstream's business), so the last segment may be empty.
        let segs: Vec<&str> = inner.split('/').collect();
        for (i, seg) in segs.iter().enumerate() {
            assert!(*seg != "." && *seg != "..", "dot segment in {norm:?}");
            assert!(
                !seg.is_empty() || i + 1 == segs.len(),
                "empty segment in {norm:?}"
            );
        }
    }
    assert!(!norm.contains('\\') && !norm.contains('\0'));
    let b = norm.as_bytes();
    for (i, _) in norm.match_indices('%') {
        let (h, l) = (b[i + 1], b[i + 2]);
        assert!(
            h.is_ascii_hexdigit() && l.is_ascii_hexdigit(),
            "bad escape in {norm:?}"
        );
        assert!(
            !h.is_ascii_lowercase() && !l.is_ascii_lowercase(),
            "lower-case escape in {norm:?}"
        );
        let v = u8::from_str_radix(&norm[i + 1..i + 3], 16).expect("hex");
        assert!(
            !(v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~')),
            "encoded unreserved character in {norm:?}"
        );
        assert!(
            !matches!(v, b'/' | b'\\' | 0),
            "encoded separator or NUL in {norm:?}"
        );
    }
    assert!(has_prefix(&norm, &norm));
    assert!(has_prefix(&norm, "/"));
});
