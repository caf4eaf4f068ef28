//! The usage record: one row of `usage_records`, the one shared data type of the metering path.
//! It sits below everything that builds, writes, spools or counts it and imports nothing from
//! the crate.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One row of `usage_records`. Built once per authenticated request by `meter.rs`, queued by
/// `writer.rs`, serialised as JSON in the spool, inserted by `store/usage.rs`.
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
    /// The `model` the client asked for (`model` above is what the upstream says served it).
    #[serde(default)]
    pub requested_model: Option<String>,
    /// Where the token counts come from. `None` only on records spooled by older versions.
    #[serde(default)]
    pub usage_source: Option<UsageSource>,
    /// The provider's error `type`/`code` when a passed-through upstream error sent one.
    #[serde(default)]
    pub upstream_error: Option<String>,
    /// The leases this request's reservations came from (`spend.rs`), settled by the usage
    /// writer in the same transaction as the row. Empty for keys without budgets or credits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub charges: Vec<Charge>,
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// The row's `cost` (USD, exact).
    Cost,
    /// The row's `tokens_used` (input + output).
    Tokens,
    /// One per billable row.
    Requests,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Cost, Metric::Tokens, Metric::Requests];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cost => "cost",
            Metric::Tokens => "tokens",
            Metric::Requests => "requests",
        }
    }
}

/// The pool a reservation's lease was taken from: one period of one budget for one subject, or a
/// user's credit balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "pool", rename_all = "lowercase")]
pub enum Pool {
    /// `budget_usage (budget_id, subject_id, period_start)`: the subject is the key for a key's
    /// budget, the user for a user's or a plan's.
    Budget {
        budget_id: i64,
        subject_id: i64,
        metric: Metric,
        period_start: DateTime<Utc>,
    },
    /// `credit_balances (user_id)`, counted in cost.
    Credit { user_id: i64 },
}

impl Pool {
    pub fn metric(&self) -> Metric {
        match self {
            Pool::Budget { metric, .. } => *metric,
            Pool::Credit { .. } => Metric::Cost,
        }
    }
}

/// A budget's period: calendar (UTC) or the whole life of the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
    Total,
}

impl Period {
    pub const ALL: [Period; 4] = [Period::Day, Period::Week, Period::Month, Period::Total];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }
}

/// The lease one reservation of a request was served from. What the row is charged, and to
/// which budgets and balance, the usage writer decides from the database when it writes the row
/// (so a budget made a moment ago still counts it); this says which lease the charge comes out
/// of, so the instance's lease shrinks by it in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    #[serde(flatten)]
    pub pool: Pool,
    /// `spend_leases.id`.
    pub lease_id: i64,
}

/// Where a row's token counts come from (`usage_records.usage_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// Reported by the upstream.
    Provider,
    /// The response ended before the upstream reported usage: what tollgate counted.
    Partial,
    /// Nothing was reported: the prompt counted by tollgate from the request.
    Estimated,
    /// Nothing was served (a refusal, or no upstream answered).
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Partial => "partial",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
        }
    }
}

impl UsageRecord {
    /// A served chat row with nothing counted (no model, no tokens, cost 0, at the epoch), for
    /// unit tests to change what they look at.
    #[cfg(test)]
    pub(crate) fn sample(request_id: &str) -> UsageRecord {
        UsageRecord {
            request_id: request_id.into(),
            user_id: 1,
            api_key_id: 1,
            upstream_account_id: None,
            method: "POST".into(),
            endpoint: "/v1/chat/completions".into(),
            model: None,
            status_code: 200,
            response_time: 1,
            prompt_tokens: 0,
            completion_tokens: 0,
            cached_tokens: 0,
            cache_creation_tokens: 0,
            tokens_used: 0,
            cost: Decimal::ZERO,
            error_message: None,
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            requested_model: None,
            usage_source: None,
            upstream_error: None,
            charges: Vec::new(),
        }
    }

    /// Whether this row counts as a success for the key's and account's counters.
    pub fn is_success(&self) -> bool {
        (200..400).contains(&self.status_code) && self.error_message.is_none()
    }

    /// Whether budgets and credits are charged for this row: a response was served (2xx) or the
    /// upstream reported tokens (a stream cut or abandoned after it started). Refusals, upstream
    /// errors and failed attempts cost nothing. `usage --check` applies the same rule in SQL
    /// ([`BILLABLE_SQL`]).
    pub fn is_billable(&self) -> bool {
        (200..300).contains(&self.status_code) || self.tokens_used > 0
    }

    /// What this row charges a budget of `metric` (0 when not billable).
    pub fn amount(&self, metric: Metric) -> Decimal {
        if !self.is_billable() {
            return Decimal::ZERO;
        }
        match metric {
            Metric::Cost => self.cost,
            Metric::Tokens => Decimal::from(self.tokens_used),
            Metric::Requests => Decimal::ONE,
        }
    }
}

/// [`UsageRecord::is_billable`] as an SQL condition on `usage_records` (alias `r`).
pub const BILLABLE_SQL: &str = "(r.status_code BETWEEN 200 AND 299 OR r.tokens_used > 0)";
