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

use crate::upstream::AccountType;

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

    pub async fn set_user_active(&self, id: i64, active: bool) -> Result<(), StoreError> {
        let sql = "UPDATE users SET is_active = $1, updated_at = $2 WHERE id = $3";
        let done = dispatch!(self, p => sqlx::query(sql).bind(active).bind(Utc::now()).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("user {id}")));
        }
        Ok(())
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
            Some(r) => Some(KeyRow {
                id: r.try_get("id")?,
                user_id: r.try_get("user_id")?,
                name: r.try_get("name")?,
                permissions: r.try_get::<Json<serde_json::Value>, _>("permissions")?.0,
                is_active: r.try_get("is_active")?,
                user_active: r.try_get("user_active")?,
                expires_at: r.try_get("expires_at")?,
            }),
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

    pub async fn revoke_key(&self, id: i64) -> Result<(), StoreError> {
        let sql = "UPDATE api_keys SET is_active = $1, updated_at = $2 WHERE id = $3";
        let done = dispatch!(self, p => sqlx::query(sql).bind(false).bind(Utc::now()).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("key {id}")));
        }
        Ok(())
    }

    // ---- upstream accounts ----

    pub async fn create_account(&self, a: &NewAccount<'_>) -> Result<i64, StoreError> {
        let sql = "INSERT INTO upstream_accounts (name, type, email, base_url, credentials, priority, weight, is_active) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id";
        dispatch!(self, p => sqlx::query_scalar(sql)
            .bind(a.name).bind(a.kind.as_str()).bind(a.email).bind(a.base_url)
            .bind(Json(&a.credentials)).bind(a.priority).bind(a.weight).bind(a.is_active)
            .fetch_one(p).await)
        .map_err(|e| StoreError::from_insert(e, &format!("account {}", a.name)))
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
                   FROM upstream_accounts ORDER BY priority, id";
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

    pub async fn set_account_active(&self, id: i64, active: bool) -> Result<(), StoreError> {
        let sql = "UPDATE upstream_accounts SET is_active = $1, updated_at = $2 WHERE id = $3";
        let done = dispatch!(self, p => sqlx::query(sql).bind(active).bind(Utc::now()).bind(id).execute(p).await.map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("account {id}")));
        }
        Ok(())
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
