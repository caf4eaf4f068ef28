//! Pure spend arithmetic: budget periods on a given clock, amounts as integer units, and the
//! worst case a request can cost (its reservation). No I/O, no clock other than the time given.
//!
//! **The reservation is an upper bound** when the request states its output cap
//! (`max_tokens`, `max_completion_tokens`, `max_output_tokens`): a text prompt has at most one
//! token per byte of the request body (every tokenizer tollgate prices maps each token to at
//! least one byte of text, and the JSON around and inside the text only adds bytes), each image
//! or audio part is counted at `[spend] tokens_per_media_part` on top, and the output is at most
//! the cap times the number of choices (`n`). Without a cap the output is reserved at
//! `[spend] default_max_output_tokens`; what such a request spends beyond it is the bound
//! ARCHITECTURE.md states.

use chrono::{DateTime, Datelike, Duration, Months, NaiveDate, TimeZone, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

use crate::cost::{Price, COST_DP};
pub use crate::record::{Metric, Period};

/// Integer units an amount of a metric is kept in on the request path: 10⁻¹⁰ USD for cost (the
/// precision of `usage_records.cost`), one token, one request.
pub fn units_per(metric: Metric) -> i64 {
    match metric {
        Metric::Cost => 10_000_000_000,
        Metric::Tokens | Metric::Requests => 1,
    }
}

/// `amount` in units of `metric`, rounded up (a reservation is never smaller than its amount);
/// saturates at `i64::MAX` (9.2 × 10⁸ USD).
pub fn to_units(metric: Metric, amount: Decimal) -> i64 {
    // Exact without rounding when the amount has no more places than a unit (every cost does):
    // the mantissa scaled up, integers only (this runs for every settled request).
    let places = match metric {
        Metric::Cost => COST_DP,
        Metric::Tokens | Metric::Requests => 0,
    };
    if amount.scale() <= places {
        if let Some(units) = i64::try_from(amount.mantissa())
            .ok()
            .and_then(|m| m.checked_mul(10i64.pow(places - amount.scale())))
        {
            return units;
        }
    }
    let scaled = amount
        .checked_mul(Decimal::from(units_per(metric)))
        .unwrap_or(Decimal::MAX)
        .round_dp_with_strategy(0, RoundingStrategy::ToPositiveInfinity);
    i64::try_from(scaled).unwrap_or(if scaled.is_sign_negative() {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// Units back to an exact amount.
pub fn from_units(metric: Metric, units: i64) -> Decimal {
    match metric {
        Metric::Cost => Decimal::from_i128_with_scale(i128::from(units), COST_DP),
        Metric::Tokens | Metric::Requests => Decimal::from(units),
    }
}

/// The period of `period` that contains `t`: `[start, end)`, `end = None` for `total`.
/// Calendar periods are UTC (weeks start on Monday); with an `anchor` (a subscription's start)
/// they run from it instead: every day, 7 days or calendar month after it (a month from the
/// 31st ends on the last day of a shorter month, as billing does).
pub fn period_bounds(
    period: Period,
    anchor: Option<DateTime<Utc>>,
    t: DateTime<Utc>,
) -> (DateTime<Utc>, Option<DateTime<Utc>>) {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    // Days and weeks are whole numbers of seconds from the epoch (UTC has no DST; leap seconds
    // are not counted by Unix time): integer arithmetic, no calendar. 1970-01-01 was a Thursday,
    // so Monday-based weeks start 3 days into the epoch's count.
    let floor = |t: DateTime<Utc>, len: i64, offset: i64| {
        let secs = t.timestamp() - offset;
        let start = secs - secs.rem_euclid(len) + offset;
        let at = DateTime::<Utc>::from_timestamp(start, 0).unwrap_or(epoch);
        (at, Some(at + Duration::seconds(len)))
    };
    const DAY: i64 = 86_400;
    match (period, anchor) {
        (Period::Total, a) => (a.unwrap_or(epoch), None),
        (Period::Day, None) => floor(t, DAY, 0),
        (Period::Week, None) => floor(t, 7 * DAY, -3 * DAY),
        (Period::Month, None) => {
            let d = t.date_naive();
            let first = NaiveDate::from_ymd_opt(d.year(), d.month(), 1).unwrap_or(d);
            let start = midnight(first);
            (start, start.checked_add_months(Months::new(1)))
        }
        (Period::Day | Period::Week, Some(a)) => {
            let len = Duration::days(if period == Period::Day { 1 } else { 7 });
            let k = (t - a).num_seconds().div_euclid(len.num_seconds());
            let start = a + len * i32::try_from(k).unwrap_or(0);
            (start, Some(start + len))
        }
        (Period::Month, Some(a)) => {
            // Months after the anchor: a first guess from the calendar, then corrected by at most
            // one either way (the day of month decides).
            let mut k = (t.year() - a.year()) * 12 + t.month() as i32 - a.month() as i32;
            let at = |k: i32| -> DateTime<Utc> {
                let m = Months::new(k.unsigned_abs());
                if k >= 0 {
                    a.checked_add_months(m)
                } else {
                    a.checked_sub_months(m)
                }
                .unwrap_or(a)
            };
            while at(k) > t {
                k -= 1;
            }
            while at(k + 1) <= t {
                k += 1;
            }
            (at(k), Some(at(k + 1)))
        }
    }
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
}

/// A price in cost units (10⁻¹⁰ USD) per token, each rate rounded **up**, so that a worst case
/// priced with it is never below the exact cost. Made once per price when prices load
/// (`pricing.rs`): the request path multiplies integers only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitPrice {
    /// The dearest input rate: plain, cache read or cache write.
    pub input: i64,
    pub output: i64,
}

impl UnitPrice {
    pub fn of(p: &Price) -> UnitPrice {
        let dearest = [Some(p.input), p.cached_input, p.cache_write]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(p.input);
        // USD per million tokens → units per token: × 10¹⁰ / 10⁶.
        let per_token = |rate: Decimal| to_units(Metric::Cost, rate / Decimal::from(1_000_000));
        UnitPrice {
            input: per_token(dearest).max(0),
            output: per_token(p.output).max(0),
        }
    }
}

/// What the reservation of one request rests on, read from its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestShape {
    /// Bytes of the request body.
    pub body_bytes: u64,
    /// Image and audio parts in it (each priced at `tokens_per_media_part`).
    pub media_parts: u64,
    /// The output cap the request states, if it states one.
    pub max_tokens: Option<u64>,
    /// Choices asked for (`n`), at least 1.
    pub choices: u64,
}

/// How a reservation is sized (`[spend]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Output tokens reserved for a request that states no cap.
    pub default_max_output_tokens: u64,
    /// Tokens reserved per image or audio part.
    pub tokens_per_media_part: u64,
}

/// The most a request can use: input and output tokens, and whether that is a true upper bound
/// (`bounded`: the request stated its output cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorstCase {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub bounded: bool,
}

impl WorstCase {
    pub fn of(shape: RequestShape, sizing: Sizing) -> WorstCase {
        let input_tokens = shape.body_bytes.saturating_add(
            shape
                .media_parts
                .saturating_mul(sizing.tokens_per_media_part),
        );
        let cap = shape.max_tokens.unwrap_or(sizing.default_max_output_tokens);
        WorstCase {
            input_tokens,
            output_tokens: cap.saturating_mul(shape.choices.max(1)),
            bounded: shape.max_tokens.is_some(),
        }
    }

    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// The most it can cost at `price`, in cost units (every input token at the dearest input
    /// rate, every output token at the output rate, each rate rounded up). No price: 0 (the
    /// request is unpriced and costs 0, as its usage row will).
    pub fn cost_units(&self, price: Option<UnitPrice>) -> i64 {
        let Some(p) = price else {
            return 0;
        };
        let tokens = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        tokens(self.input_tokens)
            .saturating_mul(p.input)
            .saturating_add(tokens(self.output_tokens).saturating_mul(p.output))
    }

    /// The reservation against a budget of `metric`, in units.
    pub fn units(&self, metric: Metric, price: Option<UnitPrice>) -> i64 {
        match metric {
            Metric::Cost => self.cost_units(price),
            Metric::Tokens => i64::try_from(self.tokens()).unwrap_or(i64::MAX),
            Metric::Requests => 1,
        }
    }
}

/// How much to ask for at once: enough for `per_lease` reservations like this one, at least the
/// reservation itself. The database grants less when the pool has less left (down to the
/// reservation: below it, the lease is refused).
pub fn lease_slice(reservation: i64, per_lease: i64) -> i64 {
    reservation.saturating_mul(per_lease).max(reservation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn periods() {
        let check = |period, anchor: Option<&str>, at: &str, start: &str, end: Option<&str>| {
            let got = period_bounds(period, anchor.map(t), t(at));
            assert_eq!(got, (t(start), end.map(t)), "{period:?} {anchor:?} {at}");
        };
        use Period::*;
        check(
            Day,
            None,
            "2026-12-01T23:59:59.999Z",
            "2026-12-01T00:00:00Z",
            Some("2026-12-02T00:00:00Z"),
        );
        check(
            Day,
            None,
            "2026-12-02T00:00:00Z",
            "2026-12-02T00:00:00Z",
            Some("2026-12-03T00:00:00Z"),
        );
        // 2026-12-02 is a Wednesday; weeks start on Monday.
        check(
            Week,
            None,
            "2026-12-02T10:00:00Z",
            "2026-11-30T00:00:00Z",
            Some("2026-12-07T00:00:00Z"),
        );
        check(
            Week,
            None,
            "2026-11-30T00:00:00Z",
            "2026-11-30T00:00:00Z",
            Some("2026-12-07T00:00:00Z"),
        );
        check(
            Month,
            None,
            "2026-12-31T23:00:00Z",
            "2026-12-01T00:00:00Z",
            Some("2027-01-01T00:00:00Z"),
        );
        check(
            Month,
            None,
            "2028-02-29T12:00:00Z",
            "2028-02-01T00:00:00Z",
            Some("2028-03-01T00:00:00Z"),
        );
        check(
            Total,
            None,
            "2026-12-02T10:00:00Z",
            "1970-01-01T00:00:00Z",
            None,
        );
        // Anchored (a subscription that started on the 31st at 15:00).
        let a = Some("2026-01-31T15:00:00Z");
        check(
            Month,
            a,
            "2026-01-31T15:00:00Z",
            "2026-01-31T15:00:00Z",
            Some("2026-02-28T15:00:00Z"),
        );
        check(
            Month,
            a,
            "2026-02-28T14:59:59Z",
            "2026-01-31T15:00:00Z",
            Some("2026-02-28T15:00:00Z"),
        );
        check(
            Month,
            a,
            "2026-02-28T15:00:00Z",
            "2026-02-28T15:00:00Z",
            Some("2026-03-31T15:00:00Z"),
        );
        check(
            Month,
            a,
            "2026-12-02T10:00:00Z",
            "2026-11-30T15:00:00Z",
            Some("2026-12-31T15:00:00Z"),
        );
        check(
            Day,
            a,
            "2026-02-01T14:59:59Z",
            "2026-01-31T15:00:00Z",
            Some("2026-02-01T15:00:00Z"),
        );
        check(
            Week,
            a,
            "2026-02-07T15:00:00Z",
            "2026-02-07T15:00:00Z",
            Some("2026-02-14T15:00:00Z"),
        );
        check(
            Total,
            a,
            "2030-01-01T00:00:00Z",
            "2026-01-31T15:00:00Z",
            None,
        );
    }

    #[test]
    fn units() {
        let check = |metric, amount: &str, units: i64| {
            let d = Decimal::from_str(amount).unwrap();
            assert_eq!(to_units(metric, d), units, "{amount}");
        };
        check(Metric::Cost, "1", 10_000_000_000);
        check(Metric::Cost, "0.0000000001", 1);
        check(Metric::Cost, "0.00000000001", 1); // rounded up
        check(Metric::Cost, "0", 0);
        check(Metric::Tokens, "1500", 1500);
        check(Metric::Cost, "1000000000000", i64::MAX);
        assert_eq!(
            from_units(Metric::Cost, 15),
            Decimal::from_str("0.0000000015").unwrap()
        );
        assert_eq!(from_units(Metric::Requests, 3), Decimal::from(3));
    }

    #[test]
    fn worst_case() {
        let sizing = Sizing {
            default_max_output_tokens: 4096,
            tokens_per_media_part: 2000,
        };
        let price = Price {
            input: Decimal::from_str("0.15").unwrap(),
            output: Decimal::from_str("0.60").unwrap(),
            cached_input: Some(Decimal::from_str("0.075").unwrap()),
            cache_write: Some(Decimal::from_str("0.1875").unwrap()),
        };
        let check = |shape: RequestShape, tokens: u64, bounded: bool, cost: &str| {
            let w = WorstCase::of(shape, sizing);
            assert_eq!((w.tokens(), w.bounded), (tokens, bounded), "{shape:?}");
            let units = w.cost_units(Some(UnitPrice::of(&price)));
            assert_eq!(
                from_units(Metric::Cost, units),
                Decimal::from_str(cost).unwrap(),
                "{shape:?}"
            );
            assert_eq!(w.units(Metric::Requests, Some(UnitPrice::of(&price))), 1);
        };
        let shape = |body_bytes, media_parts, max_tokens, choices| RequestShape {
            body_bytes,
            media_parts,
            max_tokens,
            choices,
        };
        // 100 bytes at the dearest input rate (cache write 0.1875) + 10 output at 0.60.
        check(shape(100, 0, Some(10), 1), 110, true, "0.00002475");
        check(shape(100, 0, Some(10), 3), 130, true, "0.00003675");
        check(shape(100, 1, Some(10), 1), 2110, true, "0.00039975");
        check(shape(100, 0, None, 1), 4196, false, "0.0024763500");
        assert_eq!(
            WorstCase::of(shape(100, 0, Some(10), 1), sizing).cost_units(None),
            0
        );
        // Rates rounded up, never down: $0.00001 per million tokens is 0.1 unit a token → 1.
        let tiny = Price {
            input: Decimal::from_str("0.00001").unwrap(),
            output: Decimal::from_str("0.6").unwrap(),
            cached_input: None,
            cache_write: None,
        };
        assert_eq!(
            UnitPrice::of(&tiny),
            UnitPrice {
                input: 1,
                output: 6000
            }
        );
        assert_eq!(
            UnitPrice::of(&price),
            UnitPrice {
                input: 1875,
                output: 6000
            }
        );
    }

    #[test]
    fn slices() {
        let check = |reservation, per_lease, expected: i64| {
            assert_eq!(
                lease_slice(reservation, per_lease),
                expected,
                "{reservation} {per_lease}"
            );
        };
        check(10, 32, 320);
        check(10, 1, 10);
        check(0, 32, 0);
        check(i64::MAX / 2, 32, i64::MAX);
        check(i64::MAX, 32, i64::MAX);
    }
}
