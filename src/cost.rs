//! Prices and cost: the per-model price table (USD per 1,000,000 tokens, decimal strings only)
//! and exact decimal cost of a [`Usage`](crate::usage::Usage).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::usage::Usage;

/// Decimal places a cost is rounded to (half-even).
pub const COST_DP: u32 = 10;

/// USD per 1,000,000 tokens. Deserialised from decimal strings such as `"0.15"`; JSON numbers
/// are rejected so that no price ever passes through a float.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(deserialize_with = "decimal_str")]
    pub input: Decimal,
    /// Output (completion) tokens; optional, 0 when absent (embedding models have no output).
    #[serde(default, deserialize_with = "decimal_str")]
    pub output: Decimal,
    /// Cache reads; defaults to `input`.
    #[serde(default, deserialize_with = "opt_decimal_str")]
    pub cached_input: Option<Decimal>,
    /// Cache writes (Anthropic cache creation); defaults to `input`.
    #[serde(default, deserialize_with = "opt_decimal_str")]
    pub cache_write: Option<Decimal>,
}

/// Cost in USD of `usage` at `price`, rounded half-even to [`COST_DP`] decimal places.
/// Saturates at `Decimal::MAX` instead of overflowing (needs absurd prices to happen).
pub fn cost(usage: &Usage, price: &Price) -> Decimal {
    let terms = [
        (usage.input_tokens, price.input),
        (
            usage.cached_input_tokens,
            price.cached_input.unwrap_or(price.input),
        ),
        (
            usage.cache_creation_tokens,
            price.cache_write.unwrap_or(price.input),
        ),
        (usage.output_tokens, price.output),
    ];
    let mut total = Decimal::ZERO;
    for (tokens, per_million) in terms {
        if tokens == 0 {
            continue;
        }
        // tokens / 1_000_000 exactly, by scale: a u64 always fits the 96-bit mantissa.
        let millions = Decimal::from_i128_with_scale(i128::from(tokens), 6);
        let Some(t) = millions
            .checked_mul(per_million)
            .and_then(|t| total.checked_add(t))
        else {
            return Decimal::MAX;
        };
        total = t;
    }
    total
        .round_dp_with_strategy(COST_DP, RoundingStrategy::MidpointNearestEven)
        .normalize()
}

/// `cost` with exactly [`COST_DP`] decimal places (`0.5` → `0.5000000000`), rounded half-even
/// first if it has more: how reports print costs, so that a column of them lines up and every
/// row has the same precision. Values too large for that many places keep as many as fit.
pub fn fixed_dp(cost: Decimal) -> Decimal {
    let mut c = cost.round_dp_with_strategy(COST_DP, RoundingStrategy::MidpointNearestEven);
    c.rescale(COST_DP);
    c
}

/// Model name -> price, with dated/suffixed model names resolved by prefix.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct PriceTable {
    prices: ModelMap<Price>,
}

/// A map keyed by model name, looked up for every request ([`lookup_model`]).
pub type ModelMap<V> = foldhash::HashMap<String, V>;

impl PriceTable {
    pub fn new(prices: HashMap<String, Price>) -> Self {
        Self {
            prices: prices.into_iter().collect(),
        }
    }

    /// The model names the table prices.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.prices.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.prices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// Exact match first, else the longest table key `k` such that `model` starts with `k`
    /// followed by `-` (so `gpt-4o-2024-08-06` finds `gpt-4o`, and `gpt-4o-mini-2024-07-18`
    /// prefers `gpt-4o-mini` over `gpt-4o`). Returns the table key and its price.
    pub fn lookup(&self, model: &str) -> Option<(&str, &Price)> {
        lookup_model(&self.prices, model)
    }
}

/// [`PriceTable::lookup`]'s rule over any map keyed by model name (`pricing.rs` keeps the
/// prices in integer units per token in one).
pub fn lookup_model<'a, V>(map: &'a ModelMap<V>, model: &str) -> Option<(&'a str, &'a V)> {
    if let Some((k, v)) = map.get_key_value(model) {
        return Some((k.as_str(), v));
    }
    // Each '-' from the right is a candidate boundary; the first hit is the longest key.
    model
        .char_indices()
        .rev()
        .filter(|&(_, c)| c == '-')
        .find_map(|(i, _)| map.get_key_value(&model[..i]))
        .map(|(k, v)| (k.as_str(), v))
}

impl FromIterator<(String, Price)> for PriceTable {
    fn from_iter<I: IntoIterator<Item = (String, Price)>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

fn parse_price<E: de::Error>(s: &str) -> Result<Decimal, E> {
    let d = Decimal::from_str(s.trim()).map_err(|e| {
        E::custom(format_args!(
            "invalid price {s:?}: {e} (expected a decimal string like \"0.15\")"
        ))
    })?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(E::custom(format_args!("invalid price {s:?}: negative")));
    }
    Ok(d)
}

struct DecimalStr;

impl Visitor<'_> for DecimalStr {
    type Value = Decimal;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a price as a decimal string like \"0.15\" (USD per 1M tokens; numbers are rejected \
             to avoid float rounding)",
        )
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Decimal, E> {
        parse_price(v)
    }
}

fn decimal_str<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    d.deserialize_str(DecimalStr)
}

fn opt_decimal_str<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Decimal>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            DecimalStr.expecting(f)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            decimal_str(d).map(Some)
        }
    }
    d.deserialize_option(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("decimal literal")
    }

    fn price(input: &str, output: &str, cached: Option<&str>, write: Option<&str>) -> Price {
        Price {
            input: d(input),
            output: d(output),
            cached_input: cached.map(d),
            cache_write: write.map(d),
        }
    }

    /// (input, cached, creation, output)
    type U = (u64, u64, u64, u64);

    fn check(usage: U, price: &Price, expected: &str) {
        let (input, cached, creation, output) = usage;
        let u = Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            cache_creation_tokens: creation,
            output_tokens: output,
        };
        let got = cost(&u, price);
        assert_eq!(got, d(expected), "{usage:?} at {price:?}");
        assert_eq!(got.to_string(), expected, "{usage:?} at {price:?}");
        assert!(got.scale() <= COST_DP);
    }

    #[test]
    fn costs() {
        let mini = price("0.15", "0.60", Some("0.075"), None);
        let sonnet = price("3", "15", Some("0.30"), Some("3.75"));
        let no_cache_prices = price("2.50", "10.00", None, None);
        let half = price("0.00005", "0.00015", Some("0.00025"), Some("0.00035"));
        let table: &[(U, &Price, &str)] = &[
            ((0, 0, 0, 0), &mini, "0"),
            ((100, 0, 0, 0), &mini, "0.000015"),
            ((1, 0, 0, 0), &mini, "0.00000015"),
            ((0, 0, 0, 1), &mini, "0.0000006"),
            ((1_000_000, 0, 0, 1_000_000), &mini, "0.75"),
            ((1117, 0, 0, 46), &mini, "0.00019515"),
            // cached tokens at the cached price
            ((86, 1920, 0, 12), &mini, "0.0001641"),
            // Anthropic: cache reads and writes
            ((25, 100, 2048, 15), &sonnet, "0.00801"),
            // cached / write prices default to the input price
            ((10, 20, 30, 40), &no_cache_prices, "0.00055"),
            // half-even at the 10th place: 0.5e-10 -> 0, 1.5e-10 -> 2e-10, 2.5e-10 -> 2e-10
            ((1, 0, 0, 0), &half, "0"),
            ((0, 0, 0, 1), &half, "0.0000000002"),
            ((0, 1, 0, 0), &half, "0.0000000002"),
            ((0, 0, 1, 0), &half, "0.0000000004"),
            ((3, 0, 0, 0), &half, "0.0000000002"),
            // rounding happens once, on the sum: 0.5e-10 + 1.5e-10 = 2e-10
            ((1, 0, 0, 1), &half, "0.0000000002"),
            ((1, 1, 0, 0), &half, "0.0000000003"),
            // large counts don't overflow
            ((u64::MAX, 0, 0, 0), &mini, "2767011611056.43274225"),
            (
                (u64::MAX, u64::MAX, u64::MAX, u64::MAX),
                &sonnet,
                "406750706825295.61311075",
            ),
            (
                (u64::MAX, 0, 0, u64::MAX),
                &price("1000000", "1000000", None, None),
                "36893488147419103230",
            ),
        ];
        for &(usage, price, expected) in table {
            check(usage, price, expected);
        }
    }

    #[test]
    fn fixed_decimal_places() {
        fn check(input: &str, expected: &str) {
            assert_eq!(fixed_dp(d(input)).to_string(), expected, "{input}");
        }
        for (input, expected) in [
            ("0", "0.0000000000"),
            ("0.5", "0.5000000000"),
            ("0.00019515", "0.0001951500"),
            ("12", "12.0000000000"),
            ("0.0000000002", "0.0000000002"),
            // more places than COST_DP (sums read back from a database): half-even
            ("0.00000000005", "0.0000000000"),
            ("0.00000000015", "0.0000000002"),
            ("406750706825295.61311075", "406750706825295.6131107500"),
        ] {
            check(input, expected);
        }
    }

    #[test]
    fn absurd_prices_saturate() {
        let p = price("79228162514264337593543950335", "0", None, None);
        let u = Usage {
            input_tokens: u64::MAX,
            ..Usage::default()
        };
        assert_eq!(cost(&u, &p), Decimal::MAX);
    }

    #[test]
    fn price_deserialisation() {
        let table: &[(&str, Result<Price, &str>)] = &[
            (
                r#"{"input":"0.15","output":"0.60"}"#,
                Ok(price("0.15", "0.60", None, None)),
            ),
            (
                r#"{"input":"3","output":"15","cached_input":"0.30","cache_write":"3.75"}"#,
                Ok(price("3", "15", Some("0.30"), Some("3.75"))),
            ),
            (
                r#"{"input":" 1.25 ","output":"10","cached_input":null}"#,
                Ok(price("1.25", "10", None, None)),
            ),
            (
                r#"{"input":0.15,"output":"0.60"}"#,
                Err("invalid type: floating point `0.15`, expected a price as a decimal string"),
            ),
            (
                r#"{"input":"0.15","output":1}"#,
                Err("invalid type: integer `1`, expected a price as a decimal string"),
            ),
            (
                r#"{"input":"0.15","output":"1","cached_input":0.1}"#,
                Err("invalid type: floating point `0.1`, expected a price as a decimal string"),
            ),
            (
                r#"{"input":"abc","output":"1"}"#,
                Err("invalid price \"abc\""),
            ),
            // exact scientific notation is still a decimal
            (
                r#"{"input":"1e-3","output":"1"}"#,
                Ok(price("0.001", "1", None, None)),
            ),
            (r#"{"input":"","output":"1"}"#, Err("invalid price \"\"")),
            (
                r#"{"input":"-1","output":"1"}"#,
                Err("invalid price \"-1\": negative"),
            ),
            // embedding models: no output price, output tokens cost 0
            (r#"{"input":"0.02"}"#, Ok(price("0.02", "0", None, None))),
            (r#"{"output":"1"}"#, Err("missing field `input`")),
            (
                r#"{"input":"1","output":"1","cache_read":"0.1"}"#,
                Err("unknown field `cache_read`"),
            ),
        ];
        for (json, expected) in table {
            let got = serde_json::from_str::<Price>(json);
            match (got, expected) {
                (Ok(p), Ok(want)) => assert_eq!(&p, want, "{json}"),
                (Err(e), Err(want)) => {
                    assert!(e.to_string().starts_with(want), "{json}: {e}")
                }
                (got, _) => panic!("{json}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn lookup() {
        let table: PriceTable = serde_json::from_str(
            r#"{
                "gpt-4o": {"input":"2.50","output":"10"},
                "gpt-4o-mini": {"input":"0.15","output":"0.60"},
                "gpt-4o-2024-05-13": {"input":"5","output":"15"},
                "claude-sonnet-4-5": {"input":"3","output":"15"},
                "o1": {"input":"15","output":"60"}
            }"#,
        )
        .expect("table");
        assert_eq!(table.len(), 5);
        let cases: &[(&str, Option<&str>)] = &[
            ("gpt-4o", Some("gpt-4o")),
            ("gpt-4o-2024-08-06", Some("gpt-4o")),
            ("gpt-4o-2024-05-13", Some("gpt-4o-2024-05-13")),
            ("gpt-4o-mini", Some("gpt-4o-mini")),
            ("gpt-4o-mini-2024-07-18", Some("gpt-4o-mini")),
            ("gpt-4o-mini-search-preview", Some("gpt-4o-mini")),
            ("claude-sonnet-4-5-20250929", Some("claude-sonnet-4-5")),
            ("o1-2024-12-17", Some("o1")),
            ("o1-mini", Some("o1")),
            // the prefix must end at a '-'
            ("gpt-4omni", None),
            ("o1x", None),
            ("gpt-4", None),
            ("gpt-4o-", Some("gpt-4o")),
            ("", None),
            ("-", None),
            ("GPT-4O", None),
            ("gpt-4o-✓", Some("gpt-4o")),
        ];
        for &(model, want) in cases {
            let got = table.lookup(model);
            assert_eq!(got.map(|(k, _)| k), want, "{model}");
            if let Some((k, p)) = got {
                assert_eq!(Some(p), table.prices.get(k));
            }
        }
        assert!(PriceTable::default().lookup("gpt-4o").is_none());
        assert!(PriceTable::default().is_empty());
    }
}
