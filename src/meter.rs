//! What one request used: the response tap that reads usage while the body streams through
//! (JSON collector or incremental SSE parser), and the one [`UsageRecord`] each authenticated
//! request becomes.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::cost::{cost, Price, PriceTable};
use crate::ctx::RequestCtx;
use crate::sse::{SseUsage, UsageChunkStripper};
use crate::upstream::AccountType;
use crate::usage::{Dialect, JsonBodyCollector, JsonOutcome, Usage};

/// One row of `usage_records`. Serialised as JSON in the spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub request_id: String,
    pub user_id: i64,
    pub api_key_id: i64,
    pub upstream_account_id: Option<i64>,
    pub method: String,
    pub endpoint: String,
    pub model: Option<String>,
    pub status_code: i32,
    /// Milliseconds from request start to the end of the response.
    pub response_time: i32,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cache_creation_tokens: i64,
    pub tokens_used: i64,
    pub cost: Decimal,
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl UsageRecord {
    /// Whether this row counts as a success for the key's and account's counters.
    pub fn is_success(&self) -> bool {
        (200..400).contains(&self.status_code) && self.error_message.is_none()
    }
}

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

    pub fn finish(self, kind: AccountType) -> Metered {
        match self {
            ResponseTap::Json(j) => match j.finish(dialect(kind)) {
                JsonOutcome::Parsed(e) => Metered {
                    usage: e.usage,
                    model: e.model,
                    note: None,
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
                }
            }
            ResponseTap::Opaque => Metered::default(),
        }
    }
}

/// Removes the usage-only chunk tollgate asked for on the client's behalf. `None` when the
/// client asked for usage itself (or the request is not a stream).
pub type Stripper = Option<UsageChunkStripper>;

/// The price table from the config: per model, with per-account-type defaults.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    pub models: PriceTable,
    pub defaults: HashMap<AccountType, Price>,
}

/// The priced outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub cost: Decimal,
    /// Table key the price came from (bounded set: usable as a metric label); None = unpriced.
    pub price_key: Option<String>,
}

impl Pricing {
    /// Cost of `usage` for `model` on an account of `kind`. Unknown model and no default for the
    /// type: cost 0 and `price_key: None` (counted as unpriced), never a guess.
    pub fn price(&self, kind: AccountType, model: Option<&str>, usage: &Usage) -> Priced {
        if let Some((key, p)) = model.and_then(|m| self.models.lookup(m)) {
            return Priced {
                cost: cost(usage, p),
                price_key: Some(key.to_string()),
            };
        }
        match self.defaults.get(&kind) {
            Some(p) => Priced {
                cost: cost(usage, p),
                price_key: Some(format!("default:{}", kind.as_str())),
            },
            None => Priced {
                cost: Decimal::ZERO,
                price_key: None,
            },
        }
    }
}

/// Longest `endpoint` / `model` stored: client-controlled strings are bounded.
const MAX_ENDPOINT: usize = 512;
const MAX_MODEL: usize = 200;

fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The usage record for a finished request, or None when no key was authenticated (there is
/// nobody to bill; such refusals are counted in metrics only). Takes the tap out of `ctx`.
pub fn record(
    ctx: &mut RequestCtx,
    method: &str,
    path: &str,
    pricing: &Pricing,
) -> Option<(UsageRecord, Priced)> {
    let key = ctx.key.as_ref()?;
    let kind = ctx.kind.unwrap_or(AccountType::Generic);
    let metered = ctx.tap.take().map(|t| t.finish(kind)).unwrap_or_default();
    let model = metered
        .model
        .or_else(|| ctx.model.clone())
        .or_else(|| crate::usage::request_model(&ctx.body));
    let usage = metered.usage.unwrap_or_default();
    let priced = match metered.usage {
        Some(u) => pricing.price(kind, model.as_deref(), &u),
        None => Priced {
            cost: Decimal::ZERO,
            price_key: None,
        },
    };
    let error_message = ctx.error.or(metered.note).map(str::to_string);
    let record = UsageRecord {
        request_id: ctx.request_id.clone(),
        user_id: key.user_id,
        api_key_id: key.id,
        upstream_account_id: ctx.account.as_ref().map(|a| a.id),
        method: bounded(method, 16),
        endpoint: bounded(path, MAX_ENDPOINT),
        model: model.map(|m| bounded(&m, MAX_MODEL)),
        status_code: i32::from(ctx.status),
        response_time: ctx.started.elapsed().as_millis().min(i32::MAX as u128) as i32,
        prompt_tokens: usage.prompt_tokens() as i64,
        completion_tokens: usage.output_tokens as i64,
        cached_tokens: usage.cached_input_tokens as i64,
        cache_creation_tokens: usage.cache_creation_tokens as i64,
        tokens_used: usage.total_tokens() as i64,
        cost: priced.cost,
        error_message,
        created_at: Utc::now(),
    };
    Some((record, priced))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

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
                note: None,
            },
        );
        check_tap(
            "text/event-stream",
            AccountType::Anthropic,
            &[b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n"],
            Metered {
                usage: Some(Usage { input_tokens: 7, output_tokens: 1, ..Usage::default() }),
                model: Some("claude-x".into()),
                note: None,
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

    #[test]
    fn pricing() {
        let price = |i: &str, o: &str| Price {
            input: Decimal::from_str(i).unwrap(),
            output: Decimal::from_str(o).unwrap(),
            cached_input: None,
            cache_write: None,
        };
        let pricing = Pricing {
            models: [("gpt-4o-mini".to_string(), price("0.15", "0.60"))]
                .into_iter()
                .collect(),
            defaults: [(AccountType::Generic, price("1", "2"))]
                .into_iter()
                .collect(),
        };
        let usage = Usage {
            input_tokens: 100,
            output_tokens: 10,
            ..Usage::default()
        };
        let check = |kind, model: Option<&str>, cost: &str, key: Option<&str>| {
            assert_eq!(
                pricing.price(kind, model, &usage),
                Priced {
                    cost: Decimal::from_str(cost).unwrap(),
                    price_key: key.map(str::to_string)
                },
                "{model:?}"
            );
        };
        check(
            AccountType::Openai,
            Some("gpt-4o-mini-2024-07-18"),
            "0.000021",
            Some("gpt-4o-mini"),
        );
        check(AccountType::Openai, Some("unknown-model"), "0", None);
        check(AccountType::Openai, None, "0", None);
        check(
            AccountType::Generic,
            Some("llama"),
            "0.00012",
            Some("default:generic"),
        );
    }
}
