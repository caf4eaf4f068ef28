//! Pricing a request: the running price table (per model, with a default per account type) and
//! the cost counter each price feeds. Built at start and by every config reload (`reload.rs`),
//! which is also when the counters are registered; the request path only reads it.

use std::collections::HashMap;

use rust_decimal::Decimal;

use crate::budget::UnitPrice;
use crate::cost::{cost, lookup_model, ModelMap, Price, PriceTable};
use crate::metrics::{CostCounter, CostCounters};
use crate::upstream::AccountType;
use crate::usage::Usage;

/// The price table from the config, with the `tollgate_cost_total` counter of every entry.
#[derive(Debug, Default)]
pub struct Pricing {
    models: PriceTable,
    /// Per table key, one counter per account type (indexed by [`AccountType::index`]).
    model_counters: ModelMap<[CostCounter; 3]>,
    /// Per table key, the price in cost units per token (`budget::UnitPrice`), for reserving a
    /// request's worst case (`spend.rs`) with integers only.
    model_units: ModelMap<UnitPrice>,
    defaults: foldhash::HashMap<AccountType, (Price, CostCounter, UnitPrice)>,
    /// The dearest input and output rates of the table: a request whose model cannot be read
    /// is reserved at them.
    dearest: Option<UnitPrice>,
}

/// The priced outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced<'a> {
    pub cost: Decimal,
    /// The counter of the price used; `None` = unpriced (counted as such, never guessed).
    pub counter: Option<&'a CostCounter>,
}

impl Pricing {
    /// Registers (or finds again, after a reload) the cost counter of every entry.
    pub fn new(
        models: PriceTable,
        defaults: HashMap<AccountType, Price>,
        counters: &CostCounters,
    ) -> Pricing {
        let model_counters = models
            .keys()
            .map(|key| {
                let per_type = AccountType::ALL.map(|kind| counters.get(kind, key));
                (key.to_string(), per_type)
            })
            .collect();
        let model_units: ModelMap<UnitPrice> = models
            .keys()
            .filter_map(|key| {
                models
                    .lookup(key)
                    .map(|(_, p)| (key.to_string(), UnitPrice::of(p)))
            })
            .collect();
        let defaults: foldhash::HashMap<AccountType, (Price, CostCounter, UnitPrice)> = defaults
            .into_iter()
            .map(|(kind, price)| {
                let label = format!("default:{}", kind.as_str());
                let units = UnitPrice::of(&price);
                (kind, (price, counters.get(kind, &label), units))
            })
            .collect();
        let rates = model_units
            .values()
            .chain(defaults.values().map(|(_, _, u)| u));
        let dearest = rates.fold(None, |d: Option<UnitPrice>, u| {
            Some(match d {
                None => *u,
                Some(d) => UnitPrice {
                    input: d.input.max(u.input),
                    output: d.output.max(u.output),
                },
            })
        });
        Pricing {
            models,
            model_counters,
            model_units,
            defaults,
            dearest,
        }
    }

    /// The price a request for `model` on an account of `kind` is charged at, as [`Pricing::price`]
    /// finds it, in cost units per token; for reserving its worst case before it is sent
    /// (`spend.rs`).
    pub fn unit_price_of(&self, kind: AccountType, model: Option<&str>) -> Option<UnitPrice> {
        if let Some((_, u)) = model.and_then(|m| lookup_model(&self.model_units, m)) {
            return Some(*u);
        }
        self.defaults.get(&kind).map(|(_, _, u)| *u)
    }

    /// The dearest rates of the table (`None`: no prices at all).
    pub fn dearest(&self) -> Option<UnitPrice> {
        self.dearest
    }

    /// Cost of `usage` for `model` on an account of `kind`. Unknown model and no default for the
    /// type: cost 0 and no counter (counted as unpriced), never a guess.
    pub fn price(&self, kind: AccountType, model: Option<&str>, usage: &Usage) -> Priced<'_> {
        if let Some((key, p)) = model.and_then(|m| self.models.lookup(m)) {
            return Priced {
                cost: cost(usage, p),
                counter: self.model_counters.get(key).map(|c| &c[kind.index()]),
            };
        }
        match self.defaults.get(&kind) {
            Some((p, counter, _)) => Priced {
                cost: cost(usage, p),
                counter: Some(counter),
            },
            None => Priced {
                cost: Decimal::ZERO,
                counter: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn pricing() {
        let price = |i: &str, o: &str| Price {
            input: Decimal::from_str(i).unwrap(),
            output: Decimal::from_str(o).unwrap(),
            cached_input: None,
            cache_write: None,
        };
        let counters = CostCounters::default();
        let pricing = Pricing::new(
            [("gpt-4o-mini".to_string(), price("0.15", "0.60"))]
                .into_iter()
                .collect(),
            [(AccountType::Generic, price("1", "2"))]
                .into_iter()
                .collect(),
            &counters,
        );
        let usage = Usage {
            input_tokens: 100,
            output_tokens: 10,
            ..Usage::default()
        };
        let check = |kind, model: Option<&str>, cost: &str, label: Option<(AccountType, &str)>| {
            let priced = pricing.price(kind, model, &usage);
            assert_eq!(priced.cost, Decimal::from_str(cost).unwrap(), "{model:?}");
            let expected = label.map(|(k, key)| counters.get(k, key));
            assert_eq!(priced.counter.cloned(), expected, "{model:?}");
        };
        check(
            AccountType::Openai,
            Some("gpt-4o-mini-2024-07-18"),
            "0.000021",
            Some((AccountType::Openai, "gpt-4o-mini")),
        );
        check(AccountType::Openai, Some("unknown-model"), "0", None);
        check(AccountType::Openai, None, "0", None);
        check(
            AccountType::Generic,
            Some("llama"),
            "0.00012",
            Some((AccountType::Generic, "default:generic")),
        );
    }
}
