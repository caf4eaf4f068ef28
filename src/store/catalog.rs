//! Users, keys and upstream accounts: the admin CRUD shared by the CLI and the admin API (reads
//! on [`Store`], writes and the audit snapshots on [`Tx`]), the key lookup of the request path
//! (on a cache miss), and change tracking (NOTIFY on PostgreSQL, `updated_at` polled by
//! `invalidation.rs`).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::Row;

use super::{Store, StoreError, Tx, TxConn};
use crate::upstream::AccountType;

/// Decodes the `rpm`, `rpd`, `tpm` and `max_concurrent` columns of a row of either backend.
macro_rules! limit_columns {
    ($r:expr) => {
        LimitColumns {
            rpm: $r.try_get("rpm")?,
            rpd: $r.try_get("rpd")?,
            tpm: $r.try_get("tpm")?,
            max_concurrent: $r.try_get("max_concurrent")?,
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
            key_limits: limit_columns!($r),
            user_limits: LimitColumns {
                rpm: $r.try_get("user_rpm")?,
                rpd: $r.try_get("user_rpd")?,
                tpm: $r.try_get("user_tpm")?,
                max_concurrent: $r.try_get("user_max_concurrent")?,
            },
            user_role: $r.try_get("user_role")?,
            budgets: Vec::new(),
            prepaid: false,
        }
    };
}

/// The columns of the key lookup that [`key_row!`] reads, besides the key's own. The user's
/// limits are their own, else their active plan's (limit by limit), so a subscriber's limits
/// are data in the cached key like any user's.
const KEY_ROW_COLUMNS: &str = "k.id, k.user_id, k.name, k.permissions, k.is_active, k.expires_at, \
     k.rpm, k.rpd, k.tpm, k.max_concurrent, u.is_active AS user_active, \
     COALESCE(u.rpm, p.rpm) AS user_rpm, COALESCE(u.rpd, p.rpd) AS user_rpd, \
     COALESCE(u.tpm, p.tpm) AS user_tpm, COALESCE(u.max_concurrent, p.max_concurrent) AS user_max_concurrent, \
     u.role AS user_role";

/// What [`KEY_ROW_COLUMNS`] are read from: the key, its user, the user's active subscription
/// (at most one: `subscriptions.user_id` is unique) and its plan.
const KEY_ROW_FROM: &str = "api_keys k JOIN users u ON u.id = k.user_id \
     LEFT JOIN subscriptions s ON s.user_id = u.id AND s.status = 'active' \
     LEFT JOIN plans p ON p.id = s.plan_id";

/// Rate limits as stored on a key or a user (migration 0006): `None` = the default (for a key the
/// `[limits]` section, for a user none), `Some(0)` = explicitly unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LimitColumns {
    pub rpm: Option<i64>,
    pub rpd: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
}

/// Changes to limits; `None` leaves one as it is, `Some(None)` sets it back to the default.
/// JSON: a count (`3` or `3.0`, as JSON Schema counts integers) sets it, `null` resets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct LimitPatch {
    #[serde(default, deserialize_with = "double_option_count")]
    pub rpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option_count")]
    pub rpd: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option_count")]
    pub tpm: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option_count")]
    pub max_concurrent: Option<Option<i64>>,
}

/// A present field: `null` or an integral number within i64 (`3.0` too).
fn double_option_count<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<i64>>, D::Error> {
    let n: Option<serde_json::Number> = serde::Deserialize::deserialize(d)?;
    let Some(n) = n else { return Ok(Some(None)) };
    let i = n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    });
    i.map(|i| Some(Some(i)))
        .ok_or_else(|| serde::de::Error::custom(format!("invalid value {n}, expected an integer")))
}

impl LimitPatch {
    /// The fields in column order, for building the `UPDATE`.
    pub fn fields(&self) -> [(&'static str, Option<Option<i64>>); 4] {
        [
            ("rpm", self.rpm),
            ("rpd", self.rpd),
            ("tpm", self.tpm),
            ("max_concurrent", self.max_concurrent),
        ]
    }

    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.is_none())
    }
}

/// `SET` clauses for a [`LimitPatch`] bound from `$first`: `rpm = CASE WHEN $n THEN $n+1 ELSE rpm
/// END, …` (two parameters per column: whether to set it, and the value).
fn limit_sets(first: usize) -> String {
    ["rpm", "rpd", "tpm", "max_concurrent"]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let n = first + 2 * i;
            format!("{c} = CASE WHEN ${n} THEN ${} ELSE {c} END, ", n + 1)
        })
        .collect()
}

/// `SET` clauses for an [`AccountLimitPatch`] bound from `$first`, as [`limit_sets`] does.
fn account_limit_sets(first: usize) -> String {
    ["rpm", "tpm", "max_concurrent"]
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let n = first + 2 * i;
            format!("{c} = CASE WHEN ${n} THEN ${} ELSE {c} END, ", n + 1)
        })
        .collect()
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
    pub key_limits: LimitColumns,
    /// The user's own limits, else (limit by limit) their active plan's.
    pub user_limits: LimitColumns,
    /// `users.role`; `banned` (any case) refuses every key of the user.
    pub user_role: String,
    /// The budgets that apply to the key (its own, its user's, its user's plan's, with the
    /// subscription start a plan's periods run from), and whether the user is prepaid.
    pub budgets: Vec<(super::BudgetRow, Option<DateTime<Utc>>)>,
    pub prepaid: bool,
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
    /// The key's own limits (`None` = `[limits]` default).
    #[serde(flatten)]
    pub limits: LimitColumns,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UserRow {
    pub id: i64,
    pub email: String,
    pub username: String,
    pub role: String,
    pub is_active: bool,
    /// The user's limits over all their keys (`None` = none).
    #[serde(flatten)]
    pub limits: LimitColumns,
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
    /// The provider limits declared for the account (`None` or 0 = none).
    #[serde(flatten)]
    pub limits: AccountLimitColumns,
}

/// An account's declared provider limits as stored (migration 0007): `None` or 0 = none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AccountLimitColumns {
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
}

/// Changes to an account's limits: `None` leaves one as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountLimitPatch {
    pub rpm: Option<Option<i64>>,
    pub tpm: Option<Option<i64>>,
    pub max_concurrent: Option<Option<i64>>,
}

impl AccountLimitPatch {
    /// The fields in column order.
    pub fn fields(&self) -> [(&'static str, Option<Option<i64>>); 3] {
        [
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("max_concurrent", self.max_concurrent),
        ]
    }

    pub fn is_empty(&self) -> bool {
        self.fields().iter().all(|(_, v)| v.is_none())
    }
}

/// NOTIFY channel: payload is a changed key's hash.
pub const KEYS_CHANNEL: &str = "tollgate_keys";
/// NOTIFY channel: payload is a changed account's id.
pub const ACCOUNTS_CHANNEL: &str = "tollgate_accounts";

/// What [`Store::changed_since`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub key_hashes: Vec<String>,
    /// (id, updated_at) of accounts changed within the window; the same list twice in a row
    /// means nothing new happened.
    pub accounts: Vec<(i64, String)>,
    pub watermark: String,
}

/// Changes to a key; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct KeyPatch {
    pub is_active: Option<bool>,
    /// `Some(None)` removes the expiry.
    #[serde(default, deserialize_with = "double_option")]
    pub expires_at: Option<Option<DateTime<Utc>>>,
    pub permissions: Option<serde_json::Value>,
    #[serde(flatten)]
    pub limits: LimitPatch,
}

/// Changes to an account; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct AccountPatch {
    pub priority: Option<i32>,
    pub weight: Option<i32>,
    pub is_active: Option<bool>,
    pub credentials: Option<serde_json::Value>,
    pub base_url: Option<String>,
    pub limits: AccountLimitPatch,
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
    pub limits: AccountLimitColumns,
}

impl Store {
    // ---- users ----

    pub async fn list_users(&self) -> Result<Vec<UserRow>, StoreError> {
        let sql = "SELECT id, email, username, role, is_active, rpm, rpd, tpm, max_concurrent \
                   FROM users ORDER BY id";
        let rows = dispatch!(self, p => sqlx::query(sql).fetch_all(p).await.and_then(|rows| rows.iter().map(|r| Ok(UserRow {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            username: r.try_get("username")?,
            role: r.try_get("role")?,
            is_active: r.try_get("is_active")?,
            limits: limit_columns!(r),
        })).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }

    pub async fn user_id_by_email(&self, email: &str) -> Result<i64, StoreError> {
        let sql = "SELECT id FROM users WHERE email = $1";
        dispatch!(self, p => sqlx::query_scalar(sql).bind(email).fetch_optional(p).await)?
            .ok_or_else(|| StoreError::NotFound(format!("user {email}")))
    }

    /// `id` when a user has it (users are deactivated, never deleted).
    pub async fn user_id_exists(&self, id: i64) -> Result<i64, StoreError> {
        let sql = "SELECT id FROM users WHERE id = $1";
        dispatch!(self, p => sqlx::query_scalar(sql).bind(id).fetch_optional(p).await)?
            .ok_or_else(|| StoreError::NotFound(format!("user {id}")))
    }

    // ---- keys ----

    /// The one query on the request path (on a key-cache miss).
    pub async fn find_key(&self, key_hash_hex: &str) -> Result<Option<KeyRow>, StoreError> {
        let sql = format!("SELECT {KEY_ROW_COLUMNS} FROM {KEY_ROW_FROM} WHERE k.key_hash = $1");
        let row = dispatch!(self, p => match sqlx::query(sqlx::AssertSqlSafe(sql)).bind(key_hash_hex).fetch_optional(p).await? {
            None => None,
            Some(r) => Some(key_row!(r)),
        });
        match row {
            Some(mut row) => {
                self.attach_spend(std::iter::once(&mut row)).await?;
                Ok(Some(row))
            }
            None => Ok(None),
        }
    }

    /// The spend side of key lookups: their budgets and whether their users are prepaid.
    async fn attach_spend<'a>(
        &self,
        rows: impl Iterator<Item = &'a mut KeyRow>,
    ) -> Result<(), StoreError> {
        let mut rows: Vec<&mut KeyRow> = rows.collect();
        let ids: Vec<(i64, i64)> = rows.iter().map(|r| (r.id, r.user_id)).collect();
        for (row, spend) in rows.iter_mut().zip(self.spend_of_keys(&ids).await?) {
            row.budgets = spend.budgets;
            row.prepaid = spend.prepaid;
        }
        Ok(())
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyListing>, StoreError> {
        let sql = "SELECT k.id, u.email, k.name, k.key_prefix, k.permissions, k.is_active, k.expires_at, \
                          k.last_used_at, k.request_count, k.rpm, k.rpd, k.tpm, k.max_concurrent \
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
            limits: limit_columns!(r),
        })).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }

    // ---- upstream accounts ----

    pub async fn list_accounts(&self) -> Result<Vec<AccountRow>, StoreError> {
        let sql =
            "SELECT id, name, type, email, base_url, credentials, is_active, priority, weight, \
                          request_count, success_count, error_count, rpm, tpm, max_concurrent \
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
                limits: AccountLimitColumns {
                    rpm: r.try_get("rpm")?,
                    tpm: r.try_get("tpm")?,
                    max_concurrent: r.try_get("max_concurrent")?,
                },
            })
        }).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }

    /// Every account's `credentials`, deleted accounts' too (`keyring.rs` checks and seals them).
    pub async fn all_credentials(&self) -> Result<Vec<(i64, serde_json::Value)>, StoreError> {
        let sql = "SELECT id, credentials FROM upstream_accounts ORDER BY id";
        let rows = dispatch!(self, p => sqlx::query(sql).fetch_all(p).await.and_then(|rows| rows.iter().map(|r| Ok((
            r.try_get("id")?,
            r.try_get::<Json<serde_json::Value>, _>("credentials")?.0,
        ))).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        Ok(rows)
    }

    /// What changed after `since` minus a 10 s overlap (so a transaction that committed late is
    /// not missed): the hashes of keys whose key or user row changed, and the (id, updated_at) of
    /// changed accounts; with the new watermark.
    pub async fn changed_since(&self, since: &str) -> Result<Changes, StoreError> {
        let now = self.clock().await?;
        let (keys_sql, accounts_sql) = match self {
            Store::Postgres(_) => (
                "SELECT key_hash FROM api_keys WHERE updated_at > $1::timestamptz - interval '10 seconds' \
                 UNION SELECT k.key_hash FROM users u JOIN api_keys k ON k.user_id = u.id \
                 WHERE u.updated_at > $1::timestamptz - interval '10 seconds'",
                "SELECT id, updated_at::text FROM upstream_accounts \
                 WHERE updated_at > $1::timestamptz - interval '10 seconds' ORDER BY id",
            ),
            Store::Sqlite(_) => (
                "SELECT key_hash FROM api_keys WHERE updated_at > strftime('%Y-%m-%dT%H:%M:%fZ', $1, '-10 seconds') \
                 UNION SELECT k.key_hash FROM users u JOIN api_keys k ON k.user_id = u.id \
                 WHERE u.updated_at > strftime('%Y-%m-%dT%H:%M:%fZ', $1, '-10 seconds')",
                "SELECT id, updated_at FROM upstream_accounts \
                 WHERE updated_at > strftime('%Y-%m-%dT%H:%M:%fZ', $1, '-10 seconds') ORDER BY id",
            ),
        };
        let key_hashes =
            dispatch!(self, p => sqlx::query_scalar(keys_sql).bind(since).fetch_all(p).await)?;
        let accounts = dispatch!(self, p => sqlx::query_as::<_, (i64, String)>(accounts_sql)
            .bind(since).fetch_all(p).await)?;
        Ok(Changes {
            key_hashes,
            accounts,
            watermark: now,
        })
    }

    /// Recently used active keys, to warm the cache at start.
    pub async fn recent_keys(&self, limit: i64) -> Result<Vec<(String, KeyRow)>, StoreError> {
        let sql = format!(
            "SELECT k.key_hash, {KEY_ROW_COLUMNS} FROM {KEY_ROW_FROM} \
             WHERE k.is_active AND u.is_active \
             ORDER BY k.last_used_at DESC, k.id DESC LIMIT $1"
        );
        let rows = dispatch!(self, p => sqlx::query(sqlx::AssertSqlSafe(sql)).bind(limit).fetch_all(p).await.and_then(|rows| rows.iter().map(|r| Ok((
            r.try_get("key_hash")?,
            key_row!(r),
        ))).collect::<Result<Vec<_>, sqlx::Error>>()))?;
        let mut rows: Vec<(String, KeyRow)> = rows;
        for chunk in rows.chunks_mut(1000) {
            self.attach_spend(chunk.iter_mut().map(|(_, r)| r)).await?;
        }
        Ok(rows)
    }
}

/// A key as an audit snapshot shows it: never its hash.
#[derive(serde::Serialize)]
struct KeyState {
    id: i64,
    user_id: i64,
    name: String,
    key_prefix: String,
    permissions: serde_json::Value,
    is_active: bool,
    expires_at: Option<DateTime<Utc>>,
    #[serde(flatten)]
    limits: LimitColumns,
}

/// An account as an audit snapshot shows it: its credentials redacted.
#[derive(serde::Serialize)]
struct AccountState {
    id: i64,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    email: Option<String>,
    base_url: String,
    credentials: serde_json::Value,
    is_active: bool,
    priority: i32,
    weight: i32,
    #[serde(flatten)]
    limits: AccountLimitColumns,
}

fn snapshot(v: impl serde::Serialize) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(v).map_err(|e| StoreError::Invalid(format!("audit snapshot: {e}")))
}

/// The writes: each in the caller's transaction, with the audit snapshots read in it (locked on
/// PostgreSQL; SQLite's transaction holds the write lock).
impl Tx {
    // ---- users ----

    pub async fn create_user(
        &mut self,
        email: &str,
        username: &str,
        role: &str,
    ) -> Result<i64, StoreError> {
        let sql = "INSERT INTO users (email, username, role) VALUES ($1, $2, $3) RETURNING id";
        dispatch_tx!(self, c => sqlx::query_scalar(sql).bind(email).bind(username).bind(role).fetch_one(&mut **c).await)
            .map_err(|e| StoreError::from_insert(e, &format!("user {email} or username {username}")))
    }

    /// The user as the audit log shows it; `None` when there is no such user.
    pub async fn user_snapshot(
        &mut self,
        id: i64,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let sql = format!(
            "SELECT id, email, username, role, is_active, rpm, rpd, tpm, max_concurrent \
             FROM users WHERE id = $1{}",
            self.for_update()
        );
        let row = dispatch_tx!(self, c => match sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut **c).await? {
            None => None,
            Some(r) => Some(UserRow {
                id: r.try_get("id")?,
                email: r.try_get("email")?,
                username: r.try_get("username")?,
                role: r.try_get("role")?,
                is_active: r.try_get("is_active")?,
                limits: limit_columns!(r),
            }),
        });
        row.map(snapshot).transpose()
    }

    /// Activates or deactivates a user; returns the hashes of the user's keys (to drop from caches).
    pub async fn set_user_active(
        &mut self,
        id: i64,
        active: bool,
    ) -> Result<Vec<String>, StoreError> {
        let sql = format!(
            "UPDATE users SET is_active = $1, updated_at = {} WHERE id = $2",
            self.now_sql()
        );
        let done = dispatch_tx!(self, c => sqlx::query(sqlx::AssertSqlSafe(sql)).bind(active).bind(id).execute(&mut **c).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("user {id}")));
        }
        self.user_keys_changed(id).await
    }

    /// The hashes of a user's keys, after a change to the user that affects them all: each is
    /// announced on the keys channel once the transaction commits (other instances drop it from
    /// their caches) and returned (for this instance's cache).
    pub(super) async fn user_keys_changed(&mut self, id: i64) -> Result<Vec<String>, StoreError> {
        let hashes: Vec<String> = dispatch_tx!(self, c => sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE user_id = $1").bind(id).fetch_all(&mut **c).await)?;
        for h in &hashes {
            self.notify_after_commit(KEYS_CHANNEL, h.clone());
        }
        Ok(hashes)
    }

    /// Changes a user's limits (bumping `updated_at`, so every instance's change poll drops
    /// their keys from its cache); returns the hashes of the user's keys, to drop from caches.
    pub async fn update_user_limits(
        &mut self,
        id: i64,
        patch: &LimitPatch,
    ) -> Result<Vec<String>, StoreError> {
        let sql = format!(
            "UPDATE users SET {}updated_at = {} WHERE id = $9",
            limit_sets(1),
            self.now_sql()
        );
        let done = dispatch_tx!(self, c => {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (_, v) in patch.fields() {
                query = query.bind(v.is_some()).bind(v.flatten());
            }
            query.bind(id).execute(&mut **c).await.map(|r| r.rows_affected())
        })?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("user {id}")));
        }
        self.user_keys_changed(id).await
    }

    // ---- keys ----

    // One column each; a struct for a single insert would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_key(
        &mut self,
        user_id: i64,
        name: &str,
        key_hash_hex: &str,
        key_prefix: &str,
        permissions: &serde_json::Value,
        expires_at: Option<DateTime<Utc>>,
        limits: &LimitColumns,
    ) -> Result<i64, StoreError> {
        let sql =
            "INSERT INTO api_keys (user_id, name, key_hash, key_prefix, permissions, expires_at, \
                     rpm, rpd, tpm, max_concurrent) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id";
        dispatch_tx!(self, c => sqlx::query_scalar(sql)
            .bind(user_id).bind(name).bind(key_hash_hex).bind(key_prefix)
            .bind(Json(permissions)).bind(expires_at)
            .bind(limits.rpm).bind(limits.rpd).bind(limits.tpm).bind(limits.max_concurrent)
            .fetch_one(&mut **c).await)
        .map_err(|e| StoreError::from_insert(e, "a key with this hash"))
    }

    /// The key as the audit log shows it (id, owner, name, prefix, permissions, state, expiry,
    /// limits; never its hash); `None` when there is no such key.
    pub async fn key_snapshot(&mut self, id: i64) -> Result<Option<serde_json::Value>, StoreError> {
        let sql = format!(
            "SELECT id, user_id, name, key_prefix, permissions, is_active, expires_at, \
                    rpm, rpd, tpm, max_concurrent FROM api_keys WHERE id = $1{}",
            self.for_update()
        );
        let row = dispatch_tx!(self, c => match sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut **c).await? {
            None => None,
            Some(r) => Some(KeyState {
                id: r.try_get("id")?,
                user_id: r.try_get("user_id")?,
                name: r.try_get("name")?,
                key_prefix: r.try_get("key_prefix")?,
                permissions: r.try_get::<Json<serde_json::Value>, _>("permissions")?.0,
                is_active: r.try_get("is_active")?,
                expires_at: r.try_get("expires_at")?,
                limits: limit_columns!(r),
            }),
        });
        row.map(snapshot).transpose()
    }

    /// Changes a key's state, expiry, permissions or limits (bumping `updated_at`, which the
    /// change poll of every instance watches); returns its hash and tells other instances.
    pub async fn update_key(&mut self, id: i64, patch: &KeyPatch) -> Result<String, StoreError> {
        let sql = format!(
            "UPDATE api_keys SET is_active = COALESCE($1, is_active), \
             expires_at = CASE WHEN $2 THEN $3 ELSE expires_at END, \
             permissions = COALESCE($4, permissions), {}updated_at = {} WHERE id = $13 RETURNING key_hash",
            limit_sets(5),
            self.now_sql()
        );
        let hash: Option<String> = dispatch_tx!(self, c => {
            let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(patch.is_active)
                .bind(patch.expires_at.is_some())
                .bind(patch.expires_at.flatten())
                .bind(patch.permissions.as_ref().map(Json));
            for (_, v) in patch.limits.fields() {
                query = query.bind(v.is_some()).bind(v.flatten());
            }
            query.bind(id).fetch_optional(&mut **c).await
        })?;
        let hash = hash.ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
        self.notify_after_commit(KEYS_CHANNEL, hash.clone());
        Ok(hash)
    }

    // ---- upstream accounts ----

    pub async fn create_account(&mut self, a: &NewAccount<'_>) -> Result<i64, StoreError> {
        let sql = "INSERT INTO upstream_accounts (name, type, email, base_url, credentials, priority, weight, is_active, rpm, tpm, max_concurrent) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id";
        let l = a.limits;
        let id: i64 = dispatch_tx!(self, c => sqlx::query_scalar(sql)
            .bind(a.name).bind(a.kind.as_str()).bind(a.email).bind(a.base_url)
            .bind(Json(&a.credentials)).bind(a.priority).bind(a.weight).bind(a.is_active)
            .bind(l.rpm).bind(l.tpm).bind(l.max_concurrent)
            .fetch_one(&mut **c).await)
        .map_err(|e| StoreError::from_insert(e, &format!("account {}", a.name)))?;
        self.notify_after_commit(ACCOUNTS_CHANNEL, id.to_string());
        Ok(id)
    }

    /// Inserts or updates (matched by name) an account declared in `config.toml`.
    pub async fn upsert_account(&mut self, a: &NewAccount<'_>) -> Result<i64, StoreError> {
        let sql = "INSERT INTO upstream_accounts (name, type, email, base_url, credentials, priority, weight, is_active, rpm, tpm, max_concurrent) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $10, $11, $12) \
                   ON CONFLICT (name) DO UPDATE SET type = excluded.type, email = excluded.email, \
                     base_url = excluded.base_url, credentials = excluded.credentials, \
                     priority = excluded.priority, weight = excluded.weight, is_active = excluded.is_active, \
                     rpm = excluded.rpm, tpm = excluded.tpm, max_concurrent = excluded.max_concurrent, \
                     updated_at = $9 \
                   RETURNING id";
        let l = a.limits;
        let id = dispatch_tx!(self, c => sqlx::query_scalar(sql)
            .bind(a.name).bind(a.kind.as_str()).bind(a.email).bind(a.base_url)
            .bind(Json(&a.credentials)).bind(a.priority).bind(a.weight).bind(a.is_active).bind(Utc::now())
            .bind(l.rpm).bind(l.tpm).bind(l.max_concurrent)
            .fetch_one(&mut **c).await)?;
        Ok(id)
    }

    /// The account as the audit log shows it (its credentials redacted: `redact_credentials`);
    /// `None` when there is no such account or it was deleted.
    pub async fn account_snapshot(
        &mut self,
        id: i64,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let sql = format!(
            "SELECT id, name, type, email, base_url, credentials, is_active, priority, weight, \
                    rpm, tpm, max_concurrent \
             FROM upstream_accounts WHERE id = $1 AND deleted_at IS NULL{}",
            self.for_update()
        );
        let row = dispatch_tx!(self, c => match sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut **c).await? {
            None => None,
            Some(r) => Some(AccountState {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                kind: r.try_get("type")?,
                email: r.try_get("email")?,
                base_url: r.try_get("base_url")?,
                credentials: super::redact_credentials(
                    &r.try_get::<Json<serde_json::Value>, _>("credentials")?.0,
                ),
                is_active: r.try_get("is_active")?,
                priority: r.try_get("priority")?,
                weight: r.try_get("weight")?,
                limits: AccountLimitColumns {
                    rpm: r.try_get("rpm")?,
                    tpm: r.try_get("tpm")?,
                    max_concurrent: r.try_get("max_concurrent")?,
                },
            }),
        });
        row.map(snapshot).transpose()
    }

    /// Rewrites every account's `credentials` (deleted ones too) where `f` returns a new value
    /// (PostgreSQL: the rows locked as read); an error from `f` is returned and, the transaction
    /// dropped, writes nothing. Returns how many rows changed. `updated_at` is left alone: what
    /// the credentials say did not change.
    pub async fn rewrite_credentials<E: From<StoreError>>(
        &mut self,
        f: impl Fn(&serde_json::Value) -> Result<Option<serde_json::Value>, E>,
    ) -> Result<usize, E> {
        let select = format!(
            "SELECT id, credentials FROM upstream_accounts ORDER BY id{}",
            self.for_update()
        );
        let update = "UPDATE upstream_accounts SET credentials = $1 WHERE id = $2";
        dispatch_tx!(self, c => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(select)).fetch_all(&mut **c).await.and_then(|rows| rows.iter().map(|r| Ok((
                r.try_get::<i64, _>("id")?,
                r.try_get::<Json<serde_json::Value>, _>("credentials")?.0,
            ))).collect::<Result<Vec<_>, sqlx::Error>>()).map_err(StoreError::from)?;
            let mut changed = 0;
            for (id, credentials) in &rows {
                if let Some(new) = f(credentials)? {
                    sqlx::query(update).bind(Json(&new)).bind(id).execute(&mut **c).await.map_err(StoreError::from)?;
                    changed += 1;
                }
            }
            Ok(changed)
        })
    }

    /// Changes an account's priority, weight, state or credentials.
    pub async fn update_account(
        &mut self,
        id: i64,
        patch: &AccountPatch,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE upstream_accounts SET priority = COALESCE($1, priority), weight = COALESCE($2, weight), \
             is_active = COALESCE($3, is_active), credentials = COALESCE($4, credentials), \
             base_url = COALESCE($5, base_url), {}updated_at = {} WHERE id = $6 AND deleted_at IS NULL",
            account_limit_sets(7),
            self.now_sql()
        );
        let [rpm, tpm, max_concurrent] = patch.limits.fields();
        let done = dispatch_tx!(self, c => sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(patch.priority).bind(patch.weight).bind(patch.is_active)
            .bind(patch.credentials.as_ref().map(Json)).bind(patch.base_url.as_deref()).bind(id)
            .bind(rpm.1.is_some()).bind(rpm.1.flatten())
            .bind(tpm.1.is_some()).bind(tpm.1.flatten())
            .bind(max_concurrent.1.is_some()).bind(max_concurrent.1.flatten())
            .execute(&mut **c).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("account {id}")));
        }
        self.notify_after_commit(ACCOUNTS_CHANNEL, id.to_string());
        Ok(())
    }

    /// Soft delete: the row stays (usage rows reference it) but the account is gone from listings
    /// and never serves again.
    pub async fn delete_account(&mut self, id: i64) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE upstream_accounts SET is_active = $1, deleted_at = {now}, updated_at = {now} WHERE id = $2 AND deleted_at IS NULL",
            now = self.now_sql()
        );
        let done = dispatch_tx!(self, c => sqlx::query(sqlx::AssertSqlSafe(sql)).bind(false).bind(id).execute(&mut **c).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("account {id}")));
        }
        self.notify_after_commit(ACCOUNTS_CHANNEL, id.to_string());
        Ok(())
    }
}
