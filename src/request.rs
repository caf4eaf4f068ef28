//! What tollgate reads from and rewrites in a JSON request body, without I/O: the top-level
//! `model`, whether it asks for a stream, and injecting `stream_options.include_usage` with a
//! byte-preserving splice (every other byte of the client's body reaches the upstream as sent).

use std::borrow::Cow;
use std::sync::LazyLock;

use memchr::memmem;
use serde::Deserialize;

use crate::usage::{first_non_ws, lenient_bool, lenient_obj};

/// The top-level `model` string of a JSON request body. Found by scanning the top-level members
/// (values are skipped, not parsed), since it runs for every request.
pub fn model(body: &[u8]) -> Option<String> {
    let top = scan_object(body, skip_ws(body, 0))?;
    if body.get(skip_ws(body, top.close + 1)).is_some() {
        return None; // trailing bytes: not one JSON object
    }
    let m = top.members.iter().rev().find(|m| m.key_is(body, "model"))?;
    let raw = &body[m.value.0..m.value.1];
    match raw.first() {
        Some(b'"') => serde_json::from_slice::<String>(raw).ok(),
        _ => None,
    }
}

/// The most completion tokens a JSON request body asks for: its top-level `max_tokens` (OpenAI
/// chat and Anthropic), `max_completion_tokens` (OpenAI chat) or `max_output_tokens` (OpenAI
/// Responses), as a non-negative integer. Scanned like [`model`], up to the last member that can
/// be one; runs only for keys with a token limit.
pub fn max_tokens(body: &[u8]) -> Option<u64> {
    // A key naming the completion is either spelled out (`"max_…`) or written with `\u` escapes.
    // Without an escape, members that start after the last `"max_` cannot be one: the walk stops
    // there (often before the messages), and a body without any is not walked at all. With an
    // escape anywhere, every member is walked: those after the last candidate were searched
    // for one below, those before it are seen by the walk.
    let mut last = match last_candidate(body)? {
        Bound::Candidate(i) => i,
        Bound::Escape => body.len(),
    };
    // The members are walked in place (no list of them is built): this runs on the hot path.
    let mut seen = Seen::default();
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(body, i + 1);
    let mut found = None;
    while body.get(i) != Some(&b'}') && i <= last {
        seen.backslash = false;
        let key = (i, seen.string(body, i)?);
        // Only a key with a backslash can spell a name with escapes.
        let key_escaped = seen.backslash;
        i = skip_ws(body, key.1);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(body, i + 1);
        let value_end = seen.value(body, i)?;
        let named = match &body[key.0..key.1] {
            br#""max_tokens""# | br#""max_completion_tokens""# | br#""max_output_tokens""# => true,
            _ if key_escaped => {
                let member = Member { key, value: (0, 0) };
                ["max_tokens", "max_completion_tokens", "max_output_tokens"]
                    .iter()
                    .any(|k| member.key_is(body, k))
            }
            _ => false,
        };
        if named {
            // The last one wins, as a JSON parser would have it.
            found = parse_u64(&body[i..value_end]);
        }
        if seen.u_escape {
            last = body.len();
        }
        i = skip_ws(body, value_end);
        match body.get(i) {
            Some(b',') => i = skip_ws(body, i + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    found
}

/// How far [`max_tokens`] walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// Up to the member at or after this index: the last `"max_`, with no `\u` escape after it.
    Candidate(usize),
    /// To the end: a `\u` escape follows the last `"max_`, or (the search that gave up from the
    /// end) precedes it.
    Escape,
}

/// Where the last `"max_` is, unless a `\u` escape follows it; `None` when the body has neither.
/// Searched from the end for `_` and `\` at once (vectorised), so a body whose last member names
/// the completion (the order OpenAI's SDKs write) costs one short search whatever its length.
/// After a few other hits (snake_case keys, `\n` in text) the rest is searched forwards: one
/// search for the escape, one for the candidates.
fn last_candidate(body: &[u8]) -> Option<Bound> {
    const HITS: usize = 8;
    let mut hits = memchr::memrchr2_iter(b'_', b'\\', body);
    let mut end = body.len();
    for _ in 0..HITS {
        let j = hits.next()?; // no more: neither is in the body
        if body[j] == b'\\' {
            if body.get(j + 1) == Some(&b'u') {
                return Some(Bound::Escape);
            }
        } else if j >= 4 && &body[j - 4..j] == b"\"max" {
            return Some(Bound::Candidate(j - 4));
        }
        end = j;
    }
    // The searcher is built once (building one costs more than searching a short body); a
    // forward one, vectorised (memchr's reverse search is not).
    static CANDIDATE: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"max_"));
    let head = &body[..end];
    if memchr::memchr_iter(b'\\', head).any(|i| body.get(i + 1) == Some(&b'u')) {
        return Some(Bound::Escape);
    }
    CANDIDATE.find_iter(head).last().map(Bound::Candidate)
}

/// A JSON integer as `u64::from_str` reads it (an optional `+`, then digits; `None` on
/// anything else or on overflow), without the UTF-8 check and the generic parser.
fn parse_u64(v: &[u8]) -> Option<u64> {
    let digits = match v {
        [b'+', rest @ ..] => rest,
        _ => v,
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(d))?;
    }
    Some(n)
}

/// Image and audio parts in a request body, counted generously (an over-count only makes a
/// reservation larger): every JSON string that starts with `image`, `input_image`, `audio`,
/// `input_audio` or `file` (a key such as `"image_url"` or a `"type": "image"` value; PDFs are
/// sized per page by their providers). Four vectorised searches with searchers built once. Used
/// for a body that is not JSON (a multipart upload): [`spend_fields`] counts a JSON body's parts
/// in its walk, by the same rule.
pub fn media_parts(body: &[u8]) -> u64 {
    static FINDERS: LazyLock<[memmem::Finder<'static>; 4]> = LazyLock::new(|| {
        [
            memmem::Finder::new(b"\"image"),
            memmem::Finder::new(b"\"audio"),
            memmem::Finder::new(b"\"file"),
            memmem::Finder::new(b"\"input_"),
        ]
    });
    let [image, audio, file, input] = &*FINDERS;
    let count = |f: &memmem::Finder<'_>| f.find_iter(body).count() as u64;
    let inputs = input
        .find_iter(body)
        .filter(|&i| {
            let rest = &body[i + 7..];
            rest.starts_with(b"image") || rest.starts_with(b"audio")
        })
        .count() as u64;
    count(image) + count(audio) + count(file) + inputs
}

/// What the spend stage reads from a request body, in one walk of its members with nothing
/// allocated (unless the model is written with escapes): the top-level `model`, the output cap
/// (as [`max_tokens`] reads it), the choices (`n`, at least 1) and the media parts (as
/// [`media_parts`] counts them: the walk looks at the first characters of every string it
/// passes, escapes decoded). A repeated member: the last wins, as a JSON parser would have it. A
/// body that is not one JSON object gives what was read before the fault (the model then `None`:
/// the spend stage prices it at the dearest price), its media parts counted by
/// [`media_parts`]'s searches of the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendFields<'a> {
    pub model: Option<Cow<'a, str>>,
    pub max_tokens: Option<u64>,
    pub choices: u64,
    pub media_parts: u64,
}

pub fn spend_fields(body: &[u8]) -> SpendFields<'_> {
    let mut out = SpendFields {
        model: None,
        max_tokens: None,
        choices: 1,
        media_parts: 0,
    };
    let mut seen = Seen::default();
    let mut model = None;
    match walk_spend_fields(body, &mut seen, &mut out, &mut model) {
        Some(()) => out.media_parts = seen.media,
        None => {
            out.media_parts = media_parts(body);
            return out;
        }
    }
    out.model = model.and_then(|raw| match raw {
        [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') => {
            std::str::from_utf8(inner).ok().map(Cow::Borrowed)
        }
        [b'"', ..] => serde_json::from_slice::<String>(raw).ok().map(Cow::Owned),
        _ => None,
    });
    out
}

/// [`spend_fields`]'s walk: `None` when the body is not one JSON object (what was read before
/// the fault stays in `out`).
fn walk_spend_fields<'a>(
    body: &'a [u8],
    seen: &mut Seen,
    out: &mut SpendFields<'a>,
    model: &mut Option<&'a [u8]>,
) -> Option<()> {
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(body, i + 1);
    while body.get(i) != Some(&b'}') {
        seen.backslash = false;
        let key_end = seen.string(body, i)?;
        // Only a key with a backslash can spell a name with escapes.
        let escaped = seen.backslash;
        let member = Member {
            key: (i, key_end),
            value: (0, 0),
        };
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(body, i + 1);
        let value_end = seen.value(body, i)?;
        let value = &body[i..value_end];
        let is = |name: &str| escaped && member.key_is(body, name);
        let number = || digits(value);
        match &body[member.key.0..member.key.1] {
            br#""model""# => *model = Some(value),
            br#""max_tokens""# | br#""max_completion_tokens""# | br#""max_output_tokens""# => {
                out.max_tokens = number()
            }
            br#""n""# => out.choices = number().unwrap_or(1).max(1),
            _ if is("model") => *model = Some(value),
            _ if is("max_tokens") || is("max_completion_tokens") || is("max_output_tokens") => {
                out.max_tokens = number()
            }
            _ if is("n") => out.choices = number().unwrap_or(1).max(1),
            _ => {}
        }
        i = skip_ws(body, value_end);
        match body.get(i) {
            Some(b',') => i = skip_ws(body, i + 1),
            Some(b'}') => break,
            _ => return None,
        }
    }
    if body.get(skip_ws(body, i + 1)).is_some() {
        return None; // trailing bytes: not one JSON object
    }
    Some(())
}

/// A JSON number that is a non-negative integer (`64`; not `6.4`, `-1`, `1e3` or `"64"`),
/// read without a UTF-8 check or a string: it runs for every request with a budget.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u64::from(c - b'0'))
    })
}

/// Whether a JSON request body has a top-level `"stream": true`.
pub fn wants_stream(body: &[u8]) -> bool {
    parse_stream_req(body).is_some_and(|r| r.stream == Some(true))
}

#[derive(Deserialize)]
struct StreamReq {
    #[serde(default, deserialize_with = "lenient_bool")]
    stream: Option<bool>,
    #[serde(default, deserialize_with = "lenient_obj")]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default, deserialize_with = "lenient_bool")]
    include_usage: Option<bool>,
}

fn parse_stream_req(body: &[u8]) -> Option<StreamReq> {
    // Most requests never mention streaming: skip the full parse for them.
    if first_non_ws(body) != Some(b'{') || memchr::memmem::find(body, b"\"stream").is_none() {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Whether the OpenAI endpoint at `path` defines `stream_options.include_usage`: Chat
/// Completions and (legacy) Completions do; the Responses API has no such option (its stream
/// always ends with `response.completed` carrying usage), and others do not stream.
pub fn defines_include_usage(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    path.ends_with("/chat/completions") || path.ends_with("/completions")
}

/// Given an OpenAI request body with `"stream": true` and no `stream_options.include_usage:
/// true`, returns the body rewritten to carry `"stream_options":{"include_usage":true}` (merged
/// into an existing `stream_options` object). Every other byte of the body is kept as is.
/// `None` when there is nothing to do or the body is not a JSON object.
pub fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let req = parse_stream_req(body)?;
    if req.stream != Some(true) {
        return None;
    }
    if req
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage == Some(true))
    {
        return None;
    }
    let top = scan_object(body, skip_ws(body, 0))?;
    // serde keeps the last of duplicate keys; do the same.
    let existing = top
        .members
        .iter()
        .rev()
        .find(|m| m.key_is(body, "stream_options"));
    let mut out = Vec::with_capacity(body.len() + 40);
    match existing {
        None => {
            // Append after the last member; the object is non-empty (it has `stream`).
            let at = top.members.last().map_or(top.close, |m| m.value.1);
            out.extend_from_slice(&body[..at]);
            out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
            out.extend_from_slice(&body[at..]);
        }
        Some(m) if body.get(m.value.0) == Some(&b'{') => {
            let inner = scan_object(body, m.value.0)?;
            let flag = inner
                .members
                .iter()
                .rev()
                .find(|m| m.key_is(body, "include_usage"));
            match flag {
                Some(f) => {
                    out.extend_from_slice(&body[..f.value.0]);
                    out.extend_from_slice(b"true");
                    out.extend_from_slice(&body[f.value.1..]);
                }
                None => {
                    let open = m.value.0 + 1;
                    out.extend_from_slice(&body[..open]);
                    out.extend_from_slice(b"\"include_usage\":true");
                    if !inner.members.is_empty() {
                        out.push(b',');
                    }
                    out.extend_from_slice(&body[open..]);
                }
            }
        }
        Some(m) => {
            // `null` or another non-object value: replace it.
            out.extend_from_slice(&body[..m.value.0]);
            out.extend_from_slice(b"{\"include_usage\":true}");
            out.extend_from_slice(&body[m.value.1..]);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Minimal JSON object scanner over already-validated JSON (used to splice request bodies).

struct Member {
    key: (usize, usize),   // span of the key string including quotes
    value: (usize, usize), // span of the value
}

impl Member {
    fn key_is(&self, body: &[u8], name: &str) -> bool {
        let raw = &body[self.key.0..self.key.1];
        if raw.len() == name.len() + 2 && &raw[1..raw.len() - 1] == name.as_bytes() {
            return true;
        }
        raw.contains(&b'\\') && serde_json::from_slice::<Cow<'_, str>>(raw).is_ok_and(|k| k == name)
    }
}

struct ObjectScan {
    members: Vec<Member>,
    close: usize, // index of the closing brace
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// Scans the object starting at `b[start] == '{'`.
fn scan_object(b: &[u8], start: usize) -> Option<ObjectScan> {
    if b.get(start) != Some(&b'{') {
        return None;
    }
    let mut members = Vec::new();
    let mut i = skip_ws(b, start + 1);
    if b.get(i) == Some(&b'}') {
        return Some(ObjectScan { members, close: i });
    }
    loop {
        let key_end = skip_string(b, i)?;
        let key = (i, key_end);
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let value_end = skip_value(b, i)?;
        members.push(Member {
            key,
            value: (i, value_end),
        });
        i = skip_ws(b, value_end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Some(ObjectScan { members, close: i }),
            _ => return None,
        }
    }
}

/// `b[i]` must be `"`; returns the index after the closing quote.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    Seen::default().string(b, i)
}

/// Returns the index just after the value starting at `b[i]`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    Seen::default().value(b, i)
}

/// The prefixes of a string that names a media part ([`media_parts`]).
const MEDIA_PREFIXES: [&[u8]; 5] = [b"image", b"audio", b"file", b"input_image", b"input_audio"];

/// Whether the JSON string whose content starts at `s` (just after its opening quote) starts
/// with a [`MEDIA_PREFIXES`] entry, as a JSON parser reads it: escapes among its first
/// characters (`\u0069mage`) are decoded, so that spelling a part's name with them does not hide
/// it from the reservation.
fn media_start(s: &[u8]) -> bool {
    const LONGEST: usize = 11; // "input_image", "input_audio"
    let head = &s[..s.len().min(LONGEST)];
    // Without an escape before the string's end (or its first 11 bytes), its bytes are its text.
    let first_escape = match head.iter().position(|&c| c == b'\\' || c == b'"') {
        Some(k) if head[k] == b'\\' => k,
        _ => return MEDIA_PREFIXES.iter().any(|p| s.starts_with(p)),
    };
    // Decoded up to the longest prefix; a character that is not ASCII cannot match (0xFF).
    let mut decoded = [0u8; LONGEST];
    decoded[..first_escape].copy_from_slice(&head[..first_escape]);
    let (mut n, mut j) = (first_escape, first_escape);
    while n < LONGEST {
        let c = match s.get(j) {
            None | Some(b'"') => break,
            Some(b'\\') => match s.get(j + 1) {
                Some(b'u') => {
                    let hex = s
                        .get(j + 2..j + 6)
                        .and_then(|h| std::str::from_utf8(h).ok());
                    j += 6;
                    match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        Some(c) if c.is_ascii() => c,
                        _ => 0xFF,
                    }
                }
                Some(&e) => {
                    j += 2;
                    // `\/`, `\\`, `\"` are themselves; `\n` and the like are control characters.
                    if matches!(e, b'/' | b'\\' | b'"') {
                        e
                    } else {
                        0xFF
                    }
                }
                None => break,
            },
            Some(&c) => {
                j += 1;
                c
            }
        };
        decoded[n] = c;
        n += 1;
    }
    MEDIA_PREFIXES.iter().any(|p| decoded[..n].starts_with(p))
}

/// The backslashes a skip went over, for [`max_tokens`]: each one is looked at anyway.
#[derive(Debug, Default)]
struct Seen {
    /// A backslash (since the caller last reset it).
    backslash: bool,
    /// A backslash followed by `u`, as a search of the whole body for one would find it.
    u_escape: bool,
    /// Strings that name a media part ([`media_start`]), for [`spend_fields`].
    media: u64,
}

impl Seen {
    fn note(&mut self, b: &[u8], j: usize) {
        self.backslash = true;
        // An escape's backslash, and the escaped one of `\\`.
        let next = b.get(j + 1);
        if next == Some(&b'u') || (next == Some(&b'\\') && b.get(j + 2) == Some(&b'u')) {
            self.u_escape = true;
        }
    }

    /// `b[i]` must be `"`; returns the index after the closing quote.
    fn string(&mut self, b: &[u8], i: usize) -> Option<usize> {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        if matches!(b.get(i + 1), Some(b'i' | b'a' | b'f' | b'\\')) && media_start(&b[i + 1..]) {
            self.media += 1;
        }
        let mut j = i + 1;
        loop {
            j += memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
            if b[j] == b'\\' {
                self.note(b, j);
                j += 2;
            } else {
                return Some(j + 1);
            }
        }
    }

    /// Returns the index just after the value starting at `b[i]`.
    fn value(&mut self, b: &[u8], i: usize) -> Option<usize> {
        match *b.get(i)? {
            b'"' => self.string(b, i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    match *b.get(j)? {
                        b'"' => {
                            j = self.string(b, j)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(j + 1);
                            }
                        }
                        b'\\' => self.note(b, j),
                        _ => {}
                    }
                    j += 1;
                }
            }
            _ => {
                let mut j = i;
                while let Some(&c) = b.get(j) {
                    if matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace() {
                        break;
                    }
                    if c == b'\\' {
                        self.note(b, j);
                    }
                    j += 1;
                }
                (j > i).then_some(j)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spend_fields_read_like_a_parser() {
        let check = |body: &str, want_model: Option<&str>, want_max: Option<u64>, n: u64| {
            let f = spend_fields(body.as_bytes());
            assert_eq!(
                (f.model.as_deref(), f.max_tokens, f.choices),
                (want_model, want_max, n),
                "{body}"
            );
            // The same answers as the readers they stand for.
            if f.model.is_some() {
                assert_eq!(
                    f.model.as_deref(),
                    crate::request::model(body.as_bytes()).as_deref()
                );
                assert_eq!(f.max_tokens, crate::request::max_tokens(body.as_bytes()));
            }
        };
        check(
            r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[]}"#,
            Some("gpt-4o-mini"),
            Some(64),
            1,
        );
        check(
            r#"{"messages":[{"content":"\"model\": \"x\""}],"model":"a","model":"b"}"#,
            Some("b"),
            None,
            1,
        );
        check(
            r#"{"model":"caf\u00e9","max_completion_tokens":5,"n":3}"#,
            Some("café"),
            Some(5),
            3,
        );
        check(r#"{"\u006dodel":"m","\u006e":2}"#, Some("m"), None, 2);
        check(
            r#"{"model":"m","max_output_tokens":7} trailing"#,
            None,
            Some(7),
            1,
        );
        check(r#"{"model":7}"#, None, None, 1);
        check("[]", None, None, 1);
    }

    #[test]
    fn choices_and_media_parts() {
        // (body, choices, media parts as the walk counts them)
        let check = |body: &str, n: u64, media: u64| {
            let fields = spend_fields(body.as_bytes());
            assert_eq!(fields.choices, n, "{body}");
            assert_eq!(fields.media_parts, media, "{body}");
        };
        check(r#"{"model":"m","messages":[]}"#, 1, 0);
        check(r#"{"n":3,"messages":[]}"#, 3, 0);
        check(r#"{"n":0}"#, 1, 0);
        check(r#"{"n":"3"}"#, 1, 0);
        check(r#"{"messages":[{"content":"say \"n\": 9"}],"n":2}"#, 2, 0);
        check("not json", 1, 0);
        // OpenAI: the part's type and its image_url key; Anthropic: type image.
        check(
            r#"{"messages":[{"content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
            1,
            2,
        );
        check(
            r#"{"messages":[{"content":[{"type":"image","source":{}}]}]}"#,
            1,
            1,
        );
        check(
            r#"{"input":[{"type":"input_audio","input_audio":{}}]}"#,
            1,
            2,
        );
        // The word in text is not a part.
        check(r#"{"messages":[{"content":"an image of audio"}]}"#, 1, 0);
        // Escapes are read as a JSON parser reads them: a part's name spelled with them still
        // counts; text that only looks like one does not.
        check(
            r#"{"messages":[{"content":[{"type":"\u0069mage","source":{}}]}]}"#,
            1,
            1,
        );
        check(r#"{"input":[{"type":"input_\u0041udio"}]}"#, 1, 0); // `A`: not `audio`
        check(r#"{"input":[{"type":"inp\u0075t_audio"}]}"#, 1, 1);
        check(r#"{"input":[{"\u0066ile_id":"f"}]}"#, 1, 1);
        check(r#"{"messages":[{"content":"\"image\" is a word"}]}"#, 1, 0);
        check(r#"{"messages":[{"content":"\file"}]}"#, 1, 0); // a form feed, then `ile`
        check(r#"{"messages":[{"content":"\u4f60image"}]}"#, 1, 0);
        check(r#"{"a":"x","b":"image\n"}"#, 1, 1);
        check(r#"{"a":"ima","b":"ge"}"#, 1, 0);
        // A key too (generous).
        check(r#"{"file":1}"#, 1, 1);
        // Not one JSON object: the searches of the whole body (a multipart upload's
        // `name="file"`), whatever was read before the fault.
        check("--b\r\nContent-Disposition: form-data; name=\"file\"", 1, 1);
        check(r#"{"n":2,"messages":[{"type":"image"}]"#, 2, 1);
    }

    #[test]
    fn the_walk_counts_media_parts_as_the_searches_do_on_plain_json() {
        // Without escapes or quotes inside strings, both counts agree, whatever the nesting.
        let bodies = [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
            r#"{"model":"claude","messages":[{"content":[{"type":"image","source":{"type":"base64","media_type":"image/jpeg","data":"x"}},{"type":"document"}]}],"max_tokens":5}"#,
            r#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"u"},{"type":"input_file","file_id":"f"},{"type":"input_audio","input_audio":{"data":"d","format":"wav"}}]}]}"#,
            r#"{"files":["a","b"],"audio":{"voice":"x"},"imagery":null}"#,
        ];
        for body in bodies {
            assert_eq!(
                spend_fields(body.as_bytes()).media_parts,
                media_parts(body.as_bytes()),
                "{body}"
            );
        }
    }

    #[test]
    fn request_fields() {
        let table: &[(&str, Option<&str>, bool)] = &[
            (
                r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
                Some("gpt-4o"),
                true,
            ),
            (
                r#"{"messages":[{"role":"user","content":"say \"stream\": true"}],"model":"gpt-4o-mini"}"#,
                Some("gpt-4o-mini"),
                false,
            ),
            (
                r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":false}"#,
                Some("claude-sonnet-4-5"),
                false,
            ),
            (r#"{"model":"x","stream":"true"}"#, Some("x"), false),
            (r#"{"model":"x","stream":1}"#, Some("x"), false),
            (r#"{"model":"x","stream":null}"#, Some("x"), false),
            (r#"{"model":null,"stream":true}"#, None, true),
            (r#"{"model":"a\/b\n","stream":true}"#, Some("a/b\n"), true),
            (
                r#"{"metadata":{"model":"inner","stream":true}}"#,
                None,
                false,
            ),
            (r#"["model","stream"]"#, None, false),
            ("", None, false),
            ("{", None, false),
            (r#"{"model":"x","stream":true"#, None, false),
            (r#"  {"model":"x","stream":true}  "#, Some("x"), true),
        ];
        for &(body, expected_model, stream) in table {
            assert_eq!(model(body.as_bytes()).as_deref(), expected_model, "{body}");
            assert_eq!(wants_stream(body.as_bytes()), stream, "{body}");
        }
    }

    #[test]
    fn endpoints_that_define_include_usage() {
        for (path, expected) in [
            ("/v1/chat/completions", true),
            ("/v1/chat/completions/", true),
            ("/v1/completions", true),
            ("/openai/v1/chat/completions", true),
            ("/v1/responses", false),
            ("/v1/embeddings", false),
            ("/v1/chat/completionsX", false),
            ("/v1/xcompletions", false),
        ] {
            assert_eq!(defines_include_usage(path), expected, "{path}");
        }
    }

    #[test]
    fn inject() {
        let table: &[(&str, Option<&str>)] = &[
            (
                r#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
                Some(r#"{"model":"gpt-4o","stream":true,"messages":[],"stream_options":{"include_usage":true}}"#),
            ),
            (
                "{\n  \"model\": \"gpt-4o\",\n  \"stream\": true\n}\n",
                Some("{\n  \"model\": \"gpt-4o\",\n  \"stream\": true,\"stream_options\":{\"include_usage\":true}\n}\n"),
            ),
            (
                r#"{"stream":true,"stream_options":{}}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#"{"stream":true,"stream_options":{ "x" : 1 },"z":[1,{"}":"]"}]}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true, "x" : 1 },"z":[1,{"}":"]"}]}"#),
            ),
            (
                r#"{"stream_options":{"include_usage":false,"y":2},"stream":true}"#,
                Some(r#"{"stream_options":{"include_usage":true,"y":2},"stream":true}"#),
            ),
            (
                r#"{"stream_options":{"include_usage": null},"stream":true}"#,
                Some(r#"{"stream_options":{"include_usage": true},"stream":true}"#),
            ),
            (
                r#"{"stream":true,"stream_options":null,"n":1}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true},"n":1}"#),
            ),
            (
                r#"{"stream":true,"stream_options":"weird"}"#,
                Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            ),
            (
                r#"{"stream":true,"stream\u005foptions":{}}"#,
                Some(r#"{"stream":true,"stream\u005foptions":{"include_usage":true}}"#),
            ),
            // escaped quotes and unicode elsewhere are preserved byte for byte
            (
                r#"{"messages":[{"content":"a \"}\" b ✓ \\"}],"stream":true,"temperature":0.70}"#,
                Some(r#"{"messages":[{"content":"a \"}\" b ✓ \\"}],"stream":true,"temperature":0.70,"stream_options":{"include_usage":true}}"#),
            ),
            // nothing to do
            (r#"{"stream":true,"stream_options":{"include_usage":true}}"#, None),
            (r#"{"stream":false}"#, None),
            (r#"{"model":"gpt-4o"}"#, None),
            (r#"{"stream":"true"}"#, None),
            // not a JSON object / invalid
            (r#"[{"stream":true}]"#, None),
            (r#"{"stream":true"#, None),
            (r#"{"stream":true,}"#, None),
            ("", None),
            // duplicate keys are rejected rather than guessed at
            (r#"{"stream":true,"stream":true}"#, None),
        ];
        for &(body, expected) in table {
            let got = inject_include_usage(body.as_bytes());
            let got = got
                .as_deref()
                .map(|b| std::str::from_utf8(b).expect("utf8"));
            assert_eq!(got, expected, "{body}");
            if let Some(out) = got {
                // the result is valid JSON and asks for usage
                let v: serde_json::Value = serde_json::from_str(out).expect("valid json");
                assert_eq!(
                    v["stream_options"]["include_usage"],
                    serde_json::Value::Bool(true)
                );
                assert!(inject_include_usage(out.as_bytes()).is_none());
            }
        }
    }

    /// `max_tokens` as it was before the search from the end and the walk's own escape check
    /// (two forward searches of the whole body): the new one must answer the same everywhere.
    fn max_tokens_reference(body: &[u8]) -> Option<u64> {
        let escaped = memchr::memchr_iter(b'\\', body).any(|i| body.get(i + 1) == Some(&b'u'));
        let last = if escaped {
            body.len()
        } else {
            memmem::find_iter(body, b"\"max_").last()?
        };
        let mut i = skip_ws(body, 0);
        if body.get(i) != Some(&b'{') {
            return None;
        }
        i = skip_ws(body, i + 1);
        let mut found = None;
        while body.get(i) != Some(&b'}') && i <= last {
            let key_end = skip_string(body, i)?;
            let member = Member {
                key: (i, key_end),
                value: (0, 0),
            };
            i = skip_ws(body, key_end);
            if body.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(body, i + 1);
            let value_end = skip_value(body, i)?;
            let named = match &body[member.key.0..member.key.1] {
                br#""max_tokens""# | br#""max_completion_tokens""# | br#""max_output_tokens""# => {
                    true
                }
                _ => {
                    escaped
                        && ["max_tokens", "max_completion_tokens", "max_output_tokens"]
                            .iter()
                            .any(|k| member.key_is(body, k))
                }
            };
            if named {
                found = std::str::from_utf8(&body[i..value_end])
                    .ok()
                    .and_then(|v| v.parse().ok());
            }
            i = skip_ws(body, value_end);
            match body.get(i) {
                Some(b',') => i = skip_ws(body, i + 1),
                Some(b'}') => break,
                _ => return None,
            }
        }
        found
    }

    #[test]
    fn max_tokens_answers_as_the_forward_search_did() {
        let snake = r#""a_b":1,"c_d":2,"e_f":3,"g_h":4,"i_j":5,"k_l":6,"m_n":7,"o_p":8,"q_r":9"#;
        let newlines = r#""t":"a\nb\nc\nd\ne\nf\ng\nh\ni\nj\nk""#;
        let mut bodies: Vec<String> = [
            r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"model":"m","max_tokens":9}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":9,"top_p":1}"#,
            r#"{"m\u0061x_tokens":9,"x":"max_tokens"}"#,
            r#"{"x":"max_tokens","m\u0061x_tokens":9}"#,
            r#"{"a":"\u00e9","max_tokens":4,"messages":[{"#,
            r#"{"a":"\\u","max_tokens":4,"messages":[{"#,
            r#"{"a":"\\","max_tokens":4,"b":"\u0020","c":[{"#,
            r#"{"a":[1,\u2],"max_tokens":4,"messages":[{"#,
            r#"{"a":\u1,"max_tokens":4,"messages":[{"#,
            r#"{"max_tokens":4,"b":\u1,"c":[{"#,
            r#"{"max_tokens":4,"b":"\u0041","c":[{"#,
            r#"{"max_tokens":4,"messages":[{"#,
            r#"{"max\ttokens":4}"#,
            r#"{"max_tokens":+5}"#,
            r#"{"max_tokens":"5"}"#,
            r#"{"max_tokens":5.0}"#,
            r#"{"max_tokens":18446744073709551615}"#,
            r#"{"max_tokens":18446744073709551616}"#,
            r#"{"max_tokens":007,"max_output_tokens":-1}"#,
            r#"{"max_":1}"#,
            r#"{"max":1,"_":2}"#,
            r#"_max_tokens"#,
            r#"\u"#,
            "",
            "{",
            "{}",
            r#"{"max_tokens":1,"#,
            "[\"max_tokens\",1]",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // More than the hits searched from the end: the rest is searched forwards.
        for tail in [snake, newlines] {
            for head in [
                r#""max_tokens":3"#,
                r#""m\u0061x_tokens":3"#,
                r#""a":"\u0041","max_tokens":3"#,
                r#""a":1"#,
            ] {
                bodies.push(format!("{{{head},{tail}}}"));
                bodies.push(format!("{{{tail},{head}}}"));
                bodies.push(format!("{{{head},{tail},\"z\":\"\\u0041\"}}"));
                bodies.push(format!("{{{head},{tail},\"z\":[{{"));
            }
        }
        for body in &bodies {
            assert_eq!(
                max_tokens(body.as_bytes()),
                max_tokens_reference(body.as_bytes()),
                "{body}"
            );
        }
    }

    proptest::proptest! {
        /// Objects made of members that name the completion or not, with escapes, underscores
        /// and broken pieces in any order: the same answer as the forward search.
        #[test]
        fn max_tokens_on_member_soup(
            members in proptest::collection::vec(0usize..18, 0..24),
            close in proptest::bool::ANY,
        ) {
            const MEMBERS: [&str; 18] = [
                r#""max_tokens":7"#,
                r#""max_output_tokens":+8"#,
                r#""m\u0061x_tokens":9"#,
                r#""max_completion_tokens":"3""#,
                r#""a":"\u0041""#,
                r#""a":"\\u""#,
                r#""a_b":1"#,
                r#""t":"x\ny\"_""#,
                r#""m":[{"max_tokens":1}]"#,
                r#""s":"max_tokens""#,
                r#""v":\u1"#,
                r#""w":[1,\u2,{"_":"\\"}]"#,
                r#""bad" 1"#,
                r#""open":[{"#,
                r#""x_y":"_\\_""#,
                r#" "max_tokens" : 10 "#,
                r#""max\u005ftokens":11"#,
                r#""n":null"#,
            ];
            let mut body = String::from("{");
            for (n, &m) in members.iter().enumerate() {
                if n > 0 {
                    body.push(',');
                }
                body.push_str(MEMBERS[m]);
            }
            if close {
                body.push('}');
            }
            proptest::prop_assert_eq!(
                max_tokens(body.as_bytes()),
                max_tokens_reference(body.as_bytes()),
                "{}",
                body
            );
        }
    }

    #[test]
    fn integers_as_from_str_reads_them() {
        for v in [
            "0",
            "64",
            "+64",
            "-1",
            "+",
            "++1",
            "",
            "1e3",
            "1.0",
            "0x10",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "0018446744073709551615",
            "\"5\"",
            "١",
        ] {
            assert_eq!(parse_u64(v.as_bytes()), v.parse::<u64>().ok(), "{v}");
        }
    }

    #[test]
    fn max_tokens_are_top_level_members() {
        fn check(body: &str, expected: Option<u64>) {
            assert_eq!(max_tokens(body.as_bytes()), expected, "{body}");
        }
        for (body, expected) in [
            (r#"{"model":"m"}"#, None),
            (
                r#"{"max_tokens":64,"messages":[{"content":"max_tokens"}]}"#,
                Some(64),
            ),
            (r#"{"messages":[{"max_tokens":5}],"max_tokens":7}"#, Some(7)),
            (r#"{"messages":[{"max_tokens":5}]}"#, None),
            (r#"{"max_tokens":1,"max_tokens":2}"#, Some(2)),
            (r#"{"max_completion_tokens":50,"m":1}"#, Some(50)),
            (r#"{ "max_output_tokens" : 7 }"#, Some(7)),
            (r#"{"max_tokens":"x"}"#, None),
            (r#"{"max_tokens":-1}"#, None),
            (r#"{"m\u0061x_tokens":9,"x":"\u00e9"}"#, Some(9)),
            (
                r#"{"content":"say \"max_tokens\"","max_tokens":3}"#,
                Some(3),
            ),
            (
                r#"{"max_tokens":3,"content":"say \"max_tokens\""}"#,
                Some(3),
            ),
            (r#"["max_tokens",1]"#, None),
            (r#"{"max_tokens":4"#, None),
            // Not a validator: what follows the last candidate is not read.
            (r#"{"max_tokens":4,"messages":[{"#, Some(4)),
            (r#"{"a":"#, None),
        ] {
            check(body, expected);
        }
    }
}
