//! What one request used: the one [`UsageRecord`] each authenticated request becomes, built from
//! what the request path gathered ([`Finished`]) and priced by [`Pricing`]. Pure: no I/O, no
//! clock other than the `now` it is given.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::pricing::{Priced, Pricing};
use crate::record::UsageRecord;
use crate::request;
use crate::tap::ResponseTap;
use crate::upstream::AccountType;

/// What the request path knows when a request ends; `ctx.rs` gathers it from the context.
pub struct Finished<'a> {
    pub request_id: &'a str,
    pub user_id: i64,
    pub api_key_id: i64,
    /// The account whose response reached the client, if any.
    pub account_id: Option<i64>,
    /// The routed account type (generic when routing did not happen).
    pub kind: AccountType,
    pub method: &'a str,
    pub path: &'a str,
    /// The `model` read from the request when permissions needed it.
    pub requested_model: Option<&'a str>,
    /// The request body, for the model when neither the response nor the check gave one.
    pub body: &'a [u8],
    /// Status sent to the client (0 = none).
    pub status: u16,
    /// Low-cardinality reason the request did not end well.
    pub error: Option<&'static str>,
    pub elapsed: Duration,
    /// The response tap, when a response started.
    pub tap: Option<ResponseTap>,
}

/// Longest `endpoint` / `model` stored: client-controlled strings are bounded.
const MAX_ENDPOINT: usize = 512;
const MAX_MODEL: usize = 200;
const MAX_METHOD: usize = 16;

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

/// The usage record of a finished request, and its price (with the cost counter it feeds).
pub fn record<'p>(
    done: Finished<'_>,
    pricing: &'p Pricing,
    now: DateTime<Utc>,
) -> (UsageRecord, Priced<'p>) {
    let metered = done.tap.map(|t| t.finish(done.kind)).unwrap_or_default();
    let model = metered
        .model
        .or_else(|| done.requested_model.map(str::to_string))
        .or_else(|| request::model(done.body));
    let usage = metered.usage.unwrap_or_default();
    let priced = match metered.usage {
        Some(u) => pricing.price(done.kind, model.as_deref(), &u),
        None => Priced {
            cost: rust_decimal::Decimal::ZERO,
            counter: None,
        },
    };
    let record = UsageRecord {
        request_id: done.request_id.to_string(),
        user_id: done.user_id,
        api_key_id: done.api_key_id,
        upstream_account_id: done.account_id,
        method: bounded(done.method, MAX_METHOD),
        endpoint: bounded(done.path, MAX_ENDPOINT),
        model: model.map(|m| bounded(&m, MAX_MODEL)),
        status_code: i32::from(done.status),
        response_time: done.elapsed.as_millis().min(i32::MAX as u128) as i32,
        prompt_tokens: usage.prompt_tokens() as i64,
        completion_tokens: usage.output_tokens as i64,
        cached_tokens: usage.cached_input_tokens as i64,
        cache_creation_tokens: usage.cache_creation_tokens as i64,
        tokens_used: usage.total_tokens() as i64,
        cost: priced.cost,
        error_message: done.error.or(metered.note).map(str::to_string),
        created_at: now,
    };
    (record, priced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Price;
    use crate::metrics::CostCounters;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn finished<'a>(body: &'a [u8], tap: Option<ResponseTap>) -> Finished<'a> {
        Finished {
            request_id: "r1",
            user_id: 7,
            api_key_id: 9,
            account_id: Some(3),
            kind: AccountType::Openai,
            method: "POST",
            path: "/v1/chat/completions",
            requested_model: None,
            body,
            status: 200,
            error: None,
            elapsed: Duration::from_millis(12),
            tap,
        }
    }

    /// (response body or none, request body) → (model, tokens, cost, error_message)
    fn check(
        response: Option<&[u8]>,
        body: &[u8],
        expected: (Option<&str>, i64, &str, Option<&str>),
    ) {
        let counters = CostCounters::default();
        let price = Price {
            input: Decimal::from_str("1").unwrap(),
            output: Decimal::from_str("2").unwrap(),
            cached_input: None,
            cache_write: None,
        };
        let pricing = Pricing::new(
            [("gpt-4o".to_string(), price)].into_iter().collect(),
            Default::default(),
            &counters,
        );
        let tap = response.map(|r| {
            let mut t =
                ResponseTap::for_response(Some(b"application/json"), AccountType::Openai, 1024);
            t.feed(r);
            t
        });
        let now = Utc::now();
        let (rec, _) = record(finished(body, tap), &pricing, now);
        assert_eq!(
            (
                rec.model.as_deref(),
                rec.tokens_used,
                rec.cost,
                rec.error_message.as_deref()
            ),
            (
                expected.0,
                expected.1,
                Decimal::from_str(expected.2).unwrap(),
                expected.3
            ),
            "{response:?}"
        );
        assert_eq!(
            (rec.request_id.as_str(), rec.api_key_id, rec.user_id),
            ("r1", 9, 7)
        );
        assert_eq!(
            (rec.upstream_account_id, rec.response_time, rec.created_at),
            (Some(3), 12, now)
        );
    }

    #[test]
    fn records() {
        check(
            Some(br#"{"model":"gpt-4o-2024","usage":{"prompt_tokens":1000000,"completion_tokens":1}}"#),
            b"{}",
            (Some("gpt-4o-2024"), 1_000_001, "1.000002", None),
        );
        // No response read: model from the request body, nothing billed.
        check(
            None,
            br#"{"model":"gpt-4o"}"#,
            (Some("gpt-4o"), 0, "0", None),
        );
        // A JSON response over the cap: the note says why tokens are unknown.
        check(
            Some(&[b' '; 2000]),
            b"",
            (None, 0, "0", Some("response_too_large_for_metering")),
        );
    }
}
