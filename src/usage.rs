//! Token-usage extraction: normalises the usage blocks of OpenAI (chat + responses), Anthropic and
//! Gemini JSON bodies into [`Usage`]. Pure; what is read from request bodies is in `request.rs`.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Normalised token counts for one request. All fields are disjoint so cost is a plain sum.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Uncached prompt tokens (billed at the input price).
    pub input_tokens: u64,
    /// Prompt tokens read from cache (OpenAI `cached_tokens`, Anthropic `cache_read_input_tokens`,
    /// Gemini `cachedContentTokenCount`).
    pub cached_input_tokens: u64,
    /// Anthropic `cache_creation_input_tokens`.
    pub cache_creation_tokens: u64,
    /// Completion/output tokens (Gemini: `candidatesTokenCount + thoughtsTokenCount`).
    pub output_tokens: u64,
}

impl Usage {
    /// All prompt-side tokens: input + cached + cache creation.
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cached_input_tokens)
            .saturating_add(self.cache_creation_tokens)
    }

    /// Prompt plus output tokens.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens().saturating_add(self.output_tokens)
    }
}

/// Which upstream API family a body came from; decides how the ambiguous `usage.input_tokens`
/// is read (OpenAI responses: includes cached tokens; Anthropic: excludes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
    /// Detect from the fields present.
    Generic,
}

/// Usage, model and provider error found in a body.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub usage: Option<Usage>,
    pub model: Option<String>,
    /// An error object's `type`/`code`/`status` joined with `/` (OpenAI, Anthropic, Gemini).
    pub error: Option<String>,
}

/// Extracts usage and model from a whole JSON response body (an object, or a JSON array of
/// objects such as Gemini's non-SSE `streamGenerateContent`, where the last usage wins).
/// Invalid JSON yields `Extracted { usage: None, model: None }`.
pub fn from_json(body: &[u8], dialect: Dialect) -> Extracted {
    parse_body(body, dialect).unwrap_or_default()
}

/// Parses a whole body; `None` when it is not valid JSON of a supported shape.
fn parse_body(body: &[u8], dialect: Dialect) -> Option<Extracted> {
    match first_non_ws(body) {
        Some(b'{') => {
            let env: Envelope<'_> = serde_json::from_slice(body).ok()?;
            Some(Extracted {
                usage: env.usage(dialect),
                model: env.model().map(str::to_owned),
                error: env.error.as_ref().and_then(provider_error),
            })
        }
        Some(b'[') => {
            let envs: Vec<Envelope<'_>> = serde_json::from_slice(body).ok()?;
            let mut out = Extracted::default();
            for env in &envs {
                if let Some(u) = env.usage(dialect) {
                    out.usage = Some(u);
                }
                if out.model.is_none() {
                    out.model = env.model().map(str::to_owned);
                }
                if out.error.is_none() {
                    out.error = env.error.as_ref().and_then(provider_error);
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// Longest provider error label kept (it comes from the upstream, so it is bounded).
const MAX_PROVIDER_ERROR: usize = 100;

/// `type`/`code`/`status` of a provider's error object, joined with `/`: OpenAI's
/// `{"type":"invalid_request_error","code":"invalid_api_key"}`, Anthropic's
/// `{"type":"overloaded_error"}`, Gemini's `{"code":429,"status":"RESOURCE_EXHAUSTED"}`.
fn provider_error(error: &serde_json::Value) -> Option<String> {
    let field = |name: &str| match error.get(name)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let parts: Vec<String> = ["type", "code", "status"]
        .iter()
        .filter_map(|f| field(f))
        .collect();
    if parts.is_empty() {
        return None;
    }
    let mut joined = parts.join("/");
    if joined.len() > MAX_PROVIDER_ERROR {
        let mut end = MAX_PROVIDER_ERROR;
        while !joined.is_char_boundary(end) {
            end -= 1;
        }
        joined.truncate(end);
    }
    Some(joined)
}

/// The first byte that is not JSON whitespace.
pub(crate) fn first_non_ws(body: &[u8]) -> Option<u8> {
    body.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// Outcome of [`JsonBodyCollector::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonOutcome {
    Parsed(Extracted),
    /// The body was longer than the collector's cap.
    TooLarge,
    /// The body was not a JSON object/array.
    Invalid,
}

/// Incremental collector for a non-streaming JSON body fed chunk by chunk; buffers at most
/// `cap` bytes.
#[derive(Debug)]
pub struct JsonBodyCollector {
    buf: Vec<u8>,
    cap: usize,
    too_large: bool,
}

impl JsonBodyCollector {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            too_large: false,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.too_large {
            return;
        }
        if self.buf.len().saturating_add(chunk.len()) > self.cap {
            self.too_large = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(chunk);
    }

    pub fn finish(self, dialect: Dialect) -> JsonOutcome {
        if self.too_large {
            return JsonOutcome::TooLarge;
        }
        match parse_body(&self.buf, dialect) {
            Some(e) => JsonOutcome::Parsed(e),
            None => JsonOutcome::Invalid,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Typed response shapes (shared with the SSE module).

/// One JSON response object or stream event, covering every supported format.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct Envelope<'a> {
    #[serde(borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(rename = "modelVersion", borrow)]
    pub model_version: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub object: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "lenient_obj")]
    pub usage: Option<RawUsage>,
    #[serde(rename = "usageMetadata", deserialize_with = "lenient_obj")]
    pub usage_metadata: Option<GeminiUsage>,
    /// Anthropic `message_start`.
    #[serde(borrow, deserialize_with = "lenient_obj")]
    pub message: Option<Inner<'a>>,
    /// OpenAI responses API stream events (`response.completed` etc.).
    #[serde(borrow, deserialize_with = "lenient_obj")]
    pub response: Option<Inner<'a>>,
    /// An error object (error responses; only read when present).
    #[serde(deserialize_with = "lenient_obj")]
    pub error: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct Inner<'a> {
    #[serde(borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(deserialize_with = "lenient_obj")]
    pub usage: Option<RawUsage>,
}

/// The union of OpenAI chat, OpenAI responses and Anthropic usage fields.
#[derive(Deserialize, Default, Debug, Clone, Copy)]
#[serde(default)]
pub(crate) struct RawUsage {
    #[serde(deserialize_with = "lenient_u64")]
    pub prompt_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub completion_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_obj")]
    pub prompt_tokens_details: Option<Details>,
    #[serde(deserialize_with = "lenient_u64")]
    pub input_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub output_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_obj")]
    pub input_tokens_details: Option<Details>,
    #[serde(deserialize_with = "lenient_u64")]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub cache_read_input_tokens: Option<u64>,
}

#[derive(Deserialize, Default, Debug, Clone, Copy)]
#[serde(default)]
pub(crate) struct Details {
    #[serde(deserialize_with = "lenient_u64")]
    pub cached_tokens: Option<u64>,
}

#[derive(Deserialize, Default, Debug, Clone, Copy)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct GeminiUsage {
    #[serde(deserialize_with = "lenient_u64")]
    pub prompt_token_count: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub candidates_token_count: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub cached_content_token_count: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub thoughts_token_count: Option<u64>,
    #[serde(deserialize_with = "lenient_u64")]
    pub tool_use_prompt_token_count: Option<u64>,
}

/// How to read `input_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// `input_tokens` includes `input_tokens_details.cached_tokens`.
    OpenAiResponses,
    /// `input_tokens` excludes the `cache_*` fields.
    Anthropic,
}

impl Envelope<'_> {
    /// The model name: `model`, Gemini `modelVersion`, `message.model` or `response.model`.
    pub fn model(&self) -> Option<&str> {
        self.model
            .as_deref()
            .or(self.model_version.as_deref())
            .or(self.message.as_ref().and_then(|m| m.model.as_deref()))
            .or(self.response.as_ref().and_then(|r| r.model.as_deref()))
    }

    fn kind_is_anthropic(&self) -> bool {
        matches!(
            self.kind.as_deref(),
            Some("message" | "message_start" | "message_delta")
        )
    }

    fn kind_is_openai(&self) -> bool {
        self.object.as_deref() == Some("response")
            || self
                .kind
                .as_deref()
                .is_some_and(|k| k.starts_with("response."))
    }

    /// The style for the top-level `usage` object.
    pub fn style(&self, dialect: Dialect, raw: &RawUsage) -> Style {
        match dialect {
            Dialect::OpenAi => Style::OpenAiResponses,
            Dialect::Anthropic => Style::Anthropic,
            Dialect::Generic => {
                if self.kind_is_anthropic()
                    || raw.cache_creation_input_tokens.is_some()
                    || raw.cache_read_input_tokens.is_some()
                {
                    Style::Anthropic
                } else if self.kind_is_openai() || raw.input_tokens_details.is_some() {
                    Style::OpenAiResponses
                } else {
                    // Without cache fields both readings give the same numbers.
                    Style::Anthropic
                }
            }
        }
    }

    /// The usage carried by this object, whichever format it is in.
    pub fn usage(&self, dialect: Dialect) -> Option<Usage> {
        if let Some(raw) = &self.usage {
            if let Some(u) = raw.normalise(self.style(dialect, raw)) {
                return Some(u);
            }
        }
        if let Some(u) = self
            .response
            .as_ref()
            .and_then(|r| r.usage.as_ref())
            .and_then(|raw| raw.normalise(Style::OpenAiResponses))
        {
            return Some(u);
        }
        if let Some(u) = self
            .message
            .as_ref()
            .and_then(|m| m.usage.as_ref())
            .and_then(|raw| raw.normalise(Style::Anthropic))
        {
            return Some(u);
        }
        self.usage_metadata
            .as_ref()
            .and_then(GeminiUsage::normalise)
    }
}

impl RawUsage {
    /// `None` when no token field is present at all.
    pub fn normalise(&self, style: Style) -> Option<Usage> {
        if self.prompt_tokens.is_some() || self.completion_tokens.is_some() {
            // OpenAI chat completions: prompt_tokens includes cached tokens.
            let prompt = self.prompt_tokens.unwrap_or(0);
            let cached = self
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0)
                .min(prompt);
            return Some(Usage {
                input_tokens: prompt - cached,
                cached_input_tokens: cached,
                cache_creation_tokens: 0,
                output_tokens: self.completion_tokens.unwrap_or(0),
            });
        }
        if self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.cache_creation_input_tokens.is_none()
            && self.cache_read_input_tokens.is_none()
        {
            return None;
        }
        let input = self.input_tokens.unwrap_or(0);
        let output = self.output_tokens.unwrap_or(0);
        Some(match style {
            Style::OpenAiResponses => {
                let cached = self
                    .input_tokens_details
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0)
                    .min(input);
                Usage {
                    input_tokens: input - cached,
                    cached_input_tokens: cached,
                    cache_creation_tokens: 0,
                    output_tokens: output,
                }
            }
            Style::Anthropic => Usage {
                input_tokens: input,
                cached_input_tokens: self.cache_read_input_tokens.unwrap_or(0),
                cache_creation_tokens: self.cache_creation_input_tokens.unwrap_or(0),
                output_tokens: output,
            },
        })
    }
}

impl GeminiUsage {
    /// `promptTokenCount` includes `cachedContentTokenCount`; tool-use prompt tokens are billed
    /// as input; thinking tokens are billed as output.
    pub fn normalise(&self) -> Option<Usage> {
        if self.prompt_token_count.is_none()
            && self.candidates_token_count.is_none()
            && self.cached_content_token_count.is_none()
            && self.thoughts_token_count.is_none()
            && self.tool_use_prompt_token_count.is_none()
        {
            return None;
        }
        let prompt = self.prompt_token_count.unwrap_or(0);
        let cached = self.cached_content_token_count.unwrap_or(0).min(prompt);
        Some(Usage {
            input_tokens: (prompt - cached)
                .saturating_add(self.tool_use_prompt_token_count.unwrap_or(0)),
            cached_input_tokens: cached,
            cache_creation_tokens: 0,
            output_tokens: self
                .candidates_token_count
                .unwrap_or(0)
                .saturating_add(self.thoughts_token_count.unwrap_or(0)),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Lenient scalar deserialisers: a stray type in one field must not lose the whole usage block.

/// Accepts non-negative integers (and integral floats); anything else (null, strings, negative,
/// objects) becomes `None`.
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a token count")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            // Saturating float->int cast; only exact non-negative integers are accepted.
            let n = v as u64;
            Ok((v >= 0.0 && n as f64 == v).then_some(n))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// Accepts booleans; anything else becomes `None`.
pub(crate) fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a boolean")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// Accepts an object deserialised as `T`; any non-object value (null, string, ...) becomes `None`.
pub(crate) fn lenient_obj<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(a)).map(Some)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn check(body: &str, dialect: Dialect, expected: (Option<U>, Option<&str>)) {
        // Usage and model; errors have their own test (`provider_errors`).
        let got = from_json(body.as_bytes(), dialect);
        assert_eq!(
            (got.usage, got.model.as_deref()),
            (expected.0.map(u), expected.1),
            "dialect {dialect:?}, body {body}"
        );
    }

    const OPENAI_CHAT: &str = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"The image shows a wooden boardwalk.","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1117,"completion_tokens":46,"total_tokens":1163,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}"#;
    const OPENAI_CHAT_CACHED: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1741570283,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
    const OPENAI_RESPONSES: &str = r#"{"id":"resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41","object":"response","created_at":1741476777,"status":"completed","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_67ccd3acc8d48190a77525dc6de64b41","status":"completed","role":"assistant","content":[{"type":"output_text","text":"The image depicts a scenic landscape.","annotations":[]}]}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":328,"input_tokens_details":{"cached_tokens":128},"output_tokens":52,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":380},"user":null,"metadata":{}}"#;
    const ANTHROPIC: &str = r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hello!"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":2048,"cache_read_input_tokens":1024,"cache_creation":{"ephemeral_5m_input_tokens":2048,"ephemeral_1h_input_tokens":0},"output_tokens":6,"service_tier":"standard"}}"#;
    const ANTHROPIC_NO_CACHE: &str = r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"Hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":9}}"#;
    const GEMINI: &str = r#"{"candidates":[{"content":{"parts":[{"text":"AI learns patterns from data."}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":12,"totalTokenCount":470,"promptTokensDetails":[{"modality":"TEXT","tokenCount":8}],"thoughtsTokenCount":450},"modelVersion":"gemini-2.5-flash","responseId":"7xBeaPzsKreFz7IPj7Tc0QY"}"#;
    const GEMINI_CACHED: &str = r#"{"candidates":[{"content":{"parts":[{"text":"ok"}],"role":"model"},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":10000,"candidatesTokenCount":50,"cachedContentTokenCount":8000,"toolUsePromptTokenCount":7,"totalTokenCount":10057},"modelVersion":"gemini-2.5-pro"}"#;

    #[test]
    fn response_bodies() {
        use Dialect::*;
        let table: &[(&str, Dialect, Option<U>, Option<&str>)] = &[
            (
                OPENAI_CHAT,
                OpenAi,
                Some((1117, 0, 0, 46)),
                Some("gpt-4o-2024-08-06"),
            ),
            (
                OPENAI_CHAT,
                Generic,
                Some((1117, 0, 0, 46)),
                Some("gpt-4o-2024-08-06"),
            ),
            // chat usage is unambiguous even with a wrong hint
            (
                OPENAI_CHAT,
                Anthropic,
                Some((1117, 0, 0, 46)),
                Some("gpt-4o-2024-08-06"),
            ),
            (
                OPENAI_CHAT_CACHED,
                OpenAi,
                Some((86, 1920, 0, 300)),
                Some("gpt-4o-mini-2024-07-18"),
            ),
            (
                OPENAI_CHAT_CACHED,
                Generic,
                Some((86, 1920, 0, 300)),
                Some("gpt-4o-mini-2024-07-18"),
            ),
            (
                OPENAI_RESPONSES,
                OpenAi,
                Some((200, 128, 0, 52)),
                Some("gpt-4.1-2025-04-14"),
            ),
            (
                OPENAI_RESPONSES,
                Generic,
                Some((200, 128, 0, 52)),
                Some("gpt-4.1-2025-04-14"),
            ),
            (
                ANTHROPIC,
                Anthropic,
                Some((12, 1024, 2048, 6)),
                Some("claude-sonnet-4-5-20250929"),
            ),
            (
                ANTHROPIC,
                Generic,
                Some((12, 1024, 2048, 6)),
                Some("claude-sonnet-4-5-20250929"),
            ),
            (
                ANTHROPIC_NO_CACHE,
                Anthropic,
                Some((25, 0, 0, 9)),
                Some("claude-3-5-haiku-20241022"),
            ),
            (
                ANTHROPIC_NO_CACHE,
                Generic,
                Some((25, 0, 0, 9)),
                Some("claude-3-5-haiku-20241022"),
            ),
            (
                ANTHROPIC_NO_CACHE,
                OpenAi,
                Some((25, 0, 0, 9)),
                Some("claude-3-5-haiku-20241022"),
            ),
            (
                GEMINI,
                Generic,
                Some((8, 0, 0, 462)),
                Some("gemini-2.5-flash"),
            ),
            (
                GEMINI,
                OpenAi,
                Some((8, 0, 0, 462)),
                Some("gemini-2.5-flash"),
            ),
            (
                GEMINI_CACHED,
                Generic,
                Some((2007, 8000, 0, 50)),
                Some("gemini-2.5-pro"),
            ),
        ];
        for &(body, dialect, usage, model) in table {
            check(body, dialect, (usage, model));
        }
    }

    #[test]
    fn dialect_decides_ambiguous_input_tokens() {
        use Dialect::*;
        // input_tokens with OpenAI-style details: the hint decides whether cached is inside.
        let body = r#"{"usage":{"input_tokens":100,"input_tokens_details":{"cached_tokens":40},"output_tokens":5}}"#;
        let table: &[(&str, Dialect, Option<U>, Option<&str>)] = &[
            (body, OpenAi, Some((60, 40, 0, 5)), None),
            (body, Generic, Some((60, 40, 0, 5)), None),
            // Anthropic has no input_tokens_details: cached stays 0.
            (body, Anthropic, Some((100, 0, 0, 5)), None),
            // Anthropic cache fields under the Generic hint.
            (
                r#"{"usage":{"input_tokens":3,"cache_read_input_tokens":7,"output_tokens":1}}"#,
                Generic,
                Some((3, 7, 0, 1)),
                None,
            ),
            // `type: message` marks Anthropic.
            (
                r#"{"type":"message","model":"claude-opus-4-1","usage":{"input_tokens":3,"output_tokens":1}}"#,
                Generic,
                Some((3, 0, 0, 1)),
                Some("claude-opus-4-1"),
            ),
        ];
        for &(body, dialect, usage, model) in table {
            check(body, dialect, (usage, model));
        }
    }

    #[test]
    fn odd_and_invalid_bodies() {
        use Dialect::*;
        let table: &[(&str, Option<U>, Option<&str>)] = &[
            ("", None, None),
            ("not json", None, None),
            (
                r#"{"model":"gpt-4o","usage":{"prompt_tokens":1"#,
                None,
                None,
            ),
            ("42", None, None),
            (r#""str""#, None, None),
            ("{}", None, None),
            (r#"{"model":"m"}"#, None, Some("m")),
            (r#"{"model":"m","usage":null}"#, None, Some("m")),
            (r#"{"model":"m","usage":{}}"#, None, Some("m")),
            (r#"{"model":"m","usage":"n/a"}"#, None, Some("m")),
            // escaped model name
            (
                r#"{"model":"gpt\u002d4o","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
                Some((1, 0, 0, 2)),
                Some("gpt-4o"),
            ),
            // cached > prompt saturates
            (
                r#"{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":9}}}"#,
                Some((0, 5, 0, 1)),
                None,
            ),
            // null / float / string / negative counts are tolerated field by field
            (
                r#"{"usage":{"prompt_tokens":10,"completion_tokens":null,"prompt_tokens_details":null}}"#,
                Some((10, 0, 0, 0)),
                None,
            ),
            (
                r#"{"usage":{"prompt_tokens":10.0,"completion_tokens":"7","prompt_tokens_details":{"cached_tokens":-1}}}"#,
                Some((10, 0, 0, 0)),
                None,
            ),
            (
                r#"{"usage":{"prompt_tokens":10.5,"completion_tokens":[1],"prompt_tokens_details":[]}}"#,
                None,
                None,
            ),
            // huge counts
            (
                r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615}}"#,
                Some((u64::MAX, 0, 0, u64::MAX)),
                None,
            ),
            // ollama-style string `response` and error `message` don't break parsing
            (
                r#"{"model":"llama3","response":"hello","message":"x","usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
                Some((1, 0, 0, 1)),
                Some("llama3"),
            ),
            // OpenAI error body
            (
                r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
                None,
                None,
            ),
            // Gemini non-SSE streamGenerateContent: a JSON array, last usage wins
            (
                r#"[{"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":1},"modelVersion":"gemini-2.0-flash"},
                   {"candidates":[{"content":{"parts":[{"text":"b"}]}}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":9},"modelVersion":"gemini-2.0-flash"}]"#,
                Some((4, 0, 0, 9)),
                Some("gemini-2.0-flash"),
            ),
            ("[]", None, None),
            (
                "  \n{\"usage\":{\"input_tokens\":1}}  ",
                Some((1, 0, 0, 0)),
                None,
            ),
        ];
        for &(body, usage, model) in table {
            check(body, Generic, (usage, model));
        }
    }

    #[test]
    fn provider_errors() {
        for (body, expected) in [
            (
                r#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
                Some("invalid_request_error/invalid_api_key"),
            ),
            (
                r#"{"error":{"message":"boom","type":"server_error","code":null}}"#,
                Some("server_error"),
            ),
            (
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                Some("overloaded_error"),
            ),
            (
                r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}"#,
                Some("429/RESOURCE_EXHAUSTED"),
            ),
            (r#"{"error":"a string"}"#, None),
            (r#"{"error":{}}"#, None),
            (r#"{"error":null,"model":"m"}"#, None),
        ] {
            assert_eq!(
                from_json(body.as_bytes(), Dialect::Generic)
                    .error
                    .as_deref(),
                expected,
                "{body}"
            );
        }
        let long = format!(r#"{{"error":{{"type":"{}"}}}}"#, "é".repeat(80));
        let got = from_json(long.as_bytes(), Dialect::Generic).error.unwrap();
        assert!(got.len() <= MAX_PROVIDER_ERROR && got.starts_with('é'));
    }

    #[test]
    fn usage_sums() {
        let x = u((1, 2, 3, 4));
        assert_eq!((x.prompt_tokens(), x.total_tokens()), (6, 10));
        let big = u((u64::MAX, 1, 0, 1));
        assert_eq!(
            (big.prompt_tokens(), big.total_tokens()),
            (u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn collector() {
        let body = ANTHROPIC.as_bytes();
        let whole = JsonOutcome::Parsed(from_json(body, Dialect::Anthropic));
        for chunk_len in [1, 2, 7, 64, body.len()] {
            let mut c = JsonBodyCollector::new(body.len());
            for chunk in body.chunks(chunk_len) {
                c.feed(chunk);
            }
            assert_eq!(c.finish(Dialect::Anthropic), whole, "chunk_len {chunk_len}");
        }
        let check = |cap: usize, chunks: &[&str], expected: JsonOutcome| {
            let mut c = JsonBodyCollector::new(cap);
            for ch in chunks {
                c.feed(ch.as_bytes());
            }
            assert_eq!(c.finish(Dialect::Generic), expected, "{cap} {chunks:?}");
        };
        let parsed = |usage: Option<U>, model: Option<&str>| {
            JsonOutcome::Parsed(Extracted {
                usage: usage.map(u),
                model: model.map(str::to_owned),
                error: None,
            })
        };
        check(13, &["{\"model\":", "\"m\"}"], parsed(None, Some("m")));
        check(14, &["{\"model\":", "\"m\"}"], parsed(None, Some("m")));
        check(12, &["{\"model\":", "\"m\"}"], JsonOutcome::TooLarge);
        check(
            9,
            &["{\"model\":", "\"m\"}", "", "x"],
            JsonOutcome::TooLarge,
        );
        check(100, &["{\"model\":"], JsonOutcome::Invalid);
        check(100, &[], JsonOutcome::Invalid);
        check(100, &["<html>502</html>"], JsonOutcome::Invalid);
        check(0, &[], JsonOutcome::Invalid);
        check(0, &["{}"], JsonOutcome::TooLarge);
    }

    #[test]
    fn collector_frees_buffer_when_too_large() {
        let mut c = JsonBodyCollector::new(4);
        c.feed(b"{\"a\"");
        assert_eq!(c.buf.len(), 4);
        c.feed(b":1}");
        assert_eq!(c.buf.capacity(), 0);
    }
}
