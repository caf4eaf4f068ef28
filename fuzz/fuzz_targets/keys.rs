//! The key format (`src/keys.rs`): `validate` never panics; what it accepts has the prefix, the
//! length and the base62 alphabet; any single changed character of an accepted key is refused
//! (the checksum catches every one-character typo).
//!
//! Input: the candidate key (bytes, lossily as UTF-8); its first two bytes also pick a position
//! and a replacement character for the typo check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::keys::{display_prefix, validate, DISPLAY_PREFIX_LEN, KEY_LEN, PREFIX};

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fuzz_target!(|data: &[u8]| {
    let key = String::from_utf8_lossy(data);
    let prefix = display_prefix(&key);
    assert!(key.starts_with(prefix));
    if validate(&key).is_err() {
        return;
    }
    assert_eq!(key.len(), KEY_LEN);
    assert!(key.starts_with(PREFIX));
    assert!(key
        .bytes()
        .skip(PREFIX.len())
        .all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(prefix.len(), DISPLAY_PREFIX_LEN);
    // One typo anywhere after the prefix.
    let at = PREFIX.len() + usize::from(data[0]) % (KEY_LEN - PREFIX.len());
    let mut typo = key.as_bytes().to_vec();
    let replacement = ALPHABET[usize::from(data[1]) % ALPHABET.len()];
    if typo[at] == replacement {
        return;
    }
    typo[at] = replacement;
    let typo = String::from_utf8(typo).expect("base62 is ASCII");
    assert!(
        validate(&typo).is_err(),
        "{typo:?} passed the checksum of {key:?}"
    );
});
