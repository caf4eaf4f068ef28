//! The database: connecting, migrating, and every query tollgate makes, for PostgreSQL and SQLite.
//!
//! Each query is written once; [`dispatch!`] compiles it for both backends. Nothing here runs on the
//! request path except [`Store::find_key`] on a key-cache miss.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{PgPool, Row, SqlitePool};

use crate::meter::UsageRecord;
use crate::upstream::AccountType;
use rust_decimal::Decimal;
use std::collections::{HashMap, HashSet};

#[derive(Clone)]
pub enum Store {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs the same code against whichever pool the store holds.
macro_rules! dispatch {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Postgres($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

/// Decodes a [`KeyRow`] from a row of either backend (same columns, different row types).
macro_rules! key_row {
    ($r:expr) => {
        KeyRow {
            id: $r.try_get("id")?,
            user_id: $r.try_get("user_id")?,
            name: $r.try_get("name")?,
            permissions: $r.try_get::<Json<serde_json::Value>, _>("permissions")?.0,
            is_active: $r.try_get("is_active")?,
            user_active: $r.try_get("user_active")?,
            expires_at: $r.try_get("expires_at")?,
        }
    };
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Conflict(String),
}

impl StoreError {
    fn from_insert(e: sqlx::Error, what: &str) -> StoreError {
        match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                StoreError::Conflict(what.into())
            }
            _ => StoreError::Db(e),
        }
    }
}

/// A key as the proxy needs it: joined with its user's state.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub id: i64,
    pub user_id: i64,
    pub name: String,
    pub permissions: serde_json::Value,
    pub is_active: bool,
    pub user_active: bool,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyListing {
    pub id: i64,
    pub user_email: String,
    pub name: String,
    pub key_prefix: String,
    pub permissions: serde_json::Value,
    pub is_active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub request_count: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UserRow {
    pub id: i64,
    pub email: String,
    pub username: String,
    pub role: String,
    pub is_active: bool,
}

/// An upstream account row. `credentials` holds `api_key` and, for generic accounts, `header`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountRow {
    pub id: i64,
    pub name: String,
    pub kind: AccountType,
    pub email: Option<String>,
    pub base_url: String,
    #[serde(skip)]
    pub credentials: serde_json::Value,
    pub is_active: bool,
    pub priority: i32,
    pub weight: i32,
    pub request_count: i64,
    pub success_count: i64,
    pub error_count: i64,
}

/// NOTIFY channel: payload is a changed key's hash.
pub const KEYS_CHANNEL: &str = "tollgate_keys";
/// NOTIFY channel: payload is a changed account's id.
pub const ACCOUNTS_CHANNEL: &str = "tollgate_accounts";

/// Changes to a key; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct KeyPatch {
    pub is_active: Option<bool>,
    /// `Some(None)` removes the expiry.
    #[serde(default, deserialize_with = "double_option")]
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub permissions: Option<serde_json::Value>,
}

/// Changes to an account; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct AccountPatch {
    pub priority: Option<i32>,
    pub weight: Option<i32>,
    pub is_active: Option<bool>,
    pub credentials: Option<serde_json::Value>,
    pub base_url: Option<String>,
}

fn double_option<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

pub struct NewAccount<'a> {
    pub name: &'a str,
    pub kind: AccountType,
    pub email: Option<&'a str>,
    pub base_url: &'a str,
    pub credentials: serde_json::Value,
    pub priority: i32,
    pub weight: i32,
    pub is_active: bool,
}

impl Store {
    /// Connects (creating a SQLite file if missing) and applies pending migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let store = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            Store::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            Store::Postgres(pool)
        } else {
            return Err(StoreError::Invalid(format!(
                "unsupported database url (want sqlite:// or postgres://): {}",
                redact_url(url)
            )));
        };
        store.migrate().await?;
        Ok(store)
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await?,
            Store::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await?,
        }
        Ok(())
    }

    pub async fn close(&self) {
        dispatch!(self, p => p.close().await)
    }

    // ---- users ----

    pub async fn create_user(
        &self,
        email: &str,
        username: &str,
        role: &str,
    ) -> Result<i64, StoreError> {
        let sql = "INSERT INTO users (email, username, role) VALUES ($1, $2, $3) RETURNING id";
        dispatch!(self, p => sqlx::query_scalar(sql).bind(email).bind(username).bind(role).fetch_one(p).await)
            .map_err(|e| StoreError::from_insert(e, &format!("user {email} or username {username}")))
    }

    pub async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        let sql = "SELECT id, email, username, role, is_active FROM users ORDER BY id";
        let rows = dispatch!(self, p => sqlx::query(sql).fetch_all(p).await.and_then(|rows| rows.iter().map(|r| Ok(UserRow {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            username: r.try_get("username")?,
            role: r.try_get("role")?,
            is_active: r.try_get("is_active")?,
        })).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }

    pub async fn user_id_by_email(&self, email: &str) -> Result<i64, StoreError> {
        let sql = "SELECT id FROM users WHERE email = $1";
        dispatch!(self, p => sqlx::query_scalar(sql).bind(email).fetch_optional(p).await)?
            .ok_or_else(|| StoreError::NotFound(format!("user {email}")))
    }

    /// Activates or deactivates a user; returns the hashes of the user's keys (to drop from caches).
    pub async fn set_user_active(&self, id: i64, active: bool) -> Result<Vec<String>, StoreError> {
        let sql = format!(
            "UPDATE users SET is_active = $1, updated_at = {} WHERE id = $2",
            self.now_sql()
        );
        let done = dispatch!(self, p => sqlx::query(sqlx::AssertSqlSafe(sql)).bind(active).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("user {id}")));
        }
        let hashes: Vec<String> = dispatch!(self, p => sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE user_id = $1").bind(id).fetch_all(p).await)?;
        for h in &hashes {
            self.notify(KEYS_CHANNEL, h).await;
        }
        Ok(hashes)
    }

    // ---- keys ----

    pub async fn create_key(
        &self,
        user_id: i64,
        name: &str,
        key_hash_hex: &str,
        key_prefix: &str,
        permissions: &serde_json::Value,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<i64, StoreError> {
        let sql =
            "INSERT INTO api_keys (user_id, name, key_hash, key_prefix, permissions, expires_at) \
                   VALUES ($1, $2, $3, $4, $5, $6) RETURNING id";
        dispatch!(self, p => sqlx::query_scalar(sql)
            .bind(user_id).bind(name).bind(key_hash_hex).bind(key_prefix)
            .bind(Json(permissions)).bind(expires_at)
            .fetch_one(p).await)
        .map_err(|e| StoreError::from_insert(e, "a key with this hash"))
    }

    /// The one query on the request path (on a key-cache miss).
    pub async fn find_key(&self, key_hash_hex: &str) -> Result<Option<KeyRow>, StoreError> {
        let sql = "SELECT k.id, k.user_id, k.name, k.permissions, k.is_active, k.expires_at, \
                          u.is_active AS user_active \
                   FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = $1";
        let row = dispatch!(self, p => match sqlx::query(sql).bind(key_hash_hex).fetch_optional(p).await? {
            None => None,
            Some(r) => Some(key_row!(r)),
        });
        Ok(row)
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyListing>, StoreError> {
        let sql = "SELECT k.id, u.email, k.name, k.key_prefix, k.permissions, k.is_active, k.expires_at, \
                          k.last_used_at, k.request_count \
                   FROM api_keys k JOIN users u ON u.id = k.user_id ORDER BY k.id";
        let rows = dispatch!(self, p => sqlx::query(sql).fetch_all(p).await.and_then(|rows| rows.iter().map(|r| Ok(KeyListing {
            id: r.try_get("id")?,
            user_email: r.try_get("email")?,
            name: r.try_get("name")?,
            key_prefix: r.try_get("key_prefix")?,
            permissions: r.try_get::<Json<serde_json::Value>, _>("permissions")?.0,
            is_active: r.try_get("is_active")?,
            expires_at: r.try_get("expires_at")?,
            last_used_at: r.try_get("last_used_at")?,
            request_count: r.try_get("request_count")?,
        })).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }

    /// Revokes a key; returns its hash (to drop from caches).
    pub async fn revoke_key(&self, id: i64) -> Result<String, StoreError> {
        self.update_key(
            id,
            &KeyPatch {
                is_active: Some(false),
                ..KeyPatch::default()
            },
        )
        .await
    }

    /// Changes a key's state, expiry or permissions; returns its hash and tells other instances.
    pub async fn update_key(&self, id: i64, patch: &KeyPatch) -> Result<String, StoreError> {
        let sql = format!(
            "UPDATE api_keys SET is_active = COALESCE($1, is_active), \
             expires_at = CASE WHEN $2 THEN $3 ELSE expires_at END, \
             permissions = COALESCE($4, permissions), updated_at = {} WHERE id = $5 RETURNING key_hash",
            self.now_sql()
        );
        let hash: Option<String> = dispatch!(self, p => sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(patch.is_active)
            .bind(patch.expires_at.is_some())
            .bind(patch.expires_at.flatten())
            .bind(patch.permissions.as_ref().map(Json))
            .bind(id)
            .fetch_optional(p).await)?;
        let hash = hash.ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
        self.notify(KEYS_CHANNEL, &hash).await;
        Ok(hash)
    }

    // ---- upstream accounts ----

    pub async fn create_account(&self, a: &NewAccount<'_>) -> Result<i64, StoreError> {
        let sql = "INSERT INTO upstream_accounts (name, type, email, base_url, credentials, priority, weight, is_active) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id";
        let id: i64 = dispatch!(self, p => sqlx::query_scalar(sql)
            .bind(a.name).bind(a.kind.as_str()).bind(a.email).bind(a.base_url)
            .bind(Json(&a.credentials)).bind(a.priority).bind(a.weight).bind(a.is_active)
            .fetch_one(p).await)
        .map_err(|e| StoreError::from_insert(e, &format!("account {}", a.name)))?;
        self.notify(ACCOUNTS_CHANNEL, &id.to_string()).await;
        Ok(id)
    }

    /// Inserts or updates (matched by name) an account declared in `config.toml`.
    pub async fn upsert_account(&self, a: &NewAccount<'_>) -> Result<i64, StoreError> {
        let sql = "INSERT INTO upstream_accounts (name, type, email, base_url, credentials, priority, weight, is_active) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                   ON CONFLICT (name) DO UPDATE SET type = excluded.type, email = excluded.email, \
                     base_url = excluded.base_url, credentials = excluded.credentials, \
                     priority = excluded.priority, weight = excluded.weight, is_active = excluded.is_active, \
                     updated_at = $9 \
                   RETURNING id";
        let id = dispatch!(self, p => sqlx::query_scalar(sql)
            .bind(a.name).bind(a.kind.as_str()).bind(a.email).bind(a.base_url)
            .bind(Json(&a.credentials)).bind(a.priority).bind(a.weight).bind(a.is_active).bind(Utc::now())
            .fetch_one(p).await)?;
        Ok(id)
    }

    pub async fn list_accounts(&self) -> Result<Vec<AccountRow>, StoreError> {
        let sql =
            "SELECT id, name, type, email, base_url, credentials, is_active, priority, weight, \
                          request_count, success_count, error_count \
                   FROM upstream_accounts WHERE deleted_at IS NULL ORDER BY priority, id";
        let rows = dispatch!(self, p => sqlx::query(sql).fetch_all(p).await.and_then(|rows| rows.iter().map(|r| {
            let kind: String = r.try_get("type")?;
            Ok(AccountRow {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                kind: AccountType::from_str(&kind).map_err(|e| sqlx::Error::Decode(e.into()))?,
                email: r.try_get("email")?,
                base_url: r.try_get("base_url")?,
                credentials: r.try_get::<Json<serde_json::Value>, _>("credentials")?.0,
                is_active: r.try_get("is_active")?,
                priority: r.try_get("priority")?,
                weight: r.try_get("weight")?,
                request_count: r.try_get("request_count")?,
                success_count: r.try_get("success_count")?,
                error_count: r.try_get("error_count")?,
            })
        }).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }

    /// Changes an account's priority, weight, state or credentials.
    pub async fn update_account(&self, id: i64, patch: &AccountPatch) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE upstream_accounts SET priority = COALESCE($1, priority), weight = COALESCE($2, weight), \
             is_active = COALESCE($3, is_active), credentials = COALESCE($4, credentials), \
             base_url = COALESCE($5, base_url), updated_at = {} WHERE id = $6 AND deleted_at IS NULL",
            self.now_sql()
        );
        let done = dispatch!(self, p => sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(patch.priority).bind(patch.weight).bind(patch.is_active)
            .bind(patch.credentials.as_ref().map(Json)).bind(patch.base_url.as_deref()).bind(id)
            .execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("account {id}")));
        }
        self.notify(ACCOUNTS_CHANNEL, &id.to_string()).await;
        Ok(())
    }

    /// Soft delete: the row stays (usage rows reference it) but the account is gone from listings
    /// and never serves again.
    pub async fn delete_account(&self, id: i64) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE upstream_accounts SET is_active = $1, deleted_at = {now}, updated_at = {now} WHERE id = $2 AND deleted_at IS NULL",
            now = self.now_sql()
        );
        let done = dispatch!(self, p => sqlx::query(sqlx::AssertSqlSafe(sql)).bind(false).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("account {id}")));
        }
        self.notify(ACCOUNTS_CHANNEL, &id.to_string()).await;
        Ok(())
    }

    /// The database's "now" in each backend's column format.
    fn now_sql(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "now()",
            Store::Sqlite(_) => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        }
    }

    /// Tells other instances on PostgreSQL (LISTEN/NOTIFY); a no-op on SQLite, where the periodic
    /// refresh is the only mechanism. Best effort: the refresh is the safety net.
    async fn notify(&self, channel: &str, payload: &str) {
        if let Store::Postgres(p) = self {
            if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(payload)
                .execute(p)
                .await
            {
                tracing::warn!(error = %e, channel, "NOTIFY failed; other instances will catch up on their next refresh");
            }
        }
    }

    /// The database clock, as the watermark [`Store::keys_changed_since`] takes.
    pub async fn clock(&self) -> Result<String, StoreError> {
        let sql = match self {
            Store::Postgres(_) => "SELECT now()::text",
            Store::Sqlite(_) => "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        };
        Ok(dispatch!(self, p => sqlx::query_scalar(sql).fetch_one(p).await)?)
    }

    /// Hashes of keys whose key or user row changed after `since` minus a 10 s overlap (so a
    /// transaction that committed late is not missed). Returns them with the new watermark.
    pub async fn keys_changed_since(
        &self,
        since: &str,
    ) -> Result<(Vec<String>, String), StoreError> {
        let now = self.clock().await?;
        let sql = match self {
            Store::Postgres(_) => "SELECT key_hash FROM api_keys WHERE updated_at > $1::timestamptz - interval '10 seconds' \
                 UNION SELECT k.key_hash FROM users u JOIN api_keys k ON k.user_id = u.id \
                 WHERE u.updated_at > $1::timestamptz - interval '10 seconds'",
            Store::Sqlite(_) => "SELECT key_hash FROM api_keys WHERE updated_at > strftime('%Y-%m-%dT%H:%M:%fZ', $1, '-10 seconds') \
                 UNION SELECT k.key_hash FROM users u JOIN api_keys k ON k.user_id = u.id \
                 WHERE u.updated_at > strftime('%Y-%m-%dT%H:%M:%fZ', $1, '-10 seconds')",
        };
        let hashes = dispatch!(self, p => sqlx::query_scalar(sql).bind(since).fetch_all(p).await)?;
        Ok((hashes, now))
    }

    /// Recently used active keys, to warm the cache at start.
    pub async fn recent_keys(&self, limit: i64) -> Result<Vec<(String, KeyRow)>, StoreError> {
        let sql = "SELECT k.key_hash, k.id, k.user_id, k.name, k.permissions, k.is_active, k.expires_at, \
                          u.is_active AS user_active \
                   FROM api_keys k JOIN users u ON u.id = k.user_id \
                   WHERE k.is_active AND u.is_active \
                   ORDER BY k.last_used_at DESC, k.id DESC LIMIT $1";
        let rows = dispatch!(self, p => sqlx::query(sql).bind(limit).fetch_all(p).await.and_then(|rows| rows.iter().map(|r| Ok((
            r.try_get("key_hash")?,
            key_row!(r),
        ))).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    pub fn pg_pool(&self) -> Option<&PgPool> {
        match self {
            Store::Postgres(p) => Some(p),
            Store::Sqlite(_) => None,
        }
    }
}

/// How `tollgate usage` groups its totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Key,
    Account,
    Model,
    Day,
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

/// SQLite keeps timestamps of usage rows as fixed-width UTC text so that ranges compare as text.
fn sqlite_time(t: DateTime<Utc>) -> String {
    // The same shape as the columns' default, strftime('%Y-%m-%dT%H:%M:%fZ', 'now').
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// SQLite keeps costs as exact decimal text; this is the one place they are converted.
fn sqlite_cost(text: &str) -> Result<Decimal, sqlx::Error> {
    Decimal::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// Per-id deltas of one flush, from the rows actually inserted.
#[derive(Debug, Default)]
struct Deltas {
    keys: HashMap<i64, (i64, DateTime<Utc>)>,
    accounts: HashMap<i64, (i64, i64, DateTime<Utc>)>,
}

impl Deltas {
    fn add(&mut self, r: &UsageRecord) {
        let k = self.keys.entry(r.api_key_id).or_insert((0, r.created_at));
        k.0 += 1;
        k.1 = k.1.max(r.created_at);
        if let Some(a) = r.upstream_account_id {
            let e = self.accounts.entry(a).or_insert((0, 0, r.created_at));
            e.0 += 1;
            e.1 += i64::from(r.is_success());
            e.2 = e.2.max(r.created_at);
        }
    }
}

const PG_INSERT_USAGE: &str = "\
WITH ins AS (
  INSERT INTO usage_records (request_id, user_id, api_key_id, upstream_account_id, method, endpoint, model,
      status_code, response_time, prompt_tokens, completion_tokens, cached_tokens, cache_creation_tokens,
      tokens_used, cost, error_message, created_at)
  SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::text[], $6::text[], $7::text[],
      $8::int4[], $9::int4[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[], $15::numeric[],
      $16::text[], $17::timestamptz[])
  ON CONFLICT (request_id) DO NOTHING
  RETURNING api_key_id, upstream_account_id, status_code, error_message, created_at
), key_counts AS (
  UPDATE api_keys k SET request_count = k.request_count + a.n,
         last_used_at = GREATEST(COALESCE(k.last_used_at, a.last), a.last)
  FROM (SELECT api_key_id, count(*) AS n, max(created_at) AS last FROM ins GROUP BY api_key_id) a
  WHERE k.id = a.api_key_id
  RETURNING 1
), account_counts AS (
  UPDATE upstream_accounts u SET request_count = u.request_count + a.n,
         success_count = u.success_count + a.ok, error_count = u.error_count + (a.n - a.ok),
         last_used_at = GREATEST(COALESCE(u.last_used_at, a.last), a.last)
  FROM (SELECT upstream_account_id, count(*) AS n,
               count(*) FILTER (WHERE status_code BETWEEN 200 AND 399 AND error_message IS NULL) AS ok,
               max(created_at) AS last
        FROM ins WHERE upstream_account_id IS NOT NULL GROUP BY upstream_account_id) a
  WHERE u.id = a.upstream_account_id
  RETURNING 1
)
SELECT count(*) FROM ins";

/// Rows per SQLite INSERT statement (17 parameters each, well under SQLite's 32766).
const SQLITE_ROWS_PER_STATEMENT: usize = 1000;

impl Store {
    /// Writes a batch of usage records in ONE transaction: the rows (a request id already present
    /// is skipped) and the key/account counters, aggregated per id from the rows actually
    /// inserted. Replaying a committed batch therefore changes nothing. Returns rows inserted.
    pub async fn insert_usage(&self, rows: &[UsageRecord]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Postgres(p) => {
                let n: i64 = sqlx::query_scalar(PG_INSERT_USAGE)
                    .bind(
                        rows.iter()
                            .map(|r| r.request_id.as_str())
                            .collect::<Vec<_>>(),
                    )
                    .bind(rows.iter().map(|r| r.user_id).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.api_key_id).collect::<Vec<_>>())
                    .bind(
                        rows.iter()
                            .map(|r| r.upstream_account_id)
                            .collect::<Vec<_>>(),
                    )
                    .bind(rows.iter().map(|r| r.method.as_str()).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.endpoint.as_str()).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.model.as_deref()).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.status_code).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.response_time).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.completion_tokens).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.cached_tokens).collect::<Vec<_>>())
                    .bind(
                        rows.iter()
                            .map(|r| r.cache_creation_tokens)
                            .collect::<Vec<_>>(),
                    )
                    .bind(rows.iter().map(|r| r.tokens_used).collect::<Vec<_>>())
                    .bind(rows.iter().map(|r| r.cost).collect::<Vec<_>>())
                    .bind(
                        rows.iter()
                            .map(|r| r.error_message.as_deref())
                            .collect::<Vec<_>>(),
                    )
                    .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
                    .fetch_one(p)
                    .await?;
                Ok(n as u64)
            }
            Store::Sqlite(p) => {
                let mut tx = p.begin().await?;
                let mut inserted: HashSet<String> = HashSet::new();
                for chunk in rows.chunks(SQLITE_ROWS_PER_STATEMENT) {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                        "INSERT INTO usage_records (request_id, user_id, api_key_id, upstream_account_id, method, \
                         endpoint, model, status_code, response_time, prompt_tokens, completion_tokens, cached_tokens, \
                         cache_creation_tokens, tokens_used, cost, error_message, created_at) ",
                    );
                    q.push_values(chunk, |mut b, r| {
                        b.push_bind(r.request_id.as_str())
                            .push_bind(r.user_id)
                            .push_bind(r.api_key_id)
                            .push_bind(r.upstream_account_id)
                            .push_bind(r.method.as_str())
                            .push_bind(r.endpoint.as_str())
                            .push_bind(r.model.as_deref())
                            .push_bind(r.status_code)
                            .push_bind(r.response_time)
                            .push_bind(r.prompt_tokens)
                            .push_bind(r.completion_tokens)
                            .push_bind(r.cached_tokens)
                            .push_bind(r.cache_creation_tokens)
                            .push_bind(r.tokens_used)
                            .push_bind(r.cost.to_string())
                            .push_bind(r.error_message.as_deref())
                            .push_bind(sqlite_time(r.created_at));
                    });
                    q.push(" ON CONFLICT (request_id) DO NOTHING RETURNING request_id");
                    let ids: Vec<String> = q.build_query_scalar().fetch_all(&mut *tx).await?;
                    inserted.extend(ids);
                }
                let mut deltas = Deltas::default();
                for r in rows.iter().filter(|r| inserted.contains(&r.request_id)) {
                    deltas.add(r);
                }
                // One UPDATE … FROM (VALUES …) per table and chunk, not one statement per key: a
                // batch from many keys (one per customer) otherwise cost a statement per row and
                // the writer fell behind (measured: 57,000 records queued after 20 s at 28k req/s
                // over 20,000 keys).
                let keys: Vec<_> = deltas.keys.iter().collect();
                for chunk in keys.chunks(SQLITE_ROWS_PER_STATEMENT) {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                        "UPDATE api_keys SET request_count = request_count + d.column2, \
                         last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < d.column3 \
                         THEN d.column3 ELSE last_used_at END FROM (",
                    );
                    q.push_values(chunk, |mut b, (id, (n, last))| {
                        b.push_bind(**id)
                            .push_bind(*n)
                            .push_bind(sqlite_time(*last));
                    });
                    q.push(") AS d WHERE api_keys.id = d.column1");
                    q.build().execute(&mut *tx).await?;
                }
                let accounts: Vec<_> = deltas.accounts.iter().collect();
                for chunk in accounts.chunks(SQLITE_ROWS_PER_STATEMENT) {
                    let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                        "UPDATE upstream_accounts SET request_count = request_count + d.column2, \
                         success_count = success_count + d.column3, \
                         error_count = error_count + (d.column2 - d.column3), \
                         last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < d.column4 \
                         THEN d.column4 ELSE last_used_at END FROM (",
                    );
                    q.push_values(chunk, |mut b, (id, (n, ok, last))| {
                        b.push_bind(**id)
                            .push_bind(*n)
                            .push_bind(*ok)
                            .push_bind(sqlite_time(*last));
                    });
                    q.push(") AS d WHERE upstream_accounts.id = d.column1");
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(inserted.len() as u64)
            }
        }
    }

    /// Totals per group for `since <= created_at < until`.
    pub async fn usage_totals(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        by: GroupBy,
    ) -> Result<Vec<UsageTotals>, StoreError> {
        let group = match (self, by) {
            (_, GroupBy::Key) => "CAST(r.api_key_id AS TEXT) || ' ' || k.name",
            (_, GroupBy::Account) => "COALESCE(a.name, '-')",
            (_, GroupBy::Model) => "COALESCE(r.model, '-')",
            (Store::Postgres(_), GroupBy::Day) => {
                "to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
            (Store::Sqlite(_), GroupBy::Day) => "substr(r.created_at, 1, 10)",
        };
        let from = "FROM usage_records r JOIN api_keys k ON k.id = r.api_key_id \
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

/// A database URL with any password replaced, fit for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        for (input, expected) in [
            ("postgres://u:secret@h/db", "postgres://u:***@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            ("sqlite://tollgate.db", "sqlite://tollgate.db"),
        ] {
            assert_eq!(redact_url(input), expected);
        }
    }
}
