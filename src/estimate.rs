//! The prompt's tokens counted by tollgate, for a served request whose upstream reported no usage
//! (a stream cut before its usage chunk, a client that left and an upstream that never finished):
//! such a request is billed at least its prompt, marked `estimated`, never 0 in silence. Pure.
//!
//! The text of a chat/completions/responses/messages request (message contents, text parts,
//! `system`, `instructions`, `prompt`, `input`) is counted with OpenAI's tokenizer (`o200k_base`
//! for the gpt-4o/4.1/5 and o-series families, `cl100k_base` otherwise; Anthropic publishes no
//! tokenizer, so `cl100k_base` stands in), plus the chat format's per-message overhead. Images
//! and audio are not counted: an estimate is a floor, not the provider's bill.
//!
//! An encoding is loaded the first time it is needed, not at start: both together hold ~60 MiB
//! (measured: peak RSS under load 57 → 120 MiB when loaded at start), which a gateway whose
//! upstreams always report usage never needs. The first estimate pays the load once (a few
//! hundred milliseconds, in the logging phase, after its response has been sent).

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// Tokens the chat format adds per message (role and separators), and to prime the reply.
const PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;

/// The encoding a model's family uses.
fn encoder(model: Option<&str>) -> &'static CoreBPE {
    let m = model.unwrap_or("");
    let o200k = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "o1",
        "o3",
        "o4",
        "chatgpt-4o",
    ]
    .iter()
    .any(|p| m.starts_with(p));
    if o200k {
        tiktoken_rs::o200k_base_singleton()
    } else {
        tiktoken_rs::cl100k_base_singleton()
    }
}

/// The prompt tokens of a JSON request body; 0 when it is not JSON or has no text.
pub fn prompt_tokens(body: &[u8], model: Option<&str>) -> u64 {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let mut texts: Vec<&str> = Vec::new();
    let mut messages = 0u64;
    for key in ["system", "instructions", "prompt", "input"] {
        if let Some(v) = req.get(key) {
            messages += collect(v, &mut texts);
        }
    }
    if let Some(Value::Array(list)) = req.get("messages") {
        for m in list {
            messages += 1;
            if let Some(content) = m.get("content") {
                collect(content, &mut texts);
            }
        }
    }
    let bpe = encoder(model);
    let tokens: u64 = texts
        .iter()
        .map(|t| bpe.encode_ordinary(t).len() as u64)
        .sum();
    if tokens == 0 {
        return 0;
    }
    tokens + messages * PER_MESSAGE + REPLY_PRIMING
}

/// Pushes the text in `v` (a string, text parts, or input messages); returns the messages found.
fn collect<'a>(v: &'a Value, texts: &mut Vec<&'a str>) -> u64 {
    match v {
        Value::String(s) => {
            texts.push(s);
            0
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => {
                    texts.push(s);
                    0
                }
                Value::Object(o) => {
                    if let Some(Value::String(t)) = o.get("text") {
                        texts.push(t);
                    }
                    // A Responses-API input message: its content is text or parts.
                    match o.get("content") {
                        Some(c) => 1 + collect(c, texts),
                        None => 0,
                    }
                }
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str, model: Option<&str>, expected: u64) {
        assert_eq!(prompt_tokens(body.as_bytes(), model), expected, "{body}");
    }

    #[test]
    fn prompts() {
        // "Hello world" is 2 tokens in both encodings; one message: 2 + 3 + 3.
        check(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello world"}]}"#,
            Some("gpt-4o"),
            8,
        );
        check(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"Hello world"},{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
            Some("gpt-3.5-turbo"),
            8,
        );
        // Anthropic: system + one message.
        check(
            r#"{"system":"Hello world","messages":[{"role":"user","content":"Hello world"}],"max_tokens":5}"#,
            Some("claude-3-5-sonnet"),
            10,
        );
        // Responses API: a string input, or input messages.
        check(r#"{"input":"Hello world"}"#, Some("gpt-4.1"), 5);
        check(
            r#"{"input":[{"role":"user","content":"Hello world"}]}"#,
            Some("gpt-4.1"),
            8,
        );
        // Nothing to count.
        check(r#"{"model":"gpt-4o"}"#, Some("gpt-4o"), 0);
        check("not json", None, 0);
        check(r#"["Hello"]"#, None, 0);
    }

    #[test]
    fn a_longer_prompt_counts_more() {
        let short = prompt_tokens(br#"{"prompt":"one two"}"#, None);
        let long = prompt_tokens(br#"{"prompt":"one two three four five six"}"#, None);
        assert!(short > 0 && long > short, "{short} {long}");
    }
}
