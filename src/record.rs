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
    /// Whether this row counts as a success for the key's and account's counters.
    pub fn is_success(&self) -> bool {
        (200..400).contains(&self.status_code) && self.error_message.is_none()
    }
}
