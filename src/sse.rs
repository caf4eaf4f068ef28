//! Incremental Server-Sent-Events parsing of upstream response streams: accumulates token usage
//! and model ([`SseUsage`]) and strips the gateway-requested usage-only chunk from OpenAI streams
//! ([`UsageChunkStripper`]).

use memchr::memmem;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::usage::{Dialect, Envelope, Usage};

/// Default bound on one event's `data` (and on one line): longer events are skipped.
pub const DEFAULT_EVENT_CAP: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Line/event parser shared by the usage collector and the stripper.

/// What the parser reports while consuming a chunk. `end` is the offset in the current chunk
/// just past the line terminator of the line that caused the signal.
enum Signal<'a> {
    /// A line ended and no event is being assembled (after a blank line without data, or a
    /// comment between events): everything up to `end` is settled.
    Idle { end: usize },
    /// A blank line ended an event that was over the cap (not dispatched); `event` is its
    /// `event` field.
    Skipped { end: usize, event: &'a [u8] },
    /// A blank line dispatched an event with at least one `data` line.
    Dispatch {
        end: usize,
        event: &'a [u8],
        data: &'a [u8],
    },
}

#[derive(Debug)]
struct EventParser {
    /// Bytes of a line that started in an earlier chunk.
    line: Vec<u8>,
    /// The current line passed `cap`; its remaining bytes are discarded.
    line_overflow: bool,
    /// `data` lines of the current event joined with `\n`.
    data: Vec<u8>,
    /// `event` field of the current event.
    event: Vec<u8>,
    has_data: bool,
    /// A field line was seen since the last blank line.
    pending: bool,
    /// The current event passed `cap` and will not be dispatched.
    skip: bool,
    /// The previous chunk ended with `\r`; a leading `\n` in the next chunk belongs to it.
    pending_cr: bool,
    cap: usize,
}

impl EventParser {
    fn new(cap: usize) -> Self {
        Self {
            line: Vec::new(),
            line_overflow: false,
            data: Vec::new(),
            event: Vec::new(),
            has_data: false,
            pending: false,
            skip: false,
            pending_cr: false,
            cap,
        }
    }

    /// Whether the event being assembled is over the cap (its bytes can't be judged).
    fn skipping(&self) -> bool {
        self.skip
    }

    fn feed(&mut self, chunk: &[u8], f: &mut impl FnMut(Signal<'_>)) {
        if chunk.is_empty() {
            return;
        }
        let mut i = 0;
        if self.pending_cr {
            self.pending_cr = false;
            if chunk[0] == b'\n' {
                i = 1;
            }
        }
        while i < chunk.len() {
            let rest = &chunk[i..];
            let Some(p) = memchr::memchr2(b'\n', b'\r', rest) else {
                self.push_partial(rest);
                return;
            };
            let mut end = i + p + 1;
            if rest[p] == b'\r' {
                match chunk.get(end) {
                    Some(b'\n') => end += 1,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
            if self.line.is_empty() && !self.line_overflow {
                if p > self.cap {
                    // The bound a line arriving in pieces meets in `push_partial`: whether a line
                    // is over the cap must not depend on where the chunks were cut.
                    self.poison_event();
                } else {
                    self.process_line(&rest[..p], end, f);
                }
            } else {
                self.push_partial(&rest[..p]);
                let mut line = std::mem::take(&mut self.line);
                if std::mem::take(&mut self.line_overflow) {
                    // The overflowing line already poisoned the event; ignore its content.
                    self.pending = true;
                } else {
                    self.process_line(&line, end, f);
                }
                line.clear();
                self.line = line;
            }
            i = end;
        }
    }

    fn push_partial(&mut self, bytes: &[u8]) {
        if self.line_overflow {
            return;
        }
        if self.line.len() + bytes.len() > self.cap {
            self.line_overflow = true;
            self.line = Vec::new();
            self.poison_event();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// A line over the cap: the current event is skipped (its bytes can't be judged).
    fn poison_event(&mut self) {
        self.data = Vec::new();
        self.skip = true;
        self.pending = true;
    }

    fn process_line(&mut self, line: &[u8], end: usize, f: &mut impl FnMut(Signal<'_>)) {
        if line.is_empty() {
            if self.has_data && !self.skip {
                f(Signal::Dispatch {
                    end,
                    event: &self.event,
                    data: &self.data,
                });
            } else if self.skip {
                f(Signal::Skipped {
                    end,
                    event: &self.event,
                });
            } else {
                f(Signal::Idle { end });
            }
            self.data.clear();
            self.event.clear();
            self.has_data = false;
            self.pending = false;
            self.skip = false;
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(0) => {
                if !self.pending {
                    f(Signal::Idle { end });
                }
                return;
            }
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        self.pending = true;
        match name {
            b"data" => {
                if self.skip {
                    return;
                }
                let sep = usize::from(self.has_data);
                if self.data.len() + sep + value.len() > self.cap {
                    self.skip = true;
                    self.data = Vec::new();
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            _ => {}
        }
    }

    /// End of input: the current event if its last line was terminated (no blank line came).
    fn take_unterminated(&mut self) -> Option<(&[u8], &[u8])> {
        let ok = self.has_data && !self.skip && self.line.is_empty() && !self.line_overflow;
        self.has_data = false;
        ok.then_some((&self.event[..], &self.data[..]))
    }
}

// ---------------------------------------------------------------------------------------------
// Cheap pre-filters so that ordinary content deltas are never JSON-parsed.

/// Whether `data` may carry a usage block: a `"usage` key whose value is not `null`, or a Gemini
/// `"usageMetadata`. (Anything inside a string is a harmless false positive.)
fn may_carry_usage(data: &[u8]) -> bool {
    let finder = memmem::Finder::new(b"\"usage");
    let mut from = 0;
    while let Some(p) = finder.find(&data[from..]) {
        let after = from + p + 6;
        match data.get(after) {
            Some(b'M') => return true, // usageMetadata
            Some(b'"') => {
                let mut j = after + 1;
                while data.get(j).is_some_and(u8::is_ascii_whitespace) {
                    j += 1;
                }
                if data.get(j) == Some(&b':') {
                    j += 1;
                    while data.get(j).is_some_and(u8::is_ascii_whitespace) {
                        j += 1;
                    }
                    if !data[j..].starts_with(b"null") {
                        return true;
                    }
                }
            }
            _ => {}
        }
        from = after;
    }
    false
}

fn may_carry_model(data: &[u8]) -> bool {
    memmem::find(data, b"\"model").is_some()
}

/// `{"type":"message_stop"}` without an `event:` line (Anthropic always sends one, but be lenient).
fn is_message_stop_data(data: &[u8]) -> bool {
    data.len() < 128 && memmem::find(data, b"\"message_stop\"").is_some()
}

// ---------------------------------------------------------------------------------------------
// Generated text, counted for `[spend] cut_streams`.

/// Keys whose string values carry generated text in a streamed event: OpenAI chat
/// (`delta.content`, `delta.refusal`, tool calls' `function.name` and `function.arguments`
/// (Anthropic's and the Responses API's tool `name` too), the `reasoning` /
/// `reasoning_content` some OpenAI-compatible providers stream), legacy completions
/// (`choices[].text`), Anthropic's `content_block_delta` (`text`, `partial_json`, `thinking`),
/// Gemini-style `parts[].text`, and the Responses API's `*.delta` events (`delta`).
const TEXT_KEYS: [&[u8]; 10] = [
    b"content",
    b"name",
    b"text",
    b"arguments",
    b"refusal",
    b"reasoning",
    b"reasoning_content",
    b"partial_json",
    b"thinking",
    b"delta",
];

/// An upper bound of the bytes of generated text an event carries: the JSON-escaped length of
/// every string value of a [`TEXT_KEYS`] key (an escape is never shorter than what it stands
/// for). Every token is at least one byte of text, so across a stream the sum bounds the
/// output tokens it showed. Events that repeat streamed text count 0 ([`repeats_text`]). One
/// pass over the data's quotes.
pub fn generated_bytes(event: &[u8], data: &[u8]) -> u64 {
    if repeats_text(event) {
        return 0;
    }
    let mut total = 0u64;
    let mut i = 0;
    // The key just read, if the string before a ':' was one of TEXT_KEYS.
    let mut counted_key = false;
    while let Some(q) = memchr::memchr(b'"', &data[i..]) {
        let start = i + q + 1;
        let Some(end) = string_end(data, start) else {
            break;
        };
        let s = &data[start..end];
        let mut j = end + 1;
        while data.get(j).is_some_and(u8::is_ascii_whitespace) {
            j += 1;
        }
        if data.get(j) == Some(&b':') {
            // A key: remember whether its value (if a string) is text.
            counted_key = TEXT_KEYS.contains(&s);
        } else {
            // A value (or an element of an array): count it if its key is a text key.
            if counted_key {
                total = total.saturating_add(s.len() as u64);
            }
            counted_key = false;
        }
        i = j;
    }
    total
}

/// The index of the closing quote of a JSON string whose content starts at `start`.
fn string_end(data: &[u8], start: usize) -> Option<usize> {
    let mut k = start;
    loop {
        let p = memchr::memchr2(b'"', b'\\', &data[k..])?;
        if data[k + p] == b'"' {
            return Some(k + p);
        }
        k += p + 2; // the escaped byte
        if k > data.len() {
            return None;
        }
    }
}

/// What an event over the cap counts for: nothing when it only repeats streamed text (see
/// [`repeats_text`]), else unknown: `u64::MAX` (a watched stream that cannot be measured is cut).
fn skipped_bytes(event: &[u8]) -> u64 {
    if repeats_text(event) {
        0
    } else {
        u64::MAX
    }
}

/// A Responses API event that carries no new text: of its events (`response.` names) only the
/// `*.delta` ones stream text, and the `*.added` ones name a tool call; `*.done` and
/// `response.completed` repeat what was streamed.
fn repeats_text(event: &[u8]) -> bool {
    event.starts_with(b"response.") && !event.ends_with(b".delta") && !event.ends_with(b".added")
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct StreamState {
    usage: Option<Usage>,
    model: Option<String>,
    done: bool,
}

impl StreamState {
    fn event(&mut self, dialect: Dialect, name: &[u8], data: &[u8]) {
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            return;
        }
        if matches!(
            name,
            b"message_stop" | b"response.completed" | b"response.incomplete" | b"response.failed"
        ) {
            self.done = true;
        }
        let want_usage = may_carry_usage(data);
        let want_model = self.model.is_none() && may_carry_model(data);
        if !want_usage && !want_model {
            if name.is_empty() && is_message_stop_data(data) {
                self.done = true;
            }
            return;
        }
        let Ok(env) = serde_json::from_slice::<Envelope<'_>>(data) else {
            return;
        };
        if matches!(
            env.kind.as_deref(),
            Some("message_stop" | "response.completed" | "response.incomplete" | "response.failed")
        ) {
            self.done = true;
        }
        if self.model.is_none() {
            self.model = env.model().map(str::to_owned);
        }
        if env.kind.as_deref() == Some("message_delta") {
            // Anthropic: cumulative counts; replace the fields that are present.
            if let Some(raw) = &env.usage {
                let u = self.usage.get_or_insert_with(Usage::default);
                if let Some(v) = raw.input_tokens {
                    u.input_tokens = v;
                }
                if let Some(v) = raw.cache_read_input_tokens {
                    u.cached_input_tokens = v;
                }
                if let Some(v) = raw.cache_creation_input_tokens {
                    u.cache_creation_tokens = v;
                }
                if let Some(v) = raw.output_tokens {
                    u.output_tokens = v;
                }
            }
            return;
        }
        if let Some(u) = env.usage(dialect) {
            self.usage = Some(u);
        }
    }
}

/// Parser plus accumulated usage for one response stream.
#[derive(Debug)]
pub struct SseUsage {
    parser: EventParser,
    dialect: Dialect,
    state: StreamState,
    /// Bytes of generated text, when asked for ([`SseUsage::count_output`]).
    output: Option<u64>,
}

impl SseUsage {
    pub fn new(dialect: Dialect) -> Self {
        Self::with_event_cap(dialect, DEFAULT_EVENT_CAP)
    }

    /// Like [`SseUsage::new`] with a custom bound on one event's data.
    pub fn with_event_cap(dialect: Dialect, cap: usize) -> Self {
        Self {
            parser: EventParser::new(cap),
            dialect,
            state: StreamState::default(),
            output: None,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let dialect = self.dialect;
        let state = &mut self.state;
        let output = &mut self.output;
        self.parser.feed(chunk, &mut |sig| match sig {
            Signal::Dispatch { event, data, .. } => {
                if let Some(n) = output {
                    *n = n.saturating_add(generated_bytes(event, data));
                }
                state.event(dialect, event, data);
            }
            Signal::Skipped { event, .. } => {
                if let Some(n) = output {
                    *n = n.saturating_add(skipped_bytes(event));
                }
            }
            Signal::Idle { .. } => {}
        });
    }

    /// From now on, count the bytes of generated text in the events (see [`generated_bytes`]):
    /// `[spend] cut_streams` reads them as a running upper bound of the output tokens.
    pub fn count_output(&mut self) {
        self.output.get_or_insert(0);
    }

    /// Bytes of generated text seen so far, when counting (see [`SseUsage::count_output`]).
    pub fn output_bytes(&self) -> Option<u64> {
        self.output
    }

    /// Call at end of input: handles a last event whose blank line never arrived (its last
    /// line must be complete). Optional; `usage()` works without it.
    pub fn finish(&mut self) {
        if let Some((event, data)) = self.parser.take_unterminated() {
            self.state.event(self.dialect, event, data);
        }
    }

    /// The usage seen so far (also for streams cut early).
    pub fn usage(&self) -> Option<Usage> {
        self.state.usage
    }

    pub fn model(&self) -> Option<&str> {
        self.state.model.as_deref()
    }

    /// Saw `[DONE]` (OpenAI chat), `message_stop` (Anthropic) or a terminal `response.*` event
    /// (OpenAI responses API: completed, incomplete or failed).
    pub fn saw_done(&self) -> bool {
        self.state.done
    }
}

// ---------------------------------------------------------------------------------------------

/// Whether an OpenAI chat chunk is the usage-only chunk: `"choices":[]` and a non-null `usage`.
fn is_usage_only_chunk(data: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Shape {
        #[serde(default)]
        choices: Option<Vec<IgnoredAny>>,
        #[serde(default)]
        usage: Option<IgnoredAny>,
    }
    if !may_carry_usage(data) {
        return false;
    }
    serde_json::from_slice::<Shape>(data)
        .is_ok_and(|s| s.usage.is_some() && s.choices.is_some_and(|c| c.is_empty()))
}

/// Rewrites an OpenAI SSE stream, removing the usage-only chunk (a data event whose JSON has
/// `"choices":[]` and a non-null usage). Bytes of every other event are passed through
/// unchanged. Only the bytes of an incomplete trailing event are held back until its blank line
/// arrives (an event over the cap is passed through as it comes).
#[derive(Debug)]
pub struct UsageChunkStripper {
    parser: EventParser,
    /// Raw bytes of the incomplete current event.
    held: Vec<u8>,
    /// The current event was already partly forwarded; it must be kept whatever it is.
    passthrough: bool,
    /// A dropped event ended with `\r` at the end of a chunk; drop a leading `\n` of the next.
    swallow_lf: bool,
    hold_limit: usize,
}

impl Default for UsageChunkStripper {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageChunkStripper {
    pub fn new() -> Self {
        Self::with_event_cap(DEFAULT_EVENT_CAP)
    }

    /// Like [`UsageChunkStripper::new`] with a custom bound on one event.
    pub fn with_event_cap(cap: usize) -> Self {
        Self {
            parser: EventParser::new(cap),
            held: Vec::new(),
            passthrough: false,
            swallow_lf: false,
            hold_limit: cap.saturating_mul(2),
        }
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        let mut seg = 0;
        let swallow = std::mem::take(&mut self.swallow_lf);
        if self.parser.pending_cr && chunk[0] == b'\n' && self.held.is_empty() {
            // The `\n` of a `\r\n` split across chunks belongs to what was already settled:
            // forward it, or drop it with the event it ended.
            if !swallow {
                out.push(b'\n');
            }
            seg = 1;
        }
        let held = &mut self.held;
        let passthrough = &mut self.passthrough;
        let mut dropped_at = None;
        self.parser.feed(chunk, &mut |sig| {
            let (end, keep) = match sig {
                Signal::Idle { end } | Signal::Skipped { end, .. } => (end, true),
                Signal::Dispatch { end, data, .. } => {
                    (end, *passthrough || !is_usage_only_chunk(data))
                }
            };
            if keep {
                out.extend_from_slice(held);
                out.extend_from_slice(&chunk[seg..end]);
            } else {
                dropped_at = Some(end);
            }
            held.clear();
            seg = end;
            *passthrough = false;
        });
        let rest = &chunk[seg..];
        if self.passthrough
            || self.parser.skipping()
            || self.held.len() + rest.len() > self.hold_limit
        {
            out.extend_from_slice(&self.held);
            out.extend_from_slice(rest);
            self.held.clear();
            self.passthrough = true;
        } else {
            self.held.extend_from_slice(rest);
        }
        if dropped_at == Some(chunk.len()) && self.parser.pending_cr {
            self.swallow_lf = true;
        }
    }

    /// End of input: flushes held bytes (an incomplete trailing event) unchanged.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held);
        self.held.clear();
        self.passthrough = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (input, cached, creation, output)
    type U = (u64, u64, u64, u64);

    fn u((input, cached, creation, output): U) -> Usage {
        Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            cache_creation_tokens: creation,
            output_tokens: output,
        }
    }

    /// (stream, dialect hint, usage, model, saw_done)
    type Case<'a> = (&'a str, Dialect, Option<U>, Option<&'a str>, bool);

    #[derive(Debug, PartialEq)]
    struct Seen {
        usage: Option<Usage>,
        model: Option<String>,
        done: bool,
    }

    fn run<'a>(dialect: Dialect, chunks: impl IntoIterator<Item = &'a [u8]>) -> Seen {
        let mut p = SseUsage::new(dialect);
        for c in chunks {
            p.feed(c);
        }
        Seen {
            usage: p.usage(),
            model: p.model().map(str::to_owned),
            done: p.saw_done(),
        }
    }

    /// Line-ending variants of a stream written with `\n`.
    fn variants(stream: &str) -> [String; 3] {
        [
            stream.to_owned(),
            stream.replace('\n', "\r\n"),
            stream.replace('\n', "\r"),
        ]
    }

    /// Feeds `stream` (in LF, CRLF and CR form) whole, byte by byte and split at every point,
    /// and checks that every way gives `expected`.
    fn check(stream: &str, dialect: Dialect, expected: (Option<U>, Option<&str>, bool)) {
        let want = Seen {
            usage: expected.0.map(u),
            model: expected.1.map(str::to_owned),
            done: expected.2,
        };
        for s in variants(stream) {
            let b = s.as_bytes();
            assert_eq!(run(dialect, [b]), want, "whole: {s:?}");
            assert_eq!(run(dialect, b.chunks(1)), want, "byte by byte: {s:?}");
            for i in 0..=b.len() {
                assert_eq!(
                    run(dialect, [&b[..i], &b[i..]]),
                    want,
                    "split at {i}: {s:?}"
                );
            }
        }
    }

    const OPENAI_CHAT: &str = concat!(
        r#"data: {"id":"chatcmpl-AbC","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-AbC","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"content":"Say \"usage\": {} ok"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-AbC","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-AbC","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":12,"total_tokens":2018,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    const ANTHROPIC: &str = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":100,"output_tokens":1}}}"#,
        "\n\n",
        "event: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        "\n\n",
        "event: ping\n",
        r#"data: {"type": "ping"}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}}"#,
        "\n\n",
        "event: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        "\n\n",
        "event: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n",
    );

    const RESPONSES: &str = concat!(
        "event: response.created\n",
        r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}"#,
        "\n\n",
        "event: response.output_item.added\n",
        r#"data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c5","type":"message","status":"in_progress","role":"assistant","content":[]}}"#,
        "\n\n",
        "event: response.output_text.delta\n",
        r#"data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c5","output_index":0,"content_index":0,"delta":"Hi"}"#,
        "\n\n",
        "event: response.completed\n",
        r#"data: {"type":"response.completed","sequence_number":8,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec","object":"response","created_at":1741290958,"status":"completed","error":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c5","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi","annotations":[]}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":5},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48},"user":null,"metadata":{}}}"#,
        "\n\n",
    );

    const GEMINI: &str = concat!(
        r#"data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 6,"totalTokenCount": 6,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 6}]},"modelVersion": "gemini-2.0-flash","responseId": "Q8hVaKbLM"}"#,
        "\n\n",
        r#"data: {"candidates": [{"content": {"parts": [{"text": " sky is blue."}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 6,"candidatesTokenCount": 40,"totalTokenCount": 146,"thoughtsTokenCount": 100,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 6}]},"modelVersion": "gemini-2.0-flash","responseId": "Q8hVaKbLM"}"#,
        "\n\n",
    );

    #[test]
    fn generated_text_is_counted_in_bytes() {
        // (event name, data) → bytes of generated text (JSON-escaped length)
        let check = |event: &str, data: &str, expected: u64| {
            assert_eq!(
                generated_bytes(event.as_bytes(), data.as_bytes()),
                expected,
                "{event} {data}"
            );
        };
        // OpenAI chat: the role chunk, text, an escape (2 bytes for 1), a tool call, the end.
        check(
            "",
            r#"{"id":"c1","model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null}}]}"#,
            0,
        );
        check(
            "",
            r#"{"id":"c1","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null}]}"#,
            5,
        );
        check("", r#"{"choices":[{"delta":{"content":"a\"b\n"}}]}"#, 6);
        check("", r#"{"choices":[{"delta":{"content":"é"}}]}"#, 2);
        check(
            "",
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":"{\"a\":1}"}}]}}]}"#,
            3 + 9,
        );
        check(
            "",
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}"#,
            0,
        );
        check("", "[DONE]", 0);
        // Several choices, reasoning of OpenAI-compatible providers, legacy completions.
        check(
            "",
            r#"{"choices":[{"index":0,"delta":{"content":"ab"}},{"index":1,"delta":{"content":"cde"}}]}"#,
            5,
        );
        check(
            "",
            r#"{"choices":[{"delta":{"reasoning_content":"think"}}]}"#,
            5,
        );
        check("", r#"{"choices":[{"text":"xyz","index":0}]}"#, 3);
        // A key's text inside a string is text, not a key.
        check(
            "",
            r#"{"choices":[{"delta":{"content":"say \"content\": \"x\""}}]}"#,
            22,
        );
        // Anthropic: text, tool input, thinking; the signature and the envelope are not text.
        check(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi there"}}"#,
            8,
        );
        check(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"loc"}}"#,
            6,
        );
        check(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
            3,
        );
        check(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQB"}}"#,
            0,
        );
        check(
            "content_block_start",
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}"#,
            11,
        );
        check(
            "message_start",
            r#"{"type":"message_start","message":{"id":"m","role":"assistant","model":"claude","content":[],"usage":{"input_tokens":9,"output_tokens":1}}}"#,
            0,
        );
        check(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
            0,
        );
        // Responses API: deltas count, the events that repeat the text do not.
        check(
            "response.output_text.delta",
            r#"{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hel"}"#,
            3,
        );
        check(
            "response.function_call_arguments.delta",
            r#"{"type":"response.function_call_arguments.delta","delta":"{\"a"}"#,
            4,
        );
        check(
            "response.output_item.added",
            r#"{"type":"response.output_item.added","item":{"type":"function_call","name":"get","arguments":""}}"#,
            3,
        );
        check(
            "response.output_text.done",
            r#"{"type":"response.output_text.done","text":"Hello"}"#,
            0,
        );
        check(
            "response.completed",
            r#"{"type":"response.completed","response":{"output":[{"content":[{"text":"Hello"}]}]}}"#,
            0,
        );
        // Not JSON, or cut short: whatever strings end.
        check("", "not json", 0);
        check("", r#"{"content":"abc"#, 0);
        check("", r#"{"content":"ab\"#, 0);
    }

    #[test]
    fn a_counting_stream_sums_its_events_across_chunks() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" world\"}}]}\n\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut p = SseUsage::new(Dialect::OpenAi);
            assert_eq!(p.output_bytes(), None, "not counting unless asked");
            p.count_output();
            p.feed(&stream.as_bytes()[..split]);
            p.feed(&stream.as_bytes()[split..]);
            assert_eq!(p.output_bytes(), Some(11), "split at {split}");
        }
        // An event over the cap cannot be measured: the bound is unknown (a watched stream is
        // cut); one that repeats streamed text counts nothing.
        let mut p = SseUsage::with_event_cap(Dialect::OpenAi, 30);
        p.count_output();
        p.feed(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{}}\n\n");
        assert_eq!(p.output_bytes(), Some(0));
        p.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a long line\"}}]}\n\n");
        assert_eq!(p.output_bytes(), Some(u64::MAX));
    }

    #[test]
    fn formats() {
        use Dialect::*;
        let table: &[Case<'_>] = &[
            (
                OPENAI_CHAT,
                OpenAi,
                Some((86, 1920, 0, 12)),
                Some("gpt-4o-mini-2024-07-18"),
                true,
            ),
            (
                OPENAI_CHAT,
                Generic,
                Some((86, 1920, 0, 12)),
                Some("gpt-4o-mini-2024-07-18"),
                true,
            ),
            (
                ANTHROPIC,
                Anthropic,
                Some((25, 100, 0, 15)),
                Some("claude-sonnet-4-5-20250929"),
                true,
            ),
            (
                ANTHROPIC,
                Generic,
                Some((25, 100, 0, 15)),
                Some("claude-sonnet-4-5-20250929"),
                true,
            ),
            (
                ANTHROPIC,
                OpenAi,
                Some((25, 100, 0, 15)),
                Some("claude-sonnet-4-5-20250929"),
                true,
            ),
            (
                RESPONSES,
                OpenAi,
                Some((32, 5, 0, 11)),
                Some("gpt-4.1-2025-04-14"),
                true,
            ),
            (
                RESPONSES,
                Generic,
                Some((32, 5, 0, 11)),
                Some("gpt-4.1-2025-04-14"),
                true,
            ),
            (
                GEMINI,
                Generic,
                Some((6, 0, 0, 140)),
                Some("gemini-2.0-flash"),
                false,
            ),
        ];
        for &(stream, dialect, usage, model, done) in table {
            check(stream, dialect, (usage, model, done));
        }
    }

    #[test]
    fn streams_cut_early() {
        use Dialect::*;
        let cut = |s: &str, marker: &str| s[..s.find(marker).expect("marker")].to_owned();
        let anthropic_no_delta = cut(ANTHROPIC, "event: message_delta");
        let anthropic_mid_start = cut(ANTHROPIC, r#""usage":{"input_tokens":25"#);
        let openai_no_usage = cut(
            OPENAI_CHAT,
            r#"data: {"id":"chatcmpl-AbC","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[],"#,
        );
        let openai_no_done = cut(OPENAI_CHAT, "data: [DONE]");
        let responses_no_completed = cut(RESPONSES, "event: response.completed");
        let gemini_first = cut(
            GEMINI,
            r#"data: {"candidates": [{"content": {"parts": [{"text": " sky"#,
        );
        let table: &[Case<'_>] = &[
            (
                &anthropic_no_delta,
                Anthropic,
                Some((25, 100, 0, 1)),
                Some("claude-sonnet-4-5-20250929"),
                false,
            ),
            (&anthropic_mid_start, Anthropic, None, None, false),
            (
                &openai_no_usage,
                OpenAi,
                None,
                Some("gpt-4o-mini-2024-07-18"),
                false,
            ),
            (
                &openai_no_done,
                OpenAi,
                Some((86, 1920, 0, 12)),
                Some("gpt-4o-mini-2024-07-18"),
                false,
            ),
            (
                &responses_no_completed,
                OpenAi,
                None,
                Some("gpt-4.1-2025-04-14"),
                false,
            ),
            (
                &gemini_first,
                Generic,
                Some((6, 0, 0, 0)),
                Some("gemini-2.0-flash"),
                false,
            ),
            ("", Generic, None, None, false),
        ];
        for &(stream, dialect, usage, model, done) in table {
            check(stream, dialect, (usage, model, done));
        }
    }

    #[test]
    fn framing() {
        use Dialect::*;
        let usage_chunk =
            r#"{"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let table: &[(String, Option<U>, Option<&str>, bool)] = &[
            // no space after the colon; the single optional space only
            (format!("data:{usage_chunk}\n\ndata:[DONE]\n\n"), Some((3, 0, 0, 4)), Some("m"), true),
            ("data:  [DONE]\n\n".to_owned(), None, None, true),
            // comments and keep-alives anywhere, also between the lines of one event
            (format!(": OPENROUTER PROCESSING\n\n:\ndata: {usage_chunk}\n: mid-event\n\n: bye\n"), Some((3, 0, 0, 4)), Some("m"), false),
            // multi-line data joined with \n
            ("data: {\"model\":\"m\",\ndata: \"usage\":\ndata: {\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n".to_owned(), Some((1, 0, 0, 2)), Some("m"), false),
            // `data` without colon is an empty data line
            ("data\ndata: {\"model\":\"m\",\"usage\":{\"prompt_tokens\":1}}\n\n".to_owned(), Some((1, 0, 0, 0)), Some("m"), false),
            // id / retry / unknown fields are ignored
            (format!("id: 7\nretry: 1000\nfoo: bar\ndata: {usage_chunk}\n\n"), Some((3, 0, 0, 4)), Some("m"), false),
            // an event without its blank line is not dispatched
            (format!("data: {usage_chunk}\n"), None, None, false),
            (format!("data: {usage_chunk}"), None, None, false),
            // `event:` without data dispatches nothing; the name does not leak into the next event
            ("event: message_stop\n\ndata: {}\n\n".to_owned(), None, None, false),
            // last usage wins; the model is the first one seen
            (format!("data: {usage_chunk}\n\ndata: {{\"model\":\"n\",\"usage\":{{\"prompt_tokens\":9}}}}\n\n"), Some((9, 0, 0, 0)), Some("m"), false),
            // a usage chunk with non-empty choices (some providers) still counts
            ("data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6,\"total_tokens\":11}}\n\n".to_owned(), Some((5, 0, 0, 6)), Some("m"), false),
            // invalid JSON is ignored
            ("data: {\"usage\":{\"prompt_tokens\":1\n\ndata: {\"usage\" : {\"prompt_tokens\":2}}\n\n".to_owned(), Some((2, 0, 0, 0)), None, false),
            // Anthropic stop without an event line
            ("data: {\"type\":\"message_stop\"}\n\n".to_owned(), None, None, true),
            // Anthropic message_delta carrying cumulative input/cache fields (newer API versions)
            (
                concat!(
                    "event: message_start\n",
                    r#"data: {"type":"message_start","message":{"model":"claude-opus-4-1","usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
                    "\n\nevent: message_delta\n",
                    r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"input_tokens":12,"cache_creation_input_tokens":30,"cache_read_input_tokens":null,"output_tokens":7}}"#,
                    "\n\nevent: message_delta\n",
                    r#"data: {"type":"message_delta","delta":{},"usage":{"output_tokens":9}}"#,
                    "\n\n"
                )
                .to_owned(),
                Some((12, 0, 30, 9)),
                Some("claude-opus-4-1"),
                false,
            ),
            // message_delta without message_start
            ("event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":4}}\n\n".to_owned(), Some((0, 0, 0, 4)), None, false),
            // responses API terminal events other than completed
            (
                "event: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"model\":\"o3\",\"status\":\"incomplete\",\"usage\":{\"input_tokens\":9,\"output_tokens\":100,\"total_tokens\":109}}}\n\n".to_owned(),
                Some((9, 0, 0, 100)),
                Some("o3"),
                true,
            ),
            // UTF-8 in payloads (split inside characters by `check`)
            ("data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"héllo ✓ 🦀\"}}]}\n\n".to_owned(), None, Some("m"), false),
            // blank lines galore
            (format!("\n\n\n\ndata: {usage_chunk}\n\n\n\n"), Some((3, 0, 0, 4)), Some("m"), false),
        ];
        for (stream, usage, model, done) in table {
            check(stream, Generic, (*usage, *model, *done));
        }
    }

    #[test]
    fn mixed_line_endings() {
        let s = "data: {\"model\":\"m\",\r\ndata: \"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\r\ndata: [DONE]\n\r";
        let want = Seen {
            usage: Some(u((1, 0, 0, 2))),
            model: Some("m".to_owned()),
            done: true,
        };
        let b = s.as_bytes();
        assert_eq!(run(Dialect::Generic, [b]), want);
        for i in 0..=b.len() {
            assert_eq!(
                run(Dialect::Generic, [&b[..i], &b[i..]]),
                want,
                "split at {i}"
            );
        }
        // "\r\r\n" is two line ends (CR, then CRLF): the second dispatches nothing extra.
    }

    #[test]
    fn finish_dispatches_unterminated_event() {
        let table: &[(&str, Option<U>)] = &[
            (
                "data: {\"usage\":{\"prompt_tokens\":1}}\n",
                Some((1, 0, 0, 0)),
            ),
            (
                "data: {\"usage\":{\"prompt_tokens\":1}}\r",
                Some((1, 0, 0, 0)),
            ),
            // last line incomplete: not dispatched
            ("data: {\"usage\":{\"prompt_tokens\":1}}", None),
            (
                "data: {\"usage\":{\"prompt_tokens\":1}}\n\n",
                Some((1, 0, 0, 0)),
            ),
        ];
        for &(s, want) in table {
            let mut p = SseUsage::new(Dialect::OpenAi);
            p.feed(s.as_bytes());
            p.finish();
            assert_eq!(p.usage(), want.map(u), "{s:?}");
        }
    }

    #[test]
    fn oversized_events_are_skipped() {
        let big = format!(
            "data: {{\"model\":\"m\",\"usage\":{{\"prompt_tokens\":99}},\"pad\":\"{}\"}}\n\n",
            "x".repeat(200)
        );
        let multi = format!(
            "data: {{\"model\":\"m\",\ndata: \"usage\":{{\"prompt_tokens\":98}},\ndata: \"pad\":\"{}\"}}\n\n",
            "x".repeat(60)
        );
        let small = "data: {\"model\":\"s\",\"usage\":{\"prompt_tokens\":1}}\n\n";
        let table: &[(String, Option<U>, Option<&str>)] = &[
            (format!("{big}{small}"), Some((1, 0, 0, 0)), Some("s")),
            (format!("{small}{big}"), Some((1, 0, 0, 0)), Some("s")),
            (format!("{multi}{small}"), Some((1, 0, 0, 0)), Some("s")),
            (big.clone(), None, None),
        ];
        for (stream, usage, model) in table {
            let b = stream.as_bytes();
            for i in 0..=b.len() {
                let mut p = SseUsage::with_event_cap(Dialect::OpenAi, 100);
                p.feed(&b[..i]);
                p.feed(&b[i..]);
                assert_eq!(p.usage(), usage.map(u), "split {i}: {stream}");
                assert_eq!(p.model(), *model, "split {i}: {stream}");
                // buffers stay bounded
                assert!(p.parser.line.capacity() <= 200 && p.parser.data.capacity() <= 200);
            }
        }
    }

    /// Found by the `sse` fuzz target: a line whose `data` value fits the cap but whose whole
    /// line (`data: ` included) does not was dispatched when it came in one chunk and skipped
    /// when cut across two. It is over the cap either way.
    #[test]
    fn a_line_over_the_cap_is_skipped_wherever_the_chunks_are_cut() {
        let value = r#"{"type":"message_stop","pad":"xxxxxxxxxxxxxx"}"#;
        let cap = value.len() + 3; // the value fits, "data: " + value does not
        for stream in [format!("data: {value}\n\n"), format!("data: {value}\n")] {
            let b = stream.as_bytes();
            for i in 0..=b.len() {
                let mut p = SseUsage::with_event_cap(Dialect::Anthropic, cap);
                p.feed(&b[..i]);
                p.feed(&b[i..]);
                p.finish();
                assert!(!p.saw_done(), "split {i}: {stream:?}");
            }
        }
    }

    #[test]
    fn content_deltas_are_not_parsed() {
        // pre-filter table: (data, may carry usage)
        let table: &[(&str, bool)] = &[
            (
                r#"{"choices":[{"delta":{"content":"hi"}}],"usage":null}"#,
                false,
            ),
            (r#"{"choices":[],"usage" : null }"#, false),
            (r#"{"choices":[],"usage":{"prompt_tokens":1}}"#, true),
            (r#"{"choices":[],"usage" :{"prompt_tokens":1}}"#, true),
            (r#"{"usage":null,"x":{"usage":{}}}"#, true),
            (r#"{"usageMetadata": {"promptTokenCount": 6}}"#, true),
            (
                r#"{"type":"content_block_delta","delta":{"text":"usage"}}"#,
                false,
            ),
            (r#"{"usage_x":1}"#, false),
            (r#"{"usage"#, false),
            (r#"{"usage""#, false),
            (r#"{"usage":"#, true),
            ("", false),
        ];
        for &(data, want) in table {
            assert_eq!(may_carry_usage(data.as_bytes()), want, "{data}");
        }
    }

    // --- stripper ---------------------------------------------------------------------------

    fn strip<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut s = UsageChunkStripper::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    /// Strips `input` whole, byte by byte and split at every point; all must equal `expected`.
    fn check_strip(input: &str, expected: &str) {
        let (b, want) = (input.as_bytes(), expected.as_bytes());
        let show = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        assert_eq!(show(&strip([b])), expected, "whole: {input:?}");
        assert_eq!(
            show(&strip(b.chunks(1))),
            expected,
            "byte by byte: {input:?}"
        );
        for i in 0..=b.len() {
            let got = strip([&b[..i], &b[i..]]);
            assert!(
                got == want,
                "split at {i}: {input:?}\n got {:?}",
                show(&got)
            );
        }
    }

    #[test]
    fn stripper() {
        let usage_event = r#"data: {"id":"chatcmpl-AbC","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_44709d6fcb","choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":12,"total_tokens":2018,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#;
        let full = OPENAI_CHAT;
        let stripped = full.replace(&format!("{usage_event}\n\n"), "");
        assert_ne!(full, stripped);
        let with_choices = "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1}}\n\n";
        let azure_filter = "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0}]}\n\n";
        let table: &[(String, String)] = &[
            (full.to_owned(), stripped.clone()),
            // CRLF / CR forms
            (full.replace('\n', "\r\n"), stripped.replace('\n', "\r\n")),
            (full.replace('\n', "\r"), stripped.replace('\n', "\r")),
            // nothing to strip
            (stripped.clone(), stripped.clone()),
            (with_choices.to_owned(), with_choices.to_owned()),
            (azure_filter.to_owned(), azure_filter.to_owned()),
            ("data: {\"choices\":[],\"usage\":null}\n\n".to_owned(), "data: {\"choices\":[],\"usage\":null}\n\n".to_owned()),
            // comments, keep-alives and odd blank lines are preserved
            (
                format!(": ping\n\n\n{usage_event}\n\n: ping\n\ndata: [DONE]\n\n"),
                ": ping\n\n\n: ping\n\ndata: [DONE]\n\n".to_owned(),
            ),
            // a comment inside the usage event goes with it
            (
                "data: {\"choices\":[],\n: c\ndata: \"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n".to_owned(),
                "data: [DONE]\n\n".to_owned(),
            ),
            // trailing incomplete event is flushed unchanged by finish()
            (format!("{usage_event}\n"), format!("{usage_event}\n")),
            (format!("data: [DONE]\n\n{usage_event}"), format!("data: [DONE]\n\n{usage_event}")),
            // UTF-8 and mixed endings
            (
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"✓🦀\"}}}}]}}\r\n\r\n{usage_event}\r\n\r\ndata: [DONE]\n\n"),
                "data: {\"choices\":[{\"delta\":{\"content\":\"✓🦀\"}}]}\r\n\r\ndata: [DONE]\n\n".to_owned(),
            ),
            (String::new(), String::new()),
        ];
        for (input, expected) in table {
            check_strip(input, expected);
        }
    }

    #[test]
    fn stripper_holds_only_the_incomplete_event() {
        let mut s = UsageChunkStripper::new();
        let mut out = Vec::new();
        let steps: &[(&str, &str)] = &[
            (": keep-alive\n\n", ": keep-alive\n\n"),
            ("data: {\"choices\":[{\"delta\":{}}]}\n", ""),
            ("\ndata: {\"cho", "\n"),
            ("ices\":[],\"usage\":{\"prompt_tokens\":1}}\n", ""),
            ("\n", ""),
            ("data: [DONE]\n\n", "data: [DONE]\n\n"),
        ];
        let mut want = String::new();
        for (i, &(input, newly)) in steps.iter().enumerate() {
            s.feed(input.as_bytes(), &mut out);
            if i == 2 {
                want.push_str("data: {\"choices\":[{\"delta\":{}}]}\n");
            }
            want.push_str(newly);
            assert_eq!(String::from_utf8_lossy(&out), want, "after step {i}");
        }
    }

    #[test]
    fn stripper_passes_oversized_events_through() {
        let big = format!(
            "data: {{\"choices\":[],\"usage\":{{\"p\":\"{}\"}}}}\n\n",
            "x".repeat(300)
        );
        let mut s = UsageChunkStripper::with_event_cap(100);
        let mut out = Vec::new();
        let b = big.as_bytes();
        s.feed(&b[..150], &mut out);
        assert_eq!(
            out.len(),
            150,
            "forwarded without waiting for the blank line"
        );
        s.feed(&b[150..], &mut out);
        s.finish(&mut out);
        assert_eq!(out, b);
    }

    proptest! {
        #[test]
        fn random_splits(
            which in 0usize..4,
            ending in 0usize..3,
            mut cuts in proptest::collection::vec(0usize..4000, 0..12),
        ) {
            let (stream, dialect) = [
                (OPENAI_CHAT, Dialect::OpenAi),
                (ANTHROPIC, Dialect::Anthropic),
                (RESPONSES, Dialect::Generic),
                (GEMINI, Dialect::Generic),
            ][which];
            let s = &variants(stream)[ending];
            let b = s.as_bytes();
            let whole = run(dialect, [b]);
            cuts.iter_mut().for_each(|c| *c %= b.len() + 1);
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for &c in &cuts {
                chunks.push(&b[prev..c]);
                prev = c;
            }
            chunks.push(&b[prev..]);
            prop_assert_eq!(run(dialect, chunks.iter().copied()), whole);
            if which == 0 {
                let expected = strip([b]);
                prop_assert_eq!(strip(chunks.iter().copied()), expected);
            }
        }
    }

    /// `cargo test --release --lib throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn throughput() {
        let chunk = |i: usize| {
            format!(
                "data: {{\"id\":\"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_fc9f1d7035\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
            )
        };
        let mut stream = String::new();
        let mut i = 0;
        while stream.len() < 64 << 20 {
            stream.push_str(&chunk(i));
            i += 1;
        }
        stream.push_str(&OPENAI_CHAT[OPENAI_CHAT.find("data: {\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"created\":1694268190,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[],").expect("usage chunk")..]);
        let b = stream.as_bytes();
        for &chunk_len in &[1024usize, 4096, 16384] {
            let t = std::time::Instant::now();
            let mut p = SseUsage::new(Dialect::OpenAi);
            for c in b.chunks(chunk_len) {
                p.feed(c);
            }
            let dt = t.elapsed();
            assert_eq!(p.usage(), Some(u((86, 1920, 0, 12))));
            assert!(p.saw_done());
            println!(
                "SseUsage  chunk {chunk_len:>5}: {:.0} MB in {dt:?} = {:.2} GB/s",
                b.len() as f64 / 1e6,
                b.len() as f64 / dt.as_secs_f64() / 1e9
            );
            let t = std::time::Instant::now();
            let mut s = UsageChunkStripper::new();
            let mut out = Vec::with_capacity(chunk_len * 2);
            let mut n = 0;
            for c in b.chunks(chunk_len) {
                out.clear();
                s.feed(c, &mut out);
                n += out.len();
            }
            let dt = t.elapsed();
            assert!(n < b.len());
            println!(
                "Stripper  chunk {chunk_len:>5}: {:.2} GB/s",
                b.len() as f64 / dt.as_secs_f64() / 1e9
            );
        }
    }
}
