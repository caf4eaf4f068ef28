//! API key format: generation, the offline checksum check, hashing and the display prefix.
//!
//! A key is `tg_` + 22 base62 characters from the OS CSPRNG (131 bits) + 6 base62 characters of
//! the CRC32 of everything before them. Scanners recognise the prefix; a mistyped key fails the
//! checksum and is refused without touching the cache or the database.

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "tg_";
const RANDOM_LEN: usize = 22;
const CHECK_LEN: usize = 6;
pub const KEY_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECK_LEN;
/// Characters of a key shown in listings (`tg_` + 6): enough to tell keys apart, useless to an attacker.
pub const DISPLAY_PREFIX_LEN: usize = PREFIX.len() + 6;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// SHA-256 of a key: what the database stores and the cache is keyed by.
pub type KeyHash = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key does not start with tg_")]
    Prefix,
    #[error("the key has the wrong length")]
    Length,
    #[error("the key contains characters outside base62")]
    Charset,
    #[error("the key's checksum does not match (mistyped or truncated key)")]
    Checksum,
}

/// A new key from the OS CSPRNG.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut body = String::with_capacity(KEY_LEN);
    body.push_str(PREFIX);
    let mut filled = 0;
    let mut buf = [0u8; 64];
    while filled < RANDOM_LEN {
        getrandom::fill(&mut buf)?;
        for &b in &buf {
            // 248 = 4 * 62: rejecting the rest keeps every character uniform.
            if b < 248 && filled < RANDOM_LEN {
                body.push(ALPHABET[(b % 62) as usize] as char);
                filled += 1;
            }
        }
    }
    let crc = crc32fast::hash(body.as_bytes());
    body.push_str(&encode_checksum(crc));
    Ok(body)
}

fn encode_checksum(mut crc: u32) -> String {
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(crc % 62) as usize];
        crc /= 62;
    }
    // 62^6 > 2^32, so nothing is lost.
    out.iter().map(|&b| b as char).collect()
}

/// Checks prefix, length, alphabet and checksum. Pure and allocation-free.
pub fn validate(key: &str) -> Result<(), KeyFormatError> {
    let bytes = key.as_bytes();
    if !bytes.starts_with(PREFIX.as_bytes()) {
        return Err(KeyFormatError::Prefix);
    }
    if bytes.len() != KEY_LEN {
        return Err(KeyFormatError::Length);
    }
    if !bytes[PREFIX.len()..].iter().all(u8::is_ascii_alphanumeric) {
        return Err(KeyFormatError::Charset);
    }
    let (body, check) = bytes.split_at(KEY_LEN - CHECK_LEN);
    let mut expected = crc32fast::hash(body);
    for &c in check.iter().rev() {
        if c != ALPHABET[(expected % 62) as usize] {
            return Err(KeyFormatError::Checksum);
        }
        expected /= 62;
    }
    Ok(())
}

pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

pub fn hash_hex(key: &str) -> String {
    hex::encode(hash(key))
}

pub fn display_prefix(key: &str) -> &str {
    key.get(..DISPLAY_PREFIX_LEN).unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, expected: Result<(), KeyFormatError>) {
        assert_eq!(validate(key), expected, "{key}");
    }

    #[test]
    fn generated_keys_validate_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_LEN);
        check(&a, Ok(()));
        check(&b, Ok(()));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = generate().unwrap();
        let mut typo = good.clone().into_bytes();
        typo[5] = if typo[5] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        let cases: &[(&str, Result<(), KeyFormatError>)] = &[
            ("", Err(KeyFormatError::Prefix)),
            ("sk-abc", Err(KeyFormatError::Prefix)),
            ("tg_short", Err(KeyFormatError::Length)),
            (&good[..KEY_LEN - 1], Err(KeyFormatError::Length)),
            (
                "tg_!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
                Err(KeyFormatError::Charset),
            ),
            (
                "tg_0000000000000000000000000000",
                Err(KeyFormatError::Checksum),
            ),
            (&typo, Err(KeyFormatError::Checksum)),
        ];
        for (key, expected) in cases {
            check(key, *expected);
        }
    }

    #[test]
    fn hash_is_sha256() {
        assert_eq!(
            hash_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(display_prefix("tg_abcdefghij"), "tg_abcdef");
    }
}
