//! Reporting: usage totals per group over a time range, and the metering invariants checked by
//! the tests and `tollgate usage --check`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::Row;

use super::{sqlite_cost, sqlite_time, Store, StoreError};

/// How `tollgate usage` groups its totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Key,
    Account,
    /// The model the client asked for.
    Model,
    /// The model the upstream says served the request (e.g. a dated snapshot).
    ServedModel,
    Day,
    /// The user (all of their keys).
    User,
}

/// Totals of one group over a time range.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct UsageTotals {
    pub group: String,
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub tokens: i64,
    pub cost: Decimal,
}

impl Store {
    /// Totals per group for `since <= created_at < until`.
    pub async fn usage_totals(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        by: GroupBy,
    ) -> Result<Vec<UsageTotals>, StoreError> {
        let group = match (self, by) {
            (_, GroupBy::Key) => "CAST(r.api_key_id AS TEXT) || ' ' || k.name",
            (_, GroupBy::User) => "CAST(k.user_id AS TEXT) || ' ' || u.email",
            (_, GroupBy::Account) => "COALESCE(a.name, '-')",
            (_, GroupBy::Model) => "COALESCE(r.requested_model, r.model, '-')",
            (_, GroupBy::ServedModel) => "COALESCE(r.model, '-')",
            (Store::Postgres(_), GroupBy::Day) => {
                "to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
            (Store::Sqlite(_), GroupBy::Day) => "substr(r.created_at, 1, 10)",
        };
        let from = "FROM usage_records r JOIN api_keys k ON k.id = r.api_key_id \
                    JOIN users u ON u.id = k.user_id \
                    LEFT JOIN upstream_accounts a ON a.id = r.upstream_account_id \
                    WHERE r.created_at >= $1 AND r.created_at < $2";
        let is_error =
            "CASE WHEN r.status_code >= 400 OR r.error_message IS NOT NULL THEN 1 ELSE 0 END";
        let mut out: Vec<UsageTotals> = match self {
            Store::Postgres(p) => {
                let sql = format!(
                    "SELECT {group} AS g, count(*) AS n, COALESCE(SUM({is_error}), 0)::int8 AS e, \
                     COALESCE(SUM(r.prompt_tokens), 0)::int8 AS pt, COALESCE(SUM(r.completion_tokens), 0)::int8 AS ct, \
                     COALESCE(SUM(r.tokens_used), 0)::int8 AS t, COALESCE(SUM(r.cost), 0) AS c {from} GROUP BY g"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(since)
                    .bind(until)
                    .fetch_all(p)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(UsageTotals {
                            group: r.try_get("g")?,
                            requests: r.try_get("n")?,
                            errors: r.try_get("e")?,
                            prompt_tokens: r.try_get("pt")?,
                            completion_tokens: r.try_get("ct")?,
                            tokens: r.try_get("t")?,
                            cost: r.try_get("c")?,
                        })
                    })
                    .collect::<Result<_, sqlx::Error>>()?
            }
            Store::Sqlite(p) => {
                // Costs are exact decimal text: summed here, never as SQLite floats.
                let sql = format!(
                    "SELECT {group} AS g, {is_error} AS e, r.prompt_tokens AS pt, r.completion_tokens AS ct, \
                     r.tokens_used AS t, r.cost AS c {from}"
                );
                let mut groups: HashMap<String, UsageTotals> = HashMap::new();
                for r in sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(sqlite_time(since))
                    .bind(sqlite_time(until))
                    .fetch_all(p)
                    .await?
                {
                    let g: String = r.try_get("g")?;
                    let t = groups.entry(g.clone()).or_insert_with(|| UsageTotals {
                        group: g,
                        ..UsageTotals::default()
                    });
                    t.requests += 1;
                    t.errors += r.try_get::<i64, _>("e")?;
                    t.prompt_tokens += r.try_get::<i64, _>("pt")?;
                    t.completion_tokens += r.try_get::<i64, _>("ct")?;
                    t.tokens += r.try_get::<i64, _>("t")?;
                    t.cost += sqlite_cost(&r.try_get::<String, _>("c")?)?;
                }
                groups.into_values().collect()
            }
        };
        out.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(out)
    }

    /// Every request id's row count and each key's counter, for invariant checks in tests and
    /// `tollgate usage --check`.
    pub async fn usage_invariants(&self) -> Result<InvariantReport, StoreError> {
        let dup_sql = "SELECT COUNT(*) FROM (SELECT request_id FROM usage_records GROUP BY request_id HAVING COUNT(*) > 1) d";
        let mismatch_sql = "SELECT COUNT(*) FROM api_keys k WHERE k.request_count <> \
                            (SELECT COUNT(*) FROM usage_records r WHERE r.api_key_id = k.id)";
        let account_sql = "SELECT COUNT(*) FROM upstream_accounts a WHERE a.request_count <> \
                           (SELECT COUNT(*) FROM usage_records r WHERE r.upstream_account_id = a.id)";
        let rows_sql = "SELECT COUNT(*) FROM usage_records";
        let (duplicate_request_ids, keys_mismatched, accounts_mismatched, rows) = dispatch!(self, p => (
            sqlx::query_scalar::<_, i64>(dup_sql).fetch_one(p).await?,
            sqlx::query_scalar::<_, i64>(mismatch_sql).fetch_one(p).await?,
            sqlx::query_scalar::<_, i64>(account_sql).fetch_one(p).await?,
            sqlx::query_scalar::<_, i64>(rows_sql).fetch_one(p).await?,
        ));
        Ok(InvariantReport {
            rows,
            duplicate_request_ids,
            keys_mismatched,
            accounts_mismatched,
        })
    }
}

/// The metering invariants: every request id once, every counter equal to its row count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct InvariantReport {
    pub rows: i64,
    pub duplicate_request_ids: i64,
    pub keys_mismatched: i64,
    pub accounts_mismatched: i64,
}

impl InvariantReport {
    pub fn holds(&self) -> bool {
        self.duplicate_request_ids == 0
            && self.keys_mismatched == 0
            && self.accounts_mismatched == 0
    }
}
