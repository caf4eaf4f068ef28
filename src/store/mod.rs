//! The database: connecting, migrating, and what every query shares (the [`Store`] handle, the
//! [`dispatch!`] macro that compiles one query for PostgreSQL and SQLite, errors, clocks). The
//! queries live by job: `catalog.rs` (users, keys, accounts and their change tracking),
//! `usage.rs` (the usage write path), `report.rs` (totals and invariant checks), `audit.rs` (the
//! admin log), `spend.rs` (budgets, credits, leases), `plans.rs` (plans and subscriptions).
//! Admin changes run in a [`Tx`], which commits only with its audit row. Nothing here runs on
//! the request path except [`Store::find_key`] on a key-cache miss.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

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

/// Runs the same code against whichever transaction a [`Tx`] holds; the executor is `&mut **$c`.
macro_rules! dispatch_tx {
    ($tx:expr, $c:ident => $body:expr) => {
        match &mut $tx.conn {
            TxConn::Postgres($c) => $body,
            TxConn::Sqlite($c) => $body,
        }
    };
}

mod audit;
mod catalog;
mod numeric;
mod plans;
mod report;
mod spend;
mod usage;

pub use audit::*;
pub use catalog::*;
pub use plans::{PlanBudget, PlanRow, SubscriptionRow};
pub use report::*;
pub use spend::{
    BudgetListing, BudgetOwner, BudgetPeriod, BudgetRow, CreditBalance, Grant, GrantOutcome,
    GrantReceipt, KeySpend, LeaseOutcome, LedgerEntry, SpendReport,
};

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
    /// An idempotency key used with another request, or by a request at the same moment.
    #[error("{0}")]
    Idempotency(String),
    #[error("no answer within {0:?}")]
    Unreachable(Duration),
    /// A bug, never an operator's error: an admin change reached `commit` without its audit row.
    #[error("a change without its audit row was refused (Tx::audit was not called)")]
    Unaudited,
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

/// How long [`Store::connect`] waits for the database (and a pooled connection) by default.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Store {
    /// Connects (creating a SQLite file if missing) and applies pending migrations, within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        Store::connect_within(url, max_connections, CONNECT_TIMEOUT).await
    }

    /// [`Store::connect`] within `timeout`, which also bounds every later wait for a pooled
    /// connection: an unreachable database is an error after `timeout`, never a hang.
    pub async fn connect_within(
        url: &str,
        max_connections: u32,
        timeout: Duration,
    ) -> Result<Store, StoreError> {
        match tokio::time::timeout(timeout, Store::open(url, max_connections, timeout)).await {
            Ok(Err(StoreError::Db(sqlx::Error::PoolTimedOut))) | Err(_) => {
                Err(StoreError::Unreachable(timeout))
            }
            Ok(opened) => opened,
        }
    }

    async fn open(url: &str, max_connections: u32, timeout: Duration) -> Result<Store, StoreError> {
        let store = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5))
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.max(1))
                .acquire_timeout(timeout)
                .connect_with(opts)
                .await?;
            Store::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(1))
                .acquire_timeout(timeout)
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

    /// The database clock, as the watermark [`Store::changed_since`] takes.
    pub async fn clock(&self) -> Result<String, StoreError> {
        let sql = match self {
            Store::Postgres(_) => "SELECT now()::text",
            Store::Sqlite(_) => "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        };
        Ok(dispatch!(self, p => sqlx::query_scalar(sql).fetch_one(p).await)?)
    }

    /// After values were rewritten to remove what they held (plaintext credentials sealed in
    /// place): SQLite rebuilds the file (`VACUUM`, no free pages left) and empties the WAL, so
    /// no old copy stays on disk; `false` when the WAL could not be emptied (a reader in the
    /// way). PostgreSQL: nothing to do here (old row versions go with vacuum and page reuse).
    pub async fn scrub(&self) -> Result<bool, StoreError> {
        let Store::Sqlite(p) = self else {
            return Ok(true);
        };
        let mut c = p.acquire().await?;
        sqlx::query("VACUUM").execute(&mut *c).await?;
        let (busy,): (i64,) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&mut *c)
            .await?;
        Ok(busy == 0)
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

/// A write transaction. Every admin change runs in one and writes its audit row in it
/// ([`Tx::audit`]); [`Tx::commit`] refuses to commit without one, so a change and its row are
/// committed together or not at all. Dropped without a commit, it rolls back. NOTIFYs asked for
/// inside are sent after the commit (best effort, as [`Store`]'s).
pub struct Tx {
    conn: TxConn,
    store: Store,
    notes: Vec<(&'static str, String)>,
    audited: bool,
}

enum TxConn {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Store {
    /// Opens a write transaction. SQLite: `BEGIN IMMEDIATE`, the write lock from the start, so
    /// the state read before a change (its audit `before`) is the one the change applies to;
    /// PostgreSQL: the rows read for that are locked `FOR UPDATE`.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let conn = match self {
            Store::Postgres(p) => TxConn::Postgres(p.begin().await?),
            Store::Sqlite(p) => TxConn::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
        };
        Ok(Tx {
            conn,
            store: self.clone(),
            notes: Vec::new(),
            audited: false,
        })
    }
}

impl Tx {
    /// Commits the change with its audit row; without one, rolls back and answers
    /// [`StoreError::Unaudited`].
    pub async fn commit(self) -> Result<(), StoreError> {
        if !self.audited {
            return Err(StoreError::Unaudited);
        }
        self.commit_unaudited().await
    }

    /// Commits what is not an admin change: the usage writer's rows with their charges, the
    /// spend leases instances take and return (`spend.rs`), read-only transactions, the fixtures
    /// of benches. (Every admin change is audited, and so are config accounts saved and
    /// credentials sealed at start, as `system:start`.)
    pub async fn commit_unaudited(self) -> Result<(), StoreError> {
        match self.conn {
            TxConn::Postgres(t) => t.commit().await?,
            TxConn::Sqlite(t) => t.commit().await?,
        }
        for (channel, payload) in &self.notes {
            self.store.notify(channel, payload).await;
        }
        Ok(())
    }

    /// Rolls the transaction back (what it wrote is undone; nothing is notified).
    pub(super) async fn rollback(self) -> Result<(), StoreError> {
        match self.conn {
            TxConn::Postgres(t) => t.rollback().await?,
            TxConn::Sqlite(t) => t.rollback().await?,
        }
        Ok(())
    }

    /// The database's "now" in the backend's column format.
    fn now_sql(&self) -> &'static str {
        self.store.now_sql()
    }

    /// ` FOR UPDATE` on PostgreSQL (SQLite's transaction holds the write lock already).
    fn for_update(&self) -> &'static str {
        match self.conn {
            TxConn::Postgres(_) => " FOR UPDATE",
            TxConn::Sqlite(_) => "",
        }
    }

    /// Tells other instances once the transaction commits (PostgreSQL; see [`Store`]'s notify).
    fn notify_after_commit(&mut self, channel: &'static str, payload: String) {
        self.notes.push((channel, payload));
    }
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
