//! Spend control's queries: leases taken from and returned to budgets and balances, the
//! settlement of each written usage row's charges (in the usage write's transaction), credit
//! grants with their idempotency records, balances, the ledger, budgets, and the spend
//! invariants `tollgate usage --check` verifies.
//!
//! Every query here is written once for both backends through [`Tx`]: decimals are bound as
//! NUMERIC on PostgreSQL and as exact decimal text on SQLite (read back through
//! [`super::sqlite_cost`], the one conversion), times as TIMESTAMPTZ or the fixed-width UTC text
//! of `usage_records`. Arithmetic on amounts is done here in Rust, on rows locked for the
//! transaction (`FOR UPDATE` on PostgreSQL; SQLite transactions are `BEGIN IMMEDIATE`, one writer).
//! Locks are always taken pools first (budget periods in key order, then balances by user), then
//! leases by id, so two transactions never wait on each other in a cycle.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use sqlx::types::Json;
use sqlx::Row;

use super::numeric::Numeric;
use super::{sqlite_cost, sqlite_time, Actor, Store, StoreError, Target, Tx, TxConn};
use crate::budget::{period_bounds, Metric, Period};
use crate::record::{Pool, UsageRecord, BILLABLE_SQL};

/// One value bound to a spend query, in each backend's form.
#[derive(Debug, Clone)]
pub(super) enum V {
    I(i64),
    OI(Option<i64>),
    T(String),
    OT(Option<String>),
    D(Decimal),
    Ts(DateTime<Utc>),
    OTs(Option<DateTime<Utc>>),
    J(serde_json::Value),
}

/// A row read through [`Tx`].
pub(super) enum R {
    Pg(sqlx::postgres::PgRow),
    Lite(sqlx::sqlite::SqliteRow),
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl R {
    pub(super) fn i64(&self, c: &str) -> Result<i64, sqlx::Error> {
        match self {
            R::Pg(r) => r.try_get(c),
            R::Lite(r) => r.try_get(c),
        }
    }
    pub(super) fn oi64(&self, c: &str) -> Result<Option<i64>, sqlx::Error> {
        match self {
            R::Pg(r) => r.try_get(c),
            R::Lite(r) => r.try_get(c),
        }
    }
    pub(super) fn text(&self, c: &str) -> Result<String, sqlx::Error> {
        match self {
            R::Pg(r) => r.try_get(c),
            R::Lite(r) => r.try_get(c),
        }
    }
    pub(super) fn otext(&self, c: &str) -> Result<Option<String>, sqlx::Error> {
        match self {
            R::Pg(r) => r.try_get(c),
            R::Lite(r) => r.try_get(c),
        }
    }
    pub(super) fn dec(&self, c: &str) -> Result<Decimal, sqlx::Error> {
        match self {
            R::Pg(r) => r.try_get(c),
            R::Lite(r) => sqlite_cost(&r.try_get::<String, _>(c)?),
        }
    }
    pub(super) fn ts(&self, c: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        match self {
            R::Pg(r) => r.try_get(c),
            R::Lite(r) => parse_time(&r.try_get::<String, _>(c)?),
        }
    }
    pub(super) fn ots(&self, c: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        match self {
            R::Pg(r) => r.try_get(c),
            R::Lite(r) => r
                .try_get::<Option<String>, _>(c)?
                .map(|s| parse_time(&s))
                .transpose(),
        }
    }
    pub(super) fn json(&self, c: &str) -> Result<serde_json::Value, sqlx::Error> {
        match self {
            R::Pg(r) => Ok(r.try_get::<Json<serde_json::Value>, _>(c)?.0),
            R::Lite(r) => Ok(r.try_get::<Json<serde_json::Value>, _>(c)?.0),
        }
    }
}

/// Binds `args` to a PostgreSQL query: decimals as NUMERIC, times as TIMESTAMPTZ.
macro_rules! bind_pg {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a.clone() {
                V::I(v) => q.bind(v),
                V::OI(v) => q.bind(v),
                V::T(v) => q.bind(v),
                V::OT(v) => q.bind(v),
                V::D(v) => q.bind(v),
                V::Ts(v) => q.bind(v),
                V::OTs(v) => q.bind(v),
                V::J(v) => q.bind(Json(v)),
            };
        }
        q
    }};
}

/// Binds `args` to a SQLite query: decimals as exact text, times as fixed-width UTC text.
macro_rules! bind_lite {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a.clone() {
                V::I(v) => q.bind(v),
                V::OI(v) => q.bind(v),
                V::T(v) => q.bind(v),
                V::OT(v) => q.bind(v),
                V::D(v) => q.bind(v.to_string()),
                V::Ts(v) => q.bind(sqlite_time(v)),
                V::OTs(v) => q.bind(v.map(sqlite_time)),
                V::J(v) => q.bind(Json(v)),
            };
        }
        q
    }};
}

impl Tx {
    pub(super) async fn exec(&mut self, sql: &str, args: &[V]) -> Result<u64, StoreError> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        Ok(match &mut self.conn {
            TxConn::Postgres(tx) => bind_pg!(sqlx::query(sql), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            TxConn::Sqlite(tx) => bind_lite!(sqlx::query(sql), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        })
    }

    pub(super) async fn rows(&mut self, sql: &str, args: &[V]) -> Result<Vec<R>, StoreError> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        Ok(match &mut self.conn {
            TxConn::Postgres(tx) => bind_pg!(sqlx::query(sql), args)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(R::Pg)
                .collect(),
            TxConn::Sqlite(tx) => bind_lite!(sqlx::query(sql), args)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(R::Lite)
                .collect(),
        })
    }

    pub(super) async fn row(&mut self, sql: &str, args: &[V]) -> Result<Option<R>, StoreError> {
        Ok(self.rows(sql, args).await?.into_iter().next())
    }

    /// Where the transaction's backend locks rows: ` FOR UPDATE` on PostgreSQL.
    fn lock(&self) -> &'static str {
        self.for_update()
    }
}

impl Tx {
    /// A transaction already begun (the usage write's).
    pub(super) fn wrap(conn: TxConn, store: &Store) -> Tx {
        Tx {
            conn,
            store: store.clone(),
            notes: Vec::new(),
            audited: false,
        }
    }
}

impl Store {
    /// A transaction for reading only (SQLite: deferred, so it takes no write lock).
    pub(super) async fn begin_read(&self) -> Result<Tx, StoreError> {
        let conn = match self {
            Store::Postgres(p) => TxConn::Postgres(p.begin().await?),
            Store::Sqlite(p) => TxConn::Sqlite(p.begin().await?),
        };
        Ok(Tx::wrap(conn, self))
    }
}

/// `$first, $first+1, …` for `n` values.
pub(super) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Pools: a budget period or a balance, locked and written back.

/// A pool's numbers as read under its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolState {
    /// What the pool allows in all: the budget's limit, or the balance plus the overdraft.
    allowed: Decimal,
    /// Budget: spent in the period. Balance: 0 (charges lower `allowed` instead).
    spent: Decimal,
    leased: Decimal,
}

impl PoolState {
    fn available(&self) -> Decimal {
        self.allowed - self.spent - self.leased
    }
}

/// The key a pool is locked and ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum PoolKey {
    Budget {
        budget_id: i64,
        subject_id: i64,
        period_start: DateTime<Utc>,
    },
    Credit {
        user_id: i64,
    },
}

impl PoolKey {
    fn of(pool: &Pool) -> PoolKey {
        match *pool {
            Pool::Budget {
                budget_id,
                subject_id,
                period_start,
                ..
            } => PoolKey::Budget {
                budget_id,
                subject_id,
                period_start,
            },
            Pool::Credit { user_id } => PoolKey::Credit { user_id },
        }
    }
}

/// A budget period row, made if missing (spent 0), locked; with the budget's limit. `None`: the
/// budget is gone. One statement: the upsert locks the row whether it inserts or finds it (on
/// PostgreSQL as `FOR UPDATE` would; SQLite's write transaction holds the whole database).
async fn lock_budget_period(
    tx: &mut Tx,
    budget_id: i64,
    subject_id: i64,
    period_start: DateTime<Utc>,
) -> Result<Option<(Decimal, Decimal, Decimal)>, StoreError> {
    let row = tx
        .row(
            "INSERT INTO budget_usage (budget_id, subject_id, period_start, spent, leased) \
             SELECT id, $2, $3, $4, $4 FROM budgets WHERE id = $1 \
             ON CONFLICT (budget_id, subject_id, period_start) DO UPDATE SET spent = budget_usage.spent \
             RETURNING spent, leased, (SELECT limit_amount FROM budgets WHERE id = $1) AS limit_amount",
            &[
                V::I(budget_id),
                V::I(subject_id),
                V::Ts(period_start),
                V::D(Decimal::ZERO),
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None); // no such budget: nothing inserted, nothing returned
    };
    Ok(Some((
        row.dec("limit_amount")?,
        row.dec("spent")?,
        row.dec("leased")?,
    )))
}

/// [`lock_budget_period`] for a batch's periods: (spent, leased) by period. On PostgreSQL one
/// upsert over arrays, its rows taken in key order (as a sorted loop of single upserts would
/// lock them); on SQLite one statement a period. Periods of deleted budgets are absent.
async fn lock_budget_periods(
    tx: &mut Tx,
    periods: &BTreeSet<PeriodKey>,
) -> Result<HashMap<PeriodKey, (Decimal, Decimal)>, StoreError> {
    let mut out = HashMap::with_capacity(periods.len());
    if periods.is_empty() {
        return Ok(out);
    }
    if let TxConn::Postgres(c) = &mut tx.conn {
        let rows = sqlx::query(
            "INSERT INTO budget_usage (budget_id, subject_id, period_start, spent, leased) \
             SELECT b.id, x.sub, x.p, 0, 0 \
             FROM UNNEST($1::int8[], $2::int8[], $3::timestamptz[]) WITH ORDINALITY AS x(b, sub, p, o) \
             JOIN budgets b ON b.id = x.b ORDER BY x.o \
             ON CONFLICT (budget_id, subject_id, period_start) DO UPDATE SET spent = budget_usage.spent \
             RETURNING budget_id, subject_id, period_start, spent, leased",
        )
        .bind(periods.iter().map(|k| k.0).collect::<Vec<_>>())
        .bind(periods.iter().map(|k| k.1).collect::<Vec<_>>())
        .bind(periods.iter().map(|k| k.2).collect::<Vec<_>>())
        .fetch_all(&mut **c)
        .await?;
        for r in rows {
            out.insert(
                (
                    r.try_get("budget_id")?,
                    r.try_get("subject_id")?,
                    r.try_get("period_start")?,
                ),
                (r.try_get("spent")?, r.try_get("leased")?),
            );
        }
        return Ok(out);
    }
    for &(b, s, p) in periods {
        if let Some((_, spent, leased)) = lock_budget_period(tx, b, s, p).await? {
            out.insert((b, s, p), (spent, leased));
        }
    }
    Ok(out)
}

async fn write_budget_period(
    tx: &mut Tx,
    budget_id: i64,
    subject_id: i64,
    period_start: DateTime<Utc>,
    spent: Decimal,
    leased: Decimal,
) -> Result<(), StoreError> {
    tx.exec(
        "UPDATE budget_usage SET spent = $4, leased = $5 \
         WHERE budget_id = $1 AND subject_id = $2 AND period_start = $3",
        &[
            V::I(budget_id),
            V::I(subject_id),
            V::Ts(period_start),
            V::D(spent),
            V::D(leased),
        ],
    )
    .await?;
    Ok(())
}

/// A balance as locked: (balance, leased, overdraft). `None`: the user is not prepaid.
async fn lock_balance(
    tx: &mut Tx,
    user_id: i64,
) -> Result<Option<(Decimal, Decimal, Decimal)>, StoreError> {
    Ok(lock_balances(tx, &BTreeSet::from([user_id]))
        .await?
        .remove(&user_id))
}

async fn write_balance(
    tx: &mut Tx,
    user_id: i64,
    balance: Decimal,
    leased: Decimal,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    tx.exec(
        "UPDATE credit_balances SET balance = $2, leased = $3, updated_at = $4 WHERE user_id = $1",
        &[V::I(user_id), V::D(balance), V::D(leased), V::Ts(now)],
    )
    .await?;
    Ok(())
}

/// One ledger row.
#[allow(clippy::too_many_arguments)]
async fn ledger(
    tx: &mut Tx,
    user_id: i64,
    action: &str,
    amount: Decimal,
    before: Decimal,
    grant_id: Option<i64>,
    idempotency_key: Option<&str>,
    metadata: serde_json::Value,
    at: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let id = ledger_ids(tx, 1).await?[0];
    tx.exec(
        "INSERT INTO credit_entries (id, user_id, action, amount, balance_before, balance_after, \
             grant_id, idempotency_key, metadata, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            V::I(id),
            V::I(user_id),
            V::T(action.into()),
            V::D(amount),
            V::D(before),
            V::D(before + amount),
            V::OI(grant_id),
            V::OT(idempotency_key.map(str::to_string)),
            V::J(metadata),
            V::Ts(at),
        ],
    )
    .await?;
    Ok(id)
}

/// `n` new ledger ids, ascending: one numbering for the entries of `credit_entries` and the
/// charges on usage rows, in the order they are written (PostgreSQL: the sequence
/// `credit_ledger_id_seq`; SQLite: the counter `credit_ledger_seq`, which this transaction's
/// write lock serialises). Migration 0013.
async fn ledger_ids(tx: &mut Tx, n: usize) -> Result<Vec<i64>, StoreError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let count = i64::try_from(n).map_err(|_| StoreError::Invalid("too many ledger ids".into()))?;
    if let TxConn::Postgres(c) = &mut tx.conn {
        // One row with an array, not a row an id: decoding a row costs ~2,000 instructions
        // (callgrind), an array's element a few.
        let (mut ids,): (Vec<i64>,) = sqlx::query_as(
            "SELECT array_agg(nextval('credit_ledger_id_seq')) FROM generate_series(1, $1)",
        )
        .bind(count)
        .fetch_one(&mut **c)
        .await?;
        if ids.len() != n {
            return Err(StoreError::Invalid(format!(
                "credit_ledger_id_seq gave {} ids for {n}",
                ids.len()
            )));
        }
        ids.sort_unstable();
        return Ok(ids);
    }
    let last = tx
        .row(
            "UPDATE credit_ledger_seq SET last = last + $1 WHERE id = 1 RETURNING last",
            &[V::I(count)],
        )
        .await?
        .ok_or_else(|| StoreError::Invalid("credit_ledger_seq has no row".into()))?
        .i64("last")?;
    Ok((last - count + 1..=last).collect())
}

async fn write_grant(tx: &mut Tx, id: i64, remaining: Decimal) -> Result<(), StoreError> {
    tx.exec(
        "UPDATE credit_grants SET remaining = $2 WHERE id = $1",
        &[V::I(id), V::D(remaining)],
    )
    .await?;
    Ok(())
}

/// A user's grants with something left, earliest-expiring first (never-expiring last).
async fn open_grants(
    tx: &mut Tx,
    user_id: i64,
) -> Result<Vec<(i64, Decimal, Option<DateTime<Utc>>)>, StoreError> {
    Ok(open_grants_of(tx, &BTreeSet::from([user_id]))
        .await?
        .remove(&user_id)
        .unwrap_or_default())
}

/// [`lock_balance`] for several users in one statement (the usage writer's batch): the rows
/// locked in user order, as one statement each in a sorted loop would. Users not prepaid are
/// absent.
async fn lock_balances(
    tx: &mut Tx,
    users: &BTreeSet<i64>,
) -> Result<HashMap<i64, (Decimal, Decimal, Decimal)>, StoreError> {
    let mut out = HashMap::with_capacity(users.len());
    if users.is_empty() {
        return Ok(out);
    }
    let sql = format!(
        "SELECT user_id, balance, leased, overdraft FROM credit_balances \
         WHERE user_id IN ({}) ORDER BY user_id{}",
        placeholders(1, users.len()),
        tx.lock()
    );
    let args: Vec<V> = users.iter().map(|u| V::I(*u)).collect();
    for r in tx.rows(&sql, &args).await? {
        out.insert(
            r.i64("user_id")?,
            (r.dec("balance")?, r.dec("leased")?, r.dec("overdraft")?),
        );
    }
    Ok(out)
}

/// [`open_grants`] for several users in one statement, by user (a user without any: absent).
async fn open_grants_of(
    tx: &mut Tx,
    users: &BTreeSet<i64>,
) -> Result<HashMap<i64, Vec<(i64, Decimal, Option<DateTime<Utc>>)>>, StoreError> {
    let mut out: HashMap<i64, Vec<_>> = HashMap::with_capacity(users.len());
    if users.is_empty() {
        return Ok(out);
    }
    let sql = format!(
        "SELECT user_id, id, remaining, expires_at FROM credit_grants WHERE user_id IN ({}) \
         ORDER BY user_id, (expires_at IS NULL), expires_at, id",
        placeholders(1, users.len())
    );
    let args: Vec<V> = users.iter().map(|u| V::I(*u)).collect();
    for r in tx.rows(&sql, &args).await? {
        let remaining = r.dec("remaining")?;
        if remaining > Decimal::ZERO {
            out.entry(r.i64("user_id")?).or_default().push((
                r.i64("id")?,
                remaining,
                r.ots("expires_at")?,
            ));
        }
    }
    Ok(out)
}

/// Takes `amount` from the grants (in memory), earliest-expiring first; what no grant covers
/// (an overdraft) is taken from none.
fn take_from_grants(grants: &mut [(i64, Decimal, Option<DateTime<Utc>>)], mut amount: Decimal) {
    for g in grants.iter_mut() {
        if amount <= Decimal::ZERO {
            break;
        }
        let take = amount.min(g.1);
        g.1 -= take;
        amount -= take;
    }
}

/// A charge's ledger entry, carried by its usage row (migration 0013): written by
/// [`settle`], inserted with the row by the usage writer (`usage.rs`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LedgerCharge {
    /// The entry's place in the ledger ([`ledger_ids`]).
    pub id: i64,
    /// What the balance was charged: ≤ 0, as ledger amounts are signed.
    pub amount: Decimal,
    /// The balance before the charge (after it: `before + amount`).
    pub before: Decimal,
    /// `None`: nothing to say (the view shows `{}`); else what could not be collected.
    pub metadata: Option<serde_json::Value>,
}

/// What [`settle`] worked out for a batch, for the insert that follows it in the same
/// transaction.
#[derive(Debug, Default)]
pub(super) struct Settlement {
    /// Something was locked or written: a row the insert then skips as a replay makes this
    /// settlement wrong, and the transaction must be done again without that row.
    pub touched: bool,
    /// Row `i`'s ledger entry, aligned with the rows settled (empty: no row has one).
    pub charges: Vec<Option<LedgerCharge>>,
}

impl Settlement {
    /// Row `i`'s ledger entry, if it has one.
    pub(super) fn charge(&self, i: usize) -> Option<&LedgerCharge> {
        self.charges.get(i).and_then(Option::as_ref)
    }
}

/// Expires what is left of grants past their expiry, as `expire` ledger rows, on a locked
/// balance. Credit still held in leases is not expired yet (the requests it was reserved for may
/// spend it); it expires at a later pass, once the leases are spent or returned. The balance
/// row is written only when something expired. Returns the new balance.
async fn expire_grants(
    tx: &mut Tx,
    user_id: i64,
    mut balance: Decimal,
    leased: Decimal,
    now: DateTime<Utc>,
) -> Result<Decimal, StoreError> {
    let was = balance;
    let grants = open_grants(tx, user_id).await?;
    for (id, remaining, expires_at) in grants {
        if expires_at.is_none_or(|e| e > now) {
            continue;
        }
        let free = (balance - leased).max(Decimal::ZERO);
        let x = remaining.min(free);
        if x <= Decimal::ZERO {
            break;
        }
        ledger(
            tx,
            user_id,
            "expire",
            -x,
            balance,
            Some(id),
            None,
            serde_json::json!({ "expired_at": expires_at }),
            now,
        )
        .await?;
        write_grant(tx, id, remaining - x).await?;
        balance -= x;
    }
    if balance != was {
        write_balance(tx, user_id, balance, leased, now).await?;
    }
    Ok(balance)
}

// ---------------------------------------------------------------------------------------------
// Leases.

/// What [`Store::take_lease`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// The lease (new or grown) and how much it grew by.
    Granted { lease_id: i64, amount: Decimal },
    /// The pool cannot hold the reservation: what is left for this instance to lease.
    Exhausted { available: Decimal },
    /// The budget was deleted, or the user is no longer prepaid.
    Gone,
}

/// `WHERE` of a pool's leases (`$1`.. from [`pool_args`]).
fn pool_where(pool: &Pool) -> &'static str {
    match pool {
        Pool::Budget { .. } => {
            "pool = 'budget' AND budget_id = $1 AND subject_id = $2 AND period_start = $3"
        }
        Pool::Credit { .. } => "pool = 'credit' AND user_id = $1",
    }
}

fn pool_args(pool: &Pool) -> Vec<V> {
    match *pool {
        Pool::Budget {
            budget_id,
            subject_id,
            period_start,
            ..
        } => vec![V::I(budget_id), V::I(subject_id), V::Ts(period_start)],
        Pool::Credit { user_id } => vec![V::I(user_id)],
    }
}

/// Locks a pool; `None` when it is gone.
async fn lock_pool(
    tx: &mut Tx,
    pool: &Pool,
    now: DateTime<Utc>,
) -> Result<Option<PoolState>, StoreError> {
    match *pool {
        Pool::Budget {
            budget_id,
            subject_id,
            period_start,
            ..
        } => Ok(lock_budget_period(tx, budget_id, subject_id, period_start)
            .await?
            .map(|(limit, spent, leased)| PoolState {
                allowed: limit,
                spent,
                leased,
            })),
        Pool::Credit { user_id } => {
            let Some((balance, leased, overdraft)) = lock_balance(tx, user_id).await? else {
                return Ok(None);
            };
            let balance = expire_grants(tx, user_id, balance, leased, now).await?;
            Ok(Some(PoolState {
                allowed: balance + overdraft,
                spent: Decimal::ZERO,
                leased,
            }))
        }
    }
}

/// Writes a locked pool's leased amount back.
async fn write_pool_leased(
    tx: &mut Tx,
    pool: &Pool,
    state: PoolState,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    match *pool {
        Pool::Budget {
            budget_id,
            subject_id,
            period_start,
            ..
        } => {
            write_budget_period(
                tx,
                budget_id,
                subject_id,
                period_start,
                state.spent,
                state.leased,
            )
            .await
        }
        Pool::Credit { user_id } => {
            tx.exec(
                "UPDATE credit_balances SET leased = $2, updated_at = $3 WHERE user_id = $1",
                &[V::I(user_id), V::D(state.leased), V::Ts(now)],
            )
            .await?;
            Ok(())
        }
    }
}

/// Takes back a locked pool's expired leases (instances that died without returning them).
async fn reclaim_in_pool(
    tx: &mut Tx,
    pool: &Pool,
    state: &mut PoolState,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let mut args = pool_args(pool);
    let n = args.len();
    args.push(V::Ts(now));
    let sql = format!(
        "SELECT id, amount FROM spend_leases WHERE {} AND expires_at <= ${} ORDER BY id{}",
        pool_where(pool),
        n + 1,
        tx.lock()
    );
    let expired = tx.rows(&sql, &args).await?;
    for r in &expired {
        let amount = r.dec("amount")?;
        state.leased = (state.leased - amount).max(Decimal::ZERO);
        tx.exec(
            "DELETE FROM spend_leases WHERE id = $1",
            &[V::I(r.i64("id")?)],
        )
        .await?;
    }
    Ok(expired.len() as u64)
}

impl Store {
    /// Leases from `pool` for `instance`: at least `reservation`, up to `slice`, if the pool has
    /// it (`limit − spent − leased`, or `balance + overdraft − leased`, after taking back expired
    /// leases). The instance's lease on the pool grows (one per pool and instance) and is
    /// renewed to `now + ttl`.
    pub async fn take_lease(
        &self,
        instance: &str,
        pool: &Pool,
        reservation: Decimal,
        slice: Decimal,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<LeaseOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let Some(mut state) = lock_pool(&mut tx, pool, now).await? else {
            tx.commit_unaudited().await?;
            return Ok(LeaseOutcome::Gone);
        };
        reclaim_in_pool(&mut tx, pool, &mut state, now).await?;
        let available = state.available();
        if available < reservation {
            write_pool_leased(&mut tx, pool, state, now).await?;
            tx.commit_unaudited().await?;
            return Ok(LeaseOutcome::Exhausted {
                available: available.max(Decimal::ZERO),
            });
        }
        let amount = slice.max(reservation).min(available);
        let mut args = pool_args(pool);
        let n = args.len();
        args.push(V::T(instance.into()));
        let sql = format!(
            "SELECT id, amount FROM spend_leases WHERE {} AND instance = ${} ORDER BY id LIMIT 1{}",
            pool_where(pool),
            n + 1,
            tx.lock()
        );
        let lease_id = match tx.row(&sql, &args).await? {
            Some(r) => {
                let id = r.i64("id")?;
                tx.exec(
                    "UPDATE spend_leases SET amount = $2, expires_at = $3 WHERE id = $1",
                    &[V::I(id), V::D(r.dec("amount")? + amount), V::Ts(now + ttl)],
                )
                .await?;
                id
            }
            None => {
                let (kind, b, s, p, u) = match *pool {
                    Pool::Budget {
                        budget_id,
                        subject_id,
                        period_start,
                        ..
                    } => (
                        "budget",
                        Some(budget_id),
                        Some(subject_id),
                        Some(period_start),
                        None,
                    ),
                    Pool::Credit { user_id } => ("credit", None, None, None, Some(user_id)),
                };
                tx.row(
                    "INSERT INTO spend_leases (instance, pool, budget_id, subject_id, period_start, user_id, \
                     amount, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                    &[
                        V::T(instance.into()),
                        V::T(kind.into()),
                        V::OI(b),
                        V::OI(s),
                        V::OTs(p),
                        V::OI(u),
                        V::D(amount),
                        V::Ts(now + ttl),
                        V::Ts(now),
                    ],
                )
                .await?
                .ok_or_else(|| StoreError::Invalid("lease insert returned nothing".into()))?
                .i64("id")?
            }
        };
        state.leased += amount;
        write_pool_leased(&mut tx, pool, state, now).await?;
        tx.commit_unaudited().await?;
        Ok(LeaseOutcome::Granted { lease_id, amount })
    }

    /// Gives back up to `amount` of a lease (what the instance will not use); deletes the lease
    /// when nothing is left in it. Returns what was given back.
    pub async fn return_lease(
        &self,
        pool: &Pool,
        lease_id: i64,
        amount: Decimal,
        now: DateTime<Utc>,
    ) -> Result<Decimal, StoreError> {
        let mut tx = self.begin().await?;
        let Some(mut state) = lock_pool(&mut tx, pool, now).await? else {
            tx.exec("DELETE FROM spend_leases WHERE id = $1", &[V::I(lease_id)])
                .await?;
            tx.commit_unaudited().await?;
            return Ok(Decimal::ZERO);
        };
        let sql = format!("SELECT amount FROM spend_leases WHERE id = $1{}", tx.lock());
        let Some(row) = tx.row(&sql, &[V::I(lease_id)]).await? else {
            tx.commit_unaudited().await?;
            return Ok(Decimal::ZERO);
        };
        let held = row.dec("amount")?;
        let back = amount.min(held).max(Decimal::ZERO);
        if held - back <= Decimal::ZERO {
            tx.exec("DELETE FROM spend_leases WHERE id = $1", &[V::I(lease_id)])
                .await?;
        } else {
            tx.exec(
                "UPDATE spend_leases SET amount = $2 WHERE id = $1",
                &[V::I(lease_id), V::D(held - back)],
            )
            .await?;
        }
        state.leased = (state.leased - back).max(Decimal::ZERO);
        write_pool_leased(&mut tx, pool, state, now).await?;
        tx.commit_unaudited().await?;
        Ok(back)
    }

    /// Renews every lease `instance` holds to `expires_at`; returns how many.
    pub async fn renew_leases(
        &self,
        instance: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let n = tx
            .exec(
                "UPDATE spend_leases SET expires_at = $2 WHERE instance = $1",
                &[V::T(instance.into()), V::Ts(expires_at)],
            )
            .await?;
        tx.commit_unaudited().await?;
        Ok(n)
    }

    /// Takes back every expired lease (any instance's), pool by pool; returns how many.
    pub async fn reclaim_expired_leases(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let rows = tx
            .rows(
                "SELECT DISTINCT pool, budget_id, subject_id, period_start, user_id FROM spend_leases \
                 WHERE expires_at <= $1",
                &[V::Ts(now)],
            )
            .await?;
        tx.commit_unaudited().await?;
        let mut pools = Vec::new();
        for r in rows {
            pools.push(match r.text("pool")?.as_str() {
                "budget" => Pool::Budget {
                    budget_id: r.oi64("budget_id")?.unwrap_or(0),
                    subject_id: r.oi64("subject_id")?.unwrap_or(0),
                    metric: Metric::Cost, // not used to find the pool
                    period_start: r.ots("period_start")?.unwrap_or_default(),
                },
                _ => Pool::Credit {
                    user_id: r.oi64("user_id")?.unwrap_or(0),
                },
            });
        }
        let mut total = 0;
        for pool in pools {
            let mut tx = self.begin().await?;
            match lock_pool(&mut tx, &pool, now).await? {
                Some(mut state) => {
                    total += reclaim_in_pool(&mut tx, &pool, &mut state, now).await?;
                    write_pool_leased(&mut tx, &pool, state, now).await?;
                }
                None => {
                    let mut args = pool_args(&pool);
                    let n = args.len();
                    args.push(V::Ts(now));
                    let sql = format!(
                        "DELETE FROM spend_leases WHERE {} AND expires_at <= ${}",
                        pool_where(&pool),
                        n + 1
                    );
                    total += tx.exec(&sql, &args).await?;
                }
            }
            tx.commit_unaudited().await?;
        }
        Ok(total)
    }
}

// ---------------------------------------------------------------------------------------------
// Settlement: in the usage write's transaction.

/// A budget as settlement and the invariants read it, with who it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRow {
    pub id: i64,
    pub api_key_id: Option<i64>,
    pub user_id: Option<i64>,
    pub plan_id: Option<i64>,
    pub metric: Metric,
    pub period: Period,
    pub limit: Decimal,
}

fn metric_of(s: &str) -> Result<Metric, sqlx::Error> {
    Metric::ALL
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown budget metric {s:?}").into()))
}

fn period_of(s: &str) -> Result<Period, sqlx::Error> {
    Period::ALL
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown budget period {s:?}").into()))
}

pub(super) fn budget_row(r: &R) -> Result<BudgetRow, sqlx::Error> {
    Ok(BudgetRow {
        id: r.i64("id")?,
        api_key_id: r.oi64("api_key_id")?,
        user_id: r.oi64("user_id")?,
        plan_id: r.oi64("plan_id")?,
        metric: metric_of(&r.text("metric")?)?,
        period: period_of(&r.text("period")?)?,
        limit: r.dec("limit_amount")?,
    })
}

pub(super) const BUDGET_COLUMNS: &str =
    "b.id, b.api_key_id, b.user_id, b.plan_id, b.metric, b.period, b.limit_amount";

/// The subscriber and subscription start a plan's budget applies through (`None`: a key's or
/// user's own budget).
type Via = Option<(i64, DateTime<Utc>)>;

/// A run of rows of one subject in one period: (subject, period start, period end, sum).
type PeriodRun = (i64, DateTime<Utc>, Option<DateTime<Utc>>, Decimal);

/// A budget period row's key: (budget, subject, period start).
type PeriodKey = (i64, i64, DateTime<Utc>);

/// What applies to rows of some keys and users: the budgets, each with the subscriber and
/// subscription start a plan's budget applies through (`None` for a key's or user's own), and
/// the users among them who are prepaid.
#[derive(Debug, Default)]
struct Applicable {
    budgets: Vec<(BudgetRow, Via)>,
    prepaid: BTreeSet<i64>,
}

/// [`Applicable`] for these keys and users, in one query (the usage writer asks it once a batch,
/// key lookups once per miss).
async fn applicable(
    tx: &mut Tx,
    keys: &BTreeSet<i64>,
    users: &BTreeSet<i64>,
) -> Result<Applicable, StoreError> {
    let mut out = Applicable::default();
    if keys.is_empty() && users.is_empty() {
        return Ok(out);
    }
    let ks = placeholders(1, keys.len());
    let us = placeholders(1 + keys.len(), users.len());
    let mut args: Vec<V> = keys.iter().map(|k| V::I(*k)).collect();
    args.extend(users.iter().map(|u| V::I(*u)));
    // Three kinds of row: a key's or user's budget, a plan's budget through a subscription, and
    // a prepaid user (`credit`, budget columns NULL).
    let sql = format!(
        "SELECT 'budget' AS kind, {BUDGET_COLUMNS}, NULL AS sub_user, NULL AS anchor FROM budgets b \
         WHERE b.api_key_id IN ({ks}) OR b.user_id IN ({us}) \
         UNION ALL SELECT 'plan', {BUDGET_COLUMNS}, s.user_id, s.current_period_start \
         FROM budgets b JOIN subscriptions s ON s.plan_id = b.plan_id \
         WHERE s.status = 'active' AND s.user_id IN ({us}) \
         UNION ALL SELECT 'credit', NULL, NULL, NULL, NULL, NULL, NULL, NULL, c.user_id, NULL \
         FROM credit_balances c WHERE c.user_id IN ({us})",
        ks = if ks.is_empty() { "NULL".into() } else { ks },
        us = if us.is_empty() { "NULL".into() } else { us },
    );
    for r in tx.rows(&sql, &args).await? {
        match r.text("kind")?.as_str() {
            "credit" => {
                out.prepaid.insert(r.i64("sub_user")?);
            }
            _ => {
                let via = match (r.oi64("sub_user")?, r.ots("anchor")?) {
                    (Some(u), Some(a)) => Some((u, a)),
                    _ => None,
                };
                out.budgets.push((budget_row(&r)?, via));
            }
        }
    }
    Ok(out)
}

/// Settles the charges of a batch of usage rows about to be inserted, inside the usage write's
/// transaction (before the insert: each charge's ledger entry is carried by its row, so it is
/// worked out first; if the insert then skips a row as a replay, the writer rolls back and
/// settles again without it — see [`Settlement::touched`]):
/// - every budget that applies to a row's key, user or the user's plan is charged the row's
///   amount in the period of the row's `created_at`;
/// - a prepaid user's balance is charged each billable row's cost, one ledger entry each (on the
///   row itself), taken from the earliest-expiring grants; a charge larger than the balance
///   plus overdraft takes what is there and records the rest as `uncollected` (it can only
///   happen when a request spent more than its reservation: see `budget.rs`);
/// - each lease a row's reservations came from shrinks by the row's amount, and so does its
///   pool's `leased`.
pub(super) async fn settle(
    tx: &mut Tx,
    rows: &[&UsageRecord],
    now: DateTime<Utc>,
) -> Result<Settlement, StoreError> {
    let billable: Vec<&UsageRecord> = rows.iter().copied().filter(|r| r.is_billable()).collect();
    let with_leases = rows.iter().any(|r| !r.charges.is_empty());
    if billable.is_empty() && !with_leases {
        return Ok(Settlement::default());
    }
    // PostgreSQL: the usage table's write lock before any pool's, as the insert that follows
    // would take it: an admin change that holds the usage writes (`hold_usage_writes`, SHARE)
    // and then seeds a budget period takes them in the same order, so the two wait, never
    // deadlock.
    if let TxConn::Postgres(_) = tx.conn {
        tx.exec("LOCK TABLE usage_records IN ROW EXCLUSIVE MODE", &[])
            .await?;
    }
    let keys: BTreeSet<i64> = billable.iter().map(|r| r.api_key_id).collect();
    let users: BTreeSet<i64> = billable.iter().map(|r| r.user_id).collect();

    // Budget periods charged, from the database's budgets; prepaid users among the rows.
    let Applicable { budgets, prepaid } = applicable(tx, &keys, &users).await?;
    let mut charged: BTreeMap<PeriodKey, Decimal> = BTreeMap::new();
    for (b, via) in budgets {
        // A batch's rows of one subject mostly fall in one period: they are summed in `run`
        // (subject, period start and end, sum), and the period is worked out again only for a
        // row outside it.
        let mut run: Option<PeriodRun> = None;
        for r in &billable {
            let (applies, subject, anchor) = match (b.api_key_id, b.user_id, via) {
                (Some(k), _, _) => (k == r.api_key_id, r.api_key_id, None),
                (_, Some(u), _) => (u == r.user_id, r.user_id, None),
                (_, _, Some((u, a))) => (u == r.user_id, r.user_id, Some(a)),
                _ => (false, 0, None),
            };
            let amount = r.amount(b.metric);
            if !applies || amount <= Decimal::ZERO {
                continue;
            }
            let t = r.created_at;
            match run.as_mut() {
                Some((s, start, end, sum))
                    if *s == subject && *start <= t && end.is_none_or(|e| t < e) =>
                {
                    *sum += amount;
                }
                _ => {
                    if let Some((s, start, _, sum)) = run.take() {
                        *charged.entry((b.id, s, start)).or_default() += sum;
                    }
                    let (start, end) = period_bounds(b.period, anchor, t);
                    run = Some((subject, start, end, amount));
                }
            }
        }
        if let Some((s, start, _, sum)) = run {
            *charged.entry((b.id, s, start)).or_default() += sum;
        }
    }

    // What comes out of each lease. Consecutive rows mostly name the same leases: their
    // amounts are summed in `run` and put in the map when the leases change.
    let mut from_lease: BTreeMap<i64, (Pool, Decimal)> = BTreeMap::new();
    let mut run: Vec<(i64, Pool, Decimal)> = Vec::new();
    let mut flush = |run: &mut Vec<(i64, Pool, Decimal)>| {
        for (lease_id, pool, amount) in run.drain(..) {
            from_lease
                .entry(lease_id)
                .or_insert((pool, Decimal::ZERO))
                .1 += amount;
        }
    };
    for r in rows {
        let same = run.len() == r.charges.len()
            && run.iter().zip(&r.charges).all(|(e, c)| e.0 == c.lease_id);
        if !same {
            flush(&mut run);
            run.extend(
                r.charges
                    .iter()
                    .map(|c| (c.lease_id, c.pool, Decimal::ZERO)),
            );
        }
        for (e, c) in run.iter_mut().zip(&r.charges) {
            e.2 += r.amount(c.pool.metric());
        }
    }
    flush(&mut run);

    // Lock every pool in key order: budget periods first, then balances.
    let mut budget_pools: BTreeSet<PeriodKey> = charged.keys().copied().collect();
    let mut credit_pools: BTreeSet<i64> = prepaid.clone();
    for (pool, _) in from_lease.values() {
        match PoolKey::of(pool) {
            PoolKey::Budget {
                budget_id,
                subject_id,
                period_start,
            } => {
                budget_pools.insert((budget_id, subject_id, period_start));
            }
            PoolKey::Credit { user_id } => {
                credit_pools.insert(user_id);
            }
        }
    }
    let mut budgets = lock_budget_periods(tx, &budget_pools).await?;
    let mut balances = lock_balances(tx, &credit_pools).await?;

    // Leases, by id.
    for (&lease_id, &(pool, amount)) in &from_lease {
        if amount <= Decimal::ZERO {
            continue;
        }
        let sql = format!("SELECT amount FROM spend_leases WHERE id = $1{}", tx.lock());
        let Some(row) = tx.row(&sql, &[V::I(lease_id)]).await? else {
            continue; // taken back after it expired: the pool already let it go
        };
        let held = row.dec("amount")?;
        let d = amount.min(held).max(Decimal::ZERO);
        tx.exec(
            "UPDATE spend_leases SET amount = $2 WHERE id = $1",
            &[V::I(lease_id), V::D(held - d)],
        )
        .await?;
        match PoolKey::of(&pool) {
            PoolKey::Budget {
                budget_id,
                subject_id,
                period_start,
            } => {
                if let Some(e) = budgets.get_mut(&(budget_id, subject_id, period_start)) {
                    e.1 = (e.1 - d).max(Decimal::ZERO);
                }
            }
            PoolKey::Credit { user_id } => {
                if let Some(e) = balances.get_mut(&user_id) {
                    e.1 = (e.1 - d).max(Decimal::ZERO);
                }
            }
        }
    }

    // Budget periods.
    for (key, amount) in &charged {
        if let Some(e) = budgets.get_mut(key) {
            e.0 += *amount;
        }
    }

    // Balances: one ledger entry per charged request, in the order the requests ended.
    // (position in `rows`, row): the entry goes back to its row.
    let mut charges: Vec<(usize, &UsageRecord)> = rows
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, r)| r.is_billable() && prepaid.contains(&r.user_id) && r.cost > Decimal::ZERO)
        .collect();
    charges.sort_by(|(_, a), (_, b)| {
        (a.created_at, &a.request_id).cmp(&(b.created_at, &b.request_id))
    });
    let mut by_user: BTreeMap<i64, Vec<(usize, &UsageRecord)>> = BTreeMap::new();
    for (i, r) in charges {
        by_user.entry(r.user_id).or_default().push((i, r));
    }
    // Worked out in memory, then written once: each grant and balance that changed in one
    // update, the ledger entries with their rows (a batch of a thousand charges is a handful of
    // statements, not thousands).
    let charged_users: BTreeSet<i64> = by_user
        .keys()
        .copied()
        .filter(|u| balances.contains_key(u))
        .collect();
    let mut open = open_grants_of(tx, &charged_users).await?;
    let mut entries: Vec<(usize, LedgerCharge)> = Vec::new();
    let mut settled = Settled::default();
    for (user_id, (balance, leased, overdraft)) in balances.iter_mut() {
        let charges = by_user.get(user_id).map(Vec::as_slice).unwrap_or(&[]);
        let mut grants = open.remove(user_id).unwrap_or_default();
        let before: Vec<Decimal> = grants.iter().map(|g| g.1).collect();
        // What the balance and overdraft still cover, and what was collected in all (taken from
        // the grants once: earliest-expiring first, as charge by charge would).
        let mut room = *balance + *overdraft;
        let mut collected = Decimal::ZERO;
        for &(i, r) in charges {
            let collect = r.cost.min(room.max(Decimal::ZERO));
            // The row's cost is the charge itself (the request id names the row, its key and
            // model); metadata only says what could not be collected.
            let metadata = (collect < r.cost).then(|| {
                serde_json::json!({
                    "cost": r.cost.to_string(),
                    "uncollected": (r.cost - collect).to_string(),
                })
            });
            entries.push((
                i,
                LedgerCharge {
                    id: 0, // numbered below, in this order
                    amount: -collect,
                    before: *balance,
                    metadata,
                },
            ));
            *balance -= collect;
            room -= collect;
            collected += collect;
        }
        take_from_grants(&mut grants, collected);
        for (g, was) in grants.iter().zip(before) {
            if g.1 != was {
                settled.grants.push((g.0, g.1));
            }
        }
        settled.balances.push((*user_id, *balance, *leased));
    }
    let touched = !budgets.is_empty() || !settled.balances.is_empty() || !from_lease.is_empty();
    settled.periods = budgets.into_iter().collect();
    settled.write(tx, now).await?;
    let mut out = Settlement {
        touched,
        charges: Vec::new(),
    };
    if !entries.is_empty() {
        out.charges = vec![None; rows.len()];
        let ids = ledger_ids(tx, entries.len()).await?;
        for ((i, mut entry), id) in entries.into_iter().zip(ids) {
            entry.id = id;
            out.charges[i] = Some(entry);
        }
    }
    Ok(out)
}

/// What a batch's settlement writes back to the rows it locked.
#[derive(Default)]
struct Settled {
    /// Budget periods: (budget, subject, period start) → (spent, leased).
    periods: Vec<(PeriodKey, (Decimal, Decimal))>,
    /// Grants whose remaining changed: (id, remaining).
    grants: Vec<(i64, Decimal)>,
    /// Balances: (user, balance, leased).
    balances: Vec<(i64, Decimal, Decimal)>,
}

impl Settled {
    /// On PostgreSQL one `UPDATE … FROM UNNEST` per table, whatever the number of pools a batch
    /// touched (each row is already locked by this transaction: the periods by their upsert, the
    /// balances by `lock_balances`, and a user's grants are only written under the balance's
    /// lock); on SQLite (in-process statements) one update per row.
    async fn write(&self, tx: &mut Tx, now: DateTime<Utc>) -> Result<(), StoreError> {
        if let TxConn::Postgres(c) = &mut tx.conn {
            if !self.periods.is_empty() {
                sqlx::query(
                    "UPDATE budget_usage g SET spent = x.s, leased = x.l \
                     FROM UNNEST($1::int8[], $2::int8[], $3::timestamptz[], $4::numeric[], $5::numeric[]) \
                     AS x(b, sub, p, s, l) \
                     WHERE g.budget_id = x.b AND g.subject_id = x.sub AND g.period_start = x.p",
                )
                .bind(self.periods.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
                .bind(self.periods.iter().map(|(k, _)| k.1).collect::<Vec<_>>())
                .bind(self.periods.iter().map(|(k, _)| k.2).collect::<Vec<_>>())
                .bind(self.periods.iter().map(|(_, v)| Numeric(v.0)).collect::<Vec<_>>())
                .bind(self.periods.iter().map(|(_, v)| Numeric(v.1)).collect::<Vec<_>>())
                .execute(&mut **c)
                .await?;
            }
            if !self.grants.is_empty() {
                sqlx::query(
                    "UPDATE credit_grants g SET remaining = x.r \
                     FROM UNNEST($1::int8[], $2::numeric[]) AS x(id, r) WHERE g.id = x.id",
                )
                .bind(self.grants.iter().map(|g| g.0).collect::<Vec<_>>())
                .bind(self.grants.iter().map(|g| Numeric(g.1)).collect::<Vec<_>>())
                .execute(&mut **c)
                .await?;
            }
            if !self.balances.is_empty() {
                sqlx::query(
                    "UPDATE credit_balances c SET balance = x.b, leased = x.l, updated_at = $4 \
                     FROM UNNEST($1::int8[], $2::numeric[], $3::numeric[]) AS x(u, b, l) \
                     WHERE c.user_id = x.u",
                )
                .bind(self.balances.iter().map(|b| b.0).collect::<Vec<_>>())
                .bind(
                    self.balances
                        .iter()
                        .map(|b| Numeric(b.1))
                        .collect::<Vec<_>>(),
                )
                .bind(
                    self.balances
                        .iter()
                        .map(|b| Numeric(b.2))
                        .collect::<Vec<_>>(),
                )
                .bind(now)
                .execute(&mut **c)
                .await?;
            }
            return Ok(());
        }
        for &((b, s, p), (spent, leased)) in &self.periods {
            write_budget_period(tx, b, s, p, spent, leased).await?;
        }
        for &(id, remaining) in &self.grants {
            write_grant(tx, id, remaining).await?;
        }
        for &(user_id, balance, leased) in &self.balances {
            write_balance(tx, user_id, balance, leased, now).await?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Credits, budgets, invariants: the operator's side.

/// What [`Store::spend_of_keys`] found for one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpend {
    pub budgets: Vec<(BudgetRow, Option<DateTime<Utc>>)>,
    pub prepaid: bool,
}

/// A ledger row as listed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LedgerEntry {
    pub id: i64,
    pub action: String,
    pub amount: Decimal,
    pub balance_before: Decimal,
    pub balance_after: Decimal,
    pub request_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// A user's credit as the operator sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CreditBalance {
    pub user_id: i64,
    /// `false`: never granted credits; requests are not limited by credits.
    pub prepaid: bool,
    pub balance: Decimal,
    /// Held by instances in leases right now (part of the balance, not yet spent).
    pub leased: Decimal,
    pub overdraft: Decimal,
}

/// What a grant answered (stored with its idempotency key, and given again for a replay).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GrantReceipt {
    pub transaction_id: i64,
    pub grant_id: i64,
    pub user_id: i64,
    pub amount: Decimal,
    pub balance: Decimal,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A grant to make.
#[derive(Debug, Clone)]
pub struct Grant<'a> {
    pub user_id: i64,
    pub amount: Decimal,
    pub expires_at: Option<DateTime<Utc>>,
    /// `grant` (a top-up or promotion) or `refund`.
    pub action: &'a str,
    pub note: Option<&'a str>,
    /// `Idempotency-Key` and a digest of what was asked: the same pair answers the first
    /// receipt again; the same key with another digest is refused.
    pub idempotency: Option<(&'a str, &'a str)>,
    /// How long an idempotency record is kept.
    pub idempotency_ttl: Duration,
}

/// How a grant went.
#[derive(Debug, Clone, PartialEq)]
pub enum GrantOutcome {
    Granted(GrantReceipt),
    /// The same idempotency key and request as before: the first answer, nothing granted.
    Replayed(GrantReceipt),
}

/// A budget period as the operator sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BudgetListing {
    #[serde(flatten)]
    pub budget: BudgetRow,
    /// The key's id, user's email or plan's name.
    pub owner: String,
    /// The current period of each subject that has used it (key or user id), with its
    /// start, what was spent and what instances hold in leases.
    pub periods: Vec<BudgetPeriod>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BudgetPeriod {
    pub subject_id: i64,
    pub period_start: DateTime<Utc>,
    pub spent: Decimal,
    pub leased: Decimal,
}

impl serde::Serialize for BudgetRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("api_key_id", &self.api_key_id)?;
        m.serialize_entry("user_id", &self.user_id)?;
        m.serialize_entry("plan_id", &self.plan_id)?;
        m.serialize_entry("metric", self.metric.as_str())?;
        m.serialize_entry("period", self.period.as_str())?;
        m.serialize_entry("limit", &self.limit)?;
        m.end()
    }
}

/// Whose budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetOwner {
    Key(i64),
    User(i64),
    Plan(i64),
}

/// The spend invariants (see [`Store::spend_invariants`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpendReport {
    pub balances: i64,
    /// Balances that differ from the sum of their ledger.
    pub balances_mismatched: i64,
    /// Balances below minus their overdraft.
    pub balances_overdrawn: i64,
    /// Users whose ledger, read in its order, does not chain: an entry's balance_before is not
    /// the balance_after of the user's entry before it (0 for the first), or its balance_after
    /// is not balance_before + amount.
    pub ledger_breaks: i64,
    /// Ledger charges whose request has no usage row, or a row that is not billable.
    pub ledger_orphans: i64,
    /// Billable rows of prepaid users with a cost, written after the user's first grant, with
    /// no ledger charge.
    pub charges_missing: i64,
    pub budget_periods: i64,
    /// Budget periods whose spent differs from the sum of their subject's rows in the period.
    pub budget_periods_mismatched: i64,
    /// Pools whose `leased` differs from the sum of their leases.
    pub leases_mismatched: i64,
}

impl SpendReport {
    pub fn holds(&self) -> bool {
        self.balances_mismatched == 0
            && self.balances_overdrawn == 0
            && self.ledger_breaks == 0
            && self.ledger_orphans == 0
            && self.charges_missing == 0
            && self.budget_periods_mismatched == 0
            && self.leases_mismatched == 0
    }
}

fn ledger_entry(r: &R) -> Result<LedgerEntry, sqlx::Error> {
    Ok(LedgerEntry {
        id: r.i64("id")?,
        action: r.text("action")?,
        amount: r.dec("amount")?,
        balance_before: r.dec("balance_before")?,
        balance_after: r.dec("balance_after")?,
        request_id: r.otext("request_id")?,
        idempotency_key: r.otext("idempotency_key")?,
        metadata: r.json("metadata")?,
        created_at: r.ts("created_at")?,
    })
}

impl Store {
    /// Grants credit (or refunds it): a grant row and a ledger row, the balance raised, in one
    /// transaction with the idempotency record; the user is prepaid from then on, which reaches
    /// every instance as a change to the user does.
    pub async fn grant_credits(
        &self,
        actor: &Actor,
        g: &Grant<'_>,
        now: DateTime<Utc>,
    ) -> Result<GrantOutcome, StoreError> {
        if g.amount <= Decimal::ZERO {
            return Err(StoreError::Invalid("the amount must be positive".into()));
        }
        let mut tx = self.begin().await?;
        if let Some((key, digest)) = g.idempotency {
            tx.exec(
                "DELETE FROM idempotency_records WHERE key = $1 AND expires_at <= $2",
                &[V::T(key.into()), V::Ts(now)],
            )
            .await?;
            let sql = format!(
                "SELECT request_hash, response FROM idempotency_records WHERE key = $1{}",
                tx.lock()
            );
            if let Some(r) = tx.row(&sql, &[V::T(key.into())]).await? {
                if r.text("request_hash")? != digest {
                    return Err(StoreError::Idempotency(format!(
                        "idempotency key {key:?} was already used with a different request; \
                         use a new key for a new request"
                    )));
                }
                let receipt: GrantReceipt = serde_json::from_value(r.json("response")?)
                    .map_err(|e| StoreError::Invalid(format!("stored idempotent answer: {e}")))?;
                tx.commit_unaudited().await?;
                return Ok(GrantOutcome::Replayed(receipt));
            }
        }
        tx.exec(
            "INSERT INTO credit_balances (user_id, balance, leased, overdraft, updated_at) \
             VALUES ($1, $2, $2, $2, $3) ON CONFLICT (user_id) DO NOTHING",
            &[V::I(g.user_id), V::D(Decimal::ZERO), V::Ts(now)],
        )
        .await
        .map_err(|e| match e {
            StoreError::Db(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => {
                StoreError::NotFound(format!("user {}", g.user_id))
            }
            e => e,
        })?;
        let (balance, leased, _) = lock_balance(&mut tx, g.user_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("user {}", g.user_id)))?;
        let balance = expire_grants(&mut tx, g.user_id, balance, leased, now).await?;
        let grant_id = tx
            .row(
                "INSERT INTO credit_grants (user_id, amount, remaining, expires_at, created_at) \
                 VALUES ($1, $2, $2, $3, $4) RETURNING id",
                &[
                    V::I(g.user_id),
                    V::D(g.amount),
                    V::OTs(g.expires_at),
                    V::Ts(now),
                ],
            )
            .await?
            .ok_or_else(|| StoreError::Invalid("grant insert returned nothing".into()))?
            .i64("id")?;
        let mut meta = serde_json::json!({});
        if let Some(n) = g.note {
            meta["note"] = n.into();
        }
        if let Some(e) = g.expires_at {
            meta["expires_at"] = serde_json::json!(e);
        }
        let transaction_id = ledger(
            &mut tx,
            g.user_id,
            g.action,
            g.amount,
            balance,
            Some(grant_id),
            g.idempotency.map(|(k, _)| k),
            meta,
            now,
        )
        .await?;
        write_balance(&mut tx, g.user_id, balance + g.amount, leased, now).await?;
        // The change poll of every instance watches users.updated_at.
        tx.exec(
            "UPDATE users SET updated_at = $2 WHERE id = $1",
            &[V::I(g.user_id), V::Ts(now)],
        )
        .await?;
        let receipt = GrantReceipt {
            transaction_id,
            grant_id,
            user_id: g.user_id,
            amount: g.amount,
            balance: balance + g.amount,
            expires_at: g.expires_at,
        };
        if let Some((key, digest)) = g.idempotency {
            tx.exec(
                "INSERT INTO idempotency_records (key, request_hash, response, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    V::T(key.into()),
                    V::T(digest.into()),
                    V::J(serde_json::to_value(&receipt).unwrap_or_default()),
                    V::Ts(now),
                    V::Ts(now + g.idempotency_ttl),
                ],
            )
            .await
            // PostgreSQL: another grant with this key committed while this one ran (the
            // SELECT above had no row to lock); this one rolls back.
            .map_err(|e| match e {
                StoreError::Db(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                    StoreError::Idempotency(format!(
                        "idempotency key {key:?} was used by another request at the same moment; \
                         retry to get its answer"
                    ))
                }
                e => e,
            })?;
        }
        // Every instance learns the user is prepaid (its keys leave the caches).
        tx.user_keys_changed(g.user_id).await?;
        tx.audit(
            actor,
            if g.action == "refund" {
                "credits.refund"
            } else {
                "credits.grant"
            },
            &Target::new("user", g.user_id),
            Some(serde_json::json!({ "balance": balance })),
            Some(serde_json::to_value(&receipt).unwrap_or_default()),
        )
        .await?;
        tx.commit().await?;
        Ok(GrantOutcome::Granted(receipt))
    }

    /// A user's balance (expired grants written off first).
    pub async fn credit_balance(
        &self,
        user_id: i64,
        now: DateTime<Utc>,
    ) -> Result<CreditBalance, StoreError> {
        let mut tx = self.begin().await?;
        let Some((balance, leased, overdraft)) = lock_balance(&mut tx, user_id).await? else {
            tx.commit_unaudited().await?;
            return Ok(CreditBalance {
                user_id,
                prepaid: false,
                balance: Decimal::ZERO,
                leased: Decimal::ZERO,
                overdraft: Decimal::ZERO,
            });
        };
        let balance = expire_grants(&mut tx, user_id, balance, leased, now).await?;
        tx.commit_unaudited().await?;
        Ok(CreditBalance {
            user_id,
            prepaid: true,
            balance,
            leased,
            overdraft,
        })
    }

    /// A user's ledger, newest first.
    pub async fn credit_history(
        &self,
        user_id: i64,
        limit: i64,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .rows(
                "SELECT id, action, amount, balance_before, balance_after, request_id, idempotency_key, \
                 metadata, created_at FROM credit_transactions WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
                &[V::I(user_id), V::I(limit)],
            )
            .await?;
        tx.commit_unaudited().await?;
        Ok(rows.iter().map(ledger_entry).collect::<Result<_, _>>()?)
    }

    /// Sets (or replaces) the budget of `owner` for `metric` and `period`. A new budget starts
    /// from what its subject already used in the current period (so "$5 a day" set at noon
    /// counts the morning; a plan's, each active subscriber's current period from their
    /// subscription's start), summed while no usage row can be written (PostgreSQL: the table is
    /// locked in SHARE mode for that moment). The owner's keys leave every cache.
    pub async fn set_budget(
        &self,
        actor: &Actor,
        owner: BudgetOwner,
        metric: Metric,
        period: Period,
        limit: Decimal,
        now: DateTime<Utc>,
    ) -> Result<BudgetRow, StoreError> {
        let mut tx = self.begin().await?;
        tx.hold_usage_writes().await?;
        let (before, budget) = tx.set_budget(owner, metric, period, limit, now).await?;
        touch_owner(&mut tx, owner, now).await?;
        owner_keys_changed(&mut tx, owner).await?;
        tx.audit(
            actor,
            "budget.set",
            &Target::new("budget", budget.id),
            before,
            Some(serde_json::to_value(&budget).unwrap_or_default()),
        )
        .await?;
        tx.commit().await?;
        Ok(budget)
    }

    /// Deletes a budget (its periods and leases go with it).
    pub async fn delete_budget(
        &self,
        actor: &Actor,
        budget_id: i64,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let row = tx
            .row(
                &format!("SELECT {BUDGET_COLUMNS} FROM budgets b WHERE b.id = $1"),
                &[V::I(budget_id)],
            )
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("budget {budget_id}")))?;
        let b = budget_row(&row)?;
        tx.exec(
            "DELETE FROM spend_leases WHERE pool = 'budget' AND budget_id = $1",
            &[V::I(budget_id)],
        )
        .await?;
        tx.exec(
            "DELETE FROM budget_usage WHERE budget_id = $1",
            &[V::I(budget_id)],
        )
        .await?;
        tx.exec("DELETE FROM budgets WHERE id = $1", &[V::I(budget_id)])
            .await?;
        let owner = owner_of(&b);
        touch_owner(&mut tx, owner, now).await?;
        owner_keys_changed(&mut tx, owner).await?;
        tx.audit(
            actor,
            "budget.delete",
            &Target::new("budget", budget_id),
            Some(serde_json::to_value(&b).unwrap_or_default()),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Budgets (all, or an owner's), each with its subjects' current periods.
    pub async fn list_budgets(
        &self,
        owner: Option<BudgetOwner>,
        now: DateTime<Utc>,
    ) -> Result<Vec<BudgetListing>, StoreError> {
        let mut tx = self.begin_read().await?;
        let (filter, args) = match owner {
            None => (String::new(), vec![]),
            Some(BudgetOwner::Key(k)) => (" WHERE b.api_key_id = $1".to_string(), vec![V::I(k)]),
            Some(BudgetOwner::User(u)) => (" WHERE b.user_id = $1".to_string(), vec![V::I(u)]),
            Some(BudgetOwner::Plan(p)) => (" WHERE b.plan_id = $1".to_string(), vec![V::I(p)]),
        };
        let sql = format!(
            "SELECT {BUDGET_COLUMNS}, COALESCE(CAST(b.api_key_id AS TEXT), u.email, p.name) AS owner \
             FROM budgets b LEFT JOIN users u ON u.id = b.user_id LEFT JOIN plans p ON p.id = b.plan_id{filter} ORDER BY b.id"
        );
        let mut out = Vec::new();
        for r in tx.rows(&sql, &args).await? {
            let budget = budget_row(&r)?;
            let owner = r.text("owner")?;
            let mut periods = Vec::new();
            for p in tx
                .rows(
                    "SELECT subject_id, period_start, spent, leased FROM budget_usage WHERE budget_id = $1 \
                     ORDER BY subject_id, period_start DESC",
                    &[V::I(budget.id)],
                )
                .await?
            {
                let start = p.ts("period_start")?;
                let subject = p.i64("subject_id")?;
                let (_, end) = period_bounds(budget.period, None, start);
                // The current period of each subject only (a plan's periods are anchored: the
                // newest row is its current one).
                if periods.iter().any(|q: &BudgetPeriod| q.subject_id == subject)
                    || (budget.plan_id.is_none() && end.is_some_and(|e| e <= now))
                {
                    continue;
                }
                periods.push(BudgetPeriod {
                    subject_id: subject,
                    period_start: start,
                    spent: p.dec("spent")?,
                    leased: p.dec("leased")?,
                });
            }
            out.push(BudgetListing {
                budget,
                owner,
                periods,
            });
        }
        tx.commit_unaudited().await?;
        Ok(out)
    }

    /// The spend side of key lookups: for each (key, user), the budgets that apply to the key
    /// (its own, its user's, the user's plan's, with the subscription start a plan's periods run
    /// from) and whether the user is prepaid. One query for any number of keys.
    pub async fn spend_of_keys(&self, keys: &[(i64, i64)]) -> Result<Vec<KeySpend>, StoreError> {
        let key_ids: BTreeSet<i64> = keys.iter().map(|k| k.0).collect();
        let user_ids: BTreeSet<i64> = keys.iter().map(|k| k.1).collect();
        let mut tx = self.begin_read().await?;
        let Applicable { budgets, prepaid } = applicable(&mut tx, &key_ids, &user_ids).await?;
        tx.commit_unaudited().await?;
        Ok(keys
            .iter()
            .map(|&(key, user)| KeySpend {
                budgets: budgets
                    .iter()
                    .filter(|(b, via)| match via {
                        Some((u, _)) => *u == user,
                        None => b.api_key_id == Some(key) || b.user_id == Some(user),
                    })
                    .map(|(b, via)| (b.clone(), via.map(|(_, a)| a)))
                    .collect(),
                prepaid: prepaid.contains(&user),
            })
            .collect())
    }

    /// The spend invariants: every balance equals the sum of its ledger and is not below minus
    /// its overdraft; every ledger charge names a billable usage row; every billable row with a
    /// cost of a prepaid user since their first grant has its ledger charge; every budget period's
    /// spent equals the sum of its subject's billable rows in the period; every pool's `leased`
    /// equals the sum of its leases.
    pub async fn spend_invariants(&self) -> Result<SpendReport, StoreError> {
        let mut tx = self.begin_read().await?;
        let mut rep = SpendReport::default();
        for b in tx
            .rows(
                "SELECT user_id, balance, leased, overdraft FROM credit_balances",
                &[],
            )
            .await?
        {
            rep.balances += 1;
            let user = b.i64("user_id")?;
            let balance = b.dec("balance")?;
            let mut sum = Decimal::ZERO;
            let mut chained = true;
            for a in tx
                .rows(
                    "SELECT amount, balance_before, balance_after FROM credit_transactions \
                     WHERE user_id = $1 ORDER BY id",
                    &[V::I(user)],
                )
                .await?
            {
                let (amount, before, after) = (
                    a.dec("amount")?,
                    a.dec("balance_before")?,
                    a.dec("balance_after")?,
                );
                chained &= before == sum && after == before + amount;
                sum += amount;
            }
            if sum != balance {
                rep.balances_mismatched += 1;
            }
            if !chained {
                rep.ledger_breaks += 1;
            }
            if balance < -b.dec("overdraft")? {
                rep.balances_overdrawn += 1;
            }
            let mut leased = Decimal::ZERO;
            for l in tx
                .rows(
                    "SELECT amount FROM spend_leases WHERE pool = 'credit' AND user_id = $1",
                    &[V::I(user)],
                )
                .await?
            {
                leased += l.dec("amount")?;
            }
            if leased != b.dec("leased")? {
                rep.leases_mismatched += 1;
            }
        }
        // Charges are carried by their usage rows (migration 0013), so each has its row; a row
        // that is not billable must carry none, and a charge left in credit_entries (one the
        // migration found no row for) is an orphan.
        let orphans = format!(
            "SELECT (SELECT COUNT(*) FROM credit_entries WHERE action = 'charge') \
             + (SELECT COUNT(*) FROM usage_records r WHERE r.ledger_id IS NOT NULL AND NOT {BILLABLE_SQL}) AS n"
        );
        rep.ledger_orphans = tx.row(&orphans, &[]).await?.map_or(Ok(0), |r| r.i64("n"))?;
        // Rows with a cost (text on SQLite: compared after reading).
        let missing = format!(
            "SELECT r.cost FROM usage_records r JOIN credit_balances c ON c.user_id = r.user_id \
             WHERE {BILLABLE_SQL} AND r.ledger_id IS NULL \
             AND r.created_at >= (SELECT MIN(g.created_at) FROM credit_grants g WHERE g.user_id = r.user_id)"
        );
        for r in tx.rows(&missing, &[]).await? {
            if r.dec("cost")? > Decimal::ZERO {
                rep.charges_missing += 1;
            }
        }
        let periods = tx
            .rows(
                &format!(
                    "SELECT {BUDGET_COLUMNS}, g.subject_id, g.period_start, g.spent, g.leased, s.current_period_start AS anchor \
                     FROM budget_usage g JOIN budgets b ON b.id = g.budget_id \
                     LEFT JOIN subscriptions s ON s.plan_id = b.plan_id AND s.user_id = g.subject_id"
                ),
                &[],
            )
            .await?;
        for p in periods {
            rep.budget_periods += 1;
            let b = budget_row(&p)?;
            let start = p.ts("period_start")?;
            let anchor = if b.plan_id.is_some() {
                p.ots("anchor")?
            } else {
                None
            };
            let (_, end) = period_bounds(b.period, anchor, start);
            let col = if b.api_key_id.is_some() {
                "api_key_id"
            } else {
                "user_id"
            };
            let spent =
                scope_spent(&mut tx, col, p.i64("subject_id")?, b.metric, start, end).await?;
            if spent != p.dec("spent")? {
                rep.budget_periods_mismatched += 1;
            }
            let mut leased = Decimal::ZERO;
            for l in tx
                .rows(
                    "SELECT amount FROM spend_leases WHERE pool = 'budget' AND budget_id = $1 AND subject_id = $2 AND period_start = $3",
                    &[V::I(b.id), V::I(p.i64("subject_id")?), V::Ts(start)],
                )
                .await?
            {
                leased += l.dec("amount")?;
            }
            if leased != p.dec("leased")? {
                rep.leases_mismatched += 1;
            }
        }
        tx.commit_unaudited().await?;
        Ok(rep)
    }
}

impl Tx {
    /// PostgreSQL: no usage row can be written until this transaction ends (`LOCK TABLE
    /// usage_records IN SHARE MODE`), so what a subject used can be summed and stored as a
    /// period's `spent` without a row slipping between. SQLite: the transaction is already the
    /// one writer.
    pub(super) async fn hold_usage_writes(&mut self) -> Result<(), StoreError> {
        if let TxConn::Postgres(_) = self.conn {
            self.exec("LOCK TABLE usage_records IN SHARE MODE", &[])
                .await?;
        }
        Ok(())
    }

    /// [`Store::set_budget`] inside a transaction (call [`Tx::hold_usage_writes`] first):
    /// returns the budget's snapshot before (`None`: new) and the budget. Touches no owner and
    /// writes no audit row.
    pub(super) async fn set_budget(
        &mut self,
        owner: BudgetOwner,
        metric: Metric,
        period: Period,
        limit: Decimal,
        now: DateTime<Utc>,
    ) -> Result<(Option<serde_json::Value>, BudgetRow), StoreError> {
        if limit < Decimal::ZERO {
            return Err(StoreError::Invalid("the limit must not be negative".into()));
        }
        let (col, id) = match owner {
            BudgetOwner::Key(k) => ("api_key_id", k),
            BudgetOwner::User(u) => ("user_id", u),
            BudgetOwner::Plan(p) => ("plan_id", p),
        };
        let sql = format!(
            "SELECT {BUDGET_COLUMNS} FROM budgets b WHERE b.{col} = $1 AND b.metric = $2 AND b.period = $3{}",
            self.lock()
        );
        let args = [
            V::I(id),
            V::T(metric.as_str().into()),
            V::T(period.as_str().into()),
        ];
        let existing = self.row(&sql, &args).await?;
        let before = match &existing {
            Some(r) => Some(serde_json::to_value(budget_row(r)?).unwrap_or_default()),
            None => None,
        };
        let budget_id = match existing {
            Some(r) => {
                let id = r.i64("id")?;
                self.exec(
                    "UPDATE budgets SET limit_amount = $2, updated_at = $3 WHERE id = $1",
                    &[V::I(id), V::D(limit), V::Ts(now)],
                )
                .await?;
                id
            }
            None => {
                let sql = format!(
                    "INSERT INTO budgets ({col}, metric, period, limit_amount, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $5) RETURNING id"
                );
                let id = self
                    .row(
                        &sql,
                        &[
                            args[0].clone(),
                            args[1].clone(),
                            args[2].clone(),
                            V::D(limit),
                            V::Ts(now),
                        ],
                    )
                    .await
                    .map_err(|e| match e {
                        StoreError::Db(sqlx::Error::Database(d))
                            if d.is_foreign_key_violation() =>
                        {
                            StoreError::NotFound(format!("{} {id}", col.trim_end_matches("_id")))
                        }
                        e => e,
                    })?
                    .ok_or_else(|| StoreError::Invalid("budget insert returned nothing".into()))?
                    .i64("id")?;
                // What the subject already used this period: the key's or user's calendar
                // period, or each subscriber's period from their subscription's start.
                let subjects = match owner {
                    BudgetOwner::Key(_) | BudgetOwner::User(_) => vec![(id_of(owner), None)],
                    BudgetOwner::Plan(p) => {
                        let mut subs = Vec::new();
                        for r in self
                            .rows(
                                "SELECT user_id, current_period_start FROM subscriptions \
                                 WHERE plan_id = $1 AND status = 'active' ORDER BY user_id",
                                &[V::I(p)],
                            )
                            .await?
                        {
                            subs.push((r.i64("user_id")?, Some(r.ts("current_period_start")?)));
                        }
                        subs
                    }
                };
                let subject_col = if col == "api_key_id" { col } else { "user_id" };
                for (subject, anchor) in subjects {
                    seed_period(self, id, subject_col, subject, metric, period, anchor, now)
                        .await?;
                }
                id
            }
        };
        let row = self
            .row(
                &format!("SELECT {BUDGET_COLUMNS} FROM budgets b WHERE b.id = $1"),
                &[V::I(budget_id)],
            )
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("budget {budget_id}")))?;
        Ok((before, budget_row(&row)?))
    }
}

/// Writes the current period (at `now`) of one budget for one subject with what the subject
/// already used in it (a new budget, or a new subscription), if the period has no row yet.
#[allow(clippy::too_many_arguments)]
pub(super) async fn seed_period(
    tx: &mut Tx,
    budget_id: i64,
    subject_col: &str,
    subject: i64,
    metric: Metric,
    period: Period,
    anchor: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (start, end) = period_bounds(period, anchor, now);
    let spent = scope_spent(tx, subject_col, subject, metric, start, end).await?;
    tx.exec(
        "INSERT INTO budget_usage (budget_id, subject_id, period_start, spent, leased) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (budget_id, subject_id, period_start) DO NOTHING",
        &[
            V::I(budget_id),
            V::I(subject),
            V::Ts(start),
            V::D(spent),
            V::D(Decimal::ZERO),
        ],
    )
    .await?;
    Ok(())
}

/// Forgets a subscriber's periods of a plan's budgets, and the leases instances hold on them
/// (a subscription that ends, or starts again from another plan or start): pools first, then
/// leases. An instance still holding a forgotten lease in memory can admit at most what it held
/// (the bound of a changed budget); its settlement and return find no lease and change nothing.
pub(super) async fn drop_plan_periods(
    tx: &mut Tx,
    plan_id: i64,
    user_id: i64,
) -> Result<(), StoreError> {
    let args = [V::I(plan_id), V::I(user_id)];
    tx.exec(
        "DELETE FROM budget_usage WHERE subject_id = $2 \
         AND budget_id IN (SELECT id FROM budgets WHERE plan_id = $1)",
        &args,
    )
    .await?;
    tx.exec(
        "DELETE FROM spend_leases WHERE pool = 'budget' AND subject_id = $2 \
         AND budget_id IN (SELECT id FROM budgets WHERE plan_id = $1)",
        &args,
    )
    .await?;
    Ok(())
}

/// Tells every instance (after the commit) that the keys a budget's owner covers changed.
pub(super) async fn owner_keys_changed(tx: &mut Tx, owner: BudgetOwner) -> Result<(), StoreError> {
    match owner {
        BudgetOwner::Key(k) => {
            let hash = tx
                .row("SELECT key_hash FROM api_keys WHERE id = $1", &[V::I(k)])
                .await?
                .map(|r| r.text("key_hash"))
                .transpose()?;
            if let Some(h) = hash {
                tx.notify_after_commit(super::KEYS_CHANNEL, h);
            }
        }
        BudgetOwner::User(u) => {
            tx.user_keys_changed(u).await?;
        }
        BudgetOwner::Plan(p) => {
            let users = tx
                .rows(
                    "SELECT user_id FROM subscriptions WHERE plan_id = $1",
                    &[V::I(p)],
                )
                .await?;
            for u in users {
                tx.user_keys_changed(u.i64("user_id")?).await?;
            }
        }
    }
    Ok(())
}

fn id_of(owner: BudgetOwner) -> i64 {
    match owner {
        BudgetOwner::Key(i) | BudgetOwner::User(i) | BudgetOwner::Plan(i) => i,
    }
}

fn owner_of(b: &BudgetRow) -> BudgetOwner {
    match (b.api_key_id, b.user_id, b.plan_id) {
        (Some(k), _, _) => BudgetOwner::Key(k),
        (_, Some(u), _) => BudgetOwner::User(u),
        (_, _, p) => BudgetOwner::Plan(p.unwrap_or(0)),
    }
}

/// Bumps `updated_at` of what owns a budget, which every instance's change poll watches.
pub(super) async fn touch_owner(
    tx: &mut Tx,
    owner: BudgetOwner,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (sql, id) = match owner {
        BudgetOwner::Key(k) => ("UPDATE api_keys SET updated_at = $2 WHERE id = $1", k),
        BudgetOwner::User(u) => ("UPDATE users SET updated_at = $2 WHERE id = $1", u),
        BudgetOwner::Plan(p) => (
            "UPDATE users SET updated_at = $2 WHERE id IN (SELECT user_id FROM subscriptions WHERE plan_id = $1)",
            p,
        ),
    };
    tx.exec(sql, &[V::I(id), V::Ts(now)]).await?;
    Ok(())
}

/// What the billable rows of one key (`col` = `api_key_id`) or user (`user_id`) in
/// `[start, end)` amount to in `metric`.
async fn scope_spent(
    tx: &mut Tx,
    col: &str,
    id: i64,
    metric: Metric,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
) -> Result<Decimal, StoreError> {
    let until = end.map_or(String::new(), |_| " AND r.created_at < $3".to_string());
    let sql = format!(
        "SELECT r.cost, r.tokens_used FROM usage_records r WHERE r.{col} = $1 AND r.created_at >= $2{until} AND {BILLABLE_SQL}"
    );
    let mut args = vec![V::I(id), V::Ts(start)];
    if let Some(e) = end {
        args.push(V::Ts(e));
    }
    let mut sum = Decimal::ZERO;
    for r in tx.rows(&sql, &args).await? {
        sum += match metric {
            Metric::Cost => r.dec("cost")?,
            Metric::Tokens => Decimal::from(r.i64("tokens_used")?),
            Metric::Requests => Decimal::ONE,
        };
    }
    Ok(sum)
}
