//! The request path, normalised once before anything looks at it, so that what the permissions
//! and the router check is exactly what the upstream receives. Pure.
//!
//! - percent-encoded unreserved characters are decoded (`%61` → `a`, `%2e` → `.`), other
//!   percent-encodings kept with upper-case hex; a malformed one is refused;
//! - `.` and `..` segments are removed (RFC 3986 §5.2.4); a `..` above the root is refused;
//! - empty segments (`//`) are collapsed;
//! - an encoded `/` or `\` (`%2F`, `%5C`), an encoded or raw NUL, and a raw `\` are refused:
//!   upstreams disagree on what they mean, which is how prefix checks are walked around.
//!
//! Prefixes then match on segment boundaries ([`has_prefix`]): `/v1/chat` allows `/v1/chat` and
//! `/v1/chat/completions`, never `/v1/chatXYZ`.

use std::borrow::Cow;

/// Why a path was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotAbsolute,
    #[error("the path has a malformed percent-encoding")]
    BadPercent,
    #[error("the path has an encoded '/', '\\' or NUL, or a raw '\\'")]
    AmbiguousSeparator,
    #[error("the path goes above the root with '..'")]
    AboveRoot,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The normalised path; borrowed when it already was (the common case: no allocation).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    // Decode unreserved percent-encodings, canonicalise the others.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadPercent);
                };
                let b = h * 16 + l;
                if matches!(b, b'/' | b'\\' | 0) {
                    return Err(PathError::AmbiguousSeparator);
                }
                if unreserved(b) {
                    decoded.push(char::from(b));
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                }
                i += 3;
            }
            b'\\' | 0 => return Err(PathError::AmbiguousSeparator),
            _ => {
                // Copy the run up to the next '%' (keeps multi-byte characters whole).
                let end = memchr::memchr(b'%', &bytes[i..]).map_or(bytes.len(), |n| i + n);
                if bytes[i..end].iter().any(|&c| c == b'\\' || c == 0) {
                    return Err(PathError::AmbiguousSeparator);
                }
                decoded.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    // Remove dot segments and empty segments.
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if trailing || out.is_empty() {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// A path with nothing to normalise: no `%`, `\`, NUL, empty segment or dot segment.
fn is_normal(b: &[u8]) -> bool {
    if b.iter().any(|&c| matches!(c, b'%' | b'\\' | 0)) {
        return false;
    }
    // Segments start after each '/'; check each for "", ".", "..".
    let mut i = 0;
    while i < b.len() {
        // b[i] == '/'
        let rest = &b[i + 1..];
        let len = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
        let seg = &rest[..len];
        let last = i + 1 + len >= b.len();
        if (seg.is_empty() && !last) || seg == b"." || seg == b".." {
            return false;
        }
        i += 1 + len;
    }
    true
}

/// `path` starts with `prefix` on a segment boundary (a prefix ending in `/` matches as is).
pub fn has_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, PathError>) {
        assert_eq!(
            normalize(input).as_deref().map_err(|e| *e),
            expected,
            "{input:?}"
        );
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/v1/chat/completions", "/v1/models/", "/a.b/c..d/.e"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn the_bypass_corpus() {
        use PathError::*;
        for (input, expected) in [
            ("/v1/chat/completions", Ok("/v1/chat/completions")),
            ("/v1/chat/../embeddings", Ok("/v1/embeddings")),
            ("/v1/chat/%2e%2e/embeddings", Ok("/v1/embeddings")),
            ("/v1/chat/%2E%2E/embeddings", Ok("/v1/embeddings")),
            ("/v1/chat/.%2e/embeddings", Ok("/v1/embeddings")),
            ("/v1/chat/./completions", Ok("/v1/chat/completions")),
            ("/v1//chat///completions", Ok("/v1/chat/completions")),
            ("//v1/chat", Ok("/v1/chat")),
            ("/v1/chat/completions/.", Ok("/v1/chat/completions/")),
            ("/v1/chat/completions/..", Ok("/v1/chat/")),
            ("/v1/%63hat/completions", Ok("/v1/chat/completions")),
            ("/v1/chat%7e1", Ok("/v1/chat~1")),
            ("/v1/models/a%3ab", Ok("/v1/models/a%3Ab")),
            ("/v1/models/caf%C3%A9", Ok("/v1/models/caf%C3%A9")),
            ("/v1/models/café", Ok("/v1/models/café")),
            ("/v1/chat%2f..%2fembeddings", Err(AmbiguousSeparator)),
            ("/v1/chat%2F..%2Fembeddings", Err(AmbiguousSeparator)),
            ("/v1/chat%5c..%5cembeddings", Err(AmbiguousSeparator)),
            ("/v1/chat\\..\\embeddings", Err(AmbiguousSeparator)),
            ("/v1/chat%00", Err(AmbiguousSeparator)),
            ("/v1/chat/%zz", Err(BadPercent)),
            ("/v1/chat/%2", Err(BadPercent)),
            ("/..", Err(AboveRoot)),
            ("/v1/../../etc/passwd", Err(AboveRoot)),
            ("/%2e%2e/x", Err(AboveRoot)),
            ("v1/chat", Err(NotAbsolute)),
            ("", Err(NotAbsolute)),
        ] {
            check(input, expected);
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        for (path, prefix, expected) in [
            ("/v1/chat", "/v1/chat", true),
            ("/v1/chat/completions", "/v1/chat", true),
            ("/v1/chatXYZ", "/v1/chat", false),
            ("/v1/chat", "/v1/chat/", false),
            ("/v1/chat/x", "/v1/", true),
            ("/v2/x", "/v1/", false),
            ("/anything", "/", true),
        ] {
            assert_eq!(has_prefix(path, prefix), expected, "{path} {prefix}");
        }
    }
}
