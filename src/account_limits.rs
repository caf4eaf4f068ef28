//! Upstream accounts as limits, not surprises: the limits an account declares (requests and
//! tokens per minute, requests in flight) and what its provider reports (`x-ratelimit-*`,
//! `anthropic-ratelimit-*`, `retry-after`), so selection skips an account at its limit instead
//! of forwarding into a 429.
//!
//! - **State** ([`State`], one per account id, kept across reloads in the account's stats): GCRA
//!   buckets (`gcra.rs`) for rpm and tpm, an in-flight counter, and until when the provider said
//!   the account is out of requests or tokens (separate from the error cooldown: not an error).
//! - **Taking** ([`State::try_take`]): one atomic operation per limit, made by the selector on the
//!   account it picks (the decision and the unit taken are one step, no check-then-take race);
//!   when one limit refuses, what the others took is given back. An account that declares nothing
//!   costs two atomic loads (the provider's saturation) and no allocation.
//! - **Holding** ([`Hold`]): the concurrency slot is given back when the hold drops (kept in the
//!   request's context: every end path releases it); the token estimate is settled on the usage
//!   record by `logging`.
//! - **Provider feedback** ([`feedback`]): pure parsing of a response's headers, bad values
//!   ignored. Time comes in as arguments (nanoseconds on the account set's clock, and the wall
//!   clock for Anthropic's RFC 3339 resets).
//! - Per instance: each instance counts its own use of an account.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::gcra::{Gcra, Rate};

const MINUTE: Duration = Duration::from_secs(60);
/// What a refusal for concurrency says to wait: a slot comes back when a request ends.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// An account's declared limits; 0 = none declared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountLimits {
    pub rpm: u64,
    pub tpm: u64,
    pub max_concurrent: u64,
}

impl AccountLimits {
    pub fn is_none(&self) -> bool {
        *self == AccountLimits::default()
    }

    /// From the database columns: NULL, 0 and (never stored) negatives are "none".
    pub fn from_columns(rpm: Option<i64>, tpm: Option<i64>, max_concurrent: Option<i64>) -> Self {
        let n = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        AccountLimits {
            rpm: n(rpm),
            tpm: n(tpm),
            max_concurrent: n(max_concurrent),
        }
    }
}

/// What was counted when an account is at its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
    Concurrency,
}

/// Why an account cannot take a request now, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saturated {
    pub kind: Kind,
    /// The declared limit that refused; 0 = the provider said so (no declared limit involved).
    pub limit: u64,
    pub retry_after: Duration,
}

impl Saturated {
    /// The earlier of two (the one a client should wait for).
    pub fn earliest(a: Option<Saturated>, b: Saturated) -> Saturated {
        match a {
            Some(a) if a.retry_after <= b.retry_after => a,
            _ => b,
        }
    }
}

/// One account's limit state on this instance.
#[derive(Debug, Default)]
pub struct State {
    rpm: Gcra,
    tpm: Gcra,
    in_flight: AtomicU32,
    /// Nanoseconds (account-set clock) until which the provider said no requests are left.
    requests_until_ns: AtomicU64,
    /// Likewise for tokens.
    tokens_until_ns: AtomicU64,
}

fn rate(limit: u64) -> Option<Rate> {
    NonZeroU64::new(limit).map(|l| Rate::new(l, MINUTE))
}

/// What a request took from an account with declared limits: its concurrency slot (given back
/// on drop) and its token estimate (settled by [`Hold::settle`]).
#[derive(Debug)]
pub struct Hold {
    state: Arc<State>,
    tpm: u64,
    /// Tokens taken on the estimate (0 = none, or already settled).
    tokens: u64,
    slot: bool,
}

impl Hold {
    /// Settles the token limit on what the request actually used. Once; later calls do nothing.
    pub fn settle(&mut self, now_ns: u64, actual_tokens: u64) {
        if let (true, Some(r)) = (self.tokens > 0, rate(self.tpm)) {
            self.state.tpm.settle(r, now_ns, self.tokens, actual_tokens);
            self.tokens = 0;
        }
    }

    /// Whether this hold is a concurrency slot (for tests and the bench).
    pub fn holds_slot(&self) -> bool {
        self.slot
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if std::mem::take(&mut self.slot) {
            self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl State {
    /// The provider's saturation at `now_ns`, if any (the later of requests and tokens).
    fn reported(&self, now_ns: u64) -> Option<Saturated> {
        let r = self.requests_until_ns.load(Ordering::Relaxed);
        let t = self.tokens_until_ns.load(Ordering::Relaxed);
        let (kind, until) = if r >= t {
            (Kind::Requests, r)
        } else {
            (Kind::Tokens, t)
        };
        (until > now_ns).then(|| Saturated {
            kind,
            limit: 0,
            retry_after: Duration::from_nanos(until - now_ns),
        })
    }

    /// Whether the account can be tried at all without taking anything: not saturated by the
    /// provider's report nor at its concurrency limit (rates are only known by taking).
    pub fn may_take(&self, limits: &AccountLimits, now_ns: u64) -> bool {
        self.reported(now_ns).is_none()
            && (limits.max_concurrent == 0
                || u64::from(self.in_flight.load(Ordering::Relaxed)) < limits.max_concurrent)
    }

    /// Takes one request (and `estimate()` tokens, asked only when a tpm is declared) at `now_ns`
    /// if every declared limit and the provider's report allow it; otherwise takes nothing.
    /// `Ok(None)`: allowed, nothing to hold (no limits declared).
    pub fn try_take(
        self: &Arc<State>,
        limits: &AccountLimits,
        now_ns: u64,
        estimate: impl FnOnce() -> u64,
    ) -> Result<Option<Hold>, Saturated> {
        if let Some(s) = self.reported(now_ns) {
            return Err(s);
        }
        if limits.is_none() {
            return Ok(None);
        }
        let mut hold = Hold {
            state: self.clone(),
            tpm: limits.tpm,
            tokens: 0,
            slot: false,
        };
        if limits.max_concurrent > 0 {
            let max = u32::try_from(limits.max_concurrent).unwrap_or(u32::MAX);
            if self.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(Saturated {
                    kind: Kind::Concurrency,
                    limit: limits.max_concurrent,
                    retry_after: CONCURRENCY_RETRY,
                });
            }
            hold.slot = true;
        }
        let rpm = rate(limits.rpm);
        if let Some(r) = rpm {
            let d = self.rpm.acquire(r, now_ns, 1);
            if !d.allowed {
                return Err(Saturated {
                    kind: Kind::Requests,
                    limit: limits.rpm,
                    retry_after: d.retry_after,
                });
            }
        }
        if let Some(r) = rate(limits.tpm) {
            let cost = estimate().min(limits.tpm);
            let d = self.tpm.acquire(r, now_ns, cost);
            if !d.allowed {
                if let Some(r) = rpm {
                    self.rpm.settle(r, now_ns, 1, 0);
                }
                return Err(Saturated {
                    kind: Kind::Tokens,
                    limit: limits.tpm,
                    retry_after: d.retry_after,
                });
            }
            hold.tokens = cost;
        }
        Ok(Some(hold))
    }

    /// The provider said the account is out of requests and/or tokens for a while (each wait
    /// capped at `max`): skip it until then.
    pub fn report(&self, now_ns: u64, fb: Feedback, max: Duration) {
        let until = |d: Duration| now_ns.saturating_add(nanos(d.min(max)));
        if let Some(d) = fb.requests {
            self.requests_until_ns
                .fetch_max(until(d), Ordering::Relaxed);
        }
        if let Some(d) = fb.tokens {
            self.tokens_until_ns.fetch_max(until(d), Ordering::Relaxed);
        }
    }

    /// Whether the provider said the account is out of requests or tokens at `now_ns`.
    pub fn provider_out(&self, now_ns: u64) -> bool {
        self.reported(now_ns).is_some()
    }

    /// Requests in flight on this account now (counted where `max_concurrent` is declared).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a response said about the account's limits: how long it is out of requests and of
/// tokens (`None` = not out, or not said).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Feedback {
    pub requests: Option<Duration>,
    pub tokens: Option<Duration>,
}

impl Feedback {
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

/// Anthropic's token headers: (remaining, reset) for all tokens, input and output.
const ANTHROPIC_TOKENS: [(&str, &str); 3] = [
    (
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ),
    (
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ),
    (
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ),
];

/// Reads a response's rate-limit headers: OpenAI's `x-ratelimit-remaining-{requests,tokens}` with
/// `x-ratelimit-reset-*` (Go durations), Anthropic's `anthropic-ratelimit-{requests,tokens,
/// input-tokens,output-tokens}-{remaining,reset}` (RFC 3339 times, against `now_unix_ms`), and on
/// a 429 `retry-after` (seconds) or `retry-after-ms`. A remaining of 0 with a usable reset marks
/// that kind out until then; a 429 marks requests out for its `retry-after` when nothing more
/// precise was said, or for `default_429` when nothing at all was. Bad values are ignored.
pub fn feedback(
    headers: &http::HeaderMap,
    status: u16,
    now_unix_ms: i64,
    default_429: Duration,
) -> Feedback {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let zero = |name: &str| get(name).and_then(|v| v.parse::<u64>().ok()) == Some(0);
    let mut fb = Feedback::default();
    let longer = |slot: &mut Option<Duration>, d: Duration| {
        if slot.is_none_or(|old| d > old) {
            *slot = Some(d);
        }
    };
    // OpenAI
    if zero("x-ratelimit-remaining-requests") {
        if let Some(d) = get("x-ratelimit-reset-requests").and_then(parse_go_duration) {
            longer(&mut fb.requests, d);
        }
    }
    if zero("x-ratelimit-remaining-tokens") {
        if let Some(d) = get("x-ratelimit-reset-tokens").and_then(parse_go_duration) {
            longer(&mut fb.tokens, d);
        }
    }
    // Anthropic
    let until = |name: &str| get(name).and_then(|v| until_rfc3339(v, now_unix_ms));
    if zero("anthropic-ratelimit-requests-remaining") {
        if let Some(d) = until("anthropic-ratelimit-requests-reset") {
            longer(&mut fb.requests, d);
        }
    }
    for (remaining, reset) in ANTHROPIC_TOKENS {
        if zero(remaining) {
            if let Some(d) = until(reset) {
                longer(&mut fb.tokens, d);
            }
        }
    }
    if status == 429 && fb.is_empty() {
        let retry = get("retry-after-ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .or_else(|| {
                get("retry-after")
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
            });
        fb.requests = Some(retry.unwrap_or(default_429));
    }
    fb
}

/// A Go duration as OpenAI writes `x-ratelimit-reset-*`: `20ms`, `1s`, `1.5s`, `6m0s`,
/// `1h0m0s` (units h, m, s, ms, us/µs, ns; decimal fractions). `None` for anything else.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() || rest.len() > 64 {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        if number.is_empty() || number == "." {
            return None;
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        let (whole, frac) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if frac.contains('.') || (whole.is_empty() && frac.is_empty()) {
            return None;
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut ns = whole.checked_mul(unit_ns)?;
        // The fraction: 12 digits are more than a nanosecond's worth at any unit up to `h`.
        let frac: String = frac.chars().take(12).collect();
        if !frac.is_empty() {
            let f: u128 = frac.parse().ok()?;
            ns = ns.checked_add(f * unit_ns / 10u128.pow(frac.len() as u32))?;
        }
        total_ns = total_ns.checked_add(ns)?;
        rest = next;
    }
    u64::try_from(total_ns).ok().map(Duration::from_nanos)
}

/// How long from `now_unix_ms` until an RFC 3339 time (zero when it is past); `None` when the
/// text is not one.
pub fn until_rfc3339(s: &str, now_unix_ms: i64) -> Option<Duration> {
    let t = chrono::DateTime::parse_from_rfc3339(s.trim()).ok()?;
    let ms = t.timestamp_millis().saturating_sub(now_unix_ms);
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn limits(rpm: u64, tpm: u64, max_concurrent: u64) -> AccountLimits {
        AccountLimits {
            rpm,
            tpm,
            max_concurrent,
        }
    }

    /// Steps of (time in ms, token estimate, expected: Ok(holds a slot) or Err((kind, retry ms))).
    /// Holds are kept (slots stay taken) unless the step's estimate is `u64::MAX`: then every
    /// hold so far is dropped first and the step takes nothing.
    /// (time in ms, token estimate, Ok(holds a slot) or Err((kind, retry in ms))).
    type Step = (u64, u64, Result<bool, (Kind, u64)>);

    fn check(l: AccountLimits, steps: &[Step]) {
        let state = Arc::new(State::default());
        let mut held = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let (ms, estimate, expected) = (step.0, step.1, &step.2);
            if estimate == u64::MAX {
                held.clear();
                continue;
            }
            let got = state.try_take(&l, 1_000 * S + ms * MS, || estimate);
            match (got, expected) {
                (Ok(h), Ok(slot)) => {
                    assert_eq!(h.as_ref().is_some_and(Hold::holds_slot), *slot, "step {i}");
                    held.push(h);
                }
                (Err(s), Err((kind, retry_ms))) => {
                    assert_eq!(
                        (s.kind, s.retry_after.as_millis() as u64),
                        (*kind, *retry_ms),
                        "step {i}"
                    );
                }
                (got, expected) => panic!("step {i}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn declared_limits() {
        use Kind::*;
        // Nothing declared: always allowed, nothing held.
        check(limits(0, 0, 0), &[(0, 5, Ok(false)), (0, 5, Ok(false))]);
        // 10 a minute: ten, then the 11th waits 6 s (one refills every 6 s).
        let mut steps: Vec<_> = (0..10).map(|_| (0, 0, Ok(false))).collect();
        steps.push((0, 0, Err((Requests, 6_000))));
        steps.push((5_999, 0, Err((Requests, 1))));
        steps.push((6_000, 0, Ok(false)));
        check(limits(10, 0, 0), &steps);
        // 2 in flight: the third refused for 1 s; dropping the holds gives the slots back.
        check(
            limits(0, 0, 2),
            &[
                (0, 0, Ok(true)),
                (0, 0, Ok(true)),
                (0, 0, Err((Concurrency, 1_000))),
                (0, u64::MAX, Ok(false)),
                (0, 0, Ok(true)),
            ],
        );
        // 1000 tokens a minute: 600 fit, another 600 wait for 200 to refill (12 s).
        check(
            limits(0, 1000, 0),
            &[(0, 600, Ok(false)), (0, 600, Err((Tokens, 12_000)))],
        );
    }

    #[test]
    fn a_refusal_takes_nothing() {
        // rpm 2, tpm 100: the token refusal gives the request unit back, so two still fit.
        let state = Arc::new(State::default());
        let l = limits(2, 100, 1);
        let now = 10 * S;
        assert!(state.try_take(&l, now, || 500).is_ok()); // capped at 100; slot dropped at once
        assert_eq!(state.in_flight(), 0);
        let refused = state.try_take(&l, now, || 1).unwrap_err();
        assert_eq!(refused.kind, Kind::Tokens);
        assert_eq!(state.in_flight(), 0, "the slot came back");
        // The refused request's rpm unit came back: a second after, a token has refilled and the
        // second request of the minute fits (it would not had the refusal kept its unit).
        assert!(state.try_take(&l, now + S, || 1).is_ok());
    }

    #[test]
    fn settlement_returns_unused_tokens() {
        let state = Arc::new(State::default());
        let l = limits(0, 1000, 0);
        let now = 5 * S;
        let mut h = state.try_take(&l, now, || 900).unwrap().unwrap();
        assert!(state.try_take(&l, now, || 900).is_err());
        h.settle(now, 100); // used 100: 800 come back
        h.settle(now, 100); // a second settlement changes nothing
        assert!(state.try_take(&l, now, || 900).is_ok());
        assert!(state.try_take(&l, now, || 1).is_err());
    }

    #[test]
    fn the_estimate_is_asked_only_for_a_token_limit() {
        let state = Arc::new(State::default());
        let asked = std::cell::Cell::new(0);
        let _ = state.try_take(&limits(5, 0, 0), 0, || {
            asked.set(asked.get() + 1);
            1
        });
        let _ = state.try_take(&limits(0, 0, 0), 0, || {
            asked.set(asked.get() + 1);
            1
        });
        assert_eq!(asked.get(), 0);
    }

    #[test]
    fn provider_reports_saturate_until_reset() {
        let state = Arc::new(State::default());
        let none = limits(0, 0, 0);
        let now = 100 * S;
        let fb = Feedback {
            requests: Some(Duration::from_secs(30)),
            tokens: None,
        };
        state.report(now, fb, Duration::from_secs(600));
        let s = state.try_take(&none, now + S, || 0).unwrap_err();
        assert_eq!(
            (s.kind, s.limit, s.retry_after),
            (Kind::Requests, 0, Duration::from_secs(29))
        );
        assert!(!state.may_take(&none, now + S));
        assert!(state.try_take(&none, now + 30 * S, || 0).is_ok());
        // Capped at `max`; tokens reported separately, the later one answered.
        state.report(
            now,
            Feedback {
                requests: Some(Duration::from_secs(2)),
                tokens: Some(Duration::from_secs(3600)),
            },
            Duration::from_secs(60),
        );
        let s = state.try_take(&none, now, || 0).unwrap_err();
        assert_eq!(
            (s.kind, s.retry_after),
            (Kind::Tokens, Duration::from_secs(60))
        );
    }

    #[test]
    fn go_durations() {
        fn check(input: &str, expected: Option<u64>) {
            assert_eq!(
                parse_go_duration(input),
                expected.map(Duration::from_millis),
                "{input:?}"
            );
        }
        check("20ms", Some(20));
        check("1s", Some(1_000));
        check("1.5s", Some(1_500));
        check("6m0s", Some(360_000));
        check("1h0m0s", Some(3_600_000));
        check("2m30.25s", Some(150_250));
        check("0s", Some(0));
        check("0", Some(0));
        check(" 30s ", Some(30_000));
        check(".5s", Some(500));
        check("1000us", Some(1));
        check("", None);
        check("s", None);
        check("10", None);
        check("1.2.3s", None);
        check("5d", None);
        check("-1s", None);
        check("1s garbage", None);
        check("99999999999999999999h", None);
        check("9999999999999h", None);
    }

    #[test]
    fn rfc3339_resets() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .timestamp_millis();
        fn check(input: &str, now: i64, expected: Option<u64>) {
            assert_eq!(
                until_rfc3339(input, now),
                expected.map(Duration::from_millis),
                "{input:?}"
            );
        }
        check("2026-01-01T00:00:30Z", now, Some(30_000));
        check("2026-01-01T01:00:00.5+01:00", now, Some(500));
        check("2025-12-31T23:59:00Z", now, Some(0));
        check("tomorrow", now, None);
        check("", now, None);
    }

    #[test]
    fn feedback_from_headers() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .timestamp_millis();
        let d = |s: u64| Some(Duration::from_secs(s));
        fn check(headers: &[(&str, &str)], status: u16, now: i64, expected: Feedback) {
            let mut map = http::HeaderMap::new();
            for (k, v) in headers {
                map.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
                );
            }
            assert_eq!(
                feedback(&map, status, now, Duration::from_secs(7)),
                expected,
                "{headers:?} {status}"
            );
        }
        let fb = |requests, tokens| Feedback { requests, tokens };
        check(&[], 200, now, fb(None, None));
        check(
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "30s"),
            ],
            200,
            now,
            fb(d(30), None),
        );
        // Remaining above 0 says nothing; a reset without remaining says nothing.
        check(
            &[
                ("x-ratelimit-remaining-requests", "3"),
                ("x-ratelimit-reset-requests", "30s"),
                ("x-ratelimit-reset-tokens", "1s"),
            ],
            200,
            now,
            fb(None, None),
        );
        check(
            &[
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ],
            200,
            now,
            fb(None, d(360)),
        );
        // Bad values are ignored.
        check(
            &[
                ("x-ratelimit-remaining-requests", "zero"),
                ("x-ratelimit-reset-requests", "30s"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "soon"),
            ],
            200,
            now,
            fb(None, None),
        );
        check(
            &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "\u{80}"),
            ],
            200,
            now,
            fb(None, None),
        );
        // Anthropic: RFC 3339 resets; input/output tokens count as tokens, the later wins.
        check(
            &[
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:20Z"),
                ("anthropic-ratelimit-input-tokens-remaining", "0"),
                (
                    "anthropic-ratelimit-input-tokens-reset",
                    "2026-01-01T00:00:05Z",
                ),
                ("anthropic-ratelimit-output-tokens-remaining", "0"),
                (
                    "anthropic-ratelimit-output-tokens-reset",
                    "2026-01-01T00:00:09Z",
                ),
            ],
            200,
            now,
            fb(d(20), d(9)),
        );
        check(
            &[
                ("anthropic-ratelimit-tokens-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", "not a time"),
            ],
            200,
            now,
            fb(None, None),
        );
        // 429: retry-after when nothing more precise was said; the default when nothing at all.
        check(&[("retry-after", "120")], 429, now, fb(d(120), None));
        check(
            &[("retry-after", "120"), ("retry-after-ms", "1500")],
            429,
            now,
            fb(Some(Duration::from_millis(1500)), None),
        );
        check(&[], 429, now, fb(d(7), None));
        check(
            &[("retry-after", "Wed, 21 Oct 2015")],
            429,
            now,
            fb(d(7), None),
        );
        check(
            &[
                ("retry-after", "120"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "1s"),
            ],
            429,
            now,
            fb(None, d(1)),
        );
        // retry-after on a success is not a saturation.
        check(&[("retry-after", "120")], 200, now, fb(None, None));
    }
}
