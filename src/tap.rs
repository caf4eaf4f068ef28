//! The response tap: reads usage from a response body as it streams to the client (a JSON
//! collector or the incremental SSE parser), and the stripper type for the usage-only chunk
//! tollgate asked for on the client's behalf. Set up by `forward.rs`, finished by `meter.rs`.

use crate::sse::{SseUsage, UsageChunkStripper};
use crate::upstream::AccountType;
use crate::usage::{Dialect, JsonBodyCollector, JsonOutcome, Usage};

pub fn dialect(kind: AccountType) -> Dialect {
    match kind {
        AccountType::Openai => Dialect::OpenAi,
        AccountType::Anthropic => Dialect::Anthropic,
        AccountType::Generic => Dialect::Generic,
    }
}

/// Reads usage from a response body as it streams by. Never holds more than the JSON cap.
pub enum ResponseTap {
    Json(JsonBodyCollector),
    Sse(Box<SseUsage>),
    /// Neither JSON nor SSE (or an empty body): nothing to read.
    Opaque,
}

/// What the tap found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Metered {
    pub usage: Option<Usage>,
    pub model: Option<String>,
    /// Why tokens are unknown, when they are: e.g. `response_too_large_for_metering`.
    pub note: Option<&'static str>,
    /// The provider's error `type`/`code` from a JSON error body.
    pub error: Option<String>,
    /// The usage is final: a whole JSON body, or an SSE stream that reached its terminal event.
    /// `false` with usage = what a stream reported before it ended early (Anthropic's
    /// `message_start`).
    pub complete: bool,
}

impl ResponseTap {
    pub fn for_response(
        content_type: Option<&[u8]>,
        kind: AccountType,
        json_cap: usize,
    ) -> ResponseTap {
        let ct = content_type.unwrap_or(b"");
        let starts = |p: &[u8]| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
        if starts(b"text/event-stream") {
            ResponseTap::Sse(Box::new(SseUsage::new(dialect(kind))))
        } else if starts(b"application/json") || memchr::memmem::find(ct, b"+json").is_some() {
            ResponseTap::Json(JsonBodyCollector::new(json_cap))
        } else {
            ResponseTap::Opaque
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            ResponseTap::Json(j) => j.feed(chunk),
            ResponseTap::Sse(s) => s.feed(chunk),
            ResponseTap::Opaque => {}
        }
    }

    /// Counts the generated text of an SSE response from now on (`[spend] cut_streams`); other
    /// responses are not counted. Whether it counts.
    pub fn count_output(&mut self) -> bool {
        match self {
            ResponseTap::Sse(s) => {
                s.count_output();
                true
            }
            _ => false,
        }
    }

    /// Bytes of generated text seen so far, an upper bound of the output tokens the stream
    /// showed (see [`crate::sse::generated_bytes`]); `None` unless counting.
    pub fn output_bound(&self) -> Option<u64> {
        match self {
            ResponseTap::Sse(s) => s.output_bytes(),
            _ => None,
        }
    }

    pub fn finish(self, kind: AccountType) -> Metered {
        match self {
            ResponseTap::Json(j) => match j.finish(dialect(kind)) {
                JsonOutcome::Parsed(e) => Metered {
                    usage: e.usage,
                    model: e.model,
                    note: None,
                    error: e.error,
                    complete: true,
                },
                JsonOutcome::TooLarge => Metered {
                    note: Some("response_too_large_for_metering"),
                    ..Metered::default()
                },
                JsonOutcome::Invalid => Metered::default(),
            },
            ResponseTap::Sse(mut s) => {
                s.finish();
                Metered {
                    usage: s.usage(),
                    model: s.model().map(str::to_string),
                    note: None,
                    error: None,
                    complete: s.saw_done(),
                }
            }
            ResponseTap::Opaque => Metered::default(),
        }
    }
}

/// Removes the usage-only chunk tollgate asked for on the client's behalf. `None` when the
/// client asked for usage itself (or the request is not a stream).
pub type Stripper = Option<UsageChunkStripper>;

#[cfg(test)]
mod tests {
    use super::*;

    fn check_tap(ct: &str, kind: AccountType, chunks: &[&[u8]], expected: Metered) {
        let mut tap = ResponseTap::for_response(Some(ct.as_bytes()), kind, 1024);
        for c in chunks {
            tap.feed(c);
        }
        assert_eq!(tap.finish(kind), expected, "{ct}");
    }

    #[test]
    fn taps() {
        check_tap(
            "application/json; charset=utf-8",
            AccountType::Openai,
            &[
                br#"{"model":"gpt-4o","usage":{"prompt_tokens":10,"#,
                br#""completion_tokens":5,"total_tokens":15}}"#,
            ],
            Metered {
                usage: Some(Usage {
                    input_tokens: 10,
                    output_tokens: 5,
                    ..Usage::default()
                }),
                model: Some("gpt-4o".into()),
                complete: true,
                ..Metered::default()
            },
        );
        check_tap(
            "text/event-stream",
            AccountType::Anthropic,
            &[b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n"],
            Metered {
                usage: Some(Usage { input_tokens: 7, output_tokens: 1, ..Usage::default() }),
                model: Some("claude-x".into()),
                // message_start only: the stream did not reach message_stop.
                complete: false,
                ..Metered::default()
            },
        );
        check_tap(
            "application/json",
            AccountType::Openai,
            &[&[b' '; 2000]],
            Metered {
                note: Some("response_too_large_for_metering"),
                ..Metered::default()
            },
        );
        check_tap(
            "text/plain",
            AccountType::Openai,
            &[b"hello"],
            Metered::default(),
        );
    }
}
