//! What one request used: the one [`UsageRecord`] each authenticated request becomes, built from
//! what the request path gathered ([`Finished`]) and priced by [`Pricing`]. Pure: no I/O, no
//! clock other than the `now` it is given.
//!
//! Where the tokens come from is recorded (`usage_source`): the upstream's report
//! (`provider`); what a stream reported before it ended early (`partial`); or, when a served 2xx
//! response reported nothing, the prompt counted from the request (`estimated`), so that no
//! served request is billed 0 in silence. A stream cut by `[spend] cut_streams` is charged the
//! output it relayed, as counted on the way (`partial` or `estimated`).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::estimate;
use crate::pricing::{Priced, Pricing};
use crate::record::{UsageRecord, UsageSource};
use crate::request;
use crate::tap::{Metered, ResponseTap};
use crate::upstream::AccountType;
use crate::usage::Usage;

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
    /// An upstream's response header reached the client.
    pub served: bool,
    /// The stream was cut by `[spend] cut_streams`: the bound of the output tokens it relayed
    /// (`SpendHold::cut_output`).
    pub spend_cut: Option<u64>,
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

/// The token counts and where they come from. A request that reached no upstream, or an upstream
/// error, uses nothing.
fn usage_of(done: &Finished<'_>, metered: &Metered, model: Option<&str>) -> (Usage, UsageSource) {
    if let Some(output) = done.spend_cut {
        return cut_usage(done, metered, model, output);
    }
    match metered.usage {
        Some(u) if metered.complete => (u, UsageSource::Provider),
        Some(u) => (u, UsageSource::Partial),
        None if done.served && (200..300).contains(&done.status) => {
            match estimate::prompt_tokens(done.body, model) {
                0 => (Usage::default(), UsageSource::None),
                prompt => (
                    Usage {
                        input_tokens: prompt,
                        ..Usage::default()
                    },
                    UsageSource::Estimated,
                ),
            }
        }
        None => (Usage::default(), UsageSource::None),
    }
}

/// A stream cut by `[spend] cut_streams`: charged the output it relayed, counted as its
/// running bound (bytes of generated text, never fewer than its tokens, within what the
/// reservation covered), and the input the upstream reported before the cut (`partial`) or
/// the prompt counted from the request (`estimated`). A report the cut chunk completed gives
/// the output when it is smaller.
fn cut_usage(
    done: &Finished<'_>,
    metered: &Metered,
    model: Option<&str>,
    output: u64,
) -> (Usage, UsageSource) {
    let (mut usage, source) = match metered.usage {
        Some(u) => (u, UsageSource::Partial),
        None => (
            Usage {
                input_tokens: estimate::prompt_tokens(done.body, model),
                ..Usage::default()
            },
            UsageSource::Estimated,
        ),
    };
    usage.output_tokens = match metered.usage {
        Some(u) if metered.complete => u.output_tokens.min(output),
        _ => output,
    };
    if usage.total_tokens() == 0 {
        return (usage, UsageSource::None);
    }
    (usage, source)
}

/// The usage record of a finished request, and its price (with the cost counter it feeds).
pub fn record<'p>(
    mut done: Finished<'_>,
    pricing: &'p Pricing,
    now: DateTime<Utc>,
) -> (UsageRecord, Priced<'p>) {
    let metered = done
        .tap
        .take()
        .map(|t| t.finish(done.kind))
        .unwrap_or_default();
    let requested = done
        .requested_model
        .map(str::to_string)
        .or_else(|| request::model(done.body));
    let model = metered.model.clone().or_else(|| requested.clone());
    let (usage, source) = usage_of(&done, &metered, model.as_deref());
    let priced = match source {
        UsageSource::None => Priced {
            cost: rust_decimal::Decimal::ZERO,
            counter: None,
        },
        _ => pricing.price(done.kind, model.as_deref(), &usage),
    };
    let upstream_failed = done.served && done.status >= 400;
    let error_message = done
        .error
        .or(upstream_failed.then_some("upstream_status"))
        .or(metered.note);
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
        error_message: error_message.map(str::to_string),
        created_at: now,
        requested_model: requested.map(|m| bounded(&m, MAX_MODEL)),
        usage_source: Some(source),
        upstream_error: metered.error.filter(|_| upstream_failed),
        charges: Vec::new(),
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
            served: tap.is_some(),
            tap,
            spend_cut: None,
        }
    }

    fn pricing(counters: &CostCounters) -> Pricing {
        let price = Price {
            input: Decimal::from_str("1").unwrap(),
            output: Decimal::from_str("2").unwrap(),
            cached_input: None,
            cache_write: None,
        };
        Pricing::new(
            [("gpt-4o".to_string(), price)].into_iter().collect(),
            Default::default(),
            counters,
        )
    }

    fn tap(content_type: &str, body: &[u8]) -> ResponseTap {
        let mut t =
            ResponseTap::for_response(Some(content_type.as_bytes()), AccountType::Openai, 1024);
        t.feed(body);
        t
    }

    #[test]
    fn where_the_tokens_come_from() {
        let counters = CostCounters::default();
        let pricing = pricing(&counters);
        let body = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hello world"}]}"#;
        // (response content type, response body, status) → (source, prompt tokens, error, upstream error)
        for (ct, resp, status, expected) in [
            // A stream that ended before its usage chunk: the prompt is estimated (2 + 3 + 3).
            ("text/event-stream", &b"data: {\"choices\":[]}\n\n"[..], 200, (UsageSource::Estimated, 8, None, None)),
            // Anthropic's message_start, then the stream was cut: what it reported, marked.
            ("text/event-stream", b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7}}}\n\n", 200, (UsageSource::Partial, 7, None, None)),
            ("application/json", br#"{"usage":{"prompt_tokens":5,"completion_tokens":1}}"#, 200, (UsageSource::Provider, 5, None, None)),
            // An upstream error passed through: nothing billed, its label and the provider's type.
            ("application/json", br#"{"error":{"type":"server_error","code":"boom"}}"#, 500, (UsageSource::None, 0, Some("upstream_status"), Some("server_error/boom"))),
        ] {
            let mut done = finished(body, Some(tap(ct, resp)));
            done.status = status;
            let (rec, priced) = record(done, &pricing, Utc::now());
            assert_eq!(
                (rec.usage_source.unwrap(), rec.prompt_tokens, rec.error_message.as_deref(), rec.upstream_error.as_deref()),
                expected,
                "{}", String::from_utf8_lossy(resp)
            );
            assert_eq!(rec.requested_model.as_deref(), Some("gpt-4o"));
            assert_eq!(priced.cost.is_zero(), expected.1 == 0);
        }
    }

    #[test]
    fn a_cut_stream_is_charged_what_it_relayed() {
        let counters = CostCounters::default();
        let pricing = pricing(&counters);
        let body = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hello world"}]}"#;
        let start = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n";
        let done = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":30}}\n\ndata: [DONE]\n\n";
        // (response, output relayed) → (source, prompt, completion, cost at $1/$2 per million)
        for (resp, relayed, expected) in [
            // Nothing reported: the prompt counted (8), the output relayed.
            (
                &b"data: {\"choices\":[]}\n\n"[..],
                40,
                (UsageSource::Estimated, 8, 40, "0.000088"),
            ),
            // Anthropic's message_start: its input, the output relayed (not its 1).
            (start, 40, (UsageSource::Partial, 7, 40, "0.000087")),
            // The cut chunk held the final report: the smaller of it and what was relayed.
            (done, 40, (UsageSource::Partial, 5, 30, "0.000065")),
            (done, 20, (UsageSource::Partial, 5, 20, "0.000045")),
        ] {
            let mut t = tap("text/event-stream", b"");
            t.feed(resp);
            let mut f = finished(body, Some(t));
            f.error = Some("spend_cut");
            f.spend_cut = Some(relayed);
            let (rec, _) = record(f, &pricing, Utc::now());
            assert_eq!(
                (
                    rec.usage_source.unwrap(),
                    rec.prompt_tokens,
                    rec.completion_tokens,
                    rec.cost,
                ),
                (
                    expected.0,
                    expected.1,
                    expected.2,
                    Decimal::from_str(expected.3).unwrap()
                ),
                "{}",
                String::from_utf8_lossy(resp)
            );
            assert_eq!(rec.error_message.as_deref(), Some("spend_cut"));
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
